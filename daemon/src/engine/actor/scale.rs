//! The actor's autoscaling: demand events from the serving revision's pool start instances at
//! once; a one-second sample of the peak demand drains and stops them after the stable window
//! (and the last one after the idle period, for a service with min 0). Decisions come from
//! [`crate::autoscale::Autoscaler`]; this file acts on them and records each one as an event
//! with its inputs.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::{Actor, Internal, Member, Role, retire, start_request};
use crate::autoscale::{Action, Autoscaler, Decision, Inputs, SAMPLE_INTERVAL};
use crate::host::{HostError, Started};

/// After a scale-out start failed or was refused, no scale-out for this long, doubling up to
/// [`OUT_BACKOFF_MAX`] while it keeps failing: an image that cannot start, or a full host, must
/// not spin the actor or flood the events.
const OUT_BACKOFF: Duration = Duration::from_secs(1);
const OUT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The autoscaler of the serving revision set.
pub(super) struct ScaleState {
    /// The set it scales.
    key: u64,
    scaler: Autoscaler,
    /// Scale-out starts in flight (not members yet).
    starting: usize,
    next_sample: Instant,
    /// When a request found the service with no instance: a cold start is under way.
    cold_since: Option<Instant>,
    /// No scale-out before this (after a failed or refused start), and the next wait.
    out_blocked_until: Option<Instant>,
    out_backoff: Duration,
}

impl ScaleState {
    pub(super) fn next_sample(&self) -> Instant {
        self.next_sample
    }
}

impl Actor {
    /// The set at `key` now serves: it gets an autoscaler (a fresh one: demand history belongs
    /// to a revision's capacity).
    pub(super) fn scale_for(&mut self, key: u64) {
        let Some(set) = self.sets.iter().find(|s| s.key == key) else {
            return;
        };
        let now = Instant::now();
        let scaler = Autoscaler::new(set.plan.scale_policy(), now.into_std());
        self.scale = Some(ScaleState {
            key,
            scaler,
            starting: 0,
            next_sample: now + SAMPLE_INTERVAL,
            cold_since: None,
            out_blocked_until: None,
            out_backoff: OUT_BACKOFF,
        });
        self.update_watermark();
    }

    /// What the autoscaler is told about the serving set.
    fn scale_inputs(&self, demand: usize) -> Option<Inputs> {
        let scale = self.scale.as_ref()?;
        let set = self.sets.iter().find(|s| s.key == scale.key)?;
        let ready = set
            .members
            .iter()
            .filter(|m| m.healthy_since.is_some())
            .count();
        let restarts = self.restarts.iter().filter(|r| r.set == scale.key).count();
        Some(Inputs {
            demand,
            ready,
            starting: set.members.len() - ready + scale.starting + restarts,
        })
    }

    /// Tells the serving pool the demand at which its instances (started or starting) are full
    /// at the target, so that it signals the next scale-out.
    pub(super) fn update_watermark(&mut self) {
        let Some(inputs) = self.scale_inputs(0) else {
            return;
        };
        let Some(scale) = self.scale.as_ref() else {
            return;
        };
        let watermark = match self.paused {
            true => usize::MAX,
            false => scale.scaler.watermark(inputs.instances()),
        };
        if let Some(set) = self.sets.iter().find(|s| s.key == scale.key) {
            set.pool.set_demand_watermark(watermark);
            if let Some(m) = self.shared.scaling.get() {
                m.instances(&self.service, set.members.len() + scale.starting);
            }
        }
    }

    /// The serving pool's demand crossed its watermark.
    pub(super) fn on_demand(&mut self, demand: usize) {
        if self.paused {
            return;
        }
        let now = Instant::now();
        let Some(inputs) = self.scale_inputs(demand) else {
            return;
        };
        let Some(scale) = self.scale.as_mut() else {
            return;
        };
        if scale.out_blocked_until.is_some_and(|until| now < until) {
            return;
        }
        if inputs.instances() == 0 && scale.cold_since.is_none() {
            scale.cold_since = Some(now);
        }
        let decision = scale.scaler.on_demand(now.into_std(), inputs);
        if self.phase_holds(&decision) {
            return;
        }
        self.act(decision);
    }

