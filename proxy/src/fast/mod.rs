//! The HTTP/1 fast path: plain keep-alive exchanges (an HTTP/1.1 request without a body,
//! answered with a length-delimited, chunked or close-delimited body) forwarded without
//! hyper's dispatchers, over plain pooled sockets to the instance.
//!
//! A client connection starts here. Its request heads are parsed in place (`httparse`); one
//! the fast path takes ([`head::parse_request`] says which) goes through the same routing,
//! pool, gate, metrics and access log as any other, its head written to an idle socket of the
//! instance, the response head parsed and rewritten, and the body relayed as it comes. The
//! first request the fast path does not take (one with a body, an upgrade, HTTP/1.0, a host
//! no service answers, a redirect, an h2c upstream, an h2 preface, anything malformed) is
//! handed to hyper with the bytes read so far, and hyper serves the rest of the connection:
//! everything the proxy does, it still does there.
//!
//! Why: per request, hyper's HTTP/1 server and client dispatch, the upstream connection's
//! task and the boxed bodies between them cost about as much user-space CPU as all of a
//! peer proxy's work (see docs/benchmarks.md, proxy). Here one task does the whole exchange.

mod chunked;
mod head;
pub(crate) mod upstream;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::Instrument;

use crate::edge::EdgeSlot;
use crate::forward::{self, ActiveGuard, ConnInfo, Finish};
use crate::routes::{Route, RouteTable};
use crate::server::{FIRST_BYTES_WAIT, ProxyOptions};
use chunked::Chunked;
pub(crate) use head::{Form, Rendered, ResponseExtras, http_date};
use head::{Framing, Parsed, RequestHead};
use upstream::{Answered, Outcome};

/// How a connection left the fast path.
pub(crate) enum Served {
    /// It is over (closed by either side, timed out, or drained).
    Closed,
    /// hyper serves the rest, starting with these bytes already read.
    Other(BytesMut),
}

/// What a connection's exchanges share.
pub(crate) struct Conn<'a> {
    pub(crate) routes: &'a RouteTable,
    pub(crate) edge: &'a EdgeSlot,
    pub(crate) info: &'a ConnInfo,
    pub(crate) options: &'a ProxyOptions,
}

/// Serves `io`'s requests while the fast path takes them.
pub(crate) async fn serve<IO>(
    conn: &Conn<'_>,
    io: &mut IO,
    drain: &mut watch::Receiver<bool>,
) -> Served
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let tls = conn.info.proto == "https";
    let options = conn.options;
    // As hyper is configured: the wait for a head covers the idle time before it.
    let head_wait = options.header_read_timeout.max(options.idle_keep_alive);
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut served_any = false;
    // Made once per connection, not per request: a drain watch and a timer are both
    // registrations that cost more than the rest of a request's bookkeeping.
    let mut draining = *drain.borrow();
    // Looked at again as each response head is made: a drain that begins while a request is
    // in flight still gets its response a `Connection: close`.
    let drain_now = drain.clone();
    let mut drained = std::pin::pin!(async {
        let _ = drain.wait_for(|d| *d).await;
    });
    // The head deadline is lazy: a new wait only moves `waiting_since`; the timer, when it
    // fires early, is set again for the wait's real end.
    let mut waiting_since = tokio::time::Instant::now();
    let mut cutoff: Option<tokio::time::Instant> = None;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(waiting_since + head_wait));
    loop {
        let req = loop {
            match head::parse_request(&mut buf, options.max_header_bytes, options.max_headers, tls)
            {
                Parsed::Fast(req) => break req,
                Parsed::Other => return Served::Other(buf),
                Parsed::Partial => {}
            }
            if draining && buf.is_empty() {
                if served_any {
                    return Served::Closed;
                }
                // Accepted just before the drain: its request may be on the way.
                if cutoff.is_none() {
                    let soon = tokio::time::Instant::now() + FIRST_BYTES_WAIT;
                    cutoff = Some(soon);
                    if timer.deadline() > soon {
                        timer.as_mut().reset(soon);
                    }
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(8 * 1024);
            }
            tokio::select! {
                read = io.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Served::Closed,
                    // The drain's short wait is for a first request still to come; one
                    // on its way has the usual time.
                    Ok(_) => cutoff = None,
                },
                () = timer.as_mut() => {
                    let due = (waiting_since + head_wait).min(cutoff.unwrap_or(waiting_since + head_wait));
                    if tokio::time::Instant::now() >= due {
                        return Served::Closed;
                    }
                    timer.as_mut().reset(due);
                }
                () = drained.as_mut(), if !draining => draining = true,
            }
        };
        served_any = true;
        let next = exchange(conn, io, req, &mut buf, &drain_now).await;
        if !draining && futures_util::FutureExt::now_or_never(drained.as_mut()).is_some() {
            draining = true;
        }
        match next {
            Next::Keep if !draining => waiting_since = tokio::time::Instant::now(),
            Next::Keep | Next::Close => return Served::Closed,
            Next::Other(req) => {
                // The head goes back in front of what follows it.
                let mut all = BytesMut::from(req.raw());
                all.extend_from_slice(&buf);
                return Served::Other(all);
            }
        }
    }
}

