//! Forwarding one request: route by Host, take a slot from the service's pool, send the
//! request to the chosen instance over a pooled connection, stream both bodies, log it.
//!
//! Bodies are never collected: frames go through as they come (SSE and long polls included),
//! trailers with them. `Expect: 100-continue` travels to the instance; the client gets its
//! `100 Continue` when the proxy starts streaming the body, which is after it has a slot and a
//! connection to the instance, so a request rejected here (503, 413, 431) never sends its body.
//! Other 1xx responses from instances (103 Early Hints, 102) are dropped: hyper cannot send
//! them.
//!
//! A connection-level failure (refused, or reset before any response byte) marks the instance
//! suspect and is retried once on another instance when the instance cannot have acted on the
//! request: it was never reached, or the method is idempotent (GET, HEAD, OPTIONS, PUT,
//! DELETE) and its body, if any, was not sent yet. With no other healthy instance it is a 502.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tracing::Instrument;

use crate::access_log::{AccessEntry, AccessLog};
use crate::config::{ServiceConfig, UpstreamProtocol};
use crate::headers::{self, Origin};
use crate::pool::{Lease, Rejected};
use crate::routes::{Route, RouteTable};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the proxy answers with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Connections to one service's instances: pooled per instance address and per thread, idle
/// ones closed after `timeouts.upstream_idle`.
///
/// Per thread because a connection's task runs on the runtime that opened it: a request served
/// by another thread's runtime would hand every request and response across threads, two
/// wake-ups through the kernel per request. The daemon serves the proxy from one
/// current-thread runtime per CPU, so each keeps connections of its own.
pub(crate) struct Upstream {
    connect_timeout: Duration,
    idle_timeout: Duration,
    h2c: bool,
    clients: thread_local::ThreadLocal<Clients>,
}

pub(crate) struct Clients {
    pub(crate) http1: Client<HttpConnector, RequestBody>,
    pub(crate) h2c: Option<Client<HttpConnector, RequestBody>>,
}

impl Upstream {
    pub(crate) fn new(config: &ServiceConfig) -> Upstream {
        Upstream {
            connect_timeout: config.timeouts.connect,
            idle_timeout: config.timeouts.upstream_idle,
            h2c: config.upstream == UpstreamProtocol::H2c,
            clients: thread_local::ThreadLocal::new(),
        }
    }

    /// This thread's clients.
    pub(crate) fn clients(&self) -> &Clients {
        self.clients.get_or(|| Clients {
            http1: self.build(false),
            h2c: self.h2c.then(|| self.build(true)),
        })
    }

    fn build(&self, h2: bool) -> Client<HttpConnector, RequestBody> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(self.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .http2_only(h2);
        builder.build(connector)
    }
}

/// The connection a request came on.
#[derive(Clone)]
pub(crate) struct ConnInfo {
    pub client: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// Requests on this connection whose response has not finished.
    pub active: Arc<AtomicUsize>,
    /// Fires when the proxy closes for good (ends WebSockets).
    pub closing: tokio::sync::watch::Receiver<bool>,
    pub streams: Arc<StreamCount>,
}

/// Upgraded connections (WebSockets) still open, for shutdown.
#[derive(Default)]
pub(crate) struct StreamCount {
    pub open: AtomicUsize,
    pub done: tokio::sync::Notify,
}

