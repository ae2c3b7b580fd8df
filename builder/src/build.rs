//! A source build, end to end: the source and its dependency manifests become layers, the
//! dependency commands run on the manifests alone (their layer cached by what can change it),
//! the other build commands and `pre-run` run over the full source, each step's writes are
//! captured as a layer from its overlay upper dir, and the image (base layers + those layers,
//! a config with the run command, env, `PORT` and `/app`) is committed to the image store.
//!
//! Layers, lowest first: the base image's, then `manifests` (the dependency manifests under
//! `/app`), `dependencies` (what the dependency commands wrote), `source` (the whole source
//! under `/app`), `build` (what the other build commands wrote), `pre-run`. A layer with
//! nothing in it is left out.
//!
//! Two caches, both keyed by everything that can change what they hold, so a hit is never
//! stale: the dependency layer (see [`crate::plan`] for its key) and the whole image (base,
//! dependency key, source layer digest, commands, env and run settings): a rebuild of the same
//! inputs reuses the image without running anything.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lull_runtime::digest::Digest;
use lull_runtime::layers::LayerCache;
use lull_runtime::reference::Reference;
use lull_runtime::store::{BuiltLayer, ImageRecord, ImageStore};
use serde::{Deserialize, Serialize};

use crate::capture::{self, CaptureOptions};
use crate::sandbox::{LogSink, SandboxBind, SandboxLimits, SandboxRunner, SandboxStep, script};

pub use crate::capture::LAYER_MEDIA_TYPE;
/// Changes whenever the way images are put together changes, so old cache entries miss.
const IMAGE_FORMAT: &str = "lull-build-image-v1";
/// Where the build's CA bundle is mounted (and which the build env points tools at).
pub const CA_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Files lull's network binds into every sandbox; never part of a layer.
const NETWORK_FILES: [&str; 2] = ["etc/resolv.conf", "etc/hosts"];

/// The builder's settings (`[builder]` in the daemon's config).
#[derive(Debug, Clone)]
pub struct BuilderSettings {
    /// Scratch space for builds in progress (`<data>/builds`).
    pub work_dir: PathBuf,
    /// Cache records and the package managers' download caches (`<data>/build-cache`).
    pub cache_dir: PathBuf,
    /// PEM files of CAs to trust inside builds: with the base image's own bundle they make
    /// the bundle mounted over [`CA_BUNDLE_PATH`] for the build's steps; never exported.
    pub extra_ca_certs: Vec<PathBuf>,
    pub limits: SandboxLimits,
}

/// One build's inputs.
pub struct BuildRequest {
    pub service: String,
    /// Unique per build (`b-<n>`), used in sandbox ids and the image's tag.
    pub build_id: String,
    /// The source tree; the build takes it over (it is moved, then removed).
    pub source: PathBuf,
    pub recipe: Recipe,
    pub base: ImageRecord,
    pub log: LogSink,
}

/// What a build runs and bakes into the image, from the plan (see [`crate::prepare`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipe {
    pub dependencies: Option<DependencyPlan>,
    /// The build commands not hoisted into the dependency step, in order.
    pub build: Vec<String>,
    pub pre_run: Vec<String>,
    /// Build env (runtime defaults, then `build.env`).
    pub build_env: Vec<(String, String)>,
    /// Baked into the image: env (`PORT` included), the command's words, the port.
    pub run_env: Vec<(String, String)>,
    pub run_command: Option<Vec<String>>,
    pub port: u16,
    /// Extra labels for the image (`lull.runtime`, ...).
    pub labels: Vec<(String, String)>,
    /// Host dirs (per runtime) mounted at these paths as download caches.
    pub caches: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyPlan {
    pub commands: Vec<String>,
    /// Paths relative to the source root, sorted.
    pub manifests: Vec<PathBuf>,
    /// Everything that can change the dependency layer (hex).
    pub cache_key: String,
}

