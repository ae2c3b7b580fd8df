//! Where ACME validations are answered. The real [`ProxyChallenges`] puts HTTP-01 key
//! authorizations in the proxy's port-80 responder and TLS-ALPN-01 certificates in the HTTPS
//! listener's store, and runs the operator's hook for DNS-01.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use lull_proxy::tls::{CertStore, Http01Challenges};
use serde::{Deserialize, Serialize};

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
    /// TXT records presented and not yet cleaned up, kept on disk so a daemon killed in the
    /// middle of an order withdraws them at its next start (see
    /// [`ProxyChallenges::withdraw_leftovers`]).
    pub dns01_journal: Dns01Journal,
}

/// The file of TXT records the hook presented and has not cleaned up: a JSON array of
/// `{"name", "value"}`, owner-only, replaced atomically on each change.
pub struct Dns01Journal {
    path: PathBuf,
    lock: Mutex<()>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Presented {
    name: String,
    value: String,
}

impl Dns01Journal {
    pub fn new(path: PathBuf) -> Dns01Journal {
        Dns01Journal {
            path,
            lock: Mutex::new(()),
        }
    }

    fn read(&self) -> Vec<Presented> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %self.path.display(), "unreadable DNS-01 journal, ignored: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Applies `change` to the records under the lock and writes them back.
    fn update(&self, change: impl FnOnce(&mut Vec<Presented>)) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut records = self.read();
        change(&mut records);
        let written = serde_json::to_vec(&records)
            .map_err(|e| AcmeError::Other(e.to_string()))
            .and_then(|bytes| super::files::write_private(&self.path, &bytes));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), "write the DNS-01 journal: {e}");
        }
    }

    fn add(&self, name: &str, value: &str) {
        let entry = Presented {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        self.update(|records| {
            if !records.contains(&entry) {
                records.push(entry);
            }
        });
    }

    fn remove(&self, name: &str, value: &str) {
        self.update(|records| records.retain(|r| !(r.name == name && r.value == value)));
    }

    /// The records presented and not cleaned up: `(name, value)`.
    pub fn entries(&self) -> Vec<(String, String)> {
        self.read().into_iter().map(|r| (r.name, r.value)).collect()
    }
}

/// The longest a DNS hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

impl ProxyChallenges {
    /// Cleans up the TXT records a previous daemon presented and never withdrew (it was
    /// killed in the middle of an order); those whose cleanup fails stay for the next start.
    pub async fn withdraw_leftovers(&self) {
        for (name, value) in self.dns01_journal.entries() {
            match self.run_hook("cleanup", &name, &value).await {
                Ok(()) => {
                    tracing::info!(name, "DNS-01 record left by a previous daemon withdrawn");
                    self.dns01_journal.remove(&name, &value);
                }
                Err(e) => tracing::warn!(name, "DNS-01 record left by a previous daemon: {e}"),
            }
        }
    }

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
        Box::pin(async move {
            // Journaled first: a daemon killed while the hook runs still withdraws it later.
            self.dns01_journal.add(name, value);
            let presented = self.run_hook("present", name, value).await;
            if presented.is_err() {
                self.dns01_journal.remove(name, value);
            }
            presented
        })
    }

    fn remove_dns01<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            match self.run_hook("cleanup", name, value).await {
                Ok(()) => self.dns01_journal.remove(name, value),
                // Kept in the journal: the next start tries again.
                Err(e) => tracing::warn!(name, "DNS-01 cleanup: {e}"),
            }
        })
    }

    fn can_dns01(&self) -> bool {
        self.dns01_hook.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook that logs its calls and fails `cleanup` while `fail-cleanup` exists.
    fn challenges(dir: &std::path::Path) -> ProxyChallenges {
        use std::os::unix::fs::PermissionsExt;
        let hook = dir.join("hook");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\necho \"$1 $2 $3\" >> {dir}/calls\n\
                 [ \"$1\" = cleanup ] && [ -e {dir}/fail-cleanup ] && exit 1\nexit 0\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        ProxyChallenges {
            http01: Arc::new(Http01Challenges::new()),
            store: Arc::new(CertStore::with_generated_default().unwrap()),
            dns01_hook: Some(hook),
            dns01_journal: Dns01Journal::new(dir.join("journal.json")),
        }
    }

    fn calls(dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_record_left_by_a_killed_daemon_is_withdrawn_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let first = challenges(dir.path());
        first.present_dns01("a.example", "v1").await.unwrap();
        first.present_dns01("b.example", "v2").await.unwrap();
        first.remove_dns01("b.example", "v2").await;
        assert_eq!(
            first.dns01_journal.entries(),
            vec![("a.example".to_owned(), "v1".to_owned())]
        );
        // Killed here: `a` was never cleaned up. The next daemon withdraws it once.
        drop(first);
        let next = challenges(dir.path());
        next.withdraw_leftovers().await;
        assert!(next.dns01_journal.entries().is_empty());
        next.withdraw_leftovers().await;
        assert_eq!(
            calls(dir.path()),
            "present _acme-challenge.a.example v1\n\
             present _acme-challenge.b.example v2\n\
             cleanup _acme-challenge.b.example v2\n\
             cleanup _acme-challenge.a.example v1\n"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("journal.json"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_failed_cleanup_stays_for_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let c = challenges(dir.path());
        c.present_dns01("a.example", "v1").await.unwrap();
        std::fs::write(dir.path().join("fail-cleanup"), b"").unwrap();
        c.remove_dns01("a.example", "v1").await;
        c.withdraw_leftovers().await;
        assert_eq!(c.dns01_journal.entries().len(), 1);
        std::fs::remove_file(dir.path().join("fail-cleanup")).unwrap();
        c.withdraw_leftovers().await;
        assert!(c.dns01_journal.entries().is_empty());
    }
}
