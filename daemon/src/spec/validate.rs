//! Every rule a spec must keep, checked all at once; each problem names its field path in the
//! JSON form (`env[2].name`, `health_check.timeout`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Component, Path};
use std::time::Duration;

use lull_proxy::config::{HSTS_PRELOAD_MIN_AGE, HealthProbe, TIMEOUT_RULE};

use super::{SecretTarget, ServiceSpec};
use crate::duration;
use crate::names;

/// One problem: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, in field order; shown one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn one(path: &str, message: impl Into<String>) -> SpecErrors {
        SpecErrors(vec![SpecError {
            path: path.to_string(),
            message: message.into(),
        }])
    }
}

/// Smallest memory an instance may have.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// Smallest CPU share the kernel can enforce (1 ms of quota in a 1 s period).
pub const MIN_CPU: f64 = 0.001;
pub const MAX_CPU: f64 = 1024.0;
pub const MAX_INSTANCES: u32 = 1000;

#[derive(Default)]
struct Problems(Vec<SpecError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecError {
            path: path.into(),
            message: message.into(),
        });
    }
}

impl ServiceSpec {
    /// Checks the whole spec; every problem is returned.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut p = Problems::default();
        if let Err(e) = names::check_label(&self.name) {
            p.add("name", e.to_string());
        }
        for (i, host) in self.hostnames.iter().enumerate() {
            if let Err(e) = names::check_dns_name(host) {
                p.add(format!("hostnames[{i}]"), e.to_string());
            }
        }
        for (field, words) in [("command", &self.command), ("args", &self.args)] {
            if let Some(words) = words {
                if field == "command" && words.is_empty() {
                    p.add(field, "is empty (expected a program and its arguments)");
                }
                for (i, word) in words.iter().enumerate() {
                    if word.contains('\0') {
                        p.add(format!("{field}[{i}]"), "contains a NUL byte");
                    }
                }
            }
        }
        if self.port == 0 {
            p.add("port", "must be 1 to 65535");
        }
        let mut env_names = HashSet::new();
        for (i, var) in self.env.iter().enumerate() {
            if let Err(e) = names::check_env_name(&var.name) {
                p.add(format!("env[{i}].name"), e.to_string());
            } else if var.name == "PORT" {
                p.add(
                    format!("env[{i}].name"),
                    "PORT is set from port (set port instead)",
                );
            } else if !env_names.insert(var.name.as_str()) {
                p.add(
                    format!("env[{i}].name"),
                    format!("{} is set twice", var.name),
                );
            }
            if var.value.contains('\0') {
                p.add(format!("env[{i}].value"), "contains a NUL byte");
            }
        }
        // Every path mounted into the instance (file secrets and volumes): one mount each.
        let mut targets: HashMap<&Path, String> = HashMap::new();
        for (i, secret) in self.secrets.iter().enumerate() {
            match &secret.target {
                SecretTarget::Env(name) => {
                    if let Err(e) = names::check_env_name(name) {
                        p.add(format!("secrets[{i}].env"), e.to_string());
                    } else if name == "PORT" || !env_names.insert(name.as_str()) {
                        p.add(
                            format!("secrets[{i}].env"),
                            format!("{name} is already set (by env, port or another secret)"),
                        );
                    }
                }
                SecretTarget::File(path) => {
                    let field = format!("secrets[{i}].file");
                    if let Err(message) = check_mount_path(path) {
                        p.add(field, message);
                    } else if let Some(first) = targets.get(path.as_path()) {
                        p.add(
                            field,
                            format!("{} is already the target of {first}", path.display()),
                        );
                    } else {
                        targets.insert(path, field);
                    }
                }
            }
            if let Err(e) = names::check_secret_name(&secret.secret) {
                p.add(format!("secrets[{i}].secret"), e.to_string());
            }
        }
        let cpu = self.size.cpu;
        if !(cpu.is_finite() && (MIN_CPU..=MAX_CPU).contains(&cpu)) {
            p.add(
                "size.cpu",
                format!("{cpu} is out of range (expected {MIN_CPU} to {MAX_CPU} vCPUs)"),
            );
        }
        if self.size.memory_bytes < MIN_MEMORY_BYTES {
            p.add(
                "size.memory",
                format!(
                    "{} is too small (expected at least {})",
                    lull_runtime::size::exact(self.size.memory_bytes),
                    lull_runtime::size::exact(MIN_MEMORY_BYTES)
                ),
            );
        }
        let sc = &self.scaling;
        if !(sc.target_utilisation > 0.0 && sc.target_utilisation <= 1.0) {
            p.add(
                "scaling.target_utilisation",
                format!(
                    "{} is not in (0, 1] (expected e.g. 0.7)",
                    sc.target_utilisation
                ),
            );
        }
        if sc.scale_in_window < Duration::from_secs(1) {
            p.add("scaling.scale_in_window", "must be at least 1s");
        }
        if sc.scale_to_zero_after < Duration::from_secs(1) {
            p.add("scaling.scale_to_zero_after", "must be at least 1s");
        }
        if self.max_instances == 0 || self.max_instances > MAX_INSTANCES {
            p.add("max_instances", format!("must be 1 to {MAX_INSTANCES}"));
        } else if self.max_instances < self.min_instances {
            p.add(
                "max_instances",
                format!(
                    "{} is less than min_instances ({})",
                    self.max_instances, self.min_instances
                ),
            );
        }
        let mut volume_names = HashSet::new();
        for (i, volume) in self.volumes.iter().enumerate() {
            if let Err(e) = names::check_label(&volume.name) {
                p.add(format!("volumes[{i}].name"), e.to_string());
            } else if !volume_names.insert(volume.name.as_str()) {
                p.add(
                    format!("volumes[{i}].name"),
                    format!("{} is used twice", volume.name),
                );
            }
            let field = format!("volumes[{i}].path");
            if let Err(message) = check_mount_path(&volume.path) {
                p.add(field, message);
            } else if let Some(first) = targets.get(volume.path.as_path()) {
                p.add(
                    field,
                    format!("{} is already the target of {first}", volume.path.display()),
                );
            } else {
                targets.insert(&volume.path, field);
            }
        }
        if self.max_instances > 1
            && let Some(volume) = self.volumes.iter().find(|v| !v.shared)
        {
            p.add(
                "max_instances",
                format!(
                    "must be 1: volume {} is not shared (mark it shared to run more instances)",
                    volume.name
                ),
            );
        }
        if self.pids_limit < 16 {
            p.add("pids_limit", "must be at least 16");
        }
        self.validate_traffic(&mut p);
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(p.0))
        }
    }

    /// The proxy's rules, worded as the proxy words them, with the JSON form's paths.
    fn validate_traffic(&self, p: &mut Problems) {
        let t = &self.traffic;
        if t.max_concurrency == 0 {
            p.add("max_concurrency", "must be at least 1");
        }
        if let Some(freeze) = t.freeze_after {
            if freeze < Duration::from_millis(100) {
                p.add(
                    "freeze_after",
                    "must be at least 100ms (or 0 to never freeze)",
                );
            } else if t.cpu != lull_proxy::config::CpuMode::Request {
                p.add(
                    "freeze_after",
                    "needs cpu_mode request (an instance with CPU always is never idle)",
                );
            }
        }
        if t.queue_size > 0 && t.queue_timeout.is_zero() {
            p.add(
                "queue.timeout",
                "must be more than 0 when requests may queue",
            );
        }
        for (field, value) in [
            ("timeouts.connect", t.timeouts.connect),
            ("timeouts.first_byte", t.timeouts.first_byte),
            ("timeouts.request", t.timeouts.request),
            ("timeouts.websocket_idle", t.timeouts.websocket_idle),
            ("timeouts.upstream_idle", t.timeouts.upstream_idle),
        ] {
            if value.is_zero() {
                p.add(field, "must be more than 0");
            }
        }
        if t.timeouts.first_byte > t.timeouts.request {
            p.add(
                "timeouts.first_byte",
                format!(
                    "{} is longer than the whole request's timeout ({})",
                    duration::format(t.timeouts.first_byte),
                    duration::format(t.timeouts.request)
                ),
            );
        }
        let h = &t.health;
        if h.interval.is_zero() {
            p.add("health_check.interval", "must be more than 0");
        } else if h.timeout.is_zero() || h.timeout >= h.interval {
            p.add(
                "health_check.timeout",
                format!(
                    "{TIMEOUT_RULE} (timeout {}, interval {})",
                    duration::format(h.timeout),
                    duration::format(h.interval)
                ),
            );
        }
        if h.healthy_threshold == 0 {
            p.add("health_check.healthy_threshold", "must be at least 1");
        }
        if h.unhealthy_threshold == 0 {
            p.add("health_check.unhealthy_threshold", "must be at least 1");
        }
        if let HealthProbe::Http {
            path,
            min_status,
            max_status,
        } = &h.probe
        {
            if !path.starts_with('/') {
                p.add("health_check.path", format!("{path:?} must start with '/'"));
            }
            if !(100..=599).contains(min_status)
                || !(100..=599).contains(max_status)
                || min_status > max_status
            {
                p.add(
                    "health_check.status",
                    format!("{min_status}-{max_status} is not a range of HTTP status codes"),
                );
            }
        }
        if let Some(hsts) = &t.hsts {
            if hsts.max_age.subsec_nanos() != 0 {
                p.add(
                    "hsts.max_age",
                    format!(
                        "{} is not whole seconds (the header counts seconds)",
                        duration::format(hsts.max_age)
                    ),
                );
            }
            if hsts.preload && !hsts.include_subdomains {
                p.add(
                    "hsts.preload",
                    "needs include_subdomains (browsers' preload lists require it)",
                );
            } else if hsts.preload && hsts.max_age < HSTS_PRELOAD_MIN_AGE {
                p.add(
                    "hsts.preload",
                    format!(
                        "needs a max_age of at least {} (browsers' preload lists require it)",
                        duration::format(HSTS_PRELOAD_MIN_AGE)
                    ),
                );
            }
        }
        // The proxy's own check, in case it gains a rule this list lacks.
        if p.0.is_empty()
            && let Err(e) = t.validate()
        {
            p.add(e.field, e.reason);
        }
    }
}

/// Kernel filesystems the runtime mounts in every instance: nothing may be mounted inside them.
const KERNEL_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Files lull itself binds into every instance (the network's).
const RESERVED_FILES: [&str; 2] = ["/etc/hosts", "/etc/resolv.conf"];

/// An absolute path inside an instance, not `/`, without `..`, not in a kernel filesystem and
/// not one of the files lull binds itself.
fn check_mount_path(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{} must not contain '..'", path.display()));
    }
    if path.parent().is_none() {
        return Err("must not be / itself".to_string());
    }
    if let Some(dir) = KERNEL_DIRS.iter().find(|d| path.starts_with(d)) {
        return Err(format!(
            "{} is inside {dir}, which the runtime mounts itself",
            path.display()
        ));
    }
    if RESERVED_FILES.iter().any(|f| path == Path::new(f)) {
        return Err(format!(
            "{} is lull's own (the instance's network settings)",
            path.display()
        ));
    }
    Ok(())
}
