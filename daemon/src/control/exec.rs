//! `POST /v1/services/{name}/exec`: a command run inside one of a service's instances, its
//! input and output streamed over the admin socket (`lull exec`).
//!
//! The request is JSON, `{"command": ["sh", "-c", "..."], "instance": "ID", "tty": true,
//! "env": {"KEY": "VALUE"}, "cwd": "/app", "rows": 24, "cols": 80}` (only `command` is
//! required), sent with `Connection: upgrade` and `Upgrade: lull-exec`. Without `instance`, the
//! command runs in the first healthy instance of the revision serving traffic. Errors are the
//! API's usual JSON errors (400 naming the field, 404 for an unknown service or instance, 409
//! when the service has no running instance) and come before any upgrade. Once the command
//! runs, the answer is `101 Switching Protocols` and both directions carry frames:
//!
//! ```text
//! +------+----------------------+-------------------+
//! | kind | length (u32, big-end) | payload (length)  |
//! +------+----------------------+-------------------+
//! ```
//!
//! | kind | direction | payload |
//! |------|-----------|---------|
//! | 0 stdin | client to daemon | bytes for the command's stdin |
//! | 1 stdout | daemon to client | bytes the command wrote (on a tty: all its output) |
//! | 2 stderr | daemon to client | bytes the command wrote to stderr (never on a tty) |
//! | 3 resize | client to daemon | rows (u16, big-endian) then cols (u16, big-endian) |
//! | 4 stdin-eof | client to daemon | empty: the command's stdin ends (on a tty: `^D`) |
//! | 5 exit | daemon to client | JSON `{"code": 3}`, `{"signal": 9}` or `{}` (unknown); last frame |
//! | 6 error | daemon to client | UTF-8 message: the stream failed; last frame |
//!
//! A payload is at most [`MAX_FRAME`] bytes. The daemon sends `exit` once the command has
//! ended and its output is drained (output still open 2 s after the end is cut), then closes the
//! connection. A command that cannot be found or run ends with code 127 or 126. A client that
//! goes away closes the command's input and output: on a tty the command is hung up.
//!
//! While the stream is open the instance's CPU is held through its pool's gate
//! (`Pool::hold_cpu`): an idle instance is restored before the command starts and is neither
//! throttled nor frozen until the stream ends, whatever its requests do meanwhile.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Control, engine_error};
use crate::api::{ApiError, ApiRequest, ErrorCode, FieldError, Reply, Upgraded};
use crate::engine::{EngineError, InstanceState};
use crate::host::{ExecProcess, ExecRequest, ExitInfo, HostError};

/// The `Upgrade` protocol name of the exec stream.
pub const UPGRADE_PROTOCOL: &str = "lull-exec";
/// The largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// How long output is still forwarded after the command ended.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long the daemon waits for the client to close after the exit frame.
const CLIENT_CLOSE: Duration = Duration::from_secs(5);

/// What a frame carries (see the module's docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    Resize = 3,
    StdinEof = 4,
    Exit = 5,
    Error = 6,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<FrameKind> {
        Some(match b {
            0 => FrameKind::Stdin,
            1 => FrameKind::Stdout,
            2 => FrameKind::Stderr,
            3 => FrameKind::Resize,
            4 => FrameKind::StdinEof,
            5 => FrameKind::Exit,
            6 => FrameKind::Error,
            _ => return None,
        })
    }
}

/// One frame of the exec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("exec stream: unknown frame kind {0}")]
    Kind(u8),
    #[error("exec stream: a frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("exec stream: {0}")]
    Io(#[from] io::Error),
}

/// Reads one frame; `None` at a clean end of the stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; 5];
    let mut filled = 0;
    while filled < header.len() {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        filled += n;
    }
    let kind = FrameKind::from_byte(header[0]).ok_or(FrameError::Kind(header[0]))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind,
        payload: Bytes::from(payload),
    }))
}

/// Writes one frame (and flushes it).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a frame of {} bytes is larger than {MAX_FRAME}",
                payload.len()
            ),
        ));
    }
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind as u8);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame).await?;
    w.flush().await
}

/// A resize frame's payload.
pub fn resize_payload(rows: u16, cols: u16) -> [u8; 4] {
    let [r0, r1] = rows.to_be_bytes();
    let [c0, c1] = cols.to_be_bytes();
    [r0, r1, c0, c1]
}

/// `(rows, cols)` from a resize frame's payload.
pub fn parse_resize(payload: &[u8]) -> Option<(u16, u16)> {
    match payload {
        [r0, r1, c0, c1] => Some((
            u16::from_be_bytes([*r0, *r1]),
            u16::from_be_bytes([*c0, *c1]),
        )),
        _ => None,
    }
}

/// An exit frame's payload: how the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecExit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl From<ExitInfo> for ExecExit {
    fn from(e: ExitInfo) -> ExecExit {
        ExecExit {
            code: e.code,
            signal: e.signal,
        }
    }
}

/// The request's body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
}

