//! Image metadata: manifests, indexes and configs (OCI and Docker v2 schema 2), parsed leniently
//! into what lull needs, and the [`ImageRecord`] the store keeps per image.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::digest::Digest;
use crate::reference::Reference;

/// Media types lull reads and writes.
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

    /// Every manifest and index type, for `Accept` headers.
    pub const ALL_MANIFESTS: &[&str] = &[
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST_LIST,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} is not valid manifest json")]
    ManifestJson {
        what: String,
        source: serde_json::Error,
    },
    #[error("{what} has unsupported media type {media_type:?}")]
    UnsupportedManifest { what: String, media_type: String },
    #[error("{what} has schemaVersion {version}, expected 2")]
    SchemaVersion { what: String, version: u32 },
    #[error("{what} lacks the {field:?} field")]
    MissingField { what: String, field: &'static str },
    #[error("config {config} has unsupported media type {media_type:?}")]
    ConfigMediaType { config: Digest, media_type: String },
    #[error("config {config} is not valid image config json")]
    ConfigJson {
        config: Digest,
        source: serde_json::Error,
    },
    #[error("config {config} has no rootfs.diff_ids")]
    MissingDiffIds { config: Digest },
    #[error(
        "manifest {manifest} lists {layers} layers but its config {config} lists {diff_ids} diff_ids"
    )]
    DiffIdCount {
        manifest: Digest,
        config: Digest,
        layers: usize,
        diff_ids: usize,
    },
    #[error("layer {digest} has unsupported media type {media_type:?}")]
    LayerMediaType { digest: Digest, media_type: String },
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type implies; `None` for types lull does not unpack.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        use media_types::*;
        match media_type {
            OCI_LAYER | DOCKER_LAYER => Some(Compression::None),
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(Compression::Gzip),
            OCI_LAYER_ZSTD | DOCKER_LAYER_ZSTD => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => media_types::OCI_LAYER,
            Compression::Gzip => media_types::OCI_LAYER_GZIP,
            Compression::Zstd => media_types::OCI_LAYER_ZSTD,
        }
    }

    /// Recognises gzip and zstd by their magic bytes; anything else is taken as a plain tar.
    pub fn sniff(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// An OS/architecture pair, as in an index's `platform` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    pub fn linux_amd64() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    /// Whether an index entry's platform satisfies this wanted platform (a wanted variant of
    /// `None` accepts any variant).
    pub fn accepts(&self, candidate: &Platform) -> bool {
        self.os == candidate.os
            && self.architecture == candidate.architecture
            && (self.variant.is_none() || self.variant == candidate.variant)
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform::linux_amd64()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A content descriptor (sha256 digests only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A single-platform image manifest.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone)]
pub struct ImageIndex {
    pub media_type: String,
    pub manifests: Vec<Descriptor>,
}

impl ImageIndex {
    /// The first entry for `wanted`, if any.
    pub fn select(&self, wanted: &Platform) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| wanted.accepts(p)))
    }

    /// The platforms the index offers, for error messages.
    pub fn platforms(&self) -> Vec<String> {
        self.manifests
            .iter()
            .map(|m| match &m.platform {
                Some(p) => p.to_string(),
                None => format!("(no platform: {})", m.digest),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// Parses a manifest or an index; `what` names it in errors (e.g. "manifest sha256:..").
pub fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, ImageError> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|source| ImageError::ManifestJson {
            what: what.to_owned(),
            source,
        })?;
    let version = raw.schema_version.ok_or_else(|| ImageError::MissingField {
        what: what.to_owned(),
        field: "schemaVersion",
    })?;
    if version != 2 {
        return Err(ImageError::SchemaVersion {
            what: what.to_owned(),
            version,
        });
    }
    let is_index = match raw.media_type.as_deref() {
        Some(media_types::OCI_MANIFEST | media_types::DOCKER_MANIFEST) => false,
        Some(media_types::OCI_INDEX | media_types::DOCKER_MANIFEST_LIST) => true,
        Some(other) => {
            return Err(ImageError::UnsupportedManifest {
                what: what.to_owned(),
                media_type: other.to_owned(),
            });
        }
        None => raw.manifests.is_some(),
    };
    let missing = |field| ImageError::MissingField {
        what: what.to_owned(),
        field,
    };
    if is_index {
        Ok(Manifest::Index(ImageIndex {
            media_type: raw
                .media_type
                .unwrap_or_else(|| media_types::OCI_INDEX.to_owned()),
            manifests: raw.manifests.ok_or_else(|| missing("manifests"))?,
        }))
    } else {
        Ok(Manifest::Image(ImageManifest {
            media_type: raw
                .media_type
                .unwrap_or_else(|| media_types::OCI_MANIFEST.to_owned()),
            config: raw.config.ok_or_else(|| missing("config"))?,
            layers: raw.layers.ok_or_else(|| missing("layers"))?,
        }))
    }
}

/// What lull uses from an image config (the full config stays available as a blob).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `"8080/tcp"` style keys of `ExposedPorts`, sorted.
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RawConfigFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RawRunConfig>,
    #[serde(default)]
    rootfs: Option<RawRootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRunConfig {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default, deserialize_with = "string_or_list")]
    entrypoint: Option<Vec<String>>,
    #[serde(default, deserialize_with = "string_or_list")]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    stop_signal: Option<String>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default)]
    diff_ids: Option<Vec<Digest>>,
}

