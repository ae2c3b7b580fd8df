//! docker-archive import: a tar holding `manifest.json`, a config and layer tars (plain, gzip or
//! zstd), as `docker save` and `skopeo copy ... docker-archive:` write it.
//!
//! The archive is read twice, streaming: first for `manifest.json` and links, then for the
//! config and layers, which go straight into the blob ingest while their uncompressed content
//! is hashed to check the config's diff_ids. The store gets a synthesised OCI manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

use serde::Deserialize;

use super::{ImportError, MAX_METADATA_BYTES, ingest_layer};
use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::ImageStore;
use crate::store::image::{self, Compression, Descriptor, ImageRecord, media_types};

const MAX_LINK_HOPS: usize = 8;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

struct Stored {
    digest: Digest,
    size: u64,
    compression: Compression,
    diff_id: Digest,
}

/// Normalises an archive path: no `./`, no empty components, `..` resolved lexically.
fn normalise(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    parts.join("/")
}

fn open_archive(archive: &Path) -> Result<tar::Archive<File>, ImportError> {
    let file = File::open(archive).map_err(|source| ImportError::Read {
        path: archive.to_owned(),
        source,
    })?;
    Ok(tar::Archive::new(file))
}

/// Follows symlinks and hard links recorded in the archive.
fn resolve(
    archive: &Path,
    links: &BTreeMap<String, String>,
    path: &str,
) -> Result<String, ImportError> {
    let mut current = normalise(Path::new(path));
    for _ in 0..MAX_LINK_HOPS {
        match links.get(&current) {
            Some(target) => current = target.clone(),
            None => return Ok(current),
        }
    }
    Err(ImportError::Archive {
        archive: archive.to_owned(),
        reason: format!("too many links resolving {path}"),
    })
}

/// The digest a file name promises: `blobs/sha256/<hex>`, `<hex>.json` or `<hex>.tar`.
fn digest_from_name(path: &str) -> Option<Digest> {
    if let Some(hex) = path.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(hex).ok();
    }
    if path.contains('/') {
        return None;
    }
    let stem = path
        .strip_suffix(".json")
        .or_else(|| path.strip_suffix(".tar"))?;
    Digest::from_hex(stem).ok()
}

