// PLACEHOLDER: replaced by the core helper's module at merge.
//! One service's instances: least-in-flight choice, a bounded wait queue and the CPU calls on
//! busy/idle transitions. A simple stand-in with the agreed API; the real pool replaces it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{CpuMode, ServiceConfig};
use crate::gate::CpuControl;

pub struct InstanceSpec {
    pub id: String,
    pub addr: SocketAddr,
    pub cpu: Arc<dyn CpuControl>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    Paused {
        retry_after: Duration,
    },
    QueueFull {
        retry_after: Duration,
    },
    QueueTimeout {
        retry_after: Duration,
        waited: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    Queue {
        service: String,
        depth: usize,
        oldest_wait: Duration,
    },
    Health {
        service: String,
        instance: String,
        healthy: bool,
        reason: String,
    },
    Suspect {
        service: String,
        instance: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSnapshot {
    pub id: String,
    pub in_flight: u32,
    pub healthy: bool,
    pub suspect: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub instances: Vec<InstanceSnapshot>,
    pub queue_depth: usize,
}

struct Instance {
    id: String,
    addr: SocketAddr,
    cpu: Arc<dyn CpuControl>,
    in_flight: u32,
    cpu_busy: u32,
    throttled: bool,
    healthy: bool,
    suspect: bool,
    removed: bool,
}

struct State {
    instances: Vec<Instance>,
    queue_depth: usize,
    paused: bool,
    turn: usize,
}

struct Shared {
    service: String,
    config: Arc<ServiceConfig>,
    events: UnboundedSender<PoolEvent>,
    state: Mutex<State>,
    freed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cpu_idle(&self, inst: &mut Instance) {
        inst.cpu_busy -= 1;
        if inst.cpu_busy == 0 && self.config.cpu == CpuMode::Request {
            if let Err(e) = inst.cpu.throttle() {
                tracing::warn!(service = %self.service, instance = %inst.id, "throttle failed: {e}");
            } else {
                inst.throttled = true;
            }
        }
    }
}

pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(
        service: &str,
        config: Arc<ServiceConfig>,
        events: UnboundedSender<PoolEvent>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            shared: Arc::new(Shared {
                service: service.to_string(),
                config,
                events,
                state: Mutex::new(State {
                    instances: Vec::new(),
                    queue_depth: 0,
                    paused: false,
                    turn: 0,
                }),
                freed: Notify::new(),
            }),
        })
    }

    pub fn service(&self) -> &str {
        &self.shared.service
    }

    pub fn config(&self) -> &Arc<ServiceConfig> {
        &self.shared.config
    }

    /// A new instance is out of rotation until `set_healthy(id, true)`.
    pub fn add_instance(&self, spec: InstanceSpec) {
        let mut st = self.shared.lock();
        st.instances.retain(|i| i.id != spec.id);
        st.instances.push(Instance {
            id: spec.id,
            addr: spec.addr,
            cpu: spec.cpu,
            in_flight: 0,
            cpu_busy: 0,
            throttled: false,
            healthy: false,
            suspect: false,
            removed: false,
        });
    }

    /// Out of rotation at once; its in-flight requests finish.
    pub fn remove_instance(&self, id: &str) {
        let mut st = self.shared.lock();
        for i in st.instances.iter_mut().filter(|i| i.id == id) {
            i.removed = true;
        }
        st.instances.retain(|i| !i.removed || i.in_flight > 0);
    }

    pub fn set_healthy(&self, id: &str, healthy: bool, reason: &str) {
        {
            let mut st = self.shared.lock();
            for i in st.instances.iter_mut().filter(|i| i.id == id) {
                i.healthy = healthy;
                if healthy {
                    i.suspect = false;
                }
            }
        }
        let _ = self.shared.events.send(PoolEvent::Health {
            service: self.shared.service.clone(),
            instance: id.to_string(),
            healthy,
            reason: reason.to_string(),
        });
        self.shared.freed.notify_waiters();
    }

    pub fn set_paused(&self, paused: bool) {
        self.shared.lock().paused = paused;
        self.shared.freed.notify_waiters();
    }

