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
//!
//! The per-request path is kept lean (it is most of what the proxy adds to a request's cost):
//! nothing is formatted or allocated for the access log unless the route has one, an empty
//! request body needs no shared state, one timer serves the first-byte, request and body
//! deadlines, and HTTP/1 upstream connections are pooled here, per thread, with hyper's
//! connection-level client (no pool key hashing, URI rewriting or task per request).

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
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tracing::Instrument;

use crate::access_log::AccessEntry;
use crate::config::{ServiceConfig, UpstreamProtocol};
use crate::edge::EdgeSlot;
use crate::fast;
use crate::headers::{self, Origin};
use crate::idle::{IdleSet, Returner};
use crate::pool::{Lease, Rejected};
use crate::routes::{Route, RouteTable};
use crate::tls::http01;

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
    pub(crate) connect_timeout: Duration,
    idle_timeout: Duration,
    pub(crate) h2c: bool,
    clients: thread_local::ThreadLocal<Clients>,
}

pub(crate) struct Clients {
    /// HTTP/1 connections (all of them unless the service speaks h2c; upgrades always).
    pub(crate) http1: Http1Pool,
    pub(crate) h2c: Option<Client<HttpConnector, RequestBody>>,
    /// Plain sockets of the HTTP/1 fast path (`crate::fast`).
    pub(crate) sockets: IdleSet<tokio::net::TcpStream>,
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
            http1: Http1Pool {
                idle: IdleSet::new(self.idle_timeout),
                connect_timeout: self.connect_timeout,
            },
            sockets: IdleSet::new(self.idle_timeout),
            h2c: self.h2c.then(|| self.build_h2c()),
        })
    }

    fn build_h2c(&self) -> Client<HttpConnector, RequestBody> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(self.idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .http2_only(true);
        builder.build(connector)
    }
}

pub(crate) struct Http1Pool {
    idle: IdleSet<http1::SendRequest<RequestBody>>,
    connect_timeout: Duration,
}

/// Why an HTTP/1 exchange with an instance failed.
enum UpstreamError {
    ConnectTimeout,
    /// Connecting (or the HTTP/1 handshake) failed: nothing was sent.
    Connect(String),
    Send(hyper::Error),
    H2c(hyper_util::client::legacy::Error),
}

/// A pooled connection lent to one exchange; back in the pool once its response ended.
struct Checkout {
    sender: http1::SendRequest<RequestBody>,
    addr: SocketAddr,
    pool: Returner<http1::SendRequest<RequestBody>>,
}

impl Checkout {
    fn give_back(self) {
        self.pool.give_back(self.addr, self.sender);
    }
}

impl Http1Pool {
    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let stream = connect_tcp(addr, self.connect_timeout)
            .await
            .map_err(|e| match e {
                None => UpstreamError::ConnectTimeout,
                Some(e) => UpstreamError::Connect(e),
            })?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Connect(format!("connection to instance {addr}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, "connection to instance ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends `req` to `addr` on an idle connection, or a new one. A request that a reused
    /// connection could not take (it closed meanwhile; nothing was sent) goes on another. So
    /// does a bodiless idempotent request that a reused connection dropped without a response:
    /// the app closed that idle connection as the request arrived (its keep-alive timer ran
    /// out, e.g. the moment a frozen instance was thawed), and never acted on it.
    ///
    /// `headers` are `req`'s own (a copy kept by the caller): a replay takes them from there
    /// rather than from a copy made for every request.
    async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
        headers: &http::HeaderMap,
    ) -> Result<(Response<Incoming>, Checkout), UpstreamError> {
        let mut fresh = false;
        loop {
            let idle = if fresh { None } else { self.idle.take(addr) };
            let (mut sender, reused) = match idle {
                Some(s) => (s, true),
                // Boxed: connecting is the rare path, and its futures (the handshake's above all)
                // would otherwise make every request's future kilobytes larger, copied
                // each time a request's future moves.
                None => (Box::pin(self.connect(addr)).await?, false),
            };
            if reused && sender.ready().await.is_err() {
                continue;
            }
            let replay = (reused
                && req.body().shared.is_none()
                && REPLAYABLE.contains(&req.method().as_str()))
            .then(|| {
                (
                    req.method().clone(),
                    req.uri().clone(),
                    req.version(),
                    req.body().hint,
                )
            });
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let checkout = Checkout {
                        sender,
                        addr,
                        pool: self.idle.returner(),
                    };
                    return Ok((resp, checkout));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        let error = e.into_error();
                        let dropped = error.is_incomplete_message()
                            || error.is_canceled()
                            || reset_or_timeout(&error).0;
                        let Some((method, uri, version, hint)) = replay.filter(|_| dropped) else {
                            return Err(UpstreamError::Send(error));
                        };
                        let mut again = Request::new(RequestBody {
                            shared: None,
                            body: None,
                            hint,
                            limit: None,
                        });
                        *again.method_mut() = method;
                        *again.uri_mut() = uri;
                        *again.version_mut() = version;
                        *again.headers_mut() = headers.clone();
                        req = again;
                        fresh = true;
                    }
                },
            }
        }
    }
}

