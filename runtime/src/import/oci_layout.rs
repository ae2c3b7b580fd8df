//! OCI image layout import: `oci-layout`, `index.json`, `blobs/sha256/<hex>`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{CONTAINERD_NAME_ANNOTATION, ImportError, MAX_METADATA_BYTES, REF_NAME_ANNOTATION};
use crate::digest::Digest;
use crate::store::ImageStore;
use crate::store::image::{self, Descriptor, ImageRecord, Manifest, Platform};

const MAX_INDEX_DEPTH: usize = 4;

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Reads a small blob (manifest, index, config) from the layout, checking size and digest.
fn read_small_blob(dir: &Path, descriptor: &Descriptor) -> Result<Vec<u8>, ImportError> {
    let path = blob_path(dir, &descriptor.digest);
    if descriptor.size > MAX_METADATA_BYTES {
        return Err(ImportError::TooLarge {
            path,
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            max: MAX_METADATA_BYTES,
        });
    }
    let read_err = |source| ImportError::Read {
        path: path.clone(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(&path)
        .map_err(read_err)?
        .take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let what = path.display().to_string();
    if bytes.len() as u64 != descriptor.size {
        return Err(ImportError::Size {
            what,
            digest: descriptor.digest.clone(),
            expected: descriptor.size,
            actual: bytes.len() as u64,
        });
    }
    let actual = Digest::of_bytes(&bytes);
    if actual != descriptor.digest {
        return Err(ImportError::Digest {
            what,
            digest: descriptor.digest.clone(),
            actual,
        });
    }
    Ok(bytes)
}

/// Copies a blob from the layout into the store (verified), unless it is already there.
fn copy_blob(store: &ImageStore, dir: &Path, descriptor: &Descriptor) -> Result<(), ImportError> {
    if store.has_blob(&descriptor.digest) {
        return Ok(());
    }
    let path = blob_path(dir, &descriptor.digest);
    let file = File::open(&path).map_err(|source| ImportError::Read {
        path: path.clone(),
        source,
    })?;
    store
        .blobs()
        .ingest_reader(file, Some(&descriptor.digest), Some(descriptor.size))
        .map_err(|source| ImportError::Blob {
            source_path: path.display().to_string(),
            source,
        })?;
    Ok(())
}

fn names(entries: &[Descriptor]) -> String {
    let names: Vec<String> = entries
        .iter()
        .map(|e| match e.annotations.get(REF_NAME_ANNOTATION) {
            Some(name) => format!("{name:?}"),
            None => format!("(unnamed {})", e.digest),
        })
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

pub(super) fn import(
    store: &ImageStore,
    dir: &Path,
    ref_name: Option<&str>,
    platform: &Platform,
) -> Result<ImageRecord, ImportError> {
    let not_layout = |reason: String| ImportError::NotOciLayout {
        dir: dir.to_owned(),
        reason,
    };
    let layout_path = dir.join("oci-layout");
    let layout = std::fs::read(&layout_path)
        .map_err(|e| not_layout(format!("cannot read {}: {e}", layout_path.display())))?;
    let layout: serde_json::Value =
        serde_json::from_slice(&layout).map_err(|source| ImportError::Json {
            path: layout_path.clone(),
            source,
        })?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(not_layout(format!(
            "{} does not declare imageLayoutVersion 1.0.0",
            layout_path.display()
        )));
    }

    let index_path = dir.join("index.json");
    let index_bytes = std::fs::read(&index_path).map_err(|source| ImportError::Read {
        path: index_path.clone(),
        source,
    })?;
    let index_what = index_path.display().to_string();
    let index = match image::parse_manifest(&index_bytes, &index_what) {
        Ok(Manifest::Index(index)) => index,
        Ok(Manifest::Image(_)) => return Err(not_layout("index.json is not an index".into())),
        Err(source) => {
            return Err(ImportError::Image {
                what: index_what,
                source,
            });
        }
    };

    let entry = match ref_name {
        Some(name) => index
            .manifests
            .iter()
            .find(|e| {
                e.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(name)
                    || e.annotations
                        .get(CONTAINERD_NAME_ANNOTATION)
                        .map(String::as_str)
                        == Some(name)
            })
            .ok_or_else(|| ImportError::NoSuchName {
                path: index_path.clone(),
                name: name.to_owned(),
                available: names(&index.manifests),
            })?,
        None => match index.manifests.as_slice() {
            [] => return Err(ImportError::Empty { path: index_path }),
            [only] => only,
            many => {
                return Err(ImportError::Ambiguous {
                    path: index_path.clone(),
                    count: many.len(),
                    available: names(many),
                });
            }
        },
    };

    // Walk down nested indexes to one image manifest.
    let mut descriptor = entry.clone();
    let mut index_blob: Option<(Digest, Vec<u8>)> = None;
    let mut depth = 0;
    let (manifest_bytes, manifest) = loop {
        let bytes = read_small_blob(dir, &descriptor)?;
        let what = format!("{} (manifest {})", dir.display(), descriptor.digest);
        match image::parse_manifest(&bytes, &what).map_err(|source| ImportError::Image {
            what: what.clone(),
            source,
        })? {
            Manifest::Image(manifest) => break (bytes, manifest),
            Manifest::Index(nested) => {
                depth += 1;
                if depth > MAX_INDEX_DEPTH {
                    return Err(ImportError::TooDeep {
                        what,
                        max: MAX_INDEX_DEPTH,
                    });
                }
                let chosen =
                    nested
                        .select(platform)
                        .ok_or_else(|| ImportError::NoMatchingPlatform {
                            what: what.clone(),
                            wanted: platform.clone(),
                            available: nested.platforms().join(", "),
                        })?;
                // The record keeps the outermost index blob the image was resolved from.
                if index_blob.is_none() {
                    index_blob = Some((descriptor.digest.clone(), bytes));
                }
                descriptor = chosen.clone();
            }
        }
    };
    let manifest_digest = descriptor.digest.clone();
    let what = format!("{} (manifest {manifest_digest})", dir.display());
    let image_err = |source| ImportError::Image {
        what: what.clone(),
        source,
    };
    image::check_layer_media_types(&manifest).map_err(image_err)?;

    let config_bytes = read_small_blob(dir, &manifest.config)?;
    let record = image::build_record(
        &manifest_digest,
        &manifest,
        &config_bytes,
        index_blob.as_ref().map(|(d, _)| d.clone()),
    )
    .map_err(image_err)?;

    copy_blob(store, dir, &manifest.config)?;
    for layer in &manifest.layers {
        copy_blob(store, dir, layer)?;
    }
    let store_bytes = |bytes: &[u8], digest: &Digest| {
        store
            .blobs()
            .ingest_bytes(bytes, Some(digest))
            .map_err(|source| ImportError::Blob {
                source_path: blob_path(dir, digest).display().to_string(),
                source,
            })
    };
    store_bytes(&manifest_bytes, &manifest_digest)?;
    if let Some((digest, bytes)) = &index_blob {
        store_bytes(bytes, digest)?;
    }
    Ok(record)
}
