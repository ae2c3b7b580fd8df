//! Exporting an image from the store as an OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/<hex>`), the format `umoci`, `skopeo copy oci:` and lull's own
//! [`ImageStore::import_oci_layout`] read.
//!
//! Blobs are hard-linked from the store when the directory is on the same file system (so an
//! export costs no space; never modify an exported blob in place), copied otherwise. The
//! manifest is exported as stored, so its digest is the image's. A directory that already is an
//! OCI layout gets the image added, `index.json` replaced atomically; any other non-empty
//! directory is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::digest::Digest;
use crate::import::REF_NAME_ANNOTATION;
use crate::reference::Reference;
use crate::store::{ImageRecord, ImageStore, StoreError, media_types};

const LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";
const TMP_PREFIX: &str = ".tmp-lull-";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no image {image} in the store")]
    NoSuchImage { image: ImageSelector },
    #[error("{dir} is neither empty nor an OCI image layout; refusing to export into it")]
    NotEmpty { dir: PathBuf },
    #[error("{dir} is an OCI image layout lull cannot add to: {reason}")]
    BadLayout { dir: PathBuf, reason: String },
    #[error("{path} is not valid json")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot create directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("blob {digest} of the image is missing from the store at {path}")]
    BlobMissing { digest: Digest, path: PathBuf },
    #[error("cannot copy blob {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which image to export: by reference (a reference with a digest also finds an untagged
/// image) or by manifest digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSelector {
    Reference(Reference),
    Digest(Digest),
}

impl fmt::Display for ImageSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSelector::Reference(r) => write!(f, "{r}"),
            ImageSelector::Digest(d) => write!(f, "{d}"),
        }
    }
}

impl From<Reference> for ImageSelector {
    fn from(reference: Reference) -> Self {
        ImageSelector::Reference(reference)
    }
}

impl From<Digest> for ImageSelector {
    fn from(digest: Digest) -> Self {
        ImageSelector::Digest(digest)
    }
}

/// What [`ImageStore::export_oci_layout`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    pub manifest_digest: Digest,
    /// Blobs hard-linked from the store.
    pub linked: usize,
    /// Blobs copied (another file system).
    pub copied: usize,
    /// Blobs the layout already held.
    pub present: usize,
    /// Entries of `index.json` after the export.
    pub index_entries: usize,
}

impl ImageStore {
    /// Exports `image` as an OCI image layout at `dir` (created if missing), its `index.json`
    /// entry named `ref_name` (the `org.opencontainers.image.ref.name` annotation, e.g.
    /// `latest`; an entry of the same name is replaced). Holds gc off while it runs.
    pub async fn export_oci_layout(
        &self,
        image: impl Into<ImageSelector>,
        dir: &Path,
        ref_name: Option<&str>,
    ) -> Result<ExportReport, ExportError> {
        let selector = image.into();
        let _ingest = self.ingest_lock().await;
        let store = self.clone();
        let dir = dir.to_owned();
        let ref_name = ref_name.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let record = match &selector {
                ImageSelector::Reference(r) => store.get(r)?,
                ImageSelector::Digest(d) => store.get_by_digest(d)?,
            }
            .ok_or_else(|| ExportError::NoSuchImage {
                image: selector.clone(),
            })?;
            export(&store, &record, &dir, ref_name.as_deref())
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Whether `dir` may be exported into: `Some(index)` for an existing layout (its index.json
/// as json, `None` if it has none yet), `None` for a missing or empty directory.
fn existing_layout(dir: &Path) -> Result<Option<Option<Value>>, ExportError> {
    let mut entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ExportError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    if entries.next().is_none() {
        return Ok(None);
    }
    let layout_path = dir.join(LAYOUT_FILE);
    let layout = match fs::read(&layout_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ExportError::NotEmpty {
                dir: dir.to_owned(),
            });
        }
        Err(source) => {
            return Err(ExportError::Read {
                path: layout_path,
                source,
            });
        }
    };
    let layout: Value = serde_json::from_slice(&layout).map_err(|source| ExportError::Json {
        path: layout_path.clone(),
        source,
    })?;
    if layout.get("imageLayoutVersion").and_then(Value::as_str) != Some("1.0.0") {
        return Err(ExportError::BadLayout {
            dir: dir.to_owned(),
            reason: format!(
                "{} does not declare imageLayoutVersion 1.0.0",
                layout_path.display()
            ),
        });
    }
    let index_path = dir.join(INDEX_FILE);
    let index = match fs::read(&index_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(None)),
        Err(source) => {
            return Err(ExportError::Read {
                path: index_path,
                source,
            });
        }
    };
    let index: Value = serde_json::from_slice(&index).map_err(|source| ExportError::Json {
        path: index_path.clone(),
        source,
    })?;
    if !index.get("manifests").is_some_and(Value::is_array) {
        return Err(ExportError::BadLayout {
            dir: dir.to_owned(),
            reason: format!("{} has no manifests list", index_path.display()),
        });
    }
    Ok(Some(Some(index)))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let write_err = |source| ExportError::Write {
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
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), ExportError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ExportError::Write {
            path: dir.to_owned(),
            source,
        })
}

