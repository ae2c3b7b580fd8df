//! TLS for the HTTPS listener: rustls with the `ring` provider, TLS 1.2 and 1.3 only, ALPN
//! `h2` then `http/1.1` (and `acme-tls/1` for ACME's TLS-ALPN-01 challenge), resumption by
//! tickets (TLS 1.3 and 1.2, keys rotated by rustls' ticketer) and by session IDs (a
//! server-side cache), OCSP stapling where a response is supplied.
//!
//! - [`certificate`]: certificates loaded from files and validated ([`Certificate`]).
//! - [`store`]: the resolver updated at runtime ([`CertStore`]): per-SNI, wildcard aware,
//!   a default certificate for unknown names, ACME challenge certificates.
//! - [`http01`]: ACME's HTTP-01 challenges, answered on the plain-HTTP listeners
//!   ([`Http01Challenges`]).
//!
//! ```text
//! let store = Arc::new(CertStore::with_generated_default()?);
//! store.replace(vec![Certificate::load(&CertificateFiles::new(cert, key), Utc::now())?]);
//! proxy.listen_tls("[::]:443".parse()?, tls::acceptor_for(store.clone())?).await?;
//! store.replace(...); // later: new handshakes see it, listeners keep running
//! ```

pub mod certificate;
mod der;
pub mod http01;
pub mod store;

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::ResolvesServerCert;
use tokio_rustls::TlsAcceptor;

pub use certificate::{Certificate, CertificateError, CertificateFiles};
pub use http01::{ACME_CHALLENGE_PREFIX, Http01Challenges};
pub use store::{ACME_TLS_ALPN, CertStore, DEFAULT_NAME, StoreError};

/// Sessions remembered for resumption by session ID (TLS 1.2 clients without tickets).
pub const SESSION_CACHE_SIZE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the TLS configuration")]
    Config {
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider every TLS piece of the proxy uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server configuration of an HTTPS listener choosing its certificates with `resolver`
/// (a [`CertStore`]): TLS 1.3 and 1.2, ALPN `h2`, `http/1.1`, `acme-tls/1`, tickets and a
/// session cache.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let config_err = |source| TlsError::Config { source };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(config_err)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    configure(&mut config)?;
    Ok(Arc::new(config))
}

fn configure(config: &mut ServerConfig) -> Result<(), TlsError> {
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    config.ticketer =
        rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|source| TlsError::Config { source })?;
    Ok(())
}

/// An acceptor for [`server_config`] with `store`.
pub fn acceptor_for(store: Arc<CertStore>) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(server_config(store)?))
}

/// A server configuration serving one certificate chain and key (PEM files) to every client,
/// whatever its SNI: for tests and single-site setups. The daemon uses [`server_config`].
pub fn single_cert_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let files = CertificateFiles::new(cert, key);
    let certificate = Certificate::load(&files, chrono::Utc::now())?;
    let store = CertStore::new(certificate.key);
    server_config(Arc::new(store))
}

/// An acceptor for [`single_cert_config`].
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    Ok(TlsAcceptor::from(single_cert_config(cert, key)?))
}

#[cfg(test)]
mod tests;
