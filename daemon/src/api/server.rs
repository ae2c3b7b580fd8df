//! The admin API's socket: HTTP/1.1 over a Unix socket, mode 0660, owned by root and the
//! `lull` group when that group exists (so its members can drive lull without sudo).

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::error::{ApiError, ErrorCode};
use super::router::{ApiRequest, Reply, Router, parse_query};

/// Request bodies larger than this are refused (413): service definitions are small.
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another lull daemon is already listening on {path}")]
    InUse { path: PathBuf },
    #[error("create the directory of {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("bind {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("set the mode of {path}: {source}")]
    Mode { path: PathBuf, source: io::Error },
    #[error("give {path} to group {group}: {source}")]
    Group {
        path: PathBuf,
        group: String,
        source: nix::Error,
    },
    #[error("inherited admin socket is bound to {found}, not {path}")]
    InheritedPath { path: PathBuf, found: String },
    #[error("inherited admin socket {path}: {source}")]
    Inherited { path: PathBuf, source: io::Error },
}

/// Where and how the socket is made.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    pub path: PathBuf,
    pub mode: u32,
    /// Given the socket when it exists on this host; ignored otherwise.
    pub group: Option<String>,
}

impl SocketOptions {
    pub fn new(path: impl Into<PathBuf>) -> SocketOptions {
        SocketOptions {
            path: path.into(),
            mode: 0o660,
            group: Some("lull".to_owned()),
        }
    }
}

/// Binds the socket. A socket file nobody answers on (a daemon that died) is replaced; one
/// that answers means another daemon runs, which is an error.
pub fn bind(options: &SocketOptions) -> Result<UnixListener, SocketError> {
    let path = &options.path;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
            path: path.clone(),
            source,
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse { path: path.clone() });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.clone(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode)).map_err(
        |source| SocketError::Mode {
            path: path.clone(),
            source,
        },
    )?;
    if let Some(group) = &options.group {
        give_to_group(path, group)?;
    }
    Ok(listener)
}

/// Serves an admin socket bound by a previous daemon (passed at exec, by a daemon replacing
/// itself or from systemd's fd store) instead of binding one: it must be bound to
/// `options.path`. The socket keeps its file, mode and group. `listen` is called again so
/// that `SO_PEERCRED` names this process to clients from now on (`lull daemon upgrade`
/// finds the daemon's pid that way).
pub fn adopt(
    listener: std::os::unix::net::UnixListener,
    options: &SocketOptions,
) -> Result<UnixListener, SocketError> {
    use std::os::fd::AsRawFd;
    let path = &options.path;
    let inherited = |source| SocketError::Inherited {
        path: path.clone(),
        source,
    };
    let local = listener.local_addr().map_err(inherited)?;
    if local.as_pathname() != Some(path.as_path()) {
        return Err(SocketError::InheritedPath {
            path: path.clone(),
            found: match local.as_pathname() {
                Some(p) => p.display().to_string(),
                None => "an unnamed or abstract address".to_owned(),
            },
        });
    }
    // SAFETY: listen(2) on a socket this function owns; it changes nothing but the backlog
    // and the credentials connecting clients see.
    if unsafe { libc::listen(listener.as_raw_fd(), 128) } != 0 {
        return Err(inherited(io::Error::last_os_error()));
    }
    listener.set_nonblocking(true).map_err(inherited)?;
    UnixListener::from_std(listener).map_err(inherited)
}

fn give_to_group(path: &Path, group: &str) -> Result<(), SocketError> {
    let found = nix::unistd::Group::from_name(group).map_err(|source| SocketError::Group {
        path: path.to_owned(),
        group: group.to_owned(),
        source,
    })?;
    let Some(found) = found else {
        tracing::debug!(group, "no such group: the socket stays root's only");
        return Ok(());
    };
    nix::unistd::chown(path, None, Some(found.gid)).map_err(|source| SocketError::Group {
        path: path.to_owned(),
        group: group.to_owned(),
        source,
    })
}

type ApiBody = BoxBody<Bytes, Infallible>;

/// Serves `router` on `listener` until `shutdown` turns true; connections in progress end
/// with their current request.
pub async fn serve<S: Send + Sync + 'static>(
    listener: UnixListener,
    router: Arc<Router<S>>,
    state: Arc<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("admin socket accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let router = router.clone();
        let state = state.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let router = router.clone();
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(router, state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!("admin connection: {e}");
                },
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn handle<S: Send + Sync + 'static>(
    router: Arc<Router<S>>,
    state: Arc<S>,
    mut req: Request<Incoming>,
) -> Response<ApiBody> {
    // Taken before the request is consumed; only used when the handler answers an upgrade.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let (body, stream) = if super::router::is_streamed(&parts.headers) {
        (Bytes::new(), Some(body))
    } else {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => (collected.to_bytes(), None),
            Err(e) => {
                let err = if e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!("the body is larger than {MAX_BODY} bytes"),
                    )
                } else {
                    ApiError::new(ErrorCode::InvalidRequest, format!("read the body: {e}"))
                };
                return error_response(&err);
            }
        }
    };
    let api_req = ApiRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        params: Default::default(),
        query: parse_query(parts.uri.query().unwrap_or("")),
        headers: parts.headers,
        body,
        stream,
    };
    let method = api_req.method.clone();
    let path = api_req.path.clone();
    // In a task of its own: a client that goes away (Ctrl-C) must not cancel a change halfway
    // (a delete between the engine and the store, say).
    let dispatched = tokio::spawn(async move { router.dispatch(state, api_req).await }).await;
    let dispatched = dispatched.unwrap_or_else(|e| {
        Err(ApiError::internal(format!(
            "the request's handler failed: {e}"
        )))
    });
    match dispatched {
        Ok(Reply::Upgrade { protocol, handler }) => {
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) => handler(TokioIo::new(upgraded)).await,
                    Err(e) => tracing::debug!(%path, "admin API upgrade: {e}"),
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, protocol)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
        }
        Ok(reply) => reply_response(reply),
        Err(err) => {
            if err.code == ErrorCode::Internal {
                tracing::error!(%method, %path, "admin API: {}", err.message);
            }
            error_response(&err)
        }
    }
}

fn reply_response(reply: Reply) -> Response<ApiBody> {
    match reply {
        // Handled where the connection's upgrade is at hand (see `handle`).
        Reply::Upgrade { .. } => error_response(&ApiError::internal("an upgrade out of place")),
        Reply::Json(status, value) => json_response(status, &value),
        Reply::Text(status, content_type, text) => Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(text)).boxed())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())),
        Reply::Lines(rx) => {
            let stream = tokio_stream_from(rx).map(|value| {
                let mut line = serde_json::to_vec(&value).unwrap_or_default();
                line.push(b'\n');
                Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
            });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
        }
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<serde_json::Value>,
) -> impl futures_util::Stream<Item = serde_json::Value> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ApiBody> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error_response(err: &ApiError) -> Response<ApiBody> {
    json_response(err.status(), &err.to_body())
}
