//! The per-instance CPU gate: restore an instance's CPU before its first request in flight is
//! forwarded, throttle it when its last one ends (after the service's idle delay).
//!
//! The gate is a small state machine under one mutex. The calls to [`CpuControl`] are made with
//! the mutex held, so the CPU's real state always matches the gate's idea of it and the
//! invariant "never throttled while a request or health check holds the CPU" holds under any
//! interleaving. A write is a few microseconds and only happens on 0→1 and 1→0 transitions.
//!
//! The gate owns no timer: when the idle delay is not zero, [`InstanceGate::leave`] says when to
//! call [`InstanceGate::on_idle_timer`] with a generation number; any activity in between bumps
//! the generation, so a late timer does nothing. This keeps the state machine synchronous, and
//! the loom checks below drive the timer from a thread of their own (the three-thread checks
//! bound loom to 3 preemptions, which keeps them to seconds).
//!
//! Model checks (every interleaving of two or three requests, a health check and the idle
//! timer, on this very code): `RUSTFLAGS="--cfg lull_loom" cargo test -p lull-proxy --release gate`.
//! The cfg is `lull_loom`, not loom's usual `loom`: tokio compiles its networking out under
//! `cfg(loom)`, and this crate and hyper-util need it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::CpuMode;
use crate::sync::{Mutex, lock};

/// What the gate calls; the daemon wraps the runtime's cgroup gate in it.
pub trait CpuControl: Send + Sync + 'static {
    fn restore(&self) -> Result<(), String>;
    fn throttle(&self) -> Result<(), String>;
    /// The instance's cumulative CPU usage in nanoseconds (cgroup usage counter), if known.
    fn usage_ns(&self) -> Option<u64>;
    /// Idle tier 2: stops every task of the instance (cgroup freezer); called only while
    /// throttled. A control that cannot freeze says so, and the instance stays throttled.
    fn freeze(&self) -> Result<(), String> {
        Err("this instance cannot be frozen".into())
    }
    /// Lets a frozen instance run again; called before [`CpuControl::restore`].
    fn thaw(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A CPU control that controls nothing: for upstreams lull does not run (a plain host
/// process), and for tests of everything but the gate.
#[derive(Debug, Clone, Copy, Default)]
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

/// Where an instance is in its life, as far as the gate cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatePhase {
    /// Not yet healthy once: never throttled (an app starting up needs its CPU).
    Starting,
    /// Throttled whenever nothing holds the CPU.
    Serving,
    /// Being removed or shut down: restored and never throttled again.
    Draining,
}

/// What the caller must do once something stopped holding the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Nothing: the CPU is still held, already throttled, or may not be throttled now.
    Nothing,
    /// The gate throttled the CPU (idle delay 0).
    Throttled,
    /// Call [`InstanceGate::on_idle_timer`] with `generation` after `delay`.
    Timer { delay: Duration, generation: u64 },
}

/// A stretch of time with at least one request in flight, reported when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPeriod {
    /// Requests served during it.
    pub requests: u32,
    /// CPU the instance used during it, from the usage counter (`None` if unknown).
    pub cpu_ns: Option<u64>,
    pub duration: Duration,
}

/// The result of [`InstanceGate::leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    pub idle: Idle,
    /// Set when this was the last request in flight.
    pub busy: Option<BusyPeriod>,
}

/// The gate's counters, read at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateMeter {
    /// Time with the CPU available (including startup and drain).
    pub active: Duration,
    /// Time throttled.
    pub throttled: Duration,
    /// Successful restores (throttled → running).
    pub restores: u64,
    /// Successful throttles (running → throttled).
    pub throttles: u64,
    /// Successful freezes (throttled → frozen, idle tier 2).
    pub freezes: u64,
    /// Failed calls to the CPU control.
    pub failures: u64,
    pub is_throttled: bool,
    /// Frozen (idle tier 2); a frozen instance is throttled too.
    pub is_frozen: bool,
    /// Requests holding the CPU.
    pub requests: u32,
    /// Health checks holding the CPU.
    pub probes: u32,
    pub phase: GatePhase,
}

#[derive(Debug)]
struct Busy {
    started: Instant,
    usage_ns: Option<u64>,
    requests: u32,
}

