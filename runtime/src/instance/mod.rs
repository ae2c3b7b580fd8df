//! Instances: one image running in its own namespaces and cgroup, launched through youki's
//! libcontainer by a per-instance shim (see [`shim`]) forked by the [`zygote`].
//!
//! Files of an instance live in `<instances>/<id>/` (see [`InstancePaths`]); libcontainer's state
//! in `<state_root>/<id>/`. Both survive the daemon, so a restarted daemon finds every instance
//! again ([`InstanceManager::recover`]).

pub mod config;
pub mod exec;
pub mod overlay;
pub mod pidfd;
pub mod process;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod user;
pub mod zygote;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libcontainer::container::Container;

pub use config::{ExitStatus, FileBind, InstancePaths, LaunchConfig, ProcessConfig, ShimState};
use config::{read_json, write_json_atomic};
pub use exec::{ExecError, ExecFd, ExecRequest, ExecSession, TtyResizer, WindowSize};
use pidfd::{PidFd, is_same_process_alive};
pub use process::{ImageProcess, ProcessOverrides, resolve_process};
pub use zygote::Zygote;

use crate::cgroup::{
    CgroupError, CgroupLayout, Controller, CpuGate, CpuLimit, GateError, InstanceCgroup, Resources,
};
use crate::logs::LogLimits;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "instance id {0:?} must be 1 to 63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit"
    )]
    BadId(String),
    #[error("instance {0} already exists")]
    Exists(String),
    #[error("instance {0} not found")]
    NotFound(String),
    #[error("instance {id}: {source}")]
    Process {
        id: String,
        source: process::ProcessError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Zygote(#[from] zygote::ZygoteError),
    #[error("delete instance {id}: {message}")]
    Delete { id: String, message: String },
    #[error("instance {id} was not started: {message}")]
    StartCalledOff { id: String, message: String },
    #[error("instance {id}: {source}")]
    Signal { id: String, source: std::io::Error },
    #[error("instance {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("instance {id}: {source}")]
    Gate { id: String, source: GateError },
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Name of the instance's own cgroup inside its limit group.
pub const APP_CGROUP: &str = "app";

/// What the CPU gate writes to the instance's own group: throttled, 1 ms per 1 s; restored, no
/// quota at that group at all. The configured CPU limit lives one level up, in the limit group,
/// at its normal period, and is never touched by the gate.
///
/// Why two levels: the kernel keeps a bandwidth period timer armed at the period it was started
/// with. Throttling one group to 1 ms per 1 s and then writing its 100 ms limit back left the
/// instance one quota and then nothing until the old 1 s period ended (measured: 34 % of a CPU
/// over the 300 ms after a restore). The gate's group only ever uses the 1 s period and "no
/// quota" unthrottles at once, while the limit group keeps its own timer at its own period. On
/// cgroup v1 a child's quota may not exceed its parent's, which is why the gate is the child.
pub fn gate_limit() -> CpuLimit {
    CpuLimit::GATE_OPEN
}

/// The writes that put `limit` on the limit group (none when unlimited).
fn cpu_limit_writes(
    limit_cgroup: &InstanceCgroup,
    limit: CpuLimit,
) -> Result<Vec<config::CgroupWrite>, CgroupError> {
    if limit.quota_us().is_none() {
        return Ok(Vec::new());
    }
    let dir = limit_cgroup.require_dir(Controller::Cpu)?;
    let write = |file: &str, value: String| config::CgroupWrite {
        path: dir.join(file),
        value,
    };
    Ok(if limit_cgroup.is_v2() {
        vec![write("cpu.max", limit.cpu_max_value())]
    } else {
        // Period first: the quota is then checked against the period it belongs with.
        vec![
            write("cpu.cfs_period_us", limit.period_us().to_string()),
            write("cpu.cfs_quota_us", limit.cfs_quota_value()),
        ]
    })
}

/// On cgroup v2, the app's view of its CPU limit: the instance's cgroup namespace starts at its
/// own group, whose `cpu.max` holds the gate's state (`max 1000000` while busy, 1 ms a second
/// while idle), so a runtime sizing itself from `/sys/fs/cgroup/cpu.max` (Go's GOMAXPROCS, the
/// JVM's processor count) would see no limit, or a tiny one. The limit group's `cpu.max` is
/// bound read-only over it instead: what the app reads there is its configured limit (live),
/// whatever the gate does. On v1 the cpu hierarchy's view is the limit group already
/// (`Instances::cgroup_binds`), so nothing is needed.
fn cpu_limit_view(limit_cgroup: &InstanceCgroup) -> Option<FileBind> {
    if !limit_cgroup.is_v2() {
        return None;
    }
    let dir = limit_cgroup.controller_dir(Controller::Cpu)?;
    Some(FileBind {
        read_only: true,
        ..FileBind::new(dir.join("cpu.max"), "/sys/fs/cgroup/cpu.max")
    })
}

/// Removes the (empty) group `cgroups_path` from every cgroup hierarchy mounted on the host.
fn remove_everywhere(cgroups_path: &str) -> Result<(), CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = post.split(' ').next().unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let Some(mount_point) = pre.split(' ').nth(4) else {
            continue;
        };
        let dir = Path::new(mount_point).join(cgroups_path.trim_start_matches('/'));
        let mut attempts = 0;
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => return Err(CgroupError::RemoveDir { path: dir, source }),
            }
        }
    }
    Ok(())
}

