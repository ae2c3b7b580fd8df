//! The cache of unpacked layers: `<root>/<diff_id hex>/`, one directory per layer.
//!
//! Layout of the root:
//!
//! - `<hex>/`: a complete, verified layer; it only ever appears by an atomic rename;
//! - `.locks/<hex>`: per-layer lock files (`flock`), held while a layer is unpacked or removed,
//!   so threads and processes sharing the root never unpack one layer twice;
//! - `.tmp-<hex>-<pid>-<nonce>/`: a layer being unpacked;
//! - `.rm-<hex>-<pid>-<nonce>/`: a layer being removed (renamed first so it vanishes at once).
//!
//! Leftover `.tmp-` and `.rm-` directories (a crash) are removed by [`LayerCache::open`] when
//! nobody holds their layer's lock.

use std::collections::HashSet;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, RenameFlags};

use super::unpack::{UnpackStats, unpack_layer};
use super::{LayerError, UnpackLimits, sys};
use crate::digest::Digest;

const LOCK_DIR: &str = ".locks";
const TMP_PREFIX: &str = ".tmp-";
const RM_PREFIX: &str = ".rm-";

/// Distinguishes temporary directories made by one process within the same nanosecond.
static NONCE: AtomicU64 = AtomicU64::new(0);

/// Unpacked layers under one root directory (`<data>/layers`).
#[derive(Debug)]
pub struct LayerCache {
    root: PathBuf,
    limits: UnpackLimits,
}

/// What [`LayerCache::ensure_reporting`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The unpacked layer directory, `<root>/<diff_id hex>`.
    pub path: PathBuf,
    /// `Some` if this call unpacked the layer, `None` if it was already there.
    pub unpacked: Option<UnpackStats>,
}

impl LayerCache {
    /// Opens (creating if needed) the cache at `root` and removes temporary directories left
    /// by interrupted unpacks and removals.
    pub fn open(root: impl Into<PathBuf>, limits: UnpackLimits) -> Result<Self, LayerError> {
        let cache = LayerCache {
            root: root.into(),
            limits,
        };
        let locks = cache.root.join(LOCK_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&locks)
            .map_err(|source| LayerError::Dir {
                path: locks.clone(),
                action: "create",
                source,
            })?;
        cache.clean_leftovers()?;
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn limits(&self) -> &UnpackLimits {
        &self.limits
    }

    /// Unpacks the layer blob (compressed as `media_type` says) into `<root>/<diff_id hex>/`
    /// unless it is there already, and returns that directory.
    ///
    /// Idempotent, and safe when threads or processes call it at once for the same layer: one
    /// unpacks while the others wait on the layer's lock, then find the directory. Blocks for
    /// the whole unpack; call it from a blocking thread in async code.
    pub fn ensure(
        &self,
        diff_id: &Digest,
        blob: &Path,
        media_type: &str,
    ) -> Result<PathBuf, LayerError> {
        self.ensure_reporting(diff_id, blob, media_type)
            .map(|e| e.path)
    }

    /// [`ensure`](Self::ensure), also telling whether this call did the unpacking.
    pub fn ensure_reporting(
        &self,
        diff_id: &Digest,
        blob: &Path,
        media_type: &str,
    ) -> Result<Ensured, LayerError> {
        let path = self.layer_path(diff_id);
        if is_real_dir(&path) {
            return Ok(Ensured {
                path,
                unpacked: None,
            });
        }
        let _lock = self
            .lock(diff_id, true)?
            .ok_or_else(|| self.lock_error(diff_id, Errno::EWOULDBLOCK))?;
        if is_real_dir(&path) {
            return Ok(Ensured {
                path,
                unpacked: None,
            });
        }
        let started = Instant::now();
        let tmp = self.scratch_path(TMP_PREFIX, diff_id);
        DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|source| LayerError::Dir {
                path: tmp.clone(),
                action: "create",
                source,
            })?;
        let result = unpack_layer(blob, media_type, diff_id, &tmp, &self.limits)
            .and_then(|stats| self.commit(&tmp, &path).map(|()| stats));
        match result {
            Ok(stats) => {
                tracing::info!(
                    %diff_id,
                    entries = stats.entries,
                    bytes = stats.uncompressed_bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "layer unpacked"
                );
                Ok(Ensured {
                    path,
                    unpacked: Some(stats),
                })
            }
            Err(err) => {
                if let Err(e) = sys::remove_tree(&tmp) {
                    tracing::warn!(path = %tmp.display(), error = %e, "cannot remove refused layer");
                }
                Err(err)
            }
        }
    }

    /// Makes the unpacked tree durable, then renames it into place and makes the rename
    /// durable: a layer directory that exists after a crash is complete.
    fn commit(&self, tmp: &Path, path: &Path) -> Result<(), LayerError> {
        let dir_error = |path: &Path, action, source| LayerError::Dir {
            path: path.to_owned(),
            action,
            source,
        };
        let tmp_dir = open_dir(tmp).map_err(|e| dir_error(tmp, "open", e))?;
        nix::unistd::syncfs(tmp_dir.as_raw_fd()).map_err(|e| dir_error(tmp, "sync", e.into()))?;
        nix::fcntl::renameat2(None, tmp, None, path, RenameFlags::RENAME_NOREPLACE)
            .map_err(|e| dir_error(path, "rename the unpacked layer into place", e.into()))?;
        let root = open_dir(&self.root).map_err(|e| dir_error(&self.root, "open", e))?;
        root.sync_all()
            .map_err(|e| dir_error(&self.root, "sync", e))
    }