#[derive(Debug)]
struct State {
    requests: u32,
    probes: u32,
    throttled: bool,
    /// Frozen (only ever while throttled).
    frozen: bool,
    /// A freeze is under way (the lock is not held while the kernel freezes the tasks).
    freezing: bool,
    /// The `requests_generation` a freeze timer is armed for: one timer per idle stretch.
    freeze_armed: Option<u64>,
    /// Bumped when a request arrives at an idle instance or the phase changes: a freeze timer
    /// armed before then is stale. Health probes do not bump it, or an instance probed more
    /// often than `freeze_after` would never freeze.
    requests_generation: u64,
    phase: GatePhase,
    /// Bumped whenever the CPU becomes held again or the phase changes: a timer armed before
    /// then is stale.
    generation: u64,
    since: Instant,
    active: Duration,
    throttled_time: Duration,
    restores: u64,
    throttles: u64,
    freezes: u64,
    failures: u64,
    busy: Option<Busy>,
}

impl State {
    fn holders(&self) -> u32 {
        self.requests + self.probes
    }

    /// Closes the current active or throttled stretch at `now`.
    fn account(&mut self, now: Instant) {
        let stretch = now.saturating_duration_since(self.since);
        if self.throttled {
            self.throttled_time += stretch;
        } else {
            self.active += stretch;
        }
        self.since = now;
    }
}

/// One instance's CPU gate.
pub struct InstanceGate {
    cpu: Arc<dyn CpuControl>,
    mode: CpuMode,
    idle_delay: Duration,
    /// Idle tier 2: frozen this long after it was throttled (`None`: never frozen).
    freeze_after: Option<Duration>,
    state: Mutex<State>,
}

impl std::fmt::Debug for InstanceGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceGate")
            .field("mode", &self.mode)
            .field("idle_delay", &self.idle_delay)
            .field("meter", &self.meter())
            .finish()
    }
}

impl InstanceGate {
    /// A gate for an instance that is starting with its CPU available.
    pub fn new(cpu: Arc<dyn CpuControl>, mode: CpuMode, idle_delay: Duration) -> InstanceGate {
        InstanceGate {
            cpu,
            mode,
            idle_delay,
            freeze_after: None,
            state: Mutex::new(State {
                requests: 0,
                probes: 0,
                throttled: false,
                frozen: false,
                freezing: false,
                freeze_armed: None,
                requests_generation: 0,
                phase: GatePhase::Starting,
                generation: 0,
                since: Instant::now(),
                active: Duration::ZERO,
                throttled_time: Duration::ZERO,
                restores: 0,
                throttles: 0,
                freezes: 0,
                failures: 0,
                busy: None,
            }),
        }
    }

    /// Idle tier 2: once throttled, the instance is frozen after `freeze_after` more without
    /// activity (see [`InstanceGate::freeze_timer`]).
    pub fn with_freeze_after(mut self, freeze_after: Option<Duration>) -> InstanceGate {
        self.freeze_after = freeze_after;
        self
    }

    /// A request starts holding the CPU; the CPU is restored before this returns if it was
    /// throttled (a frozen instance is thawed first). Returns whether it had to be (the request woke the instance).
    pub fn enter(&self) -> bool {
        let mut s = lock(&self.state);
        if s.holders() == 0 {
            s.generation += 1;
        }
        if s.requests == 0 {
            s.requests_generation += 1;
        }
        s.requests += 1;
        // The CPU first: the usage counter is read after it, off the wake path's critical
        // write.
        let woke = self.restore_locked(&mut s);
        if s.requests == 1 {
            let usage_ns = self.cpu.usage_ns();
            s.busy = Some(Busy {
                started: Instant::now(),
                usage_ns,
                requests: 0,
            });
        }
        if let Some(busy) = s.busy.as_mut() {
            busy.requests += 1;
        }
        woke
    }

    /// A request's hold passes straight to the next request (a queued one taking over the
    /// slot): nothing changes but the count of requests served.
    pub fn handoff(&self) {
        let mut s = lock(&self.state);
        if let Some(busy) = s.busy.as_mut() {
            busy.requests += 1;
        }
    }

