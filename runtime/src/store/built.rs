//! Images made locally (by the builder) rather than pulled or imported: [`ImageConfigEdit`]
//! derives a config from a base image's raw config, and [`ImageStore::commit_built`] writes the
//! config and an OCI manifest for layers already in the blob store, then the record.
//!
//! The manifest is serialised deterministically (fixed field order, compact, no timestamps of its
//! own): the same config bytes and layers always give the same manifest digest.

use std::collections::BTreeMap;
use std::fs;
use std::io;

use serde::Serialize;
use serde_json::{Map, Value};

use super::image::{self, Compression, Descriptor, ImageManifest, ImageRecord, LayerRecord};
use super::{ImageStore, IngestGuard, StoreError, media_types};
use crate::digest::Digest;
use crate::reference::Reference;

/// One layer of a built image, lowest first: a blob already in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltLayer {
    /// Digest of the blob as stored (compressed, if it is).
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    pub size: u64,
    /// Any layer media type lull unpacks; the manifest uses its OCI equivalent.
    pub media_type: String,
}

impl From<&LayerRecord> for BuiltLayer {
    fn from(layer: &LayerRecord) -> Self {
        BuiltLayer {
            digest: layer.digest.clone(),
            diff_id: layer.diff_id.clone(),
            size: layer.size,
            media_type: layer.media_type.clone(),
        }
    }
}

/// One `history` entry of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryEntry {
    /// RFC 3339; `None` leaves the field out (reproducible builds).
    pub created: Option<String>,
    pub created_by: Option<String>,
    pub comment: Option<String>,
    /// True for a step that added no layer (ENV, CMD...).
    pub empty_layer: bool,
}

/// Changes a builder makes to its base image's config. Applied to the base's raw config JSON,
/// so fields lull does not model (healthchecks, volumes, `os.version`...) are kept as they were.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfigEdit {
    /// Set (replacing a variable of the same name, keeping its position) or append.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// Setting an entrypoint clears the base's `Cmd` unless [`ImageConfigEdit::cmd`] is set
    /// too, as Docker does (a base `Cmd` is an argument list for the base's entrypoint).
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Added to `ExposedPorts`: `"8080"` (taken as tcp), `"8080/tcp"` or `"53/udp"`.
    pub exposed_ports: Vec<String>,
    /// Set (overriding the base's label of the same name).
    pub labels: BTreeMap<String, String>,
    /// The config's `created` (RFC 3339); `None` keeps the base's.
    pub created: Option<String>,
    /// Appended to the base's `history`.
    pub history: Vec<HistoryEntry>,
    /// Diff_ids of the layers added on top of the base, appended to `rootfs.diff_ids`.
    pub added_diff_ids: Vec<Digest>,
}

fn edit_error(reason: impl Into<String>) -> StoreError {
    StoreError::ConfigEdit {
        reason: reason.into(),
    }
}

fn string_list(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

fn normalise_port(port: &str) -> Result<String, StoreError> {
    let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
    let valid_number = number.parse::<u16>().is_ok_and(|n| n != 0);
    let protocol = protocol.to_ascii_lowercase();
    if !valid_number || !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
        return Err(edit_error(format!(
            "exposed port {port:?} is not PORT or PORT/tcp, PORT/udp, PORT/sctp"
        )));
    }
    Ok(format!("{number}/{protocol}"))
}

/// The object under `key` in `object`, created (or replacing a `null`) if missing.
fn object_field<'a>(
    object: &'a mut Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<&'a mut Map<String, Value>, StoreError> {
    let slot = object
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    slot.as_object_mut()
        .ok_or_else(|| edit_error(format!("base config field {what} is not an object")))
}

