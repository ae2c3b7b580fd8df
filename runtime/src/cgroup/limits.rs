//! Validated resource limits and their OCI form.

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};

use super::CgroupError;

/// A CFS bandwidth limit: `quota_us` of CPU time per `period_us` (`None` = unlimited).
///
/// Always within the kernel's bounds: quota ≥ 1 ms, 1 ms ≤ period ≤ 1 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    quota_us: Option<u64>,
    period_us: u64,
}

impl CpuLimit {
    pub const MIN_QUOTA_US: u64 = 1_000;
    /// The kernel's `max_cfs_runtime` in µs (2^44 - 1).
    pub const MAX_QUOTA_US: u64 = (1 << 44) - 1;
    pub const MIN_PERIOD_US: u64 = 1_000;
    pub const MAX_PERIOD_US: u64 = 1_000_000;
    pub const DEFAULT_PERIOD_US: u64 = 100_000;

    /// No limit (`max 100000` on v2, quota `-1` with a 100 ms period on v1).
    pub const UNLIMITED: CpuLimit = CpuLimit {
        quota_us: None,
        period_us: CpuLimit::DEFAULT_PERIOD_US,
    };

    /// The gate's restored state on the group around an instance: no quota, at the throttled
    /// state's period (so the gate's group never changes period; see `instance::gate_limit`).
    pub const GATE_OPEN: CpuLimit = CpuLimit {
        quota_us: None,
        period_us: CpuLimit::MAX_PERIOD_US,
    };

    /// The gate's throttled state: the kernel's floor, 1 ms per second (0.1 % of a CPU).
    pub const THROTTLED: CpuLimit = CpuLimit {
        quota_us: Some(CpuLimit::MIN_QUOTA_US),
        period_us: CpuLimit::MAX_PERIOD_US,
    };

    pub fn new(quota_us: Option<u64>, period_us: u64) -> Result<CpuLimit, CgroupError> {
        if !(CpuLimit::MIN_PERIOD_US..=CpuLimit::MAX_PERIOD_US).contains(&period_us) {
            return Err(CgroupError::InvalidCpuLimit {
                reason: format!(
                    "period {period_us} µs is outside {}..={} µs",
                    CpuLimit::MIN_PERIOD_US,
                    CpuLimit::MAX_PERIOD_US
                ),
            });
        }
        if let Some(quota) = quota_us
            && !(CpuLimit::MIN_QUOTA_US..=CpuLimit::MAX_QUOTA_US).contains(&quota)
        {
            return Err(CgroupError::InvalidCpuLimit {
                reason: format!(
                    "quota {quota} µs is outside {}..={} µs",
                    CpuLimit::MIN_QUOTA_US,
                    CpuLimit::MAX_QUOTA_US
                ),
            });
        }
        Ok(CpuLimit {
            quota_us,
            period_us,
        })
    }

    /// A limit of `vcpus` CPUs over the default 100 ms period: 0.25 → 25000/100000.
    /// The smallest accepted value is 0.01 (the kernel's 1 ms quota floor).
    pub fn from_vcpus(vcpus: f64) -> Result<CpuLimit, CgroupError> {
        if !vcpus.is_finite() || vcpus <= 0.0 {
            return Err(CgroupError::InvalidCpuLimit {
                reason: format!("{vcpus} vcpus is not a positive number"),
            });
        }
        let quota = (vcpus * CpuLimit::DEFAULT_PERIOD_US as f64).round();
        if quota > CpuLimit::MAX_QUOTA_US as f64 {
            return Err(CgroupError::InvalidCpuLimit {
                reason: format!("{vcpus} vcpus is too large"),
            });
        }
        if quota < CpuLimit::MIN_QUOTA_US as f64 {
            return Err(CgroupError::InvalidCpuLimit {
                reason: format!("{vcpus} vcpus is below the kernel's floor of 0.01"),
            });
        }
        // The range checks above make the cast exact.
        CpuLimit::new(Some(quota as u64), CpuLimit::DEFAULT_PERIOD_US)
    }

