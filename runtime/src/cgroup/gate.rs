//! The CPU gate: an instance's CPU limit flipped between its configured value and the kernel's
//! floor with one `pwrite` to a control file opened in advance.
//!
//! The proxy throttles an instance when its last request finishes and restores it when a request
//! arrives. Both calls are cheap when nothing changes (one atomic swap), never block, and never
//! allocate on success: the bytes to write are formatted when the gate is opened.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use super::{CgroupFs, ControlFile, Controller, CpuLimit, HostCgroupFs, InstanceCgroup};

/// What the proxy sees of an instance's CPU: throttle when idle, restore when busy.
///
/// Each call reports whether it changed anything: `true` when it changed the requested state or
/// wrote to the cgroup, `false` when the gate already was, or was already being put, in that
/// state.
pub trait Gate: Send + Sync {
    fn throttle(&self) -> Result<bool, GateError>;
    fn restore(&self) -> Result<bool, GateError>;
}

/// Errors of the CPU gate; each names the control file concerned.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cgroup {cgroups_path} has no cpu controller")]
    NoCpuController { cgroups_path: PathBuf },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
}

/// The state of a gate's cgroup as last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GateState {
    /// Nothing written yet, or the last write failed part way.
    Unknown = 0,
    /// The instance's configured limit.
    Restored = 1,
    /// [`CpuLimit::THROTTLED`]: 1 ms of CPU per second.
    Throttled = 2,
}

impl GateState {
    fn from_u8(value: u8) -> GateState {
        match value {
            1 => GateState::Restored,
            2 => GateState::Throttled,
            _ => GateState::Unknown,
        }
    }
}

/// One pre-formatted write to an open control file.
#[derive(Debug)]
struct ControlWrite {
    file: Arc<dyn ControlFile>,
    path: PathBuf,
    value: Box<[u8]>,
}

impl ControlWrite {
    fn new(file: &Arc<dyn ControlFile>, path: &Path, value: String) -> ControlWrite {
        ControlWrite {
            file: Arc::clone(file),
            path: path.to_path_buf(),
            value: value.into_bytes().into_boxed_slice(),
        }
    }

    fn write(&self) -> Result<(), GateError> {
        self.file
            .write_value(&self.value)
            .map_err(|source| GateError::Write {
                path: self.path.clone(),
                value: String::from_utf8_lossy(&self.value).into_owned(),
                source,
            })
    }
}

/// The CPU gate of one instance.
///
/// Opened once per instance: v2 keeps `cpu.max` open, v1 `cpu.cfs_quota_us` and
/// `cpu.cfs_period_us`; both keep the burst file (`cpu.max.burst`, `cpu.cfs_burst_us`) open
/// when the kernel has one.
///
/// Write order (the kernel rejects any intermediate state with burst > quota, quota < 1 ms or a
/// period outside 1 ms..=1 s):
/// - throttle: burst → 0 (only while it may be non-zero: once, since lull never raises it),
///   then on v1 quota → 1000, then period → 1000000. Each step is valid and allows no more CPU
///   than the one before (Q/P → 1000/P → 1000/1000000).
/// - restore: on v1 quota → Q, then period → configured. The quota write unthrottles at once;
///   the intermediate Q/1000000 is valid since Q ≥ 1000. Burst stays 0. For an unlimited
///   instance Q is -1 and that is all; for a limited one Q is first a second's worth of its
///   limit ([`boosted`]: the kernel keeps the throttled 1 s period timer armed) and
///   [`SETTLE_AFTER`] later the settle thread writes the configured quota (one write).
///
/// On v2 `cpu.max` takes quota and period in one write.
///
/// Calls from many threads are serialised without blocking: a caller that finds another one
/// writing records what it wants and returns; the writer applies the latest request before it
/// lets go. An error is returned to whichever caller was writing, and the next call rewrites
/// everything.
#[derive(Debug)]
pub struct CpuGate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    limit: CpuLimit,
    throttle_writes: Box<[ControlWrite]>,
    /// Restore, first step: the configured period with a quota covering a whole throttled
    /// period (see [`settle`]); the configured limit itself when it is unlimited.
    restore_writes: Box<[ControlWrite]>,
    /// Restore, second step ([`SETTLE_AFTER`] later): the configured quota. Empty when the
    /// first step already wrote the configured limit.
    settle_writes: Box<[ControlWrite]>,
    burst_reset: Option<ControlWrite>,
    burst_is_zero: AtomicBool,
    desired: AtomicU8,
    applied: AtomicU8,
    busy: AtomicBool,
    /// The second step of the last restore is done (or was not needed).
    settled: AtomicBool,
    /// Bumped by every write to the cgroup, so a settle scheduled before a later throttle or
    /// restore does nothing.
    generation: AtomicU64,
}

