//! Content-addressed blobs: `<blobs>/sha256/<hex>`, written through `<blobs>/tmp/`.
//!
//! Invariant: a file under `sha256/` always holds exactly the bytes its name hashes to. Content
//! is streamed into a temporary file while hashing, checked against the expected digest and size,
//! fsynced, then renamed into place; a failed or abandoned ingest removes its temporary file.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::digest::{Digest, Hasher};

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("cannot create blob directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot clean temporary blob directory {path}")]
    CleanTmp { path: PathBuf, source: io::Error },
    #[error("cannot create temporary blob file in {path}")]
    CreateTemp { path: PathBuf, source: io::Error },
    #[error("cannot write temporary blob file {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read the content for blob {expected}")]
    Source { expected: String, source: io::Error },
    #[error("blob content hashes to {actual}, expected {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("cannot move blob {digest} into place at {path}")]
    Persist {
        digest: Digest,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot sync directory {path}")]
    SyncDir { path: PathBuf, source: io::Error },
}

/// The blob area of the store.
#[derive(Debug, Clone)]
pub struct BlobStore {
    sha256_dir: PathBuf,
    tmp_dir: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the blob area under `blobs_dir` and removes leftover
    /// temporary files from interrupted ingests.
    pub fn open(blobs_dir: &Path) -> Result<Self, BlobError> {
        let sha256_dir = blobs_dir.join("sha256");
        let tmp_dir = blobs_dir.join("tmp");
        for dir in [&sha256_dir, &tmp_dir] {
            fs::create_dir_all(dir).map_err(|source| BlobError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        let clean_err = |source| BlobError::CleanTmp {
            path: tmp_dir.clone(),
            source,
        };
        for entry in fs::read_dir(&tmp_dir).map_err(clean_err)? {
            let entry = entry.map_err(clean_err)?;
            let path = entry.path();
            let removed = if entry.file_type().map_err(clean_err)?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "removed leftover temporary blob")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(BlobError::CleanTmp { path, source }),
            }
        }
        Ok(BlobStore {
            sha256_dir,
            tmp_dir,
        })
    }

    /// Where the blob with this digest lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.sha256_dir.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn sha256_dir(&self) -> &Path {
        &self.sha256_dir
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Starts an ingest; write the content into the returned [`PendingBlob`], then commit it.
    pub fn begin(&self) -> Result<PendingBlob, BlobError> {
        let file = tempfile::Builder::new()
            .prefix("ingest-")
            .tempfile_in(&self.tmp_dir)
            .map_err(|source| BlobError::CreateTemp {
                path: self.tmp_dir.clone(),
                source,
            })?;
        Ok(PendingBlob {
            file,
            hasher: Hasher::new(),
            sha256_dir: self.sha256_dir.clone(),
        })
    }

    /// Ingests everything `reader` yields. With an `expected` digest and `size`, the content
    /// must match them; reading stops early once more than `size` bytes arrive.
    pub fn ingest_reader<R: Read>(
        &self,
        mut reader: R,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<(Digest, u64), BlobError> {
        let mut pending = self.begin()?;
        let label = expected.map_or_else(|| "(unknown)".to_owned(), Digest::to_string);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BlobError::Source {
                        expected: label,
                        source,
                    });
                }
            };
            pending.write_chunk(&buf[..n])?;
            pending.check_not_over(&label, size)?;
        }
        pending.commit(expected, size)
    }

    /// Ingests an in-memory blob (manifests, configs).
    pub fn ingest_bytes(
        &self,
        bytes: &[u8],
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), BlobError> {
        let digest = Digest::of_bytes(bytes);
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(BlobError::DigestMismatch {
                expected: expected.clone(),
                actual: digest,
            });
        }
        if self.contains(&digest) {
            return Ok((digest, bytes.len() as u64));
        }
        self.ingest_reader(bytes, Some(&digest), Some(bytes.len() as u64))
    }

    /// Ingests a stream of chunks (a registry download) without holding it in memory.
    pub async fn ingest_stream<S>(
        &self,
        stream: S,
        expected: &Digest,
        size: Option<u64>,
    ) -> Result<u64, BlobError>
    where
        S: Stream<Item = io::Result<Bytes>>,
    {
        let pending = self.begin()?;
        let label = expected.to_string();
        let path = pending.file.path().to_owned();
        let write_err = |source| BlobError::Write {
            path: path.clone(),
            source,
        };
        let std_file = pending.file.as_file().try_clone().map_err(write_err)?;
        let mut file = tokio::fs::File::from_std(std_file);
        let mut pending = pending;
        let mut stream = std::pin::pin!(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| BlobError::Source {
                expected: label.clone(),
                source,
            })?;
            pending.hasher.update(&chunk);
            pending.check_not_over(&label, size)?;
            file.write_all(&chunk).await.map_err(write_err)?;
        }
        file.flush().await.map_err(write_err)?;
        file.sync_all().await.map_err(write_err)?;
        drop(file);
        let (_, bytes) = pending.commit(Some(expected), size)?;
        Ok(bytes)
    }
}

