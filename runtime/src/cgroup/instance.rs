//! One instance's cgroup: its directories in each hierarchy and what can be read from them.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::usage::{UsageCounter, UsageKind};
use super::{CgroupError, CgroupLayout, Controller, CpuLimit, V1Hierarchies};

/// An instance's cgroup directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupDirs {
    V2(PathBuf),
    V1(V1Hierarchies),
}

/// The cgroup libcontainer creates at the spec's absolute `linux.cgroupsPath`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCgroup {
    cgroups_path: PathBuf,
    dirs: CgroupDirs,
}

/// How often [`InstanceCgroup::remove`] retries an `rmdir` that fails with EBUSY, and how long
/// it waits in between (the kernel needs a moment after the last task exits).
const REMOVE_ATTEMPTS: u32 = 50;
const REMOVE_RETRY_DELAY: Duration = Duration::from_millis(10);

impl InstanceCgroup {
    /// The cgroup at `cgroups_path` (absolute, e.g. `/lull/<instance id>`) under `layout`.
    pub fn new(layout: &CgroupLayout, cgroups_path: &Path) -> Result<InstanceCgroup, CgroupError> {
        let relative = relative_cgroups_path(cgroups_path)?;
        let dirs = match layout {
            CgroupLayout::V2 { mount_point } => CgroupDirs::V2(mount_point.join(&relative)),
            CgroupLayout::V1(mounts) => {
                let join = |mount: &Option<PathBuf>| mount.as_ref().map(|m| m.join(&relative));
                CgroupDirs::V1(V1Hierarchies {
                    cpu: join(&mounts.cpu),
                    cpuacct: join(&mounts.cpuacct),
                    memory: join(&mounts.memory),
                    pids: join(&mounts.pids),
                    freezer: join(&mounts.freezer),
                })
            }
        };
        Ok(InstanceCgroup {
            cgroups_path: cgroups_path.to_path_buf(),
            dirs,
        })
    }

    pub fn cgroups_path(&self) -> &Path {
        &self.cgroups_path
    }

    pub fn dirs(&self) -> &CgroupDirs {
        &self.dirs
    }

    pub fn is_v2(&self) -> bool {
        matches!(self.dirs, CgroupDirs::V2(_))
    }

    /// The directory holding `controller`'s files (the one directory on v2).
    pub fn controller_dir(&self, controller: Controller) -> Option<&Path> {
        match &self.dirs {
            CgroupDirs::V2(dir) => Some(dir),
            CgroupDirs::V1(dirs) => dirs.get(controller),
        }
    }

    /// Like [`InstanceCgroup::controller_dir`], an error when the controller is not mounted.
    pub fn require_dir(&self, controller: Controller) -> Result<&Path, CgroupError> {
        self.controller_dir(controller)
            .ok_or_else(|| CgroupError::MissingController {
                controller: controller.name(),
                cgroups_path: self.cgroups_path.clone(),
            })
    }

    /// Every distinct directory of this cgroup.
    pub fn all_dirs(&self) -> Vec<&Path> {
        match &self.dirs {
            CgroupDirs::V2(dir) => vec![dir.as_path()],
            CgroupDirs::V1(dirs) => dirs.distinct_dirs(),
        }
    }

    /// Whether any of the cgroup's directories exists.
    pub fn exists(&self) -> bool {
        self.all_dirs().iter().any(|dir| dir.is_dir())
    }

    /// Creates the directories (and missing parents). libcontainer does this for instances;
    /// tests and the VM check use it directly.
    pub fn create(&self) -> Result<(), CgroupError> {
        for dir in self.all_dirs() {
            std::fs::create_dir_all(dir).map_err(|source| CgroupError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// Moves process `pid` into the cgroup in every hierarchy.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let value = pid.to_string();
        for dir in self.all_dirs() {
            let path = dir.join("cgroup.procs");
            std::fs::write(&path, &value).map_err(|source| CgroupError::Write { path, source })?;
        }
        Ok(())
    }

    /// Removes the cgroup's directories (not its parents), for leftovers after a crash. An
    /// `rmdir` that fails with EBUSY (tasks still exiting) is retried for about half a second;
    /// directories already gone are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.all_dirs() {
            remove_dir_retrying(dir)?;
        }
        Ok(())
    }

