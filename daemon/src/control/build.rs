//! Source builds through the admin API: an upload (a tar the CLI packed from a folder, or a
//! user's tarball) or a git repository becomes a source tree; its apprunner.yaml (or one given
//! with the request) becomes a plan; the builder makes the image; the service's new revision
//! runs it. One operation covers the build and the deploy that follows, so `lull deploy`
//! follows one stream of lines. A failed build leaves the service as it was.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lull_builder::apprunner::AppRunnerConfig;
use lull_builder::build::{BuildRequest, Builder};
use lull_runtime::pull::PullOptions;
use lull_runtime::reference::Reference;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Control, PAUSED, spec_errors};
use crate::api::{ApiError, ErrorCode, FieldError};
use crate::engine::{OperationEnd, OperationProgress};
use crate::spec::{self, ServiceSpec, ServiceUpdate, WireSource};
use crate::store::{NewEvent, NewService, OperationOutcome};

/// Builds that run at once unless `[builder] concurrency` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 2;

/// Uploads larger than this are refused (`[builder] max_upload`).
pub const DEFAULT_MAX_UPLOAD: u64 = 2 << 30;

/// What a daemon needs to build: the builder, where runtimes' base images are, where uploads
/// and build logs go.
pub struct Builds {
    pub builder: Builder,
    /// Base-image key (`python311`, `nodejs18`, ...) → image reference.
    pub base_images: BTreeMap<String, String>,
    pub pull: PullOptions,
    /// Stored registry credentials, for base images and pushes.
    pub credentials: Option<crate::host::real::RegistryCredentials>,
    /// `<data>/uploads`.
    pub uploads_dir: PathBuf,
    /// `<data>/builds/logs`: each build's whole log, kept.
    pub logs_dir: PathBuf,
    pub max_upload: u64,
    /// Whether git sources may be paths or `file://` URLs on the daemon's host.
    pub git_allow_local: bool,
    /// Builds that run at once (`[builder] concurrency`); others wait for a slot.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Services with a build running.
    running: Mutex<HashSet<String>>,
}

