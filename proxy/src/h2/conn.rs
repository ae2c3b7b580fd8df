//! One HTTP/2 connection, served in one task: frames read and checked, requests handed to
//! the service as they complete, responses and their bodies written under both flow-control
//! windows. No stream has a task, a channel or a lock of its own but its request body's.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::future::{AbortHandle, Abortable};
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod recv;
mod send;

use super::body::Recv;
use super::frame::{self, Code, Error, setting};
use super::hpack::{self, Limits};
use crate::forward::{AfterWrite, ClientBody, Finish, ProxyBody};

/// The PING sent with a graceful shutdown's first GOAWAY.
const SHUTDOWN_PING: &[u8; 8] = b"lull-bye";

/// How long a graceful shutdown waits for that PING's ACK before its last GOAWAY.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(1);

/// How many of the streams it reset a connection remembers.
const RESET_MEMORY: usize = 64;

/// How long a connection that failed reads what the client still sends before closing.
const LINGER: Duration = Duration::from_secs(1);

/// Output waiting to be written past which no more is made (frames read, bodies polled).
const HIGH_WATER: usize = 64 * 1024;

/// What the server announces and enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub max_concurrent_streams: u32,
    /// Each stream's receive window (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// The connection's receive window.
    pub conn_window: u32,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_concurrent_streams: 200,
            stream_window: 1024 * 1024,
            conn_window: 1024 * 1024,
            limits: Limits {
                list_size: 16 * 1024,
                count: 100,
            },
        }
    }
}

/// The service's answer to a request, boxed by the service: the forwarding code's future is
/// a few KiB, moved nowhere once made.
pub(crate) type Answer = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// An answer with its stream's id.
struct Tagged {
    id: u32,
    answer: Answer,
}

impl Future for Tagged {
    type Output = (u32, Response<ProxyBody>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let id = self.id;
        self.answer.as_mut().poll(cx).map(|r| (id, r))
    }
}

/// One stream the client opened.
struct Stream {
    /// Its request body, absent if the request ended with its head.
    recv: Option<Arc<Recv>>,
    /// END_STREAM received.
    remote_closed: bool,
    /// How much more the client may send on it.
    recv_window: i64,
    /// Credit read (or discarded) and not given back yet.
    owed: usize,
    content_length: Option<u64>,
    received: u64,
    /// How much more may be sent on it.
    send_window: i64,
    head: bool,
    response: Sending,
    abort: AbortHandle,
}

enum Sending {
    /// The service has not answered.
    Waiting,
    /// Its body is being sent: `data` is what of the last frame did not fit the windows,
    /// `last`: the body ended with that frame.
    Body {
        body: ProxyBody,
        data: Bytes,
        last: bool,
    },
    /// All of it went out.
    Done,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.abort.abort();
        if let Some(recv) = &self.recv {
            recv.reset("the request's stream was reset or its connection closed");
        }
    }
}

/// A field block spread over HEADERS and CONTINUATION frames.
struct Continuation {
    stream: u32,
    end_stream: bool,
    self_dependent: bool,
    /// CONTINUATION frames so far.
    frames: u32,
    block: Vec<u8>,
}

/// An HTTP/2 connection being served: a future that ends with the connection.
pub(crate) struct Connection<IO, S> {
    io: IO,
    service: S,
    config: Config,
    rbuf: BytesMut,
    wbuf: BytesMut,
    scratch: BytesMut,
    /// The bytes read before `new` were handled.
    started: bool,
    preface: bool,
    settings_seen: bool,
    decoder: loona_hpack::Decoder<'static>,
    encoder: hpack::Encoder,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
    peer_window: i64,
    peer_max_frame: usize,
    send_window: i64,
    recv_window: i64,
    /// Connection credit read (or discarded) and not given back yet.
    owed: usize,
    streams: HashMap<u32, Stream>,
    /// The streams this side reset last (at most [`RESET_MEMORY`]): what the client sent on
    /// them before it learned of the reset is dropped, not a protocol error.
    reset_lately: VecDeque<u32>,
    /// Request bodies of streams gone whose reader is still reading (see `forget`).
    detached: Vec<Arc<Recv>>,
    last_stream: u32,
    /// Requests the client cancelled unanswered: since when, how many.
    cancels: Option<(std::time::Instant, u32)>,
    continuation: Option<Continuation>,
    answers: FuturesUnordered<Abortable<Tagged>>,
    sending: VecDeque<u32>,
    waker: Arc<AtomicWaker>,
    /// A graceful shutdown was asked for; `goaway`: the GOAWAY went out with this last id.
    shutdown: bool,
    /// The first GOAWAY and its PING went out; waiting for the PING's ACK until this fires.
    warned: Option<Pin<Box<tokio::time::Sleep>>>,
    shutdown_acked: bool,
    goaway: Option<u32>,
    /// The client sent GOAWAY: it opens no more streams.
    client_goaway: bool,
    /// A connection error was sent: close once it is written.
    failed: bool,
    /// The client's side is closed (EOF): the streams it finished are answered, then the
    /// connection closes.
    read_closed: bool,
    flushing: bool,
    /// How long to read on after a connection error (see `poll_linger`).
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    write_shut: bool,
    /// Requests whose response ended, recorded after each write (see [`AfterWrite`]);
    /// `recording` is the vector swapped with it.
    after_write: AfterWrite,
    recording: Vec<Finish>,
}

