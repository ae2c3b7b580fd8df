//! Where ACME validations are answered. The real [`ProxyChallenges`] puts HTTP-01 key
//! authorizations in the proxy's port-80 responder and TLS-ALPN-01 certificates in the HTTPS
//! listener's store, and runs the operator's hook for DNS-01.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use lull_proxy::tls::{CertStore, Http01Challenges};

use super::AcmeError;

/// Publishes and withdraws validation answers.
pub trait Challenges: Send + Sync {
    /// `GET /.well-known/acme-challenge/<token>` on port 80 answers `key_authorization`.
    fn present_http01(&self, token: &str, key_authorization: &str);
    fn remove_http01(&self, token: &str);
    /// A handshake for `name` offering ALPN `acme-tls/1` gets a self-signed certificate
    /// carrying `digest` (SHA-256 of the key authorization) in its acmeIdentifier extension.
    fn present_tls_alpn01(&self, name: &str, digest: &[u8]) -> Result<(), AcmeError>;
    fn remove_tls_alpn01(&self, name: &str);
    /// The TXT record `_acme-challenge.<name>` holds `value`.
    fn present_dns01<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), AcmeError>>;
    fn remove_dns01<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, ()>;
    /// Whether DNS-01 can be answered (a hook is configured).
    fn can_dns01(&self) -> bool;
}

/// The proxy's responders and the operator's DNS hook.
pub struct ProxyChallenges {
    pub http01: Arc<Http01Challenges>,
    pub store: Arc<CertStore>,
    pub dns01_hook: Option<PathBuf>,
}

/// The longest a DNS hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

impl ProxyChallenges {
    async fn run_hook(&self, action: &str, name: &str, value: &str) -> Result<(), AcmeError> {
        let Some(hook) = &self.dns01_hook else {
            return Err(AcmeError::Other(
                "DNS-01 needs [acme] dns01_hook, and none is configured".into(),
            ));
        };
        let record = format!("_acme-challenge.{}", name.trim_start_matches("*."));
        let mut command = tokio::process::Command::new(hook);
        command
            .args([action, &record, value])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(HOOK_TIMEOUT, command.output())
            .await
            .map_err(|_| {
                AcmeError::Other(format!(
                    "{} {action} {record}: no answer within {}s",
                    hook.display(),
                    HOOK_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|source| AcmeError::Io {
                what: format!("run {}", hook.display()),
                source,
            })?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(AcmeError::Other(format!(
                "{} {action} {record}: {}: {}",
                hook.display(),
                output.status,
                stderr.trim()
            )))
        }
    }
}

/// The TLS-ALPN-01 certificate (RFC 8737) for `name` with `digest`.
pub fn tls_alpn01_certificate(
    name: &str,
    digest: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, AcmeError> {
    let fail =
        |e: rcgen::Error| AcmeError::Other(format!("TLS-ALPN-01 certificate for {name}: {e}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(fail)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(fail)?;
    lull_proxy::tls::store::certified_key(cert.der().clone(), &key)
        .map_err(|e| AcmeError::Other(format!("TLS-ALPN-01 certificate for {name}: {e}")))
}

impl Challenges for ProxyChallenges {
    fn present_http01(&self, token: &str, key_authorization: &str) {
        self.http01.insert(token, key_authorization);
    }

    fn remove_http01(&self, token: &str) {
        self.http01.remove(token);
    }

    fn present_tls_alpn01(&self, name: &str, digest: &[u8]) -> Result<(), AcmeError> {
        self.store
            .set_challenge(name, tls_alpn01_certificate(name, digest)?);
        Ok(())
    }

    fn remove_tls_alpn01(&self, name: &str) {
        self.store.remove_challenge(name);
    }

    fn present_dns01<'a>(
        &'a self,
        name: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<(), AcmeError>> {
        Box::pin(self.run_hook("present", name, value))
    }

    fn remove_dns01<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = self.run_hook("cleanup", name, value).await {
                tracing::warn!(name, "DNS-01 cleanup: {e}");
            }
        })
    }

    fn can_dns01(&self) -> bool {
        self.dns01_hook.is_some()
    }
}
