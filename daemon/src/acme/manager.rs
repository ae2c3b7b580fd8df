//! [`AcmeManager`]: keeps a valid certificate on every name that wants one.
//!
//! Each pass (every `[acme] check_interval`, and at once when woken after a change):
//! 1. asks which names each service answers on (its hostnames but `.localhost` ones and names
//!    an operator's certificate covers);
//! 2. checks DNS for names without a certificate: only names pointing at this host are
//!    ordered, so one unready name never fails the others;
//! 3. for each service, one order for all its ready names (SANs batched: one order per name
//!    set, rate-limit friendly) when no certificate held covers them, or the one that does
//!    has a third of its lifetime left; orders run one at a time;
//! 4. a failed order is retried after a jittered, doubling wait; the certificate served keeps
//!    being served until it expires (it is never dropped for a failed renewal);
//! 5. a certificate past the warning point raises `certificate.expiring` once; one whose
//!    names are all gone (a domain removed, a service deleted) is revoked and deleted.
//!
//! Events (per service): `certificate.issued`, `certificate.renewed`, `certificate.failed`
//! (with the CA's text), `certificate.expiring`, `certificate.revoked`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use lull_proxy::tls::Certificate;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;

use super::dns::DnsChecker;
use super::files::{AcmeDir, CertMeta, StoredCert};
use super::issuer::Issuer;
use super::policy;
use crate::certs::{Certificates, covers};
use crate::config::AcmeConfig;
use crate::store::NewEvent;
use crate::telemetry::MetricsSource;

/// The service name the base domain's wildcard certificate is kept under (no service has it:
/// names are DNS labels).
pub const WILDCARD_OWNER: &str = "*";

/// Which names each service answers on (`(service, names)`), as the control plane knows now.
pub type WantedSource =
    Arc<dyn Fn() -> BoxFuture<'static, Vec<(String, Vec<String>)>> + Send + Sync>;
/// Where events go (the state store, in the daemon).
pub type EventSink = Arc<dyn Fn(NewEvent) + Send + Sync>;

/// Where a name stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NameStatus {
    /// Waiting for DNS (or for ACME to be turned on).
    Pending,
    /// An order for it runs.
    Validating,
    /// A certificate for it is served.
    Active,
    /// The last order failed; it is retried later.
    Failed,
}

/// A name as `lull domain list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NameView {
    pub name: String,
    pub service: String,
    pub status: NameStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Expiry of the certificate served for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<DateTime<Utc>>,
    /// Next order attempt after a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

/// A certificate held (served unless expired).
#[derive(Clone)]
struct Held {
    stored: StoredCert,
    certificate: Certificate,
}

#[derive(Default)]
struct Failure {
    count: u32,
    retry_at: Option<DateTime<Utc>>,
    error: String,
}

#[derive(Default)]
struct State {
    held: Vec<Held>,
    /// Per name: the last DNS verdict (None: ok).
    dns: BTreeMap<String, Option<String>>,
    /// Names in the order running now.
    validating: BTreeSet<String>,
    /// Per service: the last failure of its order.
    failures: BTreeMap<String, Failure>,
    /// Certificates (by directory) whose expiry was announced.
    warned: BTreeSet<std::path::PathBuf>,
    /// The names wanted at the last pass, per service.
    wanted: Vec<(String, Vec<String>)>,
    /// Every service's names, those operators' certificates cover included.
    all_names: Vec<(String, Vec<String>)>,
    /// Operators' certificates (by file) whose expiry was announced.
    warned_operator: BTreeSet<std::path::PathBuf>,
}

/// See the module doc.
pub struct AcmeManager {
    config: AcmeConfig,
    dir: AcmeDir,
    issuer: Arc<dyn Issuer>,
    dns: Option<DnsChecker>,
    certificates: Arc<Certificates>,
    wanted: WantedSource,
    events: EventSink,
    state: Mutex<State>,
    wake: Notify,
    orders_ok: AtomicU64,
    orders_failed: AtomicU64,
    /// Set while this daemon hands over to another: no new order starts here.
    paused: std::sync::atomic::AtomicBool,
}