impl Builds {
    /// How many builds run now (a handover to a new daemon waits for none).
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Builds {
    pub fn new(
        builder: Builder,
        base_images: BTreeMap<String, String>,
        pull: PullOptions,
        data_dir: &Path,
    ) -> Builds {
        Builds {
            builder,
            base_images,
            pull,
            credentials: None,
            uploads_dir: data_dir.join("uploads"),
            logs_dir: data_dir.join("builds/logs"),
            max_upload: DEFAULT_MAX_UPLOAD,
            git_allow_local: false,
            slots: Arc::new(tokio::sync::Semaphore::new(DEFAULT_CONCURRENCY)),
            running: Mutex::new(HashSet::new()),
        }
    }

    pub fn with_registry_credentials(
        mut self,
        lookup: crate::host::real::RegistryCredentials,
    ) -> Builds {
        self.credentials = Some(lookup);
        self
    }

    /// Pull or push options for `reference`'s registry, with its stored credentials.
    pub async fn registry_options(&self, reference: &Reference) -> PullOptions {
        let base = self.pull.clone();
        let lookup = self.credentials.clone();
        let registry = reference.registry().to_owned();
        tokio::task::spawn_blocking(move || {
            crate::host::real::pull_options_for(&base, lookup.as_ref(), &registry)
        })
        .await
        .unwrap_or_else(|_| self.pull.clone())
    }

    fn upload_path(&self, id: &str) -> PathBuf {
        self.uploads_dir.join(id)
    }
}

/// `POST /v1/services/{name}/builds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildBody {
    pub source: BuildSource,
    /// apprunner.yaml's text, for a source without one (it wins over the source's own).
    #[serde(default)]
    pub apprunner: Option<String>,
    /// Create the service when it does not exist.
    #[serde(default)]
    pub create: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BuildSource {
    /// An upload's id (`POST /v1/uploads`): a tar or gzip tar.
    Upload(String),
    Git(GitSource),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitSource {
    pub url: String,
    /// A branch, tag or commit (default: the remote's HEAD).
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
    /// A lull secret holding `user:token` for HTTPS remotes (never logged).
    #[serde(default)]
    pub credentials_secret: Option<String>,
}

fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

impl Control {
    fn builds(&self) -> Result<Arc<Builds>, ApiError> {
        self.builds.clone().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                "this daemon does not build from source (it runs without the runtime)",
            )
        })
    }

    /// `POST /v1/uploads`: stores a request body (streamed by the server) and names it.
    /// Uploads no build took within [`UPLOAD_TTL`] are removed.
    pub async fn store_upload(&self, body: hyper::body::Incoming) -> Result<Value, ApiError> {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        let mut body = body;
        let builds = match self.builds() {
            Ok(builds) => builds,
            Err(e) => {
                drain(&mut body).await;
                return Err(e);
            }
        };
        let dir = builds.uploads_dir.clone();
        tokio::task::spawn_blocking(move || remove_stale_uploads(&dir))
            .await
            .map_err(|e| ApiError::internal(format!("uploads task: {e}")))?
            .map_err(ApiError::internal)?;
        let id = new_id("up-");
        let path = builds.upload_path(&id);
        let io_err = |e: std::io::Error| ApiError::internal(format!("{}: {e}", path.display()));
        let mut file = tokio::fs::File::create(&path).await.map_err(io_err)?;
        let mut bytes = 0u64;
        let mut hasher = lull_runtime::digest::Hasher::new();
        let result: Result<(), ApiError> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    ApiError::new(ErrorCode::InvalidRequest, format!("read the upload: {e}"))
                })?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                bytes += data.len() as u64;
                if bytes > builds.max_upload {
                    return Err(ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "the upload is larger than {} bytes ([builder] max_upload)",
                            builds.max_upload
                        ),
                    ));
                }
                hasher.update(&data);
                file.write_all(&data).await.map_err(io_err)?;
            }
            file.flush().await.map_err(io_err)
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&path).await;
            drain(&mut body).await;
            return Err(e);
        }
        Ok(json!({
            "upload": id,
            "bytes": bytes,
            "digest": hasher.finish().to_string(),
        }))
    }

    /// `POST /v1/services/{name}/builds`: starts a build (then a deploy) and answers at once
    /// with the operation to follow.
    pub async fn build(self: &Arc<Self>, name: &str, body: Value) -> Result<Value, ApiError> {
        let builds = self.builds()?;
        let mut body: BuildBody = decode(body)?;
        // Refused here, not once the build has started: the request names the field.
        if let BuildSource::Git(git) = &body.source {
            super::git::check(git, builds.git_allow_local)
                .map_err(|e| field_error(e.field, &e.message))?;
        }
        crate::names::check_label(name).map_err(|e| field_error("name", &e.to_string()))?;
        let owned = name.to_owned();
        let existing = self.blocking(move |s| s.get_service(&owned)).await.ok();
        match &existing {
            None if !body.create => {
                return Err(ApiError::not_found(format!(
                    "no service {name} (`lull deploy` creates it; the API needs \"create\": true)"
                )));
            }
            Some(record) if record.state == PAUSED => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("service {name} is paused: resume it, then deploy"),
                ));
            }
            _ => {}
        }
        // Decided now: a service deleted while its build runs is not created again.
        body.create = body.create && existing.is_none();
        if let BuildSource::Upload(id) = &body.source {
            let known = id.starts_with("up-")
                && id[3..].bytes().all(|b| b.is_ascii_hexdigit())
                && builds.upload_path(id).is_file();
            if !known {
                return Err(field_error(
                    "source.upload",
                    &format!("no upload {id} (uploads are used once)"),
                ));
            }
        }
        let Some(claim) = BuildClaim::take(&builds, name) else {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!("service {name} is already building; deploy again when it has finished"),
            ));
        };
        let service = name.to_owned();
        let record = {
            let service = service.clone();
            self.blocking(move |s| s.create_operation("build", &service))
                .await?
        };
        let (tx, operation) = self.engine.external_operation(&record.id, &service);
        let build_id = new_id("");
        let this = self.clone();
        let op_id = record.id.clone();
        let answer_build = build_id.clone();
        tokio::spawn(async move {
            let progress = Progress::new(tx, this.store.clone(), op_id, &builds, &build_id);
            let slot = match builds.slots.clone().try_acquire_owned() {
                Ok(slot) => Ok(slot),
                Err(_) => {
                    progress
                        .line("==> waiting for another build to finish ([builder] concurrency)");
                    builds.slots.clone().acquire_owned().await
                }
            };
            // A panic in the build still ends the operation, so followers are not left waiting.
            let run = std::panic::AssertUnwindSafe(
                this.run_build(&builds, &service, &build_id, body, &progress),
            );
            let end = match futures_util::FutureExt::catch_unwind(run).await {
                Ok(Ok(end)) => end,
                Ok(Err(reason)) => OperationEnd::BuildFailed {
                    reason: format!("build {build_id} failed: {reason}"),
                },
                Err(_) => OperationEnd::BuildFailed {
                    reason: format!(
                        "build {build_id} failed: the build task panicked (see the daemon's log)"
                    ),
                },
            };
            drop(slot);
            drop(claim);
            this.record_build(&service, &build_id, &end, &progress.log_path)
                .await;
            progress.finish(end).await;
        });
        Ok(json!({
            "service": name,
            "operation": operation.id,
            "build": answer_build,
        }))
    }
}

