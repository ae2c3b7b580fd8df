//! What one instance is launched with, and the files its shim leaves behind.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use crate::logs::LogLimits;

/// Everything the shim needs to launch an instance; written as `launch.json` in the instance dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchConfig {
    pub id: String,
    /// The instance dir: bundle (`config.json`), `rootfs/`, `upper/`, `work/`, `logs/`, state files.
    pub dir: PathBuf,
    /// Where unpacked layers live.
    pub layers_dir: PathBuf,
    /// Layer dir names inside `layers_dir`, lowest first.
    pub layers: Vec<String>,
    /// libcontainer's state root.
    pub state_root: PathBuf,
    pub process: ProcessConfig,
    pub hostname: String,
    /// Network namespace to join; `None` gives the instance a new, empty one.
    pub netns: Option<PathBuf>,
    /// Host files bind-mounted into the instance (its resolv.conf and hosts).
    #[serde(default)]
    pub files: Vec<FileBind>,
    /// Absolute cgroup path (e.g. `/lull/<id>`), the same in every hierarchy.
    pub cgroups_path: String,
    pub resources: LinuxResources,
    pub log_limits: LogLimits,
    /// On cgroup v1 hosts, read-only bind mounts of the instance's own group in each hierarchy
    /// (`source` on the host, `destination` under `/sys/fs/cgroup`), replacing the cgroup mount
    /// libcontainer would make writable. Empty on v2, where the spec's read-only mount holds.
    #[serde(default)]
    pub cgroup_binds: Vec<CgroupBind>,
    /// Writes that set the CPU limit on the instance's limit group, done by the shim once
    /// libcontainer has created the groups and before the app starts.
    #[serde(default)]
    pub cpu_limit_writes: Vec<CgroupWrite>,
    /// A FIFO the shim reads one byte from between creating the instance and starting its
    /// process: `1` starts it, anything else (or the writer gone) calls the start off. See
    /// [`super::Instances::launch_when`].
    #[serde(default)]
    pub start_gate: Option<PathBuf>,
}

/// A host file bind-mounted over a path inside the instance, as Docker does for
/// `/etc/resolv.conf` and `/etc/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileBind {
    pub source: PathBuf,
    pub destination: PathBuf,
    /// Mounted read-only: writes inside the instance fail with EROFS.
    #[serde(default)]
    pub read_only: bool,
    /// Handed to the app's user (its uid and gid) once the shim has resolved it, before the
    /// app starts: for files only the app may read (secret files, mode 0400).
    #[serde(default)]
    pub owned_by_app: bool,
}

impl FileBind {
    /// A read-write bind of `source` at `destination`, left with its owner.
    pub fn new(source: impl Into<PathBuf>, destination: impl Into<PathBuf>) -> FileBind {
        FileBind {
            source: source.into(),
            destination: destination.into(),
            read_only: false,
            owned_by_app: false,
        }
    }
}

/// One value written to a cgroup control file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupWrite {
    pub path: PathBuf,
    pub value: String,
}

/// One read-only view of an instance's cgroup dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupBind {
    pub source: PathBuf,
    pub destination: PathBuf,
}

/// The instance's main process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// The image's `User` (`name`, `uid`, `name:group`, `uid:gid`; empty = root).
    pub user: String,
}

/// Written by the shim once the instance runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub init_pid: i32,
    pub init_start_time: u64,
    pub shim_pid: i32,
    pub shim_start_time: u64,
    pub started_at: String,
}

/// How an instance's main process ended; written by the shim as `exit.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited.
    pub code: Option<i32>,
    /// Signal number when it was killed.
    pub signal: Option<i32>,
    pub finished_at: String,
    /// Set by the runtime when the cgroup recorded an OOM kill.
    #[serde(default)]
    pub oom_killed: bool,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            _ if self.oom_killed => write!(
                f,
                "killed by the kernel's OOM killer (memory limit reached)"
            ),
            (Some(code), _) => write!(f, "exited with code {code}"),
            (_, Some(sig)) => write!(f, "killed by signal {sig}"),
            _ => write!(f, "ended with unknown status"),
        }
    }
}

/// The files of an instance dir.
pub struct InstancePaths {
    pub dir: PathBuf,
}

impl InstancePaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        InstancePaths { dir: dir.into() }
    }
    pub fn launch(&self) -> PathBuf {
        self.dir.join("launch.json")
    }
    /// The FIFO of [`LaunchConfig::start_gate`], while the instance starts.
    pub fn start_gate(&self) -> PathBuf {
        self.dir.join("start")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn exit(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    pub fn empty_layer(&self) -> PathBuf {
        self.dir.join("empty")
    }
}

/// Writes `value` as JSON at `path` atomically (temp file, rename): readers see the old file or
/// the whole new one.
///
/// Not fsynced: these files describe processes, which a machine crash ends anyway, and an fsync
/// costs milliseconds on every instance start. A file torn by a crash reads as unreadable, which
/// recovery treats like a missing one.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