    pub fn quota_us(&self) -> Option<u64> {
        self.quota_us
    }

    pub fn period_us(&self) -> u64 {
        self.period_us
    }

    /// The share of one CPU this limit allows (`None` = unlimited).
    pub fn vcpus(&self) -> Option<f64> {
        self.quota_us
            .map(|quota| quota as f64 / self.period_us as f64)
    }

    /// The value of a v2 `cpu.max` file: `25000 100000` or `max 100000`.
    pub fn cpu_max_value(&self) -> String {
        match self.quota_us {
            Some(quota) => format!("{quota} {}", self.period_us),
            None => format!("max {}", self.period_us),
        }
    }

    /// The value of a v1 `cpu.cfs_quota_us` file: `25000` or `-1`.
    pub fn cfs_quota_value(&self) -> String {
        match self.quota_us {
            Some(quota) => quota.to_string(),
            None => "-1".to_owned(),
        }
    }

    /// Parses a v2 `cpu.max` value (`max 100000`, `25000 100000`; the period may be left out).
    pub fn parse_cpu_max(value: &str) -> Option<CpuLimit> {
        let mut fields = value.split_whitespace();
        let quota = match fields.next()? {
            "max" => None,
            number => Some(number.parse().ok()?),
        };
        let period = match fields.next() {
            Some(number) => number.parse().ok()?,
            None => CpuLimit::DEFAULT_PERIOD_US,
        };
        if fields.next().is_some() {
            return None;
        }
        CpuLimit::new(quota, period).ok()
    }
}

/// An instance's resource limits, as configured for its service.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Resources {
    /// CPUs (0.25 = a quarter of one CPU); `None` = unlimited.
    pub cpu: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<i64>,
}

impl Resources {
    /// The CPU limit the gate restores ([`CpuLimit::UNLIMITED`] when `cpu` is `None`).
    pub fn cpu_limit(&self) -> Result<CpuLimit, CgroupError> {
        match self.cpu {
            Some(vcpus) => CpuLimit::from_vcpus(vcpus),
            None => Ok(CpuLimit::UNLIMITED),
        }
    }

    /// The spec's `linux.resources`, applied by libcontainer when it creates the instance.
    pub fn to_linux_resources(&self) -> Result<LinuxResources, CgroupError> {
        let mut resources = LinuxResources::default();
        self.apply_to(&mut resources)?;
        Ok(resources)
    }

