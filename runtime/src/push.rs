//! Pushing an image from the store to an OCI distribution registry, through `oci-client`.
//!
//! Blobs the registry already has (HEAD) are skipped; blobs another repository of the same
//! registry holds (one the image was pulled from or tagged with) are mounted; the rest are
//! streamed from the blob store in one monolithic PUT each (`push_blob_stream`), so no layer is
//! held in memory. The manifest goes up byte for byte as stored (`push_manifest_raw`), so its
//! digest in the registry is the image's manifest digest, which the push then checks.
//!
//! Only the image's own manifest goes up: an index it was pulled through is not pushed.
//! Credentials and plain-HTTP registries are resolved as for pulls ([`PullOptions`]).

// Errors name the reference and digest they concern; they are cold and rare.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tokio::io::AsyncReadExt as _;
use tracing::Instrument as _;

use crate::digest::Digest;
use crate::pull::{AuthError, PullOptions, install_crypto_provider};
use crate::reference::Reference;
use crate::store::{ImageRecord, ImageStore};

/// Bytes read from a blob file per chunk of an upload.
const CHUNK_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
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
    #[error("{reference} names digest {target}, but the image's manifest is {manifest}")]
    TargetDigest {
        reference: Reference,
        target: Digest,
        manifest: Digest,
    },
    #[error("blob {digest} of the image is missing from the store at {path}")]
    BlobMissing { digest: Digest, path: PathBuf },
    #[error("cannot read stored blob {path}")]
    ReadBlob {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot check whether {reference} has blob {digest}")]
    Check {
        reference: Reference,
        digest: Digest,
        source: Box<OciDistributionError>,
    },
    #[error("cannot upload blob {digest} to {reference}")]
    Upload {
        reference: Reference,
        digest: Digest,
        source: Box<OciDistributionError>,
    },
    #[error("cannot push manifest {digest} to {reference}")]
    Manifest {
        reference: Reference,
        digest: Digest,
        source: Box<OciDistributionError>,
    },
    #[error("registry stored the manifest pushed to {reference} as {actual}, expected {expected}")]
    ManifestDigest {
        reference: Reference,
        expected: Digest,
        actual: String,
    },
}

/// What [`ImageStore::push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    pub reference: Reference,
    pub manifest_digest: Digest,
    /// Blobs sent, in order.
    pub uploaded: Vec<Digest>,
    pub bytes_uploaded: u64,
    /// Blobs mounted from another repository of the registry.
    pub mounted: Vec<Digest>,
    /// Blobs the repository already had.
    pub existing: Vec<Digest>,
}

/// Reads a blob file as a stream of chunks, one chunk in memory at a time.
fn file_stream(
    file: tokio::fs::File,
) -> impl Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static {
    futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
        let n = file.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some((buf.freeze(), file)))
    })
}

struct PushSession<'a> {
    client: Client,
    auth: RegistryAuth,
    target: &'a Reference,
    oci: oci_client::Reference,
    store: &'a ImageStore,
    /// Repositories of the same registry the image is known under, to mount blobs from.
    mount_sources: Vec<oci_client::Reference>,
}

impl PushSession<'_> {
    fn auth_error(&self, source: OciDistributionError) -> Result<PushError, OciDistributionError> {
        match source {
            OciDistributionError::AuthenticationFailure(detail) => Ok(PushError::Unauthorized {
                reference: self.target.clone(),
                detail: detail.trim().to_owned(),
            }),
            OciDistributionError::UnauthorizedError { url } => Ok(PushError::Unauthorized {
                reference: self.target.clone(),
                detail: format!("401 unauthorized from {url}"),
            }),
            other => Err(other),
        }
    }

    async fn push_blob(&self, digest: &Digest, report: &mut PushReport) -> Result<(), PushError> {
        let path = self.store.blob_path(digest);
        let size = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PushError::BlobMissing {
                    digest: digest.clone(),
                    path,
                });
            }
            Err(source) => return Err(PushError::ReadBlob { path, source }),
        };
        let digest_text = digest.to_string();
        let exists = self
            .client
            .blob_exists(&self.oci, &digest_text)
            .await
            .map_err(|e| {
                self.auth_error(e)
                    .unwrap_or_else(|source| PushError::Check {
                        reference: self.target.clone(),
                        digest: digest.clone(),
                        source: Box::new(source),
                    })
            })?;
        if exists {
            tracing::debug!(%digest, "registry already has the blob");
            report.existing.push(digest.clone());
            return Ok(());
        }
        for source in &self.mount_sources {
            match self
                .client
                .mount_blob(&self.oci, source, &digest_text)
                .await
            {
                Ok(()) => {
                    tracing::debug!(%digest, from = %source, "mounted blob");
                    report.mounted.push(digest.clone());
                    return Ok(());
                }
                Err(e) => tracing::debug!(%digest, from = %source, error = %e, "mount refused"),
            }
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| PushError::ReadBlob {
                path: path.clone(),
                source,
            })?;
        tracing::debug!(%digest, size, "uploading blob");
        self.client
            .push_blob_stream(&self.oci, file_stream(file), &digest_text, Some(size))
            .await
            .map_err(|e| {
                self.auth_error(e)
                    .unwrap_or_else(|source| PushError::Upload {
                        reference: self.target.clone(),
                        digest: digest.clone(),
                        source: Box::new(source),
                    })
            })?;
        report.uploaded.push(digest.clone());
        report.bytes_uploaded += size;
        Ok(())
    }
}