/// A service's place in [`Builds`]'s running set, given back when dropped (also when the
/// build's task ends by a panic).
struct BuildClaim {
    builds: Arc<Builds>,
    service: String,
}

impl BuildClaim {
    fn take(builds: &Arc<Builds>, service: &str) -> Option<BuildClaim> {
        let mut running = builds.running.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(service.to_owned()).then(|| BuildClaim {
            builds: builds.clone(),
            service: service.to_owned(),
        })
    }
}

impl Drop for BuildClaim {
    fn drop(&mut self) {
        self.builds
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.service);
    }
}

/// How long an upload waits for the build that takes it.
pub const UPLOAD_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// Creates the uploads dir and removes uploads older than [`UPLOAD_TTL`].
fn remove_stale_uploads(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UPLOAD_TTL);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Reads the rest of a refused upload and drops it, so that the client, still sending, gets
/// the answer rather than a connection closed under its write.
async fn drain(body: &mut hyper::body::Incoming) {
    use http_body_util::BodyExt;
    while let Some(Ok(_)) = body.frame().await {}
}

/// A build's lines: to the operation's followers, to the build's log file, and the step
/// headers (`==> ...`) to the stored operation.
struct Progress {
    tx: watch::Sender<OperationProgress>,
    store: Arc<dyn crate::store::Store>,
    operation: String,
    log: Mutex<Option<std::fs::File>>,
    log_path: PathBuf,
    /// Command output lines sent to followers so far (see [`MAX_LIVE_LINES`]).
    live: std::sync::atomic::AtomicUsize,
}

/// Command output lines a build streams to its followers and keeps in memory; past it only
/// the step headers (`==> ...`) are, and the build's log file has everything.
pub const MAX_LIVE_LINES: usize = 20_000;

