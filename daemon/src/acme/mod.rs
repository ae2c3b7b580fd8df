//! Automatic certificates over ACME (RFC 8555), with instant-acme as the protocol client.
//!
//! - [`policy`]: when to renew, when to warn, how long to wait after a failure (pure).
//! - [`files`]: the account and the certificates in `<data>/acme`, owner-only.
//! - [`challenges`]: where validations are answered: HTTP-01 tokens on the proxy's port 80,
//!   TLS-ALPN-01 certificates in the HTTPS listener's store, DNS-01 through the operator's hook.
//! - [`issuer`]: one order, from account to certificate chain; revocation.
//! - [`dns`]: does a domain point at this host (the check `lull domain add` prints).
//! - [`manager`]: which names need a certificate, issuing and renewing them one order at a
//!   time, events and metrics; it never drops a working certificate before it expires.

pub mod challenges;
pub mod dns;
pub mod files;
pub mod issuer;
pub mod manager;
pub mod policy;

pub use manager::{AcmeManager, NameStatus, NameView};

/// What can go wrong with an order or the CA; the text is the CA's where it gave one.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("the CA offers no {kind} challenge for {name}")]
    NoChallenge { kind: &'static str, name: String },
    #[error("validation of {name} failed: {detail}")]
    Validation { name: String, detail: String },
    /// The CA refused the order; `failed` names each refused name with the CA's problem.
    #[error("the order ended {status}: {detail}")]
    Order {
        status: String,
        detail: String,
        failed: Vec<(String, String)>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}
