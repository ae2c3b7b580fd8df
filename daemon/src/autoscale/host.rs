//! The host's budget: what every service's instances together may take. An instance is admitted
//! before it starts (its memory limit counted against the host's memory times the overcommit
//! ratio, the host-wide instance cap, and host pressure as a brake), and released when it is
//! removed. A refusal says which limit and by how much, for the event that reports it.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

use super::psi::Pressure;

/// Host-wide limits (from `lull.toml`'s `[scaling]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLimits {
    /// The host's memory (MemTotal).
    pub memory_total: u64,
    /// How far the sum of instance memory limits may exceed the host's memory (1.0: not at all).
    /// Idle instances use far less than their limit, so a ratio above 1 is sound.
    pub overcommit_ratio: f64,
    /// Instances across all services (at most [`lull_netns::link::MAX_BRIDGE_PORTS`]: they
    /// share one bridge).
    pub max_instances: usize,
    /// Scale-out pauses while the CPU `some` pressure (avg10, %) is above this.
    pub cpu_pressure_brake: f64,
    /// Scale-out pauses while the memory `some` pressure (avg10, %) is above this.
    pub memory_pressure_brake: f64,
}

impl HostLimits {
    /// Defaults for a host with `memory_total` bytes.
    pub fn for_memory(memory_total: u64) -> HostLimits {
        HostLimits {
            memory_total,
            overcommit_ratio: 1.5,
            max_instances: 1000,
            cpu_pressure_brake: 90.0,
            memory_pressure_brake: 20.0,
        }
    }

    /// Memory the instances' limits may add up to.
    pub fn memory_allowed(&self) -> u64 {
        (self.memory_total as f64 * self.overcommit_ratio) as u64
    }
}

/// The host's memory in bytes, from a `/proc/meminfo`-like file's `MemTotal` line.
pub fn mem_total(meminfo: &std::path::Path) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(meminfo)?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: no `MemTotal: N kB` line", meminfo.display()),
            )
        })?;
    Ok(kib * 1024)
}

/// Why an instance may not start.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "limit", rename_all = "snake_case")]
pub enum Refusal {
    #[error(
        "memory: {needed} more bytes would commit {committed_after} of the {allowed} the host allows ({ratio}x its memory)"
    )]
    Memory {
        needed: u64,
        committed_after: u64,
        allowed: u64,
        ratio: f64,
    },
    #[error("the host runs {running} instances, its cap")]
    Instances { running: usize },
    #[error("host {resource} pressure is {avg10:.1}% (avg10), above the brake at {brake:.1}%")]
    Pressure {
        resource: &'static str,
        avg10: f64,
        brake: f64,
    },
}

/// An admitted instance's place in the budget; dropping it does not release it (instances
/// outlive handles): call [`HostBudget::release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub id: String,
    pub memory: u64,
    /// Counted by this call (false: it was counted already, and must not be released by a
    /// start that fails for it).
    pub new: bool,
}

/// Every instance's share of the host, across services.
#[derive(Debug)]
pub struct HostBudget {
    limits: Mutex<HostLimits>,
    committed: Mutex<HashMap<String, u64>>,
}

impl HostBudget {
    pub fn new(limits: HostLimits) -> HostBudget {
        HostBudget {
            limits: Mutex::new(limits),
            committed: Mutex::new(HashMap::new()),
        }
    }

    pub fn limits(&self) -> HostLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits instance `id` with a `memory` limit against the memory ratio and the instance
    /// cap. An instance admitted already is admitted again without being counted twice.
    pub fn admit(&self, id: &str, memory: u64) -> Result<Admission, Refusal> {
        let limits = self.limits();
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if committed.contains_key(id) {
            return Ok(Admission {
                id: id.to_owned(),
                memory,
                new: false,
            });
        }
        if committed.len() >= limits.max_instances {
            return Err(Refusal::Instances {
                running: committed.len(),
            });
        }
        let after = committed.values().sum::<u64>() + memory;
        if after > limits.memory_allowed() {
            return Err(Refusal::Memory {
                needed: memory,
                committed_after: after,
                allowed: limits.memory_allowed(),
                ratio: limits.overcommit_ratio,
            });
        }
        committed.insert(id.to_owned(), memory);
        Ok(Admission {
            id: id.to_owned(),
            memory,
            new: true,
        })
    }

    /// The brake on scale-out: refuses while host CPU or memory pressure is above its limit.
    /// Deploys and replacements of crashed instances do not ask: they must not wait for the
    /// host to calm down.
    pub fn brake(&self, pressure: &Pressure) -> Result<(), Refusal> {
        let limits = self.limits();
        let brakes = [
            ("cpu", pressure.cpu_some_avg10, limits.cpu_pressure_brake),
            (
                "memory",
                pressure.memory_some_avg10,
                limits.memory_pressure_brake,
            ),
        ];
        for (resource, avg10, brake) in brakes {
            if let Some(avg10) = avg10
                && avg10 > brake
            {
                return Err(Refusal::Pressure {
                    resource,
                    avg10,
                    brake,
                });
            }
        }
        Ok(())
    }

