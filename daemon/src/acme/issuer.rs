//! One ACME order, end to end: the account (loaded, or created and stored), a new order for a
//! set of names, each authorization answered with the configured challenge (DNS-01 for a
//! wildcard), the validations awaited, a fresh P-256 key and CSR, the chain downloaded. Every
//! answer published is withdrawn afterwards, whatever happened. Revocation with the same
//! account. An operation that fails after the CA asked to be left alone for a while
//! (`Retry-After`, see [`super::client`]) says how long on its error
//! ([`AcmeError::CaAskedToWait`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy, RevocationReason, RevocationRequest,
};
use rustls_pki_types::CertificateDer;
use tokio::sync::Mutex;

use super::AcmeError;
use super::challenges::Challenges;
use super::client::{self, CaWait, NotingClient};
use super::files::AcmeDir;
use crate::config::{AcmeConfig, ChallengeKind};

/// A certificate chain and its key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Gets certificates for name sets. The real one talks to a CA; tests of the manager use a
/// fake.
pub trait Issuer: Send + Sync {
    /// Orders one certificate covering `names` (the first becomes nothing special: all are
    /// SANs).
    fn issue<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Issued, AcmeError>>;
    /// Revokes `certificate` (DER), reason cessation of operation.
    fn revoke<'a>(&'a self, certificate: &'a [u8]) -> BoxFuture<'a, Result<(), AcmeError>>;
}

/// How long the CA gets to validate and to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);

/// The real issuer.
pub struct AcmeIssuer {
    config: AcmeConfig,
    dir: AcmeDir,
    challenges: Arc<dyn Challenges>,
    account: Mutex<Option<Account>>,
    /// The wait the CA asked for during the current operation.
    ca_wait: CaWait,
}

/// An answer published during an order, withdrawn when it ends.
enum Published {
    Http01(String),
    TlsAlpn01(String),
    Dns01(String, String),
}

impl AcmeIssuer {
    pub fn new(config: AcmeConfig, dir: AcmeDir, challenges: Arc<dyn Challenges>) -> AcmeIssuer {
        // The HTTPS client to the CA takes rustls' process-wide provider (the lull binary
        // installs it first thing; tests may not have).
        crate::install_crypto_provider();
        AcmeIssuer {
            config,
            dir,
            challenges,
            account: Mutex::new(None),
            ca_wait: CaWait::default(),
        }
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, AcmeError> {
        let https = client::https_client(self.config.ca_certificates.as_deref())?;
        Ok(Account::builder_with_http(Box::new(NotingClient::new(
            https,
            self.ca_wait.clone(),
        ))))
    }

    /// `error`, with the wait the CA asked for during the operation if it did.
    fn with_ca_wait(&self, error: AcmeError) -> AcmeError {
        match self.ca_wait.take() {
            Some(wait) => AcmeError::CaAskedToWait {
                error: Box::new(error),
                wait,
            },
            None => error,
        }
    }

    /// The account: the one in memory, else the stored one, else a new one (stored).
    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(account) = slot.as_ref() {
            return Ok(account.clone());
        }
        let directory = &self.config.directory;
        let account = match self.dir.load_account(directory)? {
            Some(credentials) => self.builder()?.from_credentials(credentials).await?,
            None => {
                let contact: Vec<String> = self
                    .config
                    .email
                    .iter()
                    .map(|e| format!("mailto:{e}"))
                    .collect();
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let eab = match &self.config.eab {
                    Some((kid, hmac)) => {
                        use base64::Engine as _;
                        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(hmac.trim_end_matches('='))
                            .map_err(|e| AcmeError::Other(format!("acme.eab_hmac_key: {e}")))?;
                        Some(ExternalAccountKey::new(kid.clone(), &key))
                    }
                    None => None,
                };
                let (account, credentials) = self
                    .builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        directory.clone(),
                        eab.as_ref(),
                    )
                    .await?;
                self.dir.save_account(directory, &credentials)?;
                tracing::info!(directory, account = account.id(), "ACME account created");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    async fn order(
        &self,
        names: &[String],
        published: &mut Vec<Published>,
    ) -> Result<Issued, AcmeError> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> =
            names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Validation {
                        name: authorization.identifier().to_string(),
                        detail: format!("its authorization is {other:?}"),
                    });
                }
            }
            let name = authorization.identifier().to_string();
            let wildcard = authorization.identifier().wildcard;
            let (kind, label) = if wildcard {
                (ChallengeType::Dns01, "dns-01")
            } else {
                match self.config.challenge {
                    ChallengeKind::Http01 => (ChallengeType::Http01, "http-01"),
                    ChallengeKind::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
                }
            };
            let mut challenge =
                authorization
                    .challenge(kind.clone())
                    .ok_or_else(|| AcmeError::NoChallenge {
                        kind: label,
                        name: name.clone(),
                    })?;
            let key_authorization = challenge.key_authorization();
            match kind {
                ChallengeType::Http01 => {
                    self.challenges
                        .present_http01(&challenge.token, key_authorization.as_str());
                    published.push(Published::Http01(challenge.token.clone()));
                }
                ChallengeType::TlsAlpn01 => {
                    self.challenges
                        .present_tls_alpn01(&name, key_authorization.digest().as_ref())?;
                    published.push(Published::TlsAlpn01(name.clone()));
                }
                _ => {
                    let value = key_authorization.dns_value();
                    self.challenges.present_dns01(&name, &value).await?;
                    published.push(Published::Dns01(name.clone(), value));
                }
            }
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(VALIDATION_TIMEOUT);
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            return Err(self.why_invalid(&mut order, status).await);
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        Ok(Issued { chain_pem, key_pem })
    }

    /// The CA's reasons for an invalid order: each failed challenge's problem, by name.
    async fn why_invalid(&self, order: &mut instant_acme::Order, status: OrderStatus) -> AcmeError {
        let mut failed = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut authorization)) = authorizations.next().await {
            let name = authorization.identifier().to_string();
            if let Ok(state) = authorization.refresh().await {
                for challenge in &state.challenges {
                    if let Some(problem) = &challenge.error {
                        failed.push((name.clone(), problem_text(problem)));
                    }
                }
            }
        }
        let detail = if failed.is_empty() {
            "the CA gave no reason".to_owned()
        } else {
            failed
                .iter()
                .map(|(name, problem)| format!("{name}: {problem}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        AcmeError::Order {
            status: format!("{status:?}").to_lowercase(),
            detail,
            failed,
        }
    }

    async fn withdraw(&self, published: Vec<Published>) {
        for answer in published {
            match answer {
                Published::Http01(token) => self.challenges.remove_http01(&token),
                Published::TlsAlpn01(name) => self.challenges.remove_tls_alpn01(&name),
                Published::Dns01(name, value) => self.challenges.remove_dns01(&name, &value).await,
            }
        }
    }
}

