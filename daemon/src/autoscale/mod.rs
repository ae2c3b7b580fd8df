//! The autoscaler's decisions, as pure functions of demand, instances and time.
//!
//! Demand is what the proxy sees for a service: requests in flight plus requests queued. One
//! instance takes `max_concurrency × target` of it comfortably, so a service wants
//! `ceil(demand ÷ (max_concurrency × target))` instances, within `[min, max]`.
//!
//! - **Out** is decided on the event path: the proxy signals when demand crosses the watermark
//!   the autoscaler gave it ([`Autoscaler::watermark`]), and every instance the demand calls for
//!   starts at once (the seed's 0 → 40 connections at max concurrency 10 starts the missing ones
//!   together, not one per interval).
//! - **In** is decided on a timer: the highest demand seen over the stable window, not the
//!   current one, sets what may go, one instance per step, never below min, never within a
//!   window of the last scale-out.
//! - **To zero** (min 0): the last instance goes only after `idle_to_zero` without any demand.
//!
//! Nothing here reads a clock or touches a host: the engine passes `now` in, and tests pass a
//! fake one. Every decision comes with its inputs ([`Decision`]) so the engine can record it as
//! an event.

mod host;
mod metrics;
mod psi;
#[cfg(test)]
mod tests;

pub use host::{Admission, HostBudget, HostLimits, Refusal, mem_total};
pub use metrics::ScalingMetrics;
pub use psi::{Pressure, PressureError, PressureSource, ProcPressure, parse_pressure};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Default share of max concurrency one instance is sized for (Knative and App Runner: 70 %).
pub const DEFAULT_TARGET_UTILISATION: f64 = 0.7;
/// Default time demand must stay low before instances go.
pub const DEFAULT_SCALE_IN_WINDOW: Duration = Duration::from_secs(60);
/// Default time between two scale-in steps once the window has passed.
pub const DEFAULT_SCALE_IN_STEP: Duration = Duration::from_secs(5);
/// Default idle time before a service with min 0 stops its last instance.
pub const DEFAULT_IDLE_TO_ZERO: Duration = Duration::from_secs(300);
/// How often the engine samples demand for scale-in (the only polled path).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Samples closer than this are merged (their peak kept).
const COALESCE: Duration = Duration::from_millis(100);

/// One service's scaling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Requests one instance takes at once (the proxy's per-instance limit).
    pub max_concurrency: u32,
    /// The share of `max_concurrency` an instance is sized for, in (0, 1].
    pub target_utilisation: f64,
    pub min_instances: u32,
    pub max_instances: u32,
    pub scale_in_window: Duration,
    pub scale_in_step: Duration,
    /// With `min_instances` 0: idle time before the last instance stops.
    pub idle_to_zero: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_concurrency: 100,
            target_utilisation: DEFAULT_TARGET_UTILISATION,
            min_instances: 1,
            max_instances: 10,
            scale_in_window: DEFAULT_SCALE_IN_WINDOW,
            scale_in_step: DEFAULT_SCALE_IN_STEP,
            idle_to_zero: DEFAULT_IDLE_TO_ZERO,
        }
    }
}

impl Policy {
    /// Demand one instance is sized for (at least 1).
    pub fn per_instance(&self) -> f64 {
        (f64::from(self.max_concurrency.max(1)) * self.target_utilisation).max(1.0)
    }

    /// Instances `demand` calls for, within `[min, max]`.
    pub fn desired(&self, demand: usize) -> usize {
        let raw = (demand as f64 / self.per_instance()).ceil() as usize;
        raw.clamp(
            self.min_instances as usize,
            self.max_instances.max(1) as usize,
        )
    }
}

/// What the engine knows about a service's instances when it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Inputs {
    /// Requests in flight plus queued.
    pub demand: usize,
    /// Instances in rotation.
    pub ready: usize,
    /// Instances started and not yet healthy.
    pub starting: usize,
}

impl Inputs {
    pub fn instances(&self) -> usize {
        self.ready + self.starting
    }
}

/// A decision with what it was based on, ready to be recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub inputs: Inputs,
    /// Demand the current and starting instances take at the target.
    pub capacity: f64,
    /// Instances wanted, within `[min, max]`.
    pub desired: usize,
    pub action: Action,
    /// Why, in words.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Hold,
    /// Start this many instances now.
    Out {
        add: usize,
    },
    /// Drain and stop this many instances.
    In {
        remove: usize,
    },
}

/// One service's autoscaler state: the demand history the scale-in window needs and when it last
/// acted.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: Policy,
    /// Peak demand per sample, oldest first, covering at least the window.
    samples: VecDeque<(Instant, usize)>,
    /// When demand was last above zero.
    last_active: Instant,
    last_out: Option<Instant>,
    last_in: Option<Instant>,
}