    /// The layer's directory if it is unpacked.
    pub fn path(&self, diff_id: &Digest) -> Option<PathBuf> {
        let path = self.layer_path(diff_id);
        is_real_dir(&path).then_some(path)
    }

    /// The unpacked layers, sorted. A root that cannot be read lists as empty (and is logged).
    pub fn list(&self) -> Vec<Digest> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot list layer cache");
                return Vec::new();
            }
        };
        let mut layers: Vec<Digest> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                if !entry.file_type().ok()?.is_dir() {
                    return None;
                }
                Digest::from_hex(entry.file_name().to_str()?).ok()
            })
            .collect();
        layers.sort();
        layers
    }

    /// Removes an unpacked layer; `Ok(false)` if it was not there. Immutable or append-only
    /// inodes, read-only directories and whiteout devices are all handled. Waits for an unpack
    /// of the same layer in progress. The caller makes sure no instance still uses the layer.
    pub fn remove(&self, diff_id: &Digest) -> Result<bool, LayerError> {
        let _lock = self
            .lock(diff_id, true)?
            .ok_or_else(|| self.lock_error(diff_id, Errno::EWOULDBLOCK))?;
        let path = self.layer_path(diff_id);
        if !is_real_dir(&path) {
            return Ok(false);
        }
        let doomed = self.scratch_path(RM_PREFIX, diff_id);
        std::fs::rename(&path, &doomed).map_err(|source| LayerError::Dir {
            path: path.clone(),
            action: "move aside for removal",
            source,
        })?;
        sys::remove_tree(&doomed).map_err(|source| LayerError::Dir {
            path: doomed.clone(),
            action: "remove",
            source,
        })?;
        tracing::info!(%diff_id, "layer removed");
        Ok(true)
    }

    /// Bytes of disk the layer's files occupy (allocated blocks, hardlinks counted once).
    pub fn disk_usage(&self, diff_id: &Digest) -> Result<u64, LayerError> {
        let path = self.layer_path(diff_id);
        let error = |path: &Path, source| LayerError::Dir {
            path: path.to_owned(),
            action: "measure",
            source,
        };
        let mut seen = HashSet::new();
        let mut total = 0;
        let mut stack = vec![path];
        while let Some(dir) = stack.pop() {
            let meta = std::fs::symlink_metadata(&dir).map_err(|e| error(&dir, e))?;
            total += meta.blocks() * 512;
            for entry in std::fs::read_dir(&dir).map_err(|e| error(&dir, e))? {
                let entry = entry.map_err(|e| error(&dir, e))?;
                let meta = entry.metadata().map_err(|e| error(&entry.path(), e))?;
                if meta.is_dir() {
                    stack.push(entry.path());
                } else if meta.nlink() <= 1 || seen.insert((meta.dev(), meta.ino())) {
                    total += meta.blocks() * 512;
                }
            }
        }
        Ok(total)
    }

    fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join(diff_id.hex())
    }

    fn scratch_path(&self, prefix: &str, diff_id: &Digest) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
        self.root.join(format!(
            "{prefix}{}-{}-{nanos:x}{nonce:x}",
            diff_id.hex(),
            std::process::id()
        ))
    }

    /// Takes the layer's exclusive lock; `Ok(None)` if `blocking` is false and it is held.
    fn lock(&self, diff_id: &Digest, blocking: bool) -> Result<Option<Flock<File>>, LayerError> {
        let path = self.root.join(LOCK_DIR).join(diff_id.hex());
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| LayerError::Dir {
                path: path.clone(),
                action: "open lock file",
                source,
            })?;
        let arg = if blocking {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        loop {
            match Flock::lock(file, arg) {
                Ok(lock) => return Ok(Some(lock)),
                Err((returned, Errno::EINTR)) => file = returned,
                Err((_, Errno::EWOULDBLOCK)) if !blocking => return Ok(None),
                Err((_, errno)) => return Err(self.lock_error(diff_id, errno)),
            }
        }
    }

    fn lock_error(&self, diff_id: &Digest, errno: Errno) -> LayerError {
        LayerError::Dir {
            path: self.root.join(LOCK_DIR).join(diff_id.hex()),
            action: "lock",
            source: errno.into(),
        }
    }

    fn clean_leftovers(&self) -> Result<(), LayerError> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| LayerError::Dir {
            path: self.root.clone(),
            action: "list",
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| LayerError::Dir {
                path: self.root.clone(),
                action: "list",
                source,
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name
                .strip_prefix(TMP_PREFIX)
                .or_else(|| name.strip_prefix(RM_PREFIX))
            else {
                continue;
            };
            let Some(diff_id) = rest.get(..64).and_then(|hex| Digest::from_hex(hex).ok()) else {
                tracing::warn!(path = %entry.path().display(), "unexpected entry in layer cache left alone");
                continue;
            };
            // Held: another thread or process is working on it right now.
            let Some(_lock) = self.lock(&diff_id, false)? else {
                continue;
            };
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing leftover temporary layer directory");
            sys::remove_tree(&path).map_err(|source| LayerError::Dir {
                path: path.clone(),
                action: "remove",
                source,
            })?;
        }
        Ok(())
    }
}

fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}
