//! The sending side of a connection: response heads, and bodies as the client's windows
//! allow, each stream in turn.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, DATE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Answer, Connection, HIGH_WATER, Sending};
use crate::forward::{ClientBody, ProxyBody};
use crate::h2::frame::{self, Code};

impl<IO, S> Connection<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<ClientBody>) -> Answer + Unpin,
{
    /// The service's answer on stream `id`: its head goes out, and its body after it.
    pub(super) fn respond(&mut self, id: u32, response: Response<ProxyBody>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let (mut parts, body) = response.into_parts();
        if !parts.headers.contains_key(DATE) {
            // The fast path's value, formatted once a second per thread; always valid.
            if let Ok(date) = HeaderValue::from_maybe_shared(crate::fast::http_date()) {
                parts.headers.insert(DATE, date);
            }
        }
        let status = parts.status;
        if !s.head
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::NOT_MODIFIED
            && !parts.headers.contains_key(CONTENT_LENGTH)
            && let Some(n) = body.size_hint().exact()
        {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        let end = body.is_end_stream();
        self.scratch.clear();
        self.encoder
            .response(status, &parts.headers, &mut self.scratch);
        frame::put_headers(&mut self.wbuf, id, &self.scratch, end, self.peer_max_frame);
        if end {
            // Dropped first: it may hold the request body, whose reader decides whether the
            // rest of the upload is wanted.
            drop(body);
            self.sent_all(id);
        } else {
            s.response = Sending::Body {
                body,
                data: Bytes::new(),
                last: false,
            };
            self.sending.push_back(id);
        }
    }

    /// The whole response went out on `id`.
    pub(super) fn sent_all(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.response = Sending::Done;
        // A client still sending a body nobody reads is stopped by `give_credit`.
        if s.remote_closed
            && let Some(s) = self.streams.remove(&id)
        {
            self.forget(s);
        }
    }

    /// Sends what the bodies have, as the windows allow, each stream in turn.
    pub(super) fn send_bodies(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        for _ in 0..self.sending.len() {
            if self.wbuf.len() >= HIGH_WATER {
                break;
            }
            let Some(id) = self.sending.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let Sending::Body { body, data, last } = &mut s.response else {
                continue;
            };
            let mut finished = None;
            loop {
                if !data.is_empty() || *last {
                    let window = s.send_window.min(self.send_window).max(0) as usize;
                    let n = data.len().min(window).min(self.peer_max_frame);
                    if n == 0 && !data.is_empty() {
                        break;
                    }
                    let chunk = data.split_to(n);
                    let end = *last && data.is_empty();
                    frame::put_data(&mut self.wbuf, id, &chunk, end);
                    s.send_window -= n as i64;
                    self.send_window -= n as i64;
                    progress = true;
                    if end {
                        finished = Some(None);
                        break;
                    }
                    if self.wbuf.len() >= HIGH_WATER {
                        break;
                    }
                    continue;
                }
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => match f.into_data() {
                        Ok(d) => {
                            *data = d;
                            *last = body.is_end_stream();
                        }
                        Err(f) => {
                            if let Ok(trailers) = f.into_trailers() {
                                self.scratch.clear();
                                self.encoder.trailers(&trailers, &mut self.scratch);
                                frame::put_headers(
                                    &mut self.wbuf,
                                    id,
                                    &self.scratch,
                                    true,
                                    self.peer_max_frame,
                                );
                                progress = true;
                                finished = Some(None);
                                break;
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(stream = id, "response body failed: {e}");
                        finished = Some(Some(Code::Internal));
                        break;
                    }
                    Poll::Ready(None) => *last = true,
                    Poll::Pending => break,
                }
            }
            match finished {
                None => self.sending.push_back(id),
                Some(None) => self.sent_all(id),
                Some(Some(code)) => {
                    progress = true;
                    let _ = self.reset(id, code, "the response body failed");
                }
            }
        }
        progress
    }
}
