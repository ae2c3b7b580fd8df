//! The client commands: `lull service ...`, `lull deploy`, `lull rollback`, `lull revisions`,
//! `lull events` and `lull status` talk to a running daemon over its admin socket
//! (`--socket`, default `/run/lull/lull.sock`). Human tables by default; `--json` prints the
//! API's JSON instead (JSON lines for streams: progress, events).
//!
//! Exit codes, for scripts (also in `lull --help`):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | done |
//! | 1 | the operation ran and failed (e.g. a deploy whose instance did not become healthy) |
//! | 2 | usage error or invalid input (the API's `invalid_request`/`invalid_json`), one line per field |
//! | 3 | not found (service, revision, operation) |
//! | 4 | conflict: already exists, busy with another operation, or not in the right state |
//! | 5 | the daemon is not running or cannot be reached (permission, socket) |
//! | 6 | anything else (daemon internal error, unexpected answer) |

pub mod deploy;
pub mod domain;
pub mod events;
pub mod exec;
pub mod image;
pub mod logs;
pub mod revisions;
pub mod service;
pub mod status;

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use lull_daemon::api::{ApiError, Client, ClientError, ErrorCode};
use serde_json::Value;

/// Where the daemon listens unless `--socket` or `LULL_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lull/lull.sock";

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes of the client commands (service, deploy, rollback, revisions, events, status):
  0  done
  1  the operation ran and failed (e.g. a deploy that did not become healthy)
  2  usage error or invalid input (each invalid field on its own line)
  3  not found (service, revision, operation)
  4  conflict: already exists, busy with another operation, or in the wrong state
  5  the daemon is not running or cannot be reached
  6  anything else";

/// Exit codes that scripts can rely on (see the module's docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    OperationFailed = 1,
    Usage = 2,
    NotFound = 3,
    Conflict = 4,
    Unreachable = 5,
    Other = 6,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// The options every client command takes.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The daemon's admin socket.
    #[arg(long, global = true, env = "LULL_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the API's JSON instead of tables (JSON lines for progress and events).
    #[arg(long, global = true)]
    pub json: bool,
}

/// Why a client command did not succeed; [`finish`] prints it and picks the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Bad input caught before anything was sent.
    #[error("{0}")]
    Usage(String),
    /// The operation ran and failed.
    #[error("{0}")]
    Operation(String),
    #[error("{0}")]
    Other(String),
}

impl Failure {
    pub fn exit(&self) -> Exit {
        match self {
            Failure::Usage(_) => Exit::Usage,
            Failure::Operation(_) => Exit::OperationFailed,
            Failure::Other(_) => Exit::Other,
            Failure::Client(e) => match e {
                ClientError::NotRunning { .. }
                | ClientError::PermissionDenied { .. }
                | ClientError::Connect { .. } => Exit::Unreachable,
                ClientError::Api(api) => api_exit(api.code),
                ClientError::Protocol(_) => Exit::Other,
            },
        }
    }
}

fn api_exit(code: ErrorCode) -> Exit {
    match code {
        ErrorCode::InvalidRequest
        | ErrorCode::InvalidJson
        | ErrorCode::PayloadTooLarge
        | ErrorCode::UnsupportedMediaType => Exit::Usage,
        ErrorCode::NotFound => Exit::NotFound,
        ErrorCode::AlreadyExists | ErrorCode::Conflict | ErrorCode::Busy => Exit::Conflict,
        ErrorCode::MethodNotAllowed | ErrorCode::Unavailable | ErrorCode::Internal => Exit::Other,
    }
}

pub type Outcome = Result<Exit, Failure>;

/// Prints a failure (on stderr) and turns the outcome into the process's exit code.
pub fn finish(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(exit) => exit.into(),
        Err(failure) => {
            eprintln!("{}", describe(&failure));
            failure.exit().into()
        }
    }
}

/// The human text of a failure: what was wrong and, where there is one, what to do.
pub fn describe(failure: &Failure) -> String {
    let Failure::Client(ClientError::Api(api)) = failure else {
        return format!("lull: {failure}");
    };
    describe_api(api)
}

fn describe_api(api: &ApiError) -> String {
    match api.code {
        ErrorCode::InvalidRequest | ErrorCode::InvalidJson if !api.fields.is_empty() => {
            let mut out = String::from("lull: invalid input:");
            for field in &api.fields {
                out.push_str(&format!("\n  {}: {}", field.field, field.message));
            }
            out
        }
        ErrorCode::NotFound if api.message.contains("service") => format!(
            "lull: {}\n  (`lull service list` shows the services there are)",
            api.message
        ),
        ErrorCode::NotFound if api.message.starts_with("revision") => format!(
            "lull: {}\n  (`lull revisions SERVICE` lists a service's revisions)",
            api.message
        ),
        ErrorCode::Internal => format!(
            "lull: the daemon failed: {}\n  (its log has the details)",
            api.message
        ),
        _ => format!("lull: {}", api.message),
    }
}