/// What follows an exchange.
enum Next {
    Keep,
    Close,
    /// The request is not the fast path's after all (see [`eligible`]).
    Other(RequestHead),
}

/// What an added `x-request-id` counts against a head's size (name, 32 hex digits, 4).
const REQUEST_ID_LINE: usize = 12 + 32 + 4;

/// Whether the route takes `req` on the fast path: hyper answers the rest (a redirect to
/// HTTPS, an h2c upstream, a head over the service's limits).
fn eligible(conn: &Conn<'_>, route: &Route, req: &RequestHead) -> bool {
    let config = route.pool.config();
    // Counted as the general path counts them: after a request id is added.
    let added = usize::from(req.client_request_id().is_none());
    if route.upstream.h2c
        || req.count + added > config.limits.max_headers
        || req.size + added * (REQUEST_ID_LINE) > config.limits.max_header_bytes
    {
        return false;
    }
    conn.info.proto == "https"
        || !config.https_redirect
        || crate::edge::redirect(
            conn.edge,
            &crate::routes::normalized(req.host()),
            &http::Method::GET,
            Some(req.path()),
        )
        .is_none()
}

/// Forwards one request and relays its response.
async fn exchange<IO>(
    conn: &Conn<'_>,
    io: &mut IO,
    req: RequestHead,
    buf: &mut BytesMut,
    drain: &watch::Receiver<bool>,
) -> Next
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let Some(route) = conn.routes.lookup(req.host()) else {
        return Next::Other(req);
    };
    if !eligible(conn, &route, &req) {
        return Next::Other(req);
    }
    let start = Instant::now();
    let info = conn.info;
    let active = ActiveGuard::enter(&info.active);
    let new_id = match req.client_request_id() {
        Some(_) => None,
        None => Some(crate::headers::new_request_id_bytes()),
    };
    let id_bytes = new_id.as_ref().map(|i| &i[..]).or(req.client_request_id());
    // Both are visible ASCII (generated hex digits, or a client's id checked usable).
    let id = id_bytes
        .and_then(|i| std::str::from_utf8(i).ok())
        .unwrap_or_default();
    let log = forward::log_fields(
        &route,
        id,
        req.method(),
        req.host(),
        req.path(),
        info.client,
    );
    let span = forward::request_span(&route, id);
    let finish = Finish::new(route.clone(), start, log, active);
    let up_head = req.upstream_head(info.client, info.proto, new_id.as_ref().map(|i| &i[..]));
    let hsts = (info.proto == "https")
        .then(|| route.hsts.clone())
        .flatten();
    let exchange = Exchange {
        conn,
        route: &route,
        req: &req,
        up_head,
        drain,
        hsts,
    };
    exchange.run(io, buf, finish).instrument(span).await
}