/// A state file for recovery: unreadable (torn by a crash) counts as absent, with a warning.
fn read_or_none<T: for<'de> serde::Deserialize<'de>>(path: &Path) -> Option<T> {
    read_json(path).unwrap_or_else(|e| {
        tracing::warn!("{}: {e}; treating it as missing", path.display());
        None
    })
}

/// Checks an instance id (it names dirs, cgroups and the hostname).
pub fn validate_id(id: &str) -> Result<(), InstanceError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InstanceError::BadId(id.to_owned()))
    }
}

/// Where the instance manager keeps things and how it starts its zygote.
#[derive(Debug, Clone)]
pub struct InstancesConfig {
    /// `<data>/instances`.
    pub instances_dir: PathBuf,
    /// `<data>/layers`.
    pub layers_dir: PathBuf,
    /// libcontainer's state root (e.g. `/run/lull/containers`).
    pub state_root: PathBuf,
    /// Parent of every instance cgroup (e.g. `/lull`).
    pub cgroup_parent: String,
    /// The program that serves the zygote, and its arguments.
    pub zygote_program: PathBuf,
    pub zygote_args: Vec<String>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct InstanceRequest {
    pub id: String,
    /// Unpacked layer dir names inside the layers dir, lowest first.
    pub layers: Vec<String>,
    pub image: ImageProcess,
    pub overrides: ProcessOverrides,
    pub resources: Resources,
    pub netns: Option<PathBuf>,
    /// Host files bind-mounted into the instance (see [`FileBind`]).
    pub files: Vec<FileBind>,
    pub log_limits: LogLimits,
}

/// What an instance's process waits for before it runs (see [`Instances::launch_when`]):
/// `Err` carries why its start is called off.
pub type StartGate =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// A running (or exited, not yet deleted) instance.
#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub paths_dir: PathBuf,
    pub cgroups_path: String,
    pub state: ShimState,
    pub cgroup: InstanceCgroup,
    /// The CPU limit the gate restores.
    pub cpu_limit: CpuLimit,
    /// The group around the instance's own, holding its configured CPU limit (see [`gate_limit`]).
    pub limit_cgroup: InstanceCgroup,
    init: Option<PidFd>,
    shim: Option<PidFd>,
}

impl Instance {
    pub fn paths(&self) -> InstancePaths {
        InstancePaths::new(&self.paths_dir)
    }

    pub fn init_pid(&self) -> i32 {
        self.state.init_pid
    }

    /// Sends a signal to the instance's main process (pid 1 inside it).
    pub fn signal(&self, signal: i32) -> Result<bool, InstanceError> {
        match &self.init {
            Some(fd) => fd.signal(signal).map_err(|source| InstanceError::Signal {
                id: self.id.clone(),
                source,
            }),
            None => Ok(false),
        }
    }