/// A connection to the daemon and how to print answers.
pub struct Ctx {
    pub client: Client,
    pub json: bool,
}

impl Ctx {
    pub fn new(args: &ClientArgs) -> Ctx {
        Ctx {
            client: Client::new(&args.socket),
            json: args.json,
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        Ok(self.client.get(path).await?)
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        Ok(self.client.call(method, path, body).await?)
    }

    /// `GET path` answered with text (not JSON), e.g. an export's YAML.
    pub async fn get_text(&self, path: &str) -> Result<String, Failure> {
        Ok(get_text(&self.client, path).await?)
    }

    /// After a call that may have started an operation (`started` is the API's answer with an
    /// `operation` field): follows it to its end, printing progress as it comes, then the URLs
    /// on success or the cause and last log lines on failure. `wait: false` only says what
    /// started.
    pub async fn follow_started(&self, started: &Value, wait: bool) -> Outcome {
        let service = started["service"]
            .as_str()
            .unwrap_or("the service")
            .to_owned();
        let Some(operation) = started["operation"].as_str() else {
            if self.json {
                print_json_line(started);
            } else {
                let note = started["note"].as_str().unwrap_or("no operation started");
                println!("{service}: {note}");
            }
            return Ok(Exit::Ok);
        };
        if self.json {
            print_json_line(started);
        } else {
            if let Some(note) = started["note"].as_str() {
                println!("{service}: {note}");
            }
            match (started["revision"].as_u64(), started["build"].as_str()) {
                (Some(revision), _) => {
                    println!("{service}: deploying revision {revision} (operation {operation})")
                }
                (None, Some(_)) => {
                    println!("{service}: building, then deploying (operation {operation})")
                }
                (None, None) => println!("{service}: deploying (operation {operation})"),
            }
        }
        if !wait {
            if !self.json {
                println!("not waiting: `lull events {service} -f` shows how it goes");
            }
            return Ok(Exit::Ok);
        }
        self.follow(&service, operation).await
    }

    /// Follows operation `id` of `service` to its end.
    pub async fn follow(&self, service: &str, id: &str) -> Outcome {
        let path = format!("/v1/operations/{}/progress", segment(id));
        let mut lines = self.client.stream(Method::GET, &path, None::<&()>).await?;
        while let Some(value) = lines.next().await? {
            if self.json {
                print_json_line(&value);
            }
            if let Some(line) = value.get("line") {
                if !self.json {
                    let now = chrono::Utc::now().format("%H:%M:%S%.3fZ");
                    let text = line.as_str().unwrap_or_default();
                    // A line of several (a failure with its logs) stays in the column.
                    println!("  {now}  {}", text.replace('\n', "\n                   "));
                }
            } else if let Some(end) = value.get("end") {
                return self.ended(service, end).await;
            } else if let Some(error) = value.get("error") {
                return Err(stream_error(error));
            }
        }
        Err(Failure::Other(format!(
            "the progress of operation {id} ended before the operation did; \
             `lull events {service}` shows what happened"
        )))
    }

    async fn ended(&self, service: &str, end: &Value) -> Outcome {
        let state = end["state"].as_str().unwrap_or("unknown");
        match state {
            "succeeded" => {
                if self.json {
                    return Ok(Exit::Ok);
                }
                let revision = end["revision"]
                    .as_u64()
                    .map(|r| format!(" revision {r}"))
                    .unwrap_or_default();
                let took = end["took_ms"]
                    .as_u64()
                    .map(|ms| format!(" (in {ms} ms)"))
                    .unwrap_or_default();
                println!("{service}{revision} is serving{took}");
                // The URLs: a failure to read them does not undo the deploy.
                if let Ok(view) = self.get(&service_path(service)).await {
                    for url in view["urls"].as_array().into_iter().flatten() {
                        println!("  {}", url.as_str().unwrap_or_default());
                    }
                }
                Ok(Exit::Ok)
            }
            "failed" => {
                let message = end["message"]
                    .as_str()
                    .or_else(|| end["cause"].as_str())
                    .unwrap_or("no reason given");
                let mut text = match message.split_once("; last log lines:\n") {
                    Some((cause, logs)) => format!(
                        "deploy of {service} failed: {cause}\nlast log lines:\n  {}",
                        logs.replace('\n', "\n  ")
                    ),
                    None => format!("deploy of {service} failed: {message}"),
                };
                // The message carries the last log lines; older daemons may not.
                if !message.contains("last log lines")
                    && let Some(logs) = end["logs"].as_array().filter(|l| !l.is_empty())
                {
                    text.push_str("\nlast log lines:");
                    for line in logs {
                        text.push_str(&format!("\n  {}", line.as_str().unwrap_or_default()));
                    }
                }
                text.push_str(&format!(
                    "\nwhat served before keeps serving; fix it with `lull service update {service} ...` \
                     or go back with `lull rollback {service}` (`lull events {service}` has the history)"
                ));
                Err(Failure::Operation(text))
            }
            "build_failed" => {
                let message = end["message"].as_str().unwrap_or("no reason given");
                Err(Failure::Operation(format!(
                    "{message}\nwhat served before keeps serving (`lull events {service}` has the history)"
                )))
            }
            _ => {
                let message = end["message"].as_str().unwrap_or(state);
                Err(Failure::Operation(format!(
                    "the operation on {service} did not finish: {message}"
                )))
            }
        }
    }
}

/// An `{"error": ...}` line inside a stream.
fn stream_error(error: &Value) -> Failure {
    match serde_json::from_value::<ApiError>(error.clone()) {
        Ok(api) => Failure::Client(ClientError::Api(api)),
        Err(_) => Failure::Other(format!("the daemon reported: {error}")),
    }
}

/// `/v1/services/{name}`.
pub fn service_path(name: &str) -> String {
    format!("/v1/services/{}", segment(name))
}

/// `text` as one URL path segment (service names are DNS labels, but a typo must not reach
/// another route).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// One JSON value on one line (JSON lines).
pub fn print_json_line(value: &Value) {
    println!("{value}");
}

/// One JSON document, indented.
pub fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(_) => println!("{value}"),
    }
}

