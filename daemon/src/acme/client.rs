//! The HTTPS client instant-acme talks to the CA through: the one instant-acme builds itself
//! (hyper-util over hyper-rustls, HTTPS only, HTTP/1.1 and HTTP/2, the platform's verifier or
//! the roots in `acme.ca_certificates`), wrapped in [`NotingClient`], which notes the wait a
//! CA asks for with `Retry-After` on an answer 429 (Too Many Requests), 503 (Service
//! Unavailable) or any other error carrying a `rateLimited` problem, in a [`CaWait`] the issuer
//! reads when an operation fails. (instant-acme honours `Retry-After` itself only while it
//! polls an order.)

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::AcmeError;
use super::policy;

/// The problem type of a CA's rate limit (RFC 8555, section 6.7).
pub const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";

/// The wait the CA asked for last, shared by the client that notes it and the issuer that
/// reads it.
#[derive(Clone, Default)]
pub struct CaWait(Arc<Mutex<Option<(SystemTime, Duration)>>>);

impl CaWait {
    /// Notes that at `at` the CA asked for `wait` (the longer of two asks holds).
    fn note(&self, at: SystemTime, wait: Duration) {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let longer = match *slot {
            Some((then, earlier)) => remaining(then, earlier, at) < wait,
            None => true,
        };
        if longer {
            *slot = Some((at, wait));
        }
    }

    /// Forgets any wait noted (an operation starts afresh).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// What is left now of the wait noted, which is forgotten; None when none was.
    pub fn take(&self) -> Option<Duration> {
        let noted = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        noted.map(|(at, wait)| remaining(at, wait, SystemTime::now()))
    }
}

/// What is left at `now` of `wait` asked for at `at`.
fn remaining(at: SystemTime, wait: Duration, now: SystemTime) -> Duration {
    wait.saturating_sub(now.duration_since(at).unwrap_or_default())
}

/// An [`HttpClient`] noting in a [`CaWait`] each wait the CA asks for.
pub struct NotingClient {
    inner: Box<dyn HttpClient>,
    wait: CaWait,
}

impl NotingClient {
    pub fn new(inner: Box<dyn HttpClient>, wait: CaWait) -> NotingClient {
        NotingClient { inner, wait }
    }
}

impl HttpClient for NotingClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let answer = self.inner.request(req);
        let noted = self.wait.clone();
        Box::pin(async move {
            let mut answer = answer.await?;
            let now = SystemTime::now();
            let Some(wait) = answer
                .parts
                .headers
                .get(header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| policy::ca_retry_after(value, now))
            else {
                return Ok(answer);
            };
            let status = answer.parts.status;
            let asks = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => true,
                // A 200 polling an order is instant-acme's business; an error is ours when
                // its problem says "rate limited" (the body is read, and handed on as read).
                _ if status.is_client_error() || status.is_server_error() => {
                    let body = answer
                        .body
                        .into_bytes()
                        .await
                        .map_err(instant_acme::Error::Other)?;
                    let limited = is_rate_limited(&body);
                    answer.body = Box::new(body);
                    limited
                }
                _ => false,
            };
            if asks {
                noted.note(now, wait);
            }
            Ok(answer)
        })
    }
}

/// Whether `body` is an ACME problem of type rateLimited.
fn is_rate_limited(body: &[u8]) -> bool {
    serde_json::from_slice::<instant_acme::Problem>(body)
        .is_ok_and(|problem| problem.r#type.as_deref() == Some(RATE_LIMITED))
}

/// The client instant-acme's `Account::builder()` (`roots` None: the platform's verifier) or
/// `Account::builder_with_root(roots)` (every certificate in the PEM file `roots`) would use,
/// with rustls' process-wide crypto provider.
pub fn https_client(roots: Option<&Path>) -> Result<Box<dyn HttpClient>, AcmeError> {
    let tls = match roots {
        None => HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| AcmeError::Other(format!("the platform's certificate verifier: {e}")))?,
        Some(path) => {
            let what = |e: &dyn std::fmt::Display| {
                AcmeError::Other(format!("acme.ca_certificates {}: {e}", path.display()))
            };
            let mut store = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
                store
                    .add(certificate.map_err(|e| what(&e))?)
                    .map_err(|e| what(&e))?;
            }
            if store.is_empty() {
                return Err(what(&"no certificate in the file"));
            }
            HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(store)
                    .with_no_client_auth(),
            )
        }
    };
    let connector = tls.https_only().enable_http1().enable_http2().build();
    let client: Client<_, BodyWrapper<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    Ok(Box::new(client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longer_wait_holds_and_taking_it_forgets_it() {
        let wait = CaWait::default();
        assert_eq!(wait.take(), None);
        let now = SystemTime::now();
        wait.note(now, Duration::from_secs(3600));
        wait.note(now, Duration::from_secs(60));
        let left = wait.take().unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        assert_eq!(wait.take(), None);
        // A wait asked long ago is over.
        wait.note(now - Duration::from_secs(7200), Duration::from_secs(3600));
        assert_eq!(wait.take(), Some(Duration::ZERO));
        wait.note(now, Duration::from_secs(60));
        wait.clear();
        assert_eq!(wait.take(), None);
    }

    #[test]
    fn a_rate_limited_problem_is_recognised() {
        assert!(is_rate_limited(
            br#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many"}"#
        ));
        assert!(!is_rate_limited(
            br#"{"type":"urn:ietf:params:acme:error:malformed"}"#
        ));
        assert!(!is_rate_limited(b"<html>busy</html>"));
    }
}
