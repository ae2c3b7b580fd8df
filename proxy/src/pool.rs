//! One service's instances: concurrency slots, the least-in-flight choice, the bounded FIFO
//! queue with a deadline, rotation (health and suspicion) and each instance's CPU gate.
//!
//! All bookkeeping sits under one mutex held for a few list operations, never across an await
//! or a CPU gate call. Queued requests wait on a oneshot channel; whoever frees a slot hands it
//! to the oldest waiter that can use it, so waiters are served in arrival order with no polling.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::config::ServiceConfig;
use crate::gate::{CpuControl, GateMeter, Idle, InstanceGate, Left};
use crate::metrics::ProxyMetrics;

/// `Retry-After` for requests turned away because every slot and the queue were taken.
pub const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct InstanceSpec {
    pub id: String,
    pub addr: SocketAddr,
    pub cpu: Arc<dyn CpuControl>,
}

/// Why a request got no slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("service is paused")]
    Paused { retry_after: Duration },
    #[error("request queue is full")]
    QueueFull { retry_after: Duration },
    #[error("no instance was free after waiting {waited:?} in the queue")]
    QueueTimeout {
        retry_after: Duration,
        waited: Duration,
    },
}

impl Rejected {
    /// What the 503's `Retry-After` should say.
    pub fn retry_after(&self) -> Duration {
        match self {
            Rejected::Paused { retry_after }
            | Rejected::QueueFull { retry_after }
            | Rejected::QueueTimeout { retry_after, .. } => *retry_after,
        }
    }
}

/// Sent on the channel given to [`Pool::new`]; the autoscaler and the daemon listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// The queue changed: its depth and how long its oldest request has waited.
    Queue {
        service: String,
        depth: usize,
        oldest_wait: Duration,
    },
    /// Demand (in flight plus queued) went above the watermark set with
    /// [`Pool::set_demand_watermark`]: the autoscaler's scale-out trigger.
    Demand { service: String, demand: usize },
    /// An instance entered or left rotation.
    Health {
        service: String,
        instance: String,
        healthy: bool,
        reason: String,
    },
    /// A connection-level failure took an instance out of rotation until a health check
    /// confirms it.
    Suspect {
        service: String,
        instance: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSnapshot {
    pub id: String,
    pub addr: SocketAddr,
    pub in_flight: u32,
    pub healthy: bool,
    pub suspect: bool,
    pub gate: GateMeter,
}

impl InstanceSnapshot {
    pub fn in_rotation(&self) -> bool {
        self.healthy && !self.suspect
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    pub service: String,
    pub paused: bool,
    pub instances: Vec<InstanceSnapshot>,
    pub queue_depth: usize,
    /// How long the oldest queued request has waited (zero when none).
    pub oldest_wait: Duration,
    /// Active and throttled time of removed instances, kept so service totals never go back.
    pub retired_active: Duration,
    pub retired_throttled: Duration,
}

/// What a pool shares with its leases, timers and health checker about one instance.
pub(crate) struct Slot {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    /// `addr` as a URI authority, made once (every forwarded request names it).
    pub(crate) authority: http::uri::Authority,
    pub(crate) gate: InstanceGate,
    /// Wakes the instance's health prober at once (after a suspect mark).
    pub(crate) probe_now: Notify,
}

struct Entry {
    slot: Arc<Slot>,
    in_flight: u32,
    healthy: bool,
    suspect: bool,
    ever_healthy: bool,
    /// Leaving (scale-in): takes no new request, finishes those it has.
    retiring: bool,
}

impl Entry {
    fn in_rotation(&self) -> bool {
        self.healthy && !self.suspect && !self.retiring
    }
}

struct Waiter {
    ticket: u64,
    since: Instant,
    avoid: Option<String>,
    tx: oneshot::Sender<Lease>,
}

struct Inner {
    entries: Vec<Entry>,
    /// Where the next search starts, so ties go round.
    cursor: usize,
    queue: VecDeque<Waiter>,
    next_ticket: u64,
    paused: bool,
    retired_active: Duration,
    retired_throttled: Duration,
}

/// One service's instances and request queue.
pub struct Pool {
    me: Weak<Pool>,
    service: String,
    config: Arc<ServiceConfig>,
    events: mpsc::UnboundedSender<PoolEvent>,
    metrics: Option<Arc<ProxyMetrics>>,
    /// This service's per-request series, looked up once.
    service_metrics: Option<Arc<crate::metrics::ServiceMetrics>>,
    inner: Mutex<Inner>,
    /// Bumped when instances are added or removed (the health checker follows it).
    members: watch::Sender<u64>,
    demand: crate::demand::DemandMeter,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// A slot for one request on one instance. Dropping it frees the slot (and hands it to the
/// oldest waiter) and stops holding the instance's CPU.
pub struct Lease {
    pool: Arc<Pool>,
    slot: Arc<Slot>,
    holds_cpu: bool,
    woke: bool,
    queued: Duration,
    /// Whether this lease's request counts in the pool's demand (a lease made for a waiter
    /// that is gone never did).
    counted: bool,
}

/// A request counted in the pool's demand while it asks for a slot.
struct Arrival<'a> {
    meter: &'a crate::demand::DemandMeter,
    counted: bool,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.meter.leave();
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("service", &self.pool.service)
            .field("instance", &self.slot.id)
            .field("holds_cpu", &self.holds_cpu)
            .field("woke", &self.woke)
            .field("queued", &self.queued)
            .finish()
    }
}

impl Lease {
    pub fn instance(&self) -> &str {
        &self.slot.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.slot.addr
    }

    /// The instance's address as a URI authority.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.slot.authority
    }

    /// This request had to restore the instance's CPU.
    pub fn woke(&self) -> bool {
        self.woke
    }

    /// Time spent waiting for a slot.
    pub fn queued(&self) -> Duration {
        self.queued
    }

    /// A connection-level failure (refused, reset before a response): the instance leaves
    /// rotation until the health checker confirms it.
    pub fn mark_suspect(&self, reason: &str) {
        self.pool.mark_suspect(&self.slot, reason);
    }

    /// For WebSockets and SSE when streams do not keep the CPU (`streams_keep_cpu == false`):
    /// keeps the concurrency slot but lets the gate consider the instance idle. Does nothing
    /// when the service's streams keep the CPU, or on a second call.
    pub fn release_cpu(&mut self) {
        if self.pool.config.streams_keep_cpu || !self.holds_cpu {
            return;
        }
        self.holds_cpu = false;
        let left = self.slot.gate.leave();
        self.pool.after_leave(&self.slot, left);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.counted {
            self.pool.demand.leave();
        }
        self.pool.release(&self.slot, self.holds_cpu);
    }
}