/// Docker accepts `"Cmd": "x"` as well as `["x"]`.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(s)) => Some(vec![s]),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

/// The parts of a config file the store keeps: the run config and the layer diff_ids.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    pub config: ImageConfig,
    pub diff_ids: Vec<Digest>,
}

pub fn parse_config(bytes: &[u8], digest: &Digest) -> Result<ParsedConfig, ImageError> {
    let raw: RawConfigFile =
        serde_json::from_slice(bytes).map_err(|source| ImageError::ConfigJson {
            config: digest.clone(),
            source,
        })?;
    let diff_ids =
        raw.rootfs
            .and_then(|r| r.diff_ids)
            .ok_or_else(|| ImageError::MissingDiffIds {
                config: digest.clone(),
            })?;
    let run = raw.config.unwrap_or_default();
    Ok(ParsedConfig {
        config: ImageConfig {
            architecture: raw.architecture.unwrap_or_default(),
            os: raw.os.unwrap_or_default(),
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
            exposed_ports: run
                .exposed_ports
                .map(|p| p.into_keys().collect())
                .unwrap_or_default(),
            labels: run.labels.unwrap_or_default(),
            stop_signal: run.stop_signal.filter(|s| !s.is_empty()),
        },
        diff_ids,
    })
}

/// One layer of an image, in manifest order (lowest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Digest of the blob as stored (compressed, if it is).
    pub digest: Digest,
    /// Digest of the uncompressed tar (from the config's rootfs.diff_ids).
    pub diff_id: Digest,
    pub media_type: String,
    pub size: u64,
}

impl LayerRecord {
    pub fn compression(&self) -> Compression {
        // Records only hold media types that passed `Compression::from_media_type`.
        Compression::from_media_type(&self.media_type).unwrap_or(Compression::None)
    }
}

/// Everything the store knows about one image (one platform manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The references that point at this image (from the refs index), sorted.
    #[serde(default)]
    pub references: Vec<Reference>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    /// The index or manifest list this manifest was resolved from, if any (its blob is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    pub config: ImageConfig,
    pub layers: Vec<LayerRecord>,
}

