//! Real TLS handshakes against the proxy's HTTPS listener (per-runtime `SO_REUSEPORT` sockets
//! on 127.0.0.1, as the daemon serves them) with a rustls client: versions, ALPN, SNI,
//! the default certificate, resumption, and certificates replaced while it serves.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lull_proxy::server::{bind_reuse_port, spawn_runtimes};
use lull_proxy::tls::{self, CertStore, Certificate, CertificateFiles, DEFAULT_NAME};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Accepts whatever the server shows: the tests compare the certificate itself.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> CertificateFiles {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let files = CertificateFiles::new(
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

struct Listener {
    _dir: tempfile::TempDir,
    _proxy: Proxy,
    addr: SocketAddr,
    store: Arc<CertStore>,
    app: Certificate,
    wildcard: Certificate,
}

async fn listener() -> Listener {
    let dir = tempfile::tempdir().unwrap();
    let app = Certificate::load(
        &write_cert(dir.path(), "app", &["app.example.com"]),
        Utc::now(),
    )
    .unwrap();
    let wildcard = Certificate::load(
        &write_cert(dir.path(), "wild", &["*.apps.example.com"]),
        Utc::now(),
    )
    .unwrap();
    let store = Arc::new(CertStore::with_generated_default().unwrap());
    store.replace(vec![app.clone(), wildcard.clone()]);
    let proxy = Proxy::new(Arc::new(RouteTable::new()), ProxyOptions::default());
    let runtimes = spawn_runtimes(2, "tls-test").unwrap();
    let sockets = bind_reuse_port("127.0.0.1:0".parse().unwrap(), 2).unwrap();
    let acceptor = tls::acceptor_for(store.clone()).unwrap();
    let addr = proxy
        .listen_tls_on_sockets(sockets, &runtimes, acceptor)
        .unwrap();
    let fds = proxy.listener_fds().unwrap();
    assert!(fds.iter().all(|f| f.tls && f.addr == addr), "{fds:?}");
    Listener {
        _dir: dir,
        _proxy: proxy,
        addr,
        store,
        app,
        wildcard,
    }
}

struct Handshake {
    version: ProtocolVersion,
    alpn: Option<Vec<u8>>,
    kind: HandshakeKind,
    leaf: Vec<u8>,
    /// The proxy's answer to `GET /` (no route: 404), which also brings TLS 1.3 tickets in.
    status_line: String,
}

async fn connect(addr: SocketAddr, config: &Arc<ClientConfig>, sni: &str) -> Handshake {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = TlsConnector::from(config.clone());
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut stream = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let (_, conn) = stream.get_ref();
    let mut shake = Handshake {
        version: conn.protocol_version().unwrap(),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        kind: conn.handshake_kind().unwrap(),
        leaf: conn.peer_certificates().unwrap()[0].to_vec(),
        status_line: String::new(),
    };
    if shake.alpn.as_deref() == Some(b"http/1.1") {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: nobody.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("answer in time");
        let answer = String::from_utf8_lossy(&answer);
        shake.status_line = answer.lines().next().unwrap_or_default().to_owned();
    }
    shake
}

fn http11(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut config = (*client(versions)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_and_tls12_negotiate_with_h2_preferred() {
    let l = listener().await;
    let h = connect(
        l.addr,
        &client(&[&rustls::version::TLS13]),
        "app.example.com",
    )
    .await;
    assert_eq!(h.version, ProtocolVersion::TLSv1_3);
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    let h = connect(
        l.addr,
        &client(&[&rustls::version::TLS12]),
        "app.example.com",
    )
    .await;
    assert_eq!(h.version, ProtocolVersion::TLSv1_2);
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    let h = connect(
        l.addr,
        &http11(&[&rustls::version::TLS13]),
        "app.example.com",
    )
    .await;
    assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert!(
        h.status_line.starts_with("HTTP/1.1 404"),
        "{}",
        h.status_line
    );
}

/// A TLS 1.1 ClientHello (suites, groups and signature schemes the server would take under TLS 1.2) gets a
/// `protocol_version` alert, never a ServerHello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls11_is_refused() {
    let l = listener().await;
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend([0x42; 32]); // random
    body.push(0); // session id
    // ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-ECDSA-AES128-SHA
    body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x09]);
    body.extend([0x01, 0x00]); // compression: null
    let extensions = [
        &[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03][..], // signature_algorithms
        &[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x17][..], // supported_groups: P-256
        &[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00][..],             // ec_point_formats
    ]
    .concat();
    body.extend([0x00, extensions.len() as u8]);
    body.extend(extensions);
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend(&handshake);
    let addr = l.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&record).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "expected an alert or nothing, got {answer:02x?}"
    );
    if !answer.is_empty() {
        // alert(level fatal=2, description protocol_version=70)
        assert_eq!(&answer[5..7], &[2, 70], "{answer:02x?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_the_certificate_and_unknown_names_get_the_default() {
    let l = listener().await;
    let config = client(&[&rustls::version::TLS13]);
    let h = connect(l.addr, &config, "app.example.com").await;
    assert_eq!(h.leaf, l.app.key.cert[0].to_vec());
    let h = connect(l.addr, &config, "svc.apps.example.com").await;
    assert_eq!(h.leaf, l.wildcard.key.cert[0].to_vec());
    for unknown in ["nothing.test", "a.b.apps.example.com", "apps.example.com"] {
        let h = connect(l.addr, &config, unknown).await;
        assert_eq!(h.leaf, l.store.default_certificate().cert[0].to_vec());
        let leaf = CertificateDer::from(h.leaf);
        let parsed = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let names: Vec<&str> = parsed.valid_dns_names().collect();
        assert_eq!(names, [DEFAULT_NAME], "{unknown}");
        let subject = String::from_utf8_lossy(parsed.subject()).to_ascii_lowercase();
        for service in ["app", "example", "apps", "nothing"] {
            assert!(!subject.contains(service), "{subject:?} names {service}");
        }
    }
    // Replaced while serving: the next handshake sees it, the listener was not touched.
    l.store.replace(vec![l.wildcard.clone()]);
    let h = connect(l.addr, &config, "app.example.com").await;
    assert_eq!(h.leaf, l.store.default_certificate().cert[0].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_handshake_is_resumed() {
    let l = listener().await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = http11(&[version]);
        let first = connect(l.addr, &config, "app.example.com").await;
        assert_eq!(first.kind, HandshakeKind::Full, "{version:?}");
        assert!(
            first.status_line.starts_with("HTTP/1.1 404"),
            "{}",
            first.status_line
        );
        let second = connect(l.addr, &config, "app.example.com").await;
        assert_eq!(second.kind, HandshakeKind::Resumed, "{version:?}");
        assert_eq!(second.leaf, first.leaf);
    }
    // TLS 1.2 by session ID alone (a client that does not do tickets): the server's cache.
    let mut config = (*http11(&[&rustls::version::TLS12])).clone();
    config.resumption = config
        .resumption
        .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
    let config = Arc::new(config);
    let first = connect(l.addr, &config, "app.example.com").await;
    assert_eq!(first.kind, HandshakeKind::Full);
    let second = connect(l.addr, &config, "app.example.com").await;
    assert_eq!(second.kind, HandshakeKind::Resumed);
}
