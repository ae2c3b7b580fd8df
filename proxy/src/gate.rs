// PLACEHOLDER: replaced by the core helper's module at merge.
//! The CPU gate's interface: what the pool calls when an instance gets busy or idle.

/// What the gate calls; the daemon wraps the runtime's cgroup gate in it.
pub trait CpuControl: Send + Sync + 'static {
    fn restore(&self) -> Result<(), String>;
    fn throttle(&self) -> Result<(), String>;
    /// The instance's cumulative CPU usage in nanoseconds (cgroup usage counter), if known.
    fn usage_ns(&self) -> Option<u64>;
}

/// A control that does nothing: for instances whose CPU is never gated.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCpuControl;

impl CpuControl for NoCpuControl {
    fn restore(&self) -> Result<(), String> {
        Ok(())
    }
    fn throttle(&self) -> Result<(), String> {
        Ok(())
    }
    fn usage_ns(&self) -> Option<u64> {
        None
    }
}
