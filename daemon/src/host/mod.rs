//! The seam between the control plane and the machine: what the deployment engine asks of the
//! host (images, instances, their exits and logs), and nothing about how the host does it.
//!
//! The real host drives the runtime, the network and the image store; [`fake::FakeHost`] runs
//! each instance as a small HTTP server on loopback so that control-plane tests exercise the
//! real proxy without root.

pub mod budget;
pub mod fake;
pub mod real;
pub mod sandbox;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use lull_proxy::gate::CpuControl;

/// A boxed future, so that the engine can hold an `Arc<dyn InstanceHost>`.
pub type HostFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What went wrong on the host. Every variant names the image or instance concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("image {reference}: {reason}")]
    Image { reference: String, reason: String },
    #[error("instance id {id:?} is not valid: {reason}")]
    BadId { id: String, reason: String },
    #[error("instance {id} already exists")]
    AlreadyExists { id: String },
    #[error("instance {id} failed to start: {reason}")]
    Start { id: String, reason: String },
    #[error("instance {id} not found")]
    NotFound { id: String },
    #[error("instance {id}: cannot {action}: {reason}")]
    Instance {
        id: String,
        action: &'static str,
        reason: String,
    },
    #[error("cannot list running instances: {reason}")]
    Recover { reason: String },
    /// The host's budget refused it (see [`crate::autoscale::Refusal`]).
    #[error("instance {id} not started: {reason}")]
    Refused { id: String, reason: String },
}

/// What the host knows of an image once it is available locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The reference asked for.
    pub reference: String,
    /// The manifest digest (`sha256:...`) the reference resolved to.
    pub digest: String,
    /// The image's first exposed TCP port, if it declares one.
    pub exposed_port: Option<u16>,
}

/// An instance's resource limits; `None` leaves a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct InstanceLimits {
    /// vCPUs (e.g. 0.25).
    pub cpu: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// A service volume mounted into an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The volume's name (its host directory belongs to the service).
    pub name: String,
    /// Where it appears inside the instance.
    pub target: String,
    pub read_only: bool,
}

/// A secret given to an instance as a file: mode 0400, owned by the app's user, on a tmpfs
/// (never written to disk in clear), read-only inside the instance, gone with the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// Absolute, inside the instance.
    pub target: String,
    /// The secret's plaintext (its `Debug` is redacted).
    pub value: crate::secrets::SecretValue,
}

/// Everything the host needs to start one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct StartRequest {
    pub service: String,
    pub revision: u64,
    /// See [`instance_id`].
    pub id: String,
    /// An image reference, pinned by digest when known.
    pub image: String,
    /// Replaces the image's entrypoint.
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    pub args: Option<Vec<String>>,
    /// The process environment, in order (`PORT` included).
    pub env: Vec<(String, String)>,
    /// The port the app listens on inside the instance.
    pub port: u16,
    pub limits: InstanceLimits,
    pub volumes: Vec<VolumeMount>,
    /// Secrets given as files.
    pub secret_files: Vec<SecretFile>,
}

impl StartRequest {
    /// The value of `key` in the request's environment (the last one wins).
    pub fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A started instance: where the proxy reaches it and how the gate controls its CPU.
#[derive(Clone)]
pub struct Started {
    pub id: String,
    pub addr: SocketAddr,
    pub cpu: Arc<dyn CpuControl>,
}

impl fmt::Debug for Started {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Started")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// How an instance's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code when the process exited.
    pub code: Option<i32>,
    /// Signal number when it was killed.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (memory limit reached).
    pub oom_killed: bool,
}

impl ExitInfo {
    pub fn code(code: i32) -> ExitInfo {
        ExitInfo {
            code: Some(code),
            ..ExitInfo::default()
        }
    }

    pub fn signal(signal: i32) -> ExitInfo {
        ExitInfo {
            signal: Some(signal),
            ..ExitInfo::default()
        }
    }