impl Progress {
    fn new(
        tx: watch::Sender<OperationProgress>,
        store: Arc<dyn crate::store::Store>,
        operation: String,
        builds: &Builds,
        build_id: &str,
    ) -> Arc<Progress> {
        let _ = std::fs::create_dir_all(&builds.logs_dir);
        let log_path = builds.logs_dir.join(format!("{build_id}.log"));
        let log = std::fs::File::create(&log_path).ok();
        Arc::new(Progress {
            tx,
            store,
            operation,
            log: Mutex::new(log),
            log_path,
            live: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn line(&self, line: &str) {
        if let Some(file) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(file, "{line}");
        }
        let header = line.starts_with("==>");
        let sent = self
            .live
            .fetch_add(usize::from(!header), std::sync::atomic::Ordering::Relaxed);
        if header || sent < MAX_LIVE_LINES {
            self.tx.send_modify(|p| p.lines.push(line.to_owned()));
        } else if sent == MAX_LIVE_LINES {
            let note = format!(
                "lull: more output than {MAX_LIVE_LINES} lines: the rest is in {}",
                self.log_path.display()
            );
            self.tx.send_modify(|p| p.lines.push(note));
        }
        if header {
            let store = self.store.clone();
            let (id, line) = (self.operation.clone(), line.to_owned());
            tokio::task::spawn_blocking(move || {
                let _ = store.append_operation_progress(&id, &line);
            });
        }
    }

    async fn finish(&self, end: OperationEnd) {
        let outcome = match &end {
            OperationEnd::Succeeded { .. } => OperationOutcome::Succeeded(super::end_json(&end)),
            _ => OperationOutcome::Failed(super::end_json(&end)),
        };
        let store = self.store.clone();
        let id = self.operation.clone();
        let _ = tokio::task::spawn_blocking(move || store.finish_operation(&id, &outcome)).await;
        self.tx.send_modify(|p| p.end = Some(end));
    }
}

impl Control {
    /// The service's `build.succeeded` or `build.failed` event, naming the build's log (a
    /// service a failed first build never created has no events).
    async fn record_build(&self, service: &str, build_id: &str, end: &OperationEnd, log: &Path) {
        let (kind, message) = match end {
            OperationEnd::BuildFailed { reason } => ("build.failed", reason.clone()),
            _ => ("build.succeeded", format!("build {build_id} succeeded")),
        };
        let event = NewEvent {
            service: service.to_owned(),
            kind: kind.into(),
            message,
            fields: json!({ "build": build_id, "log": log }),
        };
        let _ = self.blocking(move |s| s.append_event(&event)).await;
    }

    /// The build, its revision and its deploy; `Err` is a build failure (nothing changed).
    async fn run_build(
        self: &Arc<Self>,
        builds: &Arc<Builds>,
        service: &str,
        build_id: &str,
        body: BuildBody,
        progress: &Arc<Progress>,
    ) -> Result<OperationEnd, String> {
        let started = Instant::now();
        let source = builds
            .builder
            .settings
            .work_dir
            .join(format!("{build_id}-src"));
        let _cleanup = RemoveDir(source.clone());
        progress.line(&format!("==> build {build_id} of {service}"));
        match &body.source {
            BuildSource::Upload(id) => {
                let upload = builds.upload_path(id);
                let dest = source.clone();
                let stats = tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&dest)
                        .map_err(|e| format!("{}: {e}", dest.display()))?;
                    let file = std::fs::File::open(&upload)
                        .map_err(|e| format!("upload {}: {e}", upload.display()))?;
                    let stats = lull_builder::source::unpack_source(
                        std::io::BufReader::new(file),
                        &dest,
                        &lull_builder::source::SourceLimits::default(),
                    )
                    .map_err(|e| format!("the uploaded source: {e}"));
                    let _ = std::fs::remove_file(&upload);
                    stats
                })
                .await
                .map_err(|e| format!("unpack task: {e}"))??;
                progress.line(&format!(
                    "==> source: {} files, {} bytes",
                    stats.files, stats.bytes
                ));
            }
            BuildSource::Git(git) => {
                let credentials = match &git.credentials_secret {
                    Some(name) => Some(self.open_secret_text(name).await?),
                    None => None,
                };
                let timeout = builds.builder.settings.limits.timeout;
                let fetched = tokio::time::timeout(
                    timeout,
                    super::git::fetch(
                        git,
                        builds.git_allow_local,
                        credentials.as_deref(),
                        &source,
                        &|l| progress.line(l),
                    ),
                )
                .await;
                match fetched {
                    Ok(result) => result?,
                    Err(_) => {
                        return Err(format!(
                            "git: the fetch took longer than {} s ([builder] timeout)",
                            timeout.as_secs()
                        ));
                    }
                }
            }
        }
        let (root, (config, origin, warnings)) = {
            let source = source.clone();
            let given = body.apprunner.clone();
            tokio::task::spawn_blocking(move || {
                let root = single_top_dir(&source);
                read_config(&root, given.as_deref()).map(|c| (root, c))
            })
            .await
            .map_err(|e| format!("configuration task: {e}"))??
        };
        progress.line(&format!("==> configuration: {origin}"));
        for warning in &warnings {
            progress.line(&format!("warning: {warning}"));
        }
        let runtime_name = config.runtime.as_deref().ok_or(
            "apprunner.yaml has no runtime: a source build needs one (python3, python311, nodejs18, nodejs20, nodejs22)",
        )?;
        let runtime =
            lull_builder::runtimes::resolve(runtime_name, config.run.runtime_version.as_deref())
                .map_err(|e| format!("runtime: {e}"))?;
        let base_ref = builds
            .base_images
            .get(runtime.base_image)
            .ok_or_else(|| {
                format!(
                    "runtime {}: no base image is configured for it (set [builder.base_images] {} = \"REF\" in lull.toml; `cargo xtask base-images` builds lull's)",
                    runtime.name, runtime.base_image
                )
            })?
            .clone();
        let base = self.base_image(builds, &base_ref).await?;
        progress.line(&format!(
            "==> base image {base_ref} ({})",
            lull_builder::build::short(&base.manifest_digest)
        ));
        let (mut recipe, not_hoisted) = {
            let (config, root) = (config.clone(), root.clone());
            let base_digest = base.manifest_digest.to_string();
            tokio::task::spawn_blocking(move || {
                lull_builder::prepare::recipe(&config, &root, &base_digest)
            })
            .await
            .map_err(|e| format!("plan task: {e}"))?
            .map_err(|e| e.to_string())?
        };
        recipe.labels.push((
            lull_builder::rebase::BASE_NAME_LABEL.into(),
            base_ref.clone(),
        ));
        if let Some(note) = not_hoisted {
            progress.line(&format!("note: {note}"));
        }
        let sink_progress = progress.clone();
        let request = BuildRequest {
            service: service.to_owned(),
            build_id: build_id.to_owned(),
            source: root,
            recipe,
            base,
            log: Arc::new(move |line: &str| sink_progress.line(line)),
        };
        let output = builds
            .builder
            .build(request)
            .await
            .map_err(|e| e.to_string())?;
        progress.line(&format!(
            "==> built in {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            output.reference
        ));
        let revision = self
            .commit_build(service, &output.reference, &config, build_id, body.create)
            .await
            .map_err(|e| e.message)?;
        let started = match revision {
            Some(revision) => self
                .deploy_revision(service, revision)
                .await
                .map_err(|e| e.message)?,
            None => {
                progress.line("==> nothing changed: the service already runs this image");
                let owned = service.to_owned();
                let current = self
                    .blocking(move |s| s.get_service(&owned))
                    .await
                    .ok()
                    .and_then(|r| r.current_revision)
                    .unwrap_or(0);
                return Ok(OperationEnd::Succeeded {
                    revision: current,
                    took: started.elapsed(),
                });
            }
        };
        let Some(op) = started.operation.and_then(|id| self.engine.operation(&id)) else {
            return Err("the deploy did not start".into());
        };
        let mut op = op;
        progress.line(&format!(
            "==> deploying revision {} ({})",
            started.revision, op.id
        ));
        while let Some(line) = op.next_line().await {
            progress.line(&line);
        }
        Ok(op.wait().await)
    }

    async fn base_image(
        &self,
        builds: &Builds,
        reference: &str,
    ) -> Result<lull_runtime::store::ImageRecord, String> {
        let parsed: Reference = reference
            .parse()
            .map_err(|e| format!("base image {reference}: {e}"))?;
        // Pulled again on every build, so a base pushed anew under its tag is built on (the
        // pull fetches only what is new); the copy here serves when the registry cannot.
        let store = &builds.builder.store;
        match store
            .pull(&parsed, &builds.registry_options(&parsed).await)
            .await
        {
            Ok(record) => Ok(record),
            Err(pull) => match store.get(&parsed) {
                Ok(Some(record)) => {
                    tracing::warn!(%reference, "base image not refreshed, building on the copy here: {pull}");
                    Ok(record)
                }
                _ => Err(format!("pull the base image {reference}: {pull}")),
            },
        }
    }

    async fn open_secret_text(&self, name: &str) -> Result<String, String> {
        let key = self.key.clone().ok_or("this daemon has no secrets key")?;
        let owned = name.to_owned();
        let record = self
            .blocking(move |s| s.get_secret(&owned))
            .await
            .map_err(|e| format!("secret {name}: {}", e.message))?;
        let value = key
            .open(name, &record.ciphertext)
            .map_err(|e| format!("secret {name}: {e}"))?;
        value
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("secret {name} is not text"))
    }

    /// The service's new revision running the built image, with apprunner.yaml's run settings
    /// applied; `None` when nothing changed.
    async fn commit_build(
        &self,
        name: &str,
        image: &Reference,
        config: &AppRunnerConfig,
        build_id: &str,
        create: bool,
    ) -> Result<Option<u64>, ApiError> {
        let owned = name.to_owned();
        let existing = self.blocking(move |s| s.get_service(&owned)).await;
        let source = ServiceUpdate {
            source: Some(WireSource::Image {
                reference: image.clone(),
            }),
            ..ServiceUpdate::default()
        };
        let (record, current) = match existing {
            Ok(record) => {
                let current = Self::current_spec(&record)?;
                (Some(record), Some(current))
            }
            Err(e) if e.code == ErrorCode::NotFound && create => (None, None),
            Err(e) if e.code == ErrorCode::NotFound => {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("service {name} was deleted during its build: nothing deployed"),
                ));
            }
            Err(e) => return Err(e),
        };
        let mut spec = match &current {
            Some(current) => current.updated(&source).map_err(spec_errors)?,
            None => ServiceSpec::from_update(&ServiceUpdate {
                name: Some(name.to_owned()),
                ..source
            })
            .map_err(spec_errors)?,
        };
        spec::apply_apprunner_run(&mut spec, &config.run).map_err(spec_errors)?;
        spec.validate().map_err(spec_errors)?;
        self.check_hostnames(&spec).await?;
        let cause = format!("build {build_id}: image {image}");
        let record = match (record, current) {
            (Some(record), Some(current)) => {
                if spec::changes(&current, &spec).is_empty() {
                    return Ok(None);
                }
                record
            }
            _ => {
                let doc = spec.to_json();
                let name = name.to_owned();
                self.blocking(move |s| {
                    s.create_service(&NewService {
                        name,
                        state: super::ACTIVE.into(),
                        doc,
                    })
                })
                .await?
            }
        };
        let committed = self
            .commit(&record, spec.to_json(), cause, "service.built")
            .await?;
        Ok(Some(committed.number))
    }
}

