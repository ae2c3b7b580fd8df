//! Cgroups of instances and the CPU gate.
//!
//! libcontainer creates an instance's cgroup at the spec's absolute `linux.cgroupsPath` and
//! applies [`Resources`] once, at create. This module does the rest:
//!
//! - [`CgroupLayout`] tells how the host mounts cgroups: pure v2 (one unified mount) or v1/hybrid
//!   (one mount per controller; `cpu` and `cpuacct` may be one mount or two).
//! - [`InstanceCgroup`] names one instance's directories in each hierarchy and reads its usage
//!   (CPU time, memory, OOM kills, pids); it also removes leftovers after a crash.
//! - [`CpuLimit`] and [`Resources`] are the validated limits and their OCI form.
//! - [`CpuGate`] flips an instance between its configured CPU limit and a near-zero quota with one
//!   `pwrite` to a file opened in advance. The proxy sees it only as a [`Gate`].
//!
//! - [`delegate`] decides where instances' cgroups go: under the daemon's delegated systemd
//!   subtree on cgroup v2, under a fixed parent otherwise.
//!
//! Host facilities are parameters: the mount table is a path and control files are opened
//! through [`CgroupFs`], so tests run against a tree in a temporary directory ([`fake`]).

pub mod delegate;
mod error;
pub mod fake;
mod freezer;
mod fs;
mod gate;
mod instance;
mod layout;
mod limits;
mod usage;

#[cfg(test)]
mod host_tests;

pub use error::CgroupError;
pub use freezer::{FREEZE_TIMEOUT, Freezer};
pub use fs::{CgroupFs, ControlFile, HostCgroupFs};
pub use gate::{CpuGate, Gate, GateError, GateState};
pub use instance::{CgroupDirs, InstanceCgroup};
pub use layout::{CgroupLayout, Controller, V1Hierarchies};
pub use limits::{CpuLimit, Resources};
pub use usage::UsageCounter;
