//! The build sandbox, as the builder sees it: one step's commands run in an isolated instance on
//! a stack of unpacked layers, and what they wrote left in an upper dir for capture. The real
//! runner (the daemon's host: mount, pid, ipc, uts and network namespaces through lull's runtime,
//! egress through lull's NAT, cgroup limits) and a fake one for tests implement [`SandboxRunner`].

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub mod fake;

/// Where the step's commands run.
pub const WORKDIR: &str = "/app";

/// Receives the build's log lines as they come.
pub type LogSink = Arc<dyn Fn(&str) + Send + Sync>;

pub type SandboxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One build step to run.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxStep {
    /// A unique instance id (`b.<build>.<step>`: the dots keep it apart from services' ids).
    pub id: String,
    /// What the step is, for logs and errors (`dependencies`, `build`, `pre-run`).
    pub name: String,
    /// Unpacked layer dir names in the layer cache, lowest first.
    pub layers: Vec<String>,
    /// The base image's environment, then the build's (`NAME=value`, later ones win).
    pub env: Vec<(String, String)>,
    /// The shell script the step runs (see [`script`]).
    pub script: String,
    /// Host paths bind-mounted in: the CA bundle, the package managers' caches.
    pub binds: Vec<SandboxBind>,
    pub limits: SandboxLimits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxBind {
    pub source: PathBuf,
    /// Absolute path inside the sandbox; left out of the captured layer.
    pub destination: PathBuf,
    pub read_only: bool,
}

/// A build's resources (`[builder]` in the daemon's config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SandboxLimits {
    /// vCPUs.
    pub cpu: f64,
    pub memory_bytes: u64,
    pub pids: u64,
    /// The whole step; a step still running then is killed and the build fails.
    pub timeout: Duration,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        SandboxLimits {
            cpu: 2.0,
            memory_bytes: 2 << 30,
            pids: 8192,
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// How a step ended. Its upper dir stays until [`SandboxRunner::remove`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRun {
    /// The exit code, or 128 + the signal.
    pub exit_code: i32,
    pub timed_out: bool,
    /// The step's overlay upper dir on the host: what its commands wrote.
    pub upper: PathBuf,
    /// The last lines of its output, for the error of a failed step.
    pub last_lines: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("build step {step}: {reason}")]
pub struct SandboxError {
    pub step: String,
    pub reason: String,
}

/// Runs build steps.
pub trait SandboxRunner: Send + Sync {
    /// Runs the step to its end, sending each output line to `log`.
    fn run<'a>(
        &'a self,
        step: &'a SandboxStep,
        log: LogSink,
    ) -> SandboxFuture<'a, Result<SandboxRun, SandboxError>>;

    /// Removes the step's instance and its dirs (idempotent).
    fn remove<'a>(&'a self, id: &'a str) -> SandboxFuture<'a, ()>;
}

/// The shell script of a step: each command echoed (`+ command`) then run in one shell from
/// `/app`, so `cd` and `export` carry over to the next command as they would in a terminal; the
/// first command that fails ends the step with its exit code and a line naming it.
pub fn script(commands: &[String]) -> String {
    let mut out = String::from("cd /app || exit 1\n");
    for (i, command) in commands.iter().enumerate() {
        let quoted = single_quote(command);
        out.push_str(&format!("printf '+ %s\\n' {quoted}\n"));
        out.push_str(command);
        out.push_str(&format!(
            "\nlull_rc=$?\nif [ \"$lull_rc\" -ne 0 ]; then printf 'lull: command %d (%s) exited with %d\\n' {} {quoted} \"$lull_rc\" >&2; exit \"$lull_rc\"; fi\n",
            i + 1
        ));
    }
    out
}

/// `text` as one single-quoted shell word.
pub fn single_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_runs_each_command_and_stops_at_the_first_failure() {
        let s = script(&["echo 'hi'".into(), "false".into(), "echo never".into()]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(s.replace("cd /app || exit 1\n", ""))
            .output()
            .expect("sh runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(stdout, "+ echo 'hi'\nhi\n+ false\n");
        assert_eq!(stderr, "lull: command 2 (false) exited with 1\n");
    }

    #[test]
    fn state_carries_over_between_commands() {
        let s = script(&["export A=1; cd /".into(), "echo \"$A $(pwd)\"".into()]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(s.replace("cd /app || exit 1\n", ""))
            .output()
            .expect("sh runs");
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).ends_with("1 /\n"));
    }
}