/// A tarball whose entries all sit in one top-level directory (GitHub's archives): that
/// directory is the source root.
fn single_top_dir(dir: &Path) -> PathBuf {
    let has_config = |d: &Path| {
        lull_builder::prepare::CONFIG_FILES
            .iter()
            .any(|f| d.join(f).is_file())
    };
    if has_config(dir) {
        return dir.to_owned();
    }
    let entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().collect(),
        Err(_) => return dir.to_owned(),
    };
    match entries.as_slice() {
        [only] if only.file_type().is_ok_and(|t| t.is_dir()) => only.path(),
        _ => dir.to_owned(),
    }
}

/// The apprunner.yaml given with the request, else the source's own: the config, where it
/// came from, and its warnings (accepted deviations, each with its line).
fn read_config(
    root: &Path,
    given: Option<&str>,
) -> Result<(AppRunnerConfig, String, Vec<String>), String> {
    let read = |text: &str, name: &str| {
        AppRunnerConfig::parse_with_warnings(text)
            .map(|p| {
                let warnings = p.warnings.iter().map(|w| format!("{name}: {w}")).collect();
                (p.config, warnings)
            })
            .map_err(|e| format!("{name}: {e}"))
    };
    if let Some(text) = given {
        let (config, warnings) = read(text, "the given apprunner.yaml")?;
        return Ok((
            config,
            "apprunner.yaml given with the deploy".into(),
            warnings,
        ));
    }
    for name in lull_builder::prepare::CONFIG_FILES {
        let path = root.join(name);
        match read_source_file(&path, MAX_CONFIG_BYTES) {
            Ok(Some(text)) => {
                let (config, warnings) = read(&text, name)?;
                return Ok((config, format!("{name} from the source"), warnings));
            }
            Ok(None) => continue,
            Err(e) => return Err(format!("{name}: {e}")),
        }
    }
    Err("the source has no apprunner.yaml at its root: add one, or give one (`lull deploy --config FILE`)".into())
}