impl<IO, S> Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<ClientBody>) -> Answer + Unpin,
{
    /// Serves `io`, whose first bytes (the preface at least begun) may already be in `read`.
    /// `after_write` is where the responses' bodies put their requests to be recorded once
    /// the connection has written their last bytes (the `ConnInfo` its service uses).
    pub(crate) fn new(
        io: IO,
        read: BytesMut,
        service: S,
        config: Config,
        after_write: AfterWrite,
    ) -> Self {
        let mut wbuf = BytesMut::with_capacity(16 * 1024);
        frame::put_settings(
            &mut wbuf,
            &[
                (
                    setting::MAX_CONCURRENT_STREAMS,
                    config.max_concurrent_streams,
                ),
                (setting::INITIAL_WINDOW_SIZE, config.stream_window),
                (
                    setting::MAX_HEADER_LIST_SIZE,
                    u32::try_from(config.limits.list_size).unwrap_or(u32::MAX),
                ),
            ],
        );
        let extra = i64::from(config.conn_window) - frame::DEFAULT_WINDOW;
        if extra > 0 {
            frame::put_window_update(&mut wbuf, 0, extra as u32);
        }
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(4096);
        Connection {
            io,
            service,
            config,
            rbuf: read,
            wbuf,
            scratch: BytesMut::new(),
            started: false,
            preface: false,
            settings_seen: false,
            decoder,
            encoder: hpack::Encoder::default(),
            peer_window: frame::DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME as usize,
            send_window: frame::DEFAULT_WINDOW,
            recv_window: frame::DEFAULT_WINDOW.max(i64::from(config.conn_window)),
            owed: 0,
            streams: HashMap::new(),
            reset_lately: VecDeque::new(),
            detached: Vec::new(),
            last_stream: 0,
            cancels: None,
            continuation: None,
            answers: FuturesUnordered::new(),
            sending: VecDeque::new(),
            waker: Arc::new(AtomicWaker::new()),
            shutdown: false,
            warned: None,
            shutdown_acked: false,
            goaway: None,
            client_goaway: false,
            failed: false,
            read_closed: false,
            flushing: false,
            linger: None,
            write_shut: false,
            after_write,
            recording: Vec::new(),
        }
    }

    /// Sends GOAWAY, takes no new streams, and ends once those open are answered.
    pub(crate) fn graceful_shutdown(&mut self) {
        self.shutdown = true;
        self.waker.wake();
    }

    fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.linger.is_some() {
            // Done but for the close: nothing more is read as frames or written.
            return self.poll_linger(cx);
        }
        self.waker.register(cx.waker());
        if !self.started {
            // What was read before the connection came here (the fast path's bytes).
            self.started = true;
            if !self.rbuf.is_empty()
                && let Err(e) = self.frames()
            {
                self.fail(e);
            }
        }
        loop {
            let mut progress = false;
            if self.shutdown && self.goaway.is_none() && !self.failed {
                if !self.preface && self.rbuf.is_empty() {
                    // Nothing asked yet: nothing to finish.
                    return Poll::Ready(Ok(()));
                }
                // A preface still arriving is read first. Then two steps, as RFC 9113 §6.8
                // suggests: a GOAWAY naming the highest stream there can be, with a PING, so
                // that requests already on their way are still taken; once the PING comes
                // back (or a second has passed), the GOAWAY naming the last stream taken.
                if self.preface {
                    match self.warned.as_mut() {
                        None => {
                            frame::put_goaway(&mut self.wbuf, 0x7fff_ffff, Code::NoError, "");
                            frame::put_ping(&mut self.wbuf, SHUTDOWN_PING);
                            self.warned = Some(Box::pin(tokio::time::sleep(SHUTDOWN_ACK_WAIT)));
                            progress = true;
                        }
                        Some(wait) => {
                            if self.shutdown_acked || wait.as_mut().poll(cx).is_ready() {
                                frame::put_goaway(
                                    &mut self.wbuf,
                                    self.last_stream,
                                    Code::NoError,
                                    "",
                                );
                                self.goaway = Some(self.last_stream);
                                progress = true;
                            }
                        }
                    }
                }
            }
            if !self.failed && !self.read_closed && self.wbuf.len() < HIGH_WATER {
                if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                    self.rbuf.reserve(16 * 1024);
                }
                match read_into(&mut self.io, cx, &mut self.rbuf) {
                    Poll::Ready(Ok(0)) => {
                        // The client sends no more. What it asked for whole is still
                        // answered (it may be reading); bodies it left unfinished fail.
                        self.read_closed = true;
                        progress = true;
                        let unfinished: Vec<u32> = self
                            .streams
                            .iter()
                            .filter(|(_, s)| !s.remote_closed)
                            .map(|(&id, _)| id)
                            .collect();
                        for id in unfinished {
                            if let Some(s) = self.streams.remove(&id) {
                                self.forget(s);
                            }
                        }
                    }
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(e) = self.frames() {
                            self.fail(e);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            while let Poll::Ready(Some(answered)) = self.answers.poll_next_unpin(cx) {
                progress = true;
                // An aborted one's stream is gone already.
                if let Ok((id, response)) = answered {
                    self.respond(id, response);
                }
            }
            progress |= self.give_credit();
            if !self.failed {
                progress |= self.send_bodies(cx);
            }
            match self.flush(cx) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            // Written, or the client takes no more now: either way the responses that ended
            // are recorded (a slow reader holds no instance's slot or CPU).
            self.after_write.record(&mut self.recording);
            let settled = self.wbuf.is_empty() && !self.flushing;
            if settled && self.failed {
                return self.poll_linger(cx);
            }
            if settled
                && (self.goaway.is_some() || self.client_goaway || self.read_closed)
                && self.streams.is_empty()
                && self.answers.is_empty()
            {
                // Closed the way a failed connection is: the write side shut (a TLS client
                // gets its close_notify), what the client still sends read and dropped.
                return self.poll_linger(cx);
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// After the last GOAWAY (a connection error's, or a graceful end's once its streams are
    /// done): the write side is shut, and what the client still sends is read and dropped for
    /// a moment, so that closing does not reset the connection (and lose what it was sent)
    /// while its bytes are unread.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let linger = self
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        if linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if !self.write_shut {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Ready(_) => self.write_shut = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        loop {
            self.rbuf.clear();
            if self.rbuf.capacity() < 16 * 1024 {
                self.rbuf.reserve(16 * 1024);
            }
            match read_into(&mut self.io, cx, &mut self.rbuf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes what is waiting; `Ok(true)` if some went out.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let mut wrote = false;
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.wbuf.advance(n);
                    wrote = true;
                    self.flushing = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return if wrote {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
        if self.flushing {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushing = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(wrote))
    }

    fn fail(&mut self, e: Error) {
        if self.failed {
            return;
        }
        let (code, why) = match e {
            Error::Connection(code, why) => (code, why),
            Error::Stream(..) => unreachable!("stream errors are handled where they happen"),
        };
        tracing::debug!(code = ?code, "HTTP/2 connection error: {why}");
        frame::put_goaway(&mut self.wbuf, self.last_stream, code, why);
        self.failed = true;
        self.streams.clear();
        self.sending.clear();
        self.answers = FuturesUnordered::new();
    }
}

/// Reads what the socket has into `buf`'s spare capacity.
fn read_into<IO: AsyncRead + Unpin>(
    io: &mut IO,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let mut read = ReadBuf::uninit(spare);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut read))?;
    let n = read.filled().len();
    // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

impl<IO, S> Future for Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<ClientBody>) -> Answer + Unpin,
{
    type Output = std::io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().poll_serve(cx)
    }
}
