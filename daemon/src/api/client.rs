//! The CLI's side of the admin API: one HTTP/1.1 exchange per call over the daemon's Unix
//! socket, errors decoded back into [`ApiError`]s, and JSON-line streams read as they come.

use std::io;
use std::path::{Path, PathBuf};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::error::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no lull daemon answers on {socket}: start one with `lull daemon` (or `systemctl start lull`)"
    )]
    NotRunning { socket: PathBuf, source: io::Error },
    #[error(
        "permission denied on {socket}: run as root or as a member of the socket's group (lull)"
    )]
    PermissionDenied { socket: PathBuf },
    #[error("connect to {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    /// The daemon answered with an error.
    #[error("{0}")]
    Api(ApiError),
    #[error("the daemon's answer was not understood: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The API's error code, when the daemon answered with one.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// A client of one daemon's admin socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// Sends `body` (if any) as JSON and decodes the JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body, None).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("read the answer: {e}")))?
            .to_bytes();
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("decode the answer: {e}")))
    }

    /// Like [`Client::call`], for an answer of JSON lines (progress, logs, events): each
    /// line is decoded and returned by [`Lines::next`] as it arrives.
    pub async fn stream<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Lines, ClientError> {
        let resp = self.send(method, path, body, None).await?;
        Ok(Lines {
            body: resp.into_body(),
            buf: BytesMut::new(),
            done: false,
        })
    }

    /// Sends `body` as JSON asking for an HTTP/1.1 upgrade to `protocol`; on
    /// `101 Switching Protocols` returns the connection, raw bytes both ways. An error answer
    /// is decoded like any other.
    pub async fn upgrade<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
        protocol: &str,
    ) -> Result<super::Upgraded, ClientError> {
        let resp = self.send(method, path, Some(body), Some(protocol)).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(ClientError::Protocol(format!(
                "expected 101 Switching Protocols to {protocol}, got {}",
                resp.status()
            )));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Protocol(format!("upgrade to {protocol}: {e}")))?;
        Ok(TokioIo::new(upgraded))
    }

    /// Streams `file` as the body of a `POST` (`content_type`: a tar or gzip tar), without
    /// holding it in memory, and decodes the JSON answer.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        mut file: tokio::fs::File,
    ) -> Result<T, ClientError> {
        use tokio::io::AsyncReadExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(4);
        tokio::spawn(async move {
            loop {
                let mut buf = BytesMut::with_capacity(256 << 10);
                match file.read_buf(&mut buf).await {
                    Ok(0) => return,
                    Ok(_) => {
                        if tx.send(Ok(Frame::data(buf.freeze()))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        let body = StreamBody::new(tokio_stream_of(rx)).boxed();
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, "lull")
            .header(header::CONTENT_TYPE, content_type)
            .body(body)
            .map_err(|e| ClientError::Protocol(format!("build the request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(format!("send the upload: {e}")))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("read the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(decode_error(status, &bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("decode the answer: {e}")))
    }

    /// A connection to the daemon's socket, ready for requests of body type `B`.
    async fn connect<B>(&self) -> Result<hyper::client::conn::http1::SendRequest<B>, ClientError>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        ClientError::NotRunning {
                            socket: self.socket.clone(),
                            source,
                        }
                    }
                    io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                        socket: self.socket.clone(),
                    },
                    _ => ClientError::Connect {
                        socket: self.socket.clone(),
                        source,
                    },
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("admin socket connection: {e}");
            }
        });
        Ok(sender)
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        upgrade: Option<&str>,
    ) -> Result<http::Response<Incoming>, ClientError> {
        let mut sender = self.connect().await?;
        let payload = match body {
            Some(b) => Bytes::from(
                serde_json::to_vec(b)
                    .map_err(|e| ClientError::Protocol(format!("encode the request: {e}")))?,
            ),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "lull");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(protocol) = upgrade {
            req = req
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, protocol);
        }
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::Protocol(format!("build the request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(format!("send the request: {e}")))?;
        if resp.status().is_success()
            || (upgrade.is_some() && resp.status() == StatusCode::SWITCHING_PROTOCOLS)
        {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("read the error: {e}")))?
            .to_bytes();
        Err(decode_error(status, &bytes))
    }
}

/// The receiving end of a channel as a stream of frames.
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

fn decode_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    #[derive(serde::Deserialize)]
    struct Wire {
        error: ApiError,
    }
    match serde_json::from_slice::<Wire>(bytes) {
        Ok(w) => ClientError::Api(w.error),
        Err(_) => ClientError::Protocol(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(bytes).trim()
        )),
    }
}

/// A stream of JSON lines from the daemon.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl Lines {
    /// The next value, or `None` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<serde_json::Value>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("decode a streamed line: {e}")));
            }
            if self.done {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                let rest = self.buf.split();
                return serde_json::from_slice(&rest)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("decode a streamed line: {e}")));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => {
                    return Err(ClientError::Protocol(format!("read the stream: {e}")));
                }
                None => self.done = true,
            }
        }
    }
}