    /// True once the main process has exited.
    pub fn has_exited(&self) -> bool {
        self.init.as_ref().is_none_or(PidFd::has_exited)
    }

    /// Waits for the instance to end and returns how it ended (from the shim's `exit.json`).
    pub async fn wait(&self) -> Result<ExitStatus, InstanceError> {
        if let Some(init) = &self.init {
            init.exited().await.map_err(io_err(&self.paths_dir))?;
        }
        if let Some(shim) = &self.shim {
            shim.exited().await.map_err(io_err(&self.paths_dir))?;
        }
        self.exit_status()?.ok_or_else(|| InstanceError::Io {
            path: self.paths().exit(),
            source: std::io::Error::other(
                "the shim ended without recording an exit status (see shim.log)",
            ),
        })
    }

    /// The recorded exit status, if the instance has ended; a SIGKILL is reported as an OOM kill
    /// when the instance's memory cgroup counted one.
    pub fn exit_status(&self) -> Result<Option<ExitStatus>, InstanceError> {
        let path = self.paths().exit();
        let mut status: Option<ExitStatus> = read_json(&path).map_err(io_err(&path))?;
        if let Some(status) = &mut status
            && status.signal == Some(libc::SIGKILL)
            && self.cgroup.oom_kills().unwrap_or(0) > 0
        {
            status.oom_killed = true;
        }
        Ok(status)
    }

    /// Opens the instance's CPU gate (files opened once; flipping it is one write).
    pub fn open_gate(&self) -> Result<CpuGate, InstanceError> {
        CpuGate::open(&self.cgroup, gate_limit()).map_err(|source| InstanceError::Gate {
            id: self.id.clone(),
            source,
        })
    }

    /// Opens the instance's freezer (idle tier 2), on the group holding its processes.
    pub fn open_freezer(&self) -> Result<crate::cgroup::Freezer, InstanceError> {
        crate::cgroup::Freezer::open(
            std::sync::Arc::new(crate::cgroup::HostCgroupFs),
            &self.cgroup,
        )
        .map_err(|source| InstanceError::Cgroup {
            id: self.id.clone(),
            source,
        })
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status. A frozen instance is
    /// thawed first: a frozen task cannot act on a signal.
    pub async fn stop(&self, grace: Duration) -> Result<ExitStatus, InstanceError> {
        if let Ok(freezer) = self.open_freezer()
            && let Err(e) = freezer.thaw()
        {
            tracing::warn!(instance = %self.id, "thaw before stopping: {e}");
        }
        self.signal(libc::SIGTERM)?;
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            tracing::info!(instance = %self.id, "did not stop within {grace:?} of SIGTERM: killing");
            self.signal(libc::SIGKILL)?;
        }
        self.wait().await
    }
}

/// What [`InstanceManager::recover`] found for one instance dir.
#[derive(Debug)]
pub enum Recovered {
    /// Still running: handed back to be adopted.
    Running(Instance),
    /// Ended while nobody watched; its status is known. Not yet deleted.
    Exited(Instance, ExitStatus),
    /// Its process is gone and its status was lost (or it never started): deleted already.
    Removed { id: String },
}

/// Launches, finds and deletes instances.
pub struct InstanceManager {
    cfg: InstancesConfig,
    /// Replaced by a new one when it breaks (see [`Zygote::is_broken`]).
    zygote: std::sync::Mutex<Arc<Zygote>>,
    layout: CgroupLayout,
}

