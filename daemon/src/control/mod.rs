//! What the admin API does: services created, updated (each change a revision), deployed,
//! rolled back, paused, resumed and deleted, through the store (what is wanted) and the
//! engine (what runs). Every answer is an [`ApiError`] or a JSON-ready view.

pub mod build;
pub mod domains;
pub mod exec;
pub mod git;
pub mod handlers;
pub mod planner;
pub mod secrets;

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use crate::api::{ApiError, ErrorCode, FieldError};
use crate::engine::{
    Engine, EngineError, InstanceState, Operation, OperationEnd, RollbackOutcome, ServiceStatus,
};
use crate::spec::{self, Revision, ServiceSpec, ServiceUpdate, SpecErrors};
use crate::store::{
    EventRecord, NewEvent, NewService, OperationRecord, RevisionCommit, RevisionRecord,
    ServiceRecord, Store, StoreError,
};

pub const ACTIVE: &str = "active";
pub const PAUSED: &str = "paused";

/// The control plane's state, shared by the API's handlers.
pub struct Control {
    pub store: Arc<dyn Store>,
    pub engine: Engine,
    pub base_domain: Option<String>,
    /// The proxy's HTTP port, for the URLs shown to users (`None`: not listening).
    pub http_port: Option<u16>,
    /// Seals and opens secrets; without it secrets cannot be set.
    pub key: Option<Arc<crate::secrets::SecretKey>>,
    /// Source builds; `None` where the daemon cannot build (no runtime).
    pub builds: Option<Arc<build::Builds>>,
    /// Certificates and domains; `None` without an HTTPS listener.
    pub tls: Option<Arc<domains::TlsControl>>,
}

/// A service as `GET /v1/services/{name}` shows it.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub name: String,
    pub state: String,
    pub revision: Option<u64>,
    pub urls: Vec<String>,
    pub spec: Value,
    pub created_at: String,
    pub updated_at: String,
    pub status: Option<StatusView>,
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub serving: Option<u64>,
    pub paused: bool,
    pub operation: Option<String>,
    pub restarts: u32,
    pub instances: Vec<InstanceView>,
}

#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub id: String,
    pub revision: u64,
    pub state: &'static str,
}

/// What a call that starts a deploy answers.
#[derive(Debug, Serialize)]
pub struct Started {
    pub service: String,
    pub revision: u64,
    pub operation: Option<String>,
    /// Why nothing was deployed, when nothing was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub fn spec_errors(errors: SpecErrors) -> ApiError {
    ApiError::invalid(
        errors
            .0
            .into_iter()
            .map(|e| FieldError {
                field: e.path,
                message: e.message,
            })
            .collect(),
    )
}

fn store_error(e: StoreError) -> ApiError {
    match &e {
        StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
        StoreError::AlreadyExists { .. } => ApiError::new(ErrorCode::AlreadyExists, e.to_string()),
        StoreError::Conflict { .. } => ApiError::new(
            ErrorCode::Conflict,
            format!("{e}; it changed meanwhile, try again"),
        ),
        _ => ApiError::internal(format!("state store: {e}")),
    }
}

pub fn engine_error(e: EngineError) -> ApiError {
    let code = match &e {
        EngineError::UnknownService { .. } => ErrorCode::Conflict,
        EngineError::Busy { .. } => ErrorCode::Busy,
        EngineError::Plan { .. } => ErrorCode::InvalidRequest,
        EngineError::NoRollbackTarget { .. }
        | EngineError::NotDeployed { .. }
        | EngineError::NotPaused { .. }
        | EngineError::ResumeFailed { .. } => ErrorCode::Conflict,
        EngineError::Store { .. } | EngineError::Stopped { .. } => ErrorCode::Internal,
        EngineError::Host { .. } => ErrorCode::Unavailable,
    };
    ApiError::new(code, e.to_string())
}

fn state_name(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Starting => "starting",
        InstanceState::Healthy => "healthy",
        InstanceState::Unhealthy => "unhealthy",
        InstanceState::Draining => "draining",
        InstanceState::Standby => "standby",
    }
}