    /// A request stops holding the CPU.
    pub fn leave(&self) -> Left {
        let mut s = lock(&self.state);
        debug_assert!(s.requests > 0, "gate left more often than entered");
        s.requests = s.requests.saturating_sub(1);
        let ended = if s.requests == 0 { s.busy.take() } else { None };
        // The throttle first, then the usage counter (the app cannot run on between them).
        let idle = self.idle_locked(&mut s);
        let busy = ended.map(|b| {
            let now_ns = self.cpu.usage_ns();
            BusyPeriod {
                requests: b.requests,
                cpu_ns: match (b.usage_ns, now_ns) {
                    (Some(before), Some(after)) => after.checked_sub(before),
                    _ => None,
                },
                duration: b.started.elapsed(),
            }
        });
        Left { idle, busy }
    }

    /// A health check (or an operator's command, `Pool::hold_cpu`) starts holding the CPU
    /// (not counted as a request). Returns whether the CPU had to be restored.
    pub fn enter_probe(&self) -> bool {
        let mut s = lock(&self.state);
        if s.holders() == 0 {
            s.generation += 1;
        }
        s.probes += 1;
        self.restore_locked(&mut s)
    }

    /// A health check (or an operator's command) stops holding the CPU.
    pub fn leave_probe(&self) -> Idle {
        let mut s = lock(&self.state);
        debug_assert!(s.probes > 0, "gate probe left more often than entered");
        s.probes = s.probes.saturating_sub(1);
        self.idle_locked(&mut s)
    }

    /// The instance was healthy for the first time: startup is over, and from now on it is
    /// throttled whenever idle.
    pub fn set_serving(&self) -> Idle {
        let mut s = lock(&self.state);
        if s.phase != GatePhase::Starting {
            return Idle::Nothing;
        }
        s.phase = GatePhase::Serving;
        s.generation += 1;
        s.requests_generation += 1;
        self.idle_locked(&mut s)
    }

    /// The instance is being removed or shut down: restore its CPU (an app handling SIGTERM
    /// needs it) and never throttle it again. Returns whether the CPU had to be restored.
    pub fn drain(&self) -> bool {
        let mut s = lock(&self.state);
        s.phase = GatePhase::Draining;
        s.generation += 1;
        s.requests_generation += 1;
        self.restore_locked(&mut s)
    }

    /// The idle timer armed by an [`Idle::Timer`] fired. Throttles if nothing happened since;
    /// returns whether it did.
    pub fn on_idle_timer(&self, generation: u64) -> bool {
        let mut s = lock(&self.state);
        if s.generation != generation || !self.may_throttle(&s) {
            return false;
        }
        self.throttle_locked(&mut s)
    }

    /// After the gate throttled the instance: when (and with which generation) to call
    /// [`InstanceGate::on_freeze_timer`], if the instance is to be frozen at all.
    pub fn freeze_timer(&self) -> Option<(Duration, u64)> {
        let delay = self.freeze_after?;
        let mut s = lock(&self.state);
        if !self.may_freeze(&s) || s.freeze_armed == Some(s.requests_generation) {
            return None;
        }
        s.freeze_armed = Some(s.requests_generation);
        Some((delay, s.requests_generation))
    }

    /// The freeze timer fired: freezes the instance if nothing happened since it was armed;
    /// returns whether it did. Blocking (the kernel takes a moment to freeze every task): call
    /// it off the async threads. The gate's lock is not held meanwhile: a request arriving
    /// during the freeze thaws the instance and is served.
    pub fn on_freeze_timer(&self, generation: u64) -> bool {
        {
            let mut s = lock(&self.state);
            if s.requests_generation == generation {
                // This stretch's timer has fired: a later idle moment may arm another (a probe
                // holding the CPU right now must not cancel the freeze for good).
                s.freeze_armed = None;
            }
            if s.requests_generation != generation || !self.may_freeze(&s) || s.freezing {
                return false;
            }
            // A throttled task runs once per period at best, and a task freezes only when it
            // runs: give it its CPU for the freeze (a millisecond), then take it back.
            if let Err(e) = self.cpu.restore() {
                s.failures += 1;
                tracing::warn!(error = %e, "cpu gate: restoring the cpu to freeze failed");
                return false;
            }
            s.freezing = true;
        }
        let frozen = self.cpu.freeze();
        let mut s = lock(&self.state);
        s.freezing = false;
        let unchanged =
            s.requests_generation == generation && s.throttled && s.holders() == 0 && !s.frozen;
        if !unchanged {
            // Something came in meanwhile and restored the instance: it must run.
            if frozen.is_ok() {
                let _ = self.cpu.thaw();
            }
            if s.throttled {
                // Only a probe came: the gate still says throttled, so make it so again.
                if let Err(e) = self.cpu.throttle() {
                    s.failures += 1;
                    s.account(Instant::now());
                    s.throttled = false;
                    tracing::warn!(error = %e, "cpu gate: throttling again after a freeze failed");
                }
            }
            return false;
        }
        if let Err(e) = self.cpu.throttle() {
            // Frozen or not, the gate must say what the CPU is: running.
            s.failures += 1;
            s.account(Instant::now());
            s.throttled = false;
            tracing::warn!(error = %e, "cpu gate: throttling again after a freeze failed");
            if frozen.is_ok() {
                let _ = self.cpu.thaw();
            }
            return false;
        }
        match frozen {
            Ok(()) => {
                s.frozen = true;
                s.freezes += 1;
                true
            }
            Err(e) => {
                s.failures += 1;
                tracing::warn!(error = %e, "cpu gate: freezing failed; the instance stays throttled");
                false
            }
        }
    }

