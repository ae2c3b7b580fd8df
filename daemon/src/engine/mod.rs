//! The deployment engine: one supervisor task (an actor) per service, driving the host through
//! [`InstanceHost`] and the proxy through a shared [`RouteTable`], recording every lifecycle
//! event and each deploy's progress in the [`Store`].
//!
//! # Deploys
//! Blue/green: the new revision gets its own proxy [`Pool`](lull_proxy::pool::Pool) and
//! [`HealthChecker`](lull_proxy::health::HealthChecker); its instances (as many as serve now,
//! at least the revision's minimum) start; once every one is healthy, all the service's
//! hostnames switch to the new pool in one routing-table swap. The old revision's instances
//! then drain (no new requests reach them; the engine waits, bounded, for the ones in flight),
//! and stay for the rollback window throttled and unprobed, after which they get SIGTERM and
//! a grace period, and are removed. A rollback to that revision inside the window is one more
//! routing swap; outside it, a normal deploy.
//!
//! A deploy fails as soon as the evidence is in: a new instance that exits before it is
//! healthy (the exit status and its last log lines are reported) or one that is still not
//! healthy at the startup deadline (the last probe's result is reported). The previous
//! revision keeps serving, the new instances are stopped, and the service takes the next deploy.
//!
//! A second deploy (or rollback, pause, resume) while one runs is rejected with
//! [`EngineError::Busy`] naming the running operation: queueing would hide from the caller that
//! its deploy may be superseded, and a rejected client can retry when it wants to.
//!
//! # Crash loops
//! A serving instance that exits, or that its health checks take out of rotation, is replaced
//! after a backoff that starts at [`EngineSettings::restart_backoff`] and doubles up to
//! [`EngineSettings::restart_backoff_max`]; it goes back to the start once the replaced
//! instance had been healthy for [`EngineSettings::restart_backoff_reset`]. Every restart is an
//! event with its cause.
//!
//! # Pause, resume, delete
//! Pause stops the instances (stopped, not frozen: a frozen app fails its probes and hangs on
//! SIGTERM, and a stopped one frees its memory) and keeps the route with its pool paused, so the
//! proxy answers 503 with `Retry-After`. Resume starts them again and unpauses once they are
//! healthy; if that fails the service stays paused and takes the next deploy. A deploy to a
//! paused service resumes it. Delete stops everything, removes the routes and records a final
//! `service.deleted` event.
//!
//! # Restarts of the daemon
//! [`Engine::recover`] adopts the instances the host still runs: they go back in their
//! revision's pool (the current revision serves, others stand by) without a restart; services
//! with fewer instances than their minimum get replacements.
//!
//! [`Engine::detach`] is the other half of a handover to a new daemon process: every
//! supervisor ends without stopping its instances (no more health checks, restarts or
//! deploys), and the gates of its pools restore their CPU and never throttle again, since the
//! successor adopts the instances and owns their CPU from then on. The routes stay, so the
//! old process's proxy finishes its requests. [`Engine::reattach`] undoes the refusal of new
//! work when the successor failed; [`Engine::recover`] then adopts the instances again.
//!
//! The engine writes events and operations to the store; service records (revisions, their
//! state) belong to the admin API, except that pause and resume set the service's state to
//! `paused` and `active`.

mod actor;
pub mod plan;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lull_proxy::RouteTable;
use lull_proxy::pool::CpuHold;
use tokio::sync::{mpsc, oneshot, watch};

use crate::host::{HostError, InstanceHost, RecoveredInstance};
use crate::store::{Store, StoreError};

pub use plan::{RevisionPlan, RevisionPlanner, ScalingPlan};

/// The engine's timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// How long a replaced revision's instances stay, throttled, for a fast rollback (zero:
    /// they stop as soon as they have drained).
    pub rollback_window: Duration,
    /// How long a new instance may take to become healthy.
    pub startup_deadline: Duration,
    /// How long draining waits for the requests in flight.
    pub drain_timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// The first restart delay of a crashing instance.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// Healthy for this long, an instance's next crash restarts after the first delay again.
    pub restart_backoff_reset: Duration,
    /// Log lines quoted in a failure.
    pub log_lines: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            rollback_window: Duration::from_secs(600),
            startup_deadline: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
            restart_backoff: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(300),
            restart_backoff_reset: Duration::from_secs(600),
            log_lines: 20,
        }
    }
}

/// Why a deploy or a resume failed: the revision, the instance at fault, what happened and the
/// instance's last log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupFailure {
    pub revision: u64,
    pub instance: Option<String>,
    /// e.g. "exited with code 3 before it was healthy", "not healthy after 60s: GET /: 500".
    pub cause: String,
    pub logs: Vec<String>,
}

