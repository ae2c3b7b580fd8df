//! One service's supervisor: a task owning the service's revision sets (pool, health checker,
//! instances), driven by commands, instance exits, pool events and timers.

mod scale;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use lull_proxy::Route;
use lull_proxy::health::HealthChecker;
use lull_proxy::pool::{InstanceSpec, Pool, PoolEvent};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Command, EngineError, InstanceState, InstanceStatus, Operation, OperationEnd,
    OperationProgress, RevisionPlan, RollbackOutcome, ServiceStatus, Shared, StartupFailure,
};
use crate::host::{ExitInfo, HostError, RecoveredInstance, StartRequest, Started, instance_id};
use crate::store::{NewEvent, OperationOutcome, Store, StoreError};

/// Runs a store call off the async threads (the SQLite store waits for fsync).
pub(crate) async fn blocking<T: Send + 'static>(
    store: Arc<dyn Store>,
    call: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(move || call(store.as_ref())).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Backend {
            context: "running a store call".into(),
            source: Box::new(e),
        }),
    }
}

/// Stops (SIGTERM, grace) and removes one instance, logging what fails.
pub(crate) async fn retire(shared: Arc<Shared>, id: String) {
    let host = &shared.host;
    match host.stop(&id, shared.settings.stop_grace).await {
        Ok(exit) => tracing::debug!(instance = %id, %exit, "instance stopped"),
        Err(HostError::NotFound { .. }) => return,
        Err(e) => tracing::warn!(instance = %id, error = %e, "cannot stop instance"),
    }
    if let Err(e) = host.remove(&id).await {
        tracing::warn!(instance = %id, error = %e, "cannot remove instance");
    }
}

pub(crate) fn spawn(shared: Arc<Shared>, service: &str) -> mpsc::UnboundedSender<Command> {
    let (tx, commands) = mpsc::unbounded_channel();
    let (internal_tx, internal) = mpsc::unbounded_channel();
    let (pool_tx, pool_events) = mpsc::unbounded_channel();
    let (writes, write_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_store(shared.clone(), write_rx));
    let actor = Actor {
        service: service.to_owned(),
        shared,
        sets: Vec::new(),
        next_set: 0,
        paused: false,
        phase: Phase::Idle,
        restarts: Vec::new(),
        internal_tx,
        pool_tx,
        writes,
        access_log: None,
        scale: None,
    };
    let span = tracing::info_span!("service", service = %service);
    tokio::spawn(actor.run(commands, internal, pool_events).instrument(span));
    tx
}

/// Store writes, applied in order by one task so events never overtake each other.
enum Write {
    Event(NewEvent),
    Progress {
        operation: String,
        line: String,
    },
    Finish {
        operation: String,
        outcome: OperationOutcome,
    },
    /// Sets the service record's state unless it has it already (or is gone).
    SetState {
        service: String,
        state: &'static str,
    },
    /// Makes `revision` the service's current one (its document the service's): it serves.
    Serving {
        service: String,
        revision: u64,
    },
    /// Answered once every earlier write is done.
    Flush(oneshot::Sender<()>),
    /// Tells an operation's followers it ended, once the store says so too.
    End {
        tx: watch::Sender<OperationProgress>,
        end: OperationEnd,
    },
}

