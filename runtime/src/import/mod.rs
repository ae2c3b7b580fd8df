//! Importing images from files: an OCI image layout directory ([`ImageStore::import_oci_layout`])
//! or a `docker save`/`skopeo copy docker-archive:` tarball
//! ([`ImageStore::import_docker_archive`]).
//!
//! Every blob is copied through the store's verifying ingest; nothing is unpacked here.

mod docker_archive;
mod oci_layout;

use std::io::{self, Sink, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Digest, HashingWriter};
use crate::reference::{Reference, ReferenceError};
use crate::store::image::{Compression, ImageError, Platform};
use crate::store::{BlobError, BlobStore, ImageRecord, ImageStore, StoreError};

/// Manifests, indexes and configs larger than this are refused.
const MAX_METADATA_BYTES: u64 = 16 * 1024 * 1024;
/// The annotation naming an image in an OCI layout's index.json.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{dir} is not an OCI image layout: {reason}")]
    NotOciLayout { dir: PathBuf, reason: String },
    #[error("{path} is not valid json")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid image metadata in {what}")]
    Image { what: String, source: ImageError },
    #[error("no image named {name:?} in {path}; names present: {available}")]
    NoSuchName {
        path: PathBuf,
        name: String,
        available: String,
    },
    #[error("{path} holds {count} images; pick one by name (names present: {available})")]
    Ambiguous {
        path: PathBuf,
        count: usize,
        available: String,
    },
    #[error("{path} holds no image")]
    Empty { path: PathBuf },
    #[error("{what} has no {wanted} image; available platforms: {available}")]
    NoMatchingPlatform {
        what: String,
        wanted: Platform,
        available: String,
    },
    #[error("{what}: indexes nest deeper than {max} levels")]
    TooDeep { what: String, max: usize },
    #[error("blob {digest} in {path} is {size} bytes, more than the {max} allowed for metadata")]
    TooLarge {
        path: PathBuf,
        digest: Digest,
        size: u64,
        max: u64,
    },
    #[error("{what}: blob {digest} is {actual} bytes, its descriptor says {expected}")]
    Size {
        what: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: blob {digest} hashes to {actual}")]
    Digest {
        what: String,
        digest: Digest,
        actual: Digest,
    },
    #[error("cannot store blob from {source_path}")]
    Blob {
        source_path: String,
        source: BlobError,
    },
    #[error("docker archive {archive}: {reason}")]
    Archive { archive: PathBuf, reason: String },
    #[error("docker archive {archive}: cannot read entry {entry}")]
    ArchiveEntry {
        archive: PathBuf,
        entry: String,
        source: io::Error,
    },
    #[error("docker archive {archive}: entry {entry} listed in manifest.json is missing")]
    MissingEntry { archive: PathBuf, entry: String },
    #[error(
        "docker archive {archive}: layer {entry} has diff_id {actual}, the config says {expected}"
    )]
    DiffId {
        archive: PathBuf,
        entry: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("docker archive {archive}: invalid RepoTags entry {tag:?}")]
    RepoTag {
        archive: PathBuf,
        tag: String,
        source: ReferenceError,
    },
    #[error("docker archive {archive} has no RepoTags and no tag was given")]
    NoTag { archive: PathBuf },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImageStore {
    /// Imports the image named `ref_name` (its `org.opencontainers.image.ref.name` annotation;
    /// `None` takes the only image) from the OCI image layout at `dir`, resolving an index to
    /// linux/amd64, and tags it `tag_as`.
    pub async fn import_oci_layout(
        &self,
        dir: &Path,
        ref_name: Option<&str>,
        tag_as: &Reference,
    ) -> Result<ImageRecord, ImportError> {
        let _ingest = self.ingest_lock().await;
        let store = self.clone();
        let dir = dir.to_owned();
        let ref_name = ref_name.map(str::to_owned);
        let tag_as = tag_as.clone();
        tokio::task::spawn_blocking(move || {
            let record =
                oci_layout::import(&store, &dir, ref_name.as_deref(), &Platform::linux_amd64())?;
            Ok(store.commit_record(&record, std::slice::from_ref(&tag_as))?)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Imports a docker-archive tarball. With `tag_as`, the image is tagged with it (and, if the
    /// archive holds several images, the one whose RepoTags contain it is taken); without, it is
    /// tagged with its RepoTags.
    pub async fn import_docker_archive(
        &self,
        path: &Path,
        tag_as: Option<&Reference>,
    ) -> Result<ImageRecord, ImportError> {
        let _ingest = self.ingest_lock().await;
        let store = self.clone();
        let path = path.to_owned();
        let tag_as = tag_as.cloned();
        tokio::task::spawn_blocking(move || {
            let (record, references) = docker_archive::import(&store, &path, tag_as.as_ref())?;
            Ok(store.commit_record(&record, &references)?)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Hashes the uncompressed content of a layer as its compressed bytes stream by.
enum DiffHasher {
    Plain(HashingWriter<Sink>),
    Gzip(Box<flate2::write::MultiGzDecoder<HashingWriter<Sink>>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, HashingWriter<Sink>>>),
}

impl DiffHasher {
    fn new(compression: Compression) -> io::Result<Self> {
        let sink = HashingWriter::new(io::sink());
        Ok(match compression {
            Compression::None => DiffHasher::Plain(sink),
            Compression::Gzip => {
                DiffHasher::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink)))
            }
            Compression::Zstd => {
                DiffHasher::Zstd(Box::new(zstd::stream::write::Decoder::new(sink)?))
            }
        })
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            DiffHasher::Plain(w) => w.write_all(data),
            DiffHasher::Gzip(w) => w.write_all(data),
            DiffHasher::Zstd(w) => w.write_all(data),
        }
    }

    fn finish(self) -> io::Result<Digest> {
        let sink = match self {
            DiffHasher::Plain(w) => w,
            DiffHasher::Gzip(w) => w.finish()?,
            DiffHasher::Zstd(mut w) => {
                w.flush()?;
                w.into_inner()
            }
        };
        Ok(sink.finish().0)
    }
}

/// Copies a layer into the blob store, returning (digest, size, compression, diff_id).
fn ingest_layer<R: io::Read>(
    blobs: &BlobStore,
    reader: R,
    expected: Option<&Digest>,
    size: Option<u64>,
    source_name: &str,
) -> Result<(Digest, u64, Compression, Digest), ImportError> {
    let blob_err = |source| ImportError::Blob {
        source_path: source_name.to_owned(),
        source,
    };
    let read_err = |source| ImportError::Blob {
        source_path: source_name.to_owned(),
        source: BlobError::Source {
            expected: source_name.to_owned(),
            source,
        },
    };
    let mut reader = io::BufReader::with_capacity(64 * 1024, reader);
    let compression = Compression::sniff(io::BufRead::fill_buf(&mut reader).map_err(read_err)?);
    let mut diff = DiffHasher::new(compression).map_err(read_err)?;
    let mut pending = blobs.begin().map_err(blob_err)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match io::Read::read(&mut reader, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        pending.write_all(&buf[..n]).map_err(read_err)?;
        diff.write_all(&buf[..n]).map_err(|e| {
            read_err(io::Error::new(
                e.kind(),
                format!("cannot decompress {compression:?} layer: {e}"),
            ))
        })?;
        if let Some(size) = size
            && pending.bytes() > size
        {
            break;
        }
    }
    let diff_id = diff.finish().map_err(|e| {
        read_err(io::Error::new(
            e.kind(),
            format!("cannot decompress {compression:?} layer: {e}"),
        ))
    })?;
    let (digest, bytes) = pending.commit(expected, size).map_err(blob_err)?;
    Ok((digest, bytes, compression, diff_id))
}