/// apprunner.yaml larger than this is refused.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// A file of an untrusted source tree, read by the daemon itself: a regular file (a symlink is
/// not followed: it could point anywhere on the host), at most `max` bytes, UTF-8. `None` when
/// it does not exist.
fn read_source_file(path: &Path, max: u64) -> Result<Option<String>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("is a symbolic link: the configuration must be a regular file".into());
        }
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() > max {
        return Err(format!(
            "is {} bytes, more than the {max} allowed",
            meta.len()
        ));
    }
    let mut text = String::new();
    file.take(max)
        .read_to_string(&mut text)
        .map_err(|e| format!("not UTF-8 text ({e})"))?;
    Ok(Some(text))
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `POST /v1/images/push`: a service revision's image to a registry. (Exports are written by
/// the CLI itself, with its caller's permissions: the daemon writes no path a request names.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBody {
    pub service: String,
    /// Default: the revision serving (or last made).
    #[serde(default)]
    pub revision: Option<u64>,
    /// `registry/repository:tag`.
    #[serde(default)]
    pub target: Option<String>,
}

impl Control {
    /// The image record a service revision runs.
    async fn revision_image(
        &self,
        builds: &Builds,
        body: &ImageBody,
    ) -> Result<(u64, lull_runtime::store::ImageRecord), ApiError> {
        let service = body.service.clone();
        let record = self.blocking(move |s| s.get_service(&service)).await?;
        let number = match body.revision {
            Some(n) => n,
            None => {
                let service = body.service.clone();
                let revisions = self.blocking(move |s| s.list_revisions(&service)).await?;
                record
                    .current_revision
                    .or_else(|| revisions.last().map(|r| r.number))
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::Conflict,
                            format!("service {} has no revision", body.service),
                        )
                    })?
            }
        };
        let service = body.service.clone();
        let revision = self
            .blocking(move |s| s.get_revision(&service, number))
            .await?;
        let spec: ServiceSpec = serde_json::from_value(revision.doc.clone()).map_err(|e| {
            ApiError::internal(format!(
                "revision {number}: its definition does not read back: {e}"
            ))
        })?;
        let spec::Source::Image { reference } = &spec.source;
        let image = builds
            .builder
            .store
            .get(reference)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "the image of {} revision {number} ({reference}) is not in the image store",
                    body.service
                ))
            })?;
        Ok((number, image))
    }

    pub async fn push_image(&self, body: Value) -> Result<Value, ApiError> {
        let builds = self.builds()?;
        let body: ImageBody = decode(body)?;
        let target = body
            .target
            .as_deref()
            .ok_or_else(|| field_error("target", "required"))?;
        let target: Reference = target
            .parse()
            .map_err(|e| field_error("target", &format!("{e}")))?;
        let (revision, image) = self.revision_image(&builds, &body).await?;
        let options = builds.registry_options(&target).await;
        let report = builds
            .builder
            .store
            .push(&image, &target, &options)
            .await
            .map_err(|e| {
                ApiError::new(ErrorCode::InvalidRequest, format!("push to {target}: {e}"))
            })?;
        Ok(json!({
            "service": body.service,
            "revision": revision,
            "target": report.reference.to_string(),
            "manifest": report.manifest_digest.to_string(),
            "uploaded": report.uploaded.len(),
            "bytes_uploaded": report.bytes_uploaded,
            "mounted": report.mounted.len(),
            "existing": report.existing.len(),
        }))
    }
}

