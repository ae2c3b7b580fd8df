//! [`CertStore`]: the HTTPS listener's certificate resolver, updated at runtime. Handshakes
//! read an immutable snapshot (an `Arc` cloned under a read lock held for nanoseconds); an
//! update builds a new snapshot and swaps it in, so listeners never restart and a handshake
//! never sees half an update.
//!
//! Selection, for a ClientHello:
//! 1. ALPN offers `acme-tls/1` (RFC 8737, TLS-ALPN-01): the challenge certificate for the SNI
//!    name, or no certificate at all (the handshake fails): a validation never gets a real
//!    certificate, and a browser never gets a challenge one.
//! 2. An exact name (`app.example.com`).
//! 3. A wildcard one label up (`*.example.com` covers `app.example.com`, not `example.com` nor
//!    `a.app.example.com`).
//! 4. The default certificate: a self-signed one for [`DEFAULT_NAME`], generated at start, that
//!    names no service. Clients without SNI, scanners and mistyped names get it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::certificate::Certificate;

/// The ALPN protocol of ACME's TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The only name the default certificate carries: `.invalid` is reserved (RFC 2606), so it
/// can never be mistaken for a real site, and it says nothing about what this host serves.
pub const DEFAULT_NAME: &str = "lull.invalid";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("generating the default self-signed certificate")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[error("loading the generated default certificate")]
    Key {
        #[source]
        source: rustls::Error,
    },
}

/// What handshakes read: replaced whole on every update.
#[derive(Debug, Default)]
struct Snapshot {
    /// Lowercase name → certificate.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.com` for a `*.example.com` SAN → certificate.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// TLS-ALPN-01 challenge certificates by name.
    challenges: HashMap<String, Arc<CertifiedKey>>,
    /// Where each served name comes from (for `names()` and logs).
    sources: Vec<(String, Arc<Certificate>)>,
}

/// The certificate resolver (see the module doc). Share it as `Arc<CertStore>`.
#[derive(Debug)]
pub struct CertStore {
    snapshot: RwLock<Arc<Snapshot>>,
    default: Arc<CertifiedKey>,
}

impl CertStore {
    /// A store with nothing but `default`, served for unknown names.
    pub fn new(default: Arc<CertifiedKey>) -> CertStore {
        CertStore {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            default,
        }
    }

    /// A store whose default certificate is freshly generated, self-signed for
    /// [`DEFAULT_NAME`] (P-256).
    pub fn with_generated_default() -> Result<CertStore, StoreError> {
        Ok(CertStore::new(generate_default()?))
    }

    /// The certificate served for unknown names and clients without SNI.
    pub fn default_certificate(&self) -> &Arc<CertifiedKey> {
        &self.default
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, change: impl FnOnce(&Snapshot) -> Snapshot) {
        let mut slot = self.snapshot.write().unwrap_or_else(|e| e.into_inner());
        let next = change(&slot);
        *slot = Arc::new(next);
    }

