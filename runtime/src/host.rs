//! The runtime as one object: the image store, the layer cache and the instance manager over one
//! data dir, with the operations that span them (prepare an image's layers, run an image,
//! garbage-collect what nothing uses).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::digest::Digest;
use crate::instance::config::{LaunchConfig, read_json};
use crate::instance::{ImageProcess, InstanceError, InstanceManager, InstancesConfig};
use crate::layers::{LayerCache, LayerError, UnpackLimits};
use crate::store::{GcReport, ImageRecord, ImageStore, StoreError};

/// Where the runtime keeps things, and how it starts its zygote.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Persistent data: blobs, image records, unpacked layers, instance dirs (default `/var/lib/lull`).
    pub data_dir: PathBuf,
    /// Runtime state that a reboot clears: libcontainer state, network namespaces (default `/run/lull`).
    pub run_dir: PathBuf,
    /// Parent cgroup of every instance (default `/lull`).
    pub cgroup_parent: String,
    /// The program serving the zygote and its arguments (default: this executable, `__zygote`).
    pub zygote_program: PathBuf,
    pub zygote_args: Vec<String>,
    pub unpack_limits: UnpackLimits,
}

pub const DEFAULT_DATA_DIR: &str = "/var/lib/lull";
pub const DEFAULT_RUN_DIR: &str = "/run/lull";
pub const DEFAULT_CGROUP_PARENT: &str = "/lull";
/// The argument that makes the `lull` binary serve as the zygote.
pub const ZYGOTE_ARG: &str = "__zygote";

impl RuntimeConfig {
    /// Defaults for `data_dir` and `run_dir`, the zygote being this executable.
    pub fn new(data_dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        Ok(RuntimeConfig {
            data_dir: data_dir.into(),
            run_dir: run_dir.into(),
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_owned(),
            zygote_program: std::env::current_exe()?,
            zygote_args: vec![ZYGOTE_ARG.to_owned()],
            unpack_limits: UnpackLimits::default(),
        })
    }

    pub fn instances_dir(&self) -> PathBuf {
        self.data_dir.join("instances")
    }
    pub fn layers_dir(&self) -> PathBuf {
        self.data_dir.join("layers")
    }
    pub fn netns_dir(&self) -> PathBuf {
        self.run_dir.join("netns")
    }
    pub fn state_root(&self) -> PathBuf {
        self.run_dir.join("containers")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("image {image}: layer {diff_id}: {message}")]
    Prepare {
        image: Digest,
        diff_id: Digest,
        message: String,
    },
    #[error("cannot tell which layers instances use: {path}: {message}")]
    InUse { path: PathBuf, message: String },
    #[error("remove layer {diff_id}: {message}")]
    RemoveLayer { diff_id: Digest, message: String },
}

/// What a garbage collection removed.
#[derive(Debug, Default)]
pub struct CollectReport {
    pub store: GcReport,
    /// Unpacked layers removed.
    pub layers: Vec<Digest>,
    /// Unpacked layers kept because an instance still uses them though no image refers to them.
    pub layers_in_use: usize,
}

/// The image store, layer cache and instance manager of one data dir.
pub struct Runtime {
    pub config: RuntimeConfig,
    pub store: ImageStore,
    pub layers: Arc<LayerCache>,
    pub instances: InstanceManager,
}

impl Runtime {
    pub fn open(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let store = ImageStore::open(&config.data_dir)?;
        let layers = Arc::new(LayerCache::open(config.layers_dir(), config.unpack_limits)?);
        let instances = InstanceManager::new(InstancesConfig {
            instances_dir: config.instances_dir(),
            layers_dir: config.layers_dir(),
            state_root: config.state_root(),
            cgroup_parent: config.cgroup_parent.clone(),
            zygote_program: config.zygote_program.clone(),
            zygote_args: config.zygote_args.clone(),
        })?;
        Ok(Runtime {
            config,
            store,
            layers,
            instances,
        })
    }

    /// Unpacks the image's layers that are not unpacked yet (in parallel); returns the layer
    /// dir names, lowest first, as [`InstanceRequest::layers`](crate::instance::InstanceRequest).
    pub async fn prepare(&self, image: &ImageRecord) -> Result<Vec<String>, RuntimeError> {
        let mut tasks = Vec::new();
        for layer in &image.layers {
            let cache = self.layers.clone();
            let blob = self.store.blob_path(&layer.digest);
            let (diff_id, media_type) = (layer.diff_id.clone(), layer.media_type.clone());
            tasks.push(tokio::task::spawn_blocking(move || {
                cache.ensure(&diff_id, &blob, &media_type)
            }));
        }
        let mut names = Vec::with_capacity(tasks.len());
        for (task, layer) in tasks.into_iter().zip(&image.layers) {
            let joined = task.await.map_err(|e| RuntimeError::Prepare {
                image: image.manifest_digest.clone(),
                diff_id: layer.diff_id.clone(),
                message: e.to_string(),
            })?;
            joined?;
            names.push(layer.diff_id.hex().to_owned());
        }
        Ok(names)
    }

    /// The process settings of an image's config.
    pub fn image_process(image: &ImageRecord) -> ImageProcess {
        let c = &image.config;
        ImageProcess {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c.env.clone(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            user: c.user.clone().unwrap_or_default(),
        }
    }

    /// Layers that instances on this host use (read from their launch files), whatever the
    /// image records say. An instance whose launch file cannot be read makes this an error:
    /// removing a layer under a mounted overlay is worse than keeping one too many.
    pub fn layers_in_use(&self) -> Result<BTreeSet<String>, RuntimeError> {
        let dir = self.config.instances_dir();
        let unreadable = |path: &std::path::Path, e: std::io::Error| RuntimeError::InUse {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let mut used = BTreeSet::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(used),
            Err(e) => return Err(unreadable(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| unreadable(&dir, e))?;
            let launch = entry.path().join("launch.json");
            match read_json::<LaunchConfig>(&launch) {
                Ok(Some(config)) => used.extend(config.layers),
                // Not launched yet or already being removed: no layer of its own to protect.
                Ok(None) => {}
                Err(e) => return Err(unreadable(&launch, e)),
            }
        }
        Ok(used)
    }

    /// Removes blobs no image refers to, and unpacked layers that neither an image nor an
    /// instance uses.
    pub async fn collect_garbage(&self) -> Result<CollectReport, RuntimeError> {
        let store = self.store.gc().await?;
        let referenced = self.store.referenced_diff_ids()?;
        let in_use = self.layers_in_use()?;
        let mut report = CollectReport {
            store,
            ..Default::default()
        };
        for diff_id in self.layers.list() {
            if referenced.contains(&diff_id) {
                continue;
            }
            if in_use.contains(diff_id.hex()) {
                report.layers_in_use += 1;
                continue;
            }
            let cache = self.layers.clone();
            let id = diff_id.clone();
            let removed = tokio::task::spawn_blocking(move || cache.remove(&id))
                .await
                .map_err(|e| RuntimeError::RemoveLayer {
                    diff_id: diff_id.clone(),
                    message: e.to_string(),
                })??;
            if removed {
                report.layers.push(diff_id);
            }
        }
        Ok(report)
    }
}
