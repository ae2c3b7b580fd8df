//! Pulling images from OCI distribution registries (Docker Hub, GHCR, a local docker-registry..)
//! into the [`ImageStore`], through `oci-client`.
//!
//! Manifests are fetched raw and parsed here (so indexes resolve to the wanted platform with an
//! error listing what is available); every blob is streamed straight into the blob store's
//! ingest, which verifies its digest and size. Blobs already present are not fetched again.

// Errors name the reference, digests and platforms they concern; they are cold and rare, so
// their size does not matter more than their precision.
#![allow(clippy::result_large_err)]

pub mod auth;

use std::path::PathBuf;
use std::sync::Once;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tracing::Instrument as _;

use crate::digest::Digest;
use crate::reference::Reference;
use crate::store::image::{self, Descriptor, ImageError, Manifest, Platform, media_types};
use crate::store::{BlobError, ImageRecord, ImageStore, StoreError};

pub use auth::{AuthError, Credentials, DockerConfig};

/// Config blobs larger than this are refused (real ones are kilobytes).
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot build registry client for {reference}")]
    Client {
        reference: Reference,
        source: Box<OciDistributionError>,
    },
    #[error("registry {} refused access to {reference} (check the credentials): {detail}", reference.registry())]
    Unauthorized {
        reference: Reference,
        detail: String,
    },
    #[error("registry request for {reference} failed")]
    Registry {
        reference: Reference,
        source: Box<OciDistributionError>,
    },
    #[error("manifest of {reference} hashes to {actual}, expected {expected}")]
    ManifestDigest {
        reference: Reference,
        expected: Digest,
        actual: Digest,
    },
    #[error("manifest {digest} of {reference} is {actual} bytes, its descriptor says {expected}")]
    ManifestSize {
        reference: Reference,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("invalid image metadata for {reference}")]
    Image {
        reference: Reference,
        source: ImageError,
    },
    #[error("{reference} has no {wanted} image; available platforms: {available}")]
    NoMatchingPlatform {
        reference: Reference,
        wanted: Platform,
        available: String,
    },
    #[error("index of {reference} points at another index {digest} for {wanted}")]
    NestedIndex {
        reference: Reference,
        digest: Digest,
        wanted: Platform,
    },
    #[error("config {digest} of {reference} is {size} bytes, more than the {max} allowed")]
    ConfigTooLarge {
        reference: Reference,
        digest: Digest,
        size: u64,
        max: u64,
    },
    #[error("cannot download blob {digest} of {reference}")]
    Fetch {
        reference: Reference,
        digest: Digest,
        source: Box<OciDistributionError>,
    },
    #[error("cannot store blob {digest} of {reference}")]
    Blob {
        reference: Reference,
        digest: Digest,
        source: BlobError,
    },
    #[error("cannot read stored blob {path}")]
    ReadBlob {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How to reach a registry and which image to pick.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Explicit credentials; when set, no docker config is read.
    pub credentials: Option<Credentials>,
    /// A docker `config.json` to read credentials from (it must exist); when set, the default
    /// locations are not consulted.
    pub docker_config: Option<PathBuf>,
    /// Read `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json` (default true).
    pub search_default_docker_config: bool,
    /// Registries (`host:port`, or `host` for every port) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Also speak plain HTTP to loopback registries (localhost, 127.0.0.0/8, ::1), as Docker
    /// does (default true).
    pub allow_insecure_loopback: bool,
    /// The platform to pick from an index (default linux/amd64).
    pub platform: Platform,
    pub connect_timeout: Duration,
    /// Longest silence while reading a response.
    pub read_timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            credentials: None,
            docker_config: None,
            search_default_docker_config: true,
            insecure_registries: Vec::new(),
            allow_insecure_loopback: true,
            platform: Platform::linux_amd64(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
        }
    }
}

impl PullOptions {
    /// Whether `reference`'s registry may be reached over plain HTTP.
    pub fn is_insecure(&self, reference: &Reference) -> bool {
        if self.allow_insecure_loopback && reference.is_loopback() {
            return true;
        }
        let registry = reference.registry();
        let host = reference.host();
        self.insecure_registries.iter().any(|entry| {
            entry.eq_ignore_ascii_case(registry)
                || entry.eq_ignore_ascii_case(reference.api_host())
                || (!entry.contains(':') && entry.eq_ignore_ascii_case(host))
                || (entry.starts_with('[')
                    && entry.ends_with(']')
                    && entry[1..entry.len() - 1].eq_ignore_ascii_case(host))
        })
    }