    /// Whether the instance is frozen (health checks skip it: see the health module).
    pub fn is_frozen(&self) -> bool {
        lock(&self.state).frozen
    }

    pub fn meter(&self) -> GateMeter {
        let s = lock(&self.state);
        let current = Instant::now().saturating_duration_since(s.since);
        let (mut active, mut throttled) = (s.active, s.throttled_time);
        if s.throttled {
            throttled += current;
        } else {
            active += current;
        }
        GateMeter {
            active,
            throttled,
            restores: s.restores,
            throttles: s.throttles,
            freezes: s.freezes,
            failures: s.failures,
            is_throttled: s.throttled,
            is_frozen: s.frozen,
            requests: s.requests,
            probes: s.probes,
            phase: s.phase,
        }
    }

    pub fn mode(&self) -> CpuMode {
        self.mode
    }

    fn may_throttle(&self, s: &State) -> bool {
        self.mode == CpuMode::Request
            && s.phase == GatePhase::Serving
            && s.holders() == 0
            && !s.throttled
    }

    fn may_freeze(&self, s: &State) -> bool {
        self.mode == CpuMode::Request
            && s.phase == GatePhase::Serving
            && s.holders() == 0
            && s.throttled
            && !s.frozen
    }

    /// After something stopped holding the CPU: throttle now, arm the timer, or nothing.
    fn idle_locked(&self, s: &mut State) -> Idle {
        if !self.may_throttle(s) {
            return Idle::Nothing;
        }
        if self.idle_delay.is_zero() {
            return match self.throttle_locked(s) {
                true => Idle::Throttled,
                false => Idle::Nothing,
            };
        }
        Idle::Timer {
            delay: self.idle_delay,
            generation: s.generation,
        }
    }

    fn restore_locked(&self, s: &mut State) -> bool {
        if !s.throttled {
            return false;
        }
        if s.freezing {
            // The freezer may be about to stop the tasks: undo that now (the freeze then fails
            // or is thawed by whoever runs it, seeing the request).
            let _ = self.cpu.thaw();
        }
        if s.frozen {
            if let Err(e) = self.cpu.thaw() {
                // Restoring the quota of a frozen instance would not run it: try again next time.
                s.failures += 1;
                tracing::warn!(error = %e, "cpu gate: thawing failed");
                return false;
            }
            s.frozen = false;
        }
        match self.cpu.restore() {
            Ok(()) => {
                s.account(Instant::now());
                s.throttled = false;
                s.restores += 1;
                true
            }
            Err(e) => {
                // The request goes on (slowly) rather than failing; the next one tries again.
                s.failures += 1;
                tracing::warn!(error = %e, "cpu gate: restoring the cpu failed");
                false
            }
        }
    }

    fn throttle_locked(&self, s: &mut State) -> bool {
        debug_assert!(self.may_throttle(s));
        match self.cpu.throttle() {
            Ok(()) => {
                s.account(Instant::now());
                s.throttled = true;
                s.throttles += 1;
                true
            }
            Err(e) => {
                s.failures += 1;
                tracing::warn!(error = %e, "cpu gate: throttling the cpu failed");
                false
            }
        }
    }
}

