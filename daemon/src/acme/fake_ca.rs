//! A tiny ACME CA for tests, over HTTPS on 127.0.0.1 with a certificate from a test root: a
//! directory, fresh nonces, accounts (any request accepted, no signature checked), and a
//! newOrder that answers what the test asked for.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What newOrder answers.
#[derive(Clone)]
pub struct Refusal {
    pub status: StatusCode,
    /// The `Retry-After` header's value, if any.
    pub retry_after: Option<String>,
    /// The problem document (`application/problem+json`).
    pub problem: serde_json::Value,
}

/// The CA, serving until dropped.
pub struct FakeCa {
    /// The directory URL.
    pub directory: String,
    /// The PEM file of the root that signed the CA's HTTPS certificate.
    pub root: PathBuf,
    /// newOrder requests answered.
    pub orders: Arc<AtomicUsize>,
    server: JoinHandle<()>,
}

impl Drop for FakeCa {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeCa {
    /// A CA whose root is written into `dir`, refusing every order with `refusal`.
    pub async fn start(dir: &Path, refusal: Refusal) -> FakeCa {
        crate::install_crypto_provider();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lull test: fake ACME CA root");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let root = dir.join("fake-ca-root.pem");
        std::fs::write(&root, ca_cert.pem()).unwrap();
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let orders = Arc::new(AtomicUsize::new(0));
        let state = Arc::new(State {
            base: base.clone(),
            refusal,
            nonces: AtomicUsize::new(0),
            orders: orders.clone(),
        });
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.answer(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeCa {
            directory: format!("{base}/directory"),
            root,
            orders,
            server,
        }
    }
}

struct State {
    base: String,
    refusal: Refusal,
    nonces: AtomicUsize,
    orders: Arc<AtomicUsize>,
}

impl State {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let base = &self.base;
        let nonce = format!("nonce-{}", self.nonces.fetch_add(1, Ordering::SeqCst));
        let reply = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .header("replay-nonce", nonce.as_str())
                .header(header::CACHE_CONTROL, "no-store")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/directory") => {
                let directory = json!({
                    "newNonce": format!("{base}/new-nonce"),
                    "newAccount": format!("{base}/new-account"),
                    "newOrder": format!("{base}/new-order"),
                    "revokeCert": format!("{base}/revoke-cert"),
                    "keyChange": format!("{base}/key-change"),
                });
                reply(StatusCode::OK, directory.to_string())
            }
            (&Method::HEAD | &Method::GET, "/new-nonce") => reply(StatusCode::OK, String::new()),
            (&Method::POST, "/new-account") => {
                let mut rsp = reply(
                    StatusCode::CREATED,
                    json!({ "status": "valid", "orders": format!("{base}/account/1/orders") })
                        .to_string(),
                );
                rsp.headers_mut().insert(
                    header::LOCATION,
                    format!("{base}/account/1").parse().unwrap(),
                );
                rsp
            }
            (&Method::POST, "/new-order") => {
                self.orders.fetch_add(1, Ordering::SeqCst);
                let refusal = &self.refusal;
                let mut rsp = reply(refusal.status, refusal.problem.to_string());
                let headers = rsp.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    "application/problem+json".parse().unwrap(),
                );
                if let Some(after) = &refusal.retry_after {
                    headers.insert(header::RETRY_AFTER, after.parse().unwrap());
                }
                rsp
            }
            _ => reply(StatusCode::NOT_FOUND, String::new()),
        }
    }
}