/// A CA problem as one line: its detail and type.
pub fn problem_text(problem: &instant_acme::Problem) -> String {
    match (&problem.detail, &problem.r#type) {
        (Some(detail), Some(kind)) => format!("{detail} ({kind})"),
        (Some(detail), None) => detail.clone(),
        (None, Some(kind)) => kind.clone(),
        (None, None) => "no detail".into(),
    }
}

impl Issuer for AcmeIssuer {
    fn issue<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Issued, AcmeError>> {
        Box::pin(async move {
            self.ca_wait.clear();
            let mut published = Vec::new();
            let result = self.order(names, &mut published).await;
            self.withdraw(published).await;
            if let Err(AcmeError::Protocol(instant_acme::Error::Api(problem))) = &result
                && problem.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist")
            {
                // The CA forgot the account (a test CA restarted): make a new one next time.
                *self.account.lock().await = None;
            }
            result.map_err(|e| self.with_ca_wait(e))
        })
    }

    fn revoke<'a>(&'a self, certificate: &'a [u8]) -> BoxFuture<'a, Result<(), AcmeError>> {
        Box::pin(async move {
            self.ca_wait.clear();
            let revoked = async {
                let account = self.account().await?;
                let der = CertificateDer::from(certificate);
                account
                    .revoke(&RevocationRequest {
                        certificate: &der,
                        reason: Some(RevocationReason::CessationOfOperation),
                    })
                    .await?;
                Ok(())
            };
            revoked.await.map_err(|e| self.with_ca_wait(e))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::SystemTime;

    use chrono::Utc;
    use http::StatusCode;
    use serde_json::json;

    use super::*;
    use crate::acme::client::RATE_LIMITED;
    use crate::acme::fake_ca::{FakeCa, Refusal};
    use crate::acme::{AcmeManager, NameStatus};
    use crate::certs::Certificates;
    use crate::config::TlsConfig;

    /// No order gets as far as a challenge.
    struct NoChallenges;

    impl Challenges for NoChallenges {
        fn present_http01(&self, _: &str, _: &str) {}
        fn remove_http01(&self, _: &str) {}
        fn present_tls_alpn01(&self, _: &str, _: &[u8]) -> Result<(), AcmeError> {
            Ok(())
        }
        fn remove_tls_alpn01(&self, _: &str) {}
        fn present_dns01<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<(), AcmeError>> {
            Box::pin(async { Ok(()) })
        }
        fn remove_dns01<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
        fn can_dns01(&self) -> bool {
            false
        }
    }

    fn config(ca: &FakeCa) -> AcmeConfig {
        AcmeConfig {
            enabled: true,
            directory: ca.directory.clone(),
            ca_certificates: Some(ca.root.clone()),
            ..AcmeConfig::default()
        }
    }

    fn problem(kind: &str) -> serde_json::Value {
        json!({ "type": kind, "detail": "not now", "status": 429 })
    }

    #[tokio::test]
    async fn a_refused_order_carries_the_wait_the_ca_asked_for() {
        let hours = |n: u64| Duration::from_secs(n * 3600);
        let in_two_hours = httpdate::fmt_http_date(SystemTime::now() + hours(2));
        let cases = [
            // Let's Encrypt's rate limit: 429, delay-seconds, a rateLimited problem.
            (429, Some("3600".to_owned()), RATE_LIMITED, Some(hours(1))),
            // A CA down for maintenance, until an HTTP-date.
            (
                503,
                Some(in_two_hours),
                "urn:ietf:params:acme:error:serverInternal",
                Some(hours(2)),
            ),
            // Another status, but the problem says rate limited.
            (403, Some("3600".to_owned()), RATE_LIMITED, Some(hours(1))),
            // A refusal that is no "come back later": the header is not the CA's ask.
            (
                403,
                Some("3600".to_owned()),
                "urn:ietf:params:acme:error:unauthorized",
                None,
            ),
            // Rate limited without a Retry-After: nothing asked (the manager's hour holds).
            (429, None, RATE_LIMITED, None),
            // A Retry-After that says nothing.
            (429, Some("later".to_owned()), RATE_LIMITED, None),
        ];
        for (status, retry_after, kind, expected) in cases {
            let what = format!("{status} {retry_after:?} {kind}");
            let dir = tempfile::tempdir().unwrap();
            let ca = FakeCa::start(
                dir.path(),
                Refusal {
                    status: StatusCode::from_u16(status).unwrap(),
                    retry_after,
                    problem: problem(kind),
                },
            )
            .await;
            let issuer = AcmeIssuer::new(
                config(&ca),
                AcmeDir::open(dir.path()).unwrap(),
                Arc::new(NoChallenges),
            );
            let e = issuer
                .issue(&["a.example.com".to_owned()])
                .await
                .unwrap_err();
            assert_eq!(ca.orders.load(Ordering::SeqCst), 1, "{what}: {e}");
            assert!(e.to_string().contains(kind), "{what}: {e}");
            match expected {
                Some(asked) => {
                    let wait = e
                        .ca_wait()
                        .unwrap_or_else(|| panic!("{what}: no wait: {e}"));
                    assert!(
                        wait <= asked && wait + Duration::from_secs(60) > asked,
                        "{what}: {wait:?}"
                    );
                    assert!(matches!(
                        e.cause(),
                        AcmeError::Protocol(instant_acme::Error::Api(_))
                    ));
                }
                None => assert_eq!(e.ca_wait(), None, "{what}: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn the_manager_retries_no_sooner_than_the_ca_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::start(
            dir.path(),
            Refusal {
                status: StatusCode::TOO_MANY_REQUESTS,
                // Three hours: longer than the manager's own hour after a rate limit.
                retry_after: Some("10800".to_owned()),
                problem: problem(RATE_LIMITED),
            },
        )
        .await;
        // lull's own backoff: a second at most (an hour after a rate limit).
        let config = AcmeConfig {
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(1),
            ..config(&ca)
        };
        let issuer = Arc::new(AcmeIssuer::new(
            config.clone(),
            AcmeDir::open(dir.path()).unwrap(),
            Arc::new(NoChallenges),
        ));
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        let manager = AcmeManager::new(
            config,
            AcmeDir::open(dir.path()).unwrap(),
            issuer,
            None,
            Arc::new(Certificates::start(&TlsConfig::default()).unwrap()),
            Arc::new(|| {
                Box::pin(async { Ok(vec![("web".to_owned(), vec!["a.example.com".to_owned()])]) })
            }),
            Arc::new(move |e| sink.lock().unwrap().push(e)),
        );
        manager.pass().await;
        let view = manager.views().into_iter().next().unwrap();
        assert_eq!(view.status, NameStatus::Failed);
        let retry_at = view.retry_at.unwrap();
        assert!(
            retry_at >= Utc::now() + chrono::TimeDelta::minutes(179),
            "retry at {retry_at}"
        );
        {
            let events = events.lock().unwrap();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, "certificate.failed");
            assert!(
                events[0].message.contains("(the CA asked to wait until "),
                "{}",
                events[0].message
            );
            assert_eq!(
                events[0].fields["ca_retry_after_secs"]
                    .as_u64()
                    .map(|s| s > 10_700),
                Some(true)
            );
        }
        // Nothing is ordered meanwhile.
        manager.pass().await;
        assert_eq!(ca.orders.load(Ordering::SeqCst), 1);
        assert_eq!(events.lock().unwrap().len(), 1);
    }
}
