//! The proxy's HTTPS edge against a real proxy on 127.0.0.1: HTTP-01 challenges answered on
//! the plain-HTTP listener for any Host, redirects to HTTPS for hosts with a certificate, and
//! HSTS on the TLS listener only.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{App, Raw, TestCa, app, exchange, http, route};
use lull_proxy::config::{Hsts, ServiceConfig};
use lull_proxy::pool::PoolEvent;
use lull_proxy::tls::{self, CertStore, Http01Challenges};
use lull_proxy::{Edge, Proxy, ProxyOptions, RouteTable};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

const HSTS_VALUE: &str = "max-age=31536000; includeSubDomains";

struct Setup {
    proxy: Proxy,
    app: App,
    plain: SocketAddr,
    https: SocketAddr,
    store: Arc<CertStore>,
    challenges: Arc<Http01Challenges>,
    ca: TestCa,
    _dir: tempfile::TempDir,
    _events: Vec<tokio::sync::mpsc::UnboundedReceiver<PoolEvent>>,
}

/// A proxy with a plain and a TLS listener and these services, all answered by one app:
/// - `app.test`: redirect on (the default), a certificate;
/// - `x.wild.test`: redirect on, covered by a `*.wild.test` certificate;
/// - `nocert.test`: redirect on, no certificate;
/// - `optout.test`: redirect off, a certificate;
/// - `app.localhost`: redirect on, a certificate;
/// - `hsts.test`: HSTS on, a certificate.
///
/// The edge is given after the listeners start.
async fn setup() -> Setup {
    let app = app().await;
    let routes = Arc::new(RouteTable::new());
    let mut events = Vec::new();
    let hsts = ServiceConfig {
        hsts: Some(Hsts {
            max_age: Duration::from_secs(31_536_000),
            include_subdomains: true,
            preload: false,
        }),
        ..ServiceConfig::default()
    };
    let optout = ServiceConfig {
        https_redirect: false,
        ..ServiceConfig::default()
    };
    for (host, config) in [
        ("app.test", ServiceConfig::default()),
        ("x.wild.test", ServiceConfig::default()),
        ("nocert.test", ServiceConfig::default()),
        ("optout.test", optout),
        ("app.localhost", ServiceConfig::default()),
        ("hsts.test", hsts),
    ] {
        events.push(route(&routes, host, config, app.addr));
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let store = Arc::new(CertStore::with_generated_default().unwrap());
    store.replace(vec![
        ca.issue(dir.path(), "app", &["app.test", "optout.test", "hsts.test"]),
        ca.issue(dir.path(), "wild", &["*.wild.test"]),
        ca.issue(dir.path(), "local", &["app.localhost"]),
    ]);
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let plain = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let https = proxy
        .listen_tls(
            "127.0.0.1:0".parse().unwrap(),
            tls::acceptor_for(store.clone()).unwrap(),
        )
        .await
        .unwrap();
    let challenges = Arc::new(Http01Challenges::new());
    proxy.set_edge(Edge {
        http01: challenges.clone(),
        certificates: Some(store.clone()),
        https_port: https.port(),
    });
    Setup {
        proxy,
        app,
        plain,
        https,
        store,
        challenges,
        ca,
        _dir: dir,
        _events: events,
    }
}

impl Setup {
    async fn https(&self, method: &str, host: &str, target: &str) -> Raw {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let stream = tokio::net::TcpStream::connect(self.https).await.unwrap();
        let name = ServerName::try_from(host.to_owned()).unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .unwrap();
        exchange(tls, method, host, target, "").await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenges_are_answered_for_any_host_and_never_forwarded() {
    let s = setup().await;
    let path = "/.well-known/acme-challenge/tok_EN-123";
    // Not pending yet.
    let r = http(s.plain, "GET", "app.test", path).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("no such ACME challenge"), "{r:?}");
    s.challenges.insert("tok_EN-123", "tok_EN-123.thumb");
    for host in [
        "app.test",
        "APP.test:80",
        "nocert.test",
        "unknown.example",
        "app.localhost",
        "127.0.0.1",
    ] {
        let r = http(s.plain, "GET", host, path).await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
        assert_eq!(r.body, "tok_EN-123.thumb", "{host}");
        assert_eq!(r.header("content-type"), Some("text/plain"), "{host}");
    }
    let head = http(s.plain, "HEAD", "unknown.example", path).await;
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.body, "");
    // A query does not change the token.
    let r = http(s.plain, "GET", "app.test", &format!("{path}?x=1")).await;
    assert_eq!(r.status, 200, "{r:?}");
    for bad in [
        "/.well-known/acme-challenge/other",
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge/tok_EN-123/x",
        "/.well-known/acme-challenge/tok.EN",
        "/.well-known/acme-challenge/..%2Ftok_EN-123",
    ] {
        let r = http(s.plain, "GET", "unknown.example", bad).await;
        assert_eq!(r.status, 404, "{bad}: {r:?}");
        assert!(r.body.contains("ACME challenge"), "{bad}: {r:?}");
    }
    let post = http(s.plain, "POST", "app.test", path).await;
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(s.app.requests(), 0, "no challenge request reached the app");
    // Over TLS the path is the app's, like any other.
    let r = s.https("GET", "app.test", path).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("app saw {path}"));
    assert_eq!(s.app.requests(), 1);
    s.challenges.remove("tok_EN-123");
    assert_eq!(http(s.plain, "GET", "app.test", path).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_with_a_certificate_are_redirected_to_https() {
    let s = setup().await;
    let port = s.https.port();
    let r = http(s.plain, "GET", "app.test", "/p/q?x=1&y=2").await;
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://app.test:{port}/p/q?x=1&y=2").as_str())
    );
    assert!(r.body.contains("redirected to https://app.test"), "{r:?}");
    let r = http(s.plain, "HEAD", "App.Test:8080", "/").await;
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("https://app.test:{port}/").as_str())
    );
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = http(s.plain, method, "app.test", "/form").await;
        assert_eq!(r.status, 308, "{method}: {r:?}");
        assert_eq!(
            r.header("location"),
            Some(format!("https://app.test:{port}/form").as_str())
        );
    }
    let r = http(s.plain, "GET", "x.wild.test", "/w").await;
    assert_eq!(r.status, 301, "a wildcard covers it: {r:?}");
    assert_eq!(s.app.requests(), 0, "redirects never reach the app");

    // Port 443 is left out.
    s.proxy.set_edge(Edge {
        http01: s.challenges.clone(),
        certificates: Some(s.store.clone()),
        https_port: 443,
    });
    let r = http(s.plain, "GET", "app.test", "/p").await;
    assert_eq!(r.header("location"), Some("https://app.test/p"), "{r:?}");
    // Absolute-form targets redirect to their path.
    let r = http(s.plain, "GET", "app.test", "http://app.test/abs?z").await;
    assert_eq!(
        r.header("location"),
        Some("https://app.test/abs?z"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn some_hosts_stay_on_plain_http() {
    let s = setup().await;
    // .localhost, even with a certificate; no certificate; opted out.
    for host in ["app.localhost", "nocert.test", "optout.test"] {
        let r = http(s.plain, "GET", host, "/here").await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
        assert_eq!(r.body, "app saw /here", "{host}");
        assert_eq!(r.header("location"), None, "{host}");
    }
    assert_eq!(s.app.requests(), 3);
    // Unknown hosts keep their 404, certificate or not.
    s.store.replace(vec![s.ca.issue(
        s._dir.path(),
        "app",
        &["app.test", "unknown.test"],
    )]);
    let r = http(s.plain, "GET", "unknown.test", "/").await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("no service answers"), "{r:?}");
    // The wildcard certificate is gone: x.wild.test stays on plain HTTP now.
    let r = http(s.plain, "GET", "x.wild.test", "/").await;
    assert_eq!(r.status, 200, "{r:?}");
    // Without certificates in the edge, nothing is redirected.
    s.proxy.set_edge(Edge::new(s.challenges.clone()));
    let r = http(s.plain, "GET", "app.test", "/").await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsts_is_sent_over_tls_only_and_never_replaces_the_apps() {
    let s = setup().await;
    let r = s.https("GET", "hsts.test", "/").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("strict-transport-security"), Some(HSTS_VALUE));
    let r = s.https("GET", "hsts.test", "/own-sts").await;
    assert_eq!(r.header("strict-transport-security"), Some("max-age=5"));
    let all: Vec<_> = r
        .headers
        .iter()
        .filter(|(n, _)| n == "strict-transport-security")
        .collect();
    assert_eq!(all.len(), 1, "{r:?}");
    // Off by default.
    let r = s.https("GET", "app.test", "/").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("strict-transport-security"), None);
    // Never over plain HTTP (hsts.test is redirected there; with redirects off it is served).
    let r = http(s.plain, "GET", "hsts.test", "/").await;
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(r.header("strict-transport-security"), None);
    s.proxy.set_edge(Edge::new(s.challenges.clone()));
    let r = http(s.plain, "GET", "hsts.test", "/").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("strict-transport-security"), None);
}