pub(super) fn import(
    store: &ImageStore,
    archive: &Path,
    tag_as: Option<&Reference>,
) -> Result<(ImageRecord, Vec<Reference>), ImportError> {
    let archive_err = |reason: String| ImportError::Archive {
        archive: archive.to_owned(),
        reason,
    };
    let entry_err = |entry: &str, source| ImportError::ArchiveEntry {
        archive: archive.to_owned(),
        entry: entry.to_owned(),
        source,
    };
    let read_err = |source| ImportError::Read {
        path: archive.to_owned(),
        source,
    };

    // Pass 1: manifest.json and links.
    let mut manifest_json: Option<Vec<u8>> = None;
    let mut links = BTreeMap::new();
    let mut tar = open_archive(archive)?;
    for entry in tar.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let raw_path = entry.path().map_err(read_err)?;
        let path = normalise(&raw_path);
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| entry_err(&path, e))?
                .ok_or_else(|| archive_err(format!("link {path} has no target")))?;
            let resolved = if kind.is_symlink() {
                let parent = Path::new(&path).parent().unwrap_or(Path::new(""));
                normalise(&parent.join(&target))
            } else {
                normalise(&target)
            };
            links.insert(path, resolved);
        } else if path == "manifest.json" {
            if entry.size() > MAX_METADATA_BYTES {
                return Err(archive_err(format!(
                    "manifest.json is {} bytes, more than {MAX_METADATA_BYTES}",
                    entry.size()
                )));
            }
            let mut bytes = Vec::new();
            entry
                .take(MAX_METADATA_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| entry_err(&path, e))?;
            manifest_json = Some(bytes);
        }
    }
    let manifest_json = manifest_json
        .ok_or_else(|| archive_err("no manifest.json (not a docker archive)".into()))?;
    let images: Vec<ArchiveImage> =
        serde_json::from_slice(&manifest_json).map_err(|source| ImportError::Json {
            path: archive.join("manifest.json"),
            source,
        })?;

    // Pick the image and its references.
    let parse_tags = |image: &ArchiveImage| -> Result<Vec<Reference>, ImportError> {
        image
            .repo_tags
            .iter()
            .flatten()
            .map(|tag| {
                tag.parse::<Reference>()
                    .map_err(|source| ImportError::RepoTag {
                        archive: archive.to_owned(),
                        tag: tag.clone(),
                        source,
                    })
            })
            .collect()
    };
    let chosen = match images.as_slice() {
        [] => return Err(archive_err("manifest.json lists no image".into())),
        [only] => only,
        many => {
            let mut found = None;
            if let Some(wanted) = tag_as {
                for image in many {
                    if parse_tags(image)?.contains(wanted) {
                        found = Some(image);
                        break;
                    }
                }
            }
            found.ok_or_else(|| {
                let tags: Vec<String> = many
                    .iter()
                    .map(|i| i.repo_tags.clone().unwrap_or_default().join(" "))
                    .collect();
                archive_err(format!(
                    "holds {} images; pass one of their tags to choose (RepoTags: {})",
                    many.len(),
                    tags.join(", ")
                ))
            })?
        }
    };
    let references = match tag_as {
        Some(reference) => vec![reference.clone()],
        None => {
            let tags = parse_tags(chosen)?;
            if tags.is_empty() {
                return Err(ImportError::NoTag {
                    archive: archive.to_owned(),
                });
            }
            tags
        }
    };

    let config_path = resolve(archive, &links, &chosen.config)?;
    let layer_paths = chosen
        .layers
        .iter()
        .map(|l| resolve(archive, &links, l))
        .collect::<Result<Vec<_>, _>>()?;
    let wanted_layers: BTreeSet<&str> = layer_paths.iter().map(String::as_str).collect();

    // Pass 2: stream the config and layers into the store.
    let mut config_bytes: Option<Vec<u8>> = None;
    let mut stored: BTreeMap<String, Stored> = BTreeMap::new();
    let mut tar = open_archive(archive)?;
    for entry in tar.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = normalise(&entry.path().map_err(read_err)?);
        let size = entry.size();
        if path == config_path && config_bytes.is_none() {
            if size > MAX_METADATA_BYTES {
                return Err(archive_err(format!(
                    "config {path} is {size} bytes, more than {MAX_METADATA_BYTES}"
                )));
            }
            let mut bytes = Vec::new();
            let mut entry = entry;
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| entry_err(&path, e))?;
            config_bytes = Some(bytes);
        } else if wanted_layers.contains(path.as_str()) && !stored.contains_key(&path) {
            let expected = digest_from_name(&path);
            let (digest, size, compression, diff_id) = ingest_layer(
                store.blobs(),
                entry,
                expected.as_ref(),
                Some(size),
                &format!("{}:{path}", archive.display()),
            )?;
            tracing::debug!(entry = %path, %digest, ?compression, "imported layer");
            stored.insert(
                path,
                Stored {
                    digest,
                    size,
                    compression,
                    diff_id,
                },
            );
        }
    }

    let config_bytes = config_bytes.ok_or_else(|| ImportError::MissingEntry {
        archive: archive.to_owned(),
        entry: config_path.clone(),
    })?;
    let config_digest = Digest::of_bytes(&config_bytes);
    if let Some(named) = digest_from_name(&config_path)
        && named != config_digest
    {
        return Err(ImportError::Digest {
            what: format!("docker archive {} entry {config_path}", archive.display()),
            digest: named,
            actual: config_digest,
        });
    }
    let parsed = image::parse_config(&config_bytes, &config_digest).map_err(|source| {
        ImportError::Image {
            what: format!("docker archive {} entry {config_path}", archive.display()),
            source,
        }
    })?;
    if parsed.diff_ids.len() != layer_paths.len() {
        return Err(archive_err(format!(
            "manifest.json lists {} layers but config {config_path} lists {} diff_ids",
            layer_paths.len(),
            parsed.diff_ids.len()
        )));
    }

    let mut layer_descriptors = Vec::with_capacity(layer_paths.len());
    for (path, expected_diff_id) in layer_paths.iter().zip(&parsed.diff_ids) {
        let layer = stored.get(path).ok_or_else(|| ImportError::MissingEntry {
            archive: archive.to_owned(),
            entry: path.clone(),
        })?;
        if layer.diff_id != *expected_diff_id {
            return Err(ImportError::DiffId {
                archive: archive.to_owned(),
                entry: path.clone(),
                expected: expected_diff_id.clone(),
                actual: layer.diff_id.clone(),
            });
        }
        layer_descriptors.push(Descriptor {
            media_type: layer.compression.oci_media_type().to_owned(),
            digest: layer.digest.clone(),
            size: layer.size,
            platform: None,
            annotations: BTreeMap::new(),
        });
    }

    let blob_err = |what: &str| {
        let what = format!("{}:{what}", archive.display());
        move |source| ImportError::Blob {
            source_path: what,
            source,
        }
    };
    let (_, config_size) = store
        .blobs()
        .ingest_bytes(&config_bytes, Some(&config_digest))
        .map_err(blob_err(&config_path))?;

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_types::OCI_MANIFEST,
        "config": Descriptor {
            media_type: media_types::OCI_CONFIG.to_owned(),
            digest: config_digest.clone(),
            size: config_size,
            platform: None,
            annotations: BTreeMap::new(),
        },
        "layers": layer_descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|source| ImportError::Json {
        path: archive.join("manifest.json"),
        source,
    })?;
    let (manifest_digest, _) = store
        .blobs()
        .ingest_bytes(&manifest_bytes, None)
        .map_err(blob_err("synthesised manifest"))?;
    let what = format!("docker archive {}", archive.display());
    let parsed_manifest = match image::parse_manifest(&manifest_bytes, &what) {
        Ok(image::Manifest::Image(m)) => m,
        Ok(image::Manifest::Index(_)) => {
            return Err(archive_err(
                "synthesised manifest parsed as an index".into(),
            ));
        }
        Err(source) => return Err(ImportError::Image { what, source }),
    };
    let record = image::build_record(&manifest_digest, &parsed_manifest, &config_bytes, None)
        .map_err(|source| ImportError::Image {
            what: format!("docker archive {}", archive.display()),
            source,
        })?;
    Ok((record, references))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_names() {
        assert_eq!(normalise(Path::new("./a/./b/../c.tar")), "a/c.tar");
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(
            digest_from_name(&format!("blobs/sha256/{hex}"))
                .unwrap()
                .hex(),
            hex
        );
        assert_eq!(digest_from_name(&format!("{hex}.tar")).unwrap().hex(), hex);
        assert!(digest_from_name(&format!("{hex}/layer.tar")).is_none());
        assert!(digest_from_name("layer.tar").is_none());
    }
}