    pub fn oom() -> ExitInfo {
        ExitInfo {
            signal: Some(9),
            oom_killed: true,
            ..ExitInfo::default()
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            _ if self.oom_killed => f.write_str("killed by the OOM killer (memory limit reached)"),
            (Some(code), _) => write!(f, "exited with code {code}"),
            (_, Some(signal)) => write!(f, "killed by signal {signal}"),
            _ => f.write_str("ended with unknown status"),
        }
    }
}

/// An instance found running when the daemon starts, with the labels it was started with.
#[derive(Debug, Clone)]
pub struct RecoveredInstance {
    pub service: String,
    pub revision: u64,
    pub instance: Started,
}

/// One line an instance wrote: when (RFC 3339 UTC), on which stream, what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    pub time: String,
    pub stream: &'static str,
    pub text: String,
}

/// A command to run inside a running instance (`lull exec`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// The command and its arguments; `command[0]` is looked up in the instance's `PATH`.
    pub command: Vec<String>,
    /// Added to (or replacing those of) the instance's environment.
    pub env: Vec<(String, String)>,
    /// The working directory (absolute); the instance's own when `None`.
    pub cwd: Option<String>,
    /// Run on a new terminal of `(rows, cols)`; on pipes when `None`.
    pub tty: Option<(u16, u16)>,
}

/// The command's output, read as it comes.
pub type ExecReader = Pin<Box<dyn tokio::io::AsyncRead + Send>>;
/// The command's input; dropping it closes the command's stdin (on pipes).
pub type ExecWriter = Pin<Box<dyn tokio::io::AsyncWrite + Send>>;
/// Sets the command's terminal size `(rows, cols)`.
pub type ExecResize = Arc<dyn Fn(u16, u16) -> Result<(), String> + Send + Sync>;

/// A command running inside an instance. A command that cannot be found or run still starts
/// and ends with code 127 or 126, saying why on its stderr.
pub struct ExecProcess {
    pub stdin: ExecWriter,
    /// Its stdout; on a terminal, everything it writes.
    pub stdout: ExecReader,
    /// Its stderr; `None` on a terminal.
    pub stderr: Option<ExecReader>,
    /// `Some` when it runs on a terminal.
    pub resize: Option<ExecResize>,
    /// Resolves when the command ends.
    pub exit: HostFuture<'static, Result<ExitInfo, HostError>>,
}

impl fmt::Debug for ExecProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecProcess")
            .field("tty", &self.resize.is_some())
            .finish_non_exhaustive()
    }
}

