//! Fakes for tests: a cgroupfs over a plain directory tree, and a gate that only counts.
//!
//! [`FakeCgroupFs`] stores each control file as a regular file that every write replaces (as
//! cgroupfs does), records every write in order, can fail chosen writes, and checks CPU
//! bandwidth writes against the kernel's rules (quota ≥ 1 ms, 1 ms ≤ period ≤ 1 s,
//! burst ≤ quota) like the kernel does, so a wrong write order fails in tests too.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{CgroupFs, ControlFile, Gate, GateError, GateState};

#[derive(Debug, Default)]
struct Shared {
    writes: Vec<(PathBuf, Vec<u8>)>,
    failures: HashMap<PathBuf, i32>,
}

/// A cgroupfs over regular files (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct FakeCgroupFs {
    shared: Arc<Mutex<Shared>>,
}

impl FakeCgroupFs {
    pub fn new() -> FakeCgroupFs {
        FakeCgroupFs::default()
    }

    /// Every successful write so far, in order: (path, bytes).
    pub fn writes(&self) -> Vec<(PathBuf, Vec<u8>)> {
        self.lock().writes.clone()
    }

    pub fn clear_writes(&self) {
        self.lock().writes.clear();
    }

    /// Makes every later write to `path` fail with `errno`.
    pub fn fail_writes(&self, path: &Path, errno: i32) {
        self.lock().failures.insert(path.to_path_buf(), errno);
    }

    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A test that panicked while holding the lock has failed already; keep the data.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug)]
struct FakeControlFile {
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
}

impl ControlFile for FakeControlFile {
    fn write_value(&self, value: &[u8]) -> io::Result<()> {
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(errno) = shared.failures.get(&self.path) {
            return Err(io::Error::from_raw_os_error(*errno));
        }
        check_bandwidth_rules(&self.path, value)?;
        std::fs::write(&self.path, value)?;
        shared.writes.push((self.path.clone(), value.to_vec()));
        Ok(())
    }
}

impl CgroupFs for FakeCgroupFs {
    fn open_control(&self, path: &Path) -> io::Result<Box<dyn ControlFile>> {
        if !path.is_file() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(Box::new(FakeControlFile {
            path: path.to_path_buf(),
            shared: Arc::clone(&self.shared),
        }))
    }

    fn read_control(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// CFS bandwidth as the kernel would hold it after the write, in µs (`None` quota = max).
struct Bandwidth {
    quota: Option<u64>,
    period: u64,
    burst: u64,
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

fn parse_quota(text: &str) -> io::Result<Option<u64>> {
    match text {
        "max" | "-1" => Ok(None),
        number => number.parse().map(Some).map_err(|_| einval()),
    }
}

fn parse_u64(text: &str) -> io::Result<u64> {
    text.parse().map_err(|_| einval())
}

/// Checks a write to a CFS bandwidth file against the file's siblings, like
/// `tg_set_cfs_bandwidth` does; other files pass.
fn check_bandwidth_rules(path: &Path, value: &[u8]) -> io::Result<()> {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return Ok(());
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let value = std::str::from_utf8(value).map_err(|_| einval())?.trim();
    let v1 = |file: &str| read_trimmed(&dir.join(file));
    let v2_max = || -> io::Result<(Option<u64>, u64)> {
        let current = read_trimmed(&dir.join("cpu.max")).unwrap_or_else(|| "max 100000".into());
        let mut fields = current.split_whitespace();
        let quota = parse_quota(fields.next().unwrap_or("max"))?;
        let period = parse_u64(fields.next().unwrap_or("100000"))?;
        Ok((quota, period))
    };
    let v2_burst = || read_trimmed(&dir.join("cpu.max.burst")).unwrap_or_else(|| "0".into());
    let bandwidth = match name {
        "cpu.cfs_quota_us" | "cpu.cfs_period_us" | "cpu.cfs_burst_us" => {
            let pick = |file: &str, default: &str| {
                if file == name {
                    value.to_owned()
                } else {
                    v1(file).unwrap_or_else(|| default.to_owned())
                }
            };
            Bandwidth {
                quota: parse_quota(&pick("cpu.cfs_quota_us", "-1"))?,
                period: parse_u64(&pick("cpu.cfs_period_us", "100000"))?,
                burst: parse_u64(&pick("cpu.cfs_burst_us", "0"))?,
            }
        }
        "cpu.max" => {
            let (_, current_period) = v2_max()?;
            let mut fields = value.split_whitespace();
            let quota = parse_quota(fields.next().ok_or_else(einval)?)?;
            let period = match fields.next() {
                Some(period) => parse_u64(period)?,
                None => current_period,
            };
            if fields.next().is_some() {
                return Err(einval());
            }
            Bandwidth {
                quota,
                period,
                burst: parse_u64(&v2_burst())?,
            }
        }
        "cpu.max.burst" => {
            let (quota, period) = v2_max()?;
            Bandwidth {
                quota,
                period,
                burst: parse_u64(value)?,
            }
        }
        _ => return Ok(()),
    };
    if !(1_000..=1_000_000).contains(&bandwidth.period) {
        return Err(einval());
    }
    if let Some(quota) = bandwidth.quota
        && (quota < 1_000 || bandwidth.burst > quota)
    {
        return Err(einval());
    }
    Ok(())
}

/// A gate that records its state and counts changes, for the proxy's tests.
#[derive(Debug, Default)]
pub struct FakeGate {
    state: AtomicU8,
    throttles: AtomicUsize,
    restores: AtomicUsize,
}

impl FakeGate {
    pub fn new() -> FakeGate {
        FakeGate::default()
    }

    pub fn state(&self) -> GateState {
        match self.state.load(Ordering::SeqCst) {
            1 => GateState::Restored,
            2 => GateState::Throttled,
            _ => GateState::Unknown,
        }
    }

    /// How many `throttle` calls changed the state.
    pub fn throttles(&self) -> usize {
        self.throttles.load(Ordering::SeqCst)
    }

    /// How many `restore` calls changed the state.
    pub fn restores(&self) -> usize {
        self.restores.load(Ordering::SeqCst)
    }

    fn set(&self, state: GateState, counter: &AtomicUsize) -> bool {
        let changed = self.state.swap(state as u8, Ordering::SeqCst) != state as u8;
        if changed {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        changed
    }
}

impl Gate for FakeGate {
    fn throttle(&self) -> Result<bool, GateError> {
        Ok(self.set(GateState::Throttled, &self.throttles))
    }

    fn restore(&self) -> Result<bool, GateError> {
        Ok(self.set(GateState::Restored, &self.restores))
    }
}