    /// The `oci-client` configuration for talking to `reference`'s registry.
    pub(crate) fn client_config(&self, reference: &Reference) -> ClientConfig {
        let protocol = if self.is_insecure(reference) {
            ClientProtocol::HttpsExcept(vec![reference.api_host().to_owned()])
        } else {
            ClientProtocol::Https
        };
        ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(self.connect_timeout),
            read_timeout: Some(self.read_timeout),
            ..ClientConfig::default()
        }
    }

    /// Explicit credentials, else those the docker config holds for the registry, else none.
    pub(crate) fn registry_auth(&self, reference: &Reference) -> Result<RegistryAuth, AuthError> {
        let credentials = match &self.credentials {
            Some(c) => Some(c.clone()),
            None => auth::lookup_credentials(
                reference.registry(),
                self.docker_config.as_deref(),
                self.search_default_docker_config,
            )?,
        };
        Ok(match credentials {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        })
    }
}

pub(crate) fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

struct Session<'a> {
    client: Client,
    auth: RegistryAuth,
    reference: &'a Reference,
    oci: oci_client::Reference,
    store: &'a ImageStore,
}

impl Session<'_> {
    fn registry_error(&self, source: OciDistributionError) -> PullError {
        match source {
            OciDistributionError::AuthenticationFailure(detail) => PullError::Unauthorized {
                reference: self.reference.clone(),
                detail: detail.trim().to_owned(),
            },
            OciDistributionError::UnauthorizedError { url } => PullError::Unauthorized {
                reference: self.reference.clone(),
                detail: format!("401 unauthorized from {url}"),
            },
            source => PullError::Registry {
                reference: self.reference.clone(),
                source: Box::new(source),
            },
        }
    }

    fn image_error(&self, source: ImageError) -> PullError {
        PullError::Image {
            reference: self.reference.clone(),
            source,
        }
    }

    /// Fetches a manifest or index, checking it against `expected` (digest and size) if given.
    async fn fetch_manifest(
        &self,
        oci: &oci_client::Reference,
        expected: Option<(&Digest, Option<u64>)>,
    ) -> Result<(bytes::Bytes, Digest), PullError> {
        let (body, _header_digest) = self
            .client
            .pull_manifest_raw(oci, &self.auth, media_types::ALL_MANIFESTS)
            .await
            .map_err(|e| self.registry_error(e))?;
        let actual = Digest::of_bytes(&body);
        if let Some((expected, size)) = expected {
            if *expected != actual {
                return Err(PullError::ManifestDigest {
                    reference: self.reference.clone(),
                    expected: expected.clone(),
                    actual,
                });
            }
            if let Some(size) = size
                && size != body.len() as u64
            {
                return Err(PullError::ManifestSize {
                    reference: self.reference.clone(),
                    digest: actual,
                    expected: size,
                    actual: body.len() as u64,
                });
            }
        }
        Ok((body, actual))
    }

    fn store_bytes(&self, bytes: &[u8], digest: &Digest) -> Result<(), PullError> {
        self.store
            .blobs()
            .ingest_bytes(bytes, Some(digest))
            .map_err(|source| PullError::Blob {
                reference: self.reference.clone(),
                digest: digest.clone(),
                source,
            })?;
        Ok(())
    }

    /// Streams a blob into the store unless it is already there.
    async fn fetch_blob(&self, descriptor: &Descriptor) -> Result<(), PullError> {
        let digest = &descriptor.digest;
        if self.store.has_blob(digest) {
            tracing::debug!(%digest, "blob already present");
            return Ok(());
        }
        let digest_text = digest.to_string();
        let stream = self
            .client
            .pull_blob_stream(&self.oci, digest_text.as_str())
            .await
            .map_err(|source| match self.registry_error(source) {
                PullError::Registry { source, .. } => PullError::Fetch {
                    reference: self.reference.clone(),
                    digest: digest.clone(),
                    source,
                },
                other => other,
            })?;
        tracing::debug!(%digest, size = descriptor.size, "downloading blob");
        self.store
            .blobs()
            .ingest_stream(stream, digest, Some(descriptor.size))
            .await
            .map_err(|source| PullError::Blob {
                reference: self.reference.clone(),
                digest: digest.clone(),
                source,
            })?;
        Ok(())
    }
}

impl ImageStore {
    /// Pulls `reference` into the store and points it at the pulled image.
    pub async fn pull(
        &self,
        reference: &Reference,
        options: &PullOptions,
    ) -> Result<ImageRecord, PullError> {
        let span = tracing::info_span!("pull", reference = %reference);
        self.pull_inner(reference, options).instrument(span).await
    }

