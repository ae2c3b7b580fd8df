//! [`AcmeManager`]: keeps a valid certificate on every name that wants one.
//!
//! Each pass (every `[acme] check_interval`, and at once when woken after a change):
//! 1. asks which names each service answers on (its hostnames but `.localhost` ones; names an
//!    operator's valid certificate covers are not ordered). If that cannot be read, the pass
//!    orders and forgets nothing;
//! 2. checks DNS for names without a certificate: only names whose every address is this host
//!    are ordered, so one unready name never fails the others;
//! 3. for each service, one order for all its ready names (SANs batched: one order per name
//!    set, rate-limit friendly) when no certificate held covers them, or the one that does has
//!    a third of its lifetime left, comes from another CA directory, or names a name no service
//!    wants any more; orders run one at a time, each bounded in time;
//! 4. a name the CA refused is left out of the next orders for a jittered, doubling wait; an
//!    order failing as a whole (CA down) waits likewise before that service's next one (a
//!    changed name set retries at once); a rate limit waits an hour at least, and a wait the
//!    CA asked for (`Retry-After`) is waited in full, up to a week; the certificate served
//!    keeps being served until it expires (it is never dropped for a failed renewal);
//! 5. a certificate past the warning point raises `certificate.expiring` once per certificate;
//!    an expired one is dropped; one superseded by a new order is deleted (revoked when it
//!    names what no service wants); one none of whose names any service wants, two passes in a
//!    row, is revoked and deleted.
//!
//! Events (per service): `certificate.issued`, `certificate.renewed`, `certificate.failed`
//! (with the CA's text), `certificate.expiring`, `certificate.revoked`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use lull_proxy::tls::Certificate;
use serde::Serialize;
use serde_json::json;
use tokio::sync::Notify;

use super::AcmeError;
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

/// The longest one order may take, from the account to the chain; a CA that stops answering
/// mid-order fails it instead of stalling every renewal behind it.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest a revocation may take.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(60);
/// The least wait after the CA said "rate limited".
const RATE_LIMITED_WAIT: Duration = Duration::from_secs(3600);
/// The longest wait the CA's `Retry-After` is believed for (a CA's mistake, or a hostile
/// one, must not stop renewals for good).
const CA_WAIT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Which names each service answers on (`(service, names)`), as the control plane knows now;
/// an error when that cannot be known (the store failed).
pub type WantedSource =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Vec<(String, Vec<String>)>, String>> + Send + Sync>;
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

impl Held {
    /// What identifies this certificate (not its directory alone: a warning is per
    /// certificate).
    fn key(&self) -> (PathBuf, i64) {
        (
            self.stored.dir.clone(),
            self.certificate.not_after.timestamp(),
        )
    }
}

#[derive(Default, Clone)]
struct Failure {
    count: u32,
    retry_at: Option<DateTime<Utc>>,
    error: String,
    /// The names of the order that failed (a service's failure holds only for that set).
    names: Vec<String>,
}

#[derive(Default)]
struct State {
    held: Vec<Held>,
    /// Per name: the last DNS verdict (None: ok).
    dns: BTreeMap<String, Option<String>>,
    /// Names in the order running now.
    validating: BTreeSet<String>,
    /// Per service: the last failure of its order as a whole.
    failures: BTreeMap<String, Failure>,
    /// Per name: the CA refused it (left out of orders until `retry_at`).
    name_failures: BTreeMap<String, Failure>,
    /// Certificates (directory, expiry) whose expiry was announced.
    warned: BTreeSet<(PathBuf, i64)>,
    /// The names wanted at the last pass, per service.
    wanted: Vec<(String, Vec<String>)>,
    /// Every service's names, those operators' certificates cover included.
    all_names: Vec<(String, Vec<String>)>,
    /// Operators' certificates (file, expiry) whose expiry was announced.
    warned_operator: BTreeSet<(PathBuf, i64)>,
    /// Certificates found unwanted at the last pass: forgotten if still so at the next.
    unwanted: BTreeSet<PathBuf>,
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
    paused: AtomicBool,
    /// Held for the length of an order (so a handover can wait for the one running).
    order_lock: tokio::sync::Mutex<()>,
}