impl fmt::Display for StartupFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "revision {}: ", self.revision)?;
        if let Some(instance) = &self.instance {
            write!(f, "instance {instance} ")?;
        }
        f.write_str(&self.cause)?;
        if !self.logs.is_empty() {
            write!(f, "; last log lines:\n{}", self.logs.join("\n"))?;
        }
        Ok(())
    }
}

/// The engine's errors; each names the service concerned.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("service {service} is not running on this engine")]
    UnknownService { service: String },
    #[error("service {service} is busy with {operation}; try again when it has finished")]
    Busy { service: String, operation: String },
    #[error("service {service}: revision {revision}: {reason}")]
    Plan {
        service: String,
        revision: u64,
        reason: String,
    },
    #[error("service {service} has no revision to roll back to")]
    NoRollbackTarget { service: String },
    #[error("service {service} has no revision deployed")]
    NotDeployed { service: String },
    #[error("service {service} is not paused")]
    NotPaused { service: String },
    #[error("service {service} stays paused: resume failed: {failure}")]
    ResumeFailed {
        service: String,
        failure: StartupFailure,
    },
    #[error("service {service}: store: {context}")]
    Store {
        service: String,
        context: String,
        #[source]
        source: StoreError,
    },
    #[error("service {service}: {source}")]
    Host {
        service: String,
        #[source]
        source: HostError,
    },
    #[error("service {service}: its supervisor has stopped")]
    Stopped { service: String },
}

/// A deploy's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationEnd {
    Succeeded {
        revision: u64,
        took: Duration,
    },
    Failed(StartupFailure),
    /// Ended for another reason (the service was deleted, the store failed, ...).
    Aborted {
        reason: String,
    },
    /// A source build failed before any revision was made.
    BuildFailed {
        reason: String,
    },
}

/// A long operation's progress as it happens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationProgress {
    pub lines: Vec<String>,
    pub end: Option<OperationEnd>,
}

/// A handle on a deploy: its id, its progress lines and its end.
#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub service: String,
    progress: watch::Receiver<OperationProgress>,
    /// Lines already returned by [`Operation::next_line`].
    seen: usize,
}

impl Operation {
    /// The next progress line, waiting for it; `None` once the operation has ended and every
    /// line was returned.
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            {
                let progress = self.progress.borrow_and_update();
                if let Some(line) = progress.lines.get(self.seen) {
                    self.seen += 1;
                    return Some(line.clone());
                }
                if progress.end.is_some() {
                    return None;
                }
            }
            if self.progress.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Waits for the end.
    pub async fn wait(&mut self) -> OperationEnd {
        let outcome = self.progress.wait_for(|p| p.end.is_some()).await;
        match outcome {
            Ok(progress) => progress
                .end
                .clone()
                .unwrap_or_else(|| OperationEnd::Aborted {
                    reason: "ended without an outcome".into(),
                }),
            Err(_) => OperationEnd::Aborted {
                reason: "the service's supervisor stopped".into(),
            },
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.progress.borrow().lines.clone()
    }
}

/// What a rollback did.
#[derive(Debug)]
pub enum RollbackOutcome {
    /// The revision was standing by: traffic switched to it.
    Switched { revision: u64, took: Duration },
    /// Outside the window: a deploy of the revision started.
    Deploying(Operation),
}

/// Where one instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Started, not yet healthy.
    Starting,
    Healthy,
    /// Serving revision, out of rotation after failed health checks.
    Unhealthy,
    /// Out of rotation, finishing its requests.
    Draining,
    /// Out of rotation and throttled, kept for a rollback.
    Standby,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    pub id: String,
    pub revision: u64,
    pub state: InstanceState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub service: String,
    /// The revision traffic goes to (or would, when paused).
    pub serving: Option<u64>,
    pub paused: bool,
    /// The running operation (`op-...`, or "resume").
    pub operation: Option<String>,
    pub instances: Vec<InstanceStatus>,
    /// Instances of the serving revision restarted after exits or failed health checks.
    pub restarts: u32,
}

/// What [`Engine::recover`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoverReport {
    /// Instances put back in their revision's pool.
    pub adopted: Vec<String>,
    /// Instances of services that no longer exist, stopped.
    pub stopped: Vec<String>,
}

