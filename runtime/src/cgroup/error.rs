use std::io;
use std::path::PathBuf;

/// Errors of cgroup layout detection, instance cgroups and limits.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read mount table {path}")]
    ReadMountinfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount table {path} line {line}: {reason}")]
    MountinfoLine {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
    #[error("no cgroup mount in {path}")]
    NoCgroupMount { path: PathBuf },
    #[error("cgroups path {path}: {reason}")]
    InvalidCgroupsPath { path: PathBuf, reason: &'static str },
    #[error("controller {controller} is not mounted for cgroup {cgroups_path}")]
    MissingController {
        controller: &'static str,
        cgroups_path: PathBuf,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup directory {path}")]
    RemoveDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unexpected contents in {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: not frozen after {waited:?} (thawed again)")]
    FreezeTimeout {
        path: PathBuf,
        waited: std::time::Duration,
    },
    #[error("invalid cpu limit: {reason}")]
    InvalidCpuLimit { reason: String },
    #[error("invalid resource {field}: {reason}")]
    InvalidResource { field: &'static str, reason: String },
}
