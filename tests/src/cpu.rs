//! The proxy's `CpuControl` over a runtime instance's CPU gate and usage counter: the daemon's
//! own, used here by tests and benchmarks.

pub use lull_daemon::host::real::InstanceCpu;