struct Exchange<'a> {
    conn: &'a Conn<'a>,
    route: &'a Arc<Route>,
    req: &'a RequestHead,
    up_head: Vec<u8>,
    /// The proxy's drain: once it began, the client's connection closes after this exchange.
    drain: &'a watch::Receiver<bool>,
    hsts: Option<http::HeaderValue>,
}

/// The end of an exchange's upstream part.
struct Done<'a> {
    finish: Option<Finish>,
    /// Body bytes read from the instance so far (what a response cut short is logged with).
    body_bytes: u64,
    stream: Option<TcpStream>,
    addr: std::net::SocketAddr,
    sockets: &'a crate::idle::IdleSet<TcpStream>,
}

impl Done<'_> {
    fn stream(&mut self) -> std::io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| cut("the instance's connection was already given back"))
    }

    /// The response came whole from the instance: the socket goes back when `reusable`.
    /// The request is recorded by [`Client::write_last`] (or when this is dropped).
    fn complete(&mut self, reusable: bool) {
        if let Some(stream) = self.stream.take()
            && reusable
        {
            self.sockets.returner().give_back(self.addr, stream);
        }
    }

    /// Records the request (once), with the body bytes read so far.
    fn record(&mut self) {
        if let Some(mut finish) = self.finish.take() {
            finish.bytes_out = self.body_bytes;
        }
    }
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.record();
    }
}