/// Connects to an instance within `timeout`, with `TCP_NODELAY`. `Err(None)`: timed out;
/// `Err(Some(reason))`: refused or unreachable (nothing was sent).
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, Option<String>> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err(None),
        Ok(Err(e)) => Err(Some(format!("connecting to instance {addr}: {e}"))),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Methods of requests sent again on a fresh connection when a reused one was dropped
/// unanswered (the instance cannot have acted on them, and they carry no body).
pub(crate) const REPLAYABLE: [&str; 4] = ["GET", "HEAD", "OPTIONS", "TRACE"];

/// Methods of requests retried on another instance after a connection failure, when their
/// body (if any) was not sent.
pub(crate) const RETRY_SAFE: [&str; 5] = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"];

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
    /// Bodiless requests go to HTTP/1 instances over plain sockets (`fast::upstream`), not
    /// hyper's client ([`crate::ProxyOptions::http1_fast_path`]).
    pub plain_upstream: bool,
    /// Set by a server that records each request once it has written the response's last
    /// bytes (the proxy's own HTTP/2 server): see [`AfterWrite`].
    pub after_write: Option<AfterWrite>,
}

/// Requests whose response has ended but whose last bytes may still wait in their
/// connection's write buffer: the connection records them ([`Finish`] dropped: pool slot,
/// CPU gate, metrics, access log) once it has tried to write those bytes, so that recording
/// (a throttle is a cgroup write) never delays a response, and a client slow to read never
/// holds an instance's slot or CPU (the connection writes what it can and records then,
/// written or not).
#[derive(Clone, Default)]
pub(crate) struct AfterWrite(Arc<Mutex<Vec<Finish>>>);

impl AfterWrite {
    fn defer(&self, finish: Finish) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(finish);
    }

    /// Records every request deferred so far. `spare` is the caller's own vector, swapped
    /// in so that neither side allocates once warm; the records are made outside the lock.
    pub(crate) fn record(&self, spare: &mut Vec<Finish>) {
        {
            let mut deferred = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if deferred.is_empty() {
                return;
            }
            std::mem::swap(&mut *deferred, spare);
        }
        spare.clear();
    }
}

/// Upgraded connections (WebSockets) still open, for shutdown.
#[derive(Default)]
pub(crate) struct StreamCount {
    pub open: AtomicUsize,
    pub done: tokio::sync::Notify,
}

pub(crate) struct ActiveGuard(Arc<AtomicUsize>);

