//! An instance's CPU usage counter, kept open: the CPU gate reads it at the start and end of
//! every busy stretch, and opening the file each time costs several times the read itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::CgroupError;
use super::instance::{parse_keyed, parse_number};

/// Which file, and how its figure reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UsageKind {
    /// v1 `cpuacct.usage`: nanoseconds, alone.
    CpuacctNs,
    /// v2 `cpu.stat`: the `usage_usec` entry, in microseconds.
    CpuStatUsec,
}

impl UsageKind {
    pub(super) fn parse(self, text: &str, path: &Path) -> Result<u64, CgroupError> {
        match self {
            UsageKind::CpuacctNs => parse_number(text, path),
            UsageKind::CpuStatUsec => {
                Ok(parse_keyed(text, path, "usage_usec")?.saturating_mul(1_000))
            }
        }
    }
}

/// Both files are a few hundred bytes at most; a read that fills this is read again whole.
const READ_BUFFER: usize = 2048;

/// The usage counter of one cgroup, open for the life of the instance.
#[derive(Debug)]
pub struct UsageCounter {
    file: File,
    path: PathBuf,
    kind: UsageKind,
}

impl UsageCounter {
    pub(super) fn open(path: PathBuf, kind: UsageKind) -> Result<UsageCounter, CgroupError> {
        match File::open(&path) {
            Ok(file) => Ok(UsageCounter { file, path, kind }),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    /// Total CPU time the cgroup used, in nanoseconds: one `pread` from offset 0, which makes
    /// the kernel render the file afresh.
    pub fn read_ns(&self) -> Result<u64, CgroupError> {
        let mut buf = [0u8; READ_BUFFER];
        let read = |source| CgroupError::Read {
            path: self.path.clone(),
            source,
        };
        let n = self.file.read_at(&mut buf, 0).map_err(read)?;
        if n == buf.len() {
            let text = std::fs::read_to_string(&self.path).map_err(read)?;
            return self.kind.parse(&text, &self.path);
        }
        // The kernel writes ASCII; anything else fails to parse below, naming the file.
        let text = std::str::from_utf8(&buf[..n]).unwrap_or_default();
        self.kind.parse(text, &self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{CgroupLayout, InstanceCgroup, V1Hierarchies};

    #[test]
    fn v1_counter_reads_the_current_value_each_time() {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V1(V1Hierarchies {
            cpuacct: Some(root.path().join("cpuacct")),
            ..V1Hierarchies::default()
        });
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/i1")).unwrap();
        cgroup.create().unwrap();
        let file = root.path().join("cpuacct/lull/i1/cpuacct.usage");
        std::fs::write(&file, "1000\n").unwrap();
        let counter = cgroup.usage_counter().unwrap();
        assert_eq!(counter.read_ns().unwrap(), 1000);
        // Rewritten in place, as the kernel renders it: shorter than before, then longer.
        std::fs::write(&file, "7\n").unwrap();
        assert_eq!(counter.read_ns().unwrap(), 7);
        std::fs::write(&file, "123456789012\n").unwrap();
        assert_eq!(counter.read_ns().unwrap(), 123_456_789_012);
        std::fs::write(&file, "lots\n").unwrap();
        assert_eq!(
            counter.read_ns().unwrap_err().to_string(),
            format!(
                "unexpected contents in {}: \"lots\" is not a number",
                file.display()
            )
        );
    }

    #[test]
    fn v2_counter_reads_usage_usec_from_cpu_stat() {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V2 {
            mount_point: root.path().to_path_buf(),
        };
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/i2")).unwrap();
        cgroup.create().unwrap();
        let file = root.path().join("lull/i2/cpu.stat");
        std::fs::write(&file, "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n").unwrap();
        let counter = cgroup.usage_counter().unwrap();
        assert_eq!(counter.read_ns().unwrap(), 1_234_000);
        // A file larger than one read is read whole.
        let long = format!("{}usage_usec 99\n", "padding_entry 1\n".repeat(200));
        std::fs::write(&file, long).unwrap();
        assert_eq!(counter.read_ns().unwrap(), 99_000);
    }

    #[test]
    fn a_missing_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        let layout = CgroupLayout::V2 {
            mount_point: root.path().to_path_buf(),
        };
        let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/none")).unwrap();
        let err = cgroup.usage_counter().unwrap_err();
        assert!(
            err.to_string()
                .contains(&root.path().join("lull/none/cpu.stat").display().to_string()),
            "{err}"
        );
    }
}
