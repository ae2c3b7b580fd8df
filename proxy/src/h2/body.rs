//! A request body arriving in DATA frames: what the connection hands the forwarding code,
//! and the flow-control credit it gives back as the body is read.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use crate::forward::BoxError;

/// One stream's received body, shared by the connection (which fills it) and the body
/// (which drains it, maybe from another task: hyper's client connection's).
pub(crate) struct Recv {
    state: Mutex<State>,
    /// The connection's task: woken when credit is to be given back or a 100 sent.
    conn: Arc<AtomicWaker>,
    /// The body was dropped: nobody reads what comes.
    dropped: AtomicBool,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    end: bool,
    reset: Option<&'static str>,
    waker: Option<Waker>,
    /// Bytes read since the connection last collected them (its credit to give back).
    consumed: usize,
    /// The client asked for `100 Continue`, not sent yet; `continue_wanted` once read.
    expect_continue: bool,
    continue_wanted: bool,
}

impl Recv {
    pub(crate) fn new(conn: Arc<AtomicWaker>, expect_continue: bool) -> Arc<Recv> {
        Arc::new(Recv {
            state: Mutex::new(State {
                expect_continue,
                ..State::default()
            }),
            conn,
            dropped: AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the body still exists to read what comes.
    pub(crate) fn read(&self) -> bool {
        !self.dropped.load(Ordering::Acquire)
    }

    /// Queues `data` for the body; false if the body is gone (nobody will read it).
    pub(crate) fn push(&self, data: Bytes) -> bool {
        let mut s = self.state();
        // Under the lock: a body dropping takes the lock after setting the flag, and hands
        // back as credit what it finds queued.
        if self.dropped.load(Ordering::Acquire) {
            return false;
        }
        s.chunks.push_back(data);
        wake(&mut s);
        true
    }

    /// Whether everything the client sent has been read.
    pub(crate) fn drained(&self) -> bool {
        let s = self.state();
        s.end && s.chunks.is_empty() && s.trailers.is_none()
    }

    pub(crate) fn trailers(&self, trailers: HeaderMap) {
        let mut s = self.state();
        s.trailers = Some(trailers);
        wake(&mut s);
    }

    pub(crate) fn end(&self) {
        let mut s = self.state();
        s.end = true;
        wake(&mut s);
    }

    /// The stream was reset or its connection closed: a body not whole yet fails. Returns
    /// the bytes received and never read.
    pub(crate) fn reset(&self, why: &'static str) -> usize {
        let mut s = self.state();
        let unread = s.chunks.drain(..).map(|c| c.len()).sum();
        if !s.end {
            s.reset = Some(why);
        }
        wake(&mut s);
        unread
    }

    /// Takes the bytes read since the last call, and whether a 100 is wanted now.
    pub(crate) fn collect(&self) -> (usize, bool) {
        let mut s = self.state();
        let wanted = std::mem::take(&mut s.continue_wanted);
        (std::mem::take(&mut s.consumed), wanted)
    }
}

fn wake(s: &mut State) {
    if let Some(w) = s.waker.take() {
        w.wake();
    }
}

/// The body of a request received over the proxy's own HTTP/2 server.
pub(crate) struct RecvBody {
    recv: Arc<Recv>,
    hint: SizeHint,
}

impl RecvBody {
    pub(crate) fn new(recv: Arc<Recv>, content_length: Option<u64>) -> RecvBody {
        let hint = content_length.map_or_else(SizeHint::default, SizeHint::with_exact);
        RecvBody { recv, hint }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        self.recv.dropped.store(true, Ordering::Release);
        // What it held is credit to give back.
        let mut s = self.recv.state();
        let unread: usize = s.chunks.drain(..).map(|c| c.len()).sum();
        s.consumed += unread;
        drop(s);
        self.recv.conn.wake();
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.recv.state();
        if std::mem::take(&mut s.expect_continue) {
            s.continue_wanted = true;
            this.recv.conn.wake();
        }
        if let Some(chunk) = s.chunks.pop_front() {
            s.consumed += chunk.len();
            drop(s);
            this.recv.conn.wake();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(trailers) = s.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if s.end {
            return Poll::Ready(None);
        }
        if let Some(why) = s.reset {
            return Poll::Ready(Some(Err(why.into())));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let s = self.recv.state();
        s.end && s.chunks.is_empty() && s.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_reads_its_data_and_trailers_and_counts_what_it_read() {
        let conn = Arc::new(AtomicWaker::new());
        let recv = Recv::new(conn, true);
        let mut body = RecvBody::new(recv.clone(), Some(5));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(recv.push(Bytes::from_static(b"he")));
        assert!(recv.push(Bytes::from_static(b"llo")));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        recv.trailers(trailers);
        recv.end();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "he");
        assert_eq!(recv.collect(), (2, true));
        assert_eq!(recv.collect(), (0, false));
        let second = body.frame().await.unwrap().unwrap();
        assert_eq!(second.into_data().unwrap(), "llo");
        let t = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(t["x-sum"], "1");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
        assert_eq!(recv.collect(), (3, false));
    }

    #[tokio::test]
    async fn a_reset_fails_the_body_and_a_dropped_body_gives_its_bytes_back() {
        let conn = Arc::new(AtomicWaker::new());
        let recv = Recv::new(conn.clone(), false);
        let mut body = RecvBody::new(recv.clone(), None);
        assert!(recv.push(Bytes::from_static(b"abc")));
        assert_eq!(recv.reset("the stream was reset"), 3);
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "the stream was reset");

        let recv = Recv::new(conn, false);
        let body = RecvBody::new(recv.clone(), None);
        assert!(recv.push(Bytes::from_static(b"abcd")));
        assert!(recv.read());
        drop(body);
        assert!(!recv.read());
        assert_eq!(recv.collect(), (4, false));
        assert!(
            !recv.push(Bytes::from_static(b"late")),
            "a dropped body takes nothing"
        );
    }
}
