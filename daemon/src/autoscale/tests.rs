//! Deterministic autoscaler scenarios on a fake clock and a fake fleet: instances take
//! `START` to become ready, demand follows a script, the engine's two paths (demand events and
//! one-second samples) are replayed as the engine drives them.

use std::time::{Duration, Instant};

use super::*;

const START: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(100);

/// A fleet the decisions act on.
struct World {
    scaler: Autoscaler,
    base: Instant,
    now: Instant,
    ready: usize,
    /// Ready-at times of instances starting.
    starting: Vec<Instant>,
    next_sample: Instant,
    peak: usize,
    /// Every non-hold decision, with its time since the start.
    log: Vec<(Duration, Action)>,
    /// Most instances at once.
    most: usize,
}

impl World {
    fn new(policy: Policy, ready: usize) -> World {
        let base = Instant::now();
        World {
            scaler: Autoscaler::new(policy, base),
            base,
            now: base,
            ready,
            starting: Vec::new(),
            next_sample: base + SAMPLE_INTERVAL,
            peak: 0,
            log: Vec::new(),
            most: ready,
        }
    }

    fn inputs(&self, demand: usize) -> Inputs {
        Inputs {
            demand,
            ready: self.ready,
            starting: self.starting.len(),
        }
    }

    fn apply(&mut self, d: Decision) {
        match d.action {
            Action::Hold => {}
            Action::Out { add } => {
                for _ in 0..add {
                    self.starting.push(self.now + START);
                }
            }
            Action::In { remove } => {
                assert!(
                    remove <= self.ready,
                    "removes {remove} of {} ready",
                    self.ready
                );
                self.ready -= remove;
            }
        }
        if d.action != Action::Hold {
            assert!(d.desired <= self.scaler.policy().max_instances as usize);
            assert!(d.desired >= self.scaler.policy().min_instances as usize);
            self.log.push((self.now - self.base, d.action));
        }
        self.most = self.most.max(self.ready + self.starting.len());
    }

    /// Runs `length` at constant `demand`, crossing watermarks as the proxy would signal them.
    fn run(&mut self, demand: usize, length: Duration) {
        let end = self.now + length;
        let mut signalled = false;
        while self.now < end {
            let now = self.now;
            let became_ready = self.starting.iter().filter(|at| **at <= now).count();
            self.starting.retain(|at| *at > now);
            self.ready += became_ready;
            self.peak = self.peak.max(demand);
            let watermark = self.scaler.watermark(self.ready + self.starting.len());
            if demand > watermark && !signalled {
                let d = self.scaler.on_demand(now, self.inputs(demand));
                self.apply(d);
                signalled = true;
            } else if demand <= watermark {
                signalled = false;
            }
            if now >= self.next_sample {
                let d = self.scaler.on_sample(now, self.inputs(self.peak));
                self.apply(d);
                self.peak = demand;
                self.next_sample = now + SAMPLE_INTERVAL;
            }
            self.now += TICK;
        }
    }

    fn instances(&self) -> usize {
        self.ready + self.starting.len()
    }

    fn outs(&self) -> Vec<(Duration, usize)> {
        self.log
            .iter()
            .filter_map(|(at, a)| match a {
                Action::Out { add } => Some((*at, *add)),
                _ => None,
            })
            .collect()
    }

    fn ins(&self) -> usize {
        self.log
            .iter()
            .filter(|(_, a)| matches!(a, Action::In { .. }))
            .count()
    }
}

fn policy(max_concurrency: u32, min: u32, max: u32) -> Policy {
    Policy {
        max_concurrency,
        min_instances: min,
        max_instances: max,
        ..Policy::default()
    }
}

#[test]
fn the_seeds_jump_starts_every_missing_instance_at_once() {
    // 0 → 40 connections, max concurrency 10, max 4 instances (the end-to-end case).
    let mut w = World::new(policy(10, 1, 4), 1);
    w.run(40, Duration::from_secs(2));
    assert_eq!(
        w.outs(),
        vec![(Duration::ZERO, 3)],
        "one decision, three instances"
    );
    assert_eq!(w.ready, 4);
    // The seed's case proper: max 3 starts the 2 missing ones together.
    let mut w = World::new(policy(10, 1, 3), 1);
    w.run(40, Duration::from_secs(1));
    assert_eq!(w.outs(), vec![(Duration::ZERO, 2)]);
}

#[test]
fn step_load_scales_out_then_back_in_gradually_after_the_window() {
    let mut w = World::new(policy(10, 1, 10), 1);
    w.run(5, Duration::from_secs(10));
    assert_eq!(w.instances(), 1, "5 of 7 fits one instance");
    w.run(50, Duration::from_secs(30));
    // ceil(50 / 7) = 8.
    assert_eq!(w.instances(), 8);
    assert_eq!(w.outs().len(), 1);
    w.run(5, Duration::from_secs(59));
    assert_eq!(w.instances(), 8, "nothing goes within the stable window");
    w.run(5, Duration::from_secs(60));
    assert_eq!(w.instances(), 1, "back to what demand needs");
    assert_eq!(w.ins(), 7, "one instance per step");
    // Steps are spaced by scale_in_step.
    let times: Vec<Duration> = w
        .log
        .iter()
        .filter(|(_, a)| matches!(a, Action::In { .. }))
        .map(|(t, _)| *t)
        .collect();
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= DEFAULT_SCALE_IN_STEP, "{times:?}");
    }
}