impl ExecBody {
    /// The host's request, or every invalid field.
    fn to_request(&self) -> Result<ExecRequest, ApiError> {
        let mut fields = Vec::new();
        let mut bad = |field: String, message: &str| {
            fields.push(FieldError {
                field,
                message: message.to_owned(),
            })
        };
        match self.command.first() {
            None => bad("command".into(), "must name a command to run"),
            Some(c) if c.is_empty() => bad("command[0]".into(), "must not be empty"),
            Some(_) => {}
        }
        for (i, arg) in self.command.iter().enumerate() {
            if arg.contains('\0') {
                bad(format!("command[{i}]"), "must not contain a NUL byte");
            }
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                bad(
                    format!("env.{key}"),
                    "names must be non-empty, without '=' or NUL bytes",
                );
            }
        }
        if let Some(cwd) = &self.cwd
            && !cwd.starts_with('/')
        {
            bad("cwd".into(), "must be an absolute path");
        }
        for (name, value) in [("rows", self.rows), ("cols", self.cols)] {
            if value == Some(0) {
                bad(name.into(), "must be at least 1");
            }
        }
        if !fields.is_empty() {
            return Err(ApiError::invalid(fields));
        }
        Ok(ExecRequest {
            command: self.command.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cwd: self.cwd.clone(),
            tty: self
                .tty
                .then(|| (self.rows.unwrap_or(24), self.cols.unwrap_or(80))),
        })
    }
}

impl Control {
    /// The instance an exec runs in: `instance` if it is one of the service's, else the first
    /// healthy instance of the serving revision.
    pub async fn exec_target(
        &self,
        name: &str,
        instance: Option<&str>,
    ) -> Result<String, ApiError> {
        // An unknown service is a 404 with the usual message.
        self.get(name).await?;
        let no_instance = || {
            ApiError::new(
                ErrorCode::Conflict,
                format!("service {name} has no running instance; deploy it first"),
            )
        };
        let status = match self.engine.status(name).await {
            Ok(s) => s,
            Err(EngineError::UnknownService { .. }) => return Err(no_instance()),
            Err(e) => return Err(engine_error(e)),
        };
        if let Some(id) = instance {
            if status.instances.iter().any(|i| i.id == id) {
                return Ok(id.to_owned());
            }
            let ids: Vec<&str> = status.instances.iter().map(|i| i.id.as_str()).collect();
            return Err(ApiError::not_found(format!(
                "service {name} has no instance {id} (instances: {})",
                if ids.is_empty() {
                    "none".to_owned()
                } else {
                    ids.join(", ")
                }
            )));
        }
        if status.paused {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("service {name} is paused; resume it first (`lull service resume {name}`)"),
            ));
        }
        let healthy = |i: &&crate::engine::InstanceStatus| i.state == InstanceState::Healthy;
        status
            .instances
            .iter()
            .filter(healthy)
            .find(|i| Some(i.revision) == status.serving)
            .or_else(|| status.instances.iter().find(healthy))
            .map(|i| i.id.clone())
            .ok_or_else(no_instance)
    }
}

fn host_exec_error(e: HostError) -> ApiError {
    match e {
        HostError::NotFound { id } => {
            ApiError::not_found(format!("instance {id} is gone (it was stopped meanwhile)"))
        }
        HostError::Instance { .. } => ApiError::new(ErrorCode::Conflict, e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// `POST /v1/services/{name}/exec` (see the module's docs).
pub async fn exec(c: Arc<Control>, r: ApiRequest) -> Result<Reply, ApiError> {
    let body: ExecBody = r.json()?;
    let request = body.to_request()?;
    if !r.wants_upgrade(UPGRADE_PROTOCOL) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "this route streams over an HTTP/1.1 upgrade: send `Connection: upgrade` and `Upgrade: {UPGRADE_PROTOCOL}`"
            ),
        ));
    }
    let id = c
        .exec_target(r.param("name"), body.instance.as_deref())
        .await?;
    tracing::info!(service = r.param("name"), instance = %id, tty = body.tty, "exec");
    // The command runs with the instance's CPU: the gate neither throttles nor freezes it until
    // the stream ends (a request ending meanwhile leaves it alone too).
    let hold = match c.engine.hold_cpu(r.param("name"), &id).await {
        Ok(Some(hold)) if !hold.cpu_restored() => {
            // The host restores the CPU once more when it starts the command; the gate's
            // failure count (metrics) and its log line say why the first try failed.
            tracing::warn!(service = r.param("name"), instance = %id, "the gate could not restore the CPU for an exec");
            Some(hold)
        }
        Ok(hold) => hold,
        Err(e) => {
            tracing::warn!(service = r.param("name"), instance = %id, error = %e, "hold the CPU for an exec");
            None
        }
    };
    let process = c
        .engine
        .host()
        .exec(&id, request)
        .await
        .map_err(host_exec_error)?;
    Ok(Reply::Upgrade {
        protocol: UPGRADE_PROTOCOL,
        handler: Box::new(move |io| {
            Box::pin(async move {
                pump(io, process).await;
                drop(hold);
            })
        }),
    })
}