/// Removes a queued request that stopped waiting (timed out, or its future was dropped).
struct QueueTicket<'a> {
    pool: &'a Pool,
    ticket: u64,
}

impl QueueTicket<'_> {
    /// Takes the ticket out of the queue; false if a slot was already handed to it.
    fn withdraw(&self) -> bool {
        let mut inner = self.pool.lock();
        let Some(pos) = inner.queue.iter().position(|w| w.ticket == self.ticket) else {
            return false;
        };
        inner.queue.remove(pos);
        self.pool.queue_changed(&inner);
        true
    }
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.withdraw();
    }
}

impl Pool {
    pub fn new(
        service: &str,
        config: Arc<ServiceConfig>,
        events: mpsc::UnboundedSender<PoolEvent>,
    ) -> Arc<Pool> {
        Pool::build(service, config, events, None)
    }

    /// Like [`Pool::new`], recording queue waits, rejections and CPU per request in `metrics`,
    /// which also reports the pool's instances (in flight, health, gate) at each scrape.
    pub fn with_metrics(
        service: &str,
        config: Arc<ServiceConfig>,
        events: mpsc::UnboundedSender<PoolEvent>,
        metrics: Arc<ProxyMetrics>,
    ) -> Arc<Pool> {
        let pool = Pool::build(service, config, events, Some(metrics.clone()));
        metrics.watch_pool(&pool);
        pool
    }