impl InstanceManager {
    pub fn new(cfg: InstancesConfig) -> Result<Self, InstanceError> {
        for dir in [&cfg.instances_dir, &cfg.state_root] {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let layout = CgroupLayout::host().map_err(|source| InstanceError::Cgroup {
            id: String::new(),
            source,
        })?;
        tracing::info!(
            cgroups = if layout.is_v2() { "v2" } else { "v1 (hybrid)" },
            "instance manager ready"
        );
        let zygote = std::sync::Mutex::new(Arc::new(Zygote::spawn(
            &cfg.zygote_program,
            &cfg.zygote_args,
        )?));
        Ok(InstanceManager {
            cfg,
            zygote,
            layout,
        })
    }

    /// The zygote, started afresh if the last one broke.
    fn zygote(&self) -> Result<Arc<Zygote>, InstanceError> {
        let mut current = self.zygote.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_broken() {
            tracing::warn!("replacing a zygote that stopped answering");
            *current = Arc::new(Zygote::spawn(
                &self.cfg.zygote_program,
                &self.cfg.zygote_args,
            )?);
        }
        Ok(current.clone())
    }

    /// The current zygote's process id.
    pub fn zygote_pid(&self) -> i32 {
        self.zygote.lock().unwrap_or_else(|p| p.into_inner()).pid() as i32
    }

    /// The host's cgroup layout.
    pub fn cgroup_layout(&self) -> &CgroupLayout {
        &self.layout
    }

    /// On v1 hosts, the read-only views of instance `id`'s group that replace libcontainer's
    /// writable cgroup mounts (see [`config::CgroupBind`]); empty on v2.
    pub fn cgroup_binds(&self, id: &str) -> Result<Vec<config::CgroupBind>, InstanceError> {
        let CgroupLayout::V1(hierarchies) = &self.layout else {
            return Ok(Vec::new());
        };
        let cgroup = self.instance_cgroup(id)?;
        let limit_cgroup = self.limit_cgroup(id)?;
        let mut binds: Vec<config::CgroupBind> = Vec::new();
        for controller in Controller::ALL {
            // The cpu hierarchy shows the limit group, where the configured quota is (the
            // app's own group, holding the gate's state, is a subdir of it).
            let group = if controller == Controller::Cpu {
                &limit_cgroup
            } else {
                &cgroup
            };
            let (Some(mount), Some(dir)) = (
                hierarchies.get(controller),
                group.controller_dir(controller),
            ) else {
                continue;
            };
            let Some(name) = mount.file_name() else {
                continue;
            };
            let destination = Path::new("/sys/fs/cgroup").join(name);
            if !binds.iter().any(|b| b.destination == destination) {
                binds.push(config::CgroupBind {
                    source: dir.to_owned(),
                    destination,
                });
            }
        }
        Ok(binds)
    }

    fn instance_cgroup(&self, id: &str) -> Result<InstanceCgroup, InstanceError> {
        InstanceCgroup::new(&self.layout, Path::new(&self.cgroups_path(id))).map_err(|source| {
            InstanceError::Cgroup {
                id: id.to_owned(),
                source,
            }
        })
    }

    pub fn config(&self) -> &InstancesConfig {
        &self.cfg
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.instances_dir.join(id)
    }

    /// The cgroup the instance's processes live in (the spec's `cgroupsPath`), with its memory
    /// and pids limits, where the CPU gate acts: `<parent>/<id>/app`.
    ///
    /// An instance that exists keeps the path it was launched with (its `launch.json`), even
    /// when this manager's parent differs: a daemon started under systemd's delegation adopts
    /// instances an earlier one started under `/lull`, and `lull rm` finds the delegated ones.
    pub fn cgroups_path(&self, id: &str) -> String {
        self.recorded_cgroups_path(id)
            .unwrap_or_else(|| format!("{}/{}", self.new_limit_cgroups_path(id), APP_CGROUP))
    }

    /// The group around it, holding its CPU limit: `<parent>/<id>`.
    pub fn limit_cgroups_path(&self, id: &str) -> String {
        self.recorded_cgroups_path(id)
            .and_then(|path| {
                path.strip_suffix(&format!("/{APP_CGROUP}"))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| self.new_limit_cgroups_path(id))
    }

    /// `<parent>/<id>` under this manager's parent: where a new instance goes.
    fn new_limit_cgroups_path(&self, id: &str) -> String {
        format!("{}/{}", self.cfg.cgroup_parent.trim_end_matches('/'), id)
    }

    fn recorded_cgroups_path(&self, id: &str) -> Option<String> {
        recorded_cgroups_path(&self.dir(id), id)
    }

    fn limit_cgroup(&self, id: &str) -> Result<InstanceCgroup, InstanceError> {
        InstanceCgroup::new(&self.layout, Path::new(&self.limit_cgroups_path(id))).map_err(
            |source| InstanceError::Cgroup {
                id: id.to_owned(),
                source,
            },
        )
    }

    /// Starts an instance and returns once its process runs.
    pub async fn launch(&self, req: InstanceRequest) -> Result<Instance, InstanceError> {
        self.launch_when(req, None).await
    }

    /// [`launch`](Self::launch), with the instance's process held between its creation
    /// (namespaces, mounts, cgroups: most of a start's time) and its exec until `ready`
    /// resolves. So work the process needs before it runs (its network: the daemon wires the
    /// veth pair meanwhile) overlaps the creation instead of preceding it. An error from
    /// `ready` calls the start off: the launch fails with that message and leaves no instance.
    pub async fn launch_when(
        &self,
        req: InstanceRequest,
        ready: Option<StartGate>,
    ) -> Result<Instance, InstanceError> {
        use tracing::Instrument;
        let span = tracing::info_span!("launch", instance = %req.id);
        self.launch_inner(req, ready).instrument(span).await
    }

    async fn launch_inner(
        &self,
        req: InstanceRequest,
        ready: Option<StartGate>,
    ) -> Result<Instance, InstanceError> {
        validate_id(&req.id)?;
        let cgroup_err = |source| InstanceError::Cgroup {
            id: req.id.clone(),
            source,
        };
        let cpu_limit = req.resources.cpu_limit().map_err(cgroup_err)?;
        // The CPU limit goes to the limit group (see `gate_limit`), not the app's own group.
        let resources = Resources {
            cpu: None,
            ..req.resources
        }
        .to_linux_resources()
        .map_err(cgroup_err)?;
        let cgroup = self.instance_cgroup(&req.id)?;
        let limit_cgroup = self.limit_cgroup(&req.id)?;
        let process = resolve_process(&req.image, &req.overrides).map_err(|source| {
            InstanceError::Process {
                id: req.id.clone(),
                source,
            }
        })?;
        let dir = self.dir(&req.id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(InstanceError::Exists(req.id));
            }
            Err(e) => {
                return Err(InstanceError::Io {
                    path: dir,
                    source: e,
                });
            }
        }
        // The gate is a FIFO in the instance's dir, held open here for reading and writing,
        // so the shim's open never blocks and its read sees end of file only if this process
        // is gone.
        let gate = match &ready {
            None => None,
            Some(_) => {
                let path = InstancePaths::new(&dir).start_gate();
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| InstanceError::Io {
                        path: path.clone(),
                        source: e.into(),
                    })?;
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                Some((path, file))
            }
        };
        let cfg = LaunchConfig {
            start_gate: gate.as_ref().map(|(path, _)| path.clone()),
            id: req.id.clone(),
            dir: dir.clone(),
            layers_dir: self.cfg.layers_dir.clone(),
            layers: req.layers,
            state_root: self.cfg.state_root.clone(),
            process,
            hostname: req.id.clone(),
            netns: req.netns,
            files: {
                let mut files = req.files;
                files.extend(cpu_limit_view(&limit_cgroup));
                files
            },
            cgroups_path: self.cgroups_path(&req.id),
            resources,
            log_limits: req.log_limits,
            cgroup_binds: self.cgroup_binds(&req.id)?,
            cpu_limit_writes: cpu_limit_writes(&limit_cgroup, cpu_limit).map_err(|source| {
                InstanceError::Cgroup {
                    id: req.id.clone(),
                    source,
                }
            })?,
        };
        let launch_path = InstancePaths::new(&dir).launch();
        write_json_atomic(&launch_path, &cfg).map_err(io_err(&launch_path))?;

        let zygote = self.zygote()?;
        let cfg_for_launch = cfg.clone();
        let launching = tokio::task::spawn_blocking(move || zygote.launch(&cfg_for_launch));
        let signal = async {
            let (Some(ready), Some((_, fifo))) = (ready, gate.as_ref()) else {
                return Ok(());
            };
            let started = std::time::Instant::now();
            let outcome = ready.await;
            let byte = if outcome.is_ok() { b"1" } else { b"0" };
            // One byte into an empty pipe: never blocks.
            if let Err(e) = std::io::Write::write_all(&mut &*fifo, byte) {
                tracing::warn!("write the start gate: {e}");
            }
            tracing::debug!(
                waited_us = started.elapsed().as_micros() as u64,
                ok = outcome.is_ok(),
                "start gate signalled (waited for it while the instance was created)"
            );
            outcome
        };
        let (launched, signalled) = tokio::join!(launching, signal);
        if let Some((path, fifo)) = gate {
            drop(fifo);
            let _ = fs::remove_file(path);
        }
        let launched = launched.map_err(|e| InstanceError::Io {
            path: dir.clone(),
            source: std::io::Error::other(e),
        })?;
        if let Err(message) = signalled {
            // The shim starts nothing without the go-ahead, so its launch failed too.
            debug_assert!(launched.is_err());
            return Err(InstanceError::StartCalledOff {
                id: req.id.clone(),
                message,
            });
        }
        let state = match launched {
            Ok(state) => state,
            Err(e) => {
                // The shim cleaned up its mounts and libcontainer state; the dir keeps shim.log
                // for diagnosis until the instance is deleted.
                return Err(e.into());
            }
        };
        tracing::info!(
            pid = state.init_pid,
            shim = state.shim_pid,
            "instance started"
        );
        let init = PidFd::open(state.init_pid).ok();
        let shim = PidFd::open(state.shim_pid).ok();
        Ok(Instance {
            id: cfg.id,
            paths_dir: dir,
            cgroups_path: cfg.cgroups_path,
            state,
            cgroup,
            cpu_limit,
            limit_cgroup,
            init,
            shim,
        })
    }