impl CpuGate {
    /// Opens the gate of `cgroup` on the host; `limit` is what [`Gate::restore`] writes back.
    pub fn open(cgroup: &InstanceCgroup, limit: CpuLimit) -> Result<CpuGate, GateError> {
        CpuGate::open_with(&HostCgroupFs, cgroup, limit)
    }

    /// Opens the gate through `fs` (a fake in tests).
    pub fn open_with(
        fs: &dyn CgroupFs,
        cgroup: &InstanceCgroup,
        limit: CpuLimit,
    ) -> Result<CpuGate, GateError> {
        let dir =
            cgroup
                .controller_dir(Controller::Cpu)
                .ok_or_else(|| GateError::NoCpuController {
                    cgroups_path: cgroup.cgroups_path().to_path_buf(),
                })?;
        let throttled = CpuLimit::THROTTLED;
        let (throttle_writes, (restore_writes, settle_writes), burst_path) = if cgroup.is_v2() {
            let path = dir.join("cpu.max");
            let cpu_max = open(fs, &path)?;
            (
                vec![ControlWrite::new(
                    &cpu_max,
                    &path,
                    throttled.cpu_max_value(),
                )],
                match boosted(limit) {
                    Some(boost) => (
                        vec![ControlWrite::new(&cpu_max, &path, boost.cpu_max_value())],
                        vec![ControlWrite::new(&cpu_max, &path, limit.cpu_max_value())],
                    ),
                    None => (
                        vec![ControlWrite::new(&cpu_max, &path, limit.cpu_max_value())],
                        vec![],
                    ),
                },
                dir.join("cpu.max.burst"),
            )
        } else {
            let quota_path = dir.join("cpu.cfs_quota_us");
            let period_path = dir.join("cpu.cfs_period_us");
            let quota = open(fs, &quota_path)?;
            let period = open(fs, &period_path)?;
            (
                vec![
                    ControlWrite::new(&quota, &quota_path, throttled.cfs_quota_value()),
                    ControlWrite::new(&period, &period_path, throttled.period_us().to_string()),
                ],
                match boosted(limit) {
                    Some(boost) => (
                        vec![
                            ControlWrite::new(&quota, &quota_path, boost.cfs_quota_value()),
                            ControlWrite::new(&period, &period_path, boost.period_us().to_string()),
                        ],
                        vec![ControlWrite::new(
                            &quota,
                            &quota_path,
                            limit.cfs_quota_value(),
                        )],
                    ),
                    None => (
                        vec![
                            ControlWrite::new(&quota, &quota_path, limit.cfs_quota_value()),
                            ControlWrite::new(&period, &period_path, limit.period_us().to_string()),
                        ],
                        vec![],
                    ),
                },
                dir.join("cpu.cfs_burst_us"),
            )
        };
        let (burst_reset, burst_is_zero) = if fs.exists(&burst_path) {
            let file = open(fs, &burst_path)?;
            // Unreadable counts as non-zero: the first throttle then writes 0 to be sure.
            let is_zero = fs
                .read_control(&burst_path)
                .is_ok_and(|value| value.trim() == "0");
            (
                Some(ControlWrite::new(&file, &burst_path, "0".to_owned())),
                is_zero,
            )
        } else {
            (None, true)
        };
        tracing::debug!(
            cgroup = %cgroup.cgroups_path().display(),
            restored = %limit.cpu_max_value(),
            burst_file = burst_reset.is_some(),
            "opened cpu gate"
        );
        Ok(CpuGate {
            inner: Arc::new(GateInner {
                limit,
                throttle_writes: throttle_writes.into_boxed_slice(),
                restore_writes: restore_writes.into_boxed_slice(),
                settle_writes: settle_writes.into_boxed_slice(),
                burst_reset,
                burst_is_zero: AtomicBool::new(burst_is_zero),
                desired: AtomicU8::new(GateState::Unknown as u8),
                applied: AtomicU8::new(GateState::Unknown as u8),
                busy: AtomicBool::new(false),
                settled: AtomicBool::new(false),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The limit [`Gate::restore`] writes.
    pub fn limit(&self) -> CpuLimit {
        self.inner.limit
    }

    /// The state last written to the cgroup.
    pub fn state(&self) -> GateState {
        GateState::from_u8(self.inner.applied.load(Ordering::SeqCst))
    }

    /// Whether the configured limit itself is in place (restored, and past the first step of
    /// the restore).
    pub fn is_settled(&self) -> bool {
        self.state() == GateState::Restored && self.inner.settled.load(Ordering::SeqCst)
    }

    /// Takes the second step of a restore now instead of [`SETTLE_AFTER`] after it (the
    /// scheduled step then finds nothing to do). Returns whether it wrote anything.
    pub fn settle_now(&self) -> Result<bool, GateError> {
        let generation = self.inner.generation.load(Ordering::SeqCst);
        self.inner
            .settle(generation)
            .map(|outcome| outcome == Settle::Done)
    }
}

impl GateInner {
    fn set(&self, want: GateState) -> Result<bool, GateError> {
        let previous = self.desired.swap(want as u8, Ordering::SeqCst);
        if previous == want as u8 && self.applied.load(Ordering::SeqCst) == want as u8 {
            return Ok(false);
        }
        let wrote = self.drive()?;
        Ok(previous != want as u8 || wrote)
    }

    /// Applies `desired` until it matches `applied`, unless another caller is already at it.
    /// Returns whether this caller wrote anything.
    fn drive(&self) -> Result<bool, GateError> {
        let mut wrote = false;
        loop {
            if self
                .busy
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // The caller holding `busy` re-reads `desired` after it lets go.
                return Ok(wrote);
            }
            let mut result = Ok(());
            loop {
                let want = self.desired.load(Ordering::SeqCst);
                if want == self.applied.load(Ordering::SeqCst) {
                    break;
                }
                if let Err(error) = self.apply(GateState::from_u8(want)) {
                    self.applied
                        .store(GateState::Unknown as u8, Ordering::SeqCst);
                    result = Err(error);
                    break;
                }
                self.applied.store(want, Ordering::SeqCst);
                wrote = true;
            }
            self.busy.store(false, Ordering::SeqCst);
            result?;
            if self.desired.load(Ordering::SeqCst) == self.applied.load(Ordering::SeqCst) {
                return Ok(wrote);
            }
        }
    }

    fn apply(&self, state: GateState) -> Result<(), GateError> {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.settled.store(
            state == GateState::Restored && self.settle_writes.is_empty(),
            Ordering::SeqCst,
        );
        let writes = match state {
            GateState::Throttled => {
                if let Some(burst) = &self.burst_reset
                    && !self.burst_is_zero.load(Ordering::SeqCst)
                {
                    burst.write()?;
                    self.burst_is_zero.store(true, Ordering::SeqCst);
                }
                &self.throttle_writes
            }
            GateState::Restored => &self.restore_writes,
            GateState::Unknown => return Ok(()),
        };
        for write in writes.iter() {
            write.write()?;
        }
        Ok(())
    }
}

impl GateInner {
    /// The second step of a restore, if the gate is still in the restore of `generation`.
    fn settle(&self, generation: u64) -> Result<Settle, GateError> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Ok(Settle::Busy);
        }
        let current = self.generation.load(Ordering::SeqCst) == generation
            && self.applied.load(Ordering::SeqCst) == GateState::Restored as u8
            && self.desired.load(Ordering::SeqCst) == GateState::Restored as u8
            && !self.settled.load(Ordering::SeqCst);
        let mut result = Ok(if current { Settle::Done } else { Settle::Stale });
        if current {
            match self.settle_writes.iter().try_for_each(ControlWrite::write) {
                Ok(()) => self.settled.store(true, Ordering::SeqCst),
                Err(error) => {
                    self.applied
                        .store(GateState::Unknown as u8, Ordering::SeqCst);
                    result = Err(error);
                }
            }
        }
        self.busy.store(false, Ordering::SeqCst);
        // A throttle or restore that found us busy left its request for the holder to apply.
        if self.desired.load(Ordering::SeqCst) != self.applied.load(Ordering::SeqCst) {
            self.drive()?;
        }
        result
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Done,
    /// A later throttle or restore replaced the restore this step belonged to.
    Stale,
    /// Another caller was writing: try again shortly.
    Busy,
}

/// How long after a restore its second step comes: the throttled period (1 s), after which the
/// kernel's bandwidth timer runs at the configured period again, plus a margin.
pub const SETTLE_AFTER: std::time::Duration = std::time::Duration::from_millis(1100);

/// The first step of restoring `limit` after a throttle.
///
/// The kernel keeps the bandwidth timer it armed for the throttled 1 s period: restoring the
/// configured quota and period refills one quota at once, and once that is spent the instance
/// waits for the old timer, up to a second (measured: 34 % of a CPU over the 300 ms after a
/// plain restore, then nothing). So the restore first grants what the configured limit allows
/// over a whole throttled period, `quota × 1 s / period` at the configured period, and
/// [`SETTLE_AFTER`] later writes the configured quota back. `None` when there is nothing to
/// bridge (unlimited, or a period as long as the throttled one).
fn boosted(limit: CpuLimit) -> Option<CpuLimit> {
    let quota = limit.quota_us()?;
    let throttled_period = CpuLimit::THROTTLED.period_us();
    if limit.period_us() >= throttled_period {
        return None;
    }
    let boost = quota.saturating_mul(throttled_period) / limit.period_us();
    CpuLimit::new(Some(boost.min(CpuLimit::MAX_QUOTA_US)), limit.period_us()).ok()
}

/// The thread that takes the second step of restores: one for the process, started on first
/// use. Every step waits the same [`SETTLE_AFTER`], so steps come due in the order they are
/// scheduled and a queue is enough.
mod settle {
    use std::collections::VecDeque;
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    use std::time::{Duration, Instant};

    use super::{GateInner, SETTLE_AFTER, Settle};

    const RETRY: Duration = Duration::from_millis(5);

    struct Step {
        gate: Weak<GateInner>,
        due: Instant,
        generation: u64,
    }

    static QUEUE: OnceLock<Mutex<Sender<Step>>> = OnceLock::new();

    pub(super) fn schedule(gate: &Arc<GateInner>) {
        let step = Step {
            gate: Arc::downgrade(gate),
            due: Instant::now() + SETTLE_AFTER,
            generation: gate.generation.load(std::sync::atomic::Ordering::SeqCst),
        };
        let queue = QUEUE.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            if let Err(e) = std::thread::Builder::new()
                .name("lull-gate-settle".into())
                .spawn(move || run(rx))
            {
                tracing::error!("cannot start the cpu gate's settle thread: {e}");
            }
            Mutex::new(tx)
        });
        let sender = queue.lock().unwrap_or_else(|p| p.into_inner());
        if sender.send(step).is_err() {
            tracing::error!(
                "the cpu gate's settle thread is gone: restored instances keep their boost"
            );
        }
    }

    fn run(rx: Receiver<Step>) {
        let mut queue: VecDeque<Step> = VecDeque::new();
        loop {
            let Some(due) = queue.front().map(|s| s.due) else {
                match rx.recv() {
                    Ok(step) => queue.push_back(step),
                    Err(_) => return,
                }
                continue;
            };
            let now = Instant::now();
            if due > now {
                match rx.recv_timeout(due - now) {
                    Ok(step) => queue.push_back(step),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(due - now),
                }
                continue;
            }
            let Some(step) = queue.pop_front() else {
                continue;
            };
            let Some(gate) = step.gate.upgrade() else {
                continue;
            };
            match gate.settle(step.generation) {
                Ok(Settle::Done | Settle::Stale) => {}
                Ok(Settle::Busy) => queue.push_back(Step {
                    due: Instant::now() + RETRY,
                    ..step
                }),
                Err(e) => tracing::warn!("cpu gate: second step of a restore: {e}"),
            }
        }
    }
}

impl Gate for CpuGate {
    fn throttle(&self) -> Result<bool, GateError> {
        self.inner.set(GateState::Throttled)
    }