    /// Total CPU time used, in nanoseconds (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`).
    pub fn cpu_usage_ns(&self) -> Result<u64, CgroupError> {
        let (path, kind) = self.usage_file()?;
        kind.parse(&read(&path)?, &path)
    }

    /// The CPU usage counter, opened once for reads over and over (the CPU gate's).
    pub fn usage_counter(&self) -> Result<UsageCounter, CgroupError> {
        let (path, kind) = self.usage_file()?;
        UsageCounter::open(path, kind)
    }

    fn usage_file(&self) -> Result<(PathBuf, UsageKind), CgroupError> {
        Ok(match &self.dirs {
            CgroupDirs::V2(dir) => (dir.join("cpu.stat"), UsageKind::CpuStatUsec),
            CgroupDirs::V1(_) => {
                let dir = self.require_dir(Controller::Cpuacct)?;
                (dir.join("cpuacct.usage"), UsageKind::CpuacctNs)
            }
        })
    }

    /// Memory in use, in bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub fn memory_current(&self) -> Result<u64, CgroupError> {
        let dir = self.require_dir(Controller::Memory)?;
        match &self.dirs {
            CgroupDirs::V2(_) => read_number(&dir.join("memory.current")),
            CgroupDirs::V1(_) => read_number(&dir.join("memory.usage_in_bytes")),
        }
    }

    /// Peak memory, in bytes (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`); `None` on
    /// kernels without `memory.peak` (before 5.19).
    pub fn memory_peak(&self) -> Result<Option<u64>, CgroupError> {
        let dir = self.require_dir(Controller::Memory)?;
        let path = match &self.dirs {
            CgroupDirs::V2(_) => dir.join("memory.peak"),
            CgroupDirs::V1(_) => dir.join("memory.max_usage_in_bytes"),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_number(&text, &path).map(Some),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    /// Processes killed by the OOM killer in this cgroup (`oom_kill` in v1
    /// `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let dir = self.require_dir(Controller::Memory)?;
        match &self.dirs {
            CgroupDirs::V2(_) => read_keyed(&dir.join("memory.events"), "oom_kill"),
            CgroupDirs::V1(_) => read_keyed(&dir.join("memory.oom_control"), "oom_kill"),
        }
    }

    /// Tasks in the cgroup (`pids.current`).
    pub fn pids_current(&self) -> Result<u64, CgroupError> {
        let dir = self.require_dir(Controller::Pids)?;
        read_number(&dir.join("pids.current"))
    }

    /// The CPU limit in force (v2 `cpu.max`, v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`).
    pub fn cpu_limit(&self) -> Result<CpuLimit, CgroupError> {
        let dir = self.require_dir(Controller::Cpu)?;
        match &self.dirs {
            CgroupDirs::V2(_) => {
                let path = dir.join("cpu.max");
                let text = read(&path)?;
                CpuLimit::parse_cpu_max(&text).ok_or_else(|| CgroupError::Parse {
                    path,
                    reason: format!("{:?} is not a valid cpu.max value", text.trim()),
                })
            }
            CgroupDirs::V1(_) => {
                let quota_path = dir.join("cpu.cfs_quota_us");
                let quota_text = read(&quota_path)?;
                let quota: i64 = quota_text.trim().parse().map_err(|_| CgroupError::Parse {
                    path: quota_path.clone(),
                    reason: format!("{:?} is not a number", quota_text.trim()),
                })?;
                let period = read_number(&dir.join("cpu.cfs_period_us"))?;
                let quota = u64::try_from(quota).ok();
                CpuLimit::new(quota, period).map_err(|error| CgroupError::Parse {
                    path: quota_path,
                    reason: error.to_string(),
                })
            }
        }
    }
}

