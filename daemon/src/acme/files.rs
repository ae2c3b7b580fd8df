//! `<data>/acme`: the ACME account per directory URL and every issued certificate, readable by
//! root only (directories 0700, files 0600), each written to a temporary file and renamed so
//! that a crash leaves the old file or the new one, never half of one.
//!
//! ```text
//! <data>/acme/accounts/<sha256(directory) 16 hex>.json   instant-acme's account credentials
//! <data>/acme/certs/<first name>-<sha256(names) 8 hex>/
//!     fullchain.pem  key.pem  meta.json                  {names, service, directory, issued_at}
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use lull_proxy::tls::CertificateFiles;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AcmeError;

/// What is recorded beside an issued certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertMeta {
    /// The names ordered, in order.
    pub names: Vec<String>,
    /// The service it was ordered for.
    pub service: String,
    pub directory: String,
    pub issued_at: DateTime<Utc>,
}

/// A certificate found on disk.
#[derive(Debug, Clone)]
pub struct StoredCert {
    pub dir: PathBuf,
    pub files: CertificateFiles,
    pub meta: CertMeta,
}

/// The `<data>/acme` directory.
#[derive(Debug, Clone)]
pub struct AcmeDir {
    root: PathBuf,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AcmeError {
    let what = what.into();
    move |source| AcmeError::Io { what, source }
}

fn hash_hex(text: &str, len: usize) -> String {
    let digest = Sha256::digest(text.as_bytes());
    hex::encode(digest)[..len].to_owned()
}

/// Creates `path` (and parents) mode 0700.
pub fn make_private_dir(path: &Path) -> Result<(), AcmeError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(format!("create {}", path.display())))
}

/// Writes `bytes` to `path` (mode 0600) through a temporary file in the same directory.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("create {}", tmp.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))
}

impl AcmeDir {
    /// `<data_dir>/acme`, created owner-only if missing.
    pub fn open(data_dir: &Path) -> Result<AcmeDir, AcmeError> {
        let root = data_dir.join("acme");
        make_private_dir(&root.join("accounts"))?;
        make_private_dir(&root.join("certs"))?;
        Ok(AcmeDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn account_path(&self, directory: &str) -> PathBuf {
        self.root
            .join("accounts")
            .join(format!("{}.json", hash_hex(directory, 16)))
    }

    /// The stored account for `directory`, if any.
    pub fn load_account(
        &self,
        directory: &str,
    ) -> Result<Option<instant_acme::AccountCredentials>, AcmeError> {
        let path = self.account_path(directory);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                AcmeError::Other(format!("{}: not account credentials: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    pub fn save_account(
        &self,
        directory: &str,
        credentials: &instant_acme::AccountCredentials,
    ) -> Result<(), AcmeError> {
        let bytes = serde_json::to_vec_pretty(credentials)
            .map_err(|e| AcmeError::Other(format!("encode account credentials: {e}")))?;
        write_private(&self.account_path(directory), &bytes)
    }

    /// The directory a certificate for `names` issued at `issued_at` is kept in: one per
    /// issuance, so a renewal never writes over the certificate being served.
    pub fn cert_dir(&self, names: &[String], issued_at: DateTime<Utc>) -> PathBuf {
        let first = names
            .first()
            .map(|n| n.replace('*', "_"))
            .unwrap_or_default();
        self.root.join("certs").join(format!(
            "{first}-{}-{}",
            hash_hex(&names.join(","), 8),
            issued_at.timestamp_millis()
        ))
    }

    /// Stores an issued chain and key; returns where they are.
    pub fn save_cert(
        &self,
        meta: &CertMeta,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<StoredCert, AcmeError> {
        let dir = self.cert_dir(&meta.names, meta.issued_at);
        // Written in a hidden directory, renamed into place whole: a crash leaves either no
        // new certificate (the old one serves) or a complete one.
        let staging = self.root.join("certs").join(format!(
            ".new-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("cert")
        ));
        let _ = fs::remove_dir_all(&staging);
        make_private_dir(&staging)?;
        write_private(&staging.join("key.pem"), key_pem.as_bytes())?;
        write_private(&staging.join("fullchain.pem"), chain_pem.as_bytes())?;
        let meta_bytes = serde_json::to_vec_pretty(meta)
            .map_err(|e| AcmeError::Other(format!("encode certificate meta: {e}")))?;
        write_private(&staging.join("meta.json"), &meta_bytes)?;
        fs::rename(&staging, &dir).map_err(io(format!("rename to {}", dir.display())))?;
        let files = CertificateFiles::new(dir.join("fullchain.pem"), dir.join("key.pem"));
        Ok(StoredCert {
            dir,
            files,
            meta: meta.clone(),
        })
    }

    /// Every certificate directory with a readable `meta.json` (others are skipped with a
    /// warning).
    pub fn list_certs(&self) -> Vec<StoredCert> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.root.join("certs")) else {
            return out;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                // An issuance a crash interrupted: never complete, never served.
                let _ = fs::remove_dir_all(&dir);
                continue;
            }
            let meta_path = dir.join("meta.json");
            let meta = fs::read(&meta_path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CertMeta>(&b).map_err(|e| e.to_string()));
            match meta {
                Ok(meta) => out.push(StoredCert {
                    files: CertificateFiles::new(dir.join("fullchain.pem"), dir.join("key.pem")),
                    dir,
                    meta,
                }),
                Err(e) => tracing::warn!(path = %meta_path.display(), "skipping: {e}"),
            }
        }
        out.sort_by(|a, b| a.dir.cmp(&b.dir));
        out
    }

    /// Removes a certificate's directory.
    pub fn remove(&self, stored: &StoredCert) -> Result<(), AcmeError> {
        match fs::remove_dir_all(&stored.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("remove {}", stored.dir.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn certificates_are_stored_owner_only_and_listed_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = AcmeDir::open(tmp.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.root()), 0o700);
        let meta = CertMeta {
            names: vec!["*.apps.example.com".into(), "apps.example.com".into()],
            service: "web".into(),
            directory: "https://ca.test/dir".into(),
            issued_at: Utc::now(),
        };
        let stored = dir.save_cert(&meta, "CHAIN", "KEY").unwrap();
        assert!(
            stored
                .dir
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("_.apps.example.com-")
        );
        assert_eq!(mode(&stored.files.key), 0o600);
        assert_eq!(mode(&stored.files.cert), 0o600);
        assert_eq!(mode(&stored.dir), 0o700);
        let listed = dir.list_certs();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].meta, meta);
        assert_eq!(fs::read_to_string(&listed[0].files.key).unwrap(), "KEY");
        dir.remove(&listed[0]).unwrap();
        assert!(dir.list_certs().is_empty());
        assert!(dir.load_account("https://ca.test/dir").unwrap().is_none());
    }
}