#[cfg(all(test, not(lull_loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Recorder {
        calls: StdMutex<Vec<&'static str>>,
        usage: StdMutex<u64>,
        fail: StdMutex<bool>,
        fail_freeze: StdMutex<bool>,
    }

    impl CpuControl for Recorder {
        fn restore(&self) -> Result<(), String> {
            if *self.fail.lock().unwrap() {
                return Err("write failed".into());
            }
            self.calls.lock().unwrap().push("restore");
            Ok(())
        }
        fn throttle(&self) -> Result<(), String> {
            if *self.fail.lock().unwrap() {
                return Err("write failed".into());
            }
            self.calls.lock().unwrap().push("throttle");
            Ok(())
        }
        fn usage_ns(&self) -> Option<u64> {
            Some(*self.usage.lock().unwrap())
        }
        fn freeze(&self) -> Result<(), String> {
            if *self.fail_freeze.lock().unwrap() {
                return Err("write failed".into());
            }
            self.calls.lock().unwrap().push("freeze");
            Ok(())
        }
        fn thaw(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("thaw");
            Ok(())
        }
    }

    fn freezing_gate() -> (Arc<Recorder>, InstanceGate) {
        let cpu = Arc::new(Recorder::default());
        let gate = InstanceGate::new(cpu.clone(), CpuMode::Request, Duration::ZERO)
            .with_freeze_after(Some(Duration::from_secs(30)));
        (cpu, gate)
    }

    #[test]
    fn tier_two_freezes_a_throttled_instance_and_a_request_thaws_it_first() {
        let (cpu, gate) = freezing_gate();
        assert_eq!(gate.freeze_timer(), None, "not before it is throttled");
        assert_eq!(gate.set_serving(), Idle::Throttled);
        let (delay, generation) = gate.freeze_timer().unwrap();
        assert_eq!(delay, Duration::from_secs(30));
        assert!(gate.on_freeze_timer(generation));
        assert!(gate.is_frozen() && gate.meter().is_frozen);
        assert_eq!(gate.freeze_timer(), None, "frozen once");
        assert!(!gate.on_freeze_timer(generation));
        assert!(gate.enter(), "a request wakes it");
        assert!(!gate.is_frozen());
        assert_eq!(
            calls(&cpu),
            [
                "throttle", "restore", "freeze", "throttle", "thaw", "restore"
            ],
            "the freeze runs with the CPU given back for it"
        );
        let m = gate.meter();
        assert_eq!((m.freezes, m.restores, m.is_throttled), (1, 1, false));
        gate.leave();
        // Drain (a stop) thaws a frozen instance first: a frozen app cannot act on SIGTERM.
        let (_, generation) = gate.freeze_timer().unwrap();
        assert!(gate.on_freeze_timer(generation));
        assert!(gate.drain());
        assert_eq!(
            calls(&cpu)[6..],
            [
                "throttle", "restore", "freeze", "throttle", "thaw", "restore"
            ]
        );
    }

    #[test]
    fn tier_two_timers_armed_before_activity_are_stale() {
        let (cpu, gate) = freezing_gate();
        gate.set_serving();
        let (_, stale) = gate.freeze_timer().unwrap();
        gate.enter();
        gate.leave();
        assert!(!gate.on_freeze_timer(stale), "a request came in between");
        // A probe holds the CPU for its length but does not restart the wait: an instance
        // probed more often than freeze_after still freezes.
        let (_, current) = gate.freeze_timer().unwrap();
        assert_eq!(gate.freeze_timer(), None, "one timer per idle stretch");
        gate.enter_probe();
        assert!(!gate.on_freeze_timer(current), "not while a probe holds it");
        assert_eq!(gate.leave_probe(), Idle::Throttled);
        assert!(!calls(&cpu).contains(&"freeze"));
        // The probe's end arms the timer again, for the same stretch.
        assert_eq!(gate.freeze_timer().unwrap().1, current);
        assert!(gate.on_freeze_timer(current));
        // Without freeze_after, never.
        let (_, plain) = gate_fn(CpuMode::Request, 0);
        plain.set_serving();
        assert_eq!(plain.freeze_timer(), None);
    }

    #[test]
    fn a_failed_freeze_leaves_the_instance_throttled() {
        let (cpu, gate) = freezing_gate();
        gate.set_serving();
        let (_, generation) = gate.freeze_timer().unwrap();
        *cpu.fail_freeze.lock().unwrap() = true;
        assert!(!gate.on_freeze_timer(generation));
        *cpu.fail_freeze.lock().unwrap() = false;
        let m = gate.meter();
        assert!(m.is_throttled && !m.is_frozen);
        assert_eq!(m.failures, 1);
        assert!(gate.enter());
        assert_eq!(
            calls(&cpu),
            ["throttle", "restore", "throttle", "restore"],
            "throttled again after the failed freeze; no thaw of what is not frozen"
        );
    }

    fn gate_fn(mode: CpuMode, delay_ms: u64) -> (Arc<Recorder>, InstanceGate) {
        gate(mode, delay_ms)
    }

    fn gate(mode: CpuMode, delay_ms: u64) -> (Arc<Recorder>, InstanceGate) {
        let cpu = Arc::new(Recorder::default());
        let gate = InstanceGate::new(cpu.clone(), mode, Duration::from_millis(delay_ms));
        (cpu, gate)
    }

    fn calls(cpu: &Recorder) -> Vec<&'static str> {
        cpu.calls.lock().unwrap().clone()
    }

    #[test]
    fn never_throttles_before_first_healthy() {
        let (cpu, gate) = gate(CpuMode::Request, 0);
        assert!(!gate.enter());
        assert_eq!(gate.leave().idle, Idle::Nothing);
        gate.enter_probe();
        assert_eq!(gate.leave_probe(), Idle::Nothing);
        assert!(calls(&cpu).is_empty());
        assert_eq!(gate.set_serving(), Idle::Throttled);
        assert_eq!(calls(&cpu), ["throttle"]);
        assert_eq!(
            gate.set_serving(),
            Idle::Nothing,
            "only the first time counts"
        );
    }

    #[test]
    fn one_restore_per_busy_period_and_cpu_per_request() {
        let (cpu, gate) = gate(CpuMode::Request, 0);
        gate.set_serving();
        *cpu.usage.lock().unwrap() = 1_000;
        assert!(gate.enter(), "the first request wakes the instance");
        assert!(!gate.enter(), "the second finds it awake");
        gate.handoff();
        *cpu.usage.lock().unwrap() = 7_000;
        let first = gate.leave();
        assert_eq!(first.idle, Idle::Nothing);
        assert_eq!(first.busy, None);
        let last = gate.leave();
        assert_eq!(last.idle, Idle::Throttled);
        let busy = last.busy.unwrap();
        assert_eq!(busy.requests, 3);
        assert_eq!(busy.cpu_ns, Some(6_000));
        assert_eq!(calls(&cpu), ["throttle", "restore", "throttle"]);
        let m = gate.meter();
        assert_eq!((m.restores, m.throttles, m.is_throttled), (1, 2, true));
    }

    #[test]
    fn probes_hold_the_cpu_without_being_requests() {
        let (cpu, gate) = gate(CpuMode::Request, 0);
        gate.set_serving();
        assert!(gate.enter_probe());
        assert!(!gate.enter());
        let left = gate.leave();
        assert_eq!(left.idle, Idle::Nothing, "the probe still holds the cpu");
        assert_eq!(left.busy.unwrap().requests, 1);
        assert_eq!(gate.leave_probe(), Idle::Throttled);
        assert_eq!(calls(&cpu), ["throttle", "restore", "throttle"]);
    }

    #[test]
    fn idle_timer_throttles_unless_activity_came_in_between() {
        let (cpu, gate) = gate(CpuMode::Request, 50);
        let Idle::Timer { generation: g0, .. } = gate.set_serving() else {
            panic!("expected a timer")
        };
        gate.enter();
        let Idle::Timer { delay, generation } = gate.leave().idle else {
            panic!("expected a timer")
        };
        assert_eq!(delay, Duration::from_millis(50));
        assert!(!gate.on_idle_timer(g0), "a stale timer does nothing");
        gate.enter();
        assert!(
            !gate.on_idle_timer(generation),
            "busy: the timer is cancelled"
        );
        let Idle::Timer { generation, .. } = gate.leave().idle else {
            panic!("expected a timer")
        };
        assert!(gate.on_idle_timer(generation));
        assert!(!gate.on_idle_timer(generation), "throttled once");
        assert_eq!(calls(&cpu), ["throttle"]);
    }

    #[test]
    fn always_mode_never_touches_the_cpu() {
        let (cpu, gate) = gate(CpuMode::Always, 0);
        gate.set_serving();
        assert!(!gate.enter());
        assert_eq!(gate.leave().idle, Idle::Nothing);
        assert!(calls(&cpu).is_empty());
        assert!(!gate.meter().is_throttled);
    }

    #[test]
    fn drain_restores_and_never_throttles_again() {
        let (cpu, gate) = gate(CpuMode::Request, 0);
        gate.set_serving();
        assert!(gate.drain());
        gate.enter();
        assert_eq!(gate.leave().idle, Idle::Nothing);
        assert_eq!(calls(&cpu), ["throttle", "restore"]);
        assert_eq!(gate.meter().phase, GatePhase::Draining);
    }

    #[test]
    fn a_failed_restore_is_retried_by_the_next_request() {
        let (cpu, gate) = gate(CpuMode::Request, 0);
        gate.set_serving();
        *cpu.fail.lock().unwrap() = true;
        assert!(!gate.enter());
        assert!(gate.meter().is_throttled);
        *cpu.fail.lock().unwrap() = false;
        assert!(gate.enter(), "the next request restores it");
        assert_eq!(gate.meter().failures, 1);
        gate.leave();
        assert_eq!(gate.leave().idle, Idle::Throttled);
    }

    #[test]
    fn meters_active_and_throttled_time() {
        let started = Instant::now();
        let (_cpu, gate) = gate(CpuMode::Request, 0);
        std::thread::sleep(Duration::from_millis(20));
        gate.set_serving();
        let serving = started.elapsed();
        std::thread::sleep(Duration::from_millis(60));
        let m = gate.meter();
        let total = started.elapsed();
        assert!(m.active >= Duration::from_millis(20), "{m:?}");
        assert!(m.active <= serving, "{m:?}");
        assert!(m.throttled >= Duration::from_millis(60), "{m:?}");
        assert!(m.active + m.throttled <= total, "{m:?}");
    }
}