impl ActiveGuard {
    /// Counts a request on its connection until dropped.
    pub(crate) fn enter(active: &Arc<AtomicUsize>) -> ActiveGuard {
        active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(active.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The span a request's forwarding runs in.
pub(crate) fn request_span(route: &Route, id: &str) -> tracing::Span {
    tracing::debug_span!(
        "request",
        service = %route.pool.service(),
        revision = %route.revision,
        id = %id
    )
}

/// What only the access log needs, gathered only when the route has one.
pub(crate) struct LogFields {
    pub(crate) entry: AccessEntry,
    /// Wall-clock start.
    started_at: chrono::DateTime<chrono::Utc>,
}

/// What the access log needs, if `route` has one.
pub(crate) fn log_fields(
    route: &Route,
    request_id: &str,
    method: &str,
    host: &str,
    path: &str,
    client: SocketAddr,
) -> Option<Box<LogFields>> {
    route.access_log.is_some().then(|| {
        Box::new(LogFields {
            entry: AccessEntry {
                time: String::new(),
                request_id: request_id.to_owned(),
                service: route.pool.service().to_owned(),
                revision: route.revision.clone(),
                instance: String::new(),
                method: method.to_owned(),
                host: host.to_owned(),
                path: path.to_owned(),
                status: 0,
                bytes_in: 0,
                bytes_out: 0,
                duration_ms: 0.0,
                queued_ms: 0.0,
                woke: false,
                client: client.to_string(),
            },
            started_at: chrono::Utc::now(),
        })
    })
}

/// A request's bookkeeping until its response ends: metrics, the access log, the pool slot.
/// Recorded when dropped.
pub(crate) struct Finish {
    pub(crate) route: Arc<Route>,
    pub(crate) start: Instant,
    /// 0 until there is a response.
    pub(crate) status: u16,
    pub(crate) bytes_out: u64,
    /// Request body bytes not counted by the body itself (an upgraded connection's).
    pub(crate) bytes_in_extra: u64,
    pub(crate) body: Option<Arc<RequestShared>>,
    pub(crate) lease: Option<Lease>,
    pub(crate) log: Option<Box<LogFields>>,
    pub(crate) _active: ActiveGuard,
}

impl Finish {
    pub(crate) fn new(
        route: Arc<Route>,
        start: Instant,
        log: Option<Box<LogFields>>,
        active: ActiveGuard,
    ) -> Finish {
        Finish {
            route,
            start,
            status: 0,
            bytes_out: 0,
            bytes_in_extra: 0,
            body: None,
            lease: None,
            log,
            _active: active,
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.lease.take();
        if self.status == 0 {
            // The client went away before any response (while queued, say): nginx's 499.
            self.status = 499;
        }
        let elapsed = self.start.elapsed();
        // An upgraded connection's lifetime is not a request's latency.
        if let Some(metrics) = self.route.pool.service_metrics()
            && self.status != 101
        {
            metrics.observe_request(self.status, elapsed);
        }
        if let (Some(log), Some(fields)) = (&self.route.access_log, self.log.as_mut()) {
            let entry = &mut fields.entry;
            entry.time = fields
                .started_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            entry.duration_ms = ms(elapsed);
            entry.status = self.status;
            entry.bytes_out = self.bytes_out;
            entry.bytes_in = self.bytes_in_extra
                + self
                    .body
                    .as_ref()
                    .map_or(0, |b| b.bytes.load(Ordering::Relaxed));
            log.record(entry);
        }
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The response body handed to the client: counts bytes, enforces the whole-request deadline,
/// holds the pool slot until the last frame, then gives the upstream connection back.
struct ResponseBody<B> {
    inner: B,
    finish: Option<Finish>,
    deadline: Option<Pin<Box<Sleep>>>,
    checkout: Option<Checkout>,
    /// Where the request is recorded when it ended whole, if the client's connection
    /// records after writing (else at once).
    after_write: Option<AfterWrite>,
}

impl<B> ResponseBody<B> {
    /// The response ended whole: the connection may serve another request.
    fn ended(&mut self) {
        self.record();
        if let Some(c) = self.checkout.take() {
            c.give_back();
        }
    }

    fn record(&mut self) {
        let Some(finish) = self.finish.take() else {
            return;
        };
        let Some(after_write) = &self.after_write else {
            return drop(finish);
        };
        // A request body nobody will read goes now, as it would with the record (its reader
        // decides whether the client's upload is still wanted), not once the connection
        // records. One the instance's connection may still read stays where it is.
        if let Some(shared) = &finish.body
            && Arc::strong_count(shared) == 1
        {
            drop(shared.slot.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        after_write.defer(finish);
    }
}

impl<B> Drop for ResponseBody<B> {
    fn drop(&mut self) {
        // Dropped unpolled (the response ended with its head: a 204, an empty answer) or
        // mid-way (the client reset the stream or left).
        self.record();
    }
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
            self.checkout.take();
            return Poll::Ready(Some(Err("the request's timeout passed".into())));
        }
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), self.finish.as_mut()) {
                    f.bytes_out += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.finish.take();
                self.checkout.take();
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                self.ended();
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

/// A request's body as the client sends it: read by hyper's server, or by the proxy's own
/// HTTP/2 server.
pub(crate) enum ClientBody {
    Hyper(Incoming),
    H2(crate::h2::body::RecvBody),
    /// The request ended with its head.
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What a request body shares with the forwarding code (absent for an empty body).
pub(crate) struct RequestShared {
    /// The client's body, until the instance's connection first asks for it: a request
    /// whose body was never touched can be retried on another instance.
    slot: Mutex<Option<ClientBody>>,
    bytes: AtomicU64,
    over_limit: AtomicBool,
    /// Told when the body has been sent whole: the first-byte timeout starts then.
    sent: tokio::sync::Notify,
}

/// The request body sent to an instance.
pub(crate) struct RequestBody {
    shared: Option<Arc<RequestShared>>,
    body: Option<ClientBody>,
    hint: SizeHint,
    limit: Option<u64>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(shared) = self.shared.clone() else {
            return Poll::Ready(None);
        };
        if self.body.is_none() {
            let taken = shared.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Some(b) => self.body = Some(b),
                None => return Poll::Ready(None),
            }
        }
        let limit = self.limit;
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let total = shared.bytes.fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if limit.is_some_and(|l| total > l) {
                        shared.over_limit.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(
                            "the request body is larger than allowed".into()
                        )));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => {
                // A stored permit: the waiter may not be waiting yet.
                shared.sent.notify_one();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match (&self.body, &self.shared) {
            (Some(b), _) => b.is_end_stream(),
            (None, shared) => shared.is_none(),
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

/// The proxy's own answer: `status`, `text`, and `Retry-After` when given (seconds).
fn refused(status: StatusCode, text: &str, retry_after: Option<u64>) -> Response<ProxyBody> {
    let mut resp = plain(status, text);
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// `Retry-After` in whole seconds, at least one.
pub(crate) fn retry_after_secs(retry_after: Duration) -> u64 {
    retry_after.as_secs_f64().ceil().max(1.0) as u64
}

/// The host a request is for: `:authority` (HTTP/2) or `Host`, as a header value (a cheap
/// clone of the client's `Host`).
fn request_host_value<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).ok();
    }
    req.headers().get(header::HOST).cloned()
}

/// What went wrong talking to an instance.
pub(crate) enum Failure {
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

/// Whether an error's chain says the connection was reset or cut short, or timed out.
fn reset_or_timeout(e: &(dyn std::error::Error + 'static)) -> (bool, bool) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
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
    (reset, timed_out)
}

fn classify(e: &UpstreamError) -> Failure {
    match e {
        UpstreamError::ConnectTimeout => Failure::ConnectTimeout,
        UpstreamError::Connect(reason) => Failure::Connection {
            reason: reason.clone(),
            sent_nothing: true,
        },
        UpstreamError::Send(e) => {
            let (reset, _) = reset_or_timeout(e);
            let text = error_chain(e);
            if reset {
                Failure::Connection {
                    reason: text,
                    sent_nothing: false,
                }
            } else {
                Failure::Other(text)
            }
        }
        UpstreamError::H2c(e) => {
            let (reset, timed_out) = match std::error::Error::source(e) {
                Some(s) => reset_or_timeout(s),
                None => (false, false),
            };
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
    edge: &EdgeSlot,
    conn: &ConnInfo,
    mut req: Request<ClientBody>,
) -> Response<ProxyBody> {
    let tls = conn.proto == "https";
    // ACME's HTTP-01 challenges, for any Host and before routing (see `crate::edge`): one
    // prefix comparison for every other request.
    if !tls && req.uri().path().starts_with(http01::ACME_CHALLENGE_PREFIX) {
        let edge = edge.get();
        return http01::answer(
            edge.as_ref().map(|e| &*e.http01),
            req.method(),
            req.uri().path(),
        );
    }
    let start = Instant::now();
    let active = ActiveGuard::enter(&conn.active);
    let host_value = request_host_value(&req);
    let host = host_value
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(route) = routes.lookup(host) else {
        let shown = crate::routes::normalize_host(host);
        tracing::debug!(host = %shown, "no route");
        return plain(
            StatusCode::NOT_FOUND,
            &format!("404 not found: no service answers for host {shown:?}"),
        );
    };
    let request_id = headers::ensure_request_id_value(req.headers_mut());
    let log = log_fields(
        &route,
        request_id.to_str().unwrap_or_default(),
        req.method().as_str(),
        host,
        req.uri().path_and_query().map_or("/", |p| p.as_str()),
        conn.client,
    );
    let redirect = if !tls && route.pool.config().https_redirect {
        crate::edge::redirect(
            edge,
            &crate::routes::normalized(host),
            req.method(),
            req.uri().path_and_query().map(|p| p.as_str()),
        )
    } else {
        None
    };
    let hsts = if tls { route.hsts.clone() } else { None };
    let span = request_span(&route, request_id.to_str().unwrap_or_default());
    let finish = Finish::new(route, start, log, active);
    if let Some(resp) = redirect {
        return answer(finish, resp);
    }
    let mut resp = forward(conn, req, host_value, finish)
        .instrument(span)
        .await;
    if let Some(hsts) = hsts {
        crate::edge::add_hsts(&mut resp, hsts);
    }
    resp
}

fn answer(mut finish: Finish, resp: Response<ProxyBody>) -> Response<ProxyBody> {
    finish.status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = ResponseBody {
        inner: body,
        finish: Some(finish),
        deadline: None,
        checkout: None,
        after_write: None,
    }
    .boxed_unsync();
    Response::from_parts(parts, body)
}

async fn forward(
    conn: &ConnInfo,
    mut req: Request<ClientBody>,
    host_value: Option<HeaderValue>,
    mut finish: Finish,
) -> Response<ProxyBody> {
    let route = finish.route.clone();
    let config = route.pool.config();
    let limits = &config.limits;
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let (count, bytes) = headers::head_size(req.method().as_str(), path, req.headers());
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
    let host = host_value
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    headers::add_forwarding(
        &mut parts.headers,
        &Origin {
            client: conn.client,
            proto: conn.proto,
            host,
        },
    );
    if let Some(v) = host_value.as_ref()
        && parts.headers.get(header::HOST) != Some(v)
    {
        parts.headers.insert(header::HOST, v.clone());
    }
    let body_empty = body.is_end_stream();
    let hint = body.size_hint();
    let shared = (!body_empty).then(|| {
        Arc::new(RequestShared {
            slot: Mutex::new(Some(body)),
            bytes: AtomicU64::new(0),
            over_limit: AtomicBool::new(false),
            sent: tokio::sync::Notify::new(),
        })
    });
    finish.body = shared.clone();
    let retry_safe_method = RETRY_SAFE.contains(&parts.method.as_str());
    let clients = route.upstream.clients();
    let h2c = match (&clients.h2c, upgrading) {
        (Some(h2), false) => Some(h2),
        _ => None,
    };
    // HTTP/1 upstreams get the origin form (`/path?query`) the client sent, as it is.
    let origin_form = match (parts.uri.scheme(), parts.uri.authority()) {
        (None, None) => parts.uri.clone(),
        _ => {
            let mut uri_parts = http::uri::Parts::default();
            uri_parts.path_and_query = Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            Uri::from_parts(uri_parts).unwrap_or_else(|_| Uri::from_static("/"))
        }
    };
    let deadline = tokio::time::Instant::from_std(finish.start) + config.timeouts.request;
    // A bodiless request to an HTTP/1 instance: a plain socket's exchange (HTTP/2 requests
    // above all; the fast path already took HTTP/1 ones it could).
    let replayable = REPLAYABLE.contains(&parts.method.as_str());
    let plain_head = (conn.plain_upstream
        && h2c.is_none()
        && !upgrading
        && fast::upstream::takes(&parts.method, &parts.headers, body_empty))
    .then(|| {
        fast::upstream::request_head(
            &parts.method,
            origin_form.path_and_query().map_or("/", |p| p.as_str()),
            &parts.headers,
        )
    });
    if let Some(head) = plain_head.as_deref() {
        let request = fast::upstream::Request {
            head,
            replayable,
            retry_safe: retry_safe_method,
            extras: fast::ResponseExtras {
                form: fast::Form::Fields,
                head_request: parts.method == Method::HEAD,
                hsts: None,
                date: b"",
            },
        };
        return match fast::upstream::forward(&route, &mut finish, deadline, &request).await {
            fast::upstream::Outcome::Answered(lease, answered) => {
                let addr = lease.addr();
                finish.lease = Some(lease);
                respond_plain(
                    config,
                    conn.after_write.clone(),
                    finish,
                    answered,
                    addr,
                    deadline,
                )
            }
            fast::upstream::Outcome::Refused(status, text, retry_after) => {
                answer(finish, refused(status, text, retry_after))
            }
        };
    }
    let mut avoid: Option<String> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let lease = match route.pool.acquire(avoid.as_deref()).await {
            Ok(l) => l,
            Err(rejected) => {
                let (retry_after, text) = refusal(rejected);
                let secs = retry_after_secs(retry_after);
                return answer(
                    finish,
                    refused(StatusCode::SERVICE_UNAVAILABLE, text, Some(secs)),
                );
            }
        };
        if let Some(fields) = finish.log.as_mut() {
            fields.entry.instance = lease.instance().to_owned();
            fields.entry.queued_ms = ms(lease.queued());
            fields.entry.woke = lease.woke();
        }
        let uri = if h2c.is_some() {
            match Uri::builder()
                .scheme("http")
                .authority(lease.authority().clone())
                .path_and_query(origin_form.path_and_query().map_or("/", |p| p.as_str()))
                .build()
            {
                Ok(u) => u,
                Err(e) => {
                    return answer(
                        finish,
                        plain(StatusCode::BAD_REQUEST, &format!("400 bad request: {e}")),
                    );
                }
            }
        } else {
            origin_form.clone()
        };
        let mut up = Request::new(RequestBody {
            shared: shared.clone(),
            body: None,
            hint,
            limit: config.limits.max_body_bytes,
        });
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = if h2c.is_some() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *up.headers_mut() = parts.headers.clone();
        // While the body uploads only the whole request's deadline applies; the first-byte
        // timeout counts from the body's end (an app may read all of a long upload first).
        // One timer for both: it starts at the deadline and is moved up once the body is sent.
        let first_byte_from_now =
            || (tokio::time::Instant::now() + config.timeouts.first_byte).min(deadline);
        let mut uploaded = body_empty;
        let mut timer_at = if uploaded {
            first_byte_from_now()
        } else {
            deadline
        };
        let mut timer = Box::pin(tokio::time::sleep_until(timer_at));
        let addr = lease.addr();
        let sent = {
            let request = async {
                match h2c {
                    Some(client) => client
                        .request(up)
                        .await
                        .map(|r| (r, None))
                        .map_err(UpstreamError::H2c),
                    None => clients
                        .http1
                        .send(addr, up, &parts.headers)
                        .await
                        .map(|(r, c)| (r, Some(c))),
                }
            };
            tokio::pin!(request);
            let body_sent = async {
                match &shared {
                    Some(s) => s.sent.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(body_sent);
            loop {
                tokio::select! {
                    biased;
                    r = &mut request => break Ok(r),
                    () = timer.as_mut() => {
                        break Err(if uploaded && timer_at < deadline {
                            Failure::FirstByteTimeout
                        } else {
                            Failure::RequestTimeout
                        });
                    }
                    () = &mut body_sent, if !uploaded => {
                        uploaded = true;
                        timer_at = first_byte_from_now();
                        timer.as_mut().reset(timer_at);
                    }
                }
            }
        };
        let failure = match sent {
            Ok(Ok((resp, checkout))) => {
                finish.lease = Some(lease);
                if timer_at != deadline {
                    timer.as_mut().reset(deadline);
                }
                return respond(conn, config, finish, resp, client_upgrade, timer, checkout);
            }
            Err(failure) => failure,
            Ok(Err(_))
                if shared
                    .as_ref()
                    .is_some_and(|s| s.over_limit.load(Ordering::Relaxed)) =>
            {
                Failure::BodyTooLarge
            }
            Ok(Err(e)) => classify(&e),
        };
        let body_unsent = shared
            .as_ref()
            .is_none_or(|s| s.slot.lock().unwrap_or_else(|e| e.into_inner()).is_some());
        let retriable = |sent_nothing: bool| {
            attempt == 1 && !upgrading && body_unsent && (sent_nothing || retry_safe_method)
        };
        match after_failure(&route, lease, failure, retriable) {
            Ok(failed) => avoid = Some(failed),
            Err((status, text)) => return answer(finish, plain(status, text)),
        }
    }
}

/// The answer to a request the pool refused: `503` with `Retry-After`.
pub(crate) fn refusal(rejected: Rejected) -> (Duration, &'static str) {
    match rejected {
        Rejected::Paused { retry_after } => (
            retry_after,
            "503 service unavailable: the service is paused",
        ),
        Rejected::QueueFull { retry_after } => (
            retry_after,
            "503 service unavailable: too many requests are waiting",
        ),
        Rejected::QueueTimeout { retry_after, .. } => (
            retry_after,
            "503 service unavailable: no instance was free in time",
        ),
    }
}

/// After an attempt on `lease`'s instance failed: a connection failure marks the instance
/// suspect, and is retried elsewhere when `retriable(sent_nothing)` says the instance cannot
/// have acted on the request and another instance is in rotation (`Ok`: the failed
/// instance, to avoid). Otherwise the answer to give (`Err`).
pub(crate) fn after_failure(
    route: &Route,
    lease: Lease,
    failure: Failure,
    retriable: impl FnOnce(bool) -> bool,
) -> Result<String, (StatusCode, &'static str)> {
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
    Err(match failure {
        Failure::Connection {
            reason,
            sent_nothing,
        } => {
            let retriable = retriable(sent_nothing);
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
                return Ok(failed);
            }
            if timed_out {
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    "504 gateway timeout: connecting to the instance timed out",
                )
            } else {
                (
                    StatusCode::BAD_GATEWAY,
                    "502 bad gateway: the instance could not be reached",
                )
            }
        }
        Failure::ConnectTimeout => unreachable!("mapped to a connection failure above"),
        Failure::FirstByteTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "504 gateway timeout: the instance did not answer in time",
        ),
        Failure::RequestTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "504 gateway timeout: the request took too long",
        ),
        Failure::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "413 request body too large"),
        Failure::Other(reason) => {
            tracing::warn!(service = %route.pool.service(), "request to instance failed: {reason}");
            (
                StatusCode::BAD_GATEWAY,
                "502 bad gateway: the instance's answer was not usable",
            )
        }
    })
}

fn respond(
    conn: &ConnInfo,
    config: &ServiceConfig,
    mut finish: Finish,
    mut resp: Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    deadline: Pin<Box<Sleep>>,
    checkout: Option<Checkout>,
) -> Response<ProxyBody> {
    finish.status = resp.status().as_u16();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        // The upstream connection leaves the pool with the upgrade.
        drop(checkout);
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, true);
        let idle = config.timeouts.websocket_idle;
        let keep_cpu = config.streams_keep_cpu;
        let mut closing = conn.closing.clone();
        let streams = conn.streams.clone();
        streams.open.fetch_add(1, Ordering::AcqRel);
        let service = finish.route.pool.service().to_string();
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
                                    finish.bytes_out += down;
                                    finish.bytes_in_extra += up;
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
    let mut body = ResponseBody {
        inner: body,
        finish: Some(finish),
        deadline: (!sse).then_some(deadline),
        checkout,
        after_write: conn.after_write.clone(),
    };
    if body.inner.is_end_stream()
        && let Some(c) = body.checkout.take()
    {
        // No body to stream (a 204, a HEAD, an empty 200): the connection is free now.
        c.give_back();
    }
    Response::from_parts(parts, body.boxed_unsync())
}

/// The response to a request sent over a plain socket (see `fast::upstream`): its body read
/// from the socket as hyper's server asks for it.
fn respond_plain(
    config: &ServiceConfig,
    after_write: Option<AfterWrite>,
    mut finish: Finish,
    mut answered: fast::upstream::Answered,
    addr: SocketAddr,
    deadline: tokio::time::Instant,
) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(answered.head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    finish.status = status.as_u16();
    let sse = answered.head.event_stream;
    if sse
        && !config.streams_keep_cpu
        && let Some(l) = finish.lease.as_mut()
    {
        l.release_cpu();
    }
    let rendered = std::mem::replace(
        &mut answered.head.rendered,
        fast::Rendered::Http1(Vec::new()),
    );
    let fast::Rendered::Fields(headers, reason) = rendered else {
        unreachable!("a plain request's response head is asked for as fields");
    };
    let pool = finish.route.upstream.clients().sockets.returner();
    let body = ResponseBody {
        inner: fast::upstream::SocketBody::new(answered, addr, pool),
        finish: Some(finish),
        deadline: (!sse).then(|| Box::pin(tokio::time::sleep_until(deadline))),
        checkout: None,
        after_write,
    };
    let mut resp = Response::new(body.boxed_unsync());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if let Some(reason) = reason {
        // An app's own reason phrase, for an HTTP/1 client (as hyper's client keeps it).
        resp.extensions_mut().insert(reason);
    }
    resp
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
