//! What the engine needs from a revision to run it, and the adapter that reads it from a stored
//! revision document.
//!
//! The engine does not parse revision documents itself: a [`RevisionPlanner`] turns a stored
//! [`RevisionRecord`] into a [`RevisionPlan`]. The daemon's planner reads the service model;
//! tests use a small one of their own.

use std::time::Duration;

use lull_proxy::config::ServiceConfig;

use crate::host::{InstanceLimits, SecretFile, VolumeMount};
use crate::store::RevisionRecord;

/// One revision as the engine runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionPlan {
    /// The image reference.
    pub image: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    /// The environment (without `PORT`, which the engine adds unless it is set here).
    pub env: Vec<(String, String)>,
    /// The port the app listens on.
    pub port: u16,
    pub limits: InstanceLimits,
    pub volumes: Vec<VolumeMount>,
    /// Secrets given as files (opened by the planner).
    pub secret_files: Vec<SecretFile>,
    /// Instances a deploy starts at least (one when zero); the autoscaler never goes below
    /// it (zero: the service scales to zero when idle).
    pub min_instances: u32,
    /// The autoscaler's other settings (its max concurrency is `proxy.max_concurrency`).
    pub scaling: ScalingPlan,
    /// The hosts the service answers on; empty: `<service>.localhost`.
    pub hostnames: Vec<String>,
    /// The proxy's settings for the revision's pool (health check, concurrency, timeouts).
    pub proxy: ServiceConfig,
}

impl RevisionPlan {
    /// A plan for `image` with every other setting at its default.
    pub fn for_image(image: &str) -> RevisionPlan {
        RevisionPlan {
            image: image.to_owned(),
            command: None,
            args: None,
            env: Vec::new(),
            port: 8080,
            limits: InstanceLimits::default(),
            volumes: Vec::new(),
            secret_files: Vec::new(),
            min_instances: 1,
            scaling: ScalingPlan::default(),
            hostnames: Vec::new(),
            proxy: ServiceConfig::default(),
        }
    }

    /// The hosts the service answers on.
    pub fn hosts(&self, service: &str) -> Vec<String> {
        match self.hostnames.is_empty() {
            true => vec![format!("{service}.localhost")],
            false => self.hostnames.clone(),
        }
    }

    /// The environment the instance gets: the plan's, with `PORT` added when missing.
    pub fn instance_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if !env.iter().any(|(k, _)| k == "PORT") {
            env.push(("PORT".to_owned(), self.port.to_string()));
        }
        env
    }

    /// How long one health probe may take (for reporting the last result at a deadline).
    pub fn probe_timeout(&self) -> Duration {
        self.proxy.health.timeout
    }
}

/// How a revision scales, besides its min instances and max concurrency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalingPlan {
    pub max_instances: u32,
    /// Share of max concurrency an instance is sized for, in (0, 1].
    pub target_utilisation: f64,
    pub scale_in_window: Duration,
    /// With min instances 0: idle time before the last instance stops.
    pub idle_to_zero: Duration,
}

impl Default for ScalingPlan {
    fn default() -> Self {
        let policy = crate::autoscale::Policy::default();
        ScalingPlan {
            max_instances: policy.max_instances,
            target_utilisation: policy.target_utilisation,
            scale_in_window: policy.scale_in_window,
            idle_to_zero: policy.idle_to_zero,
        }
    }
}

impl RevisionPlan {
    /// The autoscaler's policy for this revision.
    pub fn scale_policy(&self) -> crate::autoscale::Policy {
        crate::autoscale::Policy {
            max_concurrency: self.proxy.max_concurrency,
            target_utilisation: self.scaling.target_utilisation,
            min_instances: self.min_instances,
            max_instances: self.scaling.max_instances.max(self.min_instances).max(1),
            scale_in_window: self.scaling.scale_in_window,
            scale_in_step: crate::autoscale::DEFAULT_SCALE_IN_STEP,
            idle_to_zero: self.scaling.idle_to_zero,
        }
    }
}

/// Turns a stored revision into what the engine runs; the error says what is wrong with the
/// document.
pub trait RevisionPlanner: Send + Sync + 'static {
    fn plan(&self, revision: &RevisionRecord) -> Result<RevisionPlan, String>;
}

impl<F> RevisionPlanner for F
where
    F: Fn(&RevisionRecord) -> Result<RevisionPlan, String> + Send + Sync + 'static,
{
    fn plan(&self, revision: &RevisionRecord) -> Result<RevisionPlan, String> {
        self(revision)
    }
}
