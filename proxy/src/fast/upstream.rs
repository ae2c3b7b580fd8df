//! Plain sockets to instances: a request head written to a pooled socket, the response head
//! read back, and (for requests hyper's server read) the response body read from the socket
//! as hyper's server asks for it.
//!
//! Both request paths use it. The fast path relays the body itself; hyper's path takes it
//! for bodiless requests (HTTP/2 ones above all, which never take the fast path), so that an
//! HTTP/2 request is one task's work: no HTTP/1 client dispatcher, no task per upstream
//! connection, no channel between them.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::chunked::Chunked;
use super::head::{self, Framing, ParsedResponse, ResponseExtras, ResponseHead, line};
use crate::forward::{self, BoxError, Failure, Finish};
use crate::idle::Returner;
use crate::pool::Lease;
use crate::routes::Route;

/// Largest response head read from an instance (hyper's client reads up to about as much).
const MAX_RESPONSE_HEAD: usize = 400 * 1024;

/// A response head read from an instance, with the connection it came on and the bytes
/// after the head.
pub(crate) struct Answered {
    pub(crate) stream: TcpStream,
    pub(crate) rest: BytesMut,
    pub(crate) head: ResponseHead,
}

/// How forwarding a request ended, before anything was written to the client.
// Moved once per request; boxing the answer would cost an allocation per request instead.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    Answered(Lease, Answered),
    /// The proxy answers itself: status, text, `Retry-After` seconds.
    Refused(StatusCode, &'static str, Option<u64>),
}

/// A request to send over plain sockets.
pub(crate) struct Request<'a> {
    /// Its HTTP/1.1 head, as the instance gets it.
    pub(crate) head: &'a [u8],
    /// Sent again on a fresh socket when a reused one was dropped unanswered.
    pub(crate) replayable: bool,
    /// Sent to another instance after a connection failure ([`forward::RETRY_SAFE`]).
    pub(crate) retry_safe: bool,
    pub(crate) extras: ResponseExtras<'a>,
}

/// Takes a slot of `route`'s pool and sends `request` to that instance, within the
/// first-byte timeout (and `deadline`), retrying once on another instance as the general
/// path does. The instance is recorded in `finish`'s access-log fields.
pub(crate) async fn forward(
    route: &Route,
    finish: &mut Finish,
    deadline: tokio::time::Instant,
    request: &Request<'_>,
) -> Outcome {
    let first_byte_timeout = route.pool.config().timeouts.first_byte;
    let mut avoid: Option<String> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let lease = match route.pool.acquire(avoid.as_deref()).await {
            Ok(l) => l,
            Err(rejected) => {
                let (retry_after, text) = forward::refusal(rejected);
                let retry_after = forward::retry_after_secs(retry_after);
                return Outcome::Refused(StatusCode::SERVICE_UNAVAILABLE, text, Some(retry_after));
            }
        };
        if let Some(fields) = finish.log.as_mut() {
            fields.entry.instance = lease.instance().to_owned();
            fields.entry.queued_ms = forward::ms(lease.queued());
            fields.entry.woke = lease.woke();
        }
        let first_byte = (tokio::time::Instant::now() + first_byte_timeout).min(deadline);
        let sent = tokio::time::timeout_at(
            first_byte,
            send(
                route,
                request.head,
                request.replayable,
                &request.extras,
                lease.addr(),
            ),
        )
        .await;
        let failure = match sent {
            Ok(Ok(answered)) => return Outcome::Answered(lease, answered),
            Ok(Err(failure)) => failure,
            Err(_) if first_byte < deadline => Failure::FirstByteTimeout,
            Err(_) => Failure::RequestTimeout,
        };
        match forward::after_failure(route, lease, failure, |sent_nothing| {
            attempt == 1 && (sent_nothing || request.retry_safe)
        }) {
            Ok(failed) => avoid = Some(failed),
            Err((status, text)) => return Outcome::Refused(status, text, None),
        }
    }
}

