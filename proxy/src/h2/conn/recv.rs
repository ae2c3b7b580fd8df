//! The receiving side of a connection: frames read, checked and acted on, and the
//! flow-control credit given back as request bodies are read.

use bytes::{Buf, Bytes};
use futures_util::future::{AbortHandle, Abortable};
use http::{Method, Request, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Answer, Connection, Continuation, RESET_MEMORY, SHUTDOWN_PING, Sending, Stream, Tagged,
};
use crate::forward::ClientBody;
use crate::h2::body::{Recv, RecvBody};
use crate::h2::frame::{self, Code, Error, Head, flag, kind, setting};
use crate::h2::hpack::{self, Refused};

/// CONTINUATION frames one field block may take.
const MAX_CONTINUATIONS: u32 = 64;

/// Requests that may be cancelled in a second, by the client's RST_STREAM or by a reset its
/// errors caused (see `Connection::cancelled`).
const MAX_CANCELS_PER_SECOND: u32 = 200;

/// DATA payloads shorter than this are copied out of the read buffer rather than kept as a
/// slice of it: a slice pins the whole buffer, and many small frames would pin many.
const COPY_BELOW: usize = 1024;

impl<IO, S> Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<ClientBody>) -> Answer + Unpin,
{
    /// Handles every whole frame read.
    pub(super) fn frames(&mut self) -> Result<(), Error> {
        if !self.preface {
            let n = self.rbuf.len().min(frame::PREFACE.len());
            if self.rbuf[..n] != frame::PREFACE[..n] {
                return Err(Error::Connection(
                    Code::Protocol,
                    "not the HTTP/2 connection preface",
                ));
            }
            if n < frame::PREFACE.len() {
                return Ok(());
            }
            self.rbuf.advance(n);
            self.preface = true;
        }
        while let Some(head) = Head::parse(&self.rbuf) {
            if head.len > frame::DEFAULT_MAX_FRAME as usize {
                return Err(Error::Connection(
                    Code::FrameSize,
                    "a frame larger than SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.rbuf.len() < frame::HEAD_LEN + head.len {
                self.rbuf
                    .reserve(frame::HEAD_LEN + head.len - self.rbuf.len());
                break;
            }
            let mut whole = self.rbuf.split_to(frame::HEAD_LEN + head.len).freeze();
            whole.advance(frame::HEAD_LEN);
            match self.frame(head, whole) {
                Ok(()) => {}
                Err(Error::Stream(id, code, why)) => self.reset(id, code, why)?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) fn frame(&mut self, head: Head, payload: Bytes) -> Result<(), Error> {
        if let Some(c) = &self.continuation
            && (head.kind != kind::CONTINUATION || head.stream != c.stream)
        {
            return Err(Error::Connection(
                Code::Protocol,
                "a field block cut by another frame",
            ));
        }
        if !self.settings_seen && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(Error::Connection(
                Code::Protocol,
                "the first frame was not SETTINGS",
            ));
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload),
            kind::HEADERS => self.on_headers(head, &payload),
            kind::CONTINUATION => self.on_continuation(head, &payload),
            kind::PRIORITY => {
                if head.stream == 0 {
                    return Err(Error::Connection(Code::Protocol, "PRIORITY on stream 0"));
                }
                if head.stream > self.last_stream {
                    // On a stream not opened yet: nothing to reset (RFC 9113 §6.4).
                    return Ok(());
                }
                if head.len != 5 {
                    return Err(Error::Stream(
                        head.stream,
                        Code::FrameSize,
                        "PRIORITY not 5 bytes",
                    ));
                }
                let d = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if d & 0x7fff_ffff == head.stream {
                    return Err(Error::Stream(
                        head.stream,
                        Code::Protocol,
                        "a stream depending on itself",
                    ));
                }
                Ok(())
            }
            kind::RST_STREAM => {
                if head.len != 4 {
                    return Err(Error::Connection(Code::FrameSize, "RST_STREAM not 4 bytes"));
                }
                if head.stream == 0 {
                    return Err(Error::Connection(Code::Protocol, "RST_STREAM on stream 0"));
                }
                self.known(head.stream)?;
                if let Some(s) = self.streams.remove(&head.stream) {
                    let unanswered = matches!(s.response, Sending::Waiting);
                    self.forget(s);
                    if unanswered {
                        self.cancelled()?;
                    }
                }
                Ok(())
            }
            kind::SETTINGS => self.on_settings(head, &payload),
            kind::PUSH_PROMISE => Err(Error::Connection(
                Code::Protocol,
                "PUSH_PROMISE from a client",
            )),
            kind::PING => {
                if head.len != 8 {
                    return Err(Error::Connection(Code::FrameSize, "PING not 8 bytes"));
                }
                if head.stream != 0 {
                    return Err(Error::Connection(Code::Protocol, "PING on a stream"));
                }
                if !head.has(flag::ACK) {
                    let mut data = [0u8; 8];
                    data.copy_from_slice(&payload);
                    frame::put_ping_ack(&mut self.wbuf, &data);
                } else if payload[..] == SHUTDOWN_PING[..] {
                    self.shutdown_acked = true;
                }
                Ok(())
            }
            kind::GOAWAY => {
                if head.stream != 0 {
                    return Err(Error::Connection(Code::Protocol, "GOAWAY on a stream"));
                }
                if head.len < 8 {
                    return Err(Error::Connection(
                        Code::FrameSize,
                        "GOAWAY shorter than 8 bytes",
                    ));
                }
                self.client_goaway = true;
                Ok(())
            }
            kind::WINDOW_UPDATE => self.on_window_update(head, &payload),
            // Unknown frame types are ignored.
            _ => Ok(()),
        }
    }

    /// Frames other than HEADERS and PRIORITY on a stream never opened are an error (the
    /// callers have turned stream 0 away already).
    pub(super) fn known(&self, stream: u32) -> Result<(), Error> {
        if stream > self.last_stream || stream.is_multiple_of(2) {
            return Err(Error::Connection(
                Code::Protocol,
                "a frame on a stream never opened",
            ));
        }
        Ok(())
    }

    pub(super) fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), Error> {
        if head.stream != 0 {
            return Err(Error::Connection(Code::Protocol, "SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            if head.len != 0 {
                return Err(Error::Connection(
                    Code::FrameSize,
                    "a SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        for (id, value) in frame::settings(payload)? {
            match id {
                setting::INITIAL_WINDOW_SIZE => {
                    let delta = i64::from(value) - self.peer_window;
                    self.peer_window = i64::from(value);
                    for s in self.streams.values_mut() {
                        s.send_window += delta;
                        if s.send_window > frame::MAX_WINDOW {
                            return Err(Error::Connection(
                                Code::FlowControl,
                                "SETTINGS_INITIAL_WINDOW_SIZE took a window above 2^31-1",
                            ));
                        }
                    }
                }
                setting::MAX_FRAME_SIZE => self.peer_max_frame = value as usize,
                // The encoder keeps its dynamic table empty (see hpack): any size is fine.
                _ => {}
            }
        }
        self.settings_seen = true;
        frame::put_settings_ack(&mut self.wbuf);
        Ok(())
    }

    pub(super) fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), Error> {
        if head.len != 4 {
            return Err(Error::Connection(
                Code::FrameSize,
                "WINDOW_UPDATE not 4 bytes",
            ));
        }
        let increment = i64::from(
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
        );
        if head.stream == 0 {
            if increment == 0 {
                return Err(Error::Connection(Code::Protocol, "a WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > frame::MAX_WINDOW {
                return Err(Error::Connection(
                    Code::FlowControl,
                    "a window above 2^31-1",
                ));
            }
            return Ok(());
        }
        self.known(head.stream)?;
        if let Some(s) = self.streams.get_mut(&head.stream) {
            if increment == 0 {
                return Err(Error::Stream(
                    head.stream,
                    Code::Protocol,
                    "a WINDOW_UPDATE of 0",
                ));
            }
            s.send_window += increment;
            if s.send_window > frame::MAX_WINDOW {
                return Err(Error::Stream(
                    head.stream,
                    Code::FlowControl,
                    "a window above 2^31-1",
                ));
            }
        }
        Ok(())
    }

    pub(super) fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), Error> {
        if head.stream == 0 {
            return Err(Error::Connection(Code::Protocol, "DATA on stream 0"));
        }
        let len = head.len as i64;
        if len > self.recv_window {
            return Err(Error::Connection(
                Code::FlowControl,
                "DATA beyond the connection's window",
            ));
        }
        self.recv_window -= len;
        let (start, end) = frame::unpad(&head, &payload)?;
        let Some(s) = self.streams.get_mut(&head.stream) else {
            self.owed += head.len;
            self.known(head.stream)?;
            if self.ignored(head.stream) {
                return Ok(());
            }
            return Err(Error::Stream(
                head.stream,
                Code::StreamClosed,
                "DATA on a closed stream",
            ));
        };
        if s.remote_closed {
            self.owed += head.len;
            return Err(Error::Stream(
                head.stream,
                Code::StreamClosed,
                "DATA after END_STREAM",
            ));
        }
        if len > s.recv_window {
            self.owed += head.len;
            return Err(Error::Stream(
                head.stream,
                Code::FlowControl,
                "DATA beyond the stream's window",
            ));
        }
        s.recv_window -= len;
        // Padding is read at once: its credit goes back with the next update.
        let padding = head.len - (end - start);
        s.owed += padding;
        self.owed += padding;
        s.received += (end - start) as u64;
        if s.content_length.is_some_and(|l| s.received > l) {
            self.owed += end - start;
            return Err(Error::Stream(
                head.stream,
                Code::Protocol,
                "DATA beyond content-length",
            ));
        }
        let end_stream = head.has(flag::END_STREAM);
        let data = end - start;
        let kept = match &s.recv {
            Some(recv) if data > 0 => {
                let chunk = if data < COPY_BELOW {
                    Bytes::copy_from_slice(&payload[start..end])
                } else {
                    payload.slice(start..end)
                };
                recv.push(chunk)
            }
            _ => false,
        };
        if !kept {
            // Nobody reads it: its credit goes back at once.
            s.owed += data;
            self.owed += data;
        }
        if end_stream {
            self.end_of_request(head.stream)?;
        }
        Ok(())
    }

    /// The client's END_STREAM on `id`.
    pub(super) fn end_of_request(&mut self, id: u32) -> Result<(), Error> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if s.content_length.is_some_and(|l| l != s.received) {
            return Err(Error::Stream(
                id,
                Code::Protocol,
                "DATA not adding up to content-length",
            ));
        }
        s.remote_closed = true;
        if let Some(recv) = &s.recv {
            recv.end();
        }
        if matches!(s.response, Sending::Done)
            && let Some(s) = self.streams.remove(&id)
        {
            self.forget(s);
        }
        Ok(())
    }

    pub(super) fn on_headers(&mut self, head: Head, payload: &[u8]) -> Result<(), Error> {
        if head.stream == 0 {
            return Err(Error::Connection(Code::Protocol, "HEADERS on stream 0"));
        }
        if head.stream.is_multiple_of(2) {
            return Err(Error::Connection(
                Code::Protocol,
                "HEADERS on an even stream",
            ));
        }
        let (start, end, depends) = frame::headers_block(&head, payload)?;
        let c = Continuation {
            stream: head.stream,
            end_stream: head.has(flag::END_STREAM),
            self_dependent: depends == Some(head.stream),
            frames: 0,
            block: Vec::new(),
        };
        if head.has(flag::END_HEADERS) {
            self.on_block(c, &payload[start..end])
        } else {
            self.continuation = Some(Continuation {
                block: payload[start..end].to_vec(),
                ..c
            });
            Ok(())
        }
    }

    pub(super) fn on_continuation(&mut self, head: Head, payload: &[u8]) -> Result<(), Error> {
        let Some(c) = self.continuation.as_mut() else {
            return Err(Error::Connection(
                Code::Protocol,
                "CONTINUATION without HEADERS",
            ));
        };
        c.block.extend_from_slice(payload);
        c.frames += 1;
        if c.block.len() > 2 * self.config.limits.list_size + 4096 || c.frames > MAX_CONTINUATIONS {
            return Err(Error::Connection(
                Code::EnhanceYourCalm,
                "a field block far past the limit",
            ));
        }
        if head.has(flag::END_HEADERS) {
            let mut c = self.continuation.take().expect("checked above");
            let block = std::mem::take(&mut c.block);
            return self.on_block(c, &block);
        }
        Ok(())
    }

    /// Whether frames on `id`, a stream with no state here, are dropped: one this side reset
    /// lately (the client sent them before it saw the reset), or one opened past the last
    /// stream a GOAWAY named.
    fn ignored(&self, id: u32) -> bool {
        self.reset_lately.contains(&id)
            || self.goaway.is_some_and(|last| id > last)
            || self.client_goaway
    }

    /// Counts a request the client cancelled before its answer: one opened and reset again
    /// and again costs the instances work and the client nothing ("rapid reset"), so more
    /// than [`MAX_CANCELS_PER_SECOND`] in a second end the connection.
    fn cancelled(&mut self) -> Result<(), Error> {
        let now = std::time::Instant::now();
        match self.cancels {
            Some((since, n)) if now.duration_since(since) < std::time::Duration::from_secs(1) => {
                if n + 1 > MAX_CANCELS_PER_SECOND {
                    return Err(Error::Connection(
                        Code::EnhanceYourCalm,
                        "too many requests cancelled at once",
                    ));
                }
                self.cancels = Some((since, n + 1));
            }
            _ => self.cancels = Some((now, 1)),
        }
        Ok(())
    }

    /// A whole field block: a request's head, or its trailers.
    pub(super) fn on_block(&mut self, c: Continuation, block: &[u8]) -> Result<(), Error> {
        let id = c.stream;
        let limits = self.config.limits;
        if let Some(s) = self.streams.get(&id) {
            let trailers = hpack::decode_trailers(&mut self.decoder, block, limits);
            if trailers == Err(Refused::Compression) {
                return Err(refused(id, Refused::Compression));
            }
            if s.remote_closed {
                return Err(Error::Stream(
                    id,
                    Code::StreamClosed,
                    "HEADERS after END_STREAM",
                ));
            }
            let trailers = trailers.map_err(|e| refused(id, e))?;
            if !c.end_stream {
                return Err(Error::Stream(
                    id,
                    Code::Protocol,
                    "trailers without END_STREAM",
                ));
            }
            if let Some(recv) = &s.recv {
                recv.trailers(trailers);
            }
            return self.end_of_request(id);
        }
        if id <= self.last_stream {
            let decoded = hpack::decode_trailers(&mut self.decoder, block, limits);
            if decoded == Err(Refused::Compression) {
                return Err(Error::Connection(
                    Code::Compression,
                    "a field block HPACK cannot decode",
                ));
            }
            if self.ignored(id) {
                return Ok(());
            }
            return Err(Error::Connection(
                Code::StreamClosed,
                "HEADERS on a closed stream",
            ));
        }
        let decoded = hpack::decode_request(&mut self.decoder, block, limits);
        if let Err(Refused::Compression) = decoded {
            return Err(Error::Connection(
                Code::Compression,
                "a field block HPACK cannot decode",
            ));
        }
        self.last_stream = id;
        if self.goaway.is_some() || self.client_goaway {
            // Past the last stream a GOAWAY named: ignored, as is what follows on it (its
            // fields kept the table in step).
            return Ok(());
        }
        if c.self_dependent {
            return Err(Error::Stream(
                id,
                Code::Protocol,
                "a stream depending on itself",
            ));
        }
        if self.streams.len() >= self.config.max_concurrent_streams as usize {
            return Err(Error::Stream(
                id,
                Code::RefusedStream,
                "too many streams at once",
            ));
        }
        let (abort, registration) = AbortHandle::new_pair();
        let mut stream = Stream {
            recv: None,
            remote_closed: c.end_stream,
            recv_window: i64::from(self.config.stream_window),
            owed: 0,
            content_length: None,
            received: 0,
            send_window: self.peer_window,
            head: false,
            response: Sending::Waiting,
            abort,
        };
        let answer: Answer = match decoded {
            Ok(head) => {
                if c.end_stream && head.content_length.is_some_and(|l| l > 0) {
                    return Err(Error::Stream(
                        id,
                        Code::Protocol,
                        "content-length without DATA",
                    ));
                }
                stream.content_length = head.content_length;
                stream.head = head.method == Method::HEAD;
                let body = if c.end_stream {
                    ClientBody::Empty
                } else {
                    let expect = head
                        .headers
                        .get(http::header::EXPECT)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                    let recv = Recv::new(self.waker.clone(), expect);
                    stream.recv = Some(recv.clone());
                    ClientBody::H2(RecvBody::new(recv, head.content_length))
                };
                let mut request = Request::new(body);
                *request.method_mut() = head.method;
                *request.uri_mut() = head.uri;
                *request.version_mut() = Version::HTTP_2;
                *request.headers_mut() = head.headers;
                (self.service)(request)
            }
            Err(Refused::TooLarge) => {
                let response = crate::forward::plain(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "431 request header fields too large",
                );
                Box::pin(std::future::ready(response))
            }
            Err(Refused::Malformed(why)) => return Err(Error::Stream(id, Code::Protocol, why)),
            Err(Refused::Compression) => unreachable!("handled above"),
        };
        self.streams.insert(id, stream);
        self.answers
            .push(Abortable::new(Tagged { id, answer }, registration));
        Ok(())
    }

    /// Resets a stream of ours (RST_STREAM) and forgets it. A stream still waiting for its
    /// answer counts as a cancelled request (see [`Connection::cancelled`]): a client whose
    /// errors make this side reset stream after stream costs the instances as much as one
    /// that resets them itself.
    pub(super) fn reset(&mut self, id: u32, code: Code, why: &'static str) -> Result<(), Error> {
        tracing::debug!(stream = id, code = ?code, "HTTP/2 stream reset: {why}");
        frame::put_rst(&mut self.wbuf, id, code);
        if self.reset_lately.len() == RESET_MEMORY {
            self.reset_lately.pop_front();
        }
        self.reset_lately.push_back(id);
        if let Some(s) = self.streams.remove(&id) {
            let unanswered = matches!(s.response, Sending::Waiting);
            self.forget(s);
            if unanswered {
                return self.cancelled();
            }
        }
        Ok(())
    }

    /// Every stream leaves through here. Its request body, if the client has sent all of it,
    /// may still be read after the stream is gone (an answer can come before the upload is
    /// sent on): it is kept, and its credit collected, until read or dropped. A body not
    /// whole fails; what it held, read or not, is credit given back.
    pub(super) fn forget(&mut self, mut s: Stream) {
        let Some(recv) = s.recv.take() else { return };
        if s.remote_closed && recv.read() {
            self.detached.push(recv);
        } else {
            self.owed += recv.reset("the request's stream was reset or its connection closed");
            self.owed += recv.collect().0;
        }
    }

    /// Gives read bytes back as WINDOW_UPDATE (a stream's when half its window is owed, the
    /// connection's likewise), sends the 100s bodies asked for, and stops with
    /// RST_STREAM(NO_ERROR) the uploads of answered streams whose bodies nobody reads.
    pub(super) fn give_credit(&mut self) -> bool {
        let mut progress = false;
        let mut unwanted = Vec::new();
        for (&id, s) in self.streams.iter_mut() {
            let Some(recv) = &s.recv else { continue };
            if matches!(s.response, Sending::Done) && !s.remote_closed && !recv.read() {
                // Answered, and the rest of the upload is not wanted any more.
                unwanted.push(id);
            }
            let (read, wants_continue) = recv.collect();
            if wants_continue && matches!(s.response, Sending::Waiting) && !s.remote_closed {
                self.scratch.clear();
                self.encoder.response(
                    StatusCode::CONTINUE,
                    &http::HeaderMap::new(),
                    &mut self.scratch,
                );
                frame::put_headers(
                    &mut self.wbuf,
                    id,
                    &self.scratch,
                    false,
                    self.peer_max_frame,
                );
                progress = true;
            }
            s.owed += read;
            self.owed += read;
            if !s.remote_closed && s.owed >= self.config.stream_window as usize / 2 {
                frame::put_window_update(&mut self.wbuf, id, s.owed as u32);
                s.recv_window += s.owed as i64;
                s.owed = 0;
                progress = true;
            }
        }
        // Bodies whose streams are gone, still being read.
        for recv in &self.detached {
            self.owed += recv.collect().0;
        }
        self.detached.retain(|r| r.read() && !r.drained());
        for id in unwanted {
            // Only answered streams: no cancel is counted, and no error comes back.
            let _ = self.reset(id, Code::NoError, "response sent; request body unread");
            progress = true;
        }
        if self.owed >= self.config.conn_window as usize / 2 {
            frame::put_window_update(&mut self.wbuf, 0, self.owed as u32);
            self.recv_window += self.owed as i64;
            self.owed = 0;
            progress = true;
        }
        progress
    }
}

fn refused(id: u32, e: Refused) -> Error {
    match e {
        Refused::Compression => {
            Error::Connection(Code::Compression, "a field block HPACK cannot decode")
        }
        Refused::Malformed(why) => Error::Stream(id, Code::Protocol, why),
        Refused::TooLarge => Error::Stream(id, Code::Protocol, "trailers larger than the limits"),
    }
}