    /// The one-second sample: scale-in (and any scale-out a missed event left).
    pub(super) fn scale_sample(&mut self, now: Instant) {
        let Some(scale) = self.scale.as_mut() else {
            return;
        };
        if scale.next_sample > now {
            return;
        }
        scale.next_sample = now + SAMPLE_INTERVAL;
        let key = scale.key;
        if self.paused {
            return;
        }
        let Some(peak) = self
            .sets
            .iter()
            .find(|s| s.key == key)
            .map(|s| s.pool.demand().take_peak())
        else {
            return;
        };
        let Some(inputs) = self.scale_inputs(peak) else {
            return;
        };
        let Some(scale) = self.scale.as_mut() else {
            return;
        };
        if inputs.instances() == 0 && peak > 0 && scale.cold_since.is_none() {
            scale.cold_since = Some(now);
        }
        let decision = scale.scaler.on_sample(now.into_std(), inputs);
        let blocked = scale.out_blocked_until.is_some_and(|until| now < until);
        if blocked && matches!(decision.action, Action::Out { .. }) {
            return;
        }
        if self.phase_holds(&decision) {
            return;
        }
        self.act(decision);
    }

    /// While a deploy starts the next revision, the serving set still scales out (a burst
    /// must not wait for a deploy, which can take up to the startup deadline), but never in:
    /// the deploy sized the new set from it, and an instance drained now would be missed if
    /// the deploy fails. (A resume holds the service paused until it ends, so nothing scales.)
    fn phase_holds(&self, decision: &Decision) -> bool {
        match &self.phase {
            super::Phase::Idle => false,
            super::Phase::Preparing { set, .. } | super::Phase::Starting { set, .. } => {
                let serving_starts = self.scale.as_ref().is_some_and(|s| s.key == *set);
                serving_starts || !matches!(decision.action, Action::Out { .. })
            }
        }
    }

    fn act(&mut self, decision: Decision) {
        match decision.action {
            Action::Hold => {}
            Action::Out { add } => self.scale_out(add, &decision),
            Action::In { remove } => self.scale_in(remove, &decision),
        }
    }

    fn record(&self, kind: &str, action: &str, decision: &Decision, message: String) {
        if let Some(m) = self.shared.scaling.get() {
            m.decision(&self.service, action);
        }
        self.event(
            kind,
            message,
            json!({
                "demand": decision.inputs.demand,
                "ready": decision.inputs.ready,
                "starting": decision.inputs.starting,
                "capacity": decision.capacity,
                "desired": decision.desired,
                "decision": decision.action,
                "reason": decision.reason,
            }),
        );
    }