/// Decodes a request body; an error names the field at fault (the missing or unknown one
/// itself, not the object holding it).
fn decode<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|prefix| message.strip_prefix(prefix))
            .and_then(|rest| rest.split('`').next());
        let field = match (path.as_str(), named) {
            (".", Some(name)) => name.to_owned(),
            (".", None) => String::new(),
            (path, Some(name)) if !path.ends_with(&format!(".{name}")) && path != name => {
                format!("{path}.{name}")
            }
            (path, _) => path.to_owned(),
        };
        ApiError::invalid(vec![FieldError { field, message }])
    })
}

fn field_error(field: &str, message: &str) -> ApiError {
    ApiError::invalid(vec![FieldError {
        field: field.to_owned(),
        message: message.to_owned(),
    }])
}

impl Control {
    /// On a redeploy of a built revision: its base image's reference is pulled again, and when
    /// it names a newer image that the app's layers allow (see `lull_builder::rebase`), a new
    /// revision runs the app's layers on it, without a build. Answers that revision, or none
    /// with the reason when the base changed but the image cannot follow.
    pub(super) async fn rebase_current(
        &self,
        name: &str,
        revision: u64,
    ) -> Result<(Option<u64>, Option<String>), ApiError> {
        let Some(builds) = self.builds.clone() else {
            return Ok((None, None));
        };
        let owned = name.to_owned();
        let record = self
            .blocking(move |s| s.get_revision(&owned, revision))
            .await?;
        let spec: ServiceSpec = serde_json::from_value(record.doc.clone()).map_err(|e| {
            ApiError::internal(format!(
                "revision {revision}: its definition does not read back: {e}"
            ))
        })?;
        let spec::Source::Image { reference } = &spec.source;
        if reference.registry() != "lull.local" {
            return Ok((None, None));
        }
        let store = &builds.builder.store;
        let Some(image) = store
            .get(reference)
            .map_err(|e| ApiError::internal(e.to_string()))?
        else {
            return Ok((None, None));
        };
        let Some((base_ref, old_digest)) = lull_builder::rebase::recorded_base(&image) else {
            return Ok((None, None));
        };
        let options = builds.registry_options(&base_ref).await;
        let new_base = match store.pull(&base_ref, &options).await {
            Ok(base) => base,
            Err(e) => {
                return Ok((
                    None,
                    Some(format!(
                        "base image {base_ref} not checked for updates: {e}"
                    )),
                ));
            }
        };
        if new_base.manifest_digest == old_digest {
            return Ok((None, None));
        }
        let short = lull_builder::build::short(&new_base.manifest_digest);
        let refused = |why: String| {
            Ok((
                None,
                Some(format!(
                    "base image {base_ref} has a new version ({short}), not used: {why}"
                )),
            ))
        };
        let old_base = match store.get_by_digest(&old_digest) {
            Ok(Some(base)) => base,
            _ => {
                return refused(
                    lull_builder::rebase::RebaseRefusal::OldBaseMissing(old_digest.to_string())
                        .to_string(),
                );
            }
        };
        let tag: Reference = format!(
            "lull.local/{name}:rebase-{}",
            &new_base.manifest_digest.hex()[..12]
        )
        .parse()
        .map_err(|e| ApiError::internal(format!("{e}")))?;
        let rebased = {
            let guard = store.hold_ingest().await;
            lull_builder::rebase::rebase(store, &guard, &image, &old_base, &new_base, &tag)
        };
        let rebased = match rebased {
            Ok(image) => image,
            Err(why) => return refused(why.to_string()),
        };
        let reference = lull_builder::build::local_reference(name, &rebased.manifest_digest)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let owned = name.to_owned();
        let service = self.blocking(move |s| s.get_service(&owned)).await?;
        let current = Self::current_spec(&service)?;
        let update = ServiceUpdate {
            source: Some(WireSource::Image { reference }),
            ..ServiceUpdate::default()
        };
        let spec = current.updated(&update).map_err(spec_errors)?;
        let cause = format!("rebased onto base image {base_ref} ({short}) without a build");
        let committed = self
            .commit(&service, spec.to_json(), cause, "service.rebased")
            .await?;
        Ok((Some(committed.number), None))
    }
}