    /// Serves exactly `certificates` from now on (operator-supplied and, later, issued ones),
    /// replacing every certificate served before; challenge certificates stay. Where two
    /// certificates claim a name, the one valid the longest wins. New handshakes see the
    /// change; connections already open keep theirs.
    pub fn replace(&self, certificates: Vec<Certificate>) {
        let mut exact: HashMap<String, Arc<Certificate>> = HashMap::new();
        for certificate in certificates {
            let certificate = Arc::new(certificate);
            for name in &certificate.names {
                match exact.get(name) {
                    Some(held) if held.not_after >= certificate.not_after => {}
                    _ => {
                        exact.insert(name.clone(), certificate.clone());
                    }
                }
            }
        }
        let mut next = Snapshot::default();
        let mut sources: Vec<(String, Arc<Certificate>)> = exact.into_iter().collect();
        sources.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, certificate) in &sources {
            let key = certificate.key.clone();
            match name.strip_prefix("*.") {
                Some(parent) => next.wildcard.insert(parent.to_owned(), key),
                None => next.exact.insert(name.clone(), key),
            };
        }
        next.sources = sources;
        self.update(|current| Snapshot {
            challenges: current.challenges.clone(),
            ..next
        });
    }

    /// Holds `key` as the TLS-ALPN-01 challenge certificate for `name`, served only to
    /// clients offering ALPN `acme-tls/1` with that SNI.
    pub fn set_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        let name = normalise(name);
        self.update(|current| {
            let mut challenges = current.challenges.clone();
            challenges.insert(name, key);
            current.with_challenges(challenges)
        });
    }

    /// Drops the challenge certificate for `name` (the order is done).
    pub fn remove_challenge(&self, name: &str) {
        let name = normalise(name);
        self.update(|current| {
            let mut challenges = current.challenges.clone();
            challenges.remove(&name);
            current.with_challenges(challenges)
        });
    }

    /// Every name served (wildcards as `*.example.com`) with its certificate, sorted.
    pub fn names(&self) -> Vec<(String, Arc<Certificate>)> {
        self.current().sources.clone()
    }

    /// Whether a certificate served now names `name` (exactly, or by a wildcard one label
    /// up), as opposed to `name` getting the default certificate. Challenge certificates do
    /// not count. What the plain-HTTP listeners ask before redirecting to HTTPS.
    pub fn covers(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        let snapshot = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            snapshot.covers(&name.to_ascii_lowercase())
        } else {
            snapshot.covers(name)
        }
    }

    /// The certificate a handshake with `server_name` gets (`None` SNI: the default), as
    /// [`ResolvesServerCert::resolve`] chooses it for a client not offering `acme-tls/1`.
    pub fn lookup(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let snapshot = self.current();
        server_name
            .and_then(|name| snapshot.find(&normalise(name)))
            .unwrap_or_else(|| self.default.clone())
    }
}

impl Snapshot {
    fn with_challenges(&self, challenges: HashMap<String, Arc<CertifiedKey>>) -> Snapshot {
        Snapshot {
            exact: self.exact.clone(),
            wildcard: self.wildcard.clone(),
            challenges,
            sources: self.sources.clone(),
        }
    }

    fn covers(&self, name: &str) -> bool {
        if self.exact.contains_key(name) {
            return true;
        }
        match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() && !parent.is_empty() => {
                self.wildcard.contains_key(parent)
            }
            _ => false,
        }
    }

    fn find(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key.clone());
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() || parent.is_empty() {
            return None;
        }
        self.wildcard.get(parent).cloned()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = client_hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
        if acme {
            let name = normalise(client_hello.server_name()?);
            return self.current().challenges.get(&name).cloned();
        }
        Some(self.lookup(client_hello.server_name()))
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A self-signed P-256 certificate for [`DEFAULT_NAME`], its subject naming nothing else.
pub fn generate_default() -> Result<Arc<CertifiedKey>, StoreError> {
    let key_pair = rcgen::KeyPair::generate().map_err(|source| StoreError::Generate { source })?;
    let mut params = rcgen::CertificateParams::new(vec![DEFAULT_NAME.to_owned()])
        .map_err(|source| StoreError::Generate { source })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, DEFAULT_NAME);
    let cert = params
        .self_signed(&key_pair)
        .map_err(|source| StoreError::Generate { source })?;
    certified_key(cert.der().clone(), &key_pair)
}

/// A [`CertifiedKey`] from an rcgen certificate and its key (the default certificate; ACME's
/// challenge certificates later).
pub fn certified_key(
    cert: CertificateDer<'static>,
    key_pair: &rcgen::KeyPair,
) -> Result<Arc<CertifiedKey>, StoreError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
    let signing_key = super::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| StoreError::Key { source })?;
    Ok(Arc::new(CertifiedKey::new(vec![cert], signing_key)))
}