/// The machine as the control plane sees it. Implementations are shared between tasks.
pub trait InstanceHost: Send + Sync + 'static {
    /// Makes `reference` available locally (pulling it when missing).
    fn ensure_image<'a>(
        &'a self,
        reference: &'a str,
    ) -> HostFuture<'a, Result<ImageInfo, HostError>>;

    /// Starts one instance; returns once its process runs (not once it is healthy).
    fn start(&self, request: StartRequest) -> HostFuture<'_, Result<Started, HostError>>;

    /// Resolves when the instance's process exits (at once if it already has). Several
    /// callers may wait for one instance.
    fn wait<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<ExitInfo, HostError>>;

    /// SIGTERM, then SIGKILL after `grace`; resolves once the process has exited.
    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> HostFuture<'a, Result<ExitInfo, HostError>>;

    /// Frees everything an exited (or stopped) instance held: files, network, address.
    fn remove<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<(), HostError>>;

    /// The instances still running (after a daemon restart), with their service and revision.
    fn recover(&self) -> HostFuture<'_, Result<Vec<RecoveredInstance>, HostError>>;

    /// Every line of the instance's stdout and stderr still kept, oldest first: of a live
    /// instance, or of a removed one whose logs are retained (see
    /// [`InstanceHost::retained_logs`]).
    fn logs<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<Vec<LogLine>, HostError>>;

    /// The removed instances of `service` whose logs the host still keeps, oldest first. A
    /// host keeps them under a per-service byte cap; one that keeps none answers nothing.
    fn retained_logs<'a>(
        &'a self,
        service: &'a str,
    ) -> HostFuture<'a, Result<Vec<String>, HostError>> {
        let _ = service;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Drops every retained log of `service` (it was deleted).
    fn forget_logs<'a>(&'a self, service: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        let _ = service;
        Box::pin(async { Ok(()) })
    }

    /// Runs a command inside running instance `id`; returns once the command runs.
    fn exec<'a>(
        &'a self,
        id: &'a str,
        request: ExecRequest,
    ) -> HostFuture<'a, Result<ExecProcess, HostError>> {
        let _ = request;
        Box::pin(async move {
            Err(HostError::Instance {
                id: id.to_owned(),
                action: "exec",
                reason: "this host cannot run commands in instances".into(),
            })
        })
    }

    /// The last `lines` lines of the instance's stdout and stderr, oldest first, each as
    /// `TIME STREAM TEXT`.
    fn log_tail<'a>(
        &'a self,
        id: &'a str,
        lines: usize,
    ) -> HostFuture<'a, Result<Vec<String>, HostError>> {
        Box::pin(async move {
            let all = self.logs(id).await?;
            Ok(all[all.len().saturating_sub(lines)..]
                .iter()
                .map(|l| format!("{} {} {}", l.time, l.stream, l.text))
                .collect())
        })
    }
}

/// A fresh instance id: `<service>-r<revision>-<6 hex>`, valid for the runtime (lowercase
/// alphanumerics and `-`, at most 63 bytes: a long service name is shortened).
pub fn instance_id(service: &str, revision: u64) -> String {
    let mut bytes = [0u8; 3];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: fall back on the clock, ids only need to differ.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&nanos.to_le_bytes()[..3]);
    }
    let suffix = format!("-r{revision}-{}", hex::encode(bytes));
    let keep = 63usize.saturating_sub(suffix.len());
    let mut name: String = service
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(keep)
        .collect();
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        name.push('s');
    }
    format!("{name}{suffix}")
}

/// Splits an id made by [`instance_id`] into its service and revision.
pub fn parse_instance_id(id: &str) -> Option<(&str, u64)> {
    let (rest, hex_part) = id.rsplit_once('-')?;
    if hex_part.len() != 6 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (service, revision) = rest.rsplit_once("-r")?;
    let revision = revision.parse().ok()?;
    (!service.is_empty()).then_some((service, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime's rule (`lull_runtime::instance::validate_id`), restated.
    fn valid_for_runtime(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 63
            && id.as_bytes()[0].is_ascii_alphanumeric()
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    }

    #[test]
    fn instance_ids_name_service_and_revision_and_differ() {
        let a = instance_id("web", 3);
        let b = instance_id("web", 3);
        assert_ne!(a, b);
        assert!(a.starts_with("web-r3-"), "{a}");
        assert_eq!(a.len(), "web-r3-".len() + 6);
        assert!(valid_for_runtime(&a), "{a}");
        assert_eq!(parse_instance_id(&a), Some(("web", 3)));
    }

    #[test]
    fn long_service_names_are_shortened_to_a_valid_id() {
        let long = "a".repeat(80);
        let id = instance_id(&long, 12345);
        assert!(id.len() <= 63, "{id}");
        assert!(valid_for_runtime(&id), "{id}");
        assert!(id.contains("-r12345-"), "{id}");
    }

    #[test]
    fn exit_info_says_how_it_ended() {
        assert_eq!(ExitInfo::code(3).to_string(), "exited with code 3");
        assert_eq!(ExitInfo::signal(15).to_string(), "killed by signal 15");
        assert!(ExitInfo::oom().to_string().contains("OOM"));
        assert_eq!(parse_instance_id("web-r3-zzzzzz"), None);
    }
}