impl ImageRecord {
    /// Every blob the record needs kept: manifest, config, layers and the index if any.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest_digest, &self.config_digest]
            .into_iter()
            .chain(self.index_digest.as_ref())
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

/// Builds the record for a manifest whose config blob is `config_bytes`.
pub fn build_record(
    manifest_digest: &Digest,
    manifest: &ImageManifest,
    config_bytes: &[u8],
    index_digest: Option<Digest>,
) -> Result<ImageRecord, ImageError> {
    let config_digest = &manifest.config.digest;
    match manifest.config.media_type.as_str() {
        media_types::OCI_CONFIG | media_types::DOCKER_CONFIG => {}
        other => {
            return Err(ImageError::ConfigMediaType {
                config: config_digest.clone(),
                media_type: other.to_owned(),
            });
        }
    }
    let parsed = parse_config(config_bytes, config_digest)?;
    if parsed.diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::DiffIdCount {
            manifest: manifest_digest.clone(),
            config: config_digest.clone(),
            layers: manifest.layers.len(),
            diff_ids: parsed.diff_ids.len(),
        });
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (layer, diff_id) in manifest.layers.iter().zip(parsed.diff_ids) {
        if Compression::from_media_type(&layer.media_type).is_none() {
            return Err(ImageError::LayerMediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
        layers.push(LayerRecord {
            digest: layer.digest.clone(),
            diff_id,
            media_type: layer.media_type.clone(),
            size: layer.size,
        });
    }
    Ok(ImageRecord {
        references: Vec::new(),
        manifest_digest: manifest_digest.clone(),
        manifest_media_type: manifest.media_type.clone(),
        index_digest,
        config_digest: config_digest.clone(),
        config: parsed.config,
        layers,
    })
}

/// Checks that every layer media type is one lull can unpack, before anything is downloaded.
pub fn check_layer_media_types(manifest: &ImageManifest) -> Result<(), ImageError> {
    for layer in &manifest.layers {
        if Compression::from_media_type(&layer.media_type).is_none() {
            return Err(ImageError::LayerMediaType {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of_bytes(s.as_bytes())
    }

    #[test]
    fn parses_docker_config_with_nulls_and_string_cmd() {
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","container_config":{{"Hostname":"x"}},
            "config":{{"Entrypoint":null,"Cmd":"/bin/sh","Env":["A=1"],"WorkingDir":"",
            "ExposedPorts":{{"8080/tcp":{{}},"53/udp":{{}}}},"Labels":null,"User":"app"}},
            "rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            d("a")
        );
        let parsed = parse_config(cfg.as_bytes(), &d("cfg")).unwrap();
        assert_eq!(parsed.config.cmd, vec!["/bin/sh"]);
        assert!(parsed.config.entrypoint.is_empty());
        assert_eq!(parsed.config.working_dir, None);
        assert_eq!(parsed.config.user.as_deref(), Some("app"));
        assert_eq!(parsed.config.exposed_ports, vec!["53/udp", "8080/tcp"]);
        assert_eq!(parsed.diff_ids, vec![d("a")]);
    }

    #[test]
    fn diff_id_count_must_match() {
        let manifest = ImageManifest {
            media_type: media_types::OCI_MANIFEST.into(),
            config: Descriptor {
                media_type: media_types::OCI_CONFIG.into(),
                digest: d("cfg"),
                size: 1,
                platform: None,
                annotations: BTreeMap::new(),
            },
            layers: vec![],
        };
        let cfg = format!(
            r#"{{"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            d("a")
        );
        let err = build_record(&d("m"), &manifest, cfg.as_bytes(), None).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::DiffIdCount {
                    layers: 0,
                    diff_ids: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn rejects_schema1_and_unknown_media_types() {
        let err = parse_manifest(
            br#"{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+json"}"#,
            "manifest x",
        )
        .unwrap_err();
        assert!(
            matches!(err, ImageError::SchemaVersion { version: 1, .. }),
            "{err}"
        );
        let err = parse_manifest(
            br#"{"schemaVersion":2,"mediaType":"application/x-other"}"#,
            "manifest x",
        )
        .unwrap_err();
        assert!(
            matches!(err, ImageError::UnsupportedManifest { .. }),
            "{err}"
        );
        // A descriptor with a non-sha256 digest does not parse.
        let err = parse_manifest(
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha512:ab","size":1}]}"#,
            "index y",
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::ManifestJson { .. }), "{err}");
    }

    #[test]
    fn sniffs_compression() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/passwd"), Compression::None);
    }
}