fn wait_until(wait: Duration) -> DateTime<Utc> {
    Utc::now() + chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX)
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
            paused: AtomicBool::new(false),
            order_lock: tokio::sync::Mutex::new(()),
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

    /// Stops starting orders and waits for the one running to end: a handover, after which
    /// the new daemon orders and answers challenges on the listeners it now owns.
    pub async fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let _running = self.order_lock.lock().await;
    }

    /// Starts ordering again (the handover failed).
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.wake();
    }

    fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Runs a pass now (after a domain or service change).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs passes until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        use futures_util::FutureExt;
        loop {
            // A panic in a pass (a bug, a library's) ends that pass, not certificate upkeep.
            if std::panic::AssertUnwindSafe(self.pass())
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("ACME pass panicked; the next one starts on schedule");
                self.state().validating.clear();
            }
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

    /// Asks again which names are wanted, without ordering anything; `Err` when the control
    /// plane cannot say (nothing is changed then).
    pub async fn refresh_wanted(&self) -> Result<Vec<(String, Vec<String>)>, String> {
        let all = (self.wanted)().await?;
        let wanted: Vec<(String, Vec<String>)> = all
            .iter()
            .map(|(service, names)| {
                let names: Vec<String> = names
                    .iter()
                    .filter(|n| !self.certificates.operator_covers(n))
                    .cloned()
                    .collect();
                (service.clone(), names)
            })
            .filter(|(_, names)| !names.is_empty())
            .collect();
        let mut state = self.state();
        // Forget what concerns names and services gone (a re-created one starts afresh).
        let names: BTreeSet<&String> = all.iter().flat_map(|(_, n)| n).collect();
        let services: BTreeSet<&String> = all.iter().map(|(s, _)| s).collect();
        state.dns.retain(|n, _| names.contains(n));
        state.name_failures.retain(|n, _| names.contains(n));
        state.failures.retain(|s, _| services.contains(s));
        state.all_names = all.clone();
        state.wanted = wanted.clone();
        Ok(wanted)
    }

    /// One pass (see the module doc).
    pub async fn pass(&self) {
        let wanted = match self.refresh_wanted().await {
            Ok(wanted) => Some(wanted),
            Err(e) => {
                tracing::warn!(
                    "ACME pass: which names are wanted is unknown ({e}): nothing is ordered or forgotten"
                );
                None
            }
        };
        self.announce_operator_expiry();
        let active = self.config.enabled && !self.paused();
        if let (true, Some(wanted)) = (active, &wanted) {
            for (service, names) in wanted {
                if self.paused() {
                    break;
                }
                let ready = self.ready_names(names).await;
                if !ready.is_empty() {
                    self.keep_certified(service, ready).await;
                }
            }
        }
        self.drop_expired().await;
        self.announce_expiry();
        if active && wanted.is_some() {
            self.forget_unwanted().await;
        }
        self.publish();
    }

    /// The names of `names` that may be ordered: those a held certificate covers, and those
    /// whose DNS points here, less those the CA refused lately.
    async fn ready_names(&self, names: &[String]) -> Vec<String> {
        let now = Utc::now();
        let mut ready = Vec::new();
        for name in names {
            let refused = self
                .state()
                .name_failures
                .get(name)
                .is_some_and(|f| f.retry_at.is_some_and(|at| now < at));
            if refused {
                continue;
            }
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

    /// Every name any service answers on (operators' certificates' names included).
    fn all_wanted(&self) -> BTreeSet<String> {
        self.state()
            .all_names
            .iter()
            .flat_map(|(_, n)| n.iter().cloned())
            .collect()
    }

    /// Orders a certificate for `names` unless one held covers them all and is not due.
    async fn keep_certified(&self, service: &str, names: Vec<String>) {
        let now = Utc::now();
        let all_wanted = self.all_wanted();
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
                let due =
                    now >= policy::renew_at(h.certificate.not_before, h.certificate.not_after);
                let other_ca = h.stored.meta.directory != self.config.directory;
                let stale = h.certificate.names.iter().any(|n| !all_wanted.contains(n));
                if !(due || other_ca || stale) {
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
            .is_some_and(|f| f.names == names && f.retry_at.is_some_and(|at| now < at));
        if waiting {
            return;
        }
        let _order = self.order_lock.lock().await;
        if self.paused() {
            return;
        }
        self.state().validating.extend(names.iter().cloned());
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(ORDER_TIMEOUT, self.issuer.issue(&names)).await {
            Ok(result) => result,
            Err(_) => Err(AcmeError::Other(format!(
                "the CA did not finish the order within {}s",
                ORDER_TIMEOUT.as_secs()
            ))),
        };
        self.state().validating.clear();
        let outcome = match result {
            Ok(issued) => {
                let meta = CertMeta {
                    names: names.clone(),
                    service: service.to_owned(),
                    directory: self.config.directory.clone(),
                    issued_at: Utc::now(),
                };
                let dir = self.dir.clone();
                tokio::task::spawn_blocking(move || {
                    let stored = dir.save_cert(&meta, &issued.chain_pem, &issued.key_pem)?;
                    let certificate = Certificate::load(&stored.files, Utc::now())
                        .map_err(|e| AcmeError::Other(format!("the issued certificate: {e}")))?;
                    Ok(Held {
                        stored,
                        certificate,
                    })
                })
                .await
                .unwrap_or_else(|e| Err(AcmeError::Other(format!("storing the certificate: {e}"))))
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(held) => {
                self.issued(service, &names, held, renewal, started.elapsed())
                    .await
            }
            Err(e) => self.failed(service, &names, e, current.as_ref(), renewal),
        }
    }

    async fn issued(
        &self,
        service: &str,
        names: &[String],
        held: Held,
        renewal: bool,
        took: Duration,
    ) {
        self.orders_ok.fetch_add(1, Ordering::Relaxed);
        let not_after = held.certificate.not_after;
        let all_wanted = self.all_wanted();
        // Certificates this one replaces: each of whose still-wanted names it covers.
        let superseded: Vec<Held> = {
            let mut state = self.state();
            state.failures.remove(service);
            for name in names {
                state.name_failures.remove(name);
            }
            let new_names = held.certificate.names.clone();
            let (old, keep): (Vec<Held>, Vec<Held>) =
                std::mem::take(&mut state.held).into_iter().partition(|h| {
                    h.stored.dir != held.stored.dir
                        && h.certificate
                            .names
                            .iter()
                            .filter(|n| all_wanted.contains(*n))
                            .all(|n| covers(&new_names, n))
                        && (h.stored.meta.service == service
                            || h.certificate.names.iter().any(|n| names.contains(n)))
                });
            state.held = keep;
            state.held.push(held);
            old
        };
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
                took.as_secs_f64(),
                not_after.to_rfc3339()
            ),
            json!({ "names": names, "not_after": not_after.to_rfc3339() }),
        );
        for old in superseded {
            let gone: Vec<&String> = old
                .certificate
                .names
                .iter()
                .filter(|n| !all_wanted.contains(*n))
                .collect();
            if gone.is_empty() {
                self.delete(&old).await;
            } else {
                self.revoke(
                    &old,
                    "replaced by a certificate without names no service answers on",
                )
                .await;
            }
        }
    }

    fn failed(
        &self,
        service: &str,
        names: &[String],
        e: AcmeError,
        current: Option<&Held>,
        renewal: bool,
    ) {
        self.orders_failed.fetch_add(1, Ordering::Relaxed);
        let error = e.to_string();
        let rate_limited = error.contains(super::client::RATE_LIMITED);
        // The wait the CA asked for, counted from now (believed up to a week).
        let ca_wait = e.ca_wait().map(|wait| wait.min(CA_WAIT_MAX));
        let backoff = |failure: &mut Failure| {
            failure.count += 1;
            let mut wait = policy::retry_after(
                failure.count,
                self.config.retry_initial,
                self.config.retry_max,
                policy::jitter(),
            );
            if rate_limited {
                wait = wait.max(RATE_LIMITED_WAIT);
            }
            if let Some(asked) = ca_wait {
                wait = wait.max(asked);
            }
            let at = wait_until(wait);
            failure.retry_at = Some(at);
            failure.error = error.clone();
            at
        };
        // Names the CA refused are left out of the next orders; the others retry at once.
        let refused: Vec<(String, String)> = match e.cause() {
            AcmeError::Order { failed, .. } => failed
                .iter()
                .filter(|(n, _)| names.contains(n))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let retry_at = {
            let mut state = self.state();
            if refused.is_empty() {
                let failure = state.failures.entry(service.to_owned()).or_default();
                if failure.names != names {
                    *failure = Failure::default();
                }
                failure.names = names.to_vec();
                backoff(failure)
            } else {
                let mut last = Utc::now();
                for (name, problem) in &refused {
                    let failure = state.name_failures.entry(name.clone()).or_default();
                    failure.names = vec![name.clone()];
                    last = backoff(failure);
                    failure.error = problem.clone();
                }
                last
            }
        };
        let asked = match (e.ca_wait(), ca_wait) {
            (Some(asked), Some(believed)) if !asked.is_zero() => format!(
                " (the CA asked to wait until {}{})",
                chrono::TimeDelta::from_std(asked)
                    .ok()
                    .and_then(|wait| Utc::now().checked_add_signed(wait))
                    .map_or_else(
                        || format!("{}s from now", asked.as_secs()),
                        |at| at.to_rfc3339()
                    ),
                if believed < asked {
                    format!(
                        ", which lull caps at {} days",
                        CA_WAIT_MAX.as_secs() / 86_400
                    )
                } else {
                    String::new()
                }
            ),
            _ => String::new(),
        };
        let keeping = match current {
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
                "certificate for {} not {}: {error}; retry at {}{asked}{keeping}",
                names.join(", "),
                if renewal { "renewed" } else { "issued" },
                retry_at.to_rfc3339()
            ),
            json!({
                "names": names,
                "error": error,
                "retry_at": retry_at.to_rfc3339(),
                "ca_retry_after_secs": e.ca_wait().map(|wait| wait.as_secs()),
            }),
        );
    }

    /// Deletes a certificate's files (it is no longer held).
    async fn delete(&self, h: &Held) {
        let dir = self.dir.clone();
        let stored = h.stored.clone();
        let _ = tokio::task::spawn_blocking(move || dir.remove(&stored)).await;
    }

    /// Revokes (if still valid) and deletes a certificate no longer held, with an event.
    async fn revoke(&self, h: &Held, why: &str) {
        let leaf = h.certificate.key.cert.first().map(|c| c.to_vec());
        let revoked = match (&leaf, h.certificate.not_after > Utc::now()) {
            (Some(der), true) => {
                match tokio::time::timeout(REVOKE_TIMEOUT, self.issuer.revoke(der)).await {
                    Ok(result) => result.map(|()| true),
                    Err(_) => Err(AcmeError::Other(format!(
                        "no answer from the CA within {}s",
                        REVOKE_TIMEOUT.as_secs()
                    ))),
                }
            }
            _ => Ok(false),
        };
        self.delete(h).await;
        let names = h.certificate.names.join(", ");
        match revoked {
            Ok(true) => self.emit(
                &h.stored.meta.service,
                "certificate.revoked",
                format!("certificate for {names} revoked and deleted: {why}"),
                json!({ "names": h.certificate.names }),
            ),
            Ok(false) => {}
            Err(e) => self.emit(
                &h.stored.meta.service,
                "certificate.revoked",
                format!(
                    "certificate for {names} deleted ({why}), but the CA did not revoke it: {e}"
                ),
                json!({ "names": h.certificate.names, "error": e.to_string() }),
            ),
        }
    }

    /// Drops expired certificates (served no more; their files deleted).
    async fn drop_expired(&self) {
        let now = Utc::now();
        let expired: Vec<Held> = {
            let mut state = self.state();
            let (gone, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut state.held)
                .into_iter()
                .partition(|h| h.certificate.not_after <= now);
            state.held = keep;
            gone
        };
        for h in expired {
            tracing::warn!(
                names = ?h.certificate.names,
                not_after = %h.certificate.not_after.to_rfc3339(),
                "ACME certificate expired: no longer served"
            );
            self.delete(&h).await;
        }
    }

    /// `certificate.expiring`, once per certificate past its warning point.
    fn announce_expiry(&self) {
        let now = Utc::now();
        let due: Vec<Held> = {
            let mut state = self.state();
            let due: Vec<Held> = state
                .held
                .iter()
                .filter(|h| {
                    now >= policy::warn_at(h.certificate.not_before, h.certificate.not_after)
                })
                .filter(|h| !state.warned.contains(&h.key()))
                .cloned()
                .collect();
            for h in &due {
                state.warned.insert(h.key());
            }
            let live: BTreeSet<(PathBuf, i64)> = state.held.iter().map(Held::key).collect();
            state.warned.retain(|k| live.contains(k));
            due
        };
        for h in due {
            let left = (h.certificate.not_after - now).num_seconds();
            self.emit(
                &h.stored.meta.service,
                "certificate.expiring",
                format!(
                    "certificate for {} expires at {} ({left}s left) and is not renewed yet",
                    h.certificate.names.join(", "),
                    h.certificate.not_after.to_rfc3339(),
                ),
                json!({ "names": h.certificate.names, "not_after": h.certificate.not_after.to_rfc3339() }),
            );
        }
    }

    /// `certificate.expiring` for an operator's certificate (lull.toml or `lull cert add`) past
    /// its warning point, once per certificate, to every service it serves: nobody renews those
    /// but the operator.
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
                if !state
                    .warned_operator
                    .insert((c.source.clone(), c.not_after.timestamp()))
                {
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

    /// Revokes and deletes certificates none of whose names any service has wanted for two
    /// passes in a row (one pass could follow a glitch).
    async fn forget_unwanted(&self) {
        let all = self.all_wanted();
        let gone: Vec<Held> = {
            let mut state = self.state();
            let unwanted: BTreeSet<PathBuf> = state
                .held
                .iter()
                .filter(|h| !h.certificate.names.iter().any(|n| all.contains(n)))
                .map(|h| h.stored.dir.clone())
                .collect();
            let confirmed: BTreeSet<PathBuf> =
                unwanted.intersection(&state.unwanted).cloned().collect();
            state.unwanted = unwanted.difference(&confirmed).cloned().collect();
            let (gone, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut state.held)
                .into_iter()
                .partition(|h| confirmed.contains(&h.stored.dir));
            state.held = keep;
            gone
        };
        if gone.is_empty() {
            return;
        }
        self.publish();
        for h in gone {
            self.revoke(&h, "no service answers on those names").await;
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
                let failure = state.name_failures.get(name).or_else(|| {
                    state
                        .failures
                        .get(service)
                        .filter(|f| f.names.contains(name))
                });
                let dns = state.dns.get(name).cloned().flatten();
                let (status, reason) = if state.validating.contains(name) {
                    (NameStatus::Validating, None)
                } else if cert.is_some() {
                    let renewal = failure.map(|f| format!("renewal failed: {}", f.error));
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::acme::issuer::Issued;
    use crate::config::TlsConfig;

    /// Issues self-signed certificates for the names asked, refusing those in `refuse`.
    #[derive(Default)]
    struct FakeIssuer {
        refuse: StdMutex<Vec<String>>,
        down: AtomicBool,
        /// The wait the CA asks for when down.
        ca_wait: StdMutex<Option<Duration>>,
        orders: StdMutex<Vec<Vec<String>>>,
        revoked: StdMutex<Vec<Vec<u8>>>,
    }

    impl Issuer for FakeIssuer {
        fn issue<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Issued, AcmeError>> {
            Box::pin(async move {
                self.orders.lock().unwrap().push(names.to_vec());
                if self.down.load(Ordering::SeqCst) {
                    let error = AcmeError::Other("connection refused".into());
                    return Err(match *self.ca_wait.lock().unwrap() {
                        Some(wait) => AcmeError::CaAskedToWait {
                            error: Box::new(error),
                            wait,
                        },
                        None => error,
                    });
                }
                let refused: Vec<(String, String)> = names
                    .iter()
                    .filter(|n| self.refuse.lock().unwrap().contains(n))
                    .map(|n| (n.clone(), "DNS problem: NXDOMAIN".to_owned()))
                    .collect();
                if !refused.is_empty() {
                    return Err(AcmeError::Order {
                        status: "invalid".into(),
                        detail: "refused".into(),
                        failed: refused,
                    });
                }
                let key = rcgen::KeyPair::generate().unwrap();
                let mut params = rcgen::CertificateParams::new(names.to_vec()).unwrap();
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2090, 1, 1);
                let cert = params.self_signed(&key).unwrap();
                Ok(Issued {
                    chain_pem: cert.pem(),
                    key_pem: key.serialize_pem(),
                })
            })
        }

        fn revoke<'a>(&'a self, certificate: &'a [u8]) -> BoxFuture<'a, Result<(), AcmeError>> {
            Box::pin(async move {
                self.revoked.lock().unwrap().push(certificate.to_vec());
                Ok(())
            })
        }
    }

    /// What the fake control plane answers for the wanted names.
    type Wanted = Arc<StdMutex<Result<Vec<(String, Vec<String>)>, String>>>;

    struct Rig {
        manager: Arc<AcmeManager>,
        issuer: Arc<FakeIssuer>,
        wanted: Wanted,
        events: Arc<StdMutex<Vec<NewEvent>>>,
        certificates: Arc<Certificates>,
        _dir: tempfile::TempDir,
    }

    fn rig(directory: &str, dir: tempfile::TempDir) -> Rig {
        let issuer = Arc::new(FakeIssuer::default());
        let wanted = Arc::new(StdMutex::new(Ok(Vec::new())));
        let events = Arc::new(StdMutex::new(Vec::new()));
        let certificates = Arc::new(Certificates::start(&TlsConfig::default()).unwrap());
        let source = wanted.clone();
        let sink = events.clone();
        let manager = AcmeManager::new(
            AcmeConfig {
                enabled: true,
                directory: directory.to_owned(),
                retry_initial: Duration::from_secs(3600),
                ..AcmeConfig::default()
            },
            AcmeDir::open(dir.path()).unwrap(),
            issuer.clone(),
            None,
            certificates.clone(),
            Arc::new(move || {
                let now = source.lock().unwrap().clone();
                Box::pin(async move { now })
            }),
            Arc::new(move |e| sink.lock().unwrap().push(e)),
        );
        Rig {
            manager,
            issuer,
            wanted,
            events,
            certificates,
            _dir: dir,
        }
    }

    fn want(rig: &Rig, services: &[(&str, &[&str])]) {
        *rig.wanted.lock().unwrap() = Ok(services
            .iter()
            .map(|(s, names)| (s.to_string(), names.iter().map(|n| n.to_string()).collect()))
            .collect());
    }

    fn kinds(rig: &Rig) -> Vec<String> {
        rig.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.kind.clone())
            .collect()
    }

    fn status(rig: &Rig, name: &str) -> NameStatus {
        rig.manager
            .views()
            .into_iter()
            .find(|v| v.name == name)
            .unwrap()
            .status
    }

    #[tokio::test]
    async fn a_refused_name_does_not_hold_back_the_others() {
        let r = rig("https://ca.test/dir", tempfile::tempdir().unwrap());
        r.issuer
            .refuse
            .lock()
            .unwrap()
            .push("bad.example.com".into());
        want(&r, &[("web", &["bad.example.com", "good.example.com"])]);
        r.manager.pass().await;
        assert_eq!(status(&r, "bad.example.com"), NameStatus::Failed);
        r.manager.pass().await;
        // The second order leaves the refused name out, and gets the other one served.
        assert_eq!(
            r.issuer.orders.lock().unwrap().clone(),
            vec![
                vec!["bad.example.com".to_owned(), "good.example.com".to_owned()],
                vec!["good.example.com".to_owned()],
            ]
        );
        assert_eq!(status(&r, "good.example.com"), NameStatus::Active);
        assert_eq!(status(&r, "bad.example.com"), NameStatus::Failed);
        assert!(
            r.manager
                .views()
                .iter()
                .find(|v| v.name == "bad.example.com")
                .unwrap()
                .reason
                .as_deref()
                .is_some_and(|why| why.contains("NXDOMAIN"))
        );
        assert!(r.certificates.store().covers("good.example.com"));
        assert_eq!(kinds(&r), ["certificate.failed", "certificate.issued"]);
    }

    #[tokio::test]
    async fn a_store_failure_forgets_nothing_and_removal_revokes_after_two_passes() {
        let r = rig("https://ca.test/dir", tempfile::tempdir().unwrap());
        want(&r, &[("web", &["a.example.com"])]);
        r.manager.pass().await;
        assert!(r.certificates.store().covers("a.example.com"));
        *r.wanted.lock().unwrap() = Err("the state store: disk I/O error".into());
        r.manager.pass().await;
        r.manager.pass().await;
        assert!(r.certificates.store().covers("a.example.com"));
        assert!(r.issuer.revoked.lock().unwrap().is_empty());
        // The name really gone: revoked at the second pass that sees it so.
        want(&r, &[]);
        r.manager.pass().await;
        assert!(r.issuer.revoked.lock().unwrap().is_empty());
        r.manager.pass().await;
        assert_eq!(r.issuer.revoked.lock().unwrap().len(), 1);
        assert!(!r.certificates.store().covers("a.example.com"));
        assert_eq!(kinds(&r), ["certificate.issued", "certificate.revoked"]);
    }

    #[tokio::test]
    async fn removing_one_domain_reissues_for_the_rest_and_revokes_the_old_certificate() {
        let r = rig("https://ca.test/dir", tempfile::tempdir().unwrap());
        want(
            &r,
            &[("web", &["shop.example.com", "web.apps.example.net"])],
        );
        r.manager.pass().await;
        want(&r, &[("web", &["web.apps.example.net"])]);
        r.manager.pass().await;
        assert_eq!(r.issuer.orders.lock().unwrap().len(), 2);
        assert_eq!(r.issuer.revoked.lock().unwrap().len(), 1);
        assert!(r.certificates.store().covers("web.apps.example.net"));
        assert!(!r.certificates.store().covers("shop.example.com"));
        assert_eq!(
            kinds(&r),
            [
                "certificate.issued",
                "certificate.renewed",
                "certificate.revoked"
            ]
        );
        // Nothing more to do: no further order.
        r.manager.pass().await;
        assert_eq!(r.issuer.orders.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_new_ca_directory_replaces_the_certificate_which_serves_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let r = rig("https://staging.test/dir", dir);
        want(&r, &[("web", &["a.example.com"])]);
        r.manager.pass().await;
        let leaf =
            |store: &Certificates| store.store().lookup(Some("a.example.com")).cert[0].to_vec();
        let staging = leaf(&r.certificates);
        // The operator moves to another directory (staging → production) while that CA is
        // down: the order fails, the staging certificate keeps being served.
        let certificates = Arc::new(Certificates::start(&TlsConfig::default()).unwrap());
        let source = r.wanted.clone();
        let production = AcmeManager::new(
            AcmeConfig {
                enabled: true,
                directory: "https://production.test/dir".into(),
                retry_initial: Duration::from_millis(1),
                retry_max: Duration::from_millis(1),
                ..AcmeConfig::default()
            },
            AcmeDir::open(&path).unwrap(),
            r.issuer.clone(),
            None,
            certificates.clone(),
            Arc::new(move || {
                let now = source.lock().unwrap().clone();
                Box::pin(async move { now })
            }),
            Arc::new(|_| {}),
        );
        r.issuer.down.store(true, Ordering::SeqCst);
        production.pass().await;
        assert_eq!(leaf(&certificates), staging);
        assert_eq!(r.issuer.orders.lock().unwrap().len(), 2);
        let view = production.views().into_iter().next().unwrap();
        assert_eq!(view.status, NameStatus::Active);
        assert!(view.reason.unwrap().starts_with("renewal failed"));
        // The CA is back: replaced, the staging one deleted (not revoked: still wanted names).
        r.issuer.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        production.pass().await;
        assert_ne!(leaf(&certificates), staging);
        assert!(r.issuer.revoked.lock().unwrap().is_empty());
        assert_eq!(AcmeDir::open(&path).unwrap().list_certs().len(), 1);
        production.pass().await;
        assert_eq!(r.issuer.orders.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn the_wait_the_ca_asks_for_is_waited_in_full_up_to_a_week() {
        let day = Duration::from_secs(86_400);
        let retry_at = |r: &Rig| {
            r.manager
                .views()
                .into_iter()
                .find(|v| v.name == "a.example.com")
                .unwrap()
                .retry_at
                .unwrap()
        };
        let last_event = |r: &Rig| r.events.lock().unwrap().last().unwrap().message.clone();
        let within = |at: DateTime<Utc>, wait: Duration| {
            let expected = wait_until(wait);
            (expected - chrono::TimeDelta::minutes(1)..=expected).contains(&at)
        };
        // Two days asked, far above lull's own backoff (an hour at most in the rig): waited.
        let r = rig("https://ca.test/dir", tempfile::tempdir().unwrap());
        r.issuer.down.store(true, Ordering::SeqCst);
        *r.issuer.ca_wait.lock().unwrap() = Some(2 * day);
        want(&r, &[("web", &["a.example.com"])]);
        r.manager.pass().await;
        assert_eq!(status(&r, "a.example.com"), NameStatus::Failed);
        assert!(within(retry_at(&r), 2 * day), "{}", retry_at(&r));
        let message = last_event(&r);
        assert!(
            message.contains("(the CA asked to wait until "),
            "{message}"
        );
        assert!(!message.contains("caps"), "{message}");
        // No order is tried meanwhile.
        r.manager.pass().await;
        assert_eq!(r.issuer.orders.lock().unwrap().len(), 1);

        // Thirty days asked: a week, and the event says so.
        let r = rig("https://ca.test/dir", tempfile::tempdir().unwrap());
        r.issuer.down.store(true, Ordering::SeqCst);
        *r.issuer.ca_wait.lock().unwrap() = Some(30 * day);
        want(&r, &[("web", &["a.example.com"])]);
        r.manager.pass().await;
        assert!(within(retry_at(&r), 7 * day), "{}", retry_at(&r));
        let message = last_event(&r);
        assert!(message.contains("which lull caps at 7 days"), "{message}");

        // A wait shorter than lull's own backoff changes nothing.
        let r = rig("https://ca.test/dir", tempfile::tempdir().unwrap());
        r.issuer.down.store(true, Ordering::SeqCst);
        *r.issuer.ca_wait.lock().unwrap() = Some(Duration::from_secs(1));
        want(&r, &[("web", &["a.example.com"])]);
        r.manager.pass().await;
        // The rig's backoff: an hour, jittered to between half and all of it.
        let at = retry_at(&r);
        assert!(at >= wait_until(Duration::from_secs(1790)), "{at}");
    }
}