/// Forwards output as frames until `rx`'s senders are gone.
async fn copy_out<R: AsyncRead + Unpin>(
    mut reader: R,
    kind: FrameKind,
    tx: mpsc::Sender<(FrameKind, Bytes)>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send((kind, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Streams one exec over an upgraded connection.
pub async fn pump(io: Upgraded, process: ExecProcess) {
    let ExecProcess {
        stdin,
        stdout,
        stderr,
        resize,
        exit,
    } = process;
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<(FrameKind, Bytes)>(32);
    let writer = tokio::spawn(async move {
        while let Some((kind, payload)) = rx.recv().await {
            if write_frame(&mut to_client, kind, &payload).await.is_err() {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    });
    let mut outputs = vec![tokio::spawn(copy_out(
        stdout,
        FrameKind::Stdout,
        tx.clone(),
    ))];
    if let Some(stderr) = stderr {
        outputs.push(tokio::spawn(copy_out(
            stderr,
            FrameKind::Stderr,
            tx.clone(),
        )));
    }
    let tty = resize.is_some();
    let input = tokio::spawn(async move {
        let mut stdin = Some(stdin);
        loop {
            let frame = match read_frame(&mut from_client).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!("{e}");
                    return;
                }
            };
            match frame.kind {
                FrameKind::Stdin => {
                    if let Some(w) = stdin.as_mut()
                        && w.write_all(&frame.payload).await.is_err()
                    {
                        stdin = None;
                    }
                }
                FrameKind::StdinEof if tty => {
                    // The terminal's end-of-file character (VEOF, ^D in the default settings).
                    if let Some(w) = stdin.as_mut() {
                        let _ = w.write_all(&[4]).await;
                    }
                }
                FrameKind::StdinEof => stdin = None,
                FrameKind::Resize => {
                    if let (Some(resize), Some((rows, cols))) =
                        (&resize, parse_resize(&frame.payload))
                        && let Err(e) = resize(rows, cols)
                    {
                        tracing::debug!("exec resize: {e}");
                    }
                }
                FrameKind::Stdout | FrameKind::Stderr | FrameKind::Exit | FrameKind::Error => {}
            }
        }
    });
    let ended = exit.await;
    let drained = tokio::time::timeout(DRAIN_AFTER_EXIT, async {
        for output in &mut outputs {
            let _ = output.await;
        }
    })
    .await;
    if drained.is_err() {
        for output in &outputs {
            output.abort();
        }
    }
    let last = match ended {
        Ok(info) => (
            FrameKind::Exit,
            Bytes::from(serde_json::to_vec(&ExecExit::from(info)).unwrap_or_default()),
        ),
        Err(e) => (FrameKind::Error, Bytes::from(e.to_string())),
    };
    let _ = tx.send(last).await;
    drop(tx);
    let _ = writer.await;
    // Closing a Unix socket with unread input resets it, and the client could lose the frames
    // it has not read yet: let the client close first (it does after the exit frame), reading
    // what it still sends meanwhile.
    let abort = input.abort_handle();
    if tokio::time::timeout(CLIENT_CLOSE, input).await.is_err() {
        abort.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, FrameKind::Stdin, b"hello")
            .await
            .unwrap();
        write_frame(&mut a, FrameKind::Resize, &resize_payload(50, 132))
            .await
            .unwrap();
        write_frame(&mut a, FrameKind::StdinEof, b"").await.unwrap();
        drop(a);
        let f = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((f.kind, &f.payload[..]), (FrameKind::Stdin, &b"hello"[..]));
        let f = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Resize);
        assert_eq!(parse_resize(&f.payload), Some((50, 132)));
        let f = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((f.kind, f.payload.len()), (FrameKind::StdinEof, 0));
        assert!(read_frame(&mut b).await.unwrap().is_none());

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[9, 0, 0, 0, 0]).await.unwrap();
        assert!(matches!(read_frame(&mut b).await, Err(FrameError::Kind(9))));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[1, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(
            read_frame(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[1, 0, 0]).await.unwrap();
        drop(a);
        assert!(
            read_frame(&mut b).await.is_err(),
            "a torn header is an error"
        );
        assert_eq!(parse_resize(&[1, 2, 3]), None);
    }

    #[test]
    fn bodies_are_checked_field_by_field() {
        let err = ExecBody::default().to_request().unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert_eq!(err.fields[0].field, "command");
        let body = ExecBody {
            command: vec![String::new()],
            env: BTreeMap::from([("A=B".to_owned(), "x".to_owned())]),
            cwd: Some("rel".into()),
            rows: Some(0),
            ..ExecBody::default()
        };
        let err = body.to_request().unwrap_err();
        let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, vec!["command[0]", "env.A=B", "cwd", "rows"]);
        let body = ExecBody {
            command: vec!["ls".into()],
            tty: true,
            cols: Some(100),
            ..ExecBody::default()
        };
        assert_eq!(body.to_request().unwrap().tty, Some((24, 100)));
    }
}