/// Sends `up_head` to `addr` on an idle socket, or a new one, and reads the response head.
/// A reused socket the instance closed meanwhile (its keep-alive timer ran out) is replaced
/// by a new one when the instance cannot have acted on the request: the write failed, or the
/// request is `replayable` and no answer came.
pub(crate) async fn send(
    route: &Route,
    up_head: &[u8],
    replayable: bool,
    extras: &ResponseExtras<'_>,
    addr: SocketAddr,
) -> Result<Answered, Failure> {
    let clients = route.upstream.clients();
    let mut fresh = false;
    loop {
        let idle = if fresh {
            None
        } else {
            clients.sockets.take(addr)
        };
        let reused = idle.is_some();
        let mut stream = match idle {
            Some(s) => s,
            None => forward::connect_tcp(addr, route.upstream.connect_timeout)
                .await
                .map_err(|e| match e {
                    None => Failure::ConnectTimeout,
                    Some(reason) => Failure::Connection {
                        reason,
                        sent_nothing: true,
                    },
                })?,
        };
        if let Err(e) = stream.write_all(up_head).await {
            if reused {
                fresh = true;
                continue;
            }
            return Err(Failure::Connection {
                reason: format!("sending the request to instance {addr}: {e}"),
                sent_nothing: false,
            });
        }
        let mut rest = BytesMut::with_capacity(8 * 1024);
        // Whether the instance answered anything (a 1xx it sent is gone from `rest`).
        let mut heard = false;
        loop {
            match head::parse_response(&rest, extras) {
                ParsedResponse::Final(len, head) => {
                    rest.advance(len);
                    return Ok(Answered { stream, rest, head });
                }
                ParsedResponse::Informational(len) => {
                    rest.advance(len);
                    continue;
                }
                ParsedResponse::Invalid(reason) => return Err(Failure::Other(reason)),
                ParsedResponse::Partial => {}
            }
            if rest.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Other("response head larger than 400 KiB".into()));
            }
            rest.reserve(8 * 1024);
            match stream.read_buf(&mut rest).await {
                Ok(n) if n > 0 => heard = true,
                result => {
                    if reused && !heard && replayable {
                        fresh = true;
                        break;
                    }
                    let why = match result {
                        Err(e) => e.to_string(),
                        Ok(_) => "closed before answering".to_owned(),
                    };
                    return Err(Failure::Connection {
                        reason: format!("instance {addr}: {why}"),
                        sent_nothing: false,
                    });
                }
            }
        }
    }
}

/// Whether hyper's path sends a request over a plain socket: one without a body (whose
/// method expects none), not an upgrade, and without `TE` (a client asking for trailers
/// keeps hyper's client, whose trailer handling the proxy's tests pin down both ways).
pub(crate) fn takes(method: &Method, headers: &HeaderMap, body_empty: bool) -> bool {
    body_empty
        && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        && !headers.contains_key(header::TE)
        && !headers.contains_key(header::UPGRADE)
}