impl AcmeManager {
    /// A manager serving what `dir` holds already (valid certificates only).
    pub fn new(
        config: AcmeConfig,
        dir: AcmeDir,
        issuer: Arc<dyn Issuer>,
        dns: Option<DnsChecker>,
        certificates: Arc<Certificates>,
        wanted: WantedSource,
        events: EventSink,
    ) -> Arc<AcmeManager> {
        let manager = Arc::new(AcmeManager {
            config,
            dir,
            issuer,
            dns,
            certificates,
            wanted,
            events,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            orders_ok: AtomicU64::new(0),
            orders_failed: AtomicU64::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
        });
        manager.load_stored();
        manager
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn load_stored(&self) {
        let now = Utc::now();
        let mut held = Vec::new();
        for stored in self.dir.list_certs() {
            match Certificate::load(&stored.files, now) {
                Ok(certificate) => held.push(Held {
                    stored,
                    certificate,
                }),
                Err(e) => tracing::warn!(
                    dir = %stored.dir.display(),
                    "stored ACME certificate not served: {e}"
                ),
            }
        }
        self.state().held = held;
        self.publish();
    }

    /// Hands the held, unexpired certificates to the HTTPS listener.
    fn publish(&self) {
        let now = Utc::now();
        let served: Vec<Certificate> = self
            .state()
            .held
            .iter()
            .filter(|h| h.certificate.not_after > now)
            .map(|h| h.certificate.clone())
            .collect();
        self.certificates.set_acme(served);
    }

    /// Stops starting orders (a handover: the new daemon orders, and answers challenges on the
    /// listeners it now owns), or starts again (the handover failed).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.wake();
        }
    }

    /// Runs a pass now (after a domain or service change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs passes until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.pass().await;
            let _ = tokio::time::timeout(self.config.check_interval, self.wake.notified()).await;
        }
    }

    fn emit(&self, service: &str, kind: &str, message: String, fields: serde_json::Value) {
        tracing::info!(service, kind, "{message}");
        if service == WILDCARD_OWNER {
            // No service to file it under: the log has it, `lull domain list` the status.
            return;
        }
        (self.events)(NewEvent {
            service: service.to_owned(),
            kind: kind.to_owned(),
            message,
            fields,
        });
    }

    /// Asks again which names are wanted (for a listing), without ordering anything.
    pub async fn refresh_wanted(&self) -> Vec<(String, Vec<String>)> {
        let all = (self.wanted)().await;
        self.state().all_names = all.clone();
        let wanted: Vec<(String, Vec<String>)> = all
            .into_iter()
            .map(|(service, names)| {
                let names: Vec<String> = names
                    .into_iter()
                    .filter(|n| !self.certificates.operator_covers(n))
                    .collect();
                (service, names)
            })
            .filter(|(_, names)| !names.is_empty())
            .collect();
        self.state().wanted = wanted.clone();
        wanted
    }

    /// One pass (see the module doc).
    pub async fn pass(&self) {
        let wanted = self.refresh_wanted().await;
        self.announce_operator_expiry();
        if !self.config.enabled || self.paused.load(Ordering::SeqCst) {
            return;
        }
        for (service, names) in &wanted {
            let ready = self.ready_names(names).await;
            if ready.is_empty() {
                continue;
            }
            self.keep_certified(service, ready).await;
        }
        self.announce_expiry();
        self.forget_unwanted(&wanted).await;
        self.publish();
    }

    /// The names of `names` that may be ordered: those a held certificate covers, and those
    /// whose DNS points here.
    async fn ready_names(&self, names: &[String]) -> Vec<String> {
        let now = Utc::now();
        let mut ready = Vec::new();
        for name in names {
            let certified = self
                .state()
                .held
                .iter()
                .any(|h| h.certificate.not_after > now && covers(&h.certificate.names, name));
            // A wildcard is proved by DNS-01 and has no address to check.
            let verdict = match (&self.dns, certified || name.starts_with("*.")) {
                (_, true) | (None, _) => None,
                (Some(dns), false) => dns.check(name).await.reason,
            };
            let ok = verdict.is_none();
            self.state().dns.insert(name.clone(), verdict);
            if ok {
                ready.push(name.clone());
            }
        }
        ready.sort();
        ready
    }

    /// Orders a certificate for `names` unless one held covers them all and is not due.
    async fn keep_certified(&self, service: &str, names: Vec<String>) {
        let now = Utc::now();
        let current = self
            .state()
            .held
            .iter()
            .filter(|h| h.certificate.not_after > now)
            .filter(|h| names.iter().all(|n| covers(&h.certificate.names, n)))
            .max_by_key(|h| h.certificate.not_after)
            .cloned();
        let renewal = match &current {
            Some(h) => {
                if now < policy::renew_at(h.certificate.not_before, h.certificate.not_after) {
                    return;
                }
                true
            }
            None => false,
        };
        let waiting = self
            .state()
            .failures
            .get(service)
            .is_some_and(|f| f.retry_at.is_some_and(|at| now < at));
        if waiting {
            return;
        }
        self.state().validating.extend(names.iter().cloned());
        let started = std::time::Instant::now();
        let result = self.issuer.issue(&names).await;
        self.state().validating.clear();
        let outcome = result.and_then(|issued| {
            let meta = CertMeta {
                names: names.clone(),
                service: service.to_owned(),
                directory: self.config.directory.clone(),
                issued_at: Utc::now(),
            };
            let stored = self
                .dir
                .save_cert(&meta, &issued.chain_pem, &issued.key_pem)?;
            let certificate = Certificate::load(&stored.files, Utc::now())
                .map_err(|e| super::AcmeError::Other(format!("the issued certificate: {e}")))?;
            Ok(Held {
                stored,
                certificate,
            })
        });
        match outcome {
            Ok(held) => {
                self.orders_ok.fetch_add(1, Ordering::Relaxed);
                let not_after = held.certificate.not_after;
                let superseded: Vec<Held> = {
                    let mut state = self.state();
                    state.failures.remove(service);
                    let (old, keep): (Vec<Held>, Vec<Held>) =
                        std::mem::take(&mut state.held).into_iter().partition(|h| {
                            h.stored.meta.service == service
                                && h.stored.dir != held.stored.dir
                                && h.certificate.names.iter().all(|n| names.contains(n))
                        });
                    state.held = keep;
                    state.held.retain(|h| h.stored.dir != held.stored.dir);
                    state.held.push(held);
                    old
                };
                for old in superseded {
                    let _ = self.dir.remove(&old.stored);
                }
                self.publish();
                let (kind, verb) = if renewal {
                    ("certificate.renewed", "renewed")
                } else {
                    ("certificate.issued", "issued")
                };
                self.emit(
                    service,
                    kind,
                    format!(
                        "certificate for {} {verb} in {:.1}s, valid until {}",
                        names.join(", "),
                        started.elapsed().as_secs_f64(),
                        not_after.to_rfc3339()
                    ),
                    json!({ "names": names, "not_after": not_after.to_rfc3339() }),
                );
            }
            Err(e) => {
                self.orders_failed.fetch_add(1, Ordering::Relaxed);
                let error = e.to_string();
                let retry_at = {
                    let mut state = self.state();
                    let failure = state.failures.entry(service.to_owned()).or_default();
                    failure.count += 1;
                    let wait = policy::retry_after(
                        failure.count,
                        self.config.retry_initial,
                        self.config.retry_max,
                        policy::jitter(),
                    );
                    let at = Utc::now()
                        + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX);
                    failure.retry_at = Some(at);
                    failure.error = error.clone();
                    at
                };
                let keeping = match &current {
                    Some(h) => format!(
                        "; the current certificate keeps being served until {}",
                        h.certificate.not_after.to_rfc3339()
                    ),
                    None => String::new(),
                };
                self.emit(
                    service,
                    "certificate.failed",
                    format!(
                        "certificate for {} not {}: {error}; retry at {}{keeping}",
                        names.join(", "),
                        if renewal { "renewed" } else { "issued" },
                        retry_at.to_rfc3339()
                    ),
                    json!({ "names": names, "error": error, "retry_at": retry_at.to_rfc3339() }),
                );
            }
        }
    }

    /// `certificate.expiring`, once per certificate past its warning point.
    fn announce_expiry(&self) {
        let now = Utc::now();
        let due: Vec<Held> = {
            let mut state = self.state();
            let mut due = Vec::new();
            for h in &state.held {
                let at = policy::warn_at(h.certificate.not_before, h.certificate.not_after);
                if now >= at && !state.warned.contains(&h.stored.dir) {
                    due.push(h.clone());
                }
            }
            for h in &due {
                state.warned.insert(h.stored.dir.clone());
            }
            due
        };
        for h in due {
            let left = (h.certificate.not_after - now).num_seconds();
            let message = if left > 0 {
                format!(
                    "certificate for {} expires at {} ({}s left) and is not renewed yet",
                    h.certificate.names.join(", "),
                    h.certificate.not_after.to_rfc3339(),
                    left
                )
            } else {
                format!(
                    "certificate for {} expired at {}",
                    h.certificate.names.join(", "),
                    h.certificate.not_after.to_rfc3339()
                )
            };
            self.emit(
                &h.stored.meta.service,
                "certificate.expiring",
                message,
                json!({ "names": h.certificate.names, "not_after": h.certificate.not_after.to_rfc3339() }),
            );
        }
    }

    /// `certificate.expiring` for an operator's certificate (lull.toml or `lull cert add`) past
    /// its warning point, once, to every service it serves: nobody renews those but the
    /// operator.
    fn announce_operator_expiry(&self) {
        let now = Utc::now();
        for (source, _, c) in self.certificates.list() {
            if source == crate::certs::Source::Acme
                || now < policy::warn_at(c.not_before, c.not_after)
            {
                continue;
            }
            let services: Vec<String> = {
                let mut state = self.state();
                if !state.warned_operator.insert(c.source.clone()) {
                    continue;
                }
                state
                    .all_names
                    .iter()
                    .filter(|(_, names)| names.iter().any(|n| covers(&c.names, n)))
                    .map(|(service, _)| service.clone())
                    .collect()
            };
            let message = format!(
                "the {} certificate {} for {} expires at {}: replace it (it is not renewed by lull)",
                crate::control::domains::source_name(source),
                c.source.display(),
                c.names.join(", "),
                c.not_after.to_rfc3339()
            );
            tracing::warn!("{message}");
            for service in services {
                self.emit(
                    &service,
                    "certificate.expiring",
                    message.clone(),
                    json!({ "names": c.names, "not_after": c.not_after.to_rfc3339(), "file": c.source }),
                );
            }
        }
    }

    /// Revokes and deletes certificates none of whose names is wanted any more.
    async fn forget_unwanted(&self, wanted: &[(String, Vec<String>)]) {
        let all: BTreeSet<&String> = wanted.iter().flat_map(|(_, n)| n).collect();
        let gone: Vec<Held> = {
            let mut state = self.state();
            let (gone, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut state.held)
                .into_iter()
                .partition(|h| !h.certificate.names.iter().any(|n| all.contains(n)));
            state.held = keep;
            gone
        };
        if gone.is_empty() {
            return;
        }
        self.publish();
        for h in gone {
            let leaf = h.certificate.key.cert.first().map(|c| c.to_vec());
            let revoked = match (&leaf, h.certificate.not_after > Utc::now()) {
                (Some(der), true) => self.issuer.revoke(der).await.map(|()| true),
                _ => Ok(false),
            };
            let _ = self.dir.remove(&h.stored);
            let names = h.certificate.names.join(", ");
            match revoked {
                Ok(true) => self.emit(
                    &h.stored.meta.service,
                    "certificate.revoked",
                    format!("certificate for {names} revoked and deleted: no service answers on those names"),
                    json!({ "names": h.certificate.names }),
                ),
                Ok(false) => {}
                Err(e) => self.emit(
                    &h.stored.meta.service,
                    "certificate.revoked",
                    format!("certificate for {names} deleted, but the CA did not revoke it: {e}"),
                    json!({ "names": h.certificate.names, "error": e.to_string() }),
                ),
            }
        }
    }

    /// Every wanted name with its status, as of the last pass.
    pub fn views(&self) -> Vec<NameView> {
        let now = Utc::now();
        let state = self.state();
        let mut out = Vec::new();
        for (service, names) in &state.wanted {
            for name in names {
                let cert = state
                    .held
                    .iter()
                    .filter(|h| h.certificate.not_after > now && covers(&h.certificate.names, name))
                    .max_by_key(|h| h.certificate.not_after);
                let failure = state
                    .failures
                    .get(service)
                    .filter(|_| cert.is_none() || state.validating.is_empty());
                let dns = state.dns.get(name).cloned().flatten();
                let (status, reason) = if state.validating.contains(name) {
                    (NameStatus::Validating, None)
                } else if let Some(h) = cert {
                    let renewal = failure.map(|f| format!("renewal failed: {}", f.error));
                    let _ = h;
                    (NameStatus::Active, renewal)
                } else if !self.config.enabled {
                    (
                        NameStatus::Pending,
                        Some("ACME is off ([acme] enabled = false in lull.toml): add a certificate with `lull cert add`, or turn ACME on".to_owned()),
                    )
                } else if let Some(reason) = dns {
                    (NameStatus::Pending, Some(reason))
                } else if let Some(f) = failure {
                    (NameStatus::Failed, Some(f.error.clone()))
                } else {
                    (
                        NameStatus::Pending,
                        Some("waiting for the next pass".to_owned()),
                    )
                };
                out.push(NameView {
                    name: name.clone(),
                    service: service.clone(),
                    status,
                    reason,
                    not_after: cert.map(|h| h.certificate.not_after),
                    retry_at: failure.and_then(|f| f.retry_at),
                });
            }
        }
        out
    }

    /// The DNS checker, for `lull domain add`'s immediate check.
    pub fn dns(&self) -> Option<&DnsChecker> {
        self.dns.as_ref()
    }

    pub fn config(&self) -> &AcmeConfig {
        &self.config
    }
}