    /// Counts a running instance found after a restart, with no memory until the engine,
    /// which knows its plan, calls [`HostBudget::adopt`]; one counted already keeps its share.
    pub fn adopt_if_missing(&self, id: &str) {
        self.committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_insert(0);
    }

    /// Counts an instance that already runs (adopted after a restart) without refusing it.
    pub fn adopt(&self, id: &str, memory: u64) {
        self.committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), memory);
    }

    /// Keeps only the instances in `ids` (those found running after a restart or a failed
    /// handover): instances stopped meanwhile stop counting.
    pub fn retain(&self, ids: &[&str]) {
        self.committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| ids.contains(&id.as_str()));
    }

    pub fn release(&self, id: &str) {
        self.committed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Instances counted and the memory their limits add up to.
    pub fn committed(&self) -> (usize, u64) {
        let committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        (committed.len(), committed.values().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn budget() -> HostBudget {
        HostBudget::new(HostLimits {
            memory_total: 1024 * MIB,
            overcommit_ratio: 1.5,
            max_instances: 4,
            cpu_pressure_brake: 90.0,
            memory_pressure_brake: 20.0,
        })
    }

    #[test]
    fn memory_beyond_the_ratio_is_refused_and_release_frees_it() {
        let b = budget();
        b.admit("a", 1024 * MIB).unwrap();
        b.admit("b", 512 * MIB).unwrap();
        let refused = b.admit("c", MIB).unwrap_err();
        assert_eq!(
            refused,
            Refusal::Memory {
                needed: MIB,
                committed_after: 1537 * MIB,
                allowed: 1536 * MIB,
                ratio: 1.5
            }
        );
        assert!(
            refused
                .to_string()
                .starts_with("memory: 1048576 more bytes")
        );
        b.release("b");
        b.admit("c", MIB).unwrap();
        assert_eq!(b.committed(), (2, 1025 * MIB));
        // Admitting the same instance twice counts it once.
        b.admit("c", MIB).unwrap();
        assert_eq!(b.committed(), (2, 1025 * MIB));
    }

    #[test]
    fn mem_total_reads_meminfo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        std::fs::write(&path, "MemTotal:       24684084 kB\nMemFree: 1 kB\n").unwrap();
        assert_eq!(mem_total(&path).unwrap(), 24684084 * 1024);
        std::fs::write(&path, "MemFree: 1 kB\n").unwrap();
        assert!(
            mem_total(&path)
                .unwrap_err()
                .to_string()
                .contains("MemTotal")
        );
        assert!(mem_total(std::path::Path::new("/proc/meminfo")).unwrap() > 0);
    }

    #[test]
    fn a_duplicate_admission_is_not_new_and_retain_drops_what_is_gone() {
        let b = budget();
        assert!(b.admit("a", MIB).unwrap().new);
        assert!(
            !b.admit("a", MIB).unwrap().new,
            "a failed start for it must not release it"
        );
        b.admit("b", 2 * MIB).unwrap();
        b.adopt_if_missing("c");
        b.adopt_if_missing("a");
        assert_eq!(b.committed(), (3, 3 * MIB), "adopting keeps a known share");
        b.retain(&["a", "c"]);
        assert_eq!(b.committed(), (2, MIB));
    }

    #[test]
    fn the_instance_cap_counts_adopted_instances() {
        let b = budget();
        for id in ["a", "b", "c"] {
            b.adopt(id, MIB);
        }
        b.admit("d", MIB).unwrap();
        assert_eq!(
            b.admit("e", MIB).unwrap_err(),
            Refusal::Instances { running: 4 }
        );
    }

    #[test]
    fn pressure_brakes_above_its_limit_only() {
        let b = budget();
        let p = Pressure {
            cpu_some_avg10: Some(95.0),
            memory_some_avg10: Some(1.0),
            memory_full_avg10: None,
        };
        let e = b.brake(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host cpu pressure is 95.0% (avg10), above the brake at 90.0%"
        );
        let memory = Pressure {
            cpu_some_avg10: Some(10.0),
            memory_some_avg10: Some(25.0),
            memory_full_avg10: None,
        };
        assert!(matches!(
            b.brake(&memory),
            Err(Refusal::Pressure {
                resource: "memory",
                ..
            })
        ));
        let calm = Pressure {
            cpu_some_avg10: Some(10.0),
            ..p
        };
        b.brake(&calm).unwrap();
        b.brake(&Pressure::default()).unwrap();
    }
}
