//! Idle tier 2: freezing an instance's cgroup, so that an instance idle for long does not run at
//! all (no timer, no GC thread, no busy loop wakes up), while its memory stays where it is.
//!
//! v2 writes `1`/`0` to `cgroup.freeze` and reads `frozen` in `cgroup.events`; v1 writes
//! `FROZEN`/`THAWED` to `freezer.state` and reads it back (`FREEZING` while in progress). The
//! write asks; the kernel freezes every task at its next return to user space, so [`Freezer::freeze`]
//! waits (briefly, polling) until the cgroup reports frozen, and thaws again if that does not
//! happen in time. Thawing takes effect at once. A frozen task cannot act on a signal: whoever
//! stops an instance thaws it first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CgroupError, CgroupFs, ControlFile, Controller, InstanceCgroup};

/// How long [`Freezer::freeze`] waits for every task to stop.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(1);

/// Freezes and thaws one cgroup.
pub struct Freezer {
    fs: Arc<dyn CgroupFs>,
    control: Box<dyn ControlFile>,
    control_path: PathBuf,
    /// What tells whether the freeze is complete.
    state_path: PathBuf,
    v2: bool,
}

impl std::fmt::Debug for Freezer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Freezer")
            .field("control", &self.control_path)
            .finish_non_exhaustive()
    }
}

impl Freezer {
    /// The freezer of `cgroup` (the group holding the instance's processes). On v1 the freezer
    /// hierarchy must be mounted.
    pub fn open(fs: Arc<dyn CgroupFs>, cgroup: &InstanceCgroup) -> Result<Freezer, CgroupError> {
        let dir = cgroup.require_dir(Controller::Freezer)?;
        let v2 = cgroup.is_v2();
        let (control_path, state_path) = match v2 {
            true => (dir.join("cgroup.freeze"), dir.join("cgroup.events")),
            false => (dir.join("freezer.state"), dir.join("freezer.state")),
        };
        let control = fs
            .open_control(&control_path)
            .map_err(|source| CgroupError::Write {
                path: control_path.clone(),
                source,
            })?;
        Ok(Freezer {
            fs,
            control,
            control_path,
            state_path,
            v2,
        })
    }

    /// Freezes every task of the cgroup; returns once they all are (or thaws them again and
    /// fails after [`FREEZE_TIMEOUT`]: a task stuck in the kernel, e.g. on a hung mount).
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.write(if self.v2 { b"1" } else { b"FROZEN" })?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            if self.is_frozen()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.thaw();
                return Err(CgroupError::FreezeTimeout {
                    path: self.state_path.clone(),
                    waited: FREEZE_TIMEOUT,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Lets every task run again (at once).
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.write(if self.v2 { b"0" } else { b"THAWED" })
    }

    /// Whether every task is frozen (v1 `FREEZING` is not).
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        let text = self
            .fs
            .read_control(&self.state_path)
            .map_err(|source| CgroupError::Read {
                path: self.state_path.clone(),
                source,
            })?;
        parse_frozen(&self.state_path, &text, self.v2)
    }

    pub fn control_path(&self) -> &Path {
        &self.control_path
    }

    fn write(&self, value: &[u8]) -> Result<(), CgroupError> {
        self.control
            .write_value(value)
            .map_err(|source| CgroupError::Write {
                path: self.control_path.clone(),
                source,
            })
    }
}

fn parse_frozen(path: &Path, text: &str, v2: bool) -> Result<bool, CgroupError> {
    let bad = |reason: String| CgroupError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    if !v2 {
        return match text.trim() {
            "FROZEN" => Ok(true),
            "FREEZING" | "THAWED" => Ok(false),
            other => Err(bad(format!("freezer state {other:?}"))),
        };
    }
    text.lines()
        .find_map(|l| l.strip_prefix("frozen "))
        .map(|v| v.trim() == "1")
        .ok_or_else(|| bad("no `frozen` line".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::fake::FakeCgroupFs;
    use crate::cgroup::{CgroupLayout, V1Hierarchies};

    fn v2_tree() -> (tempfile::TempDir, InstanceCgroup) {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V2 {
            mount_point: root.path().to_path_buf(),
        };
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/i1/app")).unwrap();
        cgroup.create().unwrap();
        let dir = cgroup.controller_dir(Controller::Freezer).unwrap();
        std::fs::write(dir.join("cgroup.freeze"), "0\n").unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        (root, cgroup)
    }

    #[test]
    fn v2_freezes_waits_for_frozen_and_thaws() {
        let (_root, cgroup) = v2_tree();
        let fs = FakeCgroupFs::new();
        let freezer = Freezer::open(Arc::new(fs.clone()), &cgroup).unwrap();
        let dir = cgroup
            .controller_dir(Controller::Freezer)
            .unwrap()
            .to_owned();
        // The "kernel" reports frozen a few ms after the write.
        let events = dir.join("cgroup.events");
        let kernel = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            std::fs::write(events, "populated 1\nfrozen 1\n").unwrap();
        });
        freezer.freeze().unwrap();
        kernel.join().unwrap();
        assert!(freezer.is_frozen().unwrap());
        freezer.thaw().unwrap();
        let writes: Vec<_> = fs
            .writes()
            .into_iter()
            .map(|(p, v)| {
                (
                    p.file_name().unwrap().to_owned(),
                    String::from_utf8(v).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            writes,
            [
                ("cgroup.freeze".into(), "1".into()),
                ("cgroup.freeze".into(), "0".into())
            ]
        );
    }

    #[test]
    fn a_freeze_that_never_completes_thaws_and_fails() {
        let (_root, cgroup) = v2_tree();
        let fs = FakeCgroupFs::new();
        let freezer = Freezer::open(Arc::new(fs.clone()), &cgroup).unwrap();
        let e = freezer.freeze().unwrap_err();
        assert!(e.to_string().contains("cgroup.events"), "{e}");
        let last = fs.writes().pop().unwrap();
        assert_eq!(last.1, b"0", "thawed again");
    }

    #[test]
    fn v1_reads_the_freezer_state() {
        let p = Path::new("freezer.state");
        assert!(parse_frozen(p, "FROZEN\n", false).unwrap());
        assert!(!parse_frozen(p, "FREEZING\n", false).unwrap());
        assert!(!parse_frozen(p, "THAWED\n", false).unwrap());
        assert!(parse_frozen(p, "BOILING\n", false).is_err());
        assert!(parse_frozen(Path::new("cgroup.events"), "populated 0\n", true).is_err());
        // Without a freezer hierarchy there is no freezer.
        let layout = CgroupLayout::V1(V1Hierarchies::default());
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/i1")).unwrap();
        let e = Freezer::open(Arc::new(FakeCgroupFs::new()), &cgroup).unwrap_err();
        assert!(e.to_string().contains("freezer"), "{e}");
    }
}