enum Placed {
    Linked,
    Copied,
    Present,
}

/// Puts the store's blob `digest` at `to`: already there with the right size, hard-linked, or
/// copied through a temporary file.
fn place_blob(store: &ImageStore, digest: &Digest, to: &Path) -> Result<Placed, ExportError> {
    let from = store.blob_path(digest);
    let size = match fs::metadata(&from) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ExportError::BlobMissing {
                digest: digest.clone(),
                path: from,
            });
        }
        Err(source) => return Err(ExportError::Read { path: from, source }),
    };
    if fs::metadata(to).is_ok_and(|m| m.is_file() && m.len() == size) {
        return Ok(Placed::Present);
    }
    if fs::hard_link(&from, to).is_ok() {
        return Ok(Placed::Linked);
    }
    // Another file system (EXDEV), a file of the wrong size in the way, or links not allowed.
    let copy_err = |source| ExportError::Copy {
        from: from.clone(),
        to: to.to_owned(),
        source,
    };
    let dir = to.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(dir)
        .map_err(copy_err)?;
    let mut source = File::open(&from).map_err(copy_err)?;
    io::copy(&mut source, tmp.as_file_mut()).map_err(copy_err)?;
    tmp.as_file().sync_all().map_err(copy_err)?;
    tmp.persist(to).map_err(|e| copy_err(e.error))?;
    Ok(Placed::Copied)
}