    /// Runs a command inside running instance `id` (libcontainer's tenant builder, through the
    /// zygote; see [`exec`]). Returns once the command runs; a command that cannot be found or
    /// run still starts, and ends with code 127 or 126.
    pub async fn exec(&self, id: &str, request: ExecRequest) -> Result<ExecSession, InstanceError> {
        validate_id(id)?;
        let dir = self.dir(id);
        let paths = InstancePaths::new(&dir);
        if !paths.state().exists() || !self.cfg.state_root.join(id).is_dir() {
            return Err(InstanceError::NotFound(id.to_owned()));
        }
        if paths.exit().exists() {
            return Err(InstanceError::Exec(ExecError::Start {
                id: id.to_owned(),
                message: "the instance is not running".into(),
            }));
        }
        let tty = request.tty.is_some();
        let cfg = exec::ExecConfig::new(id, dir.clone(), self.cfg.state_root.clone(), request)?;
        let zygote = self.zygote()?;
        let (pid, fds) = tokio::task::spawn_blocking(move || zygote.exec(&cfg))
            .await
            .map_err(|e| InstanceError::Io {
                path: dir,
                source: std::io::Error::other(e),
            })?
            .map_err(|e| match e {
                zygote::ZygoteError::Exec { id, message } => {
                    InstanceError::Exec(ExecError::Start { id, message })
                }
                other => InstanceError::Zygote(other),
            })?;
        tracing::debug!(instance = %id, pid, tty, "exec started");
        Ok(ExecSession::from_fds(id, pid, tty, fds)?)
    }