    /// Sets cpu, memory and pids in existing `linux.resources`, leaving the rest (devices) alone.
    pub fn apply_to(&self, resources: &mut LinuxResources) -> Result<(), CgroupError> {
        if self.cpu.is_some() {
            let limit = self.cpu_limit()?;
            let mut cpu = LinuxCpu::default();
            cpu.set_quota(limit.quota_us().map(|quota| quota as i64));
            cpu.set_period(Some(limit.period_us()));
            resources.set_cpu(Some(cpu));
        }
        if let Some(bytes) = self.memory_bytes {
            let limit = i64::try_from(bytes)
                .ok()
                .filter(|limit| *limit >= 4096)
                .ok_or_else(|| CgroupError::InvalidResource {
                    field: "memory_bytes",
                    reason: format!("{bytes} is outside 4096..={}", i64::MAX),
                })?;
            let mut memory = LinuxMemory::default();
            memory.set_limit(Some(limit));
            resources.set_memory(Some(memory));
        }
        if let Some(pids) = self.pids {
            if pids < 1 {
                return Err(CgroupError::InvalidResource {
                    field: "pids",
                    reason: format!("{pids} is not a positive number"),
                });
            }
            let mut limit = LinuxPids::default();
            limit.set_limit(pids);
            resources.set_pids(Some(limit));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_map_to_quota_over_a_100ms_period() {
        let limit = CpuLimit::from_vcpus(0.25).unwrap();
        assert_eq!(limit.quota_us(), Some(25_000));
        assert_eq!(limit.period_us(), 100_000);
        assert_eq!(limit.cpu_max_value(), "25000 100000");
        assert_eq!(limit.cfs_quota_value(), "25000");
        assert_eq!(CpuLimit::from_vcpus(2.0).unwrap().quota_us(), Some(200_000));
        assert_eq!(CpuLimit::from_vcpus(0.01).unwrap().quota_us(), Some(1_000));
    }

    #[test]
    fn out_of_bounds_limits_are_rejected() {
        for vcpus in [0.0, -1.0, 0.009, f64::NAN, f64::INFINITY, 1e30] {
            assert!(CpuLimit::from_vcpus(vcpus).is_err(), "{vcpus}");
        }
        assert!(CpuLimit::new(Some(999), 100_000).is_err());
        assert!(CpuLimit::new(Some(1_000), 999).is_err());
        assert!(CpuLimit::new(Some(1_000), 1_000_001).is_err());
        assert!(CpuLimit::new(None, 1_000).is_ok());
        assert_eq!(
            CpuLimit::new(Some(5), 100_000).unwrap_err().to_string(),
            "invalid cpu limit: quota 5 µs is outside 1000..=17592186044415 µs"
        );
    }

    #[test]
    fn unlimited_and_throttled_values() {
        assert_eq!(CpuLimit::UNLIMITED.cpu_max_value(), "max 100000");
        assert_eq!(CpuLimit::UNLIMITED.cfs_quota_value(), "-1");
        assert_eq!(CpuLimit::THROTTLED.cpu_max_value(), "1000 1000000");
        assert_eq!(CpuLimit::THROTTLED.vcpus(), Some(0.001));
    }

    #[test]
    fn cpu_max_parses_back() {
        assert_eq!(
            CpuLimit::parse_cpu_max("max 100000\n"),
            Some(CpuLimit::UNLIMITED)
        );
        assert_eq!(
            CpuLimit::parse_cpu_max("1000 1000000"),
            Some(CpuLimit::THROTTLED)
        );
        assert_eq!(CpuLimit::parse_cpu_max("1000 1000000 7"), None);
        assert_eq!(CpuLimit::parse_cpu_max("lots 100000"), None);
    }

    #[test]
    fn resources_become_oci_linux_resources() {
        let resources = Resources {
            cpu: Some(0.5),
            memory_bytes: Some(256 << 20),
            pids: Some(128),
        };
        let linux = resources.to_linux_resources().unwrap();
        let cpu = linux.cpu().as_ref().unwrap();
        assert_eq!(cpu.quota(), Some(50_000));
        assert_eq!(cpu.period(), Some(100_000));
        assert_eq!(linux.memory().unwrap().limit(), Some(256 << 20));
        assert_eq!(linux.pids().unwrap().limit(), 128);
        let json = serde_json::to_value(&linux).unwrap();
        assert_eq!(json["cpu"]["quota"], 50_000);
        assert_eq!(json["memory"]["limit"], 256 << 20);
        assert_eq!(json["pids"]["limit"], 128);
    }

    #[test]
    fn unset_resources_leave_the_spec_alone() {
        let linux = Resources::default().to_linux_resources().unwrap();
        assert!(linux.cpu().is_none());
        assert!(linux.memory().is_none());
        assert!(linux.pids().is_none());
        assert_eq!(
            Resources::default().cpu_limit().unwrap(),
            CpuLimit::UNLIMITED
        );
    }

    #[test]
    fn invalid_resources_name_the_field() {
        let err = Resources {
            pids: Some(0),
            ..Resources::default()
        }
        .to_linux_resources()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid resource pids: 0 is not a positive number"
        );
        let err = Resources {
            memory_bytes: Some(u64::MAX),
            ..Resources::default()
        }
        .to_linux_resources()
        .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid resource memory_bytes"),
            "{err}"
        );
        assert!(
            Resources {
                cpu: Some(0.001),
                ..Resources::default()
            }
            .to_linux_resources()
            .is_err()
        );
    }
}
