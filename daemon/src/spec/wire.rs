//! The JSON form of a spec (what the admin API takes and the store keeps) and partial updates.
//! One type, [`ServiceUpdate`], with every field optional, serves both: a new spec is the
//! defaults with an update applied (name and source required), and a spec serializes as the
//! update that sets every field. Unknown fields are refused; type errors name their path.

use std::path::PathBuf;
use std::time::Duration;

use lull_proxy::config::{CpuMode, HealthProbe, Hsts};
use lull_runtime::reference::Reference;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{EnvVar, SecretRef, SecretTarget, ServiceSpec, Source, SpecErrors, Volume};
use crate::duration;

/// A change to a spec; absent fields keep their value. Lists replace the whole list; nested
/// objects (`size`, `queue`, `timeouts`, `health_check`) change only the fields they name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<WireSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostnames: Option<Vec<String>>,
    /// An empty list removes the override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// An empty list removes the override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<WireEnv>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<WireSecret>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<SizeUpdate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_instances: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingUpdate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<WireVolume>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueUpdate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsUpdate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckUpdate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_mode: Option<WireCpuMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_delay: Option<WireDuration>,
    /// Idle tier 2: frozen this long after being throttled; `"0"` switches it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_after: Option<WireDuration>,
    /// Plain HTTP to a hostname the daemon holds a certificate for is redirected to HTTPS
    /// (`<name>.localhost` never is); default true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_redirect: Option<bool>,
    /// `Strict-Transport-Security` on HTTPS responses; off by default (see [`HstsUpdate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts: Option<HstsUpdate>,
}

/// HSTS settings. Turning it on needs `max_age`; `{"enabled": false}` turns it off (the
/// other fields are then refused). A browser that saw the header refuses plain HTTP to the
/// host for `max_age`: see `lull_proxy::config::Hsts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HstsUpdate {
    /// Absent: on when it was on or when `max_age` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Whole seconds, e.g. `"365d"`; `"0"` tells browsers to forget an earlier rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_subdomains: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preload: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WireSource {
    Image { reference: Reference },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireEnv {
    pub name: String,
    pub value: String,
}

/// `{"env": NAME, "secret": S}` or `{"file": PATH, "secret": S}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireSecret {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireVolume {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub shared: bool,
    /// Mounted read-only (absent: read-write).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SizeUpdate {
    /// vCPUs: 0.1, 0.25, 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// `"64M"`, `"1G"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<WireSize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingUpdate {
    /// 0.7: an instance is sized for 70 % of max concurrency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_utilisation: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_in_window: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<WireDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<WireDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_byte: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub websocket_idle: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_idle: Option<WireDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckUpdate {
    /// `tcp` or `http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<WireProtocol>,
    /// For `http`: the path probed (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For `http`: the healthy statuses, `"200-399"` (the default) or `"200"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<WireDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireProtocol {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireCpuMode {
    Request,
    Always,
}

/// A duration written as text (`"30s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireDuration(pub Duration);

impl Serialize for WireDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        duration::serde_text::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for WireDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration::serde_text::deserialize(d).map(WireDuration)
    }
}

/// A byte size written as text (`"64M"`) or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireSize(pub u64);

impl Serialize for WireSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&lull_runtime::size::exact(self.0))
    }
}