fn status_view(s: ServiceStatus) -> StatusView {
    StatusView {
        serving: s.serving,
        paused: s.paused,
        operation: s.operation,
        restarts: s.restarts,
        instances: s
            .instances
            .into_iter()
            .map(|i| InstanceView {
                id: i.id,
                revision: i.revision,
                state: state_name(i.state),
            })
            .collect(),
    }
}

/// A log line's time, for ordering lines of several instances (their texts may differ in
/// precision).
fn log_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// The JSON form of an operation's end.
pub fn end_json(end: &OperationEnd) -> Value {
    match end {
        OperationEnd::Succeeded { revision, took } => json!({
            "state": "succeeded",
            "revision": revision,
            "took_ms": took.as_millis() as u64,
        }),
        OperationEnd::Failed(failure) => json!({
            "state": "failed",
            "revision": failure.revision,
            "instance": failure.instance,
            "cause": failure.cause,
            "logs": failure.logs,
            "message": failure.to_string(),
        }),
        OperationEnd::Aborted { reason } => json!({ "state": "aborted", "message": reason }),
        OperationEnd::BuildFailed { reason } => {
            json!({ "state": "build_failed", "message": reason })
        }
    }
}

impl Control {
    /// Runs a store call off the async threads (SQLite waits for fsync).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| ApiError::internal(format!("store task: {e}")))?
            .map_err(store_error)
    }

    fn urls(&self, spec: &ServiceSpec) -> Vec<String> {
        let Some(port) = self.http_port else {
            return Vec::new();
        };
        let suffix = if port == 80 {
            String::new()
        } else {
            format!(":{port}")
        };
        spec.hostnames(self.base_domain.as_deref())
            .into_iter()
            .map(|h| format!("http://{h}{suffix}/"))
            .collect()
    }

    fn current_spec(record: &ServiceRecord) -> Result<ServiceSpec, ApiError> {
        serde_json::from_value(record.doc.clone()).map_err(|e| {
            ApiError::internal(format!(
                "service {}: its stored definition does not read back: {e}",
                record.name
            ))
        })
    }

    async fn view(&self, record: ServiceRecord) -> Result<ServiceView, ApiError> {
        let spec = Self::current_spec(&record)?;
        let status = self.engine.status(&record.name).await.ok().map(status_view);
        Ok(ServiceView {
            urls: self.urls(&spec),
            name: record.name,
            state: record.state,
            revision: record.current_revision,
            spec: spec.to_json(),
            created_at: record.created_at.to_string(),
            updated_at: record.updated_at.to_string(),
            status,
        })
    }

    pub async fn list(&self) -> Result<Vec<ServiceView>, ApiError> {
        let records = self.blocking(|s| s.list_services()).await?;
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            out.push(self.view(record).await?);
        }
        Ok(out)
    }

    pub async fn get(&self, name: &str) -> Result<ServiceView, ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        self.view(record).await
    }

    /// Refuses hostnames another service answers on: one host, one service.
    async fn check_hostnames(&self, spec: &ServiceSpec) -> Result<(), ApiError> {
        let mine = spec.hostnames(self.base_domain.as_deref());
        let name = spec.name.clone();
        let others = self
            .blocking(move |s| {
                s.list_services().map(|all| {
                    all.into_iter()
                        .filter(|r| r.name != name)
                        .collect::<Vec<_>>()
                })
            })
            .await?;
        let mut fields = Vec::new();
        for other in others {
            let Ok(theirs) = Self::current_spec(&other) else {
                continue;
            };
            for host in theirs.hostnames(self.base_domain.as_deref()) {
                if mine.contains(&host) {
                    fields.push(FieldError {
                        field: "hostnames".into(),
                        message: format!("{host} is service {}'s", other.name),
                    });
                }
            }
        }
        if fields.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(fields))
        }
    }

    /// Creates a service from its JSON form (revision 1) and starts deploying it.
    pub async fn create(&self, body: Value) -> Result<Started, ApiError> {
        let update = ServiceUpdate::from_value(body).map_err(spec_errors)?;
        let spec = ServiceSpec::from_update(&update).map_err(spec_errors)?;
        self.check_hostnames(&spec).await?;
        let revision = Revision::first(spec.clone(), chrono::Utc::now());
        let name = spec.name.clone();
        let doc = spec.to_json();
        let record = {
            let name = name.clone();
            let doc = doc.clone();
            self.blocking(move |s| {
                s.create_service(&NewService {
                    name,
                    state: ACTIVE.into(),
                    doc,
                })
            })
            .await?
        };
        let committed = self
            .commit(&record, doc, revision.cause.clone(), "service.created")
            .await?;
        self.deploy_revision(&name, committed.number).await
    }

    async fn commit(
        &self,
        record: &ServiceRecord,
        doc: Value,
        cause: String,
        kind: &str,
    ) -> Result<RevisionRecord, ApiError> {
        // The revision becomes current (and the service's document) when it serves: the engine
        // records that. Until then what serves stays current, so a daemon restart mid-deploy
        // adopts it, and a failed deploy leaves nothing to undo.
        let commit = RevisionCommit {
            service: record.name.clone(),
            expected_generation: Some(record.generation),
            doc,
            cause: cause.clone(),
            service_doc: None,
            state: None,
            make_current: false,
            event: Some(NewEvent {
                service: record.name.clone(),
                kind: kind.to_owned(),
                message: format!("new revision: {cause}"),
                fields: json!({ "cause": cause }),
            }),
        };
        let committed = self.blocking(move |s| s.commit_revision(&commit)).await?;
        Ok(committed.revision)
    }

    async fn deploy_revision(&self, name: &str, revision: u64) -> Result<Started, ApiError> {
        let op = self
            .engine
            .deploy(name, revision)
            .await
            .map_err(engine_error)?;
        Ok(Started {
            service: name.to_owned(),
            revision,
            operation: Some(op.id),
            note: None,
        })
    }

    /// Applies a partial update; a change makes a revision and deploys it.
    pub async fn update(&self, name: &str, body: Value) -> Result<Started, ApiError> {
        let update = ServiceUpdate::from_value(body).map_err(spec_errors)?;
        if let Some(new_name) = &update.name
            && new_name != name
        {
            return Err(ApiError::invalid(vec![FieldError {
                field: "name".into(),
                message: format!(
                    "a service cannot be renamed ({name} → {new_name}); create a new one"
                ),
            }]));
        }
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        if record.state == PAUSED {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("service {name} is paused: resume it, then update it"),
            ));
        }
        if let Ok(status) = self.engine.status(name).await
            && let Some(operation) = status.operation
        {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "service {name} is busy with {operation}; update it when that has finished (`lull events {name}`)"
                ),
            ));
        }
        let current = Self::current_spec(&record)?;
        let spec = current.updated(&update).map_err(spec_errors)?;
        let changes = spec::changes(&current, &spec);
        if !changes.is_empty() {
            self.check_hostnames(&spec).await?;
        }
        if changes.is_empty() {
            return Ok(Started {
                service: name.to_owned(),
                revision: record.current_revision.unwrap_or(0),
                operation: None,
                note: Some("nothing changed: no new revision".into()),
            });
        }
        let committed = self
            .commit(
                &record,
                spec.to_json(),
                changes.join(", "),
                "service.updated",
            )
            .await?;
        self.deploy_revision(name, committed.number).await
    }

    /// Deploys the current revision again (e.g. after a new push of a mutable tag).
    pub async fn redeploy(&self, name: &str) -> Result<Started, ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        let revision = record.current_revision.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                format!("service {name} has no revision"),
            )
        })?;
        if record.state == PAUSED {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("service {name} is paused: resume it to deploy"),
            ));
        }
        let (rebased, note) = self.rebase_current(name, revision).await?;
        let mut started = self
            .deploy_revision(name, rebased.unwrap_or(revision))
            .await?;
        started.note = note;
        Ok(started)
    }

    pub async fn rollback(&self, name: &str, revision: Option<u64>) -> Result<Value, ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        if let Some(rev) = revision {
            let owned = name.to_owned();
            self.blocking(move |s| s.get_revision(&owned, rev)).await?;
        }
        let outcome = match self.engine.rollback(name, revision).await {
            Ok(o) => o,
            // Not running here (e.g. after a restart with nothing adopted): deploy it.
            Err(EngineError::UnknownService { .. }) => {
                let target = revision
                    .or_else(|| record.current_revision.map(|r| r.saturating_sub(1)))
                    .filter(|r| *r > 0)
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::Conflict,
                            format!("service {name} has no revision to roll back to"),
                        )
                    })?;
                let started = self.deploy_revision(name, target).await?;
                return Ok(
                    json!({ "mode": "deploy", "revision": target, "operation": started.operation }),
                );
            }
            Err(e) => return Err(engine_error(e)),
        };
        Ok(match outcome {
            RollbackOutcome::Switched { revision, took } => json!({
                "mode": "switch",
                "revision": revision,
                "took_ms": took.as_secs_f64() * 1e3,
            }),
            RollbackOutcome::Deploying(op) => json!({
                "mode": "deploy",
                "operation": op.id,
            }),
        })
    }

    /// Records the service's state; idempotent, and retried when the engine's own record of
    /// the same change got there first.
    async fn set_state(&self, name: &str, state: &'static str) -> Result<(), ApiError> {
        let owned = name.to_owned();
        self.blocking(move |s| {
            let mut attempts = 0;
            loop {
                let mut record = s.get_service(&owned)?;
                if record.state == state {
                    return Ok(());
                }
                let generation = record.generation;
                record.state = state.to_owned();
                match s.put_service(&record, generation) {
                    Err(StoreError::Conflict { .. }) if attempts < 5 => attempts += 1,
                    other => return other.map(drop),
                }
            }
        })
        .await
    }

    async fn event(&self, name: &str, kind: &str, message: String) {
        let event = NewEvent {
            service: name.to_owned(),
            kind: kind.to_owned(),
            message,
            fields: json!({}),
        };
        if let Err(e) = self.blocking(move |s| s.append_event(&event)).await {
            tracing::warn!(service = name, "record event: {}", e.message);
        }
    }

    pub async fn pause(&self, name: &str) -> Result<(), ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        match self.engine.pause(name).await {
            Ok(()) => {}
            // Nothing of it runs here: pausing is recording it.
            Err(EngineError::UnknownService { .. }) if record.state != PAUSED => {}
            Err(EngineError::UnknownService { .. }) => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("service {name} is already paused"),
                ));
            }
            Err(e) => return Err(engine_error(e)),
        }
        self.set_state(name, PAUSED).await
    }

    pub async fn resume(&self, name: &str) -> Result<Value, ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        match self.engine.resume(name).await {
            // The revision that served before the pause serves again.
            Ok(()) => {
                self.set_state(name, ACTIVE).await?;
                let serving = self.engine.status(name).await.ok().and_then(|s| s.serving);
                // A secret that changed while it was paused made a revision (the only way one
                // is made while paused): deploy it now.
                let owned = name.to_owned();
                let (newest, paused_at) = self
                    .blocking(move |s| {
                        let newest = s.list_revisions(&owned)?.pop();
                        let paused_at = s
                            .list_events(&owned, 0, usize::MAX)?
                            .into_iter()
                            .rev()
                            .find(|e| e.kind == "service.paused")
                            .map(|e| e.time);
                        Ok((newest, paused_at))
                    })
                    .await?;
                if let (Some(newest), Some(paused_at), Some(serving)) = (newest, paused_at, serving)
                    && newest.number != serving
                    && newest.created_at > paused_at
                {
                    let newest = newest.number;
                    let started = self.deploy_revision(name, newest).await?;
                    return Ok(json!({
                        "resumed": true,
                        "revision": newest,
                        "operation": started.operation,
                    }));
                }
                Ok(json!({ "resumed": true, "revision": serving }))
            }
            Err(EngineError::UnknownService { .. }) if record.state != PAUSED => Err(
                ApiError::new(ErrorCode::Conflict, format!("service {name} is not paused")),
            ),
            // Nothing of it runs here (the daemon restarted while it was paused): deploy the
            // revision that served last.
            Err(EngineError::UnknownService { .. }) => {
                let revision = self.last_served(&record).await?;
                self.set_state(name, ACTIVE).await?;
                let started = self.deploy_revision(name, revision).await?;
                Ok(json!({ "resumed": true, "revision": revision, "operation": started.operation }))
            }
            Err(e) => Err(engine_error(e)),
        }
    }

    /// At startup, after the engine adopted what still runs: deploys the last served revision
    /// of every active service that has nothing running (after a reboot, say). Returns the
    /// services started, with their operation ids.
    pub async fn start_services(&self) -> Result<Vec<(String, Started)>, ApiError> {
        let running = self.engine.services();
        let records = self.blocking(|s| s.list_services()).await?;
        let mut started = Vec::new();
        for record in records {
            if running.contains(&record.name) {
                continue;
            }
            if record.state == PAUSED {
                // Paused stays paused, answering 503 rather than 404.
                if let Some(revision) = record.current_revision
                    && let Err(e) = self.engine.hold_paused(&record.name, revision).await
                {
                    tracing::warn!(service = %record.name, "cannot hold it paused: {e}");
                }
                continue;
            }
            if record.state != ACTIVE {
                continue;
            }
            let revision = match self.last_served(&record).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(service = %record.name, "not started: {}", e.message);
                    continue;
                }
            };
            match self.deploy_revision(&record.name, revision).await {
                Ok(s) => started.push((record.name.clone(), s)),
                Err(e) => tracing::warn!(service = %record.name, "not started: {}", e.message),
            }
        }
        Ok(started)
    }

    /// The revision that served last (the current one), else the newest (a service whose
    /// first deploy failed).
    async fn last_served(&self, record: &ServiceRecord) -> Result<u64, ApiError> {
        if let Some(current) = record.current_revision {
            return Ok(current);
        }
        let owned = record.name.clone();
        let revisions = self.blocking(move |s| s.list_revisions(&owned)).await?;
        revisions.last().map(|r| r.number).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                format!("service {} has no revision to run", record.name),
            )
        })
    }

    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        let owned = name.to_owned();
        self.blocking(move |s| s.get_service(&owned)).await?;
        match self.engine.delete(name).await {
            Ok(()) | Err(EngineError::UnknownService { .. }) => {}
            Err(e) => return Err(engine_error(e)),
        }
        let owned = name.to_owned();
        self.blocking(move |s| s.delete_service(&owned, None))
            .await?;
        self.event(
            name,
            "service.deleted",
            format!("service {name} deleted: instances stopped, routes removed"),
        )
        .await;
        // Its app logs go last, after the event that ends its history.
        if let Err(e) = self.engine.host().forget_logs(name).await {
            tracing::warn!(service = name, "remove the retained logs: {e}");
        }
        Ok(())
    }

    pub async fn revisions(&self, name: &str) -> Result<Vec<Value>, ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        let owned = name.to_owned();
        let revisions = self.blocking(move |s| s.list_revisions(&owned)).await?;
        let serving = self.engine.status(name).await.ok().and_then(|s| s.serving);
        Ok(revisions
            .into_iter()
            .map(|r| {
                let image = r
                    .doc
                    .pointer("/source/reference")
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({
                    "number": r.number,
                    "created_at": r.created_at.to_string(),
                    "cause": r.cause,
                    "image": image,
                    "current": record.current_revision == Some(r.number),
                    "serving": serving == Some(r.number),
                })
            })
            .collect())
    }

    pub async fn export(&self, name: &str) -> Result<String, ApiError> {
        let owned = name.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        Ok(spec::export(&Self::current_spec(&record)?))
    }

    pub async fn events(
        &self,
        name: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, ApiError> {
        let owned = name.to_owned();
        let mut events = self
            .blocking(move |s| s.list_events(&owned, since, limit))
            .await?;
        let redactor = self.redactor().await;
        if !redactor.is_empty() {
            for event in &mut events {
                event.message = redactor.redact(&event.message).into_owned();
                secrets::redact_json(&redactor, &mut event.fields);
            }
        }
        Ok(events)
    }

    pub async fn operation(&self, id: &str) -> Result<OperationRecord, ApiError> {
        let owned = id.to_owned();
        let mut record = self.blocking(move |s| s.get_operation(&owned)).await?;
        let redactor = self.redactor().await;
        if !redactor.is_empty() {
            for p in &mut record.progress {
                p.line = redactor.redact(&p.line).into_owned();
            }
            for v in [&mut record.result, &mut record.error]
                .into_iter()
                .flatten()
            {
                secrets::redact_json(&redactor, v);
            }
        }
        Ok(record)
    }

    /// The service's instances whose logs are kept: removed ones (oldest first), then those
    /// the engine still holds; or only `instance`.
    async fn log_instances(
        &self,
        name: &str,
        instance: Option<&str>,
    ) -> Result<Vec<String>, ApiError> {
        let live: Vec<String> = match self.engine.status(name).await {
            Ok(s) => s.instances.into_iter().map(|i| i.id).collect(),
            Err(EngineError::UnknownService { .. }) => {
                let owned = name.to_owned();
                self.blocking(move |s| s.get_service(&owned)).await?;
                Vec::new()
            }
            Err(e) => return Err(engine_error(e)),
        };
        let mut ids = match self.engine.host().retained_logs(name).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(service = name, "list retained logs: {e}");
                Vec::new()
            }
        };
        for id in live {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        match instance {
            None => Ok(ids),
            Some(id) if ids.iter().any(|i| i == id) => Ok(vec![id.to_owned()]),
            Some(id) => Err(ApiError::not_found(format!(
                "service {name} has no instance {id}, running or with logs kept (instances: {})",
                if ids.is_empty() {
                    "none".to_owned()
                } else {
                    ids.join(", ")
                }
            ))),
        }
    }

    /// The output of the service's instances after `since` (RFC 3339), live and removed ones
    /// (whose logs the host keeps) merged oldest first, each line with its instance.
    pub async fn logs(
        &self,
        name: &str,
        since: Option<&str>,
        instance: Option<&str>,
    ) -> Result<Vec<Value>, ApiError> {
        let since = since.map(|s| (log_time(s), s));
        let mut lines = Vec::new();
        let redactor = self.redactor().await;
        for id in self.log_instances(name, instance).await? {
            let host_lines = match self.engine.host().logs(&id).await {
                Ok(l) => l,
                // Removed meanwhile, and its logs not kept.
                Err(crate::host::HostError::NotFound { .. }) => continue,
                Err(e) => return Err(ApiError::internal(e.to_string())),
            };
            for line in host_lines {
                let at = log_time(&line.time);
                let after = match (&since, at) {
                    (None, _) => true,
                    (Some((Some(since), _)), Some(at)) => at > *since,
                    (Some((_, since)), _) => line.time.as_str() > *since,
                };
                if !after {
                    continue;
                }
                lines.push((
                    at,
                    line.time.clone(),
                    json!({
                        "time": line.time,
                        "instance": id,
                        "stream": line.stream,
                        "text": redactor.redact(&line.text),
                    }),
                ));
            }
        }
        // Stable: lines of one instance at the same time keep their order.
        lines.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok(lines.into_iter().map(|(_, _, v)| v).collect())
    }

    /// The service's access log file, when the daemon keeps one.
    pub fn access_log_path(&self, name: &str) -> Option<std::path::PathBuf> {
        self.engine.access_logs().map(|l| l.path(name))
    }

    /// The live handle of a running (or recently ended) operation.
    pub fn live_operation(&self, id: &str) -> Option<Operation> {
        self.engine.operation(id)
    }
}