struct ActiveGuard(Arc<AtomicUsize>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Everything the access log needs; written when dropped (the response's end).
struct Finish {
    log: Option<Arc<AccessLog>>,
    metrics: Option<Arc<crate::metrics::ServiceMetrics>>,
    entry: AccessEntry,
    start: Instant,
    /// Wall-clock start, formatted into the log line only when there is a log.
    started_at: chrono::DateTime<chrono::Utc>,
    bytes_in: Arc<AtomicU64>,
    lease: Option<Lease>,
    _active: ActiveGuard,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.lease.take();
        if self.entry.status == 0 {
            // The client went away before any response (while queued, say): nginx's 499.
            self.entry.status = 499;
        }
        // An upgraded connection's lifetime is not a request's latency.
        if let Some(metrics) = &self.metrics
            && self.entry.status != 101
        {
            metrics.observe_request(self.entry.status, self.start.elapsed());
        }
        if let Some(log) = &self.log {
            self.entry.time = self
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            self.entry.duration_ms = ms(self.start.elapsed());
            self.entry.bytes_in = self.bytes_in.load(Ordering::Relaxed);
            log.record(&self.entry);
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The response body handed to the client: counts bytes, enforces the whole-request deadline,
/// and holds the pool slot until the last frame.
struct ResponseBody<B> {
    inner: B,
    finish: Option<Finish>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            self.finish.take();
            return Poll::Ready(Some(Err("the request's timeout passed".into())));
        }
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), self.finish.as_mut()) {
                    f.entry.bytes_out += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.finish.take();
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.finish.take();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body sent to an instance. The client's body waits in `slot` until the
/// instance's connection first asks for it, so a request whose body was never touched can be
/// retried on another instance.
pub(crate) struct RequestBody {
    slot: Arc<Mutex<Option<Incoming>>>,
    body: Option<Incoming>,
    hint: SizeHint,
    end: bool,
    bytes: Arc<AtomicU64>,
    limit: Option<u64>,
    over_limit: Arc<AtomicBool>,
    /// Told when the body has been sent whole: the first-byte timeout starts then.
    sent: Arc<tokio::sync::Notify>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.body.is_none() {
            let taken = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some(b) => self.body = Some(b),
                None => return Poll::Ready(None),
            }
        }
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let total = self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if self.limit.is_some_and(|l| total > l) {
                        self.over_limit.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(
                            "the request body is larger than allowed".into()
                        )));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => {
                // A stored permit: the waiter may not be waiting yet.
                self.sent.notify_one();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(b) => b.is_end_stream(),
            None => self.end,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

/// A short plain-text answer from the proxy itself.
pub(crate) fn plain(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let body = http_body_util::Full::new(Bytes::from(format!("{text}\n")))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn unavailable(retry_after: Duration, text: &str) -> Response<ProxyBody> {
    let mut resp = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// The host a request is for: `:authority` (HTTP/2) or `Host`.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

/// What went wrong talking to an instance.
enum Failure {
    /// The instance could not be reached (`sent_nothing`) or dropped the connection before
    /// answering.
    Connection {
        reason: String,
        sent_nothing: bool,
    },
    ConnectTimeout,
    FirstByteTimeout,
    RequestTimeout,
    BodyTooLarge,
    Other(String),
}

fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut timed_out = false;
    let mut reset = false;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                TimedOut => timed_out = true,
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => reset = true,
                _ => {}
            }
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            reset = true;
        }
        source = s.source();
    }
    let text = error_chain(e);
    if e.is_connect() {
        if timed_out {
            Failure::ConnectTimeout
        } else {
            Failure::Connection {
                reason: text,
                sent_nothing: true,
            }
        }
    } else if reset {
        Failure::Connection {
            reason: text,
            sent_nothing: false,
        }
    } else {
        Failure::Other(text)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Handles one request from a client.
pub(crate) async fn handle(
    routes: &RouteTable,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    conn.active.fetch_add(1, Ordering::AcqRel);
    let active = ActiveGuard(conn.active.clone());
    let host = request_host(&req).unwrap_or_default();
    let request_id = headers::ensure_request_id(req.headers_mut());
    let Some(route) = routes.lookup(&host) else {
        let shown = crate::routes::normalize_host(&host);
        tracing::debug!(host = %shown, "no route");
        return plain(
            StatusCode::NOT_FOUND,
            &format!("404 not found: no service answers for host {shown:?}"),
        );
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let finish = Finish {
        log: route.access_log.clone(),
        metrics: route.pool.service_metrics().cloned(),
        entry: AccessEntry {
            time: String::new(),
            request_id: request_id.clone(),
            service: route.pool.service().to_string(),
            revision: route.revision.clone(),
            instance: String::new(),
            method: req.method().to_string(),
            host: host.clone(),
            path: path.clone(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0.0,
            queued_ms: 0.0,
            woke: false,
            client: conn.client.to_string(),
        },
        start,
        started_at: chrono::Utc::now(),
        bytes_in: Arc::new(AtomicU64::new(0)),
        lease: None,
        _active: active,
    };
    let span = tracing::debug_span!(
        "request",
        service = %route.pool.service(),
        revision = %route.revision,
        id = %request_id
    );
    forward(&route, conn, req, host, path, finish)
        .instrument(span)
        .await
}

fn answer(mut finish: Finish, resp: Response<ProxyBody>) -> Response<ProxyBody> {
    finish.entry.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = ResponseBody {
        inner: body,
        finish: Some(finish),
        deadline: None,
    }
    .boxed_unsync();
    Response::from_parts(parts, body)
}

async fn forward(
    route: &Arc<Route>,
    conn: &ConnInfo,
    mut req: Request<Incoming>,
    host: String,
    path: String,
    mut finish: Finish,
) -> Response<ProxyBody> {
    let config = route.pool.config().clone();
    let limits = &config.limits;
    let (count, bytes) = headers::head_size(req.method().as_str(), &path, req.headers());
    if count > limits.max_headers || bytes > limits.max_header_bytes {
        return answer(
            finish,
            plain(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "431 request header fields too large",
            ),
        );
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (limits.max_body_bytes, declared)
        && len > max
    {
        return answer(
            finish,
            plain(StatusCode::PAYLOAD_TOO_LARGE, "413 request body too large"),
        );
    }

    let upgrading = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrading);
    headers::add_forwarding(
        &mut parts.headers,
        &Origin {
            client: conn.client,
            proto: conn.proto,
            host: host.clone(),
        },
    );
    if let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert(header::HOST, v);
    }
    let body_empty = body.is_end_stream();
    let hint = body.size_hint();
    let slot = Arc::new(Mutex::new(Some(body)));
    let over_limit = Arc::new(AtomicBool::new(false));
    let retry_safe_method = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    let clients = route.upstream.clients();
    let (client, version) = match (&clients.h2c, upgrading) {
        (Some(h2), false) => (h2, Version::HTTP_2),
        _ => (&clients.http1, Version::HTTP_11),
    };
    let deadline = tokio::time::Instant::now() + config.timeouts.request;
    let mut avoid: Option<String> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let lease = match route.pool.acquire(avoid.as_deref()).await {
            Ok(l) => l,
            Err(rejected) => {
                let resp = match rejected {
                    Rejected::Paused { retry_after } => unavailable(
                        retry_after,
                        "503 service unavailable: the service is paused",
                    ),
                    Rejected::QueueFull { retry_after } => unavailable(
                        retry_after,
                        "503 service unavailable: too many requests are waiting",
                    ),
                    Rejected::QueueTimeout { retry_after, .. } => unavailable(
                        retry_after,
                        "503 service unavailable: no instance was free in time",
                    ),
                };
                return answer(finish, resp);
            }
        };
        finish.entry.instance = lease.instance().to_string();
        finish.entry.queued_ms = ms(lease.queued());
        finish.entry.woke = lease.woke();
        let uri = match Uri::builder()
            .scheme("http")
            .authority(lease.authority().clone())
            .path_and_query(path.as_str())
            .build()
        {
            Ok(u) => u,
            Err(e) => {
                return answer(
                    finish,
                    plain(StatusCode::BAD_REQUEST, &format!("400 bad request: {e}")),
                );
            }
        };
        let body_sent = Arc::new(tokio::sync::Notify::new());
        let mut up = Request::new(RequestBody {
            slot: slot.clone(),
            body: None,
            hint,
            end: body_empty,
            bytes: finish.bytes_in.clone(),
            limit: config.limits.max_body_bytes,
            over_limit: over_limit.clone(),
            sent: body_sent.clone(),
        });
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = version;
        *up.headers_mut() = parts.headers.clone();
        // While the body uploads only the whole request's deadline applies; the first-byte
        // timeout counts from the body's end (an app may read all of a long upload first).
        let sent = {
            let request = client.request(up);
            tokio::pin!(request);
            let uploaded = async {
                if !body_empty {
                    body_sent.notified().await;
                }
            };
            tokio::select! {
                r = &mut request => Ok(r),
                () = tokio::time::sleep_until(deadline) => Err(Failure::RequestTimeout),
                () = uploaded => {
                    let first_byte =
                        (tokio::time::Instant::now() + config.timeouts.first_byte).min(deadline);
                    match tokio::time::timeout_at(first_byte, &mut request).await {
                        Ok(r) => Ok(r),
                        Err(_) if first_byte >= deadline => Err(Failure::RequestTimeout),
                        Err(_) => Err(Failure::FirstByteTimeout),
                    }
                }
            }
        };
        let failure = match sent {
            Ok(Ok(resp)) => {
                finish.lease = Some(lease);
                return respond(route, conn, &config, finish, resp, client_upgrade, deadline);
            }
            Err(failure) => failure,
            Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => Failure::BodyTooLarge,
            Ok(Err(e)) => classify(&e),
        };
        // A connect timeout is a connection failure too (a blackholed instance): suspect it
        // and retry elsewhere, answering 504 only when there is nowhere else to go.
        let (failure, timed_out) = match failure {
            Failure::ConnectTimeout => (
                Failure::Connection {
                    reason: "connecting to the instance timed out".into(),
                    sent_nothing: true,
                },
                true,
            ),
            other => (other, false),
        };
        let resp = match failure {
            Failure::Connection {
                reason,
                sent_nothing,
            } => {
                // Retry when the instance cannot have acted on the request: it was never
                // reached, or the request is idempotent and its body (if any) was not sent yet.
                let body_unsent =
                    body_empty || slot.lock().unwrap_or_else(|e| e.into_inner()).is_some();
                let retriable = attempt == 1
                    && !upgrading
                    && body_unsent
                    && (sent_nothing || retry_safe_method);
                lease.mark_suspect(&reason);
                tracing::warn!(service = %route.pool.service(), instance = %lease.instance(), "connection to instance failed: {reason}");
                let failed = lease.instance().to_string();
                drop(lease);
                let others = route
                    .pool
                    .snapshot()
                    .instances
                    .iter()
                    .any(|i| i.in_rotation() && i.id != failed);
                if retriable && others {
                    if let Some(metrics) = route.pool.metrics() {
                        metrics.retry(route.pool.service());
                    }
                    avoid = Some(failed);
                    continue;
                }
                if timed_out {
                    plain(
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 gateway timeout: connecting to the instance timed out",
                    )
                } else {
                    plain(
                        StatusCode::BAD_GATEWAY,
                        "502 bad gateway: the instance could not be reached",
                    )
                }
            }
            Failure::ConnectTimeout => unreachable!("mapped to a connection failure above"),
            Failure::FirstByteTimeout => plain(
                StatusCode::GATEWAY_TIMEOUT,
                "504 gateway timeout: the instance did not answer in time",
            ),
            Failure::RequestTimeout => plain(
                StatusCode::GATEWAY_TIMEOUT,
                "504 gateway timeout: the request took too long",
            ),
            Failure::BodyTooLarge => {
                plain(StatusCode::PAYLOAD_TOO_LARGE, "413 request body too large")
            }
            Failure::Other(reason) => {
                tracing::warn!(service = %route.pool.service(), "request to instance failed: {reason}");
                plain(
                    StatusCode::BAD_GATEWAY,
                    "502 bad gateway: the instance's answer was not usable",
                )
            }
        };
        return answer(finish, resp);
    }
}

fn respond(
    route: &Arc<Route>,
    conn: &ConnInfo,
    config: &ServiceConfig,
    mut finish: Finish,
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    deadline: tokio::time::Instant,
) -> Response<ProxyBody> {
    finish.entry.status = resp.status().as_u16();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        let idle = config.timeouts.websocket_idle;
        let keep_cpu = config.streams_keep_cpu;
        let mut closing = conn.closing.clone();
        let streams = conn.streams.clone();
        streams.open.fetch_add(1, Ordering::AcqRel);
        let service = route.pool.service().to_string();
        tokio::spawn(async move {
            let mut finish = finish;
            if !keep_cpu && let Some(l) = finish.lease.as_mut() {
                l.release_cpu();
            }
            let joined = tokio::try_join!(client_upgrade, upstream_upgrade);
            match joined {
                Ok((client_io, upstream_io)) => {
                    let activity = Arc::new(Activity::new());
                    let mut a = Touch::new(TokioIo::new(client_io), activity.clone());
                    let mut b = Touch::new(TokioIo::new(upstream_io), activity.clone());
                    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
                    tokio::pin!(copy);
                    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    let mut ticker = tokio::time::interval(tick);
                    loop {
                        tokio::select! {
                            done = &mut copy => {
                                if let Ok((up, down)) = done {
                                    finish.entry.bytes_out += down;
                                    finish.bytes_in.fetch_add(up, Ordering::Relaxed);
                                }
                                break;
                            }
                            _ = ticker.tick() => {
                                if activity.idle() >= idle {
                                    tracing::debug!(service = %service, "websocket idle, closing");
                                    break;
                                }
                            }
                            _ = closing.changed() => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(service = %service, "upgrade failed: {e}"),
            }
            drop(finish);
            if streams.open.fetch_sub(1, Ordering::AcqRel) == 1 {
                streams.done.notify_waiters();
            }
        });
        let empty = http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        return Response::from_parts(parts, empty);
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if sse
        && !config.streams_keep_cpu
        && let Some(l) = finish.lease.as_mut()
    {
        l.release_cpu();
    }
    let body = ResponseBody {
        inner: body,
        finish: Some(finish),
        deadline: (!sse).then(|| Box::pin(tokio::time::sleep_until(deadline))),
    }
    .boxed_unsync();
    Response::from_parts(parts, body)
}

/// The last time bytes moved on a connection.
pub(crate) struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    /// When a write to the client started waiting (the client not reading), in ms since
    /// `base` plus one; 0 while writes go through.
    blocked_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            blocked_ms: AtomicU64::new(0),
        }
    }
    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn write_blocked(&self) {
        let now = self.base.elapsed().as_millis() as u64 + 1;
        let _ = self
            .blocked_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }
    fn write_went_through(&self) {
        self.blocked_ms.store(0, Ordering::Relaxed);
    }
    /// How long a write to the client has been waiting for it to read; zero if none waits.
    pub(crate) fn write_stalled(&self) -> Duration {
        match self.blocked_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => self
                .base
                .elapsed()
                .saturating_sub(Duration::from_millis(since - 1)),
        }
    }
    pub(crate) fn idle(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// An I/O stream that records when bytes move.
pub(crate) struct Touch<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Touch<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Touch<T> {
        Touch { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.activity.touch();
        }
        Poll::Ready(r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let Poll::Ready(r) = Pin::new(&mut self.inner).poll_write(cx, buf) else {
            self.activity.write_blocked();
            return Poll::Pending;
        };
        self.activity.write_went_through();
        if matches!(r, Ok(n) if n > 0) {
            self.activity.touch();
        }
        Poll::Ready(r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let Poll::Ready(r) = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) else {
            self.activity.write_blocked();
            return Poll::Pending;
        };
        self.activity.write_went_through();
        if matches!(r, Ok(n) if n > 0) {
            self.activity.touch();
        }
        Poll::Ready(r)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
