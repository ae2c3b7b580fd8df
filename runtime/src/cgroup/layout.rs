//! How the host mounts cgroups, read from a mount table (`/proc/self/mountinfo` format).

use std::fmt;
use std::path::{Path, PathBuf};

use super::CgroupError;

/// The controllers lull reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Memory,
    Pids,
    Freezer,
}

impl Controller {
    pub const ALL: [Controller; 5] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Memory,
        Controller::Pids,
        Controller::Freezer,
    ];

    /// The controller's name as the kernel spells it (mount options, `cgroup.controllers`).
    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Freezer => "freezer",
        }
    }

    fn from_mount_option(option: &str) -> Option<Controller> {
        Controller::ALL.into_iter().find(|c| c.name() == option)
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One directory per v1 controller: the hierarchy's mount point in a [`CgroupLayout`], or an
/// instance's directory in it in an [`super::InstanceCgroup`]. A combined `cpu,cpuacct` mount
/// gives the same path for both. `None` where the controller is not mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V1Hierarchies {
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub pids: Option<PathBuf>,
    pub freezer: Option<PathBuf>,
}

impl V1Hierarchies {
    pub fn get(&self, controller: Controller) -> Option<&Path> {
        match controller {
            Controller::Cpu => self.cpu.as_deref(),
            Controller::Cpuacct => self.cpuacct.as_deref(),
            Controller::Memory => self.memory.as_deref(),
            Controller::Pids => self.pids.as_deref(),
            Controller::Freezer => self.freezer.as_deref(),
        }
    }

    fn slot(&mut self, controller: Controller) -> &mut Option<PathBuf> {
        match controller {
            Controller::Cpu => &mut self.cpu,
            Controller::Cpuacct => &mut self.cpuacct,
            Controller::Memory => &mut self.memory,
            Controller::Pids => &mut self.pids,
            Controller::Freezer => &mut self.freezer,
        }
    }

    /// The distinct directories, in [`Controller::ALL`] order (a combined mount appears once).
    pub fn distinct_dirs(&self) -> Vec<&Path> {
        let mut dirs: Vec<&Path> = Vec::new();
        for controller in Controller::ALL {
            if let Some(dir) = self.get(controller)
                && !dirs.contains(&dir)
            {
                dirs.push(dir);
            }
        }
        dirs
    }

    fn is_empty(&self) -> bool {
        Controller::ALL.iter().all(|c| self.get(*c).is_none())
    }
}

/// The host's cgroup layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Pure cgroup v2: every controller lives under one unified mount.
    V2 { mount_point: PathBuf },
    /// cgroup v1, or hybrid (v1 controllers plus a controller-less cgroup2 mount, which lull
    /// ignores like libcontainer does).
    V1(V1Hierarchies),
}

impl CgroupLayout {
    /// Reads the layout of this process's mount namespace from `/proc/self/mountinfo`.
    pub fn host() -> Result<CgroupLayout, CgroupError> {
        CgroupLayout::detect(Path::new("/proc/self/mountinfo"))
    }

    /// Reads the layout from a mount table in `/proc/<pid>/mountinfo` format.
    ///
    /// Any v1 mount carrying cpu, cpuacct, memory, pids or freezer makes the layout V1 (hybrid
    /// hosts included); otherwise a cgroup2 mount makes it V2, preferring `/sys/fs/cgroup`.
    /// Where a hierarchy is mounted twice, a mount of its root wins over a bind mount of a
    /// subdirectory, then the first in the table.
    pub fn detect(mountinfo: &Path) -> Result<CgroupLayout, CgroupError> {
        let text =
            std::fs::read_to_string(mountinfo).map_err(|source| CgroupError::ReadMountinfo {
                path: mountinfo.to_path_buf(),
                source,
            })?;
        CgroupLayout::parse(&text, mountinfo)
    }

    /// Parses mount table text; `origin` names it in errors.
    pub fn parse(mountinfo: &str, origin: &Path) -> Result<CgroupLayout, CgroupError> {
        let mut v1 = V1Hierarchies::default();
        let mut v1_is_root = [false; Controller::ALL.len()];
        let mut v2: Option<(PathBuf, bool)> = None;

        for (index, line) in mountinfo.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry = MountEntry::parse(line).map_err(|reason| CgroupError::MountinfoLine {
                path: origin.to_path_buf(),
                line: index + 1,
                reason,
            })?;
            let is_root = entry.root == "/";
            match entry.fs_type {
                "cgroup" => {
                    for option in entry.super_options.split(',') {
                        let Some(controller) = Controller::from_mount_option(option) else {
                            continue;
                        };
                        let position = controller_index(controller);
                        let slot = v1.slot(controller);
                        if slot.is_none() || (is_root && !v1_is_root[position]) {
                            *slot = Some(entry.mount_point.clone());
                            v1_is_root[position] = is_root;
                        }
                    }
                }
                "cgroup2" => {
                    let preferred = entry.mount_point == Path::new("/sys/fs/cgroup");
                    let better = match &v2 {
                        None => true,
                        Some((current, current_is_root)) => {
                            (preferred && current != Path::new("/sys/fs/cgroup"))
                                || (is_root && !current_is_root)
                        }
                    };
                    if better {
                        v2 = Some((entry.mount_point.clone(), is_root));
                    }
                }
                _ => {}
            }
        }