/// The HTTP/1.1 head an instance gets for a request hyper read: `headers` are already this
/// hop's (hop-by-hop ones out, forwarding ones and `Host` in). HTTP/2's separate `Cookie`
/// fields are joined into one (RFC 9113, 8.2.3).
pub(crate) fn request_head(method: &Method, path: &str, headers: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + headers.len() * 48);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = headers.get(header::HOST) {
        line(&mut out, b"host", host.as_bytes());
    }
    let mut cookies_done = false;
    for (name, value) in headers {
        if name == header::HOST {
            continue;
        }
        if name == header::COOKIE {
            if cookies_done {
                continue;
            }
            cookies_done = true;
            out.extend_from_slice(b"cookie: ");
            for (i, v) in headers.get_all(header::COOKIE).iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b"; ");
                }
                out.extend_from_slice(v.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            continue;
        }
        line(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The trailer fields in `lines` (each `name: value` and CRLF), without those that only
/// framing or the connection may carry.
fn trailer_fields(lines: &[u8]) -> Result<HeaderMap, BoxError> {
    let mut section = Vec::with_capacity(lines.len() + 2);
    section.extend_from_slice(lines);
    section.extend_from_slice(b"\r\n");
    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let fields = match httparse::parse_headers(&section, &mut parsed) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        Ok(httparse::Status::Partial) => return Err("malformed trailers".into()),
        Err(e) => return Err(format!("malformed trailers: {e}").into()),
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields.iter() {
        if head::hop_by_hop(f.name)
            || f.name.eq_ignore_ascii_case("content-length")
            || f.name.eq_ignore_ascii_case("host")
        {
            continue;
        }
        let name = http::HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| format!("malformed trailer name {:?}", f.name))?;
        let value = http::HeaderValue::from_bytes(f.value)
            .map_err(|_| format!("malformed value of trailer {:?}", f.name))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Where a body read from a socket is.
enum State {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the instance closes the connection.
    UntilClose,
    Done,
}

/// A response body read straight from the instance's socket. The socket goes back to the
/// pool once the body has been read whole and nothing follows it (and the instance keeps
/// the connection open); dropped before that, it is closed.
pub(crate) struct SocketBody {
    stream: Option<TcpStream>,
    rest: BytesMut,
    state: State,
    /// A chunked body's trailers, sent after its last data.
    trailers: Option<HeaderMap>,
    reusable: bool,
    addr: SocketAddr,
    pool: Returner<TcpStream>,
}

impl SocketBody {
    /// The body of `answered`'s response (its socket from `pool`, connected to `addr`).
    pub(crate) fn new(answered: Answered, addr: SocketAddr, pool: Returner<TcpStream>) -> Self {
        let Answered { stream, rest, head } = answered;
        let state = match head.framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::unframed()),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = SocketBody {
            stream: Some(stream),
            rest,
            state,
            trailers: None,
            reusable: head.reusable,
            addr,
            pool,
        };
        if matches!(body.state, State::Done) {
            body.ended();
        }
        body
    }

    /// The body has been read whole: the socket goes back if nothing else came with it.
    fn ended(&mut self) {
        self.state = State::Done;
        if let Some(stream) = self.stream.take()
            && self.reusable
            && self.rest.is_empty()
        {
            self.pool.give_back(self.addr, stream);
        }
    }

    /// The data `rest` holds, if any; ends the body when it is all there.
    fn take_data(&mut self) -> Result<Option<Bytes>, BoxError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        match &mut self.state {
            State::Length(left) => {
                let take = (*left).min(self.rest.len() as u64);
                let data = self.rest.split_to(take as usize).freeze();
                *left -= take;
                if *left == 0 {
                    self.ended();
                }
                Ok(Some(data))
            }
            State::Chunked(decoder) => {
                let mut out = Vec::with_capacity(self.rest.len());
                let used = decoder.decode(&self.rest, &mut out)?;
                self.rest.advance(used);
                if decoder.done() {
                    let lines = decoder.take_trailers();
                    if !lines.is_empty() {
                        self.trailers = Some(trailer_fields(&lines)?);
                    }
                    self.ended();
                }
                Ok((!out.is_empty()).then(|| Bytes::from(out)))
            }
            State::UntilClose => Ok(Some(self.rest.split().freeze())),
            State::Done => Ok(None),
        }
    }
}

impl Body for SocketBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.take_data() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(e) => {
                    this.state = State::Done;
                    this.stream.take();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if matches!(this.state, State::Done) {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let Some(stream) = this.stream.as_mut() else {
                return Poll::Ready(None);
            };
            if this.rest.capacity() - this.rest.len() < 4096 {
                this.rest.reserve(16 * 1024);
            }
            if let Err(e) = ready!(stream.poll_read_ready(cx)) {
                this.stream.take();
                return Poll::Ready(Some(Err(e.into())));
            }
            match stream.try_read_buf(&mut this.rest) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.stream.take();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.state = State::Done;
                    this.stream.take();
                    return Poll::Ready(Some(Err("the instance closed mid-body".into())));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.state = State::Done;
                    this.stream.take();
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done) && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