/// What a build made.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    pub image: ImageRecord,
    /// `lull.local/<service>@<manifest digest>`: what the service's revision runs.
    pub reference: Reference,
    /// Whether the dependency layer came from the cache (`None`: no dependency step).
    pub dependencies_cached: Option<bool>,
    /// The whole image came from the cache: nothing ran.
    pub image_cached: bool,
    pub steps: Vec<StepReport>,
    pub took: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    pub name: String,
    pub took: Duration,
    /// The layer it added, if it wrote anything.
    pub layer: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "{step} step: {}{}",
        if *timed_out { "timed out".to_owned() } else { format!("exit code {exit_code}") },
        if last_lines.is_empty() { String::new() } else { format!("; last lines:\n{}", last_lines.join("\n")) }
    )]
    Step {
        step: String,
        exit_code: i32,
        timed_out: bool,
        last_lines: Vec<String>,
    },
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("capture the {layer} layer: {source}")]
    Capture {
        layer: String,
        #[source]
        source: capture::CaptureError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image store: {0}")]
    Store(String),
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A layer of the image above the base, with the step that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackLayer {
    /// `manifests`, `dependencies`, `source`, `build`, `pre-run`.
    pub step: String,
    pub layer: BuiltLayer,
}

/// A cached dependency layer, as its record file holds it.
#[derive(Serialize, Deserialize)]
struct LayerCacheEntry {
    digest: Digest,
    diff_id: Digest,
    size: u64,
    media_type: String,
}

fn dir_name(layer: &BuiltLayer) -> String {
    layer.diff_id.hex().to_owned()
}

#[derive(Serialize, Deserialize)]
struct ImageCacheEntry {
    manifest: Digest,
}

/// Builds images from source.
#[derive(Clone)]
pub struct Builder {
    pub store: ImageStore,
    pub layers: Arc<LayerCache>,
    pub runner: Arc<dyn SandboxRunner>,
    pub settings: BuilderSettings,
}

impl Builder {
    /// Runs the build; the source dir is consumed whatever the outcome.
    pub async fn build(&self, req: BuildRequest) -> Result<BuildOutput, BuildError> {
        let started = Instant::now();
        let work = self.settings.work_dir.join(&req.build_id);
        let _cleanup = RemoveOnDrop(work.clone());
        let _source_cleanup = RemoveOnDrop(req.source.clone());
        fs::create_dir_all(&work).map_err(io_err(&work))?;
        let log = req.log.clone();
        let mut steps = Vec::new();
        // Held until the image is committed: gc must not take the layers ingested meanwhile,
        // which no image references yet.
        let guard = self.store.hold_ingest().await;
        crate::rebase::keep_base(&self.store, &req.base).map_err(BuildError::Store)?;
        for layer in &req.base.layers {
            self.ensure_unpacked(&BuiltLayer::from(layer)).await?;
        }
        let ca_bundle = self.ca_bundle(&work, &req.base)?;

        // The source as a layer under /app (the source dir moves into place, no copy).
        let t = Instant::now();
        let source_root = work.join("source-root");
        fs::create_dir_all(&source_root).map_err(io_err(&source_root))?;
        let app = source_root.join("app");
        fs::rename(&req.source, &app).map_err(io_err(&req.source))?;
        let source_layer = self.layer_from_dir(&source_root, "source", &[]).await?;
        let Some(source_layer) = source_layer else {
            unreachable!("a layer holding /app is never empty");
        };
        steps.push(StepReport {
            name: "source".into(),
            took: t.elapsed(),
            layer: Some(source_layer.digest.clone()),
        });

        let image_key = image_cache_key(&req, &source_layer);
        if let Some(image) = self.cached_image(&image_key)? {
            log(&format!(
                "==> nothing changed since build {}: image reused",
                short(&image.manifest_digest)
            ));
            return Ok(BuildOutput {
                reference: local_reference(&req.service, &image.manifest_digest)?,
                image,
                dependencies_cached: req.recipe.dependencies.as_ref().map(|_| true),
                image_cached: true,
                steps,
                took: started.elapsed(),
            });
        }

        let base_layers: Vec<String> = req
            .base
            .layers
            .iter()
            .map(|l| l.diff_id.hex().to_owned())
            .collect();
        let mut stack: Vec<StackLayer> = Vec::new();
        let on = |step: &str, layer: BuiltLayer| StackLayer {
            step: step.to_owned(),
            layer,
        };
        let mut dependencies_cached = None;

        if let Some(deps) = &req.recipe.dependencies {
            let t = Instant::now();
            let manifests = self
                .manifests_layer(&work, &app, &deps.manifests)
                .await?
                .expect("a manifests layer holds /app");
            stack.push(on("manifests", manifests));
            match self.cached_dependencies(&deps.cache_key)? {
                Some(layer) => {
                    log(&format!(
                        "==> dependencies: cached ({} unchanged), {}",
                        deps.manifests
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        short(&layer.digest)
                    ));
                    self.ensure_unpacked(&layer).await?;
                    dependencies_cached = Some(true);
                    steps.push(StepReport {
                        name: "dependencies".into(),
                        took: t.elapsed(),
                        layer: Some(layer.digest.clone()),
                    });
                    stack.push(on("dependencies", layer));
                }
                None => {
                    log("==> dependencies: on the dependency manifests alone");
                    let layer = self
                        .run_step(
                            &req,
                            "dependencies",
                            &base_layers,
                            &stack,
                            &deps.commands,
                            ca_bundle.as_deref(),
                        )
                        .await?;
                    dependencies_cached = Some(false);
                    steps.push(StepReport {
                        name: "dependencies".into(),
                        took: t.elapsed(),
                        layer: layer.as_ref().map(|l| l.digest.clone()),
                    });
                    if let Some(layer) = layer {
                        self.remember_dependencies(&deps.cache_key, &layer)?;
                        stack.push(on("dependencies", layer));
                    }
                }
            }
        }
        stack.push(on("source", source_layer));

        for (name, commands) in [
            ("build", &req.recipe.build),
            ("pre-run", &req.recipe.pre_run),
        ] {
            if commands.is_empty() {
                continue;
            }
            let t = Instant::now();
            log(&format!("==> {name}"));
            let layer = self
                .run_step(
                    &req,
                    name,
                    &base_layers,
                    &stack,
                    commands,
                    ca_bundle.as_deref(),
                )
                .await?;
            steps.push(StepReport {
                name: name.into(),
                took: t.elapsed(),
                layer: layer.as_ref().map(|l| l.digest.clone()),
            });
            stack.extend(layer.map(|l| on(name, l)));
        }

        let image = crate::image::commit(&self.store, &guard, &req, &stack)?;
        self.remember_image(&image_key, &image.manifest_digest)?;
        log(&format!(
            "==> image {} ({} layers)",
            short(&image.manifest_digest),
            image.layers.len()
        ));
        Ok(BuildOutput {
            reference: local_reference(&req.service, &image.manifest_digest)?,
            image,
            dependencies_cached,
            image_cached: false,
            steps,
            took: started.elapsed(),
        })
    }

    /// Runs one step's commands on `base + stack` and captures what they wrote.
    async fn run_step(
        &self,
        req: &BuildRequest,
        name: &str,
        base_layers: &[String],
        stack: &[StackLayer],
        commands: &[String],
        ca_bundle: Option<&Path>,
    ) -> Result<Option<BuiltLayer>, BuildError> {
        let mut layers = base_layers.to_vec();
        layers.extend(stack.iter().map(|l| dir_name(&l.layer)));
        let mut env: Vec<(String, String)> = req
            .base
            .config
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut binds = Vec::new();
        if let Some(bundle) = ca_bundle {
            binds.push(SandboxBind {
                source: bundle.to_owned(),
                destination: CA_BUNDLE_PATH.into(),
                read_only: true,
            });
            for var in [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "PIP_CERT",
                "NODE_EXTRA_CA_CERTS",
                "npm_config_cafile",
            ] {
                env.push((var.to_owned(), CA_BUNDLE_PATH.to_owned()));
            }
        }
        for cache in &req.recipe.caches {
            // One per service: a build cannot plant packages in another service's cache.
            let host = self
                .settings
                .cache_dir
                .join("downloads")
                .join(&req.service)
                .join(cache.strip_prefix("/").unwrap_or(cache));
            fs::create_dir_all(&host).map_err(io_err(&host))?;
            binds.push(SandboxBind {
                source: host,
                destination: cache.clone(),
                read_only: false,
            });
        }
        env.extend(req.recipe.build_env.iter().cloned());
        let step = SandboxStep {
            id: format!("b.{}.{}", req.build_id, step_slug(name)),
            name: name.to_owned(),
            layers,
            env,
            script: script(commands),
            binds,
            limits: self.settings.limits,
        };
        let result = self.runner.run(&step, req.log.clone()).await;
        let run = match result {
            Ok(run) => run,
            Err(e) => {
                self.runner.remove(&step.id).await;
                return Err(e.into());
            }
        };
        if run.exit_code != 0 || run.timed_out {
            self.runner.remove(&step.id).await;
            return Err(BuildError::Step {
                step: name.to_owned(),
                exit_code: run.exit_code,
                timed_out: run.timed_out,
                last_lines: run.last_lines,
            });
        }
        let mut exclude: Vec<PathBuf> = NETWORK_FILES.iter().map(PathBuf::from).collect();
        exclude.extend(
            step.binds
                .iter()
                .map(|b| relative(&b.destination).to_path_buf()),
        );
        let lowers: Vec<PathBuf> = step
            .layers
            .iter()
            .map(|l| self.layers.root().join(l))
            .collect();
        let captured = self
            .layer_from_upper(&run.upper, &lowers, name, &exclude)
            .await;
        self.runner.remove(&step.id).await;
        captured
    }

    /// The base image's CA bundle (from its top-most layer holding one) followed by the
    /// operator's extra CAs, written in the build's work dir; `None` without extra CAs.
    fn ca_bundle(&self, work: &Path, base: &ImageRecord) -> Result<Option<PathBuf>, BuildError> {
        if self.settings.extra_ca_certs.is_empty() {
            return Ok(None);
        }
        let mut bundle = Vec::new();
        // Read on the host from the layer dirs: a symlink that leads out of its layer (an
        // absolute link resolves against the host's root here) is not followed.
        let own = base.layers.iter().rev().find_map(|l| {
            let dir = fs::canonicalize(self.layers.root().join(l.diff_id.hex())).ok()?;
            let file = fs::canonicalize(dir.join(relative(Path::new(CA_BUNDLE_PATH)))).ok()?;
            file.starts_with(&dir)
                .then(|| fs::read(&file).ok())
                .flatten()
        });
        if let Some(own) = own {
            bundle.extend_from_slice(&own);
            bundle.push(b'\n');
        }
        for extra in &self.settings.extra_ca_certs {
            let pem = fs::read(extra).map_err(io_err(extra))?;
            bundle.extend_from_slice(&pem);
            bundle.push(b'\n');
        }
        let path = work.join("ca-bundle.pem");
        fs::write(&path, bundle).map_err(io_err(&path))?;
        Ok(Some(path))
    }

    /// The dependency manifests, copied under /app, as a layer.
    async fn manifests_layer(
        &self,
        work: &Path,
        app: &Path,
        manifests: &[PathBuf],
    ) -> Result<Option<BuiltLayer>, BuildError> {
        let root = work.join("manifests-root");
        for rel in manifests {
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(BuildError::Manifest {
                    path: rel.clone(),
                    reason: "not a path inside the source".into(),
                });
            }
            let from = app.join(rel);
            let meta = fs::symlink_metadata(&from).map_err(io_err(&from))?;
            if !meta.is_file() {
                return Err(BuildError::Manifest {
                    path: rel.clone(),
                    reason: "not a regular file".into(),
                });
            }
            let to = root.join("app").join(rel);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::copy(&from, &to).map_err(io_err(&from))?;
        }
        fs::create_dir_all(root.join("app")).map_err(io_err(&root))?;
        self.layer_from_dir(&root, "manifests", &[]).await
    }

    async fn layer_from_dir(
        &self,
        root: &Path,
        name: &str,
        exclude: &[PathBuf],
    ) -> Result<Option<BuiltLayer>, BuildError> {
        self.layer_from_upper(root, &[], name, exclude).await
    }

    /// Captures `upper` (over `lowers`) into the blob store and unpacks it into the layer
    /// cache; `None` when the upper holds nothing to export.
    async fn layer_from_upper(
        &self,
        upper: &Path,
        lowers: &[PathBuf],
        name: &str,
        exclude: &[PathBuf],
    ) -> Result<Option<BuiltLayer>, BuildError> {
        let store = self.store.clone();
        let upper = upper.to_owned();
        let lowers = lowers.to_vec();
        let options = CaptureOptions {
            exclude: exclude.to_vec(),
            // Not before 1980: Python's wheel builds refuse older files.
            mtime: crate::source::SOURCE_MTIME,
        };
        let layer_name = name.to_owned();
        let layer = tokio::task::spawn_blocking(move || {
            let mut pending = store
                .blobs()
                .begin()
                .map_err(|e| BuildError::Store(e.to_string()))?;
            let captured = capture::capture_layer(&upper, &lowers, &options, &mut pending)
                .map_err(|source| BuildError::Capture {
                    layer: layer_name.clone(),
                    source,
                })?;
            if captured.entries == 0 {
                return Ok(None);
            }
            let digest: Digest = captured
                .digest
                .parse()
                .map_err(|e| BuildError::Store(format!("{e}")))?;
            let diff_id: Digest = captured
                .diff_id
                .parse()
                .map_err(|e| BuildError::Store(format!("{e}")))?;
            let (digest, size) = pending
                .commit(Some(&digest), Some(captured.size))
                .map_err(|e| BuildError::Store(e.to_string()))?;
            Ok::<_, BuildError>(Some(BuiltLayer {
                digest,
                diff_id,
                size,
                media_type: LAYER_MEDIA_TYPE.to_owned(),
            }))
        })
        .await
        .map_err(|e| BuildError::Store(format!("capture task: {e}")))??;
        if let Some(layer) = &layer {
            self.ensure_unpacked(layer).await?;
        }
        Ok(layer)
    }

    async fn ensure_unpacked(&self, layer: &BuiltLayer) -> Result<(), BuildError> {
        let cache = self.layers.clone();
        let blob = self.store.blob_path(&layer.digest);
        let (diff_id, media_type) = (layer.diff_id.clone(), layer.media_type.clone());
        tokio::task::spawn_blocking(move || cache.ensure(&diff_id, &blob, &media_type))
            .await
            .map_err(|e| BuildError::Store(format!("unpack task: {e}")))?
            .map_err(|e| BuildError::Store(format!("unpack a built layer: {e}")))?;
        Ok(())
    }

    fn deps_record(&self, key: &str) -> PathBuf {
        self.settings
            .cache_dir
            .join("dependencies")
            .join(format!("{key}.json"))
    }

    fn image_record(&self, key: &str) -> PathBuf {
        self.settings
            .cache_dir
            .join("images")
            .join(format!("{key}.json"))
    }

    /// The cached dependency layer, if its record exists and its blob is still in the store.
    fn cached_dependencies(&self, key: &str) -> Result<Option<BuiltLayer>, BuildError> {
        let Some(entry) = read_json::<LayerCacheEntry>(&self.deps_record(key))? else {
            return Ok(None);
        };
        let layer = BuiltLayer {
            digest: entry.digest,
            diff_id: entry.diff_id,
            size: entry.size,
            media_type: entry.media_type,
        };
        Ok(self.store.has_blob(&layer.digest).then_some(layer))
    }

    fn remember_dependencies(&self, key: &str, layer: &BuiltLayer) -> Result<(), BuildError> {
        let entry = LayerCacheEntry {
            digest: layer.digest.clone(),
            diff_id: layer.diff_id.clone(),
            size: layer.size,
            media_type: layer.media_type.clone(),
        };
        write_json(&self.deps_record(key), &entry)
    }

    fn cached_image(&self, key: &str) -> Result<Option<ImageRecord>, BuildError> {
        let Some(entry) = read_json::<ImageCacheEntry>(&self.image_record(key))? else {
            return Ok(None);
        };
        let image = self
            .store
            .get_by_digest(&entry.manifest)
            .map_err(|e| BuildError::Store(e.to_string()))?;
        Ok(image.filter(|i| i.blobs().all(|b| self.store.has_blob(b))))
    }

    fn remember_image(&self, key: &str, manifest: &Digest) -> Result<(), BuildError> {
        write_json(
            &self.image_record(key),
            &ImageCacheEntry {
                manifest: manifest.clone(),
            },
        )
    }
}

