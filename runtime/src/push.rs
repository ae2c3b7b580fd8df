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
            OciDistributionError::RequestError(e)
                if e.status().is_some_and(|s| matches!(s.as_u16(), 401 | 403)) =>
            {
                Ok(PushError::Unauthorized {
                    reference: self.target.clone(),
                    detail: e.to_string(),
                })
            }
            OciDistributionError::ServerError { url, code, message }
                if matches!(code, 401 | 403) =>
            {
                Ok(PushError::Unauthorized {
                    reference: self.target.clone(),
                    detail: format!("{code} from {url}: {}", message.trim()),
                })
            }
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
    use crate::store::{BuiltLayer, ImageConfigEdit, media_types};
    use base64::Engine as _;
    use futures_util::TryStreamExt as _;
    use http_body_util::{BodyExt as _, Full};
    use hyper::{Method, Request, Response, StatusCode};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// A registry speaking just enough of the distribution API for a push, behind HTTP basic
    /// auth; it records every request and whether it carried the right credentials.
    #[derive(Default)]
    struct FakeRegistry {
        addr: String,
        authorization: String,
        blobs: HashMap<String, Bytes>,
        manifests: HashMap<String, (Bytes, String)>,
        /// (method, path, authorized)
        requests: Vec<(Method, String, bool)>,
        uploads: u32,
    }

    fn respond(
        status: StatusCode,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let mut response = Response::builder().status(status);
        for (name, value) in headers {
            response = response.header(*name, value);
        }
        response.body(Full::new(body)).unwrap()
    }

    async fn handle(
        state: Arc<Mutex<FakeRegistry>>,
        request: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut state = state.lock().unwrap();
        let authorized = parts
            .headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == state.authorization.as_bytes());
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        state
            .requests
            .push((parts.method.clone(), path.clone(), authorized));
        let empty = Bytes::new();
        if !authorized {
            return Ok(respond(
                StatusCode::UNAUTHORIZED,
                &[("WWW-Authenticate", "Basic realm=\"fake\"".into())],
                empty,
            ));
        }
        let base = format!("http://{}", state.addr);
        let parts_of: Vec<&str> = path.trim_start_matches("/v2/").split('/').collect();
        let response = match (&parts.method, parts_of.as_slice()) {
            (&Method::GET, [""]) => respond(StatusCode::OK, &[], empty),
            (&Method::HEAD, [.., "blobs", digest]) => {
                let status = if state.blobs.contains_key(*digest) {
                    StatusCode::OK
                } else {
                    StatusCode::NOT_FOUND
                };
                respond(status, &[], empty)
            }
            (&Method::POST, [.., "blobs", "uploads", ""]) => {
                // Mounts are refused: the client must fall back to an upload.
                state.uploads += 1;
                let location = format!("{base}{path}{}", state.uploads);
                respond(StatusCode::ACCEPTED, &[("Location", location)], empty)
            }
            (&Method::PUT, [name @ .., "blobs", "uploads", _]) => {
                let digest = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("digest="))
                    .unwrap_or("")
                    .replace("%3A", ":");
                if Digest::of_bytes(&body).to_string() != digest {
                    respond(StatusCode::BAD_REQUEST, &[], Bytes::from("digest invalid"))
                } else {
                    let location = format!("{base}/v2/{}/blobs/{digest}", name.join("/"));
                    state.blobs.insert(digest, body);
                    respond(StatusCode::CREATED, &[("Location", location)], empty)
                }
            }
            (&Method::PUT, [.., "manifests", tag]) => {
                let content_type = parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let digest = Digest::of_bytes(&body).to_string();
                state
                    .manifests
                    .insert((*tag).to_owned(), (body, content_type));
                respond(
                    StatusCode::CREATED,
                    &[
                        ("Location", format!("{base}{path}")),
                        ("Docker-Content-Digest", digest),
                    ],
                    empty,
                )
            }
            (&Method::HEAD, [.., "manifests", tag]) => match state.manifests.get(*tag) {
                Some((bytes, content_type)) => respond(
                    StatusCode::OK,
                    &[
                        ("Docker-Content-Digest", Digest::of_bytes(bytes).to_string()),
                        ("Content-Type", content_type.clone()),
                    ],
                    empty,
                ),
                None => respond(StatusCode::NOT_FOUND, &[], empty),
            },
            _ => respond(StatusCode::NOT_FOUND, &[], empty),
        };
        Ok(response)
    }

    async fn start_fake_registry(user: &str, password: &str) -> Arc<Mutex<FakeRegistry>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let state = Arc::new(Mutex::new(FakeRegistry {
            addr: listener.local_addr().unwrap().to_string(),
            authorization: format!("Basic {encoded}"),
            ..FakeRegistry::default()
        }));
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |r| handle(state.clone(), r));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        state
    }

    async fn small_built_image(store: &ImageStore) -> ImageRecord {
        let (digest, size) = store.blobs().ingest_bytes(b"a layer tar", None).unwrap();
        let layer = BuiltLayer {
            diff_id: digest.clone(),
            digest,
            size,
            media_type: media_types::OCI_LAYER.into(),
        };
        let config = ImageConfigEdit {
            added_diff_ids: vec![layer.diff_id.clone()],
            ..ImageConfigEdit::default()
        }
        .apply(br#"{"architecture":"amd64","os":"linux","rootfs":{"diff_ids":[]}}"#)
        .unwrap();
        let guard = store.hold_ingest().await;
        store
            .commit_built(&guard, &config, &[layer], &["app:v1".parse().unwrap()])
            .unwrap()
    }

    #[tokio::test]
    async fn push_uses_docker_config_credentials_and_sends_our_manifest_bytes() {
        let registry = start_fake_registry("alice", "s3cret").await;
        let addr = registry.lock().unwrap().addr.clone();
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("store")).unwrap();
        let image = small_built_image(&store).await;
        let docker_config = dir.path().join("config.json");
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &docker_config,
            format!(r#"{{"auths":{{"{addr}":{{"auth":"{encoded}"}}}}}}"#),
        )
        .unwrap();
        let options = PullOptions {
            docker_config: Some(docker_config),
            ..PullOptions::default()
        };
        let target: Reference = format!("{addr}/team/app:v1").parse().unwrap();

        let report = store.push(&image, &target, &options).await.unwrap();
        assert_eq!(report.manifest_digest, image.manifest_digest);
        assert_eq!(
            report.uploaded,
            vec![image.layers[0].digest.clone(), image.config_digest.clone()]
        );
        assert_eq!(
            report.bytes_uploaded,
            image.layers[0].size + {
                std::fs::metadata(store.blob_path(&image.config_digest))
                    .unwrap()
                    .len()
            }
        );
        {
            let state = registry.lock().unwrap();
            let (bytes, content_type) = &state.manifests["v1"];
            assert_eq!(
                bytes.as_ref(),
                std::fs::read(store.blob_path(&image.manifest_digest)).unwrap()
            );
            assert_eq!(content_type, media_types::OCI_MANIFEST);
            // Past the version check, every request carried the credentials.
            let unauthorized: Vec<_> = state
                .requests
                .iter()
                .filter(|(_, path, ok)| !ok && path != "/v2/")
                .collect();
            assert!(unauthorized.is_empty(), "{unauthorized:?}");
        }

        // Pushed again: every blob is found by HEAD, nothing is uploaded.
        let again = store.push(&image, &target, &options).await.unwrap();
        assert!(again.uploaded.is_empty(), "{again:?}");
        assert_eq!(again.existing.len(), 2);

        // Wrong credentials are reported as such, naming the target.
        let wrong = PullOptions {
            credentials: Some(crate::pull::Credentials::new("alice", "wrong")),
            ..PullOptions::default()
        };
        let other: Reference = format!("{addr}/team/other:v1").parse().unwrap();
        let err = store.push(&image, &other, &wrong).await.unwrap_err();
        assert!(matches!(err, PushError::Unauthorized { .. }), "{err:?}");
        assert!(err.to_string().contains("team/other"), "{err}");
    }

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