    fn build(
        service: &str,
        config: Arc<ServiceConfig>,
        events: mpsc::UnboundedSender<PoolEvent>,
        metrics: Option<Arc<ProxyMetrics>>,
    ) -> Arc<Pool> {
        Arc::new_cyclic(|me| Pool {
            me: me.clone(),
            service: service.to_owned(),
            config,
            events,
            service_metrics: metrics.as_ref().map(|m| Arc::new(m.service(service))),
            metrics,
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                cursor: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
                paused: false,
                retired_active: Duration::ZERO,
                retired_throttled: Duration::ZERO,
            }),
            members: watch::Sender::new(0),
            demand: crate::demand::DemandMeter::default(),
        })
    }

    /// The metrics registry this pool records into, if it was made with one.
    pub fn metrics(&self) -> Option<&Arc<ProxyMetrics>> {
        self.metrics.as_ref()
    }

    /// This service's per-request series, if the pool records metrics.
    pub fn service_metrics(&self) -> Option<&Arc<crate::metrics::ServiceMetrics>> {
        self.service_metrics.as_ref()
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn config(&self) -> &Arc<ServiceConfig> {
        &self.config
    }

    /// A new instance is out of rotation until `set_healthy(id, true)` (the health checker
    /// does it). An instance with the same id is removed first.
    pub fn add_instance(&self, spec: InstanceSpec) {
        self.remove_instance(&spec.id);
        let slot = Arc::new(Slot {
            gate: InstanceGate::new(spec.cpu, self.config.cpu, self.config.idle_delay)
                .with_freeze_after(self.config.freeze_after),
            id: spec.id,
            authority: http::uri::Authority::try_from(spec.addr.to_string().as_str())
                .expect("a socket address is a valid URI authority"),
            addr: spec.addr,
            probe_now: Notify::new(),
        });
        tracing::debug!(service = %self.service, instance = %slot.id, addr = %slot.addr, "instance added");
        self.lock().entries.push(Entry {
            slot,
            in_flight: 0,
            healthy: false,
            suspect: false,
            ever_healthy: false,
            retiring: false,
        });
        self.members.send_modify(|v| *v += 1);
    }

    /// Out of rotation at once; its in-flight requests finish. Its CPU is restored and never
    /// throttled again (it is shutting down).
    pub fn remove_instance(&self, id: &str) {
        let removed = {
            let mut inner = self.lock();
            let Some(pos) = inner.entries.iter().position(|e| e.slot.id == id) else {
                return;
            };
            let entry = inner.entries.remove(pos);
            if inner.cursor >= inner.entries.len() {
                inner.cursor = 0;
            }
            entry.slot
        };
        removed.gate.drain();
        let meter = removed.gate.meter();
        {
            let mut inner = self.lock();
            inner.retired_active += meter.active;
            inner.retired_throttled += meter.throttled;
        }
        tracing::debug!(service = %self.service, instance = %id, "instance removed");
        self.members.send_modify(|v| *v += 1);
    }

    /// Takes an instance out of rotation for good (scale-in) without a health event: it
    /// finishes the requests it has; [`Pool::in_flight`] tells when it has none left.
    pub fn retire_instance(&self, id: &str) {
        if let Some(entry) = self.lock().entries.iter_mut().find(|e| e.slot.id == id) {
            entry.retiring = true;
        }
    }

    /// Holds instance `id`'s CPU until the returned guard is dropped: restored now (thawed if
    /// frozen) and never throttled or frozen while held, as for a health check. For an
    /// operator's command running in the instance (`lull exec`): not a request, so it takes no
    /// slot and counts as no traffic. `None` when the instance is not in the pool. The hold
    /// tells whether the CPU could be restored ([`CpuHold::cpu_restored`]).
    pub fn hold_cpu(&self, id: &str) -> Option<CpuHold> {
        let slot = self
            .lock()
            .entries
            .iter()
            .find(|e| e.slot.id == id)
            .map(|e| e.slot.clone())?;
        slot.gate.enter_probe();
        let cpu_restored = !slot.gate.meter().is_throttled;
        Some(CpuHold {
            service: self.service.clone(),
            slot,
            cpu_restored,
        })
    }

    /// Requests in flight on instance `id`; `None` when it is not in the pool.
    pub fn in_flight(&self, id: &str) -> Option<u32> {
        self.lock()
            .entries
            .iter()
            .find(|e| e.slot.id == id)
            .map(|e| e.in_flight)
    }

    /// Puts an instance in rotation (`healthy`, which also clears a suspect mark) or takes it
    /// out, and tells the daemon with `reason` when that changes. The first time an instance
    /// is healthy its startup ends and the gate may throttle it.
    /// Tells the daemon that an instance that was never healthy still is not (it may be crash
    /// looping or listening on the wrong port): one `PoolEvent::Health` with `healthy: false`.
    pub fn report_startup_failure(&self, id: &str, reason: &str) {
        tracing::warn!(service = %self.service, instance = %id, reason, "instance not healthy since it started");
        let _ = self.events.send(PoolEvent::Health {
            service: self.service.clone(),
            instance: id.to_owned(),
            healthy: false,
            reason: reason.to_owned(),
        });
    }

    pub fn set_healthy(&self, id: &str, healthy: bool, reason: &str) {
        let (slot, first, grants) = {
            let mut inner = self.lock();
            let Some(entry) = inner.entries.iter_mut().find(|e| e.slot.id == id) else {
                return;
            };
            let before = (entry.healthy, entry.in_rotation());
            entry.healthy = healthy;
            if healthy {
                entry.suspect = false;
            }
            let first = healthy && !entry.ever_healthy;
            entry.ever_healthy |= healthy;
            let after = (entry.healthy, entry.in_rotation());
            let slot = entry.slot.clone();
            if before != after {
                tracing::info!(service = %self.service, instance = %id, healthy, reason, "instance health changed");
                let _ = self.events.send(PoolEvent::Health {
                    service: self.service.clone(),
                    instance: id.to_owned(),
                    healthy: after.1,
                    reason: reason.to_owned(),
                });
            }
            let grants = self.dispatch(&mut inner);
            (slot, first, grants)
        };
        // Waiters handed this instance hold its CPU before startup ends, so it is not
        // throttled right under them.
        let mut grants = grants;
        self.hold_cpu_for(&mut grants, None);
        if first {
            let idle = slot.gate.set_serving();
            self.on_idle(&slot, idle);
        }
        self.deliver(grants);
    }

    /// A paused service turns every request away (its queue too) with `paused_retry_after`.
    pub fn set_paused(&self, paused: bool) {
        let mut inner = self.lock();
        inner.paused = paused;
        if paused && !inner.queue.is_empty() {
            // Dropping the senders wakes the waiters, who see the pause.
            inner.queue.clear();
            self.queue_changed(&inner);
        }
    }

    /// Shutdown: restore every instance's CPU and never throttle again.
    pub fn drain(&self) {
        let slots: Vec<_> = self.lock().entries.iter().map(|e| e.slot.clone()).collect();
        for slot in slots {
            slot.gate.drain();
        }
    }

    /// A slot on the in-rotation instance with the fewest in flight among those with a free
    /// slot (ties go round), skipping `avoid` (the instance a retry must not go back to); else
    /// waits in the bounded FIFO until a slot frees or the queue timeout passes. The CPU of
    /// the chosen instance is restored before this returns if it was throttled
    /// (`lease.woke()` says so). A retry whose only possible instance is `avoid` waits for
    /// another one.
    pub async fn acquire(&self, avoid: Option<&str>) -> Result<Lease, Rejected> {
        if let Some(demand) = self.demand.arrive() {
            self.signal_demand(demand);
        }
        // Counted until the lease ends; a refusal, or a caller that stops waiting, uncounts.
        let mut arrival = Arrival {
            meter: &self.demand,
            counted: true,
        };
        let mut lease = self.acquire_counted(avoid).await?;
        arrival.counted = false;
        lease.counted = true;
        Ok(lease)
    }

    /// Requests in flight plus queued, and the peak since the last look (the autoscaler's
    /// scale-in input).
    pub fn demand(&self) -> &crate::demand::DemandMeter {
        &self.demand
    }

    /// Signals [`PoolEvent::Demand`] when demand goes above `watermark` (at once if it already
    /// is).
    pub fn set_demand_watermark(&self, watermark: usize) {
        if let Some(demand) = self.demand.set_watermark(watermark) {
            self.signal_demand(demand);
        }
    }

    fn signal_demand(&self, demand: usize) {
        let _ = self.events.send(PoolEvent::Demand {
            service: self.service.clone(),
            demand,
        });
    }

    async fn acquire_counted(&self, avoid: Option<&str>) -> Result<Lease, Rejected> {
        let started = Instant::now();
        let (ticket, mut rx) = {
            let mut inner = self.lock();
            if inner.paused {
                return Err(self.paused());
            }
            if let Some(i) = pick(&mut inner, self.config.max_concurrency, avoid) {
                inner.entries[i].in_flight += 1;
                let slot = inner.entries[i].slot.clone();
                drop(inner);
                let mut lease = self.lease(slot);
                lease.woke = lease.slot.gate.enter();
                lease.holds_cpu = true;
                return Ok(lease);
            }
            if inner.queue.len() >= self.config.queue_size as usize {
                drop(inner);
                self.rejected("queue_full");
                return Err(Rejected::QueueFull {
                    retry_after: BUSY_RETRY_AFTER,
                });
            }
            let (tx, rx) = oneshot::channel();
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            inner.queue.push_back(Waiter {
                ticket,
                since: started,
                avoid: avoid.map(str::to_owned),
                tx,
            });
            self.queue_changed(&inner);
            (QueueTicket { pool: self, ticket }, rx)
        };
        let deadline = tokio::time::Instant::from_std(started + self.config.queue_timeout);
        let granted = match tokio::time::timeout_at(deadline, &mut rx).await {
            Ok(result) => result.ok(),
            // Timed out; unless a slot is already on its way to us, leave the queue.
            Err(_) if ticket.withdraw() => None,
            Err(_) => rx.await.ok(),
        };
        drop(ticket);
        let waited = started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.observe_queue_wait(&self.service, waited);
        }
        let Some(mut lease) = granted else {
            if self.lock().paused {
                return Err(self.paused());
            }
            self.rejected("queue_timeout");
            return Err(Rejected::QueueTimeout {
                retry_after: BUSY_RETRY_AFTER,
                waited,
            });
        };
        lease.queued = waited;
        if !lease.holds_cpu {
            lease.woke = lease.slot.gate.enter();
            lease.holds_cpu = true;
        }
        Ok(lease)
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let (entries, snapshot) = {
            let inner = self.lock();
            let entries: Vec<_> = inner
                .entries
                .iter()
                .map(|e| (e.slot.clone(), e.in_flight, e.healthy, e.suspect))
                .collect();
            let snapshot = PoolSnapshot {
                service: self.service.clone(),
                paused: inner.paused,
                instances: Vec::new(),
                queue_depth: inner.queue.len(),
                oldest_wait: oldest_wait(&inner),
                retired_active: inner.retired_active,
                retired_throttled: inner.retired_throttled,
            };
            (entries, snapshot)
        };
        let instances = entries
            .into_iter()
            .map(|(slot, in_flight, healthy, suspect)| InstanceSnapshot {
                id: slot.id.clone(),
                addr: slot.addr,
                in_flight,
                healthy,
                suspect,
                gate: slot.gate.meter(),
            })
            .collect();
        PoolSnapshot {
            instances,
            ..snapshot
        }
    }

    pub(crate) fn slots(&self) -> Vec<Arc<Slot>> {
        self.lock().entries.iter().map(|e| e.slot.clone()).collect()
    }

    pub(crate) fn subscribe_members(&self) -> watch::Receiver<u64> {
        self.members.subscribe()
    }

    /// Whether the instance still belongs to the pool and is marked suspect.
    pub(crate) fn is_suspect(&self, slot: &Arc<Slot>) -> bool {
        self.lock()
            .entries
            .iter()
            .any(|e| Arc::ptr_eq(&e.slot, slot) && e.suspect)
    }

    /// Whether the instance has been healthy once (its startup is over).
    pub(crate) fn has_started(&self, slot: &Arc<Slot>) -> bool {
        self.lock()
            .entries
            .iter()
            .any(|e| Arc::ptr_eq(&e.slot, slot) && e.ever_healthy)
    }

    /// Acts on what the gate said once something stopped holding an instance's CPU.
    pub(crate) fn on_idle(&self, slot: &Arc<Slot>, idle: Idle) {
        on_idle(&self.service, slot, idle);
    }

    fn after_leave(&self, slot: &Arc<Slot>, left: Left) {
        if let (Some(busy), Some(metrics)) = (left.busy, &self.metrics)
            && let Some(cpu_ns) = busy.cpu_ns
            && busy.requests > 0
        {
            let per_request = Duration::from_nanos(cpu_ns / u64::from(busy.requests));
            metrics.observe_request_cpu(&self.service, per_request, busy.requests);
        }
        self.on_idle(slot, left.idle);
    }

    fn release(&self, slot: &Arc<Slot>, holds_cpu: bool) {
        let mut grants = {
            let mut inner = self.lock();
            if let Some(entry) = inner
                .entries
                .iter_mut()
                .find(|e| Arc::ptr_eq(&e.slot, slot))
            {
                entry.in_flight = entry.in_flight.saturating_sub(1);
            }
            self.dispatch(&mut inner)
        };
        let inherited = self.hold_cpu_for(&mut grants, holds_cpu.then_some(slot));
        if holds_cpu && !inherited {
            let left = slot.gate.leave();
            self.after_leave(slot, left);
        }
        self.deliver(grants);
    }

    fn mark_suspect(&self, slot: &Arc<Slot>, reason: &str) {
        {
            let mut inner = self.lock();
            let Some(entry) = inner
                .entries
                .iter_mut()
                .find(|e| Arc::ptr_eq(&e.slot, slot))
            else {
                return;
            };
            if entry.suspect {
                return;
            }
            entry.suspect = true;
            tracing::warn!(service = %self.service, instance = %slot.id, reason, "instance suspect");
            let _ = self.events.send(PoolEvent::Suspect {
                service: self.service.clone(),
                instance: slot.id.clone(),
                reason: reason.to_owned(),
            });
        }
        slot.probe_now.notify_one();
    }

    /// Hands free slots to waiters, oldest first. The leases are sent by [`Pool::deliver`]
    /// once the lock is released (a lease that cannot be delivered is dropped, which takes
    /// the lock).
    fn dispatch(&self, inner: &mut Inner) -> Vec<(oneshot::Sender<Lease>, Lease)> {
        let mut grants = Vec::new();
        let mut i = 0;
        while i < inner.queue.len() {
            if inner.queue[i].tx.is_closed() {
                inner.queue.remove(i);
                continue;
            }
            let avoid = inner.queue[i].avoid.take();
            let Some(e) = pick(inner, self.config.max_concurrency, avoid.as_deref()) else {
                let blocked_by_avoid = avoid.is_some();
                inner.queue[i].avoid = avoid;
                if !blocked_by_avoid {
                    break; // no free slot at all
                }
                i += 1;
                continue;
            };
            let Some(waiter) = inner.queue.remove(i) else {
                break;
            };
            inner.entries[e].in_flight += 1;
            let lease = self.lease(inner.entries[e].slot.clone());
            grants.push((waiter.tx, lease));
        }
        if !grants.is_empty() {
            self.queue_changed(inner);
        }
        grants
    }

    /// Makes the leases about to be handed to waiters hold their instance's CPU (restoring
    /// it if needed) before they are delivered. The first one for `heir_of`, the instance
    /// whose request just ended while holding the CPU, takes that hold over instead: no
    /// throttle and restore in between. Returns whether that happened.
    fn hold_cpu_for(
        &self,
        grants: &mut [(oneshot::Sender<Lease>, Lease)],
        mut heir_of: Option<&Arc<Slot>>,
    ) -> bool {
        let mut inherited = false;
        for (_, lease) in grants.iter_mut() {
            if heir_of.is_some_and(|s| Arc::ptr_eq(s, &lease.slot)) {
                heir_of = None;
                inherited = true;
                lease.slot.gate.handoff();
            } else {
                lease.woke = lease.slot.gate.enter();
            }
            lease.holds_cpu = true;
        }
        inherited
    }

    fn deliver(&self, grants: Vec<(oneshot::Sender<Lease>, Lease)>) {
        for (tx, lease) in grants {
            // A waiter that gave up meanwhile: its lease drops here and frees the slot again.
            let _ = tx.send(lease);
        }
    }

    fn lease(&self, slot: Arc<Slot>) -> Lease {
        Lease {
            pool: self.me.upgrade().expect("a pool in use is held by an Arc"),
            slot,
            holds_cpu: false,
            woke: false,
            queued: Duration::ZERO,
            counted: false,
        }
    }

    fn queue_changed(&self, inner: &Inner) {
        let _ = self.events.send(PoolEvent::Queue {
            service: self.service.clone(),
            depth: inner.queue.len(),
            oldest_wait: oldest_wait(inner),
        });
    }

    fn paused(&self) -> Rejected {
        self.rejected("paused");
        Rejected::Paused {
            retry_after: self.config.paused_retry_after,
        }
    }

    fn rejected(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.rejected(&self.service, reason);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Acts on what an instance's gate said once something stopped holding its CPU: arms the
/// idle timer, or the freeze timer once throttled. The timers hold the slot weakly.
fn on_idle(service: &str, slot: &Arc<Slot>, idle: Idle) {
    let (delay, generation) = match idle {
        Idle::Nothing => return,
        Idle::Throttled => return arm_freeze(slot),
        Idle::Timer { delay, generation } => (delay, generation),
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(service, instance = %slot.id, "no tokio runtime for the idle timer: the instance stays unthrottled");
        return;
    };
    let slot = Arc::downgrade(slot);
    runtime.spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(slot) = slot.upgrade()
            && slot.gate.on_idle_timer(generation)
        {
            arm_freeze(&slot);
        }
    });
}

