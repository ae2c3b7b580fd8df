//! What the proxy does at the edge of HTTPS, before a request is forwarded: ACME's HTTP-01
//! challenges and redirects to HTTPS on the plain-HTTP listeners, HSTS on the TLS ones.
//!
//! On a plain-HTTP listener, in this order:
//! 1. `/.well-known/acme-challenge/<token>` is answered by the proxy for any Host (see
//!    [`crate::tls::http01`]); never routed.
//! 2. An unknown Host gets the usual 404.
//! 3. A Host whose service has `https_redirect` on, which is not `localhost` or under
//!    `.localhost`, and which the [`CertStore`] holds a real certificate for (not the
//!    default one), gets 301 (GET, HEAD) or 308 (other methods: the method and body are
//!    kept) to `https://<host>[:<https_port>]<path-and-query>`.
//! 4. Anything else is forwarded.
//!
//! On a TLS listener a service's `hsts` setting adds `Strict-Transport-Security` to responses
//! that lack it.

use std::sync::{Arc, RwLock};

use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::forward::{ProxyBody, plain};
use crate::tls::{CertStore, Http01Challenges};

/// The proxy's HTTPS-related state, given with [`crate::Proxy::set_edge`].
#[derive(Debug, Clone)]
pub struct Edge {
    /// HTTP-01 challenges answered on the plain-HTTP listeners.
    pub http01: Arc<Http01Challenges>,
    /// The HTTPS listeners' certificates: a host is redirected to HTTPS only when one of them
    /// names it. `None`: no redirects.
    pub certificates: Option<Arc<CertStore>>,
    /// The port redirects send clients to (443 is left out of `Location`).
    pub https_port: u16,
}

impl Edge {
    /// An edge with challenges only: nothing is redirected.
    pub fn new(http01: Arc<Http01Challenges>) -> Edge {
        Edge {
            http01,
            certificates: None,
            https_port: 443,
        }
    }
}

/// Where a proxy keeps its [`Edge`]: read by requests that need it, replaced whole.
#[derive(Debug, Default)]
pub(crate) struct EdgeSlot(RwLock<Option<Arc<Edge>>>);

impl EdgeSlot {
    pub(crate) fn get(&self) -> Option<Arc<Edge>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, edge: Edge) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(edge));
    }
}

/// Whether `host` (normalized) stays on plain HTTP whatever its service says: `localhost` and
/// names under it, which no public CA certifies and browsers treat as secure anyway.
pub(crate) fn is_local(host: &str) -> bool {
    host == "localhost" || host.ends_with(".localhost")
}

/// The redirect to HTTPS for a request to `host` (normalized: lowercase, no port) whose
/// service has `https_redirect` on, or `None` when the request is forwarded as it is.
pub(crate) fn redirect(
    slot: &EdgeSlot,
    host: &str,
    method: &Method,
    path_and_query: Option<&str>,
) -> Option<Response<ProxyBody>> {
    if is_local(host) {
        return None;
    }
    let https_port = {
        let edge = slot.0.read().unwrap_or_else(|e| e.into_inner());
        let edge = edge.as_ref()?;
        if !edge.certificates.as_ref()?.covers(host) {
            return None;
        }
        edge.https_port
    };
    let path = path_and_query.unwrap_or("/");
    if !path.starts_with('/') {
        // `OPTIONS *` and the like have no path to redirect to: they go to the app.
        return None;
    }
    let location = match https_port {
        443 => format!("https://{host}{path}"),
        port => format!("https://{host}:{port}{path}"),
    };
    let location_value = HeaderValue::from_str(&location).ok()?;
    let status = if method == Method::GET || method == Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut resp = plain(
        status,
        &format!("{} redirected to {location}", status.as_u16()),
    );
    resp.headers_mut().insert(header::LOCATION, location_value);
    Some(resp)
}

/// Adds `hsts` to `resp` unless the app sent its own `Strict-Transport-Security`.
pub(crate) fn add_hsts(resp: &mut Response<ProxyBody>, hsts: HeaderValue) {
    resp.headers_mut()
        .entry(header::STRICT_TRANSPORT_SECURITY)
        .or_insert(hsts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_names_stay_local() {
        for host in ["localhost", "app.localhost", "a.b.localhost"] {
            assert!(is_local(host), "{host}");
        }
        for host in ["localhost.example.com", "app.example.com", "notlocalhost"] {
            assert!(!is_local(host), "{host}");
        }
    }

    #[test]
    fn no_edge_or_no_certificates_means_no_redirect() {
        let slot = EdgeSlot::default();
        assert!(redirect(&slot, "a.test", &Method::GET, Some("/")).is_none());
        slot.set(Edge::new(Arc::new(Http01Challenges::new())));
        assert!(redirect(&slot, "a.test", &Method::GET, Some("/")).is_none());
    }

    #[test]
    fn only_paths_are_redirected() {
        let store = Arc::new(crate::tls::CertStore::with_generated_default().unwrap());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files =
            crate::tls::CertificateFiles::new(dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        store.replace(vec![
            crate::tls::Certificate::load(&files, chrono::Utc::now()).unwrap(),
        ]);
        let slot = EdgeSlot::default();
        slot.set(Edge {
            http01: Arc::new(Http01Challenges::new()),
            certificates: Some(store),
            https_port: 8443,
        });
        let r = redirect(&slot, "a.test", &Method::POST, Some("/x?y=1")).unwrap();
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "https://a.test:8443/x?y=1");
        assert!(redirect(&slot, "a.test", &Method::OPTIONS, Some("*")).is_none());
    }
}