    fn restore(&self) -> Result<bool, GateError> {
        let changed = self.inner.set(GateState::Restored)?;
        if changed && !self.inner.settle_writes.is_empty() {
            settle::schedule(&self.inner);
        }
        Ok(changed)
    }
}

fn open(fs: &dyn CgroupFs, path: &Path) -> Result<Arc<dyn ControlFile>, GateError> {
    let file = fs.open_control(path).map_err(|source| GateError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Arc::from(file))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::{OnceLock, Weak};

    use super::*;
    use crate::cgroup::fake::FakeCgroupFs;
    use crate::cgroup::{CgroupLayout, V1Hierarchies};

    struct Tree {
        _root: tempfile::TempDir,
        cgroup: InstanceCgroup,
        cpu_dir: PathBuf,
    }

    fn v2_tree(cpu_max: &str, burst: Option<&str>) -> Tree {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V2 {
            mount_point: root.path().to_path_buf(),
        };
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/inst")).unwrap();
        cgroup.create().unwrap();
        let cpu_dir = root.path().join("lull/inst");
        fs::write(cpu_dir.join("cpu.max"), cpu_max).unwrap();
        if let Some(burst) = burst {
            fs::write(cpu_dir.join("cpu.max.burst"), burst).unwrap();
        }
        Tree {
            _root: root,
            cgroup,
            cpu_dir,
        }
    }

    fn v1_tree(quota: &str, period: &str, burst: Option<&str>) -> Tree {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V1(V1Hierarchies {
            cpu: Some(root.path().join("cpu")),
            cpuacct: Some(root.path().join("cpuacct")),
            ..V1Hierarchies::default()
        });
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/inst")).unwrap();
        cgroup.create().unwrap();
        let cpu_dir = root.path().join("cpu/lull/inst");
        fs::write(cpu_dir.join("cpu.cfs_quota_us"), quota).unwrap();
        fs::write(cpu_dir.join("cpu.cfs_period_us"), period).unwrap();
        if let Some(burst) = burst {
            fs::write(cpu_dir.join("cpu.cfs_burst_us"), burst).unwrap();
        }
        Tree {
            _root: root,
            cgroup,
            cpu_dir,
        }
    }

    fn names(fs: &FakeCgroupFs) -> Vec<(String, String)> {
        fs.writes()
            .into_iter()
            .map(|(path, value)| {
                (
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    String::from_utf8(value).unwrap(),
                )
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn v2_unlimited_gate_writes_exact_cpu_max_bytes() {
        let tree = v2_tree("max 100000\n", Some("0\n"));
        let fs = FakeCgroupFs::new();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::UNLIMITED).unwrap();
        assert_eq!(gate.state(), GateState::Unknown);

        assert!(gate.throttle().unwrap());
        assert_eq!(
            fs.writes(),
            vec![(tree.cpu_dir.join("cpu.max"), b"1000 1000000".to_vec())]
        );
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.max")).unwrap(),
            b"1000 1000000"
        );
        assert_eq!(gate.state(), GateState::Throttled);

        // Repeated calls are free and say so.
        assert!(!gate.throttle().unwrap());
        assert_eq!(fs.writes().len(), 1);

        assert!(gate.restore().unwrap());
        assert!(!gate.restore().unwrap());
        assert_eq!(
            fs.writes(),
            vec![
                (tree.cpu_dir.join("cpu.max"), b"1000 1000000".to_vec()),
                (tree.cpu_dir.join("cpu.max"), b"max 100000".to_vec()),
            ]
        );
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.max")).unwrap(),
            b"max 100000"
        );
        assert_eq!(gate.state(), GateState::Restored);
    }

    #[test]
    fn v2_limited_gate_restores_the_configured_quota() {
        let tree = v2_tree("25000 100000\n", None);
        let fs = FakeCgroupFs::new();
        let limit = CpuLimit::from_vcpus(0.25).unwrap();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, limit).unwrap();
        assert!(gate.restore().unwrap());
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert!(!gate.is_settled());
        // The restore first grants a second's worth of the limit at the configured period
        // (bridging the kernel's 1 s throttled period), then settles on the limit itself.
        assert!(gate.settle_now().unwrap());
        assert!(gate.is_settled());
        assert!(!gate.settle_now().unwrap(), "settling twice writes nothing");
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.max", "250000 100000"),
                ("cpu.max", "1000 1000000"),
                ("cpu.max", "250000 100000"),
                ("cpu.max", "25000 100000"),
            ])
        );
    }

    #[test]
    fn a_settle_after_a_throttle_writes_nothing() {
        let tree = v2_tree("25000 100000\n", None);
        let fs = FakeCgroupFs::new();
        let gate =
            CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::from_vcpus(0.25).unwrap()).unwrap();
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        let generation = gate.inner.generation.load(Ordering::SeqCst);
        assert!(gate.throttle().unwrap());
        fs.clear_writes();
        assert_eq!(gate.inner.settle(generation).unwrap(), Settle::Stale);
        assert!(names(&fs).is_empty());
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.max")).unwrap(),
            b"1000 1000000"
        );
    }

    #[test]
    fn the_settle_thread_takes_the_second_step() {
        let tree = v1_tree("25000\n", "100000\n", None);
        let fs = FakeCgroupFs::new();
        let gate =
            CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::from_vcpus(0.25).unwrap()).unwrap();
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_quota_us")).unwrap(),
            b"250000"
        );
        let deadline = std::time::Instant::now() + SETTLE_AFTER * 5;
        while !gate.is_settled() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(gate.is_settled(), "the scheduled second step never came");
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_quota_us")).unwrap(),
            b"25000"
        );
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_period_us")).unwrap(),
            b"100000"
        );
    }

    #[test]
    fn v2_burst_is_lowered_before_the_quota_once() {
        let tree = v2_tree("25000 100000\n", Some("5000\n"));
        let fs = FakeCgroupFs::new();
        // The fake kernel rejects the throttled quota while burst is above it.
        let cpu_max = fs.open_control(&tree.cpu_dir.join("cpu.max")).unwrap();
        let err = cpu_max.write_value(b"1000 1000000").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));

        let limit = CpuLimit::from_vcpus(0.25).unwrap();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, limit).unwrap();
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert!(gate.throttle().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.max.burst", "0"),
                ("cpu.max", "1000 1000000"),
                ("cpu.max", "250000 100000"),
                ("cpu.max", "1000 1000000"),
            ])
        );
    }

    #[test]
    fn v1_unlimited_gate_writes_quota_then_period() {
        let tree = v1_tree("-1\n", "100000\n", Some("0\n"));
        let fs = FakeCgroupFs::new();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::UNLIMITED).unwrap();
        assert!(gate.throttle().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.cfs_quota_us", "1000"),
                ("cpu.cfs_period_us", "1000000")
            ])
        );
        fs.clear_writes();
        assert!(gate.restore().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[("cpu.cfs_quota_us", "-1"), ("cpu.cfs_period_us", "100000")])
        );
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_quota_us")).unwrap(),
            b"-1"
        );
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_period_us")).unwrap(),
            b"100000"
        );
    }

    #[test]
    fn v1_burst_goes_to_zero_first_then_quota_then_period() {
        let tree = v1_tree("50000\n", "100000\n", Some("20000\n"));
        let fs = FakeCgroupFs::new();
        // Lowering the quota below the burst first is what the kernel rejects.
        let quota = fs
            .open_control(&tree.cpu_dir.join("cpu.cfs_quota_us"))
            .unwrap();
        assert_eq!(
            quota.write_value(b"1000").unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );

        let limit = CpuLimit::from_vcpus(0.5).unwrap();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, limit).unwrap();
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.cfs_burst_us", "0"),
                ("cpu.cfs_quota_us", "1000"),
                ("cpu.cfs_period_us", "1000000"),
                ("cpu.cfs_quota_us", "500000"),
                ("cpu.cfs_period_us", "100000"),
            ])
        );
    }

    #[test]
    fn v1_without_burst_file_writes_no_burst() {
        let tree = v1_tree("25000\n", "100000\n", None);
        let fs = FakeCgroupFs::new();
        let gate =
            CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::from_vcpus(0.25).unwrap()).unwrap();
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.cfs_quota_us", "1000"),
                ("cpu.cfs_period_us", "1000000"),
                ("cpu.cfs_quota_us", "250000"),
                ("cpu.cfs_period_us", "100000"),
            ])
        );
        fs.clear_writes();
        assert!(gate.settle_now().unwrap());
        // The period is already the configured one: settling is one quota write.
        assert_eq!(names(&fs), pairs(&[("cpu.cfs_quota_us", "25000")]));
    }

    #[test]
    fn write_errors_name_the_file_and_the_next_call_retries() {
        let tree = v2_tree("max 100000\n", None);
        let fs = FakeCgroupFs::new();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::UNLIMITED).unwrap();
        let cpu_max = tree.cpu_dir.join("cpu.max");
        fs.fail_writes(&cpu_max, libc::EINVAL);
        let err = gate.throttle().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot write \"1000 1000000\" to {}", cpu_max.display())
        );
        let GateError::Write { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(gate.state(), GateState::Unknown);

        fs.clear_failures();
        // Same request as before, but it was never applied: this call writes.
        assert!(gate.throttle().unwrap());
        assert_eq!(gate.state(), GateState::Throttled);
        assert_eq!(names(&fs), pairs(&[("cpu.max", "1000 1000000")]));
    }

    #[test]
    fn missing_files_and_controllers_fail_at_open() {
        let tree = v2_tree("max 100000\n", None);
        fs::remove_file(tree.cpu_dir.join("cpu.max")).unwrap();
        let err = CpuGate::open_with(&FakeCgroupFs::new(), &tree.cgroup, CpuLimit::UNLIMITED)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot open {}", tree.cpu_dir.join("cpu.max").display())
        );

        let layout = CgroupLayout::V1(V1Hierarchies {
            memory: Some(PathBuf::from("/cg/memory")),
            ..V1Hierarchies::default()
        });
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/inst")).unwrap();
        let err =
            CpuGate::open_with(&FakeCgroupFs::new(), &cgroup, CpuLimit::UNLIMITED).unwrap_err();
        assert_eq!(err.to_string(), "cgroup /lull/inst has no cpu controller");
    }

    /// Wraps the fake so that the first write calls `restore` on the gate from inside
    /// `throttle`, as another thread would while the first one is writing.
    struct ReentrantFs {
        inner: FakeCgroupFs,
        gate: Arc<OnceLock<Weak<CpuGate>>>,
    }

    #[derive(Debug)]
    struct ReentrantFile {
        inner: Box<dyn ControlFile>,
        gate: Arc<OnceLock<Weak<CpuGate>>>,
        fired: AtomicBool,
    }

    impl ControlFile for ReentrantFile {
        fn write_value(&self, value: &[u8]) -> io::Result<()> {
            if !self.fired.swap(true, Ordering::SeqCst)
                && let Some(gate) = self.gate.get().and_then(Weak::upgrade)
            {
                // The request changes, but this caller does not write: the holder will.
                assert!(gate.restore().unwrap());
                assert_eq!(gate.state(), GateState::Unknown);
            }
            self.inner.write_value(value)
        }
    }

    impl CgroupFs for ReentrantFs {
        fn open_control(&self, path: &Path) -> io::Result<Box<dyn ControlFile>> {
            Ok(Box::new(ReentrantFile {
                inner: self.inner.open_control(path)?,
                gate: Arc::clone(&self.gate),
                fired: AtomicBool::new(false),
            }))
        }

        fn read_control(&self, path: &Path) -> io::Result<String> {
            self.inner.read_control(path)
        }

        fn exists(&self, path: &Path) -> bool {
            self.inner.exists(path)
        }
    }

    #[test]
    fn a_request_made_while_another_caller_writes_is_applied_by_that_caller() {
        let tree = v2_tree("max 100000\n", None);
        let fake = FakeCgroupFs::new();
        let fs = ReentrantFs {
            inner: fake.clone(),
            gate: Arc::new(OnceLock::new()),
        };
        let gate = Arc::new(CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::UNLIMITED).unwrap());
        fs.gate.set(Arc::downgrade(&gate)).unwrap();

        assert!(gate.throttle().unwrap());
        assert_eq!(
            names(&fake),
            pairs(&[("cpu.max", "1000 1000000"), ("cpu.max", "max 100000")])
        );
        assert_eq!(gate.state(), GateState::Restored);
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.max")).unwrap(),
            b"max 100000"
        );
    }

    #[test]
    fn many_threads_end_in_the_last_requested_state() {
        let tree = v1_tree("-1\n", "100000\n", Some("0\n"));
        let fs = FakeCgroupFs::new();
        let gate: Arc<dyn Gate> =
            Arc::new(CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::UNLIMITED).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let gate = Arc::clone(&gate);
                std::thread::spawn(move || {
                    for i in 0..500 {
                        if (i + t) % 2 == 0 {
                            gate.throttle().unwrap();
                        } else {
                            gate.restore().unwrap();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        gate.throttle().unwrap();
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_quota_us")).unwrap(),
            b"1000"
        );
        assert_eq!(
            fs::read(tree.cpu_dir.join("cpu.cfs_period_us")).unwrap(),
            b"1000000"
        );
        // Writes come in whole plans: quota then period, never interleaved.
        let writes = names(&fs);
        assert_eq!(writes.len() % 2, 0);
        for pair in writes.chunks(2) {
            assert!(
                pair == pairs(&[
                    ("cpu.cfs_quota_us", "1000"),
                    ("cpu.cfs_period_us", "1000000")
                ]) || pair == pairs(&[("cpu.cfs_quota_us", "-1"), ("cpu.cfs_period_us", "100000")]),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn fake_gate_counts_changes() {
        let gate = crate::cgroup::fake::FakeGate::new();
        assert!(gate.throttle().unwrap());
        assert!(!gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert_eq!((gate.throttles(), gate.restores()), (1, 1));
        assert_eq!(gate.state(), GateState::Restored);
    }
}