/// Idle tier 2: once throttled, a service with `freeze_after` freezes the instance after
/// that much more idle time (any activity in between makes the timer a no-op).
fn arm_freeze(slot: &Arc<Slot>) {
    let Some((delay, generation)) = slot.gate.freeze_timer() else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let slot = Arc::downgrade(slot);
    runtime.spawn(async move {
        tokio::time::sleep(delay).await;
        if let Some(slot) = slot.upgrade() {
            // The kernel takes a moment to freeze every task: not on a proxy thread.
            let _ =
                tokio::task::spawn_blocking(move || slot.gate.on_freeze_timer(generation)).await;
        }
    });
}

fn oldest_wait(inner: &Inner) -> Duration {
    inner
        .queue
        .front()
        .map(|w| w.since.elapsed())
        .unwrap_or_default()
}

/// The in-rotation instance with a free slot and the fewest in flight, searching from the
/// cursor so that ties go round; moves the cursor past the one chosen.
fn pick(inner: &mut Inner, max: u32, avoid: Option<&str>) -> Option<usize> {
    let n = inner.entries.len();
    let mut best: Option<(usize, u32)> = None;
    for k in 0..n {
        let i = (inner.cursor + k) % n;
        let e = &inner.entries[i];
        if !e.in_rotation() || e.in_flight >= max || avoid == Some(e.slot.id.as_str()) {
            continue;
        }
        if best.is_none_or(|(_, fewest)| e.in_flight < fewest) {
            best = Some((i, e.in_flight));
        }
    }
    let (i, _) = best?;
    inner.cursor = (i + 1) % n;
    Some(i)
}