impl ImageConfigEdit {
    /// Applies the edit to a base image's raw config (the blob under its `config_digest`) and
    /// returns the new config's bytes: compact JSON with sorted keys, so equal inputs give
    /// equal bytes.
    pub fn apply(&self, base_config: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut root: Value = serde_json::from_slice(base_config)
            .map_err(|source| StoreError::BaseConfig { source })?;
        let root_object = root
            .as_object_mut()
            .ok_or_else(|| edit_error("base config is not a json object"))?;
        if let Some(created) = &self.created {
            root_object.insert("created".into(), Value::String(created.clone()));
        }

        let run = object_field(root_object, "config", "config")?;
        if !self.env.is_empty() {
            let mut env: Vec<String> = match run.get("Env") {
                None | Some(Value::Null) => Vec::new(),
                Some(value) => serde_json::from_value(value.clone())
                    .map_err(|_| edit_error("base config field config.Env is not a string list"))?,
            };
            for (name, value) in &self.env {
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    return Err(edit_error(format!(
                        "environment variable name {name:?} is empty or holds '=' or NUL"
                    )));
                }
                let entry = format!("{name}={value}");
                let prefix = format!("{name}=");
                match env
                    .iter_mut()
                    .find(|e| e.starts_with(&prefix) || *e == name)
                {
                    Some(existing) => *existing = entry,
                    None => env.push(entry),
                }
            }
            run.insert("Env".into(), string_list(&env));
        }
        if let Some(dir) = &self.working_dir {
            run.insert("WorkingDir".into(), Value::String(dir.clone()));
        }
        if let Some(user) = &self.user {
            run.insert("User".into(), Value::String(user.clone()));
        }
        if let Some(entrypoint) = &self.entrypoint {
            run.insert("Entrypoint".into(), string_list(entrypoint));
            if self.cmd.is_none() {
                run.remove("Cmd");
            }
        }
        if let Some(cmd) = &self.cmd {
            run.insert("Cmd".into(), string_list(cmd));
        }
        if !self.exposed_ports.is_empty() {
            let ports = object_field(run, "ExposedPorts", "config.ExposedPorts")?;
            for port in &self.exposed_ports {
                ports.insert(normalise_port(port)?, Value::Object(Map::new()));
            }
        }
        if !self.labels.is_empty() {
            let labels = object_field(run, "Labels", "config.Labels")?;
            for (name, value) in &self.labels {
                labels.insert(name.clone(), Value::String(value.clone()));
            }
        }

        if !self.history.is_empty() {
            let history = root_object
                .entry("history")
                .or_insert_with(|| Value::Array(Vec::new()));
            if history.is_null() {
                *history = Value::Array(Vec::new());
            }
            let history = history
                .as_array_mut()
                .ok_or_else(|| edit_error("base config field history is not a list"))?;
            for entry in &self.history {
                let mut object = Map::new();
                if let Some(created) = &entry.created {
                    object.insert("created".into(), Value::String(created.clone()));
                }
                if let Some(created_by) = &entry.created_by {
                    object.insert("created_by".into(), Value::String(created_by.clone()));
                }
                if let Some(comment) = &entry.comment {
                    object.insert("comment".into(), Value::String(comment.clone()));
                }
                if entry.empty_layer {
                    object.insert("empty_layer".into(), Value::Bool(true));
                }
                history.push(Value::Object(object));
            }
        }

        let rootfs = object_field(root_object, "rootfs", "rootfs")?;
        rootfs
            .entry("type")
            .or_insert_with(|| Value::String("layers".into()));
        let diff_ids = rootfs
            .entry("diff_ids")
            .or_insert_with(|| Value::Array(Vec::new()));
        if diff_ids.is_null() {
            *diff_ids = Value::Array(Vec::new());
        }
        let diff_ids = diff_ids
            .as_array_mut()
            .ok_or_else(|| edit_error("base config field rootfs.diff_ids is not a list"))?;
        diff_ids.extend(
            self.added_diff_ids
                .iter()
                .map(|d| Value::String(d.to_string())),
        );

        serde_json::to_vec(&root).map_err(|source| StoreError::BaseConfig { source })
    }
}

/// The manifest as written: field order fixed by this struct.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: &'a Descriptor,
    layers: &'a [Descriptor],
}

/// The OCI image manifest for `config_bytes` and `layers` (with OCI layer media types).
fn manifest_bytes(config_bytes: &[u8], layers: &[Descriptor]) -> Vec<u8> {
    let config = Descriptor {
        media_type: media_types::OCI_CONFIG.into(),
        digest: Digest::of_bytes(config_bytes),
        size: config_bytes.len() as u64,
        platform: None,
        annotations: BTreeMap::new(),
    };
    let manifest = ManifestOut {
        schema_version: 2,
        media_type: media_types::OCI_MANIFEST,
        config: &config,
        layers,
    };
    // Serialising plain strings and numbers cannot fail.
    serde_json::to_vec(&manifest).expect("manifest serialises")
}