async fn write_store(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Write>) {
    while let Some(write) = rx.recv().await {
        let write = match write {
            Write::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Write::End { tx, end } => {
                tx.send_modify(|p| p.end = Some(end));
                continue;
            }
            write => write,
        };
        let redaction = shared.redaction.get().cloned();
        let result = blocking(shared.store.clone(), move |s| {
            let redactor = match &write {
                Write::Event(_) | Write::Progress { .. } | Write::Finish { .. } => {
                    redaction.map(|make| make(s))
                }
                _ => None,
            };
            let text = |t: &str| match &redactor {
                Some(r) => r.redact(t).into_owned(),
                None => t.to_owned(),
            };
            let json = |mut v: Value| {
                if let Some(r) = &redactor {
                    crate::control::secrets::redact_json(r, &mut v);
                }
                v
            };
            match write {
                Write::Event(event) => {
                    let event = NewEvent {
                        message: text(&event.message),
                        fields: json(event.fields),
                        ..event
                    };
                    tracing::info!(service = %event.service, kind = %event.kind, message = %event.message, "event");
                    s.append_event(&event).map(drop)
                }
                Write::Progress { operation, line } => {
                    s.append_operation_progress(&operation, &text(&line))
                }
                Write::Finish { operation, outcome } => {
                    let outcome = match outcome {
                        OperationOutcome::Succeeded(v) => OperationOutcome::Succeeded(json(v)),
                        OperationOutcome::Failed(v) => OperationOutcome::Failed(json(v)),
                    };
                    s.finish_operation(&operation, &outcome).map(drop)
                }
                Write::SetState { service, state } => set_service_state(s, &service, state),
                Write::Serving { service, revision } => set_serving(s, &service, revision),
                Write::Flush(_) | Write::End { .. } => Ok(()),
            }
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot record in the store");
        }
    }
}

/// Records that `revision` serves: the service's current revision and document become its.
/// Retried when Control's own write to the record got there first.
fn set_serving(store: &dyn Store, service: &str, revision: u64) -> Result<(), StoreError> {
    let doc = match store.get_revision(service, revision) {
        Ok(r) => r.doc,
        Err(StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut attempts = 0;
    loop {
        let record = match store.get_service(service) {
            Ok(record) => record,
            Err(StoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if record.current_revision == Some(revision) && record.doc == doc {
            return Ok(());
        }
        let generation = record.generation;
        let record = crate::store::ServiceRecord {
            current_revision: Some(revision),
            doc: doc.clone(),
            ..record
        };
        match store.put_service(&record, generation) {
            Err(StoreError::Conflict { .. }) if attempts < 5 => attempts += 1,
            other => return other.map(drop),
        }
    }
}

fn set_service_state(store: &dyn Store, service: &str, state: &str) -> Result<(), StoreError> {
    let record = match store.get_service(service) {
        Ok(record) => record,
        Err(StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    if record.state == state {
        return Ok(());
    }
    let generation = record.generation;
    let record = crate::store::ServiceRecord {
        state: state.to_owned(),
        ..record
    };
    store.put_service(&record, generation).map(drop)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Starting,
    Serving,
    Draining,
    Standby { until: Instant },
}

struct Member {
    started: Started,
    healthy_since: Option<Instant>,
}

/// One revision's instances and the proxy pool in front of them.
struct RevisionSet {
    key: u64,
    revision: u64,
    plan: Arc<RevisionPlan>,
    image: String,
    pool: Arc<Pool>,
    route: Arc<Route>,
    health: Option<HealthChecker>,
    members: Vec<Member>,
    /// How many instances it should run.
    desired: usize,
    role: Role,
    restarts: u32,
    next_backoff: Duration,
}

impl RevisionSet {
    fn member(&mut self, id: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.started.id == id)
    }

    fn take(&mut self, id: &str) -> Option<Member> {
        let pos = self.members.iter().position(|m| m.started.id == id)?;
        self.pool.remove_instance(id);
        Some(self.members.remove(pos))
    }
}

/// Why instances are being started.
enum Purpose {
    Deploy {
        operation: Operation,
        tx: watch::Sender<OperationProgress>,
    },
    Resume {
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
}

impl Purpose {
    fn name(&self) -> String {
        match self {
            Purpose::Deploy { operation, .. } => format!("deploy {}", operation.id),
            Purpose::Resume { .. } => "resume".into(),
        }
    }
}

struct Prepared {
    image: Result<String, HostError>,
    started: Vec<Started>,
    error: Option<HostError>,
}

enum Phase {
    Idle,
    /// Pulling the image and starting instances (off the actor).
    Preparing {
        purpose: Purpose,
        set: u64,
        task: JoinHandle<Prepared>,
        since: Instant,
    },
    /// Waiting for the instances to be healthy.
    Starting {
        purpose: Purpose,
        set: u64,
        waiting: HashSet<String>,
        deadline: Instant,
        since: Instant,
    },
}

struct PendingRestart {
    at: Instant,
    set: u64,
    cause: String,
}

enum Internal {
    Exited {
        id: String,
        exit: ExitInfo,
    },
    Drained {
        set: u64,
    },
    Restarted {
        set: u64,
        cause: String,
        result: Result<Started, HostError>,
    },
    ScaledOut {
        set: u64,
        result: Result<Started, HostError>,
    },
}

struct Actor {
    service: String,
    shared: Arc<Shared>,
    sets: Vec<RevisionSet>,
    next_set: u64,
    paused: bool,
    phase: Phase,
    restarts: Vec<PendingRestart>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    pool_tx: mpsc::UnboundedSender<PoolEvent>,
    writes: mpsc::UnboundedSender<Write>,
    access_log: Option<Arc<lull_proxy::access_log::AccessLog>>,
    /// The serving set's autoscaler.
    scale: Option<scale::ScaleState>,
}

/// A restart's cause as a metric label: `oom`, `unhealthy` or `exit`.
fn restart_class(cause: &Value) -> &'static str {
    let cause = cause.as_str().unwrap_or("");
    if cause.contains("OOM") {
        "oom"
    } else if cause.contains("health") {
        "unhealthy"
    } else {
        "exit"
    }
}

/// Resolves with the preparing task's result, or never when there is none.
async fn prepared(phase: &mut Phase) -> Prepared {
    match phase {
        Phase::Preparing { task, .. } => match task.await {
            Ok(prepared) => prepared,
            Err(e) => Prepared {
                image: Err(HostError::Recover {
                    reason: format!("starting instances failed: {e}"),
                }),
                started: Vec::new(),
                error: None,
            },
        },
        _ => std::future::pending().await,
    }
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        mut pool_events: mpsc::UnboundedReceiver<PoolEvent>,
    ) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Delete { reply }) => {
                        self.delete().await;
                        let _ = reply.send(Ok(()));
                        return;
                    }
                    Some(Command::Detach { reply }) => {
                        self.detach().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.command(command).await,
                    // The engine is gone (the daemon stops): leave the instances running.
                    None => return,
                },
                Some(message) = internal.recv() => self.internal(message).await,
                Some(event) = pool_events.recv() => self.pool_event(event).await,
                result = prepared(&mut self.phase) => self.on_prepared(result).await,
                _ = sleep_until(wake) => self.timers().await,
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.restarts.iter().map(|r| r.at).min();
        let mut earliest = |at: Instant| {
            wake = Some(wake.map_or(at, |w| w.min(at)));
        };
        if let Phase::Starting { deadline, .. } = &self.phase {
            earliest(*deadline);
        }
        for set in &self.sets {
            if let Role::Standby { until } = set.role {
                earliest(until);
            }
        }
        if let Some(scale) = &self.scale {
            earliest(scale.next_sample());
        }
        wake
    }

    // Recording.

    fn event(&self, kind: &str, message: String, fields: Value) {
        // Logged by the store writer, once secret values are out of it.
        if let Some(metrics) = self.shared.daemon_metrics.get() {
            metrics.event(&self.service, kind);
            match kind {
                "deploy.succeeded" => metrics.deployment_finished(
                    &self.service,
                    true,
                    Duration::from_millis(fields["took_ms"].as_u64().unwrap_or(0)),
                ),
                "deploy.failed" => {
                    metrics.deployment_finished(&self.service, false, Duration::ZERO)
                }
                "instance.restarted" => {
                    metrics.instance_restarted(&self.service, restart_class(&fields["cause"]))
                }
                _ => {}
            }
        }
        let _ = self.writes.send(Write::Event(NewEvent {
            service: self.service.clone(),
            kind: kind.to_owned(),
            message,
            fields,
        }));
    }

    fn progress(&self, purpose: &Purpose, line: String) {
        if let Purpose::Deploy { operation, tx } = purpose {
            tx.send_modify(|p| p.lines.push(line.clone()));
            let _ = self.writes.send(Write::Progress {
                operation: operation.id.clone(),
                line,
            });
        }
    }

    fn set_state(&self, state: &'static str) {
        let _ = self.writes.send(Write::SetState {
            service: self.service.clone(),
            state,
        });
    }

    // Sets.

    fn set(&mut self, key: u64) -> Option<&mut RevisionSet> {
        self.sets.iter_mut().find(|s| s.key == key)
    }

    fn serving(&self) -> Option<&RevisionSet> {
        self.sets.iter().find(|s| s.role == Role::Serving)
    }

    fn find_member(&mut self, id: &str) -> Option<&mut RevisionSet> {
        self.sets
            .iter_mut()
            .find(|s| s.members.iter().any(|m| m.started.id == id))
    }

    /// The service's access log, opened once.
    fn access_log(&mut self) -> Option<Arc<lull_proxy::access_log::AccessLog>> {
        if self.access_log.is_none() {
            let logs = self.shared.access_logs.get()?;
            let path = logs.path(&self.service);
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match lull_proxy::access_log::AccessLog::open(&path, logs.max_bytes) {
                Ok(log) => self.access_log = Some(Arc::new(log)),
                Err(e) => tracing::warn!(service = %self.service, "access log: {e}"),
            }
        }
        self.access_log.clone()
    }

    fn new_set(&mut self, revision: u64, plan: Arc<RevisionPlan>, role: Role) -> u64 {
        let key = self.next_set;
        self.next_set += 1;
        let config = Arc::new(plan.proxy.clone());
        let pool = match self.shared.proxy_metrics.get() {
            Some(metrics) => {
                Pool::with_metrics(&self.service, config, self.pool_tx.clone(), metrics.clone())
            }
            None => Pool::new(&self.service, config, self.pool_tx.clone()),
        };
        let mut route = Route::new(pool.clone(), &revision.to_string());
        if let Some(log) = self.access_log() {
            route = route.with_access_log(log);
        }
        let route = Arc::new(route);
        self.sets.push(RevisionSet {
            key,
            revision,
            image: plan.image.clone(),
            plan,
            health: Some(HealthChecker::spawn(pool.clone())),
            pool,
            route,
            members: Vec::new(),
            desired: 1,
            role,
            restarts: 0,
            next_backoff: self.shared.settings.restart_backoff,
        });
        key
    }

    fn add_member(&mut self, key: u64, started: Started) {
        let tx = self.internal_tx.clone();
        let host = self.shared.host.clone();
        let id = started.id.clone();
        tokio::spawn(async move {
            if let Ok(exit) = host.wait(&id).await {
                let _ = tx.send(Internal::Exited { id, exit });
            }
        });
        if let Some(set) = self.set(key) {
            set.pool.add_instance(InstanceSpec {
                id: started.id.clone(),
                addr: started.addr,
                cpu: started.cpu.clone(),
            });
            set.members.push(Member {
                started,
                healthy_since: None,
            });
        }
        self.update_watermark();
    }

    /// Removes a set's instances from its pool and stops them (in the background).
    fn retire_set(&mut self, key: u64) {
        let Some(pos) = self.sets.iter().position(|s| s.key == key) else {
            return;
        };
        let set = self.sets.remove(pos);
        self.restarts.retain(|r| r.set != key);
        set.pool.drain();
        for member in &set.members {
            set.pool.remove_instance(&member.started.id);
            tokio::spawn(retire(self.shared.clone(), member.started.id.clone()));
        }
        if !set.members.is_empty() {
            self.event(
                "revision.stopped",
                format!("revision {} stopped", set.revision),
                json!({"revision": set.revision, "instances": set.members.iter().map(|m| &m.started.id).collect::<Vec<_>>()}),
            );
        }
    }

    /// Starts instances of a plan off the actor.
    fn prepare(
        &self,
        revision: u64,
        plan: Arc<RevisionPlan>,
        count: usize,
    ) -> JoinHandle<Prepared> {
        let shared = self.shared.clone();
        let service = self.service.clone();
        tokio::spawn(async move {
            let image = match shared.host.ensure_image(&plan.image).await {
                Ok(info) => info.reference,
                Err(e) => {
                    return Prepared {
                        image: Err(e),
                        started: Vec::new(),
                        error: None,
                    };
                }
            };
            let starts = (0..count).map(|_| {
                shared
                    .host
                    .start(start_request(&service, revision, &plan, &image))
            });
            let mut started = Vec::new();
            let mut error = None;
            for result in join_all(starts).await {
                match result {
                    Ok(s) => started.push(s),
                    Err(e) => error = Some(e),
                }
            }
            Prepared {
                image: Ok(image),
                started,
                error,
            }
        })
    }

    // Commands.

    fn busy(&self) -> Option<EngineError> {
        let operation = match &self.phase {
            Phase::Idle => return None,
            Phase::Preparing { purpose, .. } | Phase::Starting { purpose, .. } => purpose.name(),
        };
        Some(EngineError::Busy {
            service: self.service.clone(),
            operation,
        })
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Deploy { revision, reply } => {
                let result = match self.busy() {
                    Some(busy) => Err(busy),
                    None => self.deploy(revision).await,
                };
                let _ = reply.send(result);
            }
            Command::Rollback { revision, reply } => {
                let result = match self.busy() {
                    Some(busy) => Err(busy),
                    None => self.rollback(revision).await,
                };
                let _ = reply.send(result);
            }
            Command::Pause { reply } => {
                let result = match self.busy() {
                    Some(busy) => Err(busy),
                    None => self.pause().await,
                };
                let _ = reply.send(result);
            }
            Command::Resume { reply } => match self.busy() {
                Some(busy) => {
                    let _ = reply.send(Err(busy));
                }
                None => self.resume(reply),
            },
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::HoldCpu { instance, reply } => {
                let hold = self
                    .sets
                    .iter()
                    .find_map(|set| set.pool.hold_cpu(&instance));
                let _ = reply.send(hold);
            }
            Command::Adopt {
                instances,
                serving,
                reply,
            } => {
                let _ = reply.send(self.adopt(instances, serving).await);
            }
            Command::HoldPaused { revision, reply } => {
                let _ = reply.send(self.hold_paused(revision).await);
            }
            Command::Delete { .. } | Command::Detach { .. } => {}
        }
    }

    async fn hold_paused(&mut self, revision: u64) -> Result<(), EngineError> {
        if self.serving().is_some() {
            return Ok(());
        }
        let plan = Arc::new(self.plan(revision).await?);
        let desired = (plan.min_instances as usize).max(1);
        let key = self.new_set(revision, plan, Role::Serving);
        if let Some(set) = self.set(key) {
            set.pool.set_paused(true);
            set.desired = desired;
        }
        self.paused = true;
        self.switch_to(key);
        Ok(())
    }

    /// The revision's plan; the planner may read the store (secrets), so it runs off the
    /// async threads too.
    async fn plan(&self, revision: u64) -> Result<RevisionPlan, EngineError> {
        let service = self.service.clone();
        let planner = self.shared.planner.clone();
        let planned = tokio::task::spawn_blocking({
            let store = self.shared.store.clone();
            move || {
                store
                    .get_revision(&service, revision)
                    .map(|record| planner.plan(&record))
            }
        })
        .await;
        let planned = match planned {
            Ok(p) => p,
            Err(e) => Err(StoreError::Backend {
                context: "running a store call".into(),
                source: Box::new(e),
            }),
        };
        planned
            .map_err(|source| EngineError::Store {
                service: self.service.clone(),
                context: format!("reading revision {revision}"),
                source,
            })?
            .map_err(|reason| EngineError::Plan {
                service: self.service.clone(),
                revision,
                reason,
            })
    }

    async fn deploy(&mut self, revision: u64) -> Result<Operation, EngineError> {
        let plan = Arc::new(self.plan(revision).await?);
        let service = self.service.clone();
        let record = blocking(self.shared.store.clone(), move |s| {
            s.create_operation("deploy", &service)
        })
        .await
        .map_err(|source| EngineError::Store {
            service: self.service.clone(),
            context: "creating the deploy operation".into(),
            source,
        })?;
        let (tx, rx) = watch::channel(OperationProgress::default());
        let operation = Operation {
            id: record.id.clone(),
            service: self.service.clone(),
            progress: rx,
            seen: 0,
        };
        self.shared.remember_operation(&operation);
        let count = match self.serving() {
            Some(set) => set.desired.max(set.members.len()),
            None => 0,
        }
        .max(plan.min_instances as usize)
        .max(1);
        let key = self.new_set(revision, plan.clone(), Role::Starting);
        if let Some(set) = self.set(key) {
            set.desired = count;
        }
        let purpose = Purpose::Deploy {
            operation: operation.clone(),
            tx,
        };
        self.event(
            "deploy.started",
            format!("deploy of revision {revision} started ({})", record.id),
            json!({"revision": revision, "operation": record.id, "instances": count}),
        );
        self.progress(
            &purpose,
            format!(
                "starting {count} instance(s) of revision {revision} ({})",
                plan.image
            ),
        );
        let task = self.prepare(revision, plan, count);
        self.phase = Phase::Preparing {
            purpose,
            set: key,
            task,
            since: Instant::now(),
        };
        Ok(operation)
    }

    fn resume(&mut self, reply: oneshot::Sender<Result<(), EngineError>>) {
        let Some(set) = self.serving() else {
            let _ = reply.send(Err(EngineError::NotDeployed {
                service: self.service.clone(),
            }));
            return;
        };
        if !self.paused {
            let _ = reply.send(Err(EngineError::NotPaused {
                service: self.service.clone(),
            }));
            return;
        }
        let (key, revision, plan) = (set.key, set.revision, set.plan.clone());
        let count = set.desired.max(plan.min_instances as usize).max(1);
        self.event(
            "service.resuming",
            format!("resuming revision {revision}"),
            json!({"revision": revision}),
        );
        let task = self.prepare(revision, plan, count);
        self.phase = Phase::Preparing {
            purpose: Purpose::Resume { reply },
            set: key,
            task,
            since: Instant::now(),
        };
    }

    async fn on_prepared(&mut self, prepared: Prepared) {
        let Phase::Preparing {
            purpose,
            set: key,
            since,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        let revision = self.set(key).map(|s| s.revision).unwrap_or(0);
        let ids: Vec<String> = prepared.started.iter().map(|s| s.id.clone()).collect();
        if let Ok(image) = &prepared.image
            && let Some(set) = self.set(key)
        {
            set.image = image.clone();
        }
        for started in prepared.started {
            self.event(
                "instance.started",
                format!("instance {} of revision {revision} started", started.id),
                json!({"revision": revision, "instance": started.id}),
            );
            self.add_member(key, started);
        }
        let failure = match (prepared.image, prepared.error) {
            (Err(e), _) | (Ok(_), Some(e)) => Some(StartupFailure {
                revision,
                instance: None,
                cause: e.to_string(),
                logs: Vec::new(),
            }),
            _ => None,
        };
        if let Some(failure) = failure {
            self.startup_failed(purpose, key, ids, failure).await;
            return;
        }
        self.progress(
            &purpose,
            format!("{} instance(s) started, waiting until healthy", ids.len()),
        );
        let waiting: HashSet<String> = ids.into_iter().collect();
        // Instances that became healthy before the phase changed.
        let already: Vec<String> = self
            .set(key)
            .map(|s| {
                s.members
                    .iter()
                    .filter(|m| m.healthy_since.is_some())
                    .map(|m| m.started.id.clone())
                    .collect()
            })
            .unwrap_or_default();
        self.phase = Phase::Starting {
            purpose,
            set: key,
            waiting,
            deadline: Instant::now() + self.shared.settings.startup_deadline,
            since,
        };
        for id in already {
            self.startup_healthy(&id).await;
        }
    }

    /// A starting instance is healthy; the last one ends the phase.
    async fn startup_healthy(&mut self, id: &str) {
        let Phase::Starting { waiting, .. } = &mut self.phase else {
            return;
        };
        if !waiting.remove(id) || !waiting.is_empty() {
            return;
        }
        let Phase::Starting {
            purpose,
            set: key,
            since,
            ..
        } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        match purpose {
            Purpose::Deploy { operation, tx } => self.go_live(key, operation, tx, since),
            Purpose::Resume { reply } => {
                if let Some(set) = self.set(key) {
                    set.pool.set_paused(false);
                }
                self.paused = false;
                // A fresh autoscaler: the demand seen before the pause says nothing now, and
                // the watermark set while paused must go.
                self.scale_for(key);
                self.set_state("active");
                let revision = self.set(key).map(|s| s.revision).unwrap_or(0);
                self.event(
                    "service.resumed",
                    format!("resumed revision {revision} in {:?}", since.elapsed()),
                    json!({"revision": revision, "took_ms": since.elapsed().as_millis() as u64}),
                );
                self.flush().await;
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Switches every hostname to the set in one swap; the previous serving set drains.
    fn switch_to(&mut self, key: u64) {
        let Some(set) = self.sets.iter().find(|s| s.key == key) else {
            return;
        };
        let _ = self.writes.send(Write::Serving {
            service: self.service.clone(),
            revision: set.revision,
        });
        let hosts = set.plan.hosts(&self.service);
        let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let route = set.route.clone();
        self.shared.routes.insert_shared(&host_refs, route);
        let previous: Vec<u64> = self
            .sets
            .iter()
            .filter(|s| s.role == Role::Serving && s.key != key)
            .map(|s| s.key)
            .collect();
        for old in previous {
            let service = self.service.clone();
            let old_hosts = self.set(old).map(|s| s.plan.hosts(&service));
            for host in old_hosts.unwrap_or_default() {
                if !hosts.contains(&host) {
                    self.shared.routes.remove(&host);
                }
            }
            self.drain(old);
        }
        if let Some(set) = self.set(key) {
            set.role = Role::Serving;
        }
        self.scale_for(key);
    }

    fn go_live(
        &mut self,
        key: u64,
        operation: Operation,
        tx: watch::Sender<OperationProgress>,
        since: Instant,
    ) {
        let revision = self.set(key).map(|s| s.revision).unwrap_or(0);
        let was_paused = self.paused;
        // A paused service's set has no instances: retire it.
        if was_paused {
            let old: Vec<u64> = self
                .sets
                .iter()
                .filter(|s| s.role == Role::Serving)
                .map(|s| s.key)
                .collect();
            for k in old {
                self.retire_set(k);
            }
            self.paused = false;
            self.set_state("active");
        }
        self.switch_to(key);
        let took = since.elapsed();
        let purpose = Purpose::Deploy {
            operation: operation.clone(),
            tx,
        };
        self.progress(
            &purpose,
            format!("revision {revision} serving after {took:?}"),
        );
        self.event(
            "deploy.succeeded",
            format!("revision {revision} serving ({})", operation.id),
            json!({"revision": revision, "operation": operation.id, "took_ms": took.as_millis() as u64, "resumed": was_paused}),
        );
        let _ = self.writes.send(Write::Finish {
            operation: operation.id.clone(),
            outcome: OperationOutcome::Succeeded(
                json!({"revision": revision, "took_ms": took.as_millis() as u64}),
            ),
        });
        if let Purpose::Deploy { tx, .. } = purpose {
            let _ = self.writes.send(Write::End {
                tx,
                end: OperationEnd::Succeeded { revision, took },
            });
        }
    }

    /// Ends a failed deploy or resume: stops the new instances, reports why.
    async fn startup_failed(
        &mut self,
        purpose: Purpose,
        key: u64,
        ids: Vec<String>,
        failure: StartupFailure,
    ) {
        // Not the failure's log lines: they may hold a secret (the store writer redacts them).
        tracing::warn!(revision = failure.revision, instance = ?failure.instance, cause = %failure.cause, "startup failed");
        let fields = json!({
            "revision": failure.revision,
            "instance": failure.instance,
            "cause": failure.cause,
            "logs": failure.logs,
        });
        match purpose {
            Purpose::Deploy { operation, tx } => {
                let purpose = Purpose::Deploy {
                    operation: operation.clone(),
                    tx,
                };
                self.progress(&purpose, format!("failed: {failure}"));
                self.event(
                    "deploy.failed",
                    format!("deploy {} failed: {failure}", operation.id),
                    fields.clone(),
                );
                self.retire_set(key);
                let _ = self.writes.send(Write::Finish {
                    operation: operation.id.clone(),
                    outcome: OperationOutcome::Failed(fields),
                });
                if let Purpose::Deploy { tx, .. } = purpose {
                    let _ = self.writes.send(Write::End {
                        tx,
                        end: OperationEnd::Failed(failure),
                    });
                }
            }
            Purpose::Resume { reply } => {
                // Every instance this resume started goes, the healthy ones too: paused means
                // nothing runs.
                let mut gone = ids;
                if let Some(set) = self.set(key) {
                    gone.extend(set.members.iter().map(|m| m.started.id.clone()));
                    gone.sort();
                    gone.dedup();
                    for id in &gone {
                        set.take(id);
                    }
                }
                for id in gone {
                    tokio::spawn(retire(self.shared.clone(), id));
                }
                self.event(
                    "service.resume_failed",
                    format!("resume failed, the service stays paused: {failure}"),
                    fields,
                );
                let _ = reply.send(Err(EngineError::ResumeFailed {
                    service: self.service.clone(),
                    failure,
                }));
            }
        }
    }

    /// Takes a set out of rotation; once its requests are done it stands by (or stops).
    fn drain(&mut self, key: u64) {
        let timeout = self.shared.settings.drain_timeout;
        let tx = self.internal_tx.clone();
        let Some(set) = self.set(key) else { return };
        set.role = Role::Draining;
        let pool = set.pool.clone();
        let revision = set.revision;
        tokio::spawn(async move {
            let deadline = Instant::now() + timeout;
            loop {
                let in_flight: u32 = pool.snapshot().instances.iter().map(|i| i.in_flight).sum();
                if in_flight == 0 || Instant::now() >= deadline {
                    if in_flight > 0 {
                        tracing::warn!(revision, in_flight, "drain timed out");
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = tx.send(Internal::Drained { set: key });
        });
    }

    fn on_drained(&mut self, key: u64) {
        let window = self.shared.settings.rollback_window;
        let Some(set) = self.set(key) else { return };
        if set.role != Role::Draining {
            return;
        }
        let revision = set.revision;
        if window.is_zero() || set.members.is_empty() {
            self.retire_set(key);
            return;
        }
        set.role = Role::Standby {
            until: Instant::now() + window,
        };
        set.health = None;
        // A request still in flight past the drain timeout keeps its CPU: the instance's gate
        // throttles it when that request ends.
        let busy: Vec<String> = set
            .pool
            .snapshot()
            .instances
            .into_iter()
            .filter(|i| i.in_flight > 0)
            .map(|i| i.id)
            .collect();
        for member in set.members.iter().filter(|m| !busy.contains(&m.started.id)) {
            if let Err(e) = member.started.cpu.throttle() {
                tracing::warn!(instance = %member.started.id, error = %e, "cannot throttle a standby instance");
            }
        }
        self.event(
            "revision.standby",
            format!("revision {revision} drained; standing by for {window:?} for a rollback"),
            json!({"revision": revision, "window_s": window.as_secs()}),
        );
        // One revision stands by: the one replaced last.
        let older: Vec<u64> = self
            .sets
            .iter()
            .filter(|s| matches!(s.role, Role::Standby { .. }) && s.key != key)
            .map(|s| s.key)
            .collect();
        for k in older {
            self.retire_set(k);
        }
    }

    async fn rollback(&mut self, revision: Option<u64>) -> Result<RollbackOutcome, EngineError> {
        let current = self.serving().map(|s| s.revision);
        let standby = self
            .sets
            .iter()
            .find(|s| {
                matches!(s.role, Role::Standby { .. } | Role::Draining)
                    && !s.members.is_empty()
                    && revision.is_none_or(|r| r == s.revision)
            })
            .map(|s| s.key);
        if let (Some(key), false) = (standby, self.paused) {
            let started = std::time::Instant::now();
            let service = self.service.clone();
            let set = self
                .set(key)
                .ok_or(EngineError::NoRollbackTarget { service })?;
            for member in &set.members {
                if let Err(e) = member.started.cpu.restore() {
                    tracing::warn!(instance = %member.started.id, error = %e, "cannot restore CPU");
                }
            }
            if set.health.is_none() {
                set.health = Some(HealthChecker::spawn(set.pool.clone()));
            }
            let target = set.revision;
            self.switch_to(key);
            let took = started.elapsed();
            self.event(
                "rollback.switched",
                format!("rolled back to revision {target} in {took:?}"),
                json!({"revision": target, "from": current, "took_us": took.as_micros() as u64}),
            );
            // The switch is measured without it; the caller then reads the store.
            self.flush().await;
            return Ok(RollbackOutcome::Switched {
                revision: target,
                took,
            });
        }
        let target = match revision {
            Some(r) => r,
            None => {
                let service = self.service.clone();
                let revisions = blocking(self.shared.store.clone(), move |s| {
                    s.list_revisions(&service)
                })
                .await
                .map_err(|source| EngineError::Store {
                    service: self.service.clone(),
                    context: "listing revisions".into(),
                    source,
                })?;
                let current = current.ok_or_else(|| EngineError::NoRollbackTarget {
                    service: self.service.clone(),
                })?;
                revisions
                    .iter()
                    .map(|r| r.number)
                    .filter(|n| *n < current)
                    .max()
                    .ok_or_else(|| EngineError::NoRollbackTarget {
                        service: self.service.clone(),
                    })?
            }
        };
        self.event(
            "rollback.deploying",
            format!("revision {target} is not standing by: deploying it"),
            json!({"revision": target, "from": current}),
        );
        Ok(RollbackOutcome::Deploying(self.deploy(target).await?))
    }

    async fn pause(&mut self) -> Result<(), EngineError> {
        let Some(set) = self.sets.iter_mut().find(|s| s.role == Role::Serving) else {
            return Err(EngineError::NotDeployed {
                service: self.service.clone(),
            });
        };
        if self.paused {
            return Ok(());
        }
        set.pool.set_paused(true);
        set.desired = set.desired.max(set.members.len());
        let revision = set.revision;
        let key = set.key;
        let ids: Vec<String> = set.members.iter().map(|m| m.started.id.clone()).collect();
        for id in &ids {
            set.take(id);
        }
        self.restarts.retain(|r| r.set != key);
        self.paused = true;
        let others: Vec<u64> = self
            .sets
            .iter()
            .filter(|s| s.key != key)
            .map(|s| s.key)
            .collect();
        for k in others {
            self.retire_set(k);
        }
        join_all(ids.iter().map(|id| retire(self.shared.clone(), id.clone()))).await;
        self.set_state("paused");
        self.event(
            "service.paused",
            format!("paused; {} instance(s) stopped", ids.len()),
            json!({"revision": revision, "instances": ids}),
        );
        self.flush().await;
        Ok(())
    }

    async fn delete(&mut self) {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let aborted = |reason: &str| OperationEnd::Aborted {
            reason: reason.to_owned(),
        };
        match phase {
            Phase::Idle => {}
            Phase::Preparing {
                purpose, set, task, ..
            } => {
                if let Ok(prepared) = task.await {
                    for started in prepared.started {
                        self.add_member(set, started);
                    }
                }
                self.abort(purpose, aborted("the service was deleted"));
            }
            Phase::Starting { purpose, .. } => {
                self.abort(purpose, aborted("the service was deleted"))
            }
        }
        let mut hosts = Vec::new();
        let mut ids = Vec::new();
        for set in std::mem::take(&mut self.sets) {
            hosts.extend(set.plan.hosts(&self.service));
            set.pool.drain();
            for member in &set.members {
                set.pool.remove_instance(&member.started.id);
                ids.push(member.started.id.clone());
            }
        }
        for host in hosts {
            self.shared.routes.remove(&host);
        }
        join_all(ids.iter().map(|id| retire(self.shared.clone(), id.clone()))).await;
        self.event(
            "service.deleted",
            format!("deleted; {} instance(s) stopped", ids.len()),
            json!({"instances": ids}),
        );
        self.flush().await;
    }

    /// Waits until the store has every write sent so far (before answering a caller who may
    /// read the store next).
    async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        let _ = self.writes.send(Write::Flush(done));
        let _ = flushed.await;
    }

    fn abort(&self, purpose: Purpose, end: OperationEnd) {
        match purpose {
            Purpose::Deploy { operation, tx } => {
                let reason = match &end {
                    OperationEnd::Aborted { reason } => reason.clone(),
                    other => format!("{other:?}"),
                };
                let _ = self.writes.send(Write::Finish {
                    operation: operation.id.clone(),
                    outcome: OperationOutcome::Failed(json!({"message": reason})),
                });
                let _ = self.writes.send(Write::End { tx, end });
            }
            Purpose::Resume { reply } => {
                let _ = reply.send(Err(EngineError::Stopped {
                    service: self.service.clone(),
                }));
            }
        }
    }

    fn status(&self) -> ServiceStatus {
        let starting = match &self.phase {
            Phase::Preparing { set, .. } | Phase::Starting { set, .. } => Some(*set),
            Phase::Idle => None,
        };
        let operation = match &self.phase {
            Phase::Idle => None,
            Phase::Preparing { purpose, .. } | Phase::Starting { purpose, .. } => {
                Some(match purpose {
                    Purpose::Deploy { operation, .. } => operation.id.clone(),
                    Purpose::Resume { .. } => "resume".into(),
                })
            }
        };
        let mut instances = Vec::new();
        for set in &self.sets {
            let snapshot = set.pool.snapshot();
            for member in &set.members {
                let in_rotation = snapshot
                    .instances
                    .iter()
                    .find(|i| i.id == member.started.id)
                    .is_some_and(|i| i.in_rotation());
                let state = match set.role {
                    Role::Draining => InstanceState::Draining,
                    Role::Standby { .. } => InstanceState::Standby,
                    _ if in_rotation => InstanceState::Healthy,
                    _ if member.healthy_since.is_none() || Some(set.key) == starting => {
                        InstanceState::Starting
                    }
                    _ => InstanceState::Unhealthy,
                };
                instances.push(InstanceStatus {
                    id: member.started.id.clone(),
                    revision: set.revision,
                    state,
                });
            }
        }
        let serving = self.serving();
        ServiceStatus {
            service: self.service.clone(),
            serving: serving.map(|s| s.revision),
            paused: self.paused,
            operation,
            instances,
            restarts: serving.map_or(0, |s| s.restarts),
        }
    }

    async fn adopt(
        &mut self,
        instances: Vec<RecoveredInstance>,
        serving: u64,
    ) -> Result<(), EngineError> {
        let mut revisions: Vec<u64> = instances.iter().map(|i| i.revision).collect();
        revisions.sort_unstable();
        revisions.dedup();
        // The serving revision last, so that it ends up serving.
        revisions.retain(|r| *r != serving);
        revisions.push(serving);
        let mut instances = instances;
        for revision in revisions {
            let plan = match self.plan(revision).await {
                Ok(plan) => Arc::new(plan),
                Err(e) => {
                    tracing::warn!(revision, error = %e, "cannot adopt instances of this revision: stopping them");
                    for instance in instances.iter().filter(|i| i.revision == revision) {
                        tokio::spawn(retire(self.shared.clone(), instance.instance.id.clone()));
                    }
                    continue;
                }
            };
            let key = self.new_set(revision, plan.clone(), Role::Starting);
            let (mine, rest): (Vec<_>, Vec<_>) =
                instances.into_iter().partition(|i| i.revision == revision);
            instances = rest;
            let ids: Vec<String> = mine.iter().map(|i| i.instance.id.clone()).collect();
            for instance in mine {
                // A daemon that died left it as its gate had it, perhaps throttled; the new gate
                // starts from "restored", so make that true before anything counts on it.
                if let Err(e) = instance.instance.cpu.restore() {
                    tracing::warn!(instance = %instance.instance.id, error = %e, "cannot restore CPU");
                }
                // The host counted it with no memory (it did not know the plan): now it does.
                if let Some(scaling) = self.shared.scaling.get() {
                    scaling
                        .budget()
                        .adopt(&instance.instance.id, plan.limits.memory_bytes.unwrap_or(0));
                }
                self.add_member(key, instance.instance);
            }
            self.event(
                "instance.adopted",
                format!(
                    "adopted {} running instance(s) of revision {revision}",
                    ids.len()
                ),
                json!({"revision": revision, "instances": ids}),
            );
            if revision == serving {
                let desired = ids.len().max(plan.min_instances as usize).max(1);
                if let Some(set) = self.set(key) {
                    set.desired = desired;
                }
                self.switch_to(key);
                let now = Instant::now();
                for _ in ids.len()..desired {
                    self.restarts.push(PendingRestart {
                        at: now,
                        set: key,
                        cause: "replacing an instance that died while the daemon was down".into(),
                    });
                }
            } else {
                if let Some(set) = self.set(key) {
                    set.role = Role::Draining;
                }
                self.on_drained(key);
            }
        }
        Ok(())
    }

    // Internal messages and timers.

    async fn internal(&mut self, message: Internal) {
        match message {
            Internal::Exited { id, exit } => self.exited(&id, exit).await,
            Internal::Drained { set } => self.on_drained(set),
            Internal::Restarted { set, cause, result } => self.restarted(set, cause, result),
            Internal::ScaledOut { set, result } => self.scaled_out(set, result),
        }
    }

    async fn exited(&mut self, id: &str, exit: ExitInfo) {
        let starting = match &self.phase {
            Phase::Starting { set, waiting, .. } if waiting.contains(id) => Some(*set),
            _ => None,
        };
        if let Some(key) = starting {
            let revision = self.set(key).map(|s| s.revision).unwrap_or(0);
            let logs = self
                .shared
                .host
                .log_tail(id, self.shared.settings.log_lines)
                .await
                .unwrap_or_default();
            let Phase::Starting {
                purpose, waiting, ..
            } = std::mem::replace(&mut self.phase, Phase::Idle)
            else {
                return;
            };
            let failure = StartupFailure {
                revision,
                instance: Some(id.to_owned()),
                cause: format!("{exit} before it was healthy"),
                logs,
            };
            self.startup_failed(purpose, key, waiting.into_iter().collect(), failure)
                .await;
            return;
        }
        let Some(set) = self.find_member(id) else {
            return;
        };
        let key = set.key;
        let role = set.role;
        let revision = set.revision;
        let member = set.take(id);
        tokio::spawn({
            let shared = self.shared.clone();
            let id = id.to_owned();
            async move {
                let _ = shared.host.remove(&id).await;
            }
        });
        let cause = match exit.oom_killed {
            true => "out of memory".to_owned(),
            false => exit.to_string(),
        };
        self.event(
            "instance.exited",
            format!("instance {id} {exit}"),
            json!({"revision": revision, "instance": id, "code": exit.code, "signal": exit.signal, "oom_killed": exit.oom_killed}),
        );
        if role == Role::Serving && !self.paused {
            self.schedule_restart(key, member, format!("instance {id} {cause}"));
        }
    }

    fn schedule_restart(&mut self, key: u64, member: Option<Member>, cause: String) {
        let settings = self.shared.settings.clone();
        let Some(set) = self.set(key) else { return };
        if member
            .and_then(|m| m.healthy_since)
            .is_some_and(|since| since.elapsed() >= settings.restart_backoff_reset)
        {
            set.next_backoff = settings.restart_backoff;
        }
        let delay = set.next_backoff;
        set.next_backoff = (delay * 2).min(settings.restart_backoff_max);
        let revision = set.revision;
        self.restarts.push(PendingRestart {
            at: Instant::now() + delay,
            set: key,
            cause: cause.clone(),
        });
        self.event(
            "instance.restart_scheduled",
            format!("restarting an instance of revision {revision} in {delay:?}: {cause}"),
            json!({"revision": revision, "delay_ms": delay.as_millis() as u64, "cause": cause}),
        );
    }

    fn restarted(&mut self, key: u64, cause: String, result: Result<Started, HostError>) {
        let active = self.set(key).is_some_and(|s| s.role == Role::Serving);
        match result {
            Ok(started) if active && !self.paused => {
                let Some(set) = self.set(key) else { return };
                set.restarts += 1;
                let (revision, restarts) = (set.revision, set.restarts);
                self.event(
                    "instance.restarted",
                    format!("instance {} of revision {revision} started: {cause}", started.id),
                    json!({"revision": revision, "instance": started.id, "cause": cause, "restarts": restarts}),
                );
                self.add_member(key, started);
            }
            Ok(started) => {
                tokio::spawn(retire(self.shared.clone(), started.id));
            }
            Err(e) => {
                self.event(
                    "instance.restart_failed",
                    format!("restart failed: {e}"),
                    json!({"cause": cause, "error": e.to_string()}),
                );
                if active {
                    self.schedule_restart(key, None, format!("restart failed: {e}"));
                }
            }
        }
    }

    async fn timers(&mut self) {
        let now = Instant::now();
        // Restarts due.
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.restarts)
            .into_iter()
            .partition(|r| r.at <= now);
        self.restarts = later;
        for restart in due {
            let Some(set) = self.sets.iter().find(|s| s.key == restart.set) else {
                continue;
            };
            let request = start_request(&self.service, set.revision, &set.plan, &set.image);
            let shared = self.shared.clone();
            let tx = self.internal_tx.clone();
            let (key, cause) = (restart.set, restart.cause);
            tokio::spawn(async move {
                let result = shared.host.start(request).await;
                let _ = tx.send(Internal::Restarted {
                    set: key,
                    cause,
                    result,
                });
            });
        }
        // Startup deadline.
        if let Phase::Starting {
            deadline,
            set,
            waiting,
            ..
        } = &self.phase
            && *deadline <= now
        {
            let key = *set;
            let late: Vec<String> = waiting.iter().cloned().collect();
            let probe = self.set(key).and_then(|s| {
                let id = late.first()?;
                let member = s.members.iter().find(|m| &m.started.id == id)?;
                Some((member.started.addr, s.plan.proxy.clone(), s.revision))
            });
            let (result, revision) = match probe {
                Some((addr, config, revision)) => (
                    match lull_proxy::health::probe(addr, &config).await {
                        Ok(ok) => format!("{ok} (too late)"),
                        Err(e) => e.to_string(),
                    },
                    revision,
                ),
                None => ("no instance".into(), 0),
            };
            let instance = late.first().cloned();
            let logs = match &instance {
                Some(id) => self
                    .shared
                    .host
                    .log_tail(id, self.shared.settings.log_lines)
                    .await
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            let Phase::Starting {
                purpose, waiting, ..
            } = std::mem::replace(&mut self.phase, Phase::Idle)
            else {
                return;
            };
            let failure = StartupFailure {
                revision,
                instance,
                cause: format!(
                    "not healthy {:?} after it started: {result}",
                    self.shared.settings.startup_deadline
                ),
                logs,
            };
            self.startup_failed(purpose, key, waiting.into_iter().collect(), failure)
                .await;
        }
        // Rollback windows that ended.
        let expired: Vec<u64> = self
            .sets
            .iter()
            .filter(|s| matches!(s.role, Role::Standby { until } if until <= now))
            .map(|s| s.key)
            .collect();
        for key in expired {
            self.retire_set(key);
        }
        self.scale_sample(now);
    }

    async fn pool_event(&mut self, event: PoolEvent) {
        if let PoolEvent::Demand { demand, .. } = event {
            self.on_demand(demand);
            return;
        }
        let PoolEvent::Health {
            instance,
            healthy,
            reason,
            ..
        } = event
        else {
            return;
        };
        let Some(set) = self.find_member(&instance) else {
            return;
        };
        let (key, role, revision) = (set.key, set.role, set.revision);
        if healthy {
            if let Some(member) = set.member(&instance) {
                member.healthy_since.get_or_insert_with(Instant::now);
            }
            self.scale_healthy(key, &instance);
            self.event(
                "instance.healthy",
                format!("instance {instance} healthy: {reason}"),
                json!({"revision": revision, "instance": instance, "reason": reason}),
            );
            if matches!(&self.phase, Phase::Starting { set, .. } if *set == key) {
                self.startup_healthy(&instance).await;
            }
            return;
        }
        self.event(
            "instance.unhealthy",
            format!("instance {instance} unhealthy: {reason}"),
            json!({"revision": revision, "instance": instance, "reason": reason}),
        );
        // A starting instance has until the startup deadline; a serving one is replaced.
        if role != Role::Serving || self.paused {
            return;
        }
        let Some(set) = self.set(key) else { return };
        let member = set.take(&instance);
        tokio::spawn(retire(self.shared.clone(), instance.clone()));
        self.schedule_restart(
            key,
            member,
            format!("instance {instance} failed its health check: {reason}"),
        );
    }
}

// Handover to another daemon process (see `Engine::detach`).
impl Actor {
    /// Lets go of the service without stopping anything: pending restarts are dropped, health
    /// checks stop, every pool's gates restore their CPU and never throttle again (the
    /// successor owns the CPU now), and the store has every write before this returns. A
    /// start in progress finishes off the actor; its operation is left to the successor to
    /// mark failed.
    async fn detach(&mut self) {
        if !matches!(self.phase, Phase::Idle) {
            tracing::warn!(service = %self.service, "handing over during an operation: the next daemon marks it failed");
        }
        self.restarts.clear();
        for set in &mut self.sets {
            set.health = None;
            set.pool.drain();
        }
        self.flush().await;
        tracing::info!(service = %self.service, "supervisor detached: instances left running");
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn start_request(service: &str, revision: u64, plan: &RevisionPlan, image: &str) -> StartRequest {
    StartRequest {
        service: service.to_owned(),
        revision,
        id: instance_id(service, revision),
        image: image.to_owned(),
        command: plan.command.clone(),
        args: plan.args.clone(),
        env: plan.instance_env(),
        port: plan.port,
        limits: plan.limits,
        volumes: plan.volumes.clone(),
        secret_files: plan.secret_files.clone(),
    }
}