/// An instance's CPU held by [`Pool::hold_cpu`]; dropping it lets the gate throttle the
/// instance again once nothing else holds it. It does not keep the pool alive: the instance's
/// gate and its timers work on their own.
pub struct CpuHold {
    service: String,
    slot: Arc<Slot>,
    cpu_restored: bool,
}

impl CpuHold {
    pub fn instance(&self) -> &str {
        &self.slot.id
    }

    /// Whether the instance had its CPU when the hold began: false when restoring (or
    /// thawing) it failed, so the instance may still be throttled (the gate logged why and
    /// counts the failure).
    pub fn cpu_restored(&self) -> bool {
        self.cpu_restored
    }
}

impl std::fmt::Debug for CpuHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuHold")
            .field("service", &self.service)
            .field("instance", &self.slot.id)
            .field("cpu_restored", &self.cpu_restored)
            .finish()
    }
}

impl Drop for CpuHold {
    fn drop(&mut self) {
        let idle = self.slot.gate.leave_probe();
        on_idle(&self.service, &self.slot, idle);
    }
}

#[cfg(all(test, not(lull_loom)))]
mod tests {
    use super::*;
    use crate::config::CpuMode;
    use std::collections::HashMap;

    #[derive(Default)]
    pub(crate) struct FakeCpu {
        pub(crate) calls: Mutex<Vec<&'static str>>,
        /// Makes `restore` fail (the call is still recorded).
        pub(crate) fail_restore: std::sync::atomic::AtomicBool,
    }

    impl FakeCpu {
        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl CpuControl for FakeCpu {
        fn restore(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("restore");
            if self.fail_restore.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("cpu.cfs_quota_us: permission denied".into());
            }
            Ok(())
        }
        fn throttle(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("throttle");
            Ok(())
        }
        fn usage_ns(&self) -> Option<u64> {
            None
        }
    }