fn relative_cgroups_path(cgroups_path: &Path) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidCgroupsPath {
        path: cgroups_path.to_path_buf(),
        reason,
    };
    if !cgroups_path.is_absolute() {
        return Err(invalid("not absolute"));
    }
    // `Path::components` drops `.` silently; look at the raw segments instead.
    let mut relative = PathBuf::new();
    for segment in cgroups_path
        .as_os_str()
        .as_bytes()
        .split(|byte| *byte == b'/')
    {
        match segment {
            b"" => {}
            b"." | b".." => return Err(invalid("contains . or ..")),
            name => relative.push(OsStr::from_bytes(name)),
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(invalid("names the root cgroup"));
    }
    Ok(relative)
}

fn remove_dir_retrying(dir: &Path) -> Result<(), CgroupError> {
    let mut attempt = 1;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY) && attempt < REMOVE_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(REMOVE_RETRY_DELAY);
            }
            Err(source) => {
                return Err(CgroupError::RemoveDir {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_number(path: &Path) -> Result<u64, CgroupError> {
    parse_number(&read(path)?, path)
}

pub(super) fn parse_number(text: &str, path: &Path) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("{:?} is not a number", text.trim()),
    })
}

/// Reads `key N` from a flat keyed file (`cpu.stat`, `memory.events`, `memory.oom_control`).
fn read_keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    parse_keyed(&read(path)?, path, key)
}