fn export(
    store: &ImageStore,
    record: &ImageRecord,
    dir: &Path,
    ref_name: Option<&str>,
) -> Result<ExportReport, ExportError> {
    let existing = existing_layout(dir)?;
    let blobs_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs_dir).map_err(|source| ExportError::CreateDir {
        path: blobs_dir.clone(),
        source,
    })?;
    if existing.is_none() {
        write_atomic(&dir.join(LAYOUT_FILE), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }

    let mut report = ExportReport {
        manifest_digest: record.manifest_digest.clone(),
        linked: 0,
        copied: 0,
        present: 0,
        index_entries: 0,
    };
    // Layers and config first, the manifest last: a layout never names a blob it lacks.
    let digests = record
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&record.config_digest, &record.manifest_digest]);
    for digest in digests {
        match place_blob(store, digest, &blobs_dir.join(digest.hex()))? {
            Placed::Linked => report.linked += 1,
            Placed::Copied => report.copied += 1,
            Placed::Present => report.present += 1,
        }
    }
    sync_dir(&blobs_dir)?;

    let manifest_path = store.blob_path(&record.manifest_digest);
    let manifest_size = fs::metadata(&manifest_path)
        .map_err(|source| ExportError::Read {
            path: manifest_path,
            source,
        })?
        .len();
    let mut entry = json!({
        "mediaType": record.manifest_media_type,
        "digest": record.manifest_digest.to_string(),
        "size": manifest_size,
    });
    if let Some(name) = ref_name {
        entry["annotations"] = json!({ REF_NAME_ANNOTATION: name });
    }
    if !record.config.os.is_empty() && !record.config.architecture.is_empty() {
        entry["platform"] = json!({
            "architecture": record.config.architecture,
            "os": record.config.os,
        });
    }

    let mut index = existing.flatten().unwrap_or_else(|| {
        json!({
            "schemaVersion": 2,
            "mediaType": media_types::OCI_INDEX,
            "manifests": [],
        })
    });
    let manifests = index
        .get_mut("manifests")
        .and_then(Value::as_array_mut)
        .expect("checked by existing_layout or built above");
    let digest_text = record.manifest_digest.to_string();
    manifests.retain(|e| {
        let name = e
            .get("annotations")
            .and_then(|a| a.get(REF_NAME_ANNOTATION))
            .and_then(Value::as_str);
        match ref_name {
            // Names are unique in a layout: the new entry replaces the old one.
            Some(wanted) => name != Some(wanted),
            // An unnamed export of an image already listed unnamed is not listed twice.
            None => name.is_some() || e.get("digest").and_then(Value::as_str) != Some(&digest_text),
        }
    });
    manifests.push(entry);
    report.index_entries = manifests.len();
    let bytes = serde_json::to_vec_pretty(&index).map_err(|source| ExportError::Json {
        path: dir.join(INDEX_FILE),
        source,
    })?;
    write_atomic(&dir.join(INDEX_FILE), &bytes)?;
    tracing::info!(manifest = %record.manifest_digest, dir = %dir.display(), ref_name, "exported image as an OCI layout");
    Ok(report)
}