    fn scale_out(&mut self, add: usize, decision: &Decision) {
        let Some(scale) = self.scale.as_ref() else {
            return;
        };
        let key = scale.key;
        let Some(set) = self.sets.iter().find(|s| s.key == key) else {
            return;
        };
        // The host's pressure brakes scale-out (not deploys or restarts), never the instances
        // a service must have: its min, and one for a request waiting at zero.
        let floor = (set.plan.min_instances as usize).max(1);
        let needed = decision.inputs.instances() < floor;
        if let Some(metrics) = self.shared.scaling.get()
            && !needed
        {
            let braked = metrics
                .pressure()
                .read()
                .ok()
                .and_then(|p| metrics.budget().brake(&p).err());
            if let Some(refusal) = braked {
                let message = format!("scale-out to {} held: {refusal}", decision.desired);
                self.record("scale.refused", "refused", decision, message);
                self.block_out();
                return;
            }
        }
        let (revision, plan, image) = (set.revision, set.plan.clone(), set.image.clone());
        self.record(
            "scale.out",
            "out",
            decision,
            format!(
                "starting {add} instance(s) of revision {revision}: {}",
                decision.reason
            ),
        );
        for _ in 0..add {
            let request = start_request(&self.service, revision, &plan, &image);
            let host = self.shared.host.clone();
            let tx = self.internal_tx.clone();
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let result = host.start(request).await;
                if let Err(tokio::sync::mpsc::error::SendError(Internal::ScaledOut {
                    result: Ok(started),
                    ..
                })) = tx.send(Internal::ScaledOut { set: key, result })
                {
                    // The service's actor is gone (deleted meanwhile): nobody would supervise it.
                    retire(shared, started.id).await;
                }
            });
        }
        if let Some(scale) = self.scale.as_mut() {
            scale.starting += add;
        }
        if let Some(set) = self.set(key) {
            set.desired = set.members.len() + add;
        }
        self.update_watermark();
    }

    fn block_out(&mut self) {
        if let Some(scale) = self.scale.as_mut() {
            scale.out_blocked_until = Some(Instant::now() + scale.out_backoff);
            scale.out_backoff = (scale.out_backoff * 2).min(OUT_BACKOFF_MAX);
        }
    }

    /// A scale-out start finished.
    pub(super) fn scaled_out(&mut self, key: u64, result: Result<Started, HostError>) {
        let current = self.scale.as_ref().is_some_and(|s| s.key == key);
        if current && let Some(scale) = self.scale.as_mut() {
            scale.starting = scale.starting.saturating_sub(1);
        }
        let serving = self
            .sets
            .iter()
            .any(|s| s.key == key && s.role == Role::Serving);
        match result {
            Ok(started) if serving && current && !self.paused => {
                if let Some(scale) = self.scale.as_mut() {
                    scale.out_backoff = OUT_BACKOFF;
                }
                self.add_member(key, started);
            }
            Ok(started) => {
                tokio::spawn(retire(self.shared.clone(), started.id));
            }
            Err(e) => {
                let refused = matches!(e, HostError::Refused { .. });
                self.event(
                    if refused {
                        "scale.refused"
                    } else {
                        "scale.failed"
                    },
                    format!("scale-out start failed: {e}"),
                    json!({"error": e.to_string()}),
                );
                if refused && let Some(m) = self.shared.scaling.get() {
                    m.decision(&self.service, "refused");
                }
                if current {
                    if let Some(set) = self.set(key) {
                        set.desired = set.members.len();
                    }
                    self.block_out();
                    // A cold start that could not start is over; the next one is timed anew.
                    let none = self
                        .sets
                        .iter()
                        .find(|s| s.key == key)
                        .is_some_and(|s| s.members.is_empty());
                    if let Some(scale) = self.scale.as_mut()
                        && none
                        && scale.starting == 0
                    {
                        scale.cold_since = None;
                    }
                }
            }
        }
        self.update_watermark();
    }

    /// Takes `remove` ready instances out of rotation, fewest requests in flight first, and
    /// stops each once its requests are done (or the drain timeout passes).
    fn scale_in(&mut self, remove: usize, decision: &Decision) {
        let Some(key) = self.scale.as_ref().map(|s| s.key) else {
            return;
        };
        let timeout = self.shared.settings.drain_timeout;
        let shared = self.shared.clone();
        let Some(set) = self.set(key) else { return };
        let revision = set.revision;
        let pool = set.pool.clone();
        let mut ready: Vec<(u32, usize, String)> = set
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.healthy_since.is_some())
            .map(|(i, m)| {
                let id = m.started.id.clone();
                (pool.in_flight(&id).unwrap_or(0), usize::MAX - i, id)
            })
            .collect();
        // Fewest in flight, then the newest.
        ready.sort();
        let going: Vec<String> = ready
            .into_iter()
            .take(remove)
            .map(|(_, _, id)| id)
            .collect();
        if going.is_empty() {
            return;
        }
        set.members
            .retain(|m: &Member| !going.contains(&m.started.id));
        set.desired = set.members.len();
        if set.members.is_empty()
            && let Some(scale) = self.scale.as_mut()
        {
            // At zero: the next request starts a cold start of its own.
            scale.cold_since = None;
        }
        for id in &going {
            pool.retire_instance(id);
            let (pool, shared, id) = (pool.clone(), shared.clone(), id.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + timeout;
                while pool.in_flight(&id).unwrap_or(0) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                pool.remove_instance(&id);
                retire(shared, id).await;
            });
        }
        self.record(
            "scale.in",
            "in",
            decision,
            format!(
                "stopping {} instance(s) of revision {revision}: {}",
                going.len(),
                decision.reason
            ),
        );
        self.update_watermark();
    }

    /// An instance of the serving set became healthy: the end of a cold start, if one was
    /// under way.
    pub(super) fn scale_healthy(&mut self, key: u64, instance: &str) {
        let Some(scale) = self.scale.as_mut() else {
            return;
        };
        if scale.key != key {
            return;
        }
        let Some(since) = scale.cold_since.take() else {
            return;
        };
        let took = since.elapsed();
        if let Some(m) = self.shared.scaling.get() {
            m.cold_start(&self.service, took);
        }
        self.event(
            "scale.cold_start",
            format!(
                "cold start served by {instance} after {} ms",
                took.as_millis()
            ),
            json!({"instance": instance, "took_ms": took.as_secs_f64() * 1000.0}),
        );
    }
}