    async fn pull_inner(
        &self,
        reference: &Reference,
        options: &PullOptions,
    ) -> Result<ImageRecord, PullError> {
        install_crypto_provider();
        let auth = options.registry_auth(reference)?;
        let client = Client::try_from(options.client_config(reference)).map_err(|source| {
            PullError::Client {
                reference: reference.clone(),
                source: Box::new(source),
            }
        })?;
        let session = Session {
            client,
            auth,
            reference,
            oci: reference.to_oci(),
            store: self,
        };

        // Authenticate up front so that refused credentials surface as such (oci-client
        // otherwise retries anonymously and reports a bare 401 later).
        session
            .client
            .auth(&session.oci, &session.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| session.registry_error(e))?;

        let _ingest = self.ingest_lock().await;

        let expected_top = reference.digest().map(|d| (d, None));
        let (top_bytes, top_digest) = session.fetch_manifest(&session.oci, expected_top).await?;
        let top = image::parse_manifest(&top_bytes, &format!("manifest of {reference}"))
            .map_err(|e| session.image_error(e))?;

        let (manifest_bytes, manifest_digest, manifest, index_digest) = match top {
            Manifest::Image(manifest) => (top_bytes, top_digest, manifest, None),
            Manifest::Index(index) => {
                let entry = index.select(&options.platform).ok_or_else(|| {
                    PullError::NoMatchingPlatform {
                        reference: reference.clone(),
                        wanted: options.platform.clone(),
                        available: index.platforms().join(", "),
                    }
                })?;
                tracing::debug!(digest = %entry.digest, platform = %options.platform, "resolved index entry");
                let child_ref = session.oci.clone_with_digest(entry.digest.to_string());
                let (bytes, digest) = session
                    .fetch_manifest(&child_ref, Some((&entry.digest, Some(entry.size))))
                    .await?;
                let parsed = image::parse_manifest(&bytes, &format!("manifest {digest}"))
                    .map_err(|e| session.image_error(e))?;
                let Manifest::Image(manifest) = parsed else {
                    return Err(PullError::NestedIndex {
                        reference: reference.clone(),
                        digest,
                        wanted: options.platform.clone(),
                    });
                };
                session.store_bytes(&top_bytes, &top_digest)?;
                (bytes, digest, manifest, Some(top_digest))
            }
        };
        image::check_layer_media_types(&manifest).map_err(|e| session.image_error(e))?;

        if manifest.config.size > MAX_CONFIG_BYTES {
            return Err(PullError::ConfigTooLarge {
                reference: reference.clone(),
                digest: manifest.config.digest.clone(),
                size: manifest.config.size,
                max: MAX_CONFIG_BYTES,
            });
        }
        session.fetch_blob(&manifest.config).await?;
        let config_path = self.blob_path(&manifest.config.digest);
        let config_bytes =
            tokio::fs::read(&config_path)
                .await
                .map_err(|source| PullError::ReadBlob {
                    path: config_path.clone(),
                    source,
                })?;
        // Parse before downloading layers: a diff_id mismatch fails fast.
        let record = image::build_record(&manifest_digest, &manifest, &config_bytes, index_digest)
            .map_err(|e| session.image_error(e))?;

        for layer in &manifest.layers {
            session.fetch_blob(layer).await?;
        }
        session.store_bytes(&manifest_bytes, &manifest_digest)?;

        let store = self.clone();
        let reference_owned = reference.clone();
        let committed = tokio::task::spawn_blocking(move || {
            store.commit_record(&record, std::slice::from_ref(&reference_owned))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        tracing::info!(reference = %reference, manifest = %committed.manifest_digest, layers = committed.layers.len(), "pulled image");
        Ok(committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_registries() {
        let defaults = PullOptions::default();
        let r = |s: &str| s.parse::<Reference>().unwrap();
        assert!(defaults.is_insecure(&r("127.0.0.1:5000/a")));
        assert!(defaults.is_insecure(&r("localhost:5000/a")));
        assert!(defaults.is_insecure(&r("[::1]:5000/a")));
        assert!(!defaults.is_insecure(&r("reg.example:5000/a")));
        assert!(!defaults.is_insecure(&r("alpine")));

        let strict = PullOptions {
            allow_insecure_loopback: false,
            insecure_registries: vec!["reg.example:5000".into(), "lan.example".into()],
            ..PullOptions::default()
        };
        assert!(!strict.is_insecure(&r("127.0.0.1:5000/a")));
        assert!(strict.is_insecure(&r("reg.example:5000/a")));
        assert!(!strict.is_insecure(&r("reg.example:5001/a")));
        assert!(strict.is_insecure(&r("lan.example:7000/a")));
        assert!(strict.is_insecure(&r("lan.example/a")));
    }

    #[test]
    fn explicit_credentials_win_over_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, br#"{"credHelpers":{"ghcr.io":"gh"}}"#).unwrap();
        let reference: Reference = "ghcr.io/a/b".parse().unwrap();
        let from_config = PullOptions {
            docker_config: Some(path.clone()),
            ..PullOptions::default()
        };
        assert!(matches!(
            from_config.registry_auth(&reference),
            Err(AuthError::CredentialHelper { .. })
        ));
        let explicit = PullOptions {
            credentials: Some(Credentials::new("u", "p")),
            docker_config: Some(path),
            ..PullOptions::default()
        };
        assert!(matches!(
            explicit.registry_auth(&reference),
            Ok(RegistryAuth::Basic(u, p)) if u == "u" && p == "p"
        ));
    }
}
