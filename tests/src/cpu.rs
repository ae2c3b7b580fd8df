//! The proxy's `CpuControl` over a runtime instance's CPU gate and usage counter: what the
//! daemon will hand the proxy for each instance, used here by tests and benchmarks.

use lull_proxy::gate::CpuControl;
use lull_runtime::cgroup::{CpuGate, Gate, InstanceCgroup};

pub struct InstanceCpu {
    gate: CpuGate,
    cgroup: InstanceCgroup,
}

impl InstanceCpu {
    /// `gate` on the instance's own group; `cgroup` the group whose usage counts (the same).
    pub fn new(gate: CpuGate, cgroup: InstanceCgroup) -> InstanceCpu {
        InstanceCpu { gate, cgroup }
    }
}

impl CpuControl for InstanceCpu {
    fn restore(&self) -> Result<(), String> {
        self.gate.restore().map(|_| ()).map_err(|e| e.to_string())
    }

    fn throttle(&self) -> Result<(), String> {
        self.gate.throttle().map(|_| ()).map_err(|e| e.to_string())
    }

    fn usage_ns(&self) -> Option<u64> {
        self.cgroup.cpu_usage_ns().ok()
    }
}
