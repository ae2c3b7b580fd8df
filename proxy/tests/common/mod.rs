//! What the edge and TLS tool tests share: a test CA issuing certificates (rcgen), a small
//! app on a loopback port, services routed to it, and raw HTTP/1.1 exchanges.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use chrono::Utc;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lull_proxy::config::ServiceConfig;
use lull_proxy::gate::NoCpuControl;
use lull_proxy::pool::{InstanceSpec, Pool, PoolEvent};
use lull_proxy::tls::{Certificate, CertificateFiles};
use lull_proxy::{Route, RouteTable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lull test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Writes the CA's certificate to `dir/ca.pem`.
    pub fn write(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// Issues a certificate for `names` (the first one also its subject's CN), written with
    /// its key to `dir/<stem>.pem` (leaf then CA) and `dir/<stem>.key`, and loaded.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> Certificate {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertificateFiles::new(
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&files.cert, format!("{}{}", cert.pem(), self.pem())).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        Certificate::load(&files, Utc::now()).unwrap()
    }
}

/// An app on a loopback port answering `app saw <path>`; `/own-sts` answers with its own
/// `Strict-Transport-Security`. Counts the requests it got.
pub struct App {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

pub async fn app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let path = req.uri().path().to_owned();
                        let mut resp =
                            Response::new(Full::new(Bytes::from(format!("app saw {path}"))));
                        if path == "/own-sts" {
                            resp.headers_mut()
                                .insert("strict-transport-security", "max-age=5".parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    App {
        addr,
        requests,
        task,
    }
}

/// Routes `host` to a service (named after it) with `config` and one healthy instance at
/// `instance`. Keep the returned receiver alive as long as the pool.
pub fn route(
    routes: &RouteTable,
    host: &str,
    config: ServiceConfig,
    instance: SocketAddr,
) -> tokio::sync::mpsc::UnboundedReceiver<PoolEvent> {
    config.validate().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pool = Pool::new(host, Arc::new(config), tx);
    pool.add_instance(InstanceSpec {
        id: "i0".into(),
        addr: instance,
        cpu: Arc::new(NoCpuControl),
    });
    pool.set_healthy("i0", true, "test");
    routes.insert(host, Route::new(pool, "rev-1"));
    rx
}

/// A response read off the wire.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    /// Header names lowercase.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) on `io` and reads the whole answer.
pub async fn exchange<IO>(mut io: IO, method: &str, host: &str, target: &str, body: &str) -> Raw
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    io.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        io.read_to_end(&mut bytes),
    )
    .await
    .expect("the proxy answers within 10 s");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// [`exchange`] over a new plain TCP connection to `addr`.
pub async fn http(addr: SocketAddr, method: &str, host: &str, target: &str) -> Raw {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(stream, method, host, target, "").await
}