/// Model checks of the production gate under loom: every interleaving of concurrent requests,
/// health checks, the idle timer, startup and drain, asserting after each step that no request
/// runs on a throttled CPU, that the CPU is never restored or throttled twice in a row, and
/// that no transition is lost (an idle serving instance ends throttled).
#[cfg(all(test, lull_loom))]
mod loom_checks {
    use super::*;
    use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use loom::thread;

    #[derive(Default)]
    struct ModelCpu {
        throttled: AtomicBool,
        /// Requests and probes between their enter's return and their leave's call.
        inside: AtomicUsize,
        drained: AtomicBool,
        restores: AtomicUsize,
        throttles: AtomicUsize,
        usage: AtomicU64,
    }

    impl CpuControl for ModelCpu {
        fn restore(&self) -> Result<(), String> {
            assert!(self.throttled.swap(false, SeqCst), "restored a running cpu");
            self.restores.fetch_add(1, SeqCst);
            Ok(())
        }
        fn throttle(&self) -> Result<(), String> {
            assert_eq!(
                self.inside.load(SeqCst),
                0,
                "throttled with a request in flight"
            );
            assert!(!self.drained.load(SeqCst), "throttled while draining");
            assert!(!self.throttled.swap(true, SeqCst), "throttled twice");
            self.throttles.fetch_add(1, SeqCst);
            Ok(())
        }
        fn usage_ns(&self) -> Option<u64> {
            Some(self.usage.fetch_add(1_000, SeqCst))
        }
    }