/// Reads what the client sends while its request is forwarded (a pipelined request stays in
/// `buf`, up to `limit` bytes); returns when the client has closed its connection.
async fn client_gone<IO>(io: &mut IO, buf: &mut BytesMut, limit: usize)
where
    IO: AsyncRead + Unpin,
{
    while buf.len() < limit {
        buf.reserve(4 * 1024);
        match io.read_buf(buf).await {
            // A client that sent its requests and closed its side waits for the answers
            // (the loop sees the end again once they are served).
            Ok(0) if !buf.is_empty() => break,
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

impl Exchange<'_> {
    /// Whether the proxy is draining: the response says `Connection: close`.
    fn closing(&self) -> bool {
        *self.drain.borrow()
    }

    async fn run<IO>(self, io: &mut IO, buf: &mut BytesMut, mut finish: Finish) -> Next
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.route.pool.config().clone();
        let deadline = tokio::time::Instant::from_std(finish.start) + config.timeouts.request;
        // While the request waits for a slot and its answer, the client's connection is
        // watched: a client that leaves gives its place up (hyper does the same).
        let outcome = tokio::select! {
            biased;
            outcome = self.forward(&mut finish, deadline) => outcome,
            () = client_gone(io, buf, self.conn.options.max_header_bytes) => return Next::Close,
        };
        match outcome {
            Outcome::Answered(mut lease, answered) => {
                // An event stream has no deadline and, unless the service says otherwise,
                // does not hold the instance's CPU.
                let event_stream = answered.head.event_stream;
                if event_stream && !config.streams_keep_cpu {
                    lease.release_cpu();
                }
                let addr = lease.addr();
                finish.lease = Some(lease);
                let deadline = (!event_stream).then_some(deadline);
                let stall = self.conn.options.idle_keep_alive;
                let client = Client { io, buf };
                self.relay(client, finish, answered, addr, deadline, stall)
                    .await
            }
            Outcome::Refused(status, text, retry_after) => {
                self.answer(io, finish, status, text, retry_after).await
            }
        }
    }

    /// Takes a slot and sends the request (see [`upstream::forward`]).
    async fn forward(&self, finish: &mut Finish, deadline: tokio::time::Instant) -> Outcome {
        let extras = ResponseExtras {
            form: Form::Http1,
            head_request: self.req.method() == "HEAD",
            hsts: self.hsts.as_ref(),
            date: &head::http_date(),
        };
        let request = upstream::Request {
            head: &self.up_head,
            replayable: self.req.replayable(),
            retry_safe: self.req.retry_safe(),
            extras,
        };
        upstream::forward(self.route, finish, deadline, &request).await
    }

    /// Writes the response head and relays the body. Once the instance's part is over, the
    /// socket goes back to the pool (when the instance keeps it open); the request is recorded
    /// (metrics, access log, slot and CPU gate) as soon as the last bytes are handed to the
    /// client's connection, or before waiting for a client that cannot take them at once
    /// ([`Client::write_last`]). A client that leaves while the instance has not sent
    /// everything (a quiet event stream) ends the exchange at once, as hyper would.
    async fn relay<IO>(
        &self,
        mut client: Client<'_, IO>,
        finish: Finish,
        answered: Answered,
        addr: std::net::SocketAddr,
        deadline: Option<tokio::time::Instant>,
        stall: Duration,
    ) -> Next
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let Answered {
            stream,
            mut rest,
            head,
        } = answered;
        let mut done = Done {
            finish: Some(finish),
            body_bytes: 0,
            stream: Some(stream),
            addr,
            sockets: &self.route.upstream.clients().sockets,
        };
        if let Some(f) = done.finish.as_mut() {
            f.status = head.status;
        }
        let limit = self.conn.options.max_header_bytes;
        // Looked at now rather than when the request was sent: a drain may have begun since.
        let closing = self.closing();
        let relayed = async {
            let mut out = head.rendered.into_http1();
            if closing {
                head::add_close(&mut out);
            }
            let reusable = head.reusable;
            match head.framing {
                Framing::Empty => {
                    done.complete(reusable && rest.is_empty());
                    client.write_last(&mut done, &out, stall).await?;
                }
                Framing::Length(total) => {
                    let mut left = total;
                    let take = left.min(rest.len() as u64) as usize;
                    out.extend_from_slice(&rest[..take]);
                    left -= take as u64;
                    done.body_bytes += take as u64;
                    let mut clean = rest.len() == take;
                    if left == 0 {
                        done.complete(reusable && clean);
                        return client.write_last(&mut done, &out, stall).await;
                    }
                    client.write(&out, stall).await?;
                    while left > 0 {
                        if client.read_upstream(&mut done, &mut rest, limit).await? == 0 {
                            return Err(cut("the instance closed mid-body"));
                        }
                        let take = left.min(rest.len() as u64) as usize;
                        left -= take as u64;
                        done.body_bytes += take as u64;
                        clean &= rest.len() == take;
                        if left == 0 {
                            done.complete(reusable && clean);
                            return client.write_last(&mut done, &rest[..take], stall).await;
                        }
                        client.write(&rest[..take], stall).await?;
                    }
                }
                Framing::Chunked => {
                    let mut framing = Chunked::default();
                    let used = framing.decode(&rest, &mut out).map_err(cut)?;
                    done.body_bytes = framing.data;
                    let mut clean = used == rest.len();
                    if framing.done() {
                        done.complete(reusable && clean);
                        return client.write_last(&mut done, &out, stall).await;
                    }
                    client.write(&out, stall).await?;
                    while !framing.done() {
                        if client.read_upstream(&mut done, &mut rest, limit).await? == 0 {
                            return Err(cut("the instance closed mid-body"));
                        }
                        out.clear();
                        let used = framing.decode(&rest, &mut out).map_err(cut)?;
                        done.body_bytes = framing.data;
                        clean &= used == rest.len();
                        if framing.done() {
                            done.complete(reusable && clean);
                            return client.write_last(&mut done, &out, stall).await;
                        }
                        client.write(&out, stall).await?;
                    }
                }
                Framing::UntilClose => {
                    done.body_bytes = rest.len() as u64;
                    chunked::encode(&mut out, &rest);
                    client.write(&out, stall).await?;
                    loop {
                        if client.read_upstream(&mut done, &mut rest, limit).await? == 0 {
                            break;
                        }
                        out.clear();
                        chunked::encode(&mut out, &rest);
                        done.body_bytes += rest.len() as u64;
                        client.write(&out, stall).await?;
                    }
                    done.complete(false);
                    client.write_last(&mut done, b"0\r\n\r\n", stall).await?;
                }
            }
            Ok::<_, std::io::Error>(())
        };
        let result = match deadline {
            Some(at) => tokio::time::timeout_at(at, relayed)
                .await
                .unwrap_or_else(|_| Err(cut("the request's timeout passed"))),
            None => relayed.await,
        };
        match result {
            Ok(()) if closing => Next::Close,
            Ok(()) => Next::Keep,
            Err(e) => {
                tracing::debug!(client = %self.conn.info.client, "response cut: {e}");
                Next::Close
            }
        }
    }

    /// Answers from the proxy itself.
    async fn answer<IO>(
        &self,
        io: &mut IO,
        mut finish: Finish,
        status: StatusCode,
        text: &str,
        retry_after: Option<u64>,
    ) -> Next
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        finish.status = status.as_u16();
        let close = self.closing();
        let out = head::plain(
            status,
            text,
            retry_after,
            &head::http_date(),
            self.hsts.as_ref(),
            close,
        );
        finish.bytes_out = (text.len() + 1) as u64;
        drop(finish);
        match write(io, &out, self.conn.options.idle_keep_alive).await {
            Ok(()) if !close => Next::Keep,
            _ => Next::Close,
        }
    }
}