        if !v1.is_empty() {
            return Ok(CgroupLayout::V1(v1));
        }
        match v2 {
            Some((mount_point, _)) => Ok(CgroupLayout::V2 { mount_point }),
            None => Err(CgroupError::NoCgroupMount {
                path: origin.to_path_buf(),
            }),
        }
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, CgroupLayout::V2 { .. })
    }
}

fn controller_index(controller: Controller) -> usize {
    Controller::ALL
        .iter()
        .position(|c| *c == controller)
        .unwrap_or(0)
}

struct MountEntry<'a> {
    root: String,
    mount_point: PathBuf,
    fs_type: &'a str,
    super_options: &'a str,
}

impl<'a> MountEntry<'a> {
    /// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
    fn parse(line: &'a str) -> Result<MountEntry<'a>, &'static str> {
        let (before, after) = line.split_once(" - ").ok_or("missing \" - \" separator")?;
        let mut fields = before.split(' ');
        let root = fields.nth(3).ok_or("missing root field")?;
        let mount_point = fields.next().ok_or("missing mount point field")?;
        let mut after_fields = after.split(' ');
        let fs_type = after_fields.next().ok_or("missing filesystem type")?;
        let _source = after_fields.next().ok_or("missing mount source")?;
        let super_options = after_fields.next().ok_or("missing super options")?;
        Ok(MountEntry {
            root: unescape(root),
            mount_point: PathBuf::from(unescape(mount_point)),
            fs_type,
            super_options,
        })
    }
}

/// Undoes the kernel's octal escapes in mount table fields (`\040` for a space, etc).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const COMBINED: &str = "\
25 21 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
29 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
";

    const PURE_V2: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn origin() -> &'static Path {
        Path::new("mountinfo")
    }

    #[test]
    fn hybrid_host_is_v1_with_separate_cpu_and_cpuacct() {
        let layout = CgroupLayout::parse(HYBRID, origin()).unwrap();
        let CgroupLayout::V1(v1) = layout else {
            panic!("expected v1, got {layout:?}")
        };
        assert_eq!(v1.cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
        assert_eq!(
            v1.cpuacct.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpuacct"))
        );
        assert_eq!(
            v1.memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert_eq!(v1.pids.as_deref(), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(
            v1.freezer.as_deref(),
            Some(Path::new("/sys/fs/cgroup/freezer"))
        );
        assert_eq!(v1.distinct_dirs().len(), 5);
    }

    #[test]
    fn combined_cpu_cpuacct_mount_serves_both() {
        let CgroupLayout::V1(v1) = CgroupLayout::parse(COMBINED, origin()).unwrap() else {
            panic!("expected v1")
        };
        let both = Path::new("/sys/fs/cgroup/cpu,cpuacct");
        assert_eq!(v1.cpu.as_deref(), Some(both));
        assert_eq!(v1.cpuacct.as_deref(), Some(both));
        assert_eq!(v1.pids, None);
        assert_eq!(v1.freezer, None);
        assert_eq!(
            v1.distinct_dirs(),
            vec![both, Path::new("/sys/fs/cgroup/memory")]
        );
    }

    #[test]
    fn pure_v2_host_is_v2() {
        assert_eq!(
            CgroupLayout::parse(PURE_V2, origin()).unwrap(),
            CgroupLayout::V2 {
                mount_point: PathBuf::from("/sys/fs/cgroup")
            }
        );
    }

    #[test]
    fn root_mount_wins_over_bind_mount_of_a_subdirectory() {
        let table = "\
50 1 0:29 /docker/abc /mnt/cpu rw - cgroup cgroup rw,cpu
51 1 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
52 1 0:29 / /other/cpu rw - cgroup cgroup rw,cpu
";
        let CgroupLayout::V1(v1) = CgroupLayout::parse(table, origin()).unwrap() else {
            panic!("expected v1")
        };
        assert_eq!(v1.cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let table = "26 22 0:23 / /tmp/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            CgroupLayout::parse(table, origin()).unwrap(),
            CgroupLayout::V2 {
                mount_point: PathBuf::from("/tmp/my cgroup")
            }
        );
    }

    #[test]
    fn no_cgroup_mount_and_bad_lines_are_errors() {
        let err = CgroupLayout::parse(
            "22 1 0:21 / /sys rw - sysfs sysfs rw\n",
            Path::new("fake-table"),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no cgroup mount in fake-table");
        let err = CgroupLayout::parse(
            "22 1 0:21 / /sys rw - sysfs sysfs rw\ngarbage line\n",
            origin(),
        )
        .unwrap_err();
        assert!(
            matches!(err, CgroupError::MountinfoLine { line: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn detect_reads_the_table_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mountinfo");
        std::fs::write(&path, HYBRID).unwrap();
        assert!(matches!(
            CgroupLayout::detect(&path).unwrap(),
            CgroupLayout::V1(_)
        ));
        let missing = dir.path().join("missing");
        let err = CgroupLayout::detect(&missing).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read mount table {}", missing.display())
        );
    }

    #[test]
    fn host_layout_is_readable() {
        // This machine and CI are hybrid; a pure v2 host is fine too.
        let layout = CgroupLayout::host().unwrap();
        if let CgroupLayout::V1(v1) = &layout {
            assert!(v1.cpu.is_some(), "{layout:?}");
        }
    }
}