    fn setup(delay_ms: u64) -> (Arc<ModelCpu>, Arc<InstanceGate>) {
        let cpu = Arc::new(ModelCpu::default());
        let gate = Arc::new(InstanceGate::new(
            cpu.clone(),
            CpuMode::Request,
            Duration::from_millis(delay_ms),
        ));
        (cpu, gate)
    }

    /// One request: enter, check the cpu runs, leave; fires its own idle timer afterwards
    /// (racing with the other threads' requests).
    fn request(cpu: &ModelCpu, gate: &InstanceGate) {
        gate.enter();
        cpu.inside.fetch_add(1, SeqCst);
        assert!(
            !cpu.throttled.load(SeqCst),
            "request ran on a throttled cpu"
        );
        cpu.inside.fetch_sub(1, SeqCst);
        if let Idle::Timer { generation, .. } = gate.leave().idle {
            gate.on_idle_timer(generation);
        }
    }

    fn probe(cpu: &ModelCpu, gate: &InstanceGate) {
        gate.enter_probe();
        cpu.inside.fetch_add(1, SeqCst);
        assert!(!cpu.throttled.load(SeqCst), "probe ran on a throttled cpu");
        cpu.inside.fetch_sub(1, SeqCst);
        if let Idle::Timer { generation, .. } = gate.leave_probe() {
            gate.on_idle_timer(generation);
        }
    }