fn cut(why: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(why.to_string())
}

/// The client's side of an exchange while its response is relayed.
struct Client<'a, IO> {
    io: &'a mut IO,
    /// What the client sent meanwhile (a pipelined request).
    buf: &'a mut BytesMut,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Client<'_, IO> {
    async fn write(&mut self, data: &[u8], stall: Duration) -> std::io::Result<()> {
        write(self.io, data, stall).await
    }

    /// Writes a response's last bytes and records the request (`done`) once they are handed
    /// to the client's connection: the client is not kept waiting by the recording (the CPU
    /// gate's throttle, metrics, the access log line). A client that cannot take them at once
    /// does not hold the instance's slot and CPU while it waits: the request is recorded first.
    async fn write_last(
        &mut self,
        done: &mut Done<'_>,
        data: &[u8],
        stall: Duration,
    ) -> std::io::Result<()> {
        let (sent, flushed) = write_now(self.io, data)?;
        done.record();
        if flushed {
            return Ok(());
        }
        write(self.io, &data[sent..], stall).await
    }

    /// The instance's next bytes, in `rest` (cleared first); an error if the client leaves
    /// first.
    async fn read_upstream(
        &mut self,
        done: &mut Done<'_>,
        rest: &mut BytesMut,
        limit: usize,
    ) -> std::io::Result<usize> {
        rest.clear();
        rest.reserve(16 * 1024);
        let stream = done.stream()?;
        tokio::select! {
            biased;
            read = stream.read_buf(rest) => read,
            () = client_gone(self.io, self.buf, limit) => Err(cut("the client left")),
        }
    }
}

/// Writes what of `data` the connection takes without waiting, then flushes likewise: how many
/// bytes it took, and whether all of them are on their way.
fn write_now<IO>(io: &mut IO, data: &[u8]) -> std::io::Result<(usize, bool)>
where
    IO: AsyncWrite + Unpin,
{
    // Nothing waits on this context: whatever is still pending is awaited afterwards with
    // the task's own waker, which replaces this one.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut sent = 0;
    while sent < data.len() {
        match Pin::new(&mut *io).poll_write(&mut cx, &data[sent..]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => sent += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok((sent, false)),
        }
    }
    match Pin::new(&mut *io).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok((sent, true)),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok((sent, false)),
    }
}

/// Writes all of `data` to the client, which has `stall` to take each part of it.
async fn write<IO>(io: &mut IO, data: &[u8], stall: Duration) -> std::io::Result<()>
where
    IO: AsyncWrite + Unpin,
{
    let written = async {
        io.write_all(data).await?;
        io.flush().await
    };
    match tokio::time::timeout(stall, written).await {
        Ok(r) => r,
        Err(_) => Err(cut("the client stopped reading its response")),
    }
}

/// `inner`, with bytes already read from it in front.
pub(crate) struct Prefixed<T> {
    pub(crate) prefix: BytesMut,
    pub(crate) inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