fn step_slug(name: &str) -> &str {
    match name {
        "dependencies" => "deps",
        "pre-run" => "prerun",
        other => other,
    }
}

fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

/// `sha256:abcdef012345`.
pub fn short(digest: &Digest) -> String {
    format!("sha256:{}", &digest.hex()[..12])
}

/// `lull.local/<service>@<digest>`.
pub fn local_reference(service: &str, manifest: &Digest) -> Result<Reference, BuildError> {
    format!("lull.local/{service}@{manifest}")
        .parse()
        .map_err(|e| BuildError::Store(format!("image reference for {service}: {e}")))
}

/// Everything that goes into the image: the base, the dependency key, the source, the commands,
/// the env and the run settings.
fn image_cache_key(req: &BuildRequest, source: &BuiltLayer) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &str| {
        h.update(name.as_bytes());
        h.update([0]);
        h.update((value.len() as u64).to_le_bytes());
        h.update(value.as_bytes());
    };
    field("format", IMAGE_FORMAT);
    field("base", &req.base.manifest_digest.to_string());
    field(
        "dependencies",
        req.recipe
            .dependencies
            .as_ref()
            .map_or("", |d| d.cache_key.as_str()),
    );
    field("source", &source.diff_id.to_string());
    for c in &req.recipe.build {
        field("build", c);
    }
    for c in &req.recipe.pre_run {
        field("pre-run", c);
    }
    for (k, v) in &req.recipe.build_env {
        field("build-env", &format!("{k}={v}"));
    }
    for (k, v) in &req.recipe.run_env {
        field("run-env", &format!("{k}={v}"));
    }
    for w in req.recipe.run_command.iter().flatten() {
        field("command", w);
    }
    field("port", &req.recipe.port.to_string());
    for (k, v) in &req.recipe.labels {
        field("label", &format!("{k}={v}"));
    }
    for c in &req.recipe.caches {
        field("cache", &c.display().to_string());
    }
    hex::encode(h.finalize())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, BuildError> {
    match fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BuildError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BuildError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let bytes = serde_json::to_vec(value).map_err(|e| BuildError::Store(e.to_string()))?;
    // A temporary file of its own: two builds with the same inputs may write the same record.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io_err(dir))?;
    tmp.persist(path).map_err(|e| BuildError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Removes a dir tree when dropped (errors ignored: it is scratch space).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