impl ImageStore {
    /// The raw config blob of an image in the store (the base for an [`ImageConfigEdit`]).
    pub fn read_config(&self, image: &ImageRecord) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(&image.config_digest);
        fs::read(&path).map_err(|source| StoreError::Read { path, source })
    }

    /// Writes a locally built image: `config` (raw config JSON, e.g. from
    /// [`ImageConfigEdit::apply`]) and an OCI manifest listing `layers` (every layer, base
    /// ones included, lowest first) go into the blob store, then the record, tagged with every
    /// reference in `tag_as`.
    ///
    /// Each layer blob must already be in the store with its stated size, and the config's
    /// `rootfs.diff_ids` must equal the layers' diff_ids. Holding `guard` from the first layer
    /// ingest to this call keeps a concurrent [`ImageStore::gc`] from deleting the new layers,
    /// which no record references yet.
    pub fn commit_built(
        &self,
        guard: &IngestGuard<'_>,
        config: &[u8],
        layers: &[BuiltLayer],
        tag_as: &[Reference],
    ) -> Result<ImageRecord, StoreError> {
        if !std::ptr::eq(guard.inner, &*self.inner) {
            return Err(StoreError::ForeignGuard {
                data_dir: self.inner.data_dir.clone(),
            });
        }
        if tag_as.is_empty() {
            return Err(StoreError::NoReference);
        }
        let config_digest = Digest::of_bytes(config);
        let built_err = |source| StoreError::BuiltImage {
            what: format!("config {config_digest}"),
            source,
        };
        let parsed = image::parse_config(config, &config_digest).map_err(built_err)?;
        if parsed.diff_ids.len() != layers.len() {
            return Err(StoreError::DiffIdCount {
                config: config_digest,
                diff_ids: parsed.diff_ids.len(),
                layers: layers.len(),
            });
        }
        for (position, (layer, diff_id)) in layers.iter().zip(&parsed.diff_ids).enumerate() {
            if layer.diff_id != *diff_id {
                return Err(StoreError::DiffIdMismatch {
                    config: config_digest,
                    position,
                    config_diff_id: diff_id.clone(),
                    layer_diff_id: layer.diff_id.clone(),
                });
            }
        }

        let mut descriptors = Vec::with_capacity(layers.len());
        for layer in layers {
            let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
                built_err(image::ImageError::LayerMediaType {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                })
            })?;
            let path = self.blob_path(&layer.digest);
            let actual = match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => meta.len(),
                Ok(_) => {
                    return Err(StoreError::LayerMissing {
                        path,
                        digest: layer.digest.clone(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::LayerMissing {
                        path,
                        digest: layer.digest.clone(),
                    });
                }
                Err(source) => return Err(StoreError::Read { path, source }),
            };
            if actual != layer.size {
                return Err(StoreError::LayerSize {
                    path,
                    digest: layer.digest.clone(),
                    expected: layer.size,
                    actual,
                });
            }
            descriptors.push(Descriptor {
                media_type: compression.oci_media_type().into(),
                digest: layer.digest.clone(),
                size: layer.size,
                platform: None,
                annotations: BTreeMap::new(),
            });
        }

        let manifest_bytes = manifest_bytes(config, &descriptors);
        let manifest_digest = Digest::of_bytes(&manifest_bytes);
        let manifest = ImageManifest {
            media_type: media_types::OCI_MANIFEST.into(),
            config: Descriptor {
                media_type: media_types::OCI_CONFIG.into(),
                digest: config_digest.clone(),
                size: config.len() as u64,
                platform: None,
                annotations: BTreeMap::new(),
            },
            layers: descriptors,
        };
        let record =
            image::build_record(&manifest_digest, &manifest, config, None).map_err(|source| {
                StoreError::BuiltImage {
                    what: format!("manifest {manifest_digest}"),
                    source,
                }
            })?;
        self.inner
            .blobs
            .ingest_bytes(config, Some(&config_digest))?;
        self.inner
            .blobs
            .ingest_bytes(&manifest_bytes, Some(&manifest_digest))?;
        let committed = self.commit_record(&record, tag_as)?;
        tracing::info!(manifest = %manifest_digest, layers = layers.len(), "committed built image");
        Ok(committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE_CONFIG: &str = r#"{"architecture":"amd64","os":"linux",
        "created":"2024-01-01T00:00:00Z","container_config":{"Hostname":"x"},
        "config":{"Env":["PATH=/usr/bin:/bin","LANG=C"],"Cmd":["/bin/sh"],
                  "Healthcheck":{"Test":["NONE"]},"Labels":null},
        "rootfs":{"type":"layers","diff_ids":[]},
        "history":[{"created_by":"base"}]}"#;

    fn r(s: &str) -> Reference {
        s.parse().unwrap()
    }

    /// A base config whose diff_ids name the given layers.
    fn base_config(layers: &[BuiltLayer]) -> Vec<u8> {
        let mut value: Value = serde_json::from_str(BASE_CONFIG).unwrap();
        value["rootfs"]["diff_ids"] = layers
            .iter()
            .map(|l| Value::String(l.diff_id.to_string()))
            .collect();
        serde_json::to_vec(&value).unwrap()
    }

    fn ingest_layer(store: &ImageStore, content: &[u8]) -> BuiltLayer {
        let (digest, size) = store.blobs().ingest_bytes(content, None).unwrap();
        BuiltLayer {
            diff_id: digest.clone(),
            digest,
            size,
            media_type: media_types::DOCKER_LAYER.into(),
        }
    }

    #[test]
    fn edit_keeps_unknown_fields_and_changes_what_it_says() {
        let base = base_config(&[]);
        let added = Digest::of_bytes(b"new layer");
        let edit = ImageConfigEdit {
            env: vec![
                ("LANG".into(), "C.UTF-8".into()),
                ("GREETING".into(), "hi".into()),
            ],
            working_dir: Some("/app".into()),
            entrypoint: Some(vec!["/app/run".into()]),
            exposed_ports: vec!["8080".into(), "53/UDP".into()],
            labels: BTreeMap::from([("org.example.built".into(), "yes".into())]),
            history: vec![HistoryEntry {
                created_by: Some("RUN make".into()),
                ..HistoryEntry::default()
            }],
            added_diff_ids: vec![added.clone()],
            ..ImageConfigEdit::default()
        };
        let bytes = edit.apply(&base).unwrap();
        assert_eq!(bytes, edit.apply(&base).unwrap(), "edits are deterministic");
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["container_config"]["Hostname"], "x");
        assert_eq!(value["config"]["Healthcheck"]["Test"][0], "NONE");
        assert_eq!(value["created"], "2024-01-01T00:00:00Z");
        assert_eq!(value["history"].as_array().unwrap().len(), 2);
        assert_eq!(value["history"][1]["created_by"], "RUN make");

        let parsed = image::parse_config(&bytes, &Digest::of_bytes(&bytes)).unwrap();
        assert_eq!(
            parsed.config.env,
            vec!["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "GREETING=hi"]
        );
        assert_eq!(parsed.config.working_dir.as_deref(), Some("/app"));
        assert_eq!(parsed.config.entrypoint, vec!["/app/run"]);
        assert!(
            parsed.config.cmd.is_empty(),
            "a new entrypoint drops the base's Cmd"
        );
        assert_eq!(parsed.config.exposed_ports, vec!["53/udp", "8080/tcp"]);
        assert_eq!(parsed.config.labels["org.example.built"], "yes");
        assert_eq!(parsed.diff_ids, vec![added]);

        let bad = ImageConfigEdit {
            env: vec![("A=B".into(), "x".into())],
            ..ImageConfigEdit::default()
        };
        assert!(matches!(
            bad.apply(&base),
            Err(StoreError::ConfigEdit { .. })
        ));
        let bad = ImageConfigEdit {
            exposed_ports: vec!["http".into()],
            ..ImageConfigEdit::default()
        };
        assert!(matches!(
            bad.apply(&base),
            Err(StoreError::ConfigEdit { .. })
        ));
    }

    #[tokio::test]
    async fn commit_built_is_deterministic_and_readable() {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let mut digests = Vec::new();
        for dir in [&dir_a, &dir_b] {
            let store = ImageStore::open(dir.path()).unwrap();
            let base = ingest_layer(&store, b"base layer tar");
            let top = ingest_layer(&store, b"top layer tar");
            let edit = ImageConfigEdit {
                cmd: Some(vec!["/bin/true".into()]),
                added_diff_ids: vec![top.diff_id.clone()],
                ..ImageConfigEdit::default()
            };
            let config = edit
                .apply(&base_config(std::slice::from_ref(&base)))
                .unwrap();
            let guard = store.hold_ingest().await;
            let record = store
                .commit_built(
                    &guard,
                    &config,
                    &[base.clone(), top.clone()],
                    &[r("built:v1")],
                )
                .unwrap();
            drop(guard);
            assert_eq!(record.references, vec![r("built:v1")]);
            assert_eq!(record.config.cmd, vec!["/bin/true"]);
            assert_eq!(record.layers.len(), 2);
            assert_eq!(record.layers[0].media_type, media_types::OCI_LAYER);
            assert_eq!(record.manifest_media_type, media_types::OCI_MANIFEST);
            // The manifest blob parses back to the same layers and config.
            let manifest = fs::read(store.blob_path(&record.manifest_digest)).unwrap();
            let image::Manifest::Image(parsed) =
                image::parse_manifest(&manifest, "built manifest").unwrap()
            else {
                panic!("not an image manifest");
            };
            assert_eq!(parsed.config.digest, record.config_digest);
            assert_eq!(parsed.layers[1].digest, top.digest);
            assert_eq!(store.read_config(&record).unwrap(), config);
            assert_eq!(store.get(&r("built:v1")).unwrap().unwrap(), record);
            // Committing the same inputs again lands on the same image.
            let guard = store.hold_ingest().await;
            let again = store
                .commit_built(&guard, &config, &[base, top], &[r("built:v2")])
                .unwrap();
            assert_eq!(again.manifest_digest, record.manifest_digest);
            assert_eq!(again.references, vec![r("built:v1"), r("built:v2")]);
            // gc keeps every blob of the built image.
            drop(guard);
            assert!(store.gc().await.unwrap().removed_blobs.is_empty());
            digests.push(record.manifest_digest);
        }
        assert_eq!(digests[0], digests[1], "same inputs, same manifest digest");
    }

    #[tokio::test]
    async fn commit_built_refuses_mismatched_diff_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let a = ingest_layer(&store, b"layer a");
        let b = ingest_layer(&store, b"layer b");
        let guard = store.hold_ingest().await;
        let config = base_config(&[a.clone(), b.clone()]);
        let err = store
            .commit_built(&guard, &config, &[b.clone(), a.clone()], &[r("x")])
            .unwrap_err();
        assert!(
            matches!(err, StoreError::DiffIdMismatch { position: 0, ref config_diff_id, .. } if *config_diff_id == a.diff_id),
            "{err}"
        );
        let err = store
            .commit_built(&guard, &config, std::slice::from_ref(&a), &[r("x")])
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::DiffIdCount {
                    diff_ids: 2,
                    layers: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(store.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn commit_built_names_a_missing_or_short_layer() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let present = ingest_layer(&store, b"present");
        let absent = BuiltLayer {
            digest: Digest::of_bytes(b"never ingested"),
            diff_id: Digest::of_bytes(b"never ingested"),
            size: 14,
            media_type: media_types::OCI_LAYER_GZIP.into(),
        };
        let guard = store.hold_ingest().await;
        let config = base_config(&[present.clone(), absent.clone()]);
        let err = store
            .commit_built(
                &guard,
                &config,
                &[present.clone(), absent.clone()],
                &[r("x")],
            )
            .unwrap_err();
        assert!(
            matches!(err, StoreError::LayerMissing { ref digest, .. } if *digest == absent.digest),
            "{err}"
        );
        assert!(
            err.to_string().contains(&absent.digest.to_string()),
            "{err}"
        );

        let short = BuiltLayer {
            size: present.size + 1,
            ..present.clone()
        };
        let config = base_config(std::slice::from_ref(&short));
        let err = store
            .commit_built(&guard, &config, &[short], &[r("x")])
            .unwrap_err();
        assert!(matches!(err, StoreError::LayerSize { .. }), "{err}");
        assert!(matches!(
            store.commit_built(&guard, &config, &[present], &[]),
            Err(StoreError::NoReference)
        ));
        assert!(store.list().unwrap().is_empty());

        // A guard from another store proves nothing about this one.
        let other_dir = tempfile::tempdir().unwrap();
        let other = ImageStore::open(other_dir.path()).unwrap();
        let err = other
            .commit_built(&guard, &config, &[], &[r("x")])
            .unwrap_err();
        assert!(matches!(err, StoreError::ForeignGuard { .. }), "{err}");
    }
}