impl ImageStore {
    /// Pushes `image` (a record of this store) to `target` (`registry/repository:tag`, or
    /// `@digest` if it is the image's manifest digest). Holds gc off while it runs.
    pub async fn push(
        &self,
        image: &ImageRecord,
        target: &Reference,
        options: &PullOptions,
    ) -> Result<PushReport, PushError> {
        let span =
            tracing::info_span!("push", reference = %target, manifest = %image.manifest_digest);
        self.push_inner(image, target, options)
            .instrument(span)
            .await
    }

    async fn push_inner(
        &self,
        image: &ImageRecord,
        target: &Reference,
        options: &PullOptions,
    ) -> Result<PushReport, PushError> {
        if let Some(digest) = target.digest()
            && *digest != image.manifest_digest
        {
            return Err(PushError::TargetDigest {
                reference: target.clone(),
                target: digest.clone(),
                manifest: image.manifest_digest.clone(),
            });
        }
        install_crypto_provider();
        let auth = options.registry_auth(target)?;
        let mut config = options.client_config(target);
        // One streamed PUT per blob: no chunk of a layer is buffered beyond what is in flight.
        config.use_monolithic_push = true;
        let client = Client::try_from(config).map_err(|source| PushError::Client {
            reference: target.clone(),
            source: Box::new(source),
        })?;
        let oci = target.to_oci();
        let mount_sources = image
            .references
            .iter()
            .filter(|r| r.registry() == target.registry() && r.repository() != target.repository())
            .map(Reference::to_oci)
            .collect();
        let session = PushSession {
            client,
            auth,
            target,
            oci,
            store: self,
            mount_sources,
        };
        // Authenticate up front so that refused credentials surface as such.
        session
            .client
            .auth(&session.oci, &session.auth, RegistryOperation::Push)
            .await
            .map_err(|e| {
                session
                    .auth_error(e)
                    .unwrap_or_else(|source| PushError::Registry {
                        reference: target.clone(),
                        source: Box::new(source),
                    })
            })?;

        let _ingest = self.ingest_lock().await;
        let mut report = PushReport {
            reference: target.clone(),
            manifest_digest: image.manifest_digest.clone(),
            uploaded: Vec::new(),
            bytes_uploaded: 0,
            mounted: Vec::new(),
            existing: Vec::new(),
        };
        for digest in image
            .layers
            .iter()
            .map(|l| &l.digest)
            .chain([&image.config_digest])
        {
            session.push_blob(digest, &mut report).await?;
        }

        let manifest_path = self.blob_path(&image.manifest_digest);
        let manifest =
            tokio::fs::read(&manifest_path)
                .await
                .map_err(|source| PushError::ReadBlob {
                    path: manifest_path,
                    source,
                })?;
        let manifest_err = |source| PushError::Manifest {
            reference: target.clone(),
            digest: image.manifest_digest.clone(),
            source: Box::new(source),
        };
        let content_type = image.manifest_media_type.parse().map_err(|e| {
            manifest_err(OciDistributionError::GenericError(Some(format!(
                "media type {:?} is not a valid header value: {e}",
                image.manifest_media_type
            ))))
        })?;
        session
            .client
            .push_manifest_raw(&session.oci, manifest, content_type)
            .await
            .map_err(|e| session.auth_error(e).unwrap_or_else(manifest_err))?;
        // What the registry now serves under the target must be our manifest, byte for byte.
        let stored = session
            .client
            .fetch_manifest_digest(&session.oci, &session.auth)
            .await
            .map_err(|e| session.auth_error(e).unwrap_or_else(manifest_err))?;
        if stored != image.manifest_digest.to_string() {
            return Err(PushError::ManifestDigest {
                reference: target.clone(),
                expected: image.manifest_digest.clone(),
                actual: stored,
            });
        }
        tracing::info!(
            uploaded = report.uploaded.len(),
            bytes = report.bytes_uploaded,
            mounted = report.mounted.len(),
            existing = report.existing.len(),
            "pushed image"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt as _;

    #[tokio::test]
    async fn file_stream_yields_the_file_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let content: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| i as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        let chunks: Vec<Bytes> = file_stream(file).try_collect().await.unwrap();
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_BYTES));
        assert_eq!(chunks.concat(), content);
    }

    #[tokio::test]
    async fn a_target_digest_other_than_the_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let image = ImageRecord {
            references: vec![],
            manifest_digest: Digest::of_bytes(b"manifest"),
            manifest_media_type: crate::store::media_types::OCI_MANIFEST.into(),
            index_digest: None,
            config_digest: Digest::of_bytes(b"config"),
            config: Default::default(),
            layers: vec![],
        };
        let target: Reference = "127.0.0.1:1/x/y".parse().unwrap();
        let target = target.with_digest(Digest::of_bytes(b"other"));
        let err = store
            .push(&image, &target, &PullOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, PushError::TargetDigest { .. }), "{err}");
    }
}