    struct Fixture {
        pool: Arc<Pool>,
        events: mpsc::UnboundedReceiver<PoolEvent>,
        cpus: HashMap<String, Arc<FakeCpu>>,
    }

    fn fixture(ids: &[&str], change: impl FnOnce(&mut ServiceConfig)) -> Fixture {
        let mut config = ServiceConfig {
            max_concurrency: 2,
            queue_size: 3,
            queue_timeout: Duration::from_millis(300),
            ..ServiceConfig::default()
        };
        change(&mut config);
        config.validate().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let pool = Pool::new("svc", Arc::new(config), tx);
        let mut cpus = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            let cpu = Arc::new(FakeCpu::default());
            pool.add_instance(InstanceSpec {
                id: (*id).to_owned(),
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                cpu: cpu.clone(),
            });
            pool.set_healthy(id, true, "test");
            cpus.insert((*id).to_owned(), cpu);
        }
        Fixture { pool, events, cpus }
    }

    fn drain_events(events: &mut mpsc::UnboundedReceiver<PoolEvent>) -> Vec<PoolEvent> {
        let mut out = Vec::new();
        while let Ok(e) = events.try_recv() {
            out.push(e);
        }
        out
    }

    #[tokio::test]
    async fn least_in_flight_with_one_slow_instance() {
        let f = fixture(&["a", "b"], |c| c.max_concurrency = 10);
        let first = futures_join(&f.pool, 4).await;
        let (slow, quick): (Vec<_>, Vec<_>) = first.into_iter().partition(|l| l.instance() == "a");
        assert_eq!((slow.len(), quick.len()), (2, 2));
        // "b" answered quickly, "a" still holds two requests: the next two go to "b".
        drop(quick);
        let next = futures_join(&f.pool, 2).await;
        assert!(
            next.iter().all(|l| l.instance() == "b"),
            "chose the slow instance"
        );
        let snap = f.pool.snapshot();
        assert!(snap.instances.iter().all(|i| i.in_flight == 2), "{snap:?}");
        // A full instance is skipped however few the others have.
        drop(next);
        let f = fixture(&["a", "b"], |c| c.max_concurrency = 1);
        let held = f.pool.acquire(None).await.unwrap();
        for _ in 0..3 {
            let l = f.pool.acquire(None).await.unwrap();
            assert_ne!(l.instance(), held.instance());
        }
    }

    async fn futures_join(pool: &Arc<Pool>, n: usize) -> Vec<Lease> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(pool.acquire(None).await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn demand_counts_in_flight_and_queued_and_signals_each_crossing() {
        let mut f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_size = 1;
            c.queue_timeout = Duration::from_millis(50);
        });
        let demand_events = |events: &mut mpsc::UnboundedReceiver<PoolEvent>| {
            drain_events(events)
                .into_iter()
                .filter_map(|e| match e {
                    PoolEvent::Demand { demand, .. } => Some(demand),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        f.pool.set_demand_watermark(1);
        let held = f.pool.acquire(None).await.unwrap();
        assert_eq!(f.pool.demand().current(), 1);
        assert_eq!(demand_events(&mut f.events), Vec::<usize>::new());
        // A queued request counts, and crosses the watermark.
        let pool = f.pool.clone();
        let queued = tokio::spawn(async move { pool.acquire(None).await.map(drop) });
        while f.pool.snapshot().queue_depth < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(f.pool.demand().current(), 2);
        assert_eq!(demand_events(&mut f.events), vec![2]);
        // Refused (queue full): counted while it asked, not after.
        assert!(f.pool.acquire(None).await.is_err());
        assert_eq!(f.pool.demand().current(), 2);
        // The queued one times out: uncounted.
        assert!(queued.await.unwrap().is_err());
        assert_eq!(f.pool.demand().current(), 1);
        // A waiter whose caller gives up (its future dropped) is uncounted too.
        let pool = f.pool.clone();
        let gone = tokio::spawn(async move {
            let _ = pool.acquire(None).await;
        });
        while f.pool.snapshot().queue_depth < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        assert_eq!(f.pool.demand().current(), 1);
        drop(held);
        assert_eq!(f.pool.demand().current(), 0);
        assert_eq!(f.pool.demand().take_peak(), 3);
        // A lower watermark with demand above it signals at once.
        let _l = f.pool.acquire(None).await.unwrap();
        demand_events(&mut f.events);
        f.pool.set_demand_watermark(0);
        assert_eq!(demand_events(&mut f.events), vec![1]);
    }

    #[tokio::test]
    async fn a_retiring_instance_takes_no_new_request_and_finishes_its_own() {
        let mut f = fixture(&["a", "b"], |_| {});
        let on_a = f.pool.acquire(None).await.unwrap();
        assert_eq!(on_a.instance(), "a");
        drain_events(&mut f.events);
        f.pool.retire_instance("a");
        for _ in 0..4 {
            assert_eq!(f.pool.acquire(None).await.unwrap().instance(), "b");
        }
        assert_eq!(f.pool.in_flight("a"), Some(1));
        drop(on_a);
        assert_eq!(f.pool.in_flight("a"), Some(0));
        assert!(
            drain_events(&mut f.events)
                .iter()
                .all(|e| !matches!(e, PoolEvent::Health { .. })),
            "retiring is not a health change"
        );
        f.pool.remove_instance("a");
        assert_eq!(f.pool.in_flight("a"), None);
    }

    #[tokio::test]
    async fn ties_rotate() {
        let f = fixture(&["a", "b", "c"], |_| {});
        let mut seen = Vec::new();
        for _ in 0..6 {
            let lease = f.pool.acquire(None).await.unwrap();
            seen.push(lease.instance().to_owned());
        }
        assert_eq!(seen, ["a", "b", "c", "a", "b", "c"]);
    }

    #[tokio::test]
    async fn avoid_skips_the_instance_a_retry_came_from() {
        let f = fixture(&["a", "b"], |_| {});
        for _ in 0..4 {
            let lease = f.pool.acquire(Some("a")).await.unwrap();
            assert_eq!(lease.instance(), "b");
        }
    }

    #[tokio::test]
    async fn queue_is_served_in_arrival_order() {
        let f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_timeout = Duration::from_secs(5);
        });
        let first = f.pool.acquire(None).await.unwrap();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for n in 0..3 {
            let pool = f.pool.clone();
            let done = done_tx.clone();
            tasks.push(tokio::spawn(async move {
                let lease = pool.acquire(None).await.unwrap();
                assert!(lease.queued() > Duration::ZERO);
                done.send(n).unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(lease);
            }));
            // Make the arrival order certain.
            while f.pool.snapshot().queue_depth < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(f.pool.snapshot().queue_depth, 3);
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order: Vec<_> = std::iter::from_fn(|| done_rx.try_recv().ok()).collect();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(f.pool.snapshot().queue_depth, 0);
    }

    #[tokio::test]
    async fn overflow_is_rejected_and_queue_events_are_sent() {
        let mut f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_size = 2;
            c.queue_timeout = Duration::from_secs(5);
        });
        drain_events(&mut f.events);
        let held = f.pool.acquire(None).await.unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let pool = f.pool.clone();
                tokio::spawn(
                    async move { pool.acquire(None).await.map(|l| l.instance().to_owned()) },
                )
            })
            .collect();
        while f.pool.snapshot().queue_depth < 2 {
            tokio::task::yield_now().await;
        }
        let err = f.pool.acquire(None).await.unwrap_err();
        assert_eq!(
            err,
            Rejected::QueueFull {
                retry_after: BUSY_RETRY_AFTER
            }
        );
        drop(held);
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap(), "a");
        }
        let depths: Vec<_> = drain_events(&mut f.events)
            .into_iter()
            .filter_map(|e| match e {
                PoolEvent::Queue { depth, .. } => Some(depth),
                _ => None,
            })
            .collect();
        assert_eq!(depths, [1, 2, 1, 0]);
    }

    #[tokio::test]
    async fn queue_timeout_after_the_deadline() {
        let f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_timeout = Duration::from_millis(100);
        });
        let _held = f.pool.acquire(None).await.unwrap();
        let started = Instant::now();
        let err = f.pool.acquire(None).await.unwrap_err();
        let Rejected::QueueTimeout { waited, .. } = err else {
            panic!("expected a timeout, got {err:?}")
        };
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            f.pool.snapshot().queue_depth,
            0,
            "the timed out waiter left"
        );
    }

    #[tokio::test]
    async fn paused_rejects_new_and_queued_requests() {
        let f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_timeout = Duration::from_secs(5);
            c.paused_retry_after = Duration::from_secs(7);
        });
        let held = f.pool.acquire(None).await.unwrap();
        let pool = f.pool.clone();
        let queued = tokio::spawn(async move { pool.acquire(None).await.map(drop) });
        while f.pool.snapshot().queue_depth < 1 {
            tokio::task::yield_now().await;
        }
        f.pool.set_paused(true);
        let paused = Rejected::Paused {
            retry_after: Duration::from_secs(7),
        };
        assert_eq!(queued.await.unwrap().unwrap_err(), paused);
        assert_eq!(f.pool.acquire(None).await.unwrap_err(), paused);
        assert_eq!(paused.retry_after(), Duration::from_secs(7));
        drop(held);
        f.pool.set_paused(false);
        assert!(f.pool.acquire(None).await.is_ok());
    }

    #[tokio::test]
    async fn removal_with_requests_in_flight() {
        let f = fixture(&["a", "b"], |_| {});
        let l1 = f.pool.acquire(None).await.unwrap();
        assert_eq!(l1.instance(), "a");
        f.pool.remove_instance("a");
        assert_eq!(l1.addr(), SocketAddr::from(([127, 0, 0, 1], 9000)));
        for _ in 0..2 {
            assert_eq!(f.pool.acquire(None).await.unwrap().instance(), "b");
        }
        drop(l1);
        let cpu = &f.cpus["a"];
        // Throttled when it became healthy, restored by l1, restored state kept on drain.
        assert_eq!(cpu.calls(), ["throttle", "restore"]);
        let snap = f.pool.snapshot();
        assert_eq!(snap.instances.len(), 1);
        assert!(snap.retired_active > Duration::ZERO);
    }

    #[tokio::test]
    async fn gate_called_once_per_transition() {
        let f = fixture(&["a"], |c| c.max_concurrency = 10);
        let cpu = &f.cpus["a"];
        assert_eq!(cpu.calls(), ["throttle"], "idle once healthy");
        let l1 = f.pool.acquire(None).await.unwrap();
        let l2 = f.pool.acquire(None).await.unwrap();
        assert!(l1.woke());
        assert!(!l2.woke());
        drop(l1);
        assert_eq!(cpu.calls(), ["throttle", "restore"]);
        drop(l2);
        assert_eq!(cpu.calls(), ["throttle", "restore", "throttle"]);
    }

    #[tokio::test]
    async fn an_operators_cpu_hold_outlasts_requests_and_takes_no_slot() {
        let f = fixture(&["a"], |c| c.max_concurrency = 1);
        let cpu = &f.cpus["a"];
        assert_eq!(cpu.calls(), ["throttle"], "idle once healthy");
        assert!(f.pool.hold_cpu("nope").is_none(), "not in the pool");
        let hold = f.pool.hold_cpu("a").unwrap();
        assert_eq!(hold.instance(), "a");
        assert_eq!(cpu.calls(), ["throttle", "restore"], "restored at once");
        // A request still gets the one slot, and its end does not throttle a held instance.
        let lease = f.pool.acquire(None).await.unwrap();
        assert!(!lease.woke(), "the hold had restored it");
        assert_eq!(f.pool.in_flight("a"), Some(1));
        drop(lease);
        assert_eq!(cpu.calls(), ["throttle", "restore"]);
        drop(hold);
        assert_eq!(cpu.calls(), ["throttle", "restore", "throttle"]);
        // A hold that outlives its instance's removal leaves the drained gate alone.
        let hold = f.pool.hold_cpu("a").unwrap();
        f.pool.remove_instance("a");
        drop(hold);
        assert_eq!(
            cpu.calls(),
            ["throttle", "restore", "throttle", "restore"],
            "restored by the hold, never throttled after the removal"
        );
    }

    #[tokio::test]
    async fn a_cpu_hold_tells_a_failed_restore_and_outlives_its_pool() {
        let f = fixture(&["a"], |_| {});
        let cpu = &f.cpus["a"];
        let hold = f.pool.hold_cpu("a").unwrap();
        assert!(hold.cpu_restored());
        drop(hold);
        cpu.fail_restore
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let hold = f.pool.hold_cpu("a").unwrap();
        assert!(!hold.cpu_restored(), "the restore failed: {hold:?}");
        assert_eq!(f.pool.snapshot().instances[0].gate.failures, 1);
        drop(hold);
        // Restoring works again; a hold that outlives its pool still lets the gate throttle.
        cpu.fail_restore
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let hold = f.pool.hold_cpu("a").unwrap();
        assert!(hold.cpu_restored());
        let Fixture { pool, .. } = f;
        assert_eq!(Arc::strong_count(&pool), 1, "the hold keeps no pool alive");
        drop(pool);
        drop(hold);
        assert_eq!(cpu.calls().last(), Some(&"throttle"));
    }

    #[tokio::test]
    async fn a_queued_request_takes_over_the_cpu_hold() {
        let f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_timeout = Duration::from_secs(5);
        });
        let l1 = f.pool.acquire(None).await.unwrap();
        let pool = f.pool.clone();
        let queued = tokio::spawn(async move { pool.acquire(None).await.unwrap() });
        while f.pool.snapshot().queue_depth < 1 {
            tokio::task::yield_now().await;
        }
        drop(l1);
        let l2 = queued.await.unwrap();
        assert!(!l2.woke());
        assert_eq!(
            f.cpus["a"].calls(),
            ["throttle", "restore"],
            "no throttle in between"
        );
        drop(l2);
        assert_eq!(f.cpus["a"].calls(), ["throttle", "restore", "throttle"]);
    }

    #[tokio::test]
    async fn idle_delay_is_cancelled_by_a_new_request() {
        let f = fixture(&["a"], |c| c.idle_delay = Duration::from_millis(300));
        let cpu = &f.cpus["a"];
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(
            cpu.calls(),
            ["throttle"],
            "throttled after the delay once healthy"
        );
        drop(f.pool.acquire(None).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let l = f.pool.acquire(None).await.unwrap();
        assert!(!l.woke(), "still awake within the delay");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            cpu.calls(),
            ["throttle", "restore"],
            "the pending throttle was cancelled"
        );
        drop(l);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(cpu.calls(), ["throttle", "restore"], "not before the delay");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(cpu.calls(), ["throttle", "restore", "throttle"]);
    }

    #[tokio::test]
    async fn always_mode_never_throttles() {
        let f = fixture(&["a"], |c| c.cpu = CpuMode::Always);
        drop(f.pool.acquire(None).await.unwrap());
        assert!(f.cpus["a"].calls().is_empty());
    }

    #[tokio::test]
    async fn streams_release_the_cpu_but_keep_the_slot() {
        let f = fixture(&["a"], |c| {
            c.max_concurrency = 1;
            c.queue_size = 0;
            c.streams_keep_cpu = false;
        });
        let mut stream = f.pool.acquire(None).await.unwrap();
        stream.release_cpu();
        stream.release_cpu();
        assert_eq!(f.cpus["a"].calls(), ["throttle", "restore", "throttle"]);
        assert!(matches!(
            f.pool.acquire(None).await,
            Err(Rejected::QueueFull { .. })
        ));
        drop(stream);
        assert_eq!(f.cpus["a"].calls().len(), 3, "no second leave");
        assert_eq!(f.pool.snapshot().instances[0].in_flight, 0);
    }

    #[tokio::test]
    async fn suspects_leave_rotation_until_healthy_again() {
        let mut f = fixture(&["a", "b"], |_| {});
        drain_events(&mut f.events);
        let lease = f.pool.acquire(None).await.unwrap();
        assert_eq!(lease.instance(), "a");
        lease.mark_suspect("connect: refused");
        lease.mark_suspect("connect: refused");
        drop(lease);
        for _ in 0..3 {
            assert_eq!(f.pool.acquire(None).await.unwrap().instance(), "b");
        }
        f.pool.set_healthy("a", true, "GET /: 200");
        let events = drain_events(&mut f.events);
        assert_eq!(
            events,
            [
                PoolEvent::Suspect {
                    service: "svc".into(),
                    instance: "a".into(),
                    reason: "connect: refused".into()
                },
                PoolEvent::Health {
                    service: "svc".into(),
                    instance: "a".into(),
                    healthy: true,
                    reason: "GET /: 200".into()
                }
            ]
        );
        let seen: Vec<_> = futures_join(&f.pool, 2)
            .await
            .iter()
            .map(|l| l.instance().to_owned())
            .collect();
        assert!(seen.contains(&"a".to_owned()), "{seen:?}");
    }

    #[tokio::test]
    async fn requests_wait_for_the_first_healthy_instance() {
        let (tx, _events) = mpsc::unbounded_channel();
        let pool = Pool::new("svc", Arc::new(ServiceConfig::default()), tx);
        let cpu = Arc::new(FakeCpu::default());
        pool.add_instance(InstanceSpec {
            id: "a".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 9000)),
            cpu: cpu.clone(),
        });
        let p = pool.clone();
        let waiting = tokio::spawn(async move { p.acquire(None).await.map(|l| l.woke()) });
        while pool.snapshot().queue_depth < 1 {
            tokio::task::yield_now().await;
        }
        pool.set_healthy("a", true, "ok");
        assert_eq!(waiting.await.unwrap(), Ok(false));
        assert_eq!(
            cpu.calls(),
            ["throttle"],
            "throttled only after that request"
        );
    }
}
