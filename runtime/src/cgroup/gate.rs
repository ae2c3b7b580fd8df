//! The CPU gate: an instance's CPU limit flipped between its configured value and the kernel's
//! floor with one `pwrite` to a control file opened in advance.
//!
//! The proxy throttles an instance when its last request finishes and restores it when a request
//! arrives. Both calls are cheap when nothing changes (one atomic swap), never block, and never
//! allocate on success: the bytes to write are formatted when the gate is opened.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

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
/// - restore: on v1 quota → configured (or -1), then period → configured. The quota write
///   unthrottles at once; the intermediate Q/1000000 is valid since Q ≥ 1000. Burst stays 0.
/// - on v1, when the restored period is the throttled one (1 s, as for every instance: the
///   gate's group keeps one period), the period is written once, after the first quota write,
///   and never again: each write to a bandwidth file takes every CPU's run-queue lock.
///
/// On v2 `cpu.max` takes quota and period in one write.
///
/// Calls from many threads are serialised without blocking: a caller that finds another one
/// writing records what it wants and returns; the writer applies the latest request before it
/// lets go. An error is returned to whichever caller was writing, and the next call rewrites
/// everything.
#[derive(Debug)]
pub struct CpuGate {
    limit: CpuLimit,
    throttle_writes: Box<[ControlWrite]>,
    restore_writes: Box<[ControlWrite]>,
    burst_reset: Option<ControlWrite>,
    burst_is_zero: AtomicBool,
    /// v1 with one period for both states: the period's one write, and whether it holds.
    period_pin: Option<ControlWrite>,
    period_is_pinned: AtomicBool,
    desired: AtomicU8,
    applied: AtomicU8,
    busy: AtomicBool,
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
        let mut period_pin = None;
        let mut period_is_pinned = false;
        let (throttle_writes, restore_writes, burst_path) = if cgroup.is_v2() {
            let path = dir.join("cpu.max");
            let cpu_max = open(fs, &path)?;
            (
                vec![ControlWrite::new(
                    &cpu_max,
                    &path,
                    throttled.cpu_max_value(),
                )],
                vec![ControlWrite::new(&cpu_max, &path, limit.cpu_max_value())],
                dir.join("cpu.max.burst"),
            )
        } else {
            let quota_path = dir.join("cpu.cfs_quota_us");
            let period_path = dir.join("cpu.cfs_period_us");
            let quota = open(fs, &quota_path)?;
            let period = open(fs, &period_path)?;
            let mut throttle = vec![ControlWrite::new(
                &quota,
                &quota_path,
                throttled.cfs_quota_value(),
            )];
            let mut restore = vec![ControlWrite::new(
                &quota,
                &quota_path,
                limit.cfs_quota_value(),
            )];
            let throttled_period = throttled.period_us().to_string();
            if limit.period_us() == throttled.period_us() {
                period_is_pinned = fs
                    .read_control(&period_path)
                    .is_ok_and(|current| current.trim() == throttled_period);
                period_pin = Some(ControlWrite::new(&period, &period_path, throttled_period));
            } else {
                throttle.push(ControlWrite::new(&period, &period_path, throttled_period));
                let restored_period = limit.period_us().to_string();
                restore.push(ControlWrite::new(&period, &period_path, restored_period));
            }
            (throttle, restore, dir.join("cpu.cfs_burst_us"))
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
            limit,
            throttle_writes: throttle_writes.into_boxed_slice(),
            restore_writes: restore_writes.into_boxed_slice(),
            burst_reset,
            burst_is_zero: AtomicBool::new(burst_is_zero),
            period_pin,
            period_is_pinned: AtomicBool::new(period_is_pinned),
            desired: AtomicU8::new(GateState::Unknown as u8),
            applied: AtomicU8::new(GateState::Unknown as u8),
            busy: AtomicBool::new(false),
        })
    }

    /// The limit [`Gate::restore`] writes.
    pub fn limit(&self) -> CpuLimit {
        self.limit
    }

    /// The state last written to the cgroup.
    pub fn state(&self) -> GateState {
        GateState::from_u8(self.applied.load(Ordering::SeqCst))
    }

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
        if let Some(pin) = &self.period_pin
            && !self.period_is_pinned.load(Ordering::SeqCst)
        {
            pin.write()?;
            self.period_is_pinned.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Gate for CpuGate {
    fn throttle(&self) -> Result<bool, GateError> {
        self.set(GateState::Throttled)
    }

    fn restore(&self) -> Result<bool, GateError> {
        self.set(GateState::Restored)
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
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.max", "25000 100000"),
                ("cpu.max", "1000 1000000"),
                ("cpu.max", "25000 100000"),
            ])
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
                ("cpu.max", "25000 100000"),
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
    fn v1_gate_with_one_period_writes_it_once() {
        // An instance's gate: restored is "no quota" at the throttled period (1 s).
        let tree = v1_tree("-1\n", "100000\n", None);
        let fs = FakeCgroupFs::new();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::GATE_OPEN).unwrap();
        let period = tree.cpu_dir.join("cpu.cfs_period_us");
        // The period's write fails once: the next call writes it again.
        fs.fail_writes(&period, libc::EINVAL);
        assert!(gate.throttle().is_err());
        assert_eq!(gate.state(), GateState::Unknown);
        fs.clear_failures();
        fs.clear_writes();
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert!(gate.throttle().unwrap());
        assert!(gate.restore().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[
                ("cpu.cfs_quota_us", "1000"),
                ("cpu.cfs_period_us", "1000000"),
                ("cpu.cfs_quota_us", "-1"),
                ("cpu.cfs_quota_us", "1000"),
                ("cpu.cfs_quota_us", "-1"),
            ])
        );
        assert_eq!(fs::read(&period).unwrap(), b"1000000");

        // A group whose period already holds 1 s is never written it.
        let tree = v1_tree("-1\n", "1000000\n", None);
        let fs = FakeCgroupFs::new();
        let gate = CpuGate::open_with(&fs, &tree.cgroup, CpuLimit::GATE_OPEN).unwrap();
        assert!(gate.restore().unwrap());
        assert!(gate.throttle().unwrap());
        assert_eq!(
            names(&fs),
            pairs(&[("cpu.cfs_quota_us", "-1"), ("cpu.cfs_quota_us", "1000")])
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
                ("cpu.cfs_quota_us", "50000"),
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
                ("cpu.cfs_quota_us", "25000"),
                ("cpu.cfs_period_us", "100000"),
            ])
        );
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