pub(crate) enum Command {
    Deploy {
        revision: u64,
        reply: oneshot::Sender<Result<Operation, EngineError>>,
    },
    Rollback {
        revision: Option<u64>,
        reply: oneshot::Sender<Result<RollbackOutcome, EngineError>>,
    },
    Pause {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Resume {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Delete {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Status {
        reply: oneshot::Sender<ServiceStatus>,
    },
    /// Hold an instance's CPU through its pool's gate (`lull exec`).
    HoldCpu {
        instance: String,
        reply: oneshot::Sender<Option<CpuHold>>,
    },
    Adopt {
        instances: Vec<RecoveredInstance>,
        serving: u64,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    HoldPaused {
        revision: u64,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// End the supervisor, leaving the instances running (see [`Engine::detach`]).
    Detach { reply: oneshot::Sender<()> },
}

/// What every service's actor shares.
pub(crate) struct Shared {
    pub(crate) host: Arc<dyn InstanceHost>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) routes: Arc<RouteTable>,
    pub(crate) planner: Arc<dyn RevisionPlanner>,
    pub(crate) settings: EngineSettings,
    services: Mutex<HashMap<String, mpsc::UnboundedSender<Command>>>,
    operations: Mutex<HashMap<String, Operation>>,
    /// Where the proxy's per-request series go (see [`Engine::with_proxy_metrics`]).
    pub(crate) proxy_metrics: std::sync::OnceLock<Arc<lull_proxy::metrics::ProxyMetrics>>,
    /// Deploy, restart and event counters (see [`Engine::with_daemon_metrics`]).
    pub(crate) daemon_metrics: std::sync::OnceLock<Arc<crate::telemetry::DaemonMetrics>>,
    /// Builds the redactor applied to events and progress before they are logged or stored
    /// (see [`Engine::with_redaction`]).
    pub(crate) redaction: std::sync::OnceLock<Redaction>,
    /// Per-service access logs (see [`Engine::with_access_logs`]).
    pub(crate) access_logs: std::sync::OnceLock<AccessLogs>,
    /// The host budget's pressure brake and the scaling series (see [`Engine::with_scaling`]).
    pub(crate) scaling: std::sync::OnceLock<Arc<crate::autoscale::ScalingMetrics>>,
    /// Set by [`Engine::detach`]: no supervisor starts and no command is taken.
    detached: std::sync::atomic::AtomicBool,
}

/// Makes the redactor of secret values from the store; called off the async threads.
pub type Redaction = Arc<dyn Fn(&dyn Store) -> crate::secrets::Redactor + Send + Sync>;

/// Where services' access logs are written: `<dir>/<service>.jsonl`, rotated at `max_bytes`.
#[derive(Debug, Clone)]
pub struct AccessLogs {
    pub dir: std::path::PathBuf,
    pub max_bytes: Option<u64>,
}

impl AccessLogs {
    pub fn path(&self, service: &str) -> std::path::PathBuf {
        self.dir.join(format!("{service}.jsonl"))
    }
}

impl Shared {
    pub(crate) fn remember_operation(&self, operation: &Operation) {
        lock(&self.operations).insert(operation.id.clone(), operation.clone());
    }

    pub(crate) fn forget_service(&self, service: &str) {
        lock(&self.services).remove(service);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The deployment engine. Cheap to clone; clones share the services.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// An engine with no service running yet (see [`Engine::recover`]). Must be called within
    /// a tokio runtime.
    pub fn new(
        host: Arc<dyn InstanceHost>,
        store: Arc<dyn Store>,
        routes: Arc<RouteTable>,
        planner: Arc<dyn RevisionPlanner>,
        settings: EngineSettings,
    ) -> Engine {
        Engine {
            shared: Arc::new(Shared {
                host,
                store,
                routes,
                planner,
                settings,
                services: Mutex::new(HashMap::new()),
                operations: Mutex::new(HashMap::new()),
                proxy_metrics: std::sync::OnceLock::new(),
                daemon_metrics: std::sync::OnceLock::new(),
                redaction: std::sync::OnceLock::new(),
                access_logs: std::sync::OnceLock::new(),
                scaling: std::sync::OnceLock::new(),
                detached: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Services' pools report to `metrics` (set before the first service starts).
    pub fn with_proxy_metrics(self, metrics: Arc<lull_proxy::metrics::ProxyMetrics>) -> Engine {
        let _ = self.shared.proxy_metrics.set(metrics);
        self
    }

    /// Deploys, restarts and events are counted in `metrics`.
    pub fn with_daemon_metrics(self, metrics: Arc<crate::telemetry::DaemonMetrics>) -> Engine {
        let _ = self.shared.daemon_metrics.set(metrics);
        self
    }

    /// Secret values are replaced by `[redacted]` in events and progress lines (an app's last
    /// log lines quoted in a failure may hold one) before they are logged or stored.
    pub fn with_redaction(self, redaction: Redaction) -> Engine {
        let _ = self.shared.redaction.set(redaction);
        self
    }

    /// Every request through a service's routes is logged to its access log file.
    pub fn with_access_logs(self, logs: AccessLogs) -> Engine {
        let _ = self.shared.access_logs.set(logs);
        self
    }

    /// Scale-out is braked by the host pressure `scaling` reads, and decisions and cold starts
    /// are counted in it. (The memory and instance caps are the host's: see
    /// [`crate::host::budget::BudgetedHost`].)
    pub fn with_scaling(self, scaling: Arc<crate::autoscale::ScalingMetrics>) -> Engine {
        let _ = self.shared.scaling.set(scaling);
        self
    }

    /// The host the engine runs instances on.
    pub fn host(&self) -> &Arc<dyn InstanceHost> {
        &self.shared.host
    }

    /// Where access logs go, when they are kept.
    pub fn access_logs(&self) -> Option<&AccessLogs> {
        self.shared.access_logs.get()
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.shared.settings
    }

    /// The service's actor, started if needed.
    fn actor(&self, service: &str) -> mpsc::UnboundedSender<Command> {
        if self.is_detached() {
            // A closed channel: the caller gets `EngineError::Stopped`.
            return mpsc::unbounded_channel().0;
        }
        let mut services = lock(&self.shared.services);
        if let Some(tx) = services.get(service)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let tx = actor::spawn(self.shared.clone(), service);
        services.insert(service.to_owned(), tx.clone());
        tx
    }

    /// The service's actor if it runs.
    fn existing(&self, service: &str) -> Result<mpsc::UnboundedSender<Command>, EngineError> {
        if self.is_detached() {
            return Err(EngineError::Stopped {
                service: service.to_owned(),
            });
        }
        lock(&self.shared.services)
            .get(service)
            .filter(|tx| !tx.is_closed())
            .cloned()
            .ok_or_else(|| EngineError::UnknownService {
                service: service.to_owned(),
            })
    }

    async fn ask<T>(
        &self,
        service: &str,
        tx: mpsc::UnboundedSender<Command>,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || EngineError::Stopped {
            service: service.to_owned(),
        };
        tx.send(command(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Starts deploying a stored revision; returns once the operation is recorded (follow it
    /// with the returned [`Operation`]).
    pub async fn deploy(&self, service: &str, revision: u64) -> Result<Operation, EngineError> {
        let tx = self.actor(service);
        self.ask(service, tx, |reply| Command::Deploy { revision, reply })
            .await?
    }

    /// A deploy's handle, while this engine runs (finished operations stay in the store).
    pub fn operation(&self, id: &str) -> Option<Operation> {
        lock(&self.shared.operations).get(id).cloned()
    }

    /// Registers an operation that runs outside the service's supervisor (a source build,
    /// which then starts a deploy): followers find it by id like the engine's own.
    pub fn external_operation(
        &self,
        id: &str,
        service: &str,
    ) -> (watch::Sender<OperationProgress>, Operation) {
        let (tx, rx) = watch::channel(OperationProgress::default());
        let operation = Operation {
            id: id.to_owned(),
            service: service.to_owned(),
            progress: rx,
            seen: 0,
        };
        self.shared.remember_operation(&operation);
        (tx, operation)
    }

    /// Switches back to `revision` (default: the one that served before).
    pub async fn rollback(
        &self,
        service: &str,
        revision: Option<u64>,
    ) -> Result<RollbackOutcome, EngineError> {
        let tx = self.existing(service)?;
        self.ask(service, tx, |reply| Command::Rollback { revision, reply })
            .await?
    }

    /// At startup, for a service recorded as paused with nothing running: routes its hosts to
    /// a paused, empty pool of `revision`, so requests get 503 with `Retry-After` (never 404)
    /// and `resume` starts it.
    pub async fn hold_paused(&self, service: &str, revision: u64) -> Result<(), EngineError> {
        let tx = self.actor(service);
        self.ask(service, tx, |reply| Command::HoldPaused { revision, reply })
            .await?
    }

    pub async fn pause(&self, service: &str) -> Result<(), EngineError> {
        let tx = self.existing(service)?;
        self.ask(service, tx, |reply| Command::Pause { reply })
            .await?
    }

    /// Returns once the service serves again (or failed to, staying paused).
    pub async fn resume(&self, service: &str) -> Result<(), EngineError> {
        let tx = self.existing(service)?;
        self.ask(service, tx, |reply| Command::Resume { reply })
            .await?
    }

    /// Stops everything and removes the routes; returns once done.
    pub async fn delete(&self, service: &str) -> Result<(), EngineError> {
        let tx = self.existing(service)?;
        let result = self
            .ask(service, tx, |reply| Command::Delete { reply })
            .await?;
        self.shared.forget_service(service);
        result
    }

    pub async fn status(&self, service: &str) -> Result<ServiceStatus, EngineError> {
        let tx = self.existing(service)?;
        self.ask(service, tx, |reply| Command::Status { reply })
            .await
    }

    /// Holds `instance`'s CPU through the gate of the pool it is in (see
    /// [`lull_proxy::pool::Pool::hold_cpu`]) until the guard is dropped; `None` when no pool of
    /// the service has it.
    pub async fn hold_cpu(
        &self,
        service: &str,
        instance: &str,
    ) -> Result<Option<CpuHold>, EngineError> {
        let tx = self.existing(service)?;
        let instance = instance.to_owned();
        self.ask(service, tx, |reply| Command::HoldCpu { instance, reply })
            .await
    }

    /// Services with a supervisor, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut names: Vec<_> = lock(&self.shared.services)
            .iter()
            .filter(|(_, tx)| !tx.is_closed())
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// Hands the instances over to another daemon process: every supervisor ends once its
    /// pending store writes are done, leaving its instances running, unsupervised (no health
    /// checks, restarts, deploys or stops), and its pools' gates restored and never
    /// throttling again; routes stay as they are. From now on every command fails with
    /// [`EngineError::Stopped`] and no supervisor starts, until [`Engine::reattach`].
    /// Returns the services whose supervisor ended.
    pub async fn detach(&self) -> Vec<String> {
        self.shared
            .detached
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let services: Vec<(String, mpsc::UnboundedSender<Command>)> =
            lock(&self.shared.services).drain().collect();
        let mut ended = Vec::new();
        for (service, tx) in services {
            let (reply, done) = oneshot::channel();
            if tx.send(Command::Detach { reply }).is_ok() && done.await.is_ok() {
                ended.push(service);
            }
        }
        ended.sort();
        ended
    }

    /// Takes commands and starts supervisors again after [`Engine::detach`] (the successor
    /// failed). The instances are not supervised until [`Engine::recover`] adopts them.
    pub fn reattach(&self) {
        self.shared
            .detached
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_detached(&self) -> bool {
        self.shared
            .detached
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// At startup: adopts the instances the host still runs (no restart). The service's
    /// current revision in the store serves (else the highest running one); instances of
    /// services the store no longer has are stopped and removed.
    pub async fn recover(&self) -> Result<RecoverReport, EngineError> {
        let host = &self.shared.host;
        let found = host.recover().await.map_err(|source| EngineError::Host {
            service: "*".into(),
            source,
        })?;
        let mut by_service: HashMap<String, Vec<RecoveredInstance>> = HashMap::new();
        for instance in found {
            by_service
                .entry(instance.service.clone())
                .or_default()
                .push(instance);
        }
        let mut report = RecoverReport::default();
        let mut names: Vec<_> = by_service.keys().cloned().collect();
        names.sort();
        for name in names {
            let instances = by_service.remove(&name).unwrap_or_default();
            let store = self.shared.store.clone();
            let lookup = name.clone();
            let record = actor::blocking(store, move |s| s.get_service(&lookup)).await;
            let record = match record {
                Ok(record) => record,
                Err(StoreError::NotFound { .. }) => {
                    for instance in instances {
                        let id = instance.instance.id;
                        tracing::info!(service = %name, instance = %id, "stopping an instance of a deleted service");
                        actor::retire(self.shared.clone(), id.clone()).await;
                        report.stopped.push(id);
                    }
                    continue;
                }
                Err(source) => {
                    return Err(EngineError::Store {
                        service: name.clone(),
                        context: "reading the service".into(),
                        source,
                    });
                }
            };
            let highest = instances.iter().map(|i| i.revision).max().unwrap_or(0);
            let serving = record
                .current_revision
                .filter(|r| instances.iter().any(|i| i.revision == *r))
                .unwrap_or(highest);
            let ids: Vec<String> = instances.iter().map(|i| i.instance.id.clone()).collect();
            let tx = self.actor(&name);
            self.ask(&name, tx, |reply| Command::Adopt {
                instances,
                serving,
                reply,
            })
            .await??;
            report.adopted.extend(ids);
        }
        Ok(report)
    }
}