pub(super) fn parse_keyed(text: &str, path: &Path, key: &str) -> Result<u64, CgroupError> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() == Some(key) {
            let value = fields.next().unwrap_or_default();
            return parse_number(value, path);
        }
    }
    Err(CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("no {key} entry"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn v1_layout(root: &Path, combined: bool) -> CgroupLayout {
        let cpu = if combined { "cpu,cpuacct" } else { "cpu" };
        let cpuacct = if combined { "cpu,cpuacct" } else { "cpuacct" };
        CgroupLayout::V1(V1Hierarchies {
            cpu: Some(root.join(cpu)),
            cpuacct: Some(root.join(cpuacct)),
            memory: Some(root.join("memory")),
            pids: Some(root.join("pids")),
            freezer: None,
        })
    }

    #[test]
    fn paths_are_joined_under_each_hierarchy() {
        let root = Path::new("/cg");
        let cgroup = InstanceCgroup::new(&v1_layout(root, false), Path::new("/lull/abc")).unwrap();
        assert_eq!(
            cgroup.controller_dir(Controller::Cpu),
            Some(Path::new("/cg/cpu/lull/abc"))
        );
        assert_eq!(
            cgroup.controller_dir(Controller::Cpuacct),
            Some(Path::new("/cg/cpuacct/lull/abc"))
        );
        assert_eq!(cgroup.controller_dir(Controller::Freezer), None);
        assert_eq!(cgroup.all_dirs().len(), 4);

        let combined = InstanceCgroup::new(&v1_layout(root, true), Path::new("/lull/abc")).unwrap();
        assert_eq!(combined.all_dirs().len(), 3);

        let v2 = CgroupLayout::V2 {
            mount_point: PathBuf::from("/sys/fs/cgroup"),
        };
        let cgroup = InstanceCgroup::new(&v2, Path::new("/lull/abc")).unwrap();
        assert_eq!(
            cgroup.all_dirs(),
            vec![Path::new("/sys/fs/cgroup/lull/abc")]
        );
        assert_eq!(
            cgroup.controller_dir(Controller::Freezer),
            Some(Path::new("/sys/fs/cgroup/lull/abc"))
        );
    }

    #[test]
    fn cgroups_path_must_be_absolute_and_stay_inside() {
        let v2 = CgroupLayout::V2 {
            mount_point: PathBuf::from("/sys/fs/cgroup"),
        };
        for bad in ["lull/abc", "/lull/../../etc", "/", "/lull/./x"] {
            let err = InstanceCgroup::new(&v2, Path::new(bad)).unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidCgroupsPath { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn v2_stats_are_read_from_the_unified_directory() {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V2 {
            mount_point: root.path().to_path_buf(),
        };
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/i1")).unwrap();
        assert!(!cgroup.exists());
        cgroup.create().unwrap();
        assert!(cgroup.exists());
        let dir = root.path().join("lull/i1");
        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n",
        )
        .unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        fs::write(dir.join("memory.peak"), "8192\n").unwrap();
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        fs::write(dir.join("pids.current"), "7\n").unwrap();
        fs::write(dir.join("cpu.max"), "25000 100000\n").unwrap();

        assert_eq!(cgroup.cpu_usage_ns().unwrap(), 1_234_000);
        assert_eq!(cgroup.memory_current().unwrap(), 4096);
        assert_eq!(cgroup.memory_peak().unwrap(), Some(8192));
        assert_eq!(cgroup.oom_kills().unwrap(), 1);
        assert_eq!(cgroup.pids_current().unwrap(), 7);
        assert_eq!(
            cgroup.cpu_limit().unwrap(),
            CpuLimit::from_vcpus(0.25).unwrap()
        );

        fs::remove_file(dir.join("memory.peak")).unwrap();
        assert_eq!(cgroup.memory_peak().unwrap(), None);
        fs::write(dir.join("memory.events"), "low 0\n").unwrap();
        let err = cgroup.oom_kills().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "unexpected contents in {}: no oom_kill entry",
                dir.join("memory.events").display()
            )
        );
    }

    #[test]
    fn v1_stats_are_read_from_each_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        let cgroup =
            InstanceCgroup::new(&v1_layout(root.path(), false), Path::new("/lull/i1")).unwrap();
        cgroup.create().unwrap();
        let dir = |h: &str| root.path().join(h).join("lull/i1");
        fs::write(dir("cpuacct").join("cpuacct.usage"), "987654321\n").unwrap();
        fs::write(dir("memory").join("memory.usage_in_bytes"), "1048576\n").unwrap();
        fs::write(dir("memory").join("memory.max_usage_in_bytes"), "2097152\n").unwrap();
        fs::write(
            dir("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        )
        .unwrap();
        fs::write(dir("pids").join("pids.current"), "3\n").unwrap();
        fs::write(dir("cpu").join("cpu.cfs_quota_us"), "-1\n").unwrap();
        fs::write(dir("cpu").join("cpu.cfs_period_us"), "100000\n").unwrap();

        assert_eq!(cgroup.cpu_usage_ns().unwrap(), 987_654_321);
        assert_eq!(cgroup.memory_current().unwrap(), 1_048_576);
        assert_eq!(cgroup.memory_peak().unwrap(), Some(2_097_152));
        assert_eq!(cgroup.oom_kills().unwrap(), 4);
        assert_eq!(cgroup.pids_current().unwrap(), 3);
        assert_eq!(cgroup.cpu_limit().unwrap(), CpuLimit::UNLIMITED);

        fs::write(dir("pids").join("pids.current"), "many\n").unwrap();
        assert!(matches!(
            cgroup.pids_current().unwrap_err(),
            CgroupError::Parse { .. }
        ));
    }

    #[test]
    fn missing_controller_is_named() {
        let layout = CgroupLayout::V1(V1Hierarchies {
            cpu: Some(PathBuf::from("/cg/cpu")),
            ..V1Hierarchies::default()
        });
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/i1")).unwrap();
        assert_eq!(
            cgroup.cpu_usage_ns().unwrap_err().to_string(),
            "controller cpuacct is not mounted for cgroup /lull/i1"
        );
    }

    #[test]
    fn remove_deletes_each_directory_and_tolerates_missing_ones() {
        let root = tempfile::tempdir().unwrap();
        let cgroup =
            InstanceCgroup::new(&v1_layout(root.path(), false), Path::new("/lull/i1")).unwrap();
        cgroup.create().unwrap();
        fs::remove_dir(root.path().join("pids/lull/i1")).unwrap();
        cgroup.remove().unwrap();
        assert!(!cgroup.exists());
        // Parents stay.
        assert!(root.path().join("cpu/lull").is_dir());
        // A non-empty directory (on cgroupfs: a child cgroup) is an error naming the path.
        cgroup.create().unwrap();
        fs::write(root.path().join("memory/lull/i1/file"), "x").unwrap();
        let err = cgroup.remove().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot remove cgroup directory {}",
                root.path().join("memory/lull/i1").display()
            )
        );
    }
}