    fn assert_settled(cpu: &ModelCpu, gate: &InstanceGate) {
        let m = gate.meter();
        assert_eq!((m.requests, m.probes), (0, 0));
        assert!(m.is_throttled, "an idle serving instance was left running");
        assert!(cpu.throttled.load(SeqCst));
        assert_eq!(cpu.throttles.load(SeqCst), cpu.restores.load(SeqCst) + 1);
        assert_eq!(m.throttles as usize, cpu.throttles.load(SeqCst));
    }

    #[test]
    fn gate_loom_two_requests_and_a_probe_immediate_throttle() {
        // Three threads: bounded preemptions keep it to seconds (bugs rarely need more).
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let (cpu, gate) = setup(0);
            assert_eq!(gate.set_serving(), Idle::Throttled);
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (cpu, gate) = (cpu.clone(), gate.clone());
                    thread::spawn(move || request(&cpu, &gate))
                })
                .collect();
            probe(&cpu, &gate);
            for t in threads {
                t.join().unwrap();
            }
            assert_settled(&cpu, &gate);
        });
    }

    #[test]
    fn gate_loom_two_requests_with_idle_timer() {
        loom::model(|| {
            let (cpu, gate) = setup(5);
            let Idle::Timer { generation, .. } = gate.set_serving() else {
                panic!("expected a timer")
            };
            let timer = {
                let gate = gate.clone();
                thread::spawn(move || gate.on_idle_timer(generation))
            };
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let (cpu, gate) = (cpu.clone(), gate.clone());
                    thread::spawn(move || request(&cpu, &gate))
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            timer.join().unwrap();
            // The last leave armed a timer with the current generation and fired it.
            assert_settled(&cpu, &gate);
        });
    }

    #[test]
    fn gate_loom_three_requests_with_idle_timer() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let (cpu, gate) = setup(5);
            if let Idle::Timer { generation, .. } = gate.set_serving() {
                gate.on_idle_timer(generation);
            }
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let (cpu, gate) = (cpu.clone(), gate.clone());
                    thread::spawn(move || request(&cpu, &gate))
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_settled(&cpu, &gate);
        });
    }

    #[test]
    fn gate_loom_startup_races_with_traffic_and_probes() {
        loom::model(|| {
            let (cpu, gate) = setup(0);
            let req = {
                let (cpu, gate) = (cpu.clone(), gate.clone());
                thread::spawn(move || request(&cpu, &gate))
            };
            let prb = {
                let (cpu, gate) = (cpu.clone(), gate.clone());
                thread::spawn(move || probe(&cpu, &gate))
            };
            gate.set_serving();
            req.join().unwrap();
            prb.join().unwrap();
            assert_settled(&cpu, &gate);
        });
    }

    #[test]
    fn gate_loom_drain_races_with_a_request_and_a_timer() {
        loom::model(|| {
            let (cpu, gate) = setup(5);
            let Idle::Timer { generation, .. } = gate.set_serving() else {
                panic!("expected a timer")
            };
            let timer = {
                let gate = gate.clone();
                thread::spawn(move || gate.on_idle_timer(generation))
            };
            let req = {
                let (cpu, gate) = (cpu.clone(), gate.clone());
                thread::spawn(move || request(&cpu, &gate))
            };
            gate.drain();
            cpu.drained.store(true, SeqCst);
            timer.join().unwrap();
            req.join().unwrap();
            let m = gate.meter();
            assert!(!m.is_throttled, "a draining instance was left throttled");
            assert!(!cpu.throttled.load(SeqCst));
            assert_eq!(cpu.throttles.load(SeqCst), cpu.restores.load(SeqCst));
        });
    }
}