impl MetricsSource for AcmeManager {
    fn encode(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP lull_certificate_expiry_timestamp_seconds When each certificate held for a name expires, Unix time (source: config, api, acme)."
        );
        let _ = writeln!(
            out,
            "# TYPE lull_certificate_expiry_timestamp_seconds gauge"
        );
        let now = Utc::now();
        let mut expiring = 0usize;
        for (source, _, c) in self.certificates.list() {
            let source = crate::control::domains::source_name(source);
            if now >= policy::warn_at(c.not_before, c.not_after) {
                expiring += 1;
            }
            for name in &c.names {
                let _ = writeln!(
                    out,
                    "lull_certificate_expiry_timestamp_seconds{{name=\"{name}\",source=\"{source}\"}} {}",
                    c.not_after.timestamp()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP lull_certificates_expiring Certificates held past their warning point (a sixth of their lifetime left)."
        );
        let _ = writeln!(out, "# TYPE lull_certificates_expiring gauge");
        let _ = writeln!(out, "lull_certificates_expiring {expiring}");
        let _ = writeln!(out, "# HELP lull_acme_orders ACME orders by result.");
        let _ = writeln!(out, "# TYPE lull_acme_orders counter");
        let _ = writeln!(
            out,
            "lull_acme_orders_total{{result=\"issued\"}} {}",
            self.orders_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "lull_acme_orders_total{{result=\"failed\"}} {}",
            self.orders_failed.load(Ordering::Relaxed)
        );
        out
    }
}