#[test]
fn a_ramp_adds_instances_as_demand_crosses_each_watermark() {
    let mut w = World::new(policy(10, 1, 10), 1);
    for demand in (1..=60).step_by(3) {
        w.run(demand, Duration::from_millis(500));
    }
    assert_eq!(w.instances(), 9, "ceil(58 / 7)");
    assert!(
        w.outs().len() >= 5,
        "a ramp scales in several steps: {:?}",
        w.outs()
    );
    assert_eq!(w.ins(), 0);
}

#[test]
fn a_short_spike_scales_out_and_stays_for_the_window() {
    let mut w = World::new(policy(10, 1, 10), 1);
    w.run(2, Duration::from_secs(5));
    w.run(70, Duration::from_millis(300));
    assert_eq!(w.instances(), 10);
    w.run(2, Duration::from_secs(30));
    assert_eq!(
        w.instances(),
        10,
        "a spike's instances stay through the window"
    );
    w.run(2, Duration::from_secs(120));
    assert_eq!(w.instances(), 1);
}

#[test]
fn oscillating_load_does_not_flap() {
    let mut w = World::new(policy(10, 1, 10), 1);
    for _ in 0..30 {
        w.run(30, Duration::from_secs(5));
        w.run(3, Duration::from_secs(5));
    }
    // 5 minutes of a 10 s period: out once to the peak's need, never in.
    assert_eq!(w.outs().len(), 1, "{:?}", w.log);
    assert_eq!(w.ins(), 0, "{:?}", w.log);
    assert_eq!(w.instances(), 5, "ceil(30 / 7)");
}

#[test]
fn bounds_hold_both_ways() {
    let mut w = World::new(policy(10, 2, 3), 2);
    w.run(1000, Duration::from_secs(3));
    assert_eq!(w.instances(), 3, "never above max");
    assert_eq!(w.most, 3);
    w.run(0, Duration::from_secs(600));
    assert_eq!(w.instances(), 2, "never below min");
}

#[test]
fn scale_to_zero_waits_for_the_idle_period_then_a_request_starts_one() {
    let mut p = policy(10, 0, 5);
    p.idle_to_zero = Duration::from_secs(120);
    let mut w = World::new(p, 0);
    w.run(0, Duration::from_secs(5));
    assert_eq!(w.instances(), 0);
    // The first request after zero: demand 1 crosses watermark 0.
    w.run(1, Duration::from_secs(1));
    assert_eq!(w.outs(), vec![(Duration::from_secs(5), 1)]);
    assert_eq!(w.ready, 1);
    w.run(0, Duration::from_secs(119));
    assert_eq!(w.instances(), 1, "not before the idle period");
    w.run(0, Duration::from_secs(3));
    assert_eq!(w.instances(), 0);
    w.run(3, Duration::from_millis(500));
    assert_eq!(w.instances(), 1, "and back");
}

#[test]
fn decisions_carry_their_inputs() {
    let mut s = Autoscaler::new(policy(10, 1, 4), Instant::now());
    let d = s.on_demand(
        Instant::now(),
        Inputs {
            demand: 40,
            ready: 1,
            starting: 0,
        },
    );
    assert_eq!(d.action, Action::Out { add: 3 });
    assert_eq!(d.desired, 4);
    assert_eq!(d.capacity, 7.0);
    assert!(d.reason.contains("demand 40"), "{}", d.reason);
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["action"]["action"], "out");
    assert_eq!(json["inputs"]["demand"], 40);
}

#[test]
fn watermarks_follow_the_target() {
    let s = Autoscaler::new(policy(10, 1, 4), Instant::now());
    assert_eq!(s.watermark(0), 0);
    assert_eq!(s.watermark(1), 7);
    assert_eq!(s.watermark(3), 21);
    let tiny = Autoscaler::new(policy(1, 1, 4), Instant::now());
    assert_eq!(tiny.watermark(2), 2, "one request per instance at least");
}

#[test]
fn back_to_zero_after_a_cold_start_waits_for_the_idle_period_not_a_scale_in_step() {
    let mut p = policy(10, 0, 5);
    p.idle_to_zero = Duration::from_secs(1);
    p.scale_in_window = Duration::from_secs(1);
    p.scale_in_step = Duration::from_secs(30);
    let mut w = World::new(p, 1);
    w.run(0, Duration::from_secs(3));
    assert_eq!(w.instances(), 0);
    // A cold start, one request, then quiet: zero again once idle for the idle period (seen
    // by a one-second sample, so up to a second later), not after the 30 s scale-in step
    // counted from the previous zeroing.
    w.run(1, Duration::from_millis(400));
    assert_eq!(w.instances(), 1);
    w.run(0, Duration::from_millis(3500));
    assert_eq!(w.instances(), 0, "{:?}", w.log);
}
