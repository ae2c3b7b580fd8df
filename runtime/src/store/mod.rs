//! The image store: content-addressed blobs plus image records, under one data directory.
//!
//! Layout (`<data>` defaults to [`DEFAULT_DATA_DIR`]):
//! - `<data>/blobs/sha256/<hex>`: blobs (manifests, configs, layers as pulled), verified;
//! - `<data>/blobs/tmp/`: ingests in progress, emptied at open;
//! - `<data>/images/<manifest hex>.json`: one [`ImageRecord`] per image manifest;
//! - `<data>/images/refs.json`: the refs index, reference → manifest digest, written atomically.
//!
//! Invariants: a blob file holds exactly the bytes its name hashes to; every record's blobs are
//! present before the record is written; the refs index is the source of truth for references,
//! and a record no reference points at is deleted (its blobs go at the next [`ImageStore::gc`]).
//! The store never unpacks layers: the layer unpacker reads `blob_path(layer.digest)`.
//!
//! Records come from pulls (`crate::pull`), imports (`crate::import`) and builds
//! ([`ImageStore::commit_built`], whose layers a builder ingests first while holding an
//! [`IngestGuard`]); `crate::export` and `crate::push` read them back out.
//!
//! Pulls and imports hold a shared lock for their whole duration and `gc` an exclusive one, so a
//! collection never deletes the blobs of an image being fetched.

pub mod blob;
pub mod built;
pub mod image;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::reference::{Reference, ReferenceError};

pub use blob::{BlobError, BlobStore, PendingBlob};
pub use built::{BuiltLayer, HistoryEntry, ImageConfigEdit};
pub use image::{
    Compression, Descriptor, ImageConfig, ImageError, ImageIndex, ImageManifest, ImageRecord,
    LayerRecord, Manifest, Platform, media_types,
};

/// Where lull keeps its data unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/lull";

const REFS_FILE: &str = "refs.json";
const TMP_PREFIX: &str = ".tmp-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("cannot create directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path} is not valid json")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("refs index {path} holds an invalid reference {reference:?}")]
    IndexReference {
        path: PathBuf,
        reference: String,
        source: ReferenceError,
    },
    #[error("reference {reference} points at manifest {digest} but its record is missing")]
    RecordMissing { reference: String, digest: Digest },
    #[error("no image is tagged {reference}")]
    UnknownReference { reference: Reference },
    #[error("no image with manifest digest {digest}")]
    UnknownDigest { digest: Digest },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("base image config is not valid json")]
    BaseConfig { source: serde_json::Error },
    #[error("cannot edit image config: {reason}")]
    ConfigEdit { reason: String },
    #[error("invalid built image: {what}")]
    BuiltImage { what: String, source: ImageError },
    #[error("built image config {config} lists {diff_ids} diff_ids for {layers} layers")]
    DiffIdCount {
        config: Digest,
        diff_ids: usize,
        layers: usize,
    },
    #[error(
        "built image config {config} has diff_id {config_diff_id} at position {position}, the layer there has {layer_diff_id}"
    )]
    DiffIdMismatch {
        config: Digest,
        position: usize,
        config_diff_id: Digest,
        layer_diff_id: Digest,
    },
    #[error("layer blob {digest} is not in the store (expected at {path})")]
    LayerMissing { digest: Digest, path: PathBuf },
    #[error("layer blob {path} is {actual} bytes, the built layer {digest} says {expected}")]
    LayerSize {
        digest: Digest,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("a built image needs at least one reference to tag it with")]
    NoReference,
    #[error("the ingest guard passed to the store at {data_dir} belongs to another store")]
    ForeignGuard { data_dir: PathBuf },
}

/// Proof that the holder keeps [`ImageStore::gc`] out (a shared hold on the store's ingest
/// lock): take it before ingesting blobs that no record lists yet, keep it until the record
/// is committed. Never await another [`ImageStore`] operation that takes the lock (pull,
/// import, export, push) while holding it: a waiting gc would make that wait forever.
pub struct IngestGuard<'a> {
    _lock: tokio::sync::RwLockReadGuard<'a, ()>,
    inner: &'a Inner,
}

impl std::fmt::Debug for IngestGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestGuard")
            .field("data_dir", &self.inner.data_dir)
            .finish()
    }
}