    fn try_pick(&self, st: &mut State, avoid: Option<&str>) -> Option<Lease> {
        let max = self.shared.config.max_concurrency;
        let n = st.instances.len();
        let mut best: Option<usize> = None;
        for k in 0..n {
            let idx = (st.turn + k) % n;
            let i = &st.instances[idx];
            if !i.healthy || i.removed || i.in_flight >= max || Some(i.id.as_str()) == avoid {
                continue;
            }
            if best.is_none_or(|b| st.instances[b].in_flight > i.in_flight) {
                best = Some(idx);
            }
        }
        let idx = best?;
        st.turn = st.turn.wrapping_add(1);
        let inst = &mut st.instances[idx];
        inst.in_flight += 1;
        inst.cpu_busy += 1;
        let mut woke = false;
        if inst.cpu_busy == 1 && inst.throttled {
            woke = true;
            if let Err(e) = inst.cpu.restore() {
                tracing::warn!(service = %self.shared.service, instance = %inst.id, "restore failed: {e}");
            }
            inst.throttled = false;
        }
        Some(Lease {
            shared: self.shared.clone(),
            instance: inst.id.clone(),
            addr: inst.addr,
            woke,
            queued: Duration::ZERO,
            holds_cpu: true,
        })
    }

    /// A slot on the least busy in-rotation instance, else a wait in the queue.
    pub async fn acquire(&self, avoid: Option<&str>) -> Result<Lease, Rejected> {
        let cfg = &self.shared.config;
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + cfg.queue_timeout;
        let mut queued = false;
        let retry_after = cfg.queue_timeout.max(Duration::from_secs(1));
        let result = loop {
            let notified = self.shared.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if st.paused {
                    break Err(Rejected::Paused {
                        retry_after: cfg.paused_retry_after,
                    });
                }
                if let Some(mut lease) = self.try_pick(&mut st, avoid) {
                    lease.queued = start.elapsed();
                    break Ok(lease);
                }
                if !queued {
                    if st.queue_depth >= cfg.queue_size as usize {
                        break Err(Rejected::QueueFull { retry_after });
                    }
                    st.queue_depth += 1;
                    queued = true;
                    let _ = self.shared.events.send(PoolEvent::Queue {
                        service: self.shared.service.clone(),
                        depth: st.queue_depth,
                        oldest_wait: Duration::ZERO,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break Err(Rejected::QueueTimeout {
                    retry_after,
                    waited: start.elapsed(),
                });
            }
        };
        if queued {
            let mut st = self.shared.lock();
            st.queue_depth -= 1;
            let _ = self.shared.events.send(PoolEvent::Queue {
                service: self.shared.service.clone(),
                depth: st.queue_depth,
                oldest_wait: Duration::ZERO,
            });
        }
        result
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.shared.lock();
        PoolSnapshot {
            instances: st
                .instances
                .iter()
                .map(|i| InstanceSnapshot {
                    id: i.id.clone(),
                    in_flight: i.in_flight,
                    healthy: i.healthy,
                    suspect: i.suspect,
                })
                .collect(),
            queue_depth: st.queue_depth,
        }
    }
}

/// A slot on one instance; dropping it frees the slot.
pub struct Lease {
    shared: Arc<Shared>,
    instance: String,
    addr: SocketAddr,
    woke: bool,
    queued: Duration,
    holds_cpu: bool,
}

impl Lease {
    pub fn instance(&self) -> &str {
        &self.instance
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn woke(&self) -> bool {
        self.woke
    }
    pub fn queued(&self) -> Duration {
        self.queued
    }
    pub fn mark_suspect(&self, reason: &str) {
        {
            let mut st = self.shared.lock();
            for i in st.instances.iter_mut().filter(|i| i.id == self.instance) {
                i.suspect = true;
            }
        }
        let _ = self.shared.events.send(PoolEvent::Suspect {
            service: self.shared.service.clone(),
            instance: self.instance.clone(),
            reason: reason.to_string(),
        });
    }
    /// Keeps the slot but lets the gate consider the instance idle.
    pub fn release_cpu(&mut self) {
        if !self.holds_cpu {
            return;
        }
        self.holds_cpu = false;
        let mut st = self.shared.lock();
        if let Some(i) = st.instances.iter_mut().find(|i| i.id == self.instance) {
            self.shared.cpu_idle(i);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            if let Some(i) = st.instances.iter_mut().find(|i| i.id == self.instance) {
                i.in_flight -= 1;
                if self.holds_cpu {
                    self.shared.cpu_idle(i);
                }
            }
            st.instances.retain(|i| !i.removed || i.in_flight > 0);
        }
        self.shared.freed.notify_waiters();
    }
}