/// A blob being written; dropped without [`PendingBlob::commit`] it leaves nothing behind.
pub struct PendingBlob {
    file: tempfile::NamedTempFile,
    hasher: Hasher,
    sha256_dir: PathBuf,
}

impl PendingBlob {
    fn write_chunk(&mut self, data: &[u8]) -> Result<(), BlobError> {
        self.hasher.update(data);
        self.file
            .as_file_mut()
            .write_all(data)
            .map_err(|source| BlobError::Write {
                path: self.file.path().to_owned(),
                source,
            })
    }

    fn check_not_over(&self, label: &str, size: Option<u64>) -> Result<(), BlobError> {
        match size {
            Some(expected) if self.hasher.bytes() > expected => Err(BlobError::SizeMismatch {
                digest: label.to_owned(),
                expected,
                actual: self.hasher.bytes(),
            }),
            _ => Ok(()),
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.hasher.bytes()
    }

    /// Verifies digest and size, fsyncs and renames the blob into place. Returns the digest and
    /// the size. The temporary file is removed on every error path.
    pub fn commit(
        self,
        expected: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<(Digest, u64), BlobError> {
        let PendingBlob {
            file,
            hasher,
            sha256_dir,
        } = self;
        let bytes = hasher.bytes();
        let actual = hasher.finish();
        if let Some(expected) = expected
            && *expected != actual
        {
            return Err(BlobError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if let Some(expected_size) = size
            && expected_size != bytes
        {
            return Err(BlobError::SizeMismatch {
                digest: actual.to_string(),
                expected: expected_size,
                actual: bytes,
            });
        }
        file.as_file()
            .sync_all()
            .map_err(|source| BlobError::Write {
                path: file.path().to_owned(),
                source,
            })?;
        let target = sha256_dir.join(actual.hex());
        file.persist(&target).map_err(|e| BlobError::Persist {
            digest: actual.clone(),
            path: target.clone(),
            source: e.error,
        })?;
        sync_dir(&sha256_dir)?;
        Ok((actual, bytes))
    }
}

impl Write for PendingBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_file_mut().write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_file_mut().flush()
    }
}

/// fsyncs a directory so that a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BlobError::SyncDir {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_entries(store: &BlobStore) -> Vec<PathBuf> {
        fs::read_dir(store.tmp_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    #[test]
    fn ingest_accepts_matching_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = Digest::of_bytes(b"hello");
        let (got, size) = store
            .ingest_reader(&b"hello"[..], Some(&digest), Some(5))
            .unwrap();
        assert_eq!(got, digest);
        assert_eq!(size, 5);
        assert_eq!(fs::read(store.path(&digest)).unwrap(), b"hello");
        assert!(tmp_entries(&store).is_empty());
    }

    #[test]
    fn ingest_rejects_wrong_digest_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let claimed = Digest::of_bytes(b"the real content");
        let err = store
            .ingest_reader(&b"something else"[..], Some(&claimed), None)
            .unwrap_err();
        assert!(
            matches!(err, BlobError::DigestMismatch { ref expected, .. } if *expected == claimed),
            "{err}"
        );
        assert!(!store.path(&claimed).exists());
        let actual = Digest::of_bytes(b"something else");
        assert!(!store.path(&actual).exists());
        assert!(tmp_entries(&store).is_empty());
        assert_eq!(fs::read_dir(store.sha256_dir()).unwrap().count(), 0);
    }

    #[test]
    fn ingest_rejects_wrong_size_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = Digest::of_bytes(b"hello");
        // Too long: stops reading early.
        let err = store
            .ingest_reader(&b"hello"[..], Some(&digest), Some(3))
            .unwrap_err();
        assert!(
            matches!(err, BlobError::SizeMismatch { expected: 3, .. }),
            "{err}"
        );
        // Too short.
        let err = store
            .ingest_reader(&b"hello"[..], Some(&digest), Some(6))
            .unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::SizeMismatch {
                    expected: 6,
                    actual: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!store.path(&digest).exists());
        assert!(tmp_entries(&store).is_empty());
    }

    #[tokio::test]
    async fn stream_ingest_rejects_wrong_digest_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let claimed = Digest::of_bytes(b"abcdef");
        let chunks = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"xyz")),
        ]);
        let err = store
            .ingest_stream(chunks, &claimed, Some(6))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        assert!(!store.path(&claimed).exists());
        assert!(tmp_entries(&store).is_empty());

        let good = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::from_static(b"def")),
        ]);
        assert_eq!(
            store.ingest_stream(good, &claimed, Some(6)).await.unwrap(),
            6
        );
        assert_eq!(fs::read(store.path(&claimed)).unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn stream_error_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let claimed = Digest::of_bytes(b"abcdef");
        let chunks = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(io::Error::other("connection reset")),
        ]);
        let err = store
            .ingest_stream(chunks, &claimed, None)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Source { .. }), "{err}");
        assert!(tmp_entries(&store).is_empty());
    }

    #[test]
    fn open_removes_leftover_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        fs::write(store.tmp_dir().join("ingest-stale"), b"half a layer").unwrap();
        fs::create_dir(store.tmp_dir().join("stale-dir")).unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(tmp_entries(&store).is_empty());
    }
}