impl Autoscaler {
    pub fn new(policy: Policy, now: Instant) -> Autoscaler {
        Autoscaler {
            policy,
            samples: VecDeque::new(),
            last_active: now,
            last_out: None,
            last_in: None,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A new revision's or an updated policy: the history stays (demand did not change).
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The demand at which `instances` instances are full at the target: the proxy signals when
    /// demand goes above it. With no instance, the first request crosses it.
    pub fn watermark(&self, instances: usize) -> usize {
        (instances as f64 * self.policy.per_instance()).floor() as usize
    }

    /// The event path: demand changed (the proxy crossed a watermark, or a request arrived at a
    /// service with no instance). Decides scale-out only.
    pub fn on_demand(&mut self, now: Instant, inputs: Inputs) -> Decision {
        if inputs.demand > 0 {
            self.last_active = now;
        }
        self.record(now, inputs.demand);
        let desired = self.policy.desired(inputs.demand);
        let have = inputs.instances();
        let capacity = have as f64 * self.policy.per_instance();
        if desired > have {
            self.last_out = Some(now);
            // Scale-in steps are spaced from each other, not from a scale-in before this.
            self.last_in = None;
            let add = desired - have;
            return Decision {
                inputs,
                capacity,
                desired,
                action: Action::Out { add },
                reason: format!(
                    "demand {} exceeds what {have} instance(s) take at {:.0}% of {} (capacity {capacity:.0})",
                    inputs.demand,
                    self.policy.target_utilisation * 100.0,
                    self.policy.max_concurrency,
                ),
            };
        }
        Decision {
            inputs,
            capacity,
            desired,
            action: Action::Hold,
            reason: "capacity covers demand".into(),
        }
    }

    /// The timer path, every [`SAMPLE_INTERVAL`]: `inputs.demand` is the peak since the last
    /// sample. Decides scale-in (and scale-out too, should a peak have slipped between events).
    pub fn on_sample(&mut self, now: Instant, inputs: Inputs) -> Decision {
        let out = self.on_demand(now, inputs);
        if out.action != Action::Hold {
            return out;
        }
        let have = inputs.instances();
        let peak = self.peak(now);
        let mut desired = self.policy.desired(peak);
        let capacity = have as f64 * self.policy.per_instance();
        let hold = |reason: String, desired: usize| Decision {
            inputs,
            capacity,
            desired,
            action: Action::Hold,
            reason,
        };
        // With min 0, the last instance needs a longer quiet than the others.
        if desired == 0
            && have > 0
            && now.duration_since(self.last_active) < self.policy.idle_to_zero
        {
            desired = 1;
        }
        if desired >= have {
            return hold("capacity matches demand".into(), desired);
        }
        if let Some(out) = self.last_out
            && now.duration_since(out) < self.policy.scale_in_window
        {
            return hold(
                "within the stable window of the last scale-out".into(),
                desired,
            );
        }
        if self.history(now) < self.policy.scale_in_window && desired > 0 {
            return hold(
                "not a whole stable window of demand seen yet".into(),
                desired,
            );
        }
        if let Some(last) = self.last_in
            && now.duration_since(last) < self.policy.scale_in_step
        {
            return hold("waiting for the next scale-in step".into(), desired);
        }
        // Never stop a starting instance's worth of capacity before the ready ones.
        if inputs.starting > 0 && inputs.ready <= desired {
            return hold("instances are still starting".into(), desired);
        }
        self.last_in = Some(now);
        let (remove, reason) = if desired == 0 {
            (
                have,
                format!(
                    "no request for {} (idle to zero)",
                    crate::duration::format(self.policy.idle_to_zero)
                ),
            )
        } else {
            (
                1,
                format!(
                    "peak demand {peak} over the last {} needs {desired} of {have} instance(s)",
                    crate::duration::format(self.policy.scale_in_window)
                ),
            )
        };
        Decision {
            inputs,
            capacity,
            desired,
            action: Action::In { remove },
            reason,
        }
    }

    /// The highest demand over the stable window (the idle-to-zero period when longer and min
    /// is 0).
    fn peak(&self, now: Instant) -> usize {
        let window = self.retention();
        self.samples
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= window)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(0)
    }

    /// How far back the samples reach.
    fn history(&self, now: Instant) -> Duration {
        self.samples
            .front()
            .map_or(Duration::ZERO, |(at, _)| now.duration_since(*at))
    }

    fn retention(&self) -> Duration {
        self.policy.scale_in_window
    }

    fn record(&mut self, now: Instant, demand: usize) {
        // Events can come thousands a second: one sample per tenth of a second is enough.
        match self.samples.back_mut() {
            Some((at, peak)) if now.duration_since(*at) < COALESCE => *peak = (*peak).max(demand),
            _ => self.samples.push_back((now, demand)),
        }
        // Keep one sample older than the window, so `history` can tell a whole window was seen.
        let window = self.retention();
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) >= window {
            self.samples.pop_front();
        }
    }
}
