//! A service's definition: what runs (source, command, env, secrets, size, volumes), how many
//! instances, and the proxy's settings for it (reused from `lull_proxy::config`). Specs are
//! validated as a whole, every problem named by its field path (`env[2].name`); revisions are
//! immutable snapshots of a spec with the reason they were made.

mod apprunner;
mod revision;
mod validate;
mod wire;
use lull_builder::words;

use std::path::PathBuf;
use std::time::Duration;

use lull_proxy::config::ServiceConfig;
use lull_runtime::reference::Reference;

pub use apprunner::{ExportError, apply_apprunner_run, export, import};
pub use revision::{Revision, changes, secret_changed_cause};
pub use validate::{SpecError, SpecErrors};
pub use wire::{
    HealthCheckUpdate, HstsUpdate, QueueUpdate, ScalingUpdate, ServiceUpdate, SizeUpdate,
    TimeoutsUpdate, WireCpuMode, WireDuration, WireEnv, WireProtocol, WireSecret, WireSize,
    WireSource, WireVolume,
};
pub use words::{WordsError, join_words, split_words};

/// `port` when not given (App Runner's default).
pub const DEFAULT_PORT: u16 = 8080;
/// One vCPU.
pub const DEFAULT_CPU: f64 = 1.0;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// At least one instance stays up unless a service opts into scaling to zero (min 0).
pub const DEFAULT_MIN_INSTANCES: u32 = 1;
/// A single VM's worth; App Runner's default is 25 across a fleet.
pub const DEFAULT_MAX_INSTANCES: u32 = 10;
pub const DEFAULT_PIDS_LIMIT: u32 = 4096;

/// One service's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// A DNS label (`foo`); the service's default hostname is `<name>.localhost`.
    pub name: String,
    /// Hostnames the service answers on besides its defaults (see [`ServiceSpec::hostnames`]).
    pub hostnames: Vec<String>,
    pub source: Source,
    /// Replaces the image's entrypoint.
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    pub args: Option<Vec<String>>,
    /// The port the app listens on; `PORT` is always set to it.
    pub port: u16,
    /// In order; names unique.
    pub env: Vec<EnvVar>,
    pub secrets: Vec<SecretRef>,
    pub size: InstanceSize,
    /// 0: the service scales to zero after `scaling.scale_to_zero_after` without requests.
    pub min_instances: u32,
    pub max_instances: u32,
    pub scaling: Scaling,
    pub volumes: Vec<Volume>,
    pub pids_limit: u32,
    /// Concurrency, queue, timeouts, health check, CPU gate: the proxy's own settings type.
    pub traffic: ServiceConfig,
}

/// How the autoscaler sizes a service, besides min/max instances and max concurrency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scaling {
    /// Share of max concurrency one instance is sized for, in (0, 1].
    pub target_utilisation: f64,
    /// How long demand must stay low before instances are stopped.
    pub scale_in_window: Duration,
    /// With min instances 0: time without a request before the last instance stops.
    pub scale_to_zero_after: Duration,
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            target_utilisation: crate::autoscale::DEFAULT_TARGET_UTILISATION,
            scale_in_window: crate::autoscale::DEFAULT_SCALE_IN_WINDOW,
            scale_to_zero_after: crate::autoscale::DEFAULT_IDLE_TO_ZERO,
        }
    }
}

/// Where a service's code comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Image { reference: Reference },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// A lull secret given to instances: as an environment variable, or as a file (mode 0400,
/// owned by the app's user, on a tmpfs: never written to disk in clear).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub target: SecretTarget,
    /// The lull secret's name (`lull secret set NAME`).
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretTarget {
    /// An environment variable holding the value.
    Env(String),
    /// A file (absolute path inside the instance) holding the value.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceSize {
    /// A fraction of a vCPU or several (0.1, 0.25, 2).
    pub cpu: f64,
    pub memory_bytes: u64,
}

/// A per-service host directory mounted into instances, kept across deploys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// A DNS label, unique in the service.
    pub name: String,
    /// Absolute, inside the instance.
    pub path: PathBuf,
    /// Whether several instances may mount it at once; an unshared volume limits the service
    /// to one instance.
    pub shared: bool,
    /// Mounted read-only: the app reads what the operator put there and cannot change it.
    pub read_only: bool,
}

impl ServiceSpec {
    /// A spec with every default.
    pub fn new(name: &str, source: Source) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            hostnames: Vec::new(),
            source,
            command: None,
            args: None,
            port: DEFAULT_PORT,
            env: Vec::new(),
            secrets: Vec::new(),
            size: InstanceSize {
                cpu: DEFAULT_CPU,
                memory_bytes: DEFAULT_MEMORY_BYTES,
            },
            min_instances: DEFAULT_MIN_INSTANCES,
            max_instances: DEFAULT_MAX_INSTANCES,
            scaling: Scaling::default(),
            volumes: Vec::new(),
            pids_limit: DEFAULT_PIDS_LIMIT,
            traffic: ServiceConfig::default(),
        }
    }

    /// Every hostname the service answers on: `<name>.localhost`, `<name>.<base_domain>` when
    /// the daemon has a base domain, then `hostnames`.
    pub fn hostnames(&self, base_domain: Option<&str>) -> Vec<String> {
        let mut all = vec![format!("{}.localhost", self.name)];
        if let Some(domain) = base_domain {
            all.push(format!("{}.{domain}", self.name));
        }
        for host in &self.hostnames {
            if !all.contains(host) {
                all.push(host.clone());
            }
        }
        all
    }

    /// The environment an instance gets: `PORT`, then `env` in order (secrets are added by
    /// whoever holds their values).
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut all = vec![("PORT".to_string(), self.port.to_string())];
        all.extend(self.env.iter().map(|e| (e.name.clone(), e.value.clone())));
        all
    }

    /// The value of env var `name`, if set.
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.value.as_str())
    }

    /// Sets env var `name`, in place when present, else at the end.
    pub fn set_env(&mut self, name: &str, value: &str) {
        match self.env.iter_mut().find(|e| e.name == name) {
            Some(e) => e.value = value.to_string(),
            None => self.env.push(EnvVar {
                name: name.to_string(),
                value: value.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