impl<'de> Deserialize<'de> for WireSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Bytes(u64),
            Text(String),
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a size such as \"64M\" or a number of bytes")
        })? {
            Either::Bytes(b) => Ok(WireSize(b)),
            Either::Text(t) => lull_runtime::size::parse(&t)
                .map(WireSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl ServiceUpdate {
    /// Reads JSON strictly: unknown fields and type errors are reported with their path.
    pub fn from_json(text: &str) -> Result<ServiceUpdate, SpecErrors> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(&mut de).map_err(path_error)
    }

    /// Reads an already parsed JSON value strictly.
    pub fn from_value(value: serde_json::Value) -> Result<ServiceUpdate, SpecErrors> {
        serde_path_to_error::deserialize(value).map_err(path_error)
    }

    /// Applies the update onto `spec` (without validating: see [`ServiceSpec::updated`]).
    pub fn apply(&self, spec: &mut ServiceSpec) -> Result<(), SpecErrors> {
        if let Some(name) = &self.name
            && name != &spec.name
        {
            return Err(SpecErrors::one(
                "name",
                format!("a service cannot be renamed ({} to {name})", spec.name),
            ));
        }
        if let Some(WireSource::Image { reference }) = &self.source {
            spec.source = Source::Image {
                reference: reference.clone(),
            };
        }
        if let Some(hosts) = &self.hostnames {
            spec.hostnames = hosts.clone();
        }
        if let Some(command) = &self.command {
            spec.command = (!command.is_empty()).then(|| command.clone());
        }
        if let Some(args) = &self.args {
            spec.args = (!args.is_empty()).then(|| args.clone());
        }
        set(&mut spec.port, self.port);
        if let Some(env) = &self.env {
            spec.env = env
                .iter()
                .map(|e| EnvVar {
                    name: e.name.clone(),
                    value: e.value.clone(),
                })
                .collect();
        }
        if let Some(secrets) = &self.secrets {
            let mut out = Vec::new();
            let mut problems = Vec::new();
            for (i, s) in secrets.iter().enumerate() {
                let target = match (&s.env, &s.file) {
                    (Some(env), None) => SecretTarget::Env(env.clone()),
                    (None, Some(file)) => SecretTarget::File(file.clone()),
                    _ => {
                        problems.push(super::SpecError {
                            path: format!("secrets[{i}]"),
                            message: "give exactly one of env and file".to_string(),
                        });
                        continue;
                    }
                };
                out.push(SecretRef {
                    target,
                    secret: s.secret.clone(),
                });
            }
            if !problems.is_empty() {
                return Err(SpecErrors(problems));
            }
            spec.secrets = out;
        }
        if let Some(size) = &self.size {
            set(&mut spec.size.cpu, size.cpu);
            set(&mut spec.size.memory_bytes, size.memory.map(|m| m.0));
        }
        set(&mut spec.min_instances, self.min_instances);
        set(&mut spec.max_instances, self.max_instances);
        if let Some(u) = &self.scaling {
            let sc = &mut spec.scaling;
            set(&mut sc.target_utilisation, u.target_utilisation);
            set(&mut sc.scale_in_window, u.scale_in_window.map(|d| d.0));
            set(
                &mut sc.scale_to_zero_after,
                u.scale_to_zero_after.map(|d| d.0),
            );
        }
        if let Some(volumes) = &self.volumes {
            spec.volumes = volumes
                .iter()
                .map(|v| Volume {
                    name: v.name.clone(),
                    path: v.path.clone(),
                    shared: v.shared,
                    read_only: v.read_only,
                })
                .collect();
        }
        set(&mut spec.pids_limit, self.pids_limit);
        let t = &mut spec.traffic;
        set(&mut t.max_concurrency, self.max_concurrency);
        if let Some(q) = &self.queue {
            set(&mut t.queue_size, q.size);
            set(&mut t.queue_timeout, q.timeout.map(|d| d.0));
        }
        if let Some(u) = &self.timeouts {
            let d = |v: Option<WireDuration>| v.map(|d| d.0);
            set(&mut t.timeouts.connect, d(u.connect));
            set(&mut t.timeouts.first_byte, d(u.first_byte));
            set(&mut t.timeouts.request, d(u.request));
            set(&mut t.timeouts.websocket_idle, d(u.websocket_idle));
            set(&mut t.timeouts.upstream_idle, d(u.upstream_idle));
        }
        if let Some(h) = &self.health_check {
            apply_health(h, &mut t.health)?;
        }
        if let Some(mode) = self.cpu_mode {
            t.cpu = match mode {
                WireCpuMode::Request => CpuMode::Request,
                WireCpuMode::Always => CpuMode::Always,
            };
        }
        set(&mut t.idle_delay, self.idle_delay.map(|d| d.0));
        if let Some(d) = self.freeze_after {
            t.freeze_after = (!d.0.is_zero()).then_some(d.0);
        }
        set(&mut t.https_redirect, self.https_redirect);
        if let Some(h) = &self.hsts {
            t.hsts = apply_hsts(h, t.hsts.take())?;
        }
        Ok(())
    }

    /// The update that sets every field to `spec`'s value.
    pub fn full(spec: &ServiceSpec) -> ServiceUpdate {
        let t = &spec.traffic;
        let h = &t.health;
        let (protocol, path, status) = match &h.probe {
            HealthProbe::Tcp => (WireProtocol::Tcp, None, None),
            HealthProbe::Http {
                path,
                min_status,
                max_status,
            } => (
                WireProtocol::Http,
                Some(path.clone()),
                Some(if min_status == max_status {
                    min_status.to_string()
                } else {
                    format!("{min_status}-{max_status}")
                }),
            ),
        };
        let d = |v: Duration| Some(WireDuration(v));
        ServiceUpdate {
            name: Some(spec.name.clone()),
            source: Some(match &spec.source {
                Source::Image { reference } => WireSource::Image {
                    reference: reference.clone(),
                },
            }),
            hostnames: Some(spec.hostnames.clone()),
            command: Some(spec.command.clone().unwrap_or_default()),
            args: Some(spec.args.clone().unwrap_or_default()),
            port: Some(spec.port),
            env: Some(
                spec.env
                    .iter()
                    .map(|e| WireEnv {
                        name: e.name.clone(),
                        value: e.value.clone(),
                    })
                    .collect(),
            ),
            secrets: Some(
                spec.secrets
                    .iter()
                    .map(|s| match &s.target {
                        SecretTarget::Env(env) => WireSecret {
                            env: Some(env.clone()),
                            file: None,
                            secret: s.secret.clone(),
                        },
                        SecretTarget::File(file) => WireSecret {
                            env: None,
                            file: Some(file.clone()),
                            secret: s.secret.clone(),
                        },
                    })
                    .collect(),
            ),
            size: Some(SizeUpdate {
                cpu: Some(spec.size.cpu),
                memory: Some(WireSize(spec.size.memory_bytes)),
            }),
            min_instances: Some(spec.min_instances),
            max_instances: Some(spec.max_instances),
            scaling: Some(ScalingUpdate {
                target_utilisation: Some(spec.scaling.target_utilisation),
                scale_in_window: d(spec.scaling.scale_in_window),
                scale_to_zero_after: d(spec.scaling.scale_to_zero_after),
            }),
            volumes: Some(
                spec.volumes
                    .iter()
                    .map(|v| WireVolume {
                        name: v.name.clone(),
                        path: v.path.clone(),
                        shared: v.shared,
                        read_only: v.read_only,
                    })
                    .collect(),
            ),
            pids_limit: Some(spec.pids_limit),
            max_concurrency: Some(t.max_concurrency),
            queue: Some(QueueUpdate {
                size: Some(t.queue_size),
                timeout: d(t.queue_timeout),
            }),
            timeouts: Some(TimeoutsUpdate {
                connect: d(t.timeouts.connect),
                first_byte: d(t.timeouts.first_byte),
                request: d(t.timeouts.request),
                websocket_idle: d(t.timeouts.websocket_idle),
                upstream_idle: d(t.timeouts.upstream_idle),
            }),
            health_check: Some(HealthCheckUpdate {
                protocol: Some(protocol),
                path,
                status,
                interval: d(h.interval),
                timeout: d(h.timeout),
                healthy_threshold: Some(h.healthy_threshold),
                unhealthy_threshold: Some(h.unhealthy_threshold),
            }),
            cpu_mode: Some(match t.cpu {
                CpuMode::Request => WireCpuMode::Request,
                CpuMode::Always => WireCpuMode::Always,
            }),
            idle_delay: d(t.idle_delay),
            freeze_after: d(t.freeze_after.unwrap_or_default()),
            https_redirect: Some(t.https_redirect),
            hsts: Some(match &t.hsts {
                None => HstsUpdate {
                    enabled: Some(false),
                    ..HstsUpdate::default()
                },
                Some(h) => HstsUpdate {
                    enabled: Some(true),
                    max_age: d(h.max_age),
                    include_subdomains: Some(h.include_subdomains),
                    preload: Some(h.preload),
                },
            }),
        }
    }
}

/// The HSTS setting after `u` (see [`HstsUpdate`]) changed `current`.
fn apply_hsts(u: &HstsUpdate, current: Option<Hsts>) -> Result<Option<Hsts>, SpecErrors> {
    let enabled = u
        .enabled
        .unwrap_or(current.is_some() || u.max_age.is_some());
    if !enabled {
        if u.max_age.is_some() || u.include_subdomains.is_some() || u.preload.is_some() {
            return Err(SpecErrors::one(
                "hsts.enabled",
                "HSTS is off: max_age, include_subdomains and preload apply only with enabled true",
            ));
        }
        return Ok(None);
    }
    let mut hsts = match (current, u.max_age) {
        (Some(h), _) => h,
        (None, Some(max_age)) => Hsts {
            max_age: max_age.0,
            include_subdomains: false,
            preload: false,
        },
        (None, None) => {
            return Err(SpecErrors::one(
                "hsts.max_age",
                "missing (turning HSTS on needs it, e.g. \"365d\"; browsers then refuse plain HTTP to the service's hostnames for that long)",
            ));
        }
    };
    set(&mut hsts.max_age, u.max_age.map(|d| d.0));
    set(&mut hsts.include_subdomains, u.include_subdomains);
    set(&mut hsts.preload, u.preload);
    Ok(Some(hsts))
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

fn apply_health(
    u: &HealthCheckUpdate,
    h: &mut lull_proxy::config::HealthCheck,
) -> Result<(), SpecErrors> {
    set(&mut h.interval, u.interval.map(|d| d.0));
    set(&mut h.timeout, u.timeout.map(|d| d.0));
    set(&mut h.healthy_threshold, u.healthy_threshold);
    set(&mut h.unhealthy_threshold, u.unhealthy_threshold);
    let (cur_path, cur_min, cur_max) = match &h.probe {
        HealthProbe::Http {
            path,
            min_status,
            max_status,
        } => (path.clone(), *min_status, *max_status),
        HealthProbe::Tcp => ("/".to_string(), 200, 399),
    };
    let protocol = u.protocol.unwrap_or(match h.probe {
        HealthProbe::Tcp => WireProtocol::Tcp,
        HealthProbe::Http { .. } => WireProtocol::Http,
    });
    match protocol {
        WireProtocol::Tcp => {
            if u.path.is_some() || u.status.is_some() {
                return Err(SpecErrors::one(
                    "health_check.protocol",
                    "path and status apply to http health checks only (set protocol to http)",
                ));
            }
            h.probe = HealthProbe::Tcp;
        }
        WireProtocol::Http => {
            let (min_status, max_status) = match &u.status {
                Some(text) => parse_status(text).ok_or_else(|| {
                    SpecErrors::one(
                        "health_check.status",
                        format!("{text:?} is not a status or a range such as \"200-399\""),
                    )
                })?,
                None => (cur_min, cur_max),
            };
            h.probe = HealthProbe::Http {
                path: u.path.clone().unwrap_or(cur_path),
                min_status,
                max_status,
            };
        }
    }
    Ok(())
}

fn parse_status(text: &str) -> Option<(u16, u16)> {
    match text.split_once('-') {
        Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        None => {
            let s = text.trim().parse().ok()?;
            Some((s, s))
        }
    }
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> SpecErrors {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    SpecErrors::one(&path, e.inner().to_string())
}

impl ServiceSpec {
    /// A new spec from its JSON form: the defaults, then every field given; validated.
    pub fn from_json(text: &str) -> Result<ServiceSpec, SpecErrors> {
        ServiceSpec::from_update(&ServiceUpdate::from_json(text)?)
    }

    /// A new spec from an update naming at least `name` and `source`; validated.
    pub fn from_update(update: &ServiceUpdate) -> Result<ServiceSpec, SpecErrors> {
        let mut missing = Vec::new();
        if update.name.is_none() {
            missing.push(super::SpecError {
                path: "name".into(),
                message: "missing (expected the service's name)".into(),
            });
        }
        if update.source.is_none() {
            missing.push(super::SpecError {
                path: "source".into(),
                message: "missing (expected {\"type\": \"image\", \"reference\": ...})".into(),
            });
        }
        let (Some(name), Some(WireSource::Image { reference })) = (&update.name, &update.source)
        else {
            return Err(SpecErrors(missing));
        };
        let mut spec = ServiceSpec::new(
            name,
            Source::Image {
                reference: reference.clone(),
            },
        );
        update.apply(&mut spec)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Like [`ServiceSpec::from_update`] without the validation, for callers that change the
    /// spec further first.
    pub(crate) fn from_update_unchecked(update: &ServiceUpdate) -> Result<ServiceSpec, SpecErrors> {
        let (Some(name), Some(WireSource::Image { reference })) = (&update.name, &update.source)
        else {
            return ServiceSpec::from_update(update);
        };
        let mut spec = ServiceSpec::new(
            name,
            Source::Image {
                reference: reference.clone(),
            },
        );
        update.apply(&mut spec)?;
        Ok(spec)
    }

    /// This spec with `update` applied, validated.
    pub fn updated(&self, update: &ServiceUpdate) -> Result<ServiceSpec, SpecErrors> {
        let mut spec = self.clone();
        update.apply(&mut spec)?;
        spec.validate()?;
        Ok(spec)
    }

    /// The full JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(ServiceUpdate::full(self)).unwrap_or(serde_json::Value::Null)
    }
}

impl Serialize for ServiceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ServiceUpdate::full(self).serialize(s)
    }
}

/// Reads the JSON form and validates it.
impl<'de> Deserialize<'de> for ServiceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let update = ServiceUpdate::deserialize(d)?;
        ServiceSpec::from_update(&update).map_err(serde::de::Error::custom)
    }
}
