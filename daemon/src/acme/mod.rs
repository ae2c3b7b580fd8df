//! Automatic certificates over ACME (RFC 8555), with instant-acme as the protocol client.
//!
//! - [`policy`]: when to renew, when to warn, how long to wait after a failure, how long a
//!   CA's `Retry-After` asks for (pure).
//! - [`files`]: the account and the certificates in `<data>/acme`, owner-only.
//! - [`challenges`]: where validations are answered: HTTP-01 tokens on the proxy's port 80,
//!   TLS-ALPN-01 certificates in the HTTPS listener's store, DNS-01 through the operator's hook.
//! - [`client`]: the HTTPS client to the CA, which notes the waits the CA asks for
//!   (`Retry-After` on a rate-limited or unavailable answer).
//! - [`issuer`]: one order, from account to certificate chain; revocation.
//! - [`dns`]: does a domain point at this host (the check `lull domain add` prints).
//! - [`manager`]: which names need a certificate, issuing and renewing them one order at a
//!   time, events and metrics; it never drops a working certificate before it expires.

pub mod challenges;
pub mod client;
pub mod dns;
#[cfg(test)]
mod fake_ca;
pub mod files;
pub mod issuer;
pub mod manager;
pub mod policy;

use std::time::Duration;

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
    /// `error`, after which the CA asked (`Retry-After` on a rate-limited or unavailable
    /// answer) to be left alone for `wait`, counted from when the error was returned.
    #[error("{error}")]
    CaAskedToWait {
        error: Box<AcmeError>,
        wait: Duration,
    },
}

impl AcmeError {
    /// How long the CA asked to be left alone after this error, if it did.
    pub fn ca_wait(&self) -> Option<Duration> {
        match self {
            AcmeError::CaAskedToWait { wait, .. } => Some(*wait),
            _ => None,
        }
    }

    /// The error itself, without the CA's wait.
    pub fn cause(&self) -> &AcmeError {
        match self {
            AcmeError::CaAskedToWait { error, .. } => error.cause(),
            other => other,
        }
    }
}