/// The `index.json` entries of an OCI layout by ref name (unnamed ones under their digest):
/// what a test or a caller checks after an export.
pub fn layout_entries(dir: &Path) -> Result<BTreeMap<String, Digest>, ExportError> {
    let index_path = dir.join(INDEX_FILE);
    let bytes = fs::read(&index_path).map_err(|source| ExportError::Read {
        path: index_path.clone(),
        source,
    })?;
    let index: Value = serde_json::from_slice(&bytes).map_err(|source| ExportError::Json {
        path: index_path.clone(),
        source,
    })?;
    let bad = |reason: &str| ExportError::BadLayout {
        dir: dir.to_owned(),
        reason: format!("{}: {reason}", index_path.display()),
    };
    let mut entries = BTreeMap::new();
    for entry in index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no manifests list"))?
    {
        let digest: Digest = entry
            .get("digest")
            .and_then(Value::as_str)
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| bad("an entry lacks a sha256 digest"))?;
        let name = entry
            .get("annotations")
            .and_then(|a| a.get(REF_NAME_ANNOTATION))
            .and_then(Value::as_str)
            .map_or_else(|| digest.to_string(), str::to_owned);
        entries.insert(name, digest);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BuiltLayer, ImageConfigEdit};
    use std::os::unix::fs::MetadataExt;

    fn r(s: &str) -> Reference {
        s.parse().unwrap()
    }

    /// A built image with two layers (one gzip) in a fresh store.
    async fn built_image(store: &ImageStore, cmd: &str) -> ImageRecord {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"pretend tar one").unwrap();
        let gz = gz.finish().unwrap();
        let (digest, size) = store.blobs().ingest_bytes(&gz, None).unwrap();
        let one = BuiltLayer {
            digest,
            diff_id: Digest::of_bytes(b"pretend tar one"),
            size,
            media_type: media_types::OCI_LAYER_GZIP.into(),
        };
        let (digest, size) = store
            .blobs()
            .ingest_bytes(b"pretend tar two", None)
            .unwrap();
        let two = BuiltLayer {
            diff_id: digest.clone(),
            digest,
            size,
            media_type: media_types::OCI_LAYER.into(),
        };
        let base = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config = ImageConfigEdit {
            cmd: Some(vec![cmd.into()]),
            added_diff_ids: vec![one.diff_id.clone(), two.diff_id.clone()],
            ..ImageConfigEdit::default()
        }
        .apply(base)
        .unwrap();
        let guard = store.hold_ingest().await;
        store
            .commit_built(&guard, &config, &[one, two], &[r(&format!("built:{cmd}"))])
            .unwrap()
    }

    #[tokio::test]
    async fn export_round_trips_through_oci_layout_import() {
        let src_dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(src_dir.path()).unwrap();
        let image = built_image(&store, "first").await;
        let out = src_dir.path().join("layout");
        let report = store
            .export_oci_layout(r("built:first"), &out, Some("v1"))
            .await
            .unwrap();
        assert_eq!(report.manifest_digest, image.manifest_digest);
        assert_eq!(report.linked + report.copied, 4, "{report:?}");
        assert_eq!(report.index_entries, 1);
        // Same file system: blobs are hard links to the store's.
        let exported = out.join("blobs/sha256").join(image.layers[0].digest.hex());
        assert_eq!(
            fs::metadata(&exported).unwrap().ino(),
            fs::metadata(store.blob_path(&image.layers[0].digest))
                .unwrap()
                .ino()
        );
        let layout: Value =
            serde_json::from_slice(&fs::read(out.join(LAYOUT_FILE)).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: Value =
            serde_json::from_slice(&fs::read(out.join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["manifests"][0]["platform"]["os"], "linux");
        assert_eq!(
            layout_entries(&out).unwrap(),
            BTreeMap::from([("v1".to_owned(), image.manifest_digest.clone())])
        );

        // lull's own importer reads it back into another store: same image.
        let other_dir = tempfile::tempdir().unwrap();
        let other = ImageStore::open(other_dir.path()).unwrap();
        let imported = other
            .import_oci_layout(&out, Some("v1"), &r("imported:v1"))
            .await
            .unwrap();
        assert_eq!(imported.manifest_digest, image.manifest_digest);
        assert_eq!(imported.config_digest, image.config_digest);
        assert_eq!(imported.layers, image.layers);
        assert_eq!(imported.config, image.config);

        // Exporting by digest into the same layout adds a second name; re-exporting a name
        // replaces its entry; unnamed entries are not duplicated.
        let second = built_image(&store, "second").await;
        store
            .export_oci_layout(second.manifest_digest.clone(), &out, Some("v2"))
            .await
            .unwrap();
        let report = store
            .export_oci_layout(r("built:second"), &out, Some("v1"))
            .await
            .unwrap();
        assert_eq!(report.present, 4, "{report:?}");
        store
            .export_oci_layout(r("built:first"), &out, None)
            .await
            .unwrap();
        let report = store
            .export_oci_layout(r("built:first"), &out, None)
            .await
            .unwrap();
        assert_eq!(report.index_entries, 3);
        assert_eq!(
            layout_entries(&out).unwrap(),
            BTreeMap::from([
                ("v1".to_owned(), second.manifest_digest.clone()),
                ("v2".to_owned(), second.manifest_digest.clone()),
                (
                    image.manifest_digest.to_string(),
                    image.manifest_digest.clone()
                ),
            ])
        );
        let leftovers: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .chain(fs::read_dir(out.join("blobs/sha256")).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn export_refuses_a_foreign_directory_and_unknown_images() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("store")).unwrap();
        built_image(&store, "x").await;
        let foreign = dir.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        let err = store
            .export_oci_layout(r("built:x"), &foreign, Some("x"))
            .await
            .unwrap_err();
        assert!(matches!(err, ExportError::NotEmpty { .. }), "{err}");
        assert!(err.to_string().contains("foreign"), "{err}");
        assert_eq!(
            fs::read_dir(&foreign).unwrap().count(),
            1,
            "nothing written"
        );

        let err = store
            .export_oci_layout(r("built:nope"), &dir.path().join("out"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, ExportError::NoSuchImage { .. }), "{err}");

        // An empty existing directory is fine.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        store
            .export_oci_layout(r("built:x"), &empty, Some("x"))
            .await
            .unwrap();
        assert!(empty.join(INDEX_FILE).is_file());
    }
}