    /// Classifies every instance dir left by a previous daemon.
    pub fn recover(&self) -> Result<Vec<Recovered>, InstanceError> {
        let mut found = Vec::new();
        let entries =
            fs::read_dir(&self.cfg.instances_dir).map_err(io_err(&self.cfg.instances_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.cfg.instances_dir))?;
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if validate_id(&id).is_err() {
                continue;
            }
            found.push(self.recover_one(&id)?);
        }
        Ok(found)
    }

    /// Finds one instance, classified as [`recover`](Self::recover) does (a dead one is removed).
    pub fn get(&self, id: &str) -> Result<Option<Recovered>, InstanceError> {
        validate_id(id)?;
        if !self.dir(id).exists() {
            return Ok(None);
        }
        self.recover_one(id).map(Some)
    }

    fn recover_one(&self, id: &str) -> Result<Recovered, InstanceError> {
        let paths = InstancePaths::new(self.dir(id));
        let state: Option<ShimState> = read_or_none(&paths.state());
        let exit: Option<ExitStatus> = read_or_none(&paths.exit());
        let Some(state) = state else {
            self.remove_files(id)?;
            return Ok(Recovered::Removed { id: id.to_owned() });
        };
        let cgroup = self.instance_cgroup(id)?;
        let limit_cgroup = self.limit_cgroup(id)?;
        let cpu_limit = limit_cgroup.cpu_limit().unwrap_or(CpuLimit::UNLIMITED);
        let instance = |state: ShimState| {
            // Open first, then check: the pidfd then names the process that was checked, even
            // if its pid is reused right after.
            let alive = |pid, start| {
                PidFd::open(pid)
                    .ok()
                    .filter(|_| is_same_process_alive(pid, start))
            };
            Instance {
                id: id.to_owned(),
                paths_dir: paths.dir.clone(),
                cgroups_path: self.cgroups_path(id),
                init: alive(state.init_pid, state.init_start_time),
                shim: alive(state.shim_pid, state.shim_start_time),
                state,
                cgroup: cgroup.clone(),
                cpu_limit,
                limit_cgroup: limit_cgroup.clone(),
            }
        };
        if let Some(exit) = exit {
            return Ok(Recovered::Exited(instance(state), exit));
        }
        if is_same_process_alive(state.init_pid, state.init_start_time) {
            if is_same_process_alive(state.shim_pid, state.shim_start_time) {
                return Ok(Recovered::Running(instance(state)));
            }
            // Its shim is gone: nobody drains its output (it would block or die of SIGPIPE) or
            // will record how it ends. End it; the caller starts a fresh one if it wants.
            tracing::warn!(instance = %id, pid = state.init_pid, "instance without its shim: killing it");
            let orphan = instance(state);
            orphan.signal(libc::SIGKILL)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !orphan.has_exited() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.remove_files(id)?;
        Ok(Recovered::Removed { id: id.to_owned() })
    }

    /// Kills (if still running) and deletes an instance: libcontainer state, cgroups, the rootfs
    /// mount and the instance dir. Deleting an instance that is already gone is not an error.
    pub async fn delete(&self, instance: Instance) -> Result<(), InstanceError> {
        if !instance.has_exited() {
            instance.signal(libc::SIGKILL)?;
            let _ = tokio::time::timeout(Duration::from_secs(10), instance.wait()).await;
        }
        let id = instance.id.clone();
        drop(instance);
        self.remove_files(&id)
    }

    /// Removes what an instance left on the host (blocking, quick).
    pub fn remove_files(&self, id: &str) -> Result<(), InstanceError> {
        validate_id(id)?;
        let state_dir = self.cfg.state_root.join(id);
        if state_dir.exists() {
            match Container::load(state_dir.clone()) {
                Ok(mut container) => {
                    if let Err(e) = container.delete(true) {
                        tracing::warn!(instance = %id, "libcontainer delete: {e}; removing its state by hand");
                    }
                }
                Err(e) => {
                    tracing::warn!(instance = %id, "load libcontainer state: {e}; removing it by hand")
                }
            }
            if state_dir.exists() {
                fs::remove_dir_all(&state_dir).map_err(io_err(&state_dir))?;
            }
        }
        // libcontainer removes the app's group on delete; this catches what a crash left behind.
        if let Ok(cgroup) = self.instance_cgroup(id)
            && cgroup.exists()
        {
            cgroup.remove().map_err(|source| InstanceError::Cgroup {
                id: id.to_owned(),
                source,
            })?;
        }
        // The limit group around it exists in every hierarchy libcontainer created the app's
        // group in (cpuset, devices, blkio too): remove it from every cgroup mount.
        remove_everywhere(&self.limit_cgroups_path(id)).map_err(|source| {
            InstanceError::Cgroup {
                id: id.to_owned(),
                source,
            }
        })?;
        let paths = InstancePaths::new(self.dir(id));
        overlay::unmount(&paths.rootfs()).map_err(|e| InstanceError::Delete {
            id: id.to_owned(),
            message: e.to_string(),
        })?;
        if paths.dir.exists() {
            fs::remove_dir_all(&paths.dir).map_err(io_err(&paths.dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn sample_launch_config() -> LaunchConfig {
        LaunchConfig {
            id: "web-1".into(),
            dir: "/var/lib/lull/instances/web-1".into(),
            layers_dir: "/var/lib/lull/layers".into(),
            layers: vec!["a".into()],
            state_root: "/run/lull/containers".into(),
            process: ProcessConfig {
                args: vec!["/app/server".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/app".into(),
                user: "app".into(),
            },
            hostname: "web-1".into(),
            netns: Some("/run/lull/netns/test".into()),
            files: vec![FileBind::new("/run/lull/net/web-1/hosts", "/etc/hosts")],
            cgroups_path: "/lull/web-1".into(),
            resources: Default::default(),
            log_limits: LogLimits::default(),
            cgroup_binds: Vec::new(),
            cpu_limit_writes: Vec::new(),
            start_gate: None,
        }
    }
}

/// The `cgroupsPath` the instance in `dir` was launched with (its `launch.json`), if it was
/// launched and the path is one of an instance `id`'s.
fn recorded_cgroups_path(dir: &Path, id: &str) -> Option<String> {
    let text = fs::read(InstancePaths::new(dir).launch()).ok()?;
    let launch: serde_json::Value = serde_json::from_slice(&text).ok()?;
    launch["cgroups_path"]
        .as_str()
        .filter(|path| path.starts_with('/') && path.ends_with(&format!("/{id}/{APP_CGROUP}")))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_keeps_the_cgroups_path_it_was_launched_with() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recorded_cgroups_path(dir.path(), "web-1"), None);
        let mut cfg = test_support::sample_launch_config();
        cfg.cgroups_path = "/system.slice/lull.service/instances/web-1/app".into();
        write_json_atomic(&InstancePaths::new(dir.path()).launch(), &cfg).unwrap();
        assert_eq!(
            recorded_cgroups_path(dir.path(), "web-1").as_deref(),
            Some("/system.slice/lull.service/instances/web-1/app")
        );
        // Another instance's path, or a relative one, is not taken.
        assert_eq!(recorded_cgroups_path(dir.path(), "web-2"), None);
        cfg.cgroups_path = "lull/web-1/app".into();
        write_json_atomic(&InstancePaths::new(dir.path()).launch(), &cfg).unwrap();
        assert_eq!(recorded_cgroups_path(dir.path(), "web-1"), None);
    }

    #[test]
    fn on_v2_the_app_reads_its_limit_groups_cpu_max() {
        use crate::cgroup::V1Hierarchies;
        let v2 = CgroupLayout::V2 {
            mount_point: PathBuf::from("/sys/fs/cgroup"),
        };
        let limit = InstanceCgroup::new(&v2, Path::new("/lull.service/instances/web-1")).unwrap();
        assert_eq!(
            cpu_limit_view(&limit),
            Some(FileBind {
                source: PathBuf::from("/sys/fs/cgroup/lull.service/instances/web-1/cpu.max"),
                destination: PathBuf::from("/sys/fs/cgroup/cpu.max"),
                read_only: true,
                owned_by_app: false,
            })
        );
        // On v1 the cpu hierarchy's view is the limit group itself (`cgroup_binds`).
        let v1 = CgroupLayout::V1(V1Hierarchies {
            cpu: Some(PathBuf::from("/sys/fs/cgroup/cpu")),
            ..V1Hierarchies::default()
        });
        let limit = InstanceCgroup::new(&v1, Path::new("/lull/web-1")).unwrap();
        assert_eq!(cpu_limit_view(&limit), None);
    }

    #[test]
    fn ids_are_checked() {
        for good in ["a", "web-1", "svc.rev_2", &"x".repeat(63)] {
            validate_id(good).unwrap();
        }
        for bad in ["", "-a", "A", "a/b", "../x", &"x".repeat(64), "a b"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
