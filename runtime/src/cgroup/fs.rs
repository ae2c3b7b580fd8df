//! The one host facility the CPU gate needs: control files opened once, written many times.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A cgroup control file opened for writing.
///
/// A cgroup control file takes a whole value per write, so [`ControlFile::write_value`] is one
/// `pwrite` at offset 0 and must not allocate.
pub trait ControlFile: Send + Sync + fmt::Debug {
    /// Writes `value` with a single write at offset 0.
    fn write_value(&self, value: &[u8]) -> io::Result<()>;
}

/// Opens and reads cgroup control files.
pub trait CgroupFs: Send + Sync {
    /// Opens `path` for writing, once; the handle is kept for the life of the gate.
    fn open_control(&self, path: &Path) -> io::Result<Box<dyn ControlFile>>;

    /// Reads the whole of `path`.
    fn read_control(&self, path: &Path) -> io::Result<String>;

    /// Whether `path` exists (optional control files such as `cpu.cfs_burst_us`).
    fn exists(&self, path: &Path) -> bool;
}

/// The real cgroupfs.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCgroupFs;

#[derive(Debug)]
struct HostControlFile {
    file: File,
}

impl ControlFile for HostControlFile {
    fn write_value(&self, value: &[u8]) -> io::Result<()> {
        let written = self.file.write_at(value, 0)?;
        if written != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to cgroup control file",
            ));
        }
        Ok(())
    }
}

impl CgroupFs for HostCgroupFs {
    fn open_control(&self, path: &Path) -> io::Result<Box<dyn ControlFile>> {
        // std opens with O_CLOEXEC; a cgroup file needs neither truncation nor appending.
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(HostControlFile { file }))
    }

    fn read_control(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}
