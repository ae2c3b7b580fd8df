//! Certificates from files: a PEM chain (leaf first), its PEM private key and, optionally, a
//! DER OCSP response to staple. Everything an operator can get wrong is checked when the files
//! are loaded, each error naming the file (and the dates or names at fault), so that a bad
//! certificate is refused before it replaces a good one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Where a certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first (`fullchain.pem`).
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
    /// A DER OCSP response for the leaf, stapled to handshakes. `None`: `<cert>.ocsp` when
    /// that file exists (see [`CertificateFiles::ocsp_path`]).
    pub ocsp: Option<PathBuf>,
}

impl CertificateFiles {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> CertificateFiles {
        CertificateFiles {
            cert: cert.into(),
            key: key.into(),
            ocsp: None,
        }
    }

    /// The OCSP response file to staple: the one given, else `<cert>.ocsp` if it exists.
    pub fn ocsp_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.ocsp {
            return Some(path.clone());
        }
        let mut beside = self.cert.clone().into_os_string();
        beside.push(".ocsp");
        let beside = PathBuf::from(beside);
        beside.is_file().then_some(beside)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("{path}: malformed PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path}: the certificate is not valid X.509")]
    Parse {
        path: PathBuf,
        #[source]
        source: webpki::Error,
    },
    #[error("{path}: the private key is not a supported RSA, ECDSA or Ed25519 key")]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "the certificate in {path} expired on {} (it is now {})",
        rfc3339(not_after),
        rfc3339(now)
    )]
    Expired {
        path: PathBuf,
        not_after: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error(
        "the certificate in {path} is not valid before {} (it is now {})",
        rfc3339(not_before),
        rfc3339(now)
    )]
    NotYetValid {
        path: PathBuf,
        not_before: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error("the certificate in {path} names no DNS name in its subject alternative names")]
    NoNames { path: PathBuf },
    #[error("the certificate in {path} does not cover {name} (it covers {})", covered.join(", "))]
    NameNotCovered {
        path: PathBuf,
        name: String,
        covered: Vec<String>,
    },
    #[error("{path}: not a DER OCSP response")]
    Ocsp { path: PathBuf },
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A validated certificate, ready to serve.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The DNS names it is served for: its SANs (`*.example.com` for a wildcard), lowercase,
    /// or the subset it was given for ([`Certificate::restrict_to`]).
    pub names: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// The certificate file, for logs and errors.
    pub source: PathBuf,
    /// Whether an OCSP response is stapled.
    pub stapled: bool,
    pub key: Arc<CertifiedKey>,
}

impl Certificate {
    /// Loads and checks `files`: PEM, key matching the leaf, valid at `now`, at least one DNS
    /// name, OCSP response (when there is one) that looks like DER.
    pub fn load(
        files: &CertificateFiles,
        now: DateTime<Utc>,
    ) -> Result<Certificate, CertificateError> {
        let cert_pem = read(&files.cert)?;
        let chain = pem_certificates(&files.cert, &cert_pem)?;
        let key_pem = read(&files.key)?;
        let key = pem_key(&files.key, &key_pem)?;
        let ocsp = match files.ocsp_path() {
            Some(path) => Some(ocsp_response(&path)?),
            None => None,
        };
        Certificate::from_der(chain, key, ocsp, files, now)
    }

    /// [`Certificate::load`] for a chain and key already in memory (`files` names them in
    /// errors): what ACME's issued certificates and the admin API will go through.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ocsp: Option<Vec<u8>>,
        files: &CertificateFiles,
        now: DateTime<Utc>,
    ) -> Result<Certificate, CertificateError> {
        let cert_path = &files.cert;
        let Some(leaf) = chain.first() else {
            return Err(CertificateError::NotPem {
                path: cert_path.clone(),
                what: "certificate",
            });
        };
        let parsed =
            webpki::EndEntityCert::try_from(leaf).map_err(|source| CertificateError::Parse {
                path: cert_path.clone(),
                source,
            })?;
        let mut names: Vec<String> = parsed
            .valid_dns_names()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(CertificateError::NoNames {
                path: cert_path.clone(),
            });
        }
        let (not_before, not_after) =
            super::der::validity(leaf).ok_or_else(|| CertificateError::Parse {
                path: cert_path.clone(),
                source: webpki::Error::BadDer,
            })?;
        if now > not_after {
            return Err(CertificateError::Expired {
                path: cert_path.clone(),
                not_after,
                now,
            });
        }
        if now < not_before {
            return Err(CertificateError::NotYetValid {
                path: cert_path.clone(),
                not_before,
                now,
            });
        }
        let provider = super::provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|source| CertificateError::UnsupportedKey {
                path: files.key.clone(),
                source,
            })?;
        let mut certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(CertificateError::KeyMismatch {
                    cert: cert_path.clone(),
                    key: files.key.clone(),
                });
            }
        }
        let stapled = ocsp.is_some();
        certified.ocsp = ocsp;
        Ok(Certificate {
            names,
            not_before,
            not_after,
            source: cert_path.clone(),
            stapled,
            key: Arc::new(certified),
        })
    }

    /// Whether the certificate is valid for `name` (a wildcard SAN covers one label).
    pub fn covers(&self, name: &str) -> bool {
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        let Some(leaf) = self.key.end_entity_cert().ok() else {
            return false;
        };
        webpki::EndEntityCert::try_from(leaf)
            .and_then(|cert| cert.verify_is_valid_for_subject_name(&server_name))
            .is_ok()
    }

    /// Serves the certificate for `names` only, each of which it must cover. A name may be a
    /// wildcard (`*.example.com`) only if the certificate has that very SAN.
    pub fn restrict_to(mut self, names: &[String]) -> Result<Certificate, CertificateError> {
        let mut kept = Vec::with_capacity(names.len());
        for name in names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let covered = if name.starts_with("*.") {
                self.names.contains(&name)
            } else {
                self.covers(&name)
            };
            if !covered {
                return Err(CertificateError::NameNotCovered {
                    path: self.source.clone(),
                    name,
                    covered: self.names.clone(),
                });
            }
            kept.push(name);
        }
        kept.sort();
        kept.dedup();
        self.names = kept;
        Ok(self)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertificateError> {
    std::fs::read(path).map_err(|source| CertificateError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_certificates(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertificateError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(CertificateError::NotPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(chain)
}

fn pem_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertificateError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => CertificateError::NotPem {
            path: path.to_path_buf(),
            what: "private key",
        },
        source => CertificateError::Pem {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// An OCSP response file: DER (`OCSPResponse ::= SEQUENCE`), as `openssl ocsp -respout`
/// writes it. Its contents are the CA's to vouch for; only its shape is checked here.
fn ocsp_response(path: &Path) -> Result<Vec<u8>, CertificateError> {
    let bytes = read(path)?;
    if bytes.len() < 8 || bytes[0] != 0x30 {
        return Err(CertificateError::Ocsp {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}
