//! The daemon's [`RevisionPlanner`]: a stored revision's spec, with its secrets opened, as the
//! engine runs it.

use std::sync::Arc;

use crate::engine::{RevisionPlan, RevisionPlanner};
use crate::host::{InstanceLimits, SecretFile, VolumeMount};
use crate::secrets::{SecretKey, SecretValue};
use crate::spec::{SecretTarget, ServiceSpec, Source};
use crate::store::{RevisionRecord, Store};

pub struct SpecPlanner {
    pub store: Arc<dyn Store>,
    /// Opens secrets; without it a revision using one cannot run.
    pub key: Option<Arc<SecretKey>>,
    pub base_domain: Option<String>,
}

impl SpecPlanner {
    /// Opens secret `name`.
    fn secret_value(&self, name: &str) -> Result<SecretValue, String> {
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| format!("secret {name}: the daemon has no secrets key"))?;
        let record = self
            .store
            .get_secret(name)
            .map_err(|e| format!("secret {name}: {e} (set it with `lull secret set {name}`)"))?;
        key.open(name, &record.ciphertext)
            .map_err(|e| format!("secret {name}: {e}"))
    }

    /// Opens secret `name` for an environment variable (it must be UTF-8).
    fn secret(&self, name: &str) -> Result<String, String> {
        self.secret_value(name)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("secret {name}: not UTF-8, cannot be an environment variable"))
    }
}

/// The spec stored in a revision record.
pub fn spec_of(revision: &RevisionRecord) -> Result<ServiceSpec, String> {
    serde_json::from_value::<ServiceSpec>(revision.doc.clone()).map_err(|e| {
        format!(
            "stored revision {} does not read back: {e}",
            revision.number
        )
    })
}

impl RevisionPlanner for SpecPlanner {
    fn plan(&self, revision: &RevisionRecord) -> Result<RevisionPlan, String> {
        let spec = spec_of(revision)?;
        let Source::Image { reference } = &spec.source;
        let mut env = spec.environment();
        let mut secret_files = Vec::new();
        for secret in &spec.secrets {
            match &secret.target {
                SecretTarget::Env(name) => env.push((name.clone(), self.secret(&secret.secret)?)),
                SecretTarget::File(path) => secret_files.push(SecretFile {
                    target: path.display().to_string(),
                    value: self.secret_value(&secret.secret)?,
                }),
            }
        }
        Ok(RevisionPlan {
            image: reference.to_string(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            env,
            port: spec.port,
            limits: InstanceLimits {
                cpu: Some(spec.size.cpu),
                memory_bytes: Some(spec.size.memory_bytes),
                pids: Some(u64::from(spec.pids_limit)),
            },
            volumes: spec
                .volumes
                .iter()
                .map(|v| VolumeMount {
                    name: v.name.clone(),
                    target: v.path.display().to_string(),
                    read_only: v.read_only,
                })
                .collect(),
            secret_files,
            min_instances: spec.min_instances,
            scaling: crate::engine::ScalingPlan {
                max_instances: spec.max_instances,
                target_utilisation: spec.scaling.target_utilisation,
                scale_in_window: spec.scaling.scale_in_window,
                idle_to_zero: spec.scaling.scale_to_zero_after,
            },
            hostnames: spec.hostnames(self.base_domain.as_deref()),
            proxy: spec.traffic.clone(),
        })
    }
}