/// Prints rows under headers, each column as wide as its widest cell (the last one unpadded).
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A JSON value as table text: strings bare, null as `-`.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `GET path` over the admin socket, answered with text. [`Client`] decodes JSON only; the
/// export route answers YAML.
async fn get_text(client: &Client, path: &str) -> Result<String, ClientError> {
    let socket = client.socket().to_path_buf();
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                socket: socket.clone(),
                source,
            },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                socket: socket.clone(),
            },
            _ => ClientError::Connect {
                socket: socket.clone(),
                source,
            },
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Protocol(format!("handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("admin socket connection: {e}");
        }
    });
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, "lull")
        .body(Full::new(Bytes::new()))
        .map_err(|e| ClientError::Protocol(format!("build the request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Protocol(format!("send the request: {e}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(format!("read the answer: {e}")))?
        .to_bytes();
    if status.is_success() {
        return String::from_utf8(body.to_vec())
            .map_err(|_| ClientError::Protocol("the answer is not UTF-8 text".to_owned()));
    }
    let error = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| serde_json::from_value::<ApiError>(v.get("error")?.clone()).ok());
    match error {
        Some(api) => Err(ClientError::Api(api)),
        None => Err(ClientError::Protocol(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lull_daemon::api::FieldError;

    #[test]
    fn api_codes_map_to_documented_exits() {
        let cases = [
            (ErrorCode::InvalidRequest, 2),
            (ErrorCode::InvalidJson, 2),
            (ErrorCode::NotFound, 3),
            (ErrorCode::AlreadyExists, 4),
            (ErrorCode::Busy, 4),
            (ErrorCode::Conflict, 4),
            (ErrorCode::Internal, 6),
        ];
        for (code, exit) in cases {
            let failure = Failure::Client(ClientError::Api(ApiError::new(code, "x")));
            assert_eq!(failure.exit() as u8, exit, "{code:?}");
        }
        let down = Failure::Client(ClientError::NotRunning {
            socket: "s".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
        assert_eq!(down.exit(), Exit::Unreachable);
    }

    #[test]
    fn invalid_input_is_one_line_per_field() {
        let api = ApiError::invalid(vec![
            FieldError {
                field: "env[2].name".into(),
                message: "must not be empty".into(),
            },
            FieldError {
                field: "port".into(),
                message: "must be 1-65535".into(),
            },
        ]);
        let text = describe(&Failure::Client(ClientError::Api(api)));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "lull: invalid input:",
                "  env[2].name: must not be empty",
                "  port: must be 1-65535"
            ]
        );
    }

    #[test]
    fn segments_escape_what_is_not_a_label() {
        assert_eq!(segment("web-1"), "web-1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment("../x"), "..%2Fx");
    }
}