/// What [`ImageStore::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub manifest_digest: Digest,
    /// True when no reference was left, so the record itself was deleted.
    pub record_removed: bool,
}

/// What [`ImageStore::gc`] deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed_blobs: Vec<Digest>,
    pub freed_bytes: u64,
    /// Records no reference pointed at (left by an interrupted write).
    pub removed_records: Vec<Digest>,
}

#[derive(Default, Serialize, Deserialize)]
struct RefsFile {
    refs: BTreeMap<String, Digest>,
}

struct Inner {
    data_dir: PathBuf,
    images_dir: PathBuf,
    blobs: BlobStore,
    /// Shared by pulls and imports, exclusive for gc.
    gc_lock: tokio::sync::RwLock<()>,
    /// Serialises changes to records and the refs index.
    meta: Mutex<()>,
}

/// A handle on the store; cheap to clone, all clones share locks.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("data_dir", &self.inner.data_dir)
            .finish()
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store under `data_dir` and removes leftovers of
    /// interrupted writes. Open one store per data directory per process.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<ImageStore, StoreError> {
        let data_dir = data_dir.as_ref().to_owned();
        let images_dir = data_dir.join("images");
        fs::create_dir_all(&images_dir).map_err(|source| StoreError::CreateDir {
            path: images_dir.clone(),
            source,
        })?;
        let blobs = BlobStore::open(&data_dir.join("blobs"))?;
        for entry in fs::read_dir(&images_dir).map_err(|source| StoreError::Read {
            path: images_dir.clone(),
            source,
        })? {
            let entry = entry.map_err(|source| StoreError::Read {
                path: images_dir.clone(),
                source,
            })?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(StoreError::Remove { path, source }),
                }
            }
        }
        Ok(ImageStore {
            inner: Arc::new(Inner {
                data_dir,
                images_dir,
                blobs,
                gc_lock: tokio::sync::RwLock::new(()),
                meta: Mutex::new(()),
            }),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The blob area, for ingesting content.
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// Where the blob with this digest lives (present once any record lists it).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.blobs.path(digest)
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.inner.blobs.contains(digest)
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.inner.images_dir.join(format!("{}.json", digest.hex()))
    }

    fn refs_path(&self) -> PathBuf {
        self.inner.images_dir.join(REFS_FILE)
    }

    fn lock_meta(&self) -> MutexGuard<'_, ()> {
        self.inner
            .meta
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps gc out until the guard is dropped; see [`IngestGuard`].
    pub async fn hold_ingest(&self) -> IngestGuard<'_> {
        IngestGuard {
            _lock: self.inner.gc_lock.read().await,
            inner: &self.inner,
        }
    }

    /// Held by pulls and imports while they fetch blobs and write the record.
    pub(crate) async fn ingest_lock(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.inner.gc_lock.read().await
    }

    fn load_refs(&self) -> Result<BTreeMap<Reference, Digest>, StoreError> {
        let path = self.refs_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let file: RefsFile =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
                path: path.clone(),
                source,
            })?;
        let mut refs = BTreeMap::new();
        for (text, digest) in file.refs {
            let reference =
                text.parse::<Reference>()
                    .map_err(|source| StoreError::IndexReference {
                        path: path.clone(),
                        reference: text.clone(),
                        source,
                    })?;
            refs.insert(reference, digest);
        }
        Ok(refs)
    }

    fn save_refs(&self, refs: &BTreeMap<Reference, Digest>) -> Result<(), StoreError> {
        let file = RefsFile {
            refs: refs
                .iter()
                .map(|(r, d)| (r.to_string(), d.clone()))
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|source| StoreError::Parse {
            path: self.refs_path(),
            source,
        })?;
        self.write_atomic(&self.refs_path(), &json)
    }

    /// Writes `bytes` to a temporary file next to `path`, fsyncs it and renames it over `path`.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = &self.inner.images_dir;
        let write_err = |source| StoreError::Write {
            path: path.to_owned(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(dir)
            .map_err(write_err)?;
        tmp.write_all(bytes).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(path).map_err(|e| write_err(e.error))?;
        blob::sync_dir(dir)?;
        Ok(())
    }

    fn read_record_file(&self, digest: &Digest) -> Result<Option<ImageRecord>, StoreError> {
        let path = self.record_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let record = serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
            path: path.clone(),
            source,
        })?;
        Ok(Some(record))
    }

    fn with_references(mut record: ImageRecord, refs: &BTreeMap<Reference, Digest>) -> ImageRecord {
        record.references = refs
            .iter()
            .filter(|(_, d)| **d == record.manifest_digest)
            .map(|(r, _)| r.clone())
            .collect();
        record
    }

    /// The image a reference points at. A reference with a digest that is not in the refs index
    /// still finds the image with that manifest (or index) digest.
    pub fn get(&self, reference: &Reference) -> Result<Option<ImageRecord>, StoreError> {
        let _meta = self.lock_meta();
        let refs = self.load_refs()?;
        if let Some(digest) = refs.get(reference) {
            let record =
                self.read_record_file(digest)?
                    .ok_or_else(|| StoreError::RecordMissing {
                        reference: reference.to_string(),
                        digest: digest.clone(),
                    })?;
            return Ok(Some(Self::with_references(record, &refs)));
        }
        match reference.digest() {
            Some(digest) => self.get_by_digest_locked(digest, &refs),
            None => Ok(None),
        }
    }

    /// The image whose manifest (or, failing that, index) digest is `digest`.
    pub fn get_by_digest(&self, digest: &Digest) -> Result<Option<ImageRecord>, StoreError> {
        let _meta = self.lock_meta();
        let refs = self.load_refs()?;
        self.get_by_digest_locked(digest, &refs)
    }

    fn get_by_digest_locked(
        &self,
        digest: &Digest,
        refs: &BTreeMap<Reference, Digest>,
    ) -> Result<Option<ImageRecord>, StoreError> {
        if let Some(record) = self.read_record_file(digest)? {
            return Ok(Some(Self::with_references(record, refs)));
        }
        for record in self.all_records()? {
            if record.index_digest.as_ref() == Some(digest) {
                return Ok(Some(Self::with_references(record, refs)));
            }
        }
        Ok(None)
    }

    fn record_digests(&self) -> Result<Vec<Digest>, StoreError> {
        let dir = &self.inner.images_dir;
        let read_err = |source| StoreError::Read {
            path: dir.clone(),
            source,
        };
        let mut digests = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let name = entry.map_err(read_err)?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".json")
                && let Ok(digest) = Digest::from_hex(hex)
            {
                digests.push(digest);
            }
        }
        digests.sort();
        Ok(digests)
    }

    fn all_records(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut records = Vec::new();
        for digest in self.record_digests()? {
            if let Some(record) = self.read_record_file(&digest)? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Every image that at least one reference points at, by manifest digest.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let _meta = self.lock_meta();
        let refs = self.load_refs()?;
        let digests: BTreeSet<&Digest> = refs.values().collect();
        let mut records = Vec::with_capacity(digests.len());
        for digest in digests {
            let record =
                self.read_record_file(digest)?
                    .ok_or_else(|| StoreError::RecordMissing {
                        reference: refs
                            .iter()
                            .find(|(_, d)| *d == digest)
                            .map(|(r, _)| r.to_string())
                            .unwrap_or_default(),
                        digest: digest.clone(),
                    })?;
            records.push(Self::with_references(record, &refs));
        }
        Ok(records)
    }

    /// Writes `record` and points every reference in `references` at it. A record left without
    /// any reference by this retagging is deleted. The caller must hold the ingest lock and have
    /// ingested every blob the record lists.
    pub(crate) fn commit_record(
        &self,
        record: &ImageRecord,
        references: &[Reference],
    ) -> Result<ImageRecord, StoreError> {
        let _meta = self.lock_meta();
        let mut stored = record.clone();
        stored.references.clear();
        let json = serde_json::to_vec_pretty(&stored).map_err(|source| StoreError::Parse {
            path: self.record_path(&record.manifest_digest),
            source,
        })?;
        self.write_atomic(&self.record_path(&record.manifest_digest), &json)?;

        let mut refs = self.load_refs()?;
        let mut displaced = BTreeSet::new();
        for reference in references {
            if let Some(old) = refs.insert(reference.clone(), record.manifest_digest.clone())
                && old != record.manifest_digest
            {
                displaced.insert(old);
            }
        }
        self.save_refs(&refs)?;
        for old in displaced {
            if !refs.values().any(|d| *d == old) {
                self.remove_record_file(&old)?;
            }
        }
        Ok(Self::with_references(stored, &refs))
    }

    /// Points another reference at an image already in the store.
    pub fn tag(
        &self,
        manifest_digest: &Digest,
        reference: &Reference,
    ) -> Result<ImageRecord, StoreError> {
        let record =
            self.read_record_file(manifest_digest)?
                .ok_or_else(|| StoreError::UnknownDigest {
                    digest: manifest_digest.clone(),
                })?;
        self.commit_record(&record, std::slice::from_ref(reference))
    }

    fn remove_record_file(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.record_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Remove { path, source }),
        }
    }

    /// Removes a reference; when no reference is left on its image, the record goes too (its
    /// blobs are deleted by the next [`ImageStore::gc`]).
    pub fn remove(&self, reference: &Reference) -> Result<Removed, StoreError> {
        let _meta = self.lock_meta();
        let mut refs = self.load_refs()?;
        let digest = refs
            .remove(reference)
            .ok_or_else(|| StoreError::UnknownReference {
                reference: reference.clone(),
            })?;
        self.save_refs(&refs)?;
        let record_removed = !refs.values().any(|d| *d == digest);
        if record_removed {
            self.remove_record_file(&digest)?;
        }
        Ok(Removed {
            manifest_digest: digest,
            record_removed,
        })
    }

    /// The diff_ids of every layer some image record uses: unpacked layers not in this set can
    /// be removed by the caller.
    pub fn referenced_diff_ids(&self) -> Result<BTreeSet<Digest>, StoreError> {
        let _meta = self.lock_meta();
        Ok(self
            .all_records()?
            .into_iter()
            .flat_map(|r| r.layers.into_iter().map(|l| l.diff_id))
            .collect())
    }

    /// Removes every blob no image record references (and records no reference points at).
    /// Waits for pulls and imports in progress to finish first.
    pub async fn gc(&self) -> Result<GcReport, StoreError> {
        let _exclusive = self.inner.gc_lock.write().await;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.gc_blocking())
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn gc_blocking(&self) -> Result<GcReport, StoreError> {
        let _meta = self.lock_meta();
        let mut report = GcReport::default();
        let refs = self.load_refs()?;
        let live: BTreeSet<&Digest> = refs.values().collect();
        let mut keep = BTreeSet::new();
        for record in self.all_records()? {
            if live.contains(&record.manifest_digest) {
                keep.extend(record.blobs().cloned());
            } else {
                self.remove_record_file(&record.manifest_digest)?;
                report.removed_records.push(record.manifest_digest.clone());
            }
        }
        let dir = self.inner.blobs.sha256_dir();
        let read_err = |source| StoreError::Read {
            path: dir.to_owned(),
            source,
        };
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name();
            let Ok(digest) = Digest::from_hex(&name.to_string_lossy()) else {
                tracing::warn!(path = %entry.path().display(), "ignoring unexpected file in blob store");
                continue;
            };
            if keep.contains(&digest) {
                continue;
            }
            let path = entry.path();
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Remove { path, source }),
            }
            tracing::debug!(%digest, size, "removed unreferenced blob");
            report.freed_bytes += size;
            report.removed_blobs.push(digest);
        }
        report.removed_blobs.sort();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(store: &ImageStore, content: &[u8]) -> LayerRecord {
        let (digest, size) = store.blobs().ingest_bytes(content, None).unwrap();
        LayerRecord {
            diff_id: digest.clone(),
            digest,
            media_type: media_types::OCI_LAYER.into(),
            size,
        }
    }

    /// Stores a fake image (manifest/config blobs are arbitrary bytes here).
    fn fake_image(store: &ImageStore, name: &str, layers: &[&[u8]]) -> ImageRecord {
        let (manifest_digest, _) = store
            .blobs()
            .ingest_bytes(format!("manifest {name}").as_bytes(), None)
            .unwrap();
        let (config_digest, _) = store
            .blobs()
            .ingest_bytes(format!("config {name}").as_bytes(), None)
            .unwrap();
        ImageRecord {
            references: vec![],
            manifest_digest,
            manifest_media_type: media_types::OCI_MANIFEST.into(),
            index_digest: None,
            config_digest,
            config: ImageConfig::default(),
            layers: layers.iter().map(|l| layer(store, l)).collect(),
        }
    }

    fn r(s: &str) -> Reference {
        s.parse().unwrap()
    }

    #[test]
    fn refs_index_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let image = fake_image(&store, "a", &[b"layer one"]);
        let committed = store
            .commit_record(&image, &[r("app:v1"), r("127.0.0.1:5000/app:v1")])
            .unwrap();
        assert_eq!(committed.references.len(), 2);
        drop(store);

        // A stale temp file from an interrupted index write is cleaned at open.
        fs::write(dir.path().join("images/.tmp-stale"), b"{").unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        assert!(!dir.path().join("images/.tmp-stale").exists());
        let got = store.get(&r("docker.io/library/app:v1")).unwrap().unwrap();
        assert_eq!(got.manifest_digest, image.manifest_digest);
        assert_eq!(
            got.references,
            vec![r("127.0.0.1:5000/app:v1"), r("docker.io/library/app:v1")]
        );
        assert_eq!(got.layers, image.layers);
        assert!(store.get(&r("app:v2")).unwrap().is_none());
        let by_digest = store
            .get_by_digest(&image.manifest_digest)
            .unwrap()
            .unwrap();
        assert_eq!(by_digest, got);
        let pinned = r("app:v1").with_digest(image.manifest_digest.clone());
        assert_eq!(store.get(&pinned).unwrap().unwrap(), got);
        assert_eq!(store.list().unwrap(), vec![got]);
    }

    #[tokio::test]
    async fn gc_removes_exactly_unreferenced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let shared: &[u8] = b"shared base layer";
        let a = fake_image(&store, "a", &[shared, b"a only"]);
        let b = fake_image(&store, "b", &[shared, b"b only"]);
        store.commit_record(&a, &[r("a:1"), r("a:2")]).unwrap();
        store.commit_record(&b, &[r("b:1")]).unwrap();
        let (stray, _) = store.blobs().ingest_bytes(b"stray blob", None).unwrap();

        let report = store.gc().await.unwrap();
        assert_eq!(report.removed_blobs, vec![stray.clone()]);
        assert_eq!(report.freed_bytes, b"stray blob".len() as u64);
        assert!(!store.has_blob(&stray));

        // Removing one of two tags keeps the record and every blob.
        let removed = store.remove(&r("a:1")).unwrap();
        assert!(!removed.record_removed);
        assert!(store.gc().await.unwrap().removed_blobs.is_empty());

        // Removing the last tag drops the record; gc then removes a's own blobs, not shared ones.
        let removed = store.remove(&r("a:2")).unwrap();
        assert!(removed.record_removed);
        assert_eq!(removed.manifest_digest, a.manifest_digest);
        assert!(store.get_by_digest(&a.manifest_digest).unwrap().is_none());
        let diff_ids = store.referenced_diff_ids().unwrap();
        assert!(diff_ids.contains(&a.layers[0].diff_id));
        assert!(!diff_ids.contains(&a.layers[1].diff_id));

        let report = store.gc().await.unwrap();
        let mut expected = vec![
            a.manifest_digest.clone(),
            a.config_digest.clone(),
            a.layers[1].digest.clone(),
        ];
        expected.sort();
        assert_eq!(report.removed_blobs, expected);
        for digest in b.blobs() {
            assert!(store.has_blob(digest), "{digest} of b must survive");
        }
        assert!(matches!(
            store.remove(&r("a:2")),
            Err(StoreError::UnknownReference { .. })
        ));
    }

    #[test]
    fn retagging_drops_the_orphaned_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let old = fake_image(&store, "old", &[b"x"]);
        let new = fake_image(&store, "new", &[b"y"]);
        store.commit_record(&old, &[r("app:latest")]).unwrap();
        store.commit_record(&new, &[r("app:latest")]).unwrap();
        assert!(store.get_by_digest(&old.manifest_digest).unwrap().is_none());
        assert_eq!(
            store.get(&r("app")).unwrap().unwrap().manifest_digest,
            new.manifest_digest
        );
    }
}
