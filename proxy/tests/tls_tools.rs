//! The HTTPS listener as real clients see it: `openssl s_client` (versions, SNI and the
//! certificate chosen), `curl` (ALPN h2 and http/1.1) and `h2load` (many h2 requests), against
//! a proxy on 127.0.0.1 serving certificates from a CA made for the test. A check whose tool
//! is not installed is skipped with a note, unless `LULL_REQUIRE_TOOLS` is set (CI installs
//! them: `scripts/setup-host`, and sets it).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use common::{App, TestCa, app, route};
use lull_proxy::config::ServiceConfig;
use lull_proxy::pool::PoolEvent;
use lull_proxy::tls::{self, CertStore, DEFAULT_NAME};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};

struct Setup {
    _proxy: Proxy,
    _app: App,
    addr: SocketAddr,
    ca: PathBuf,
    _dir: tempfile::TempDir,
    _events: Vec<tokio::sync::mpsc::UnboundedReceiver<PoolEvent>>,
}

/// A proxy's HTTPS listener serving `app.test` (routed to an app) and `other.test`, each with
/// a certificate of its own from the test CA (written to `ca`).
async fn setup() -> Setup {
    let app = app().await;
    let routes = Arc::new(RouteTable::new());
    let events = vec![route(
        &routes,
        "app.test",
        ServiceConfig::default(),
        app.addr,
    )];
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_path = ca.write(dir.path());
    let store = Arc::new(CertStore::with_generated_default().unwrap());
    store.replace(vec![
        ca.issue(dir.path(), "app", &["app.test"]),
        ca.issue(dir.path(), "other", &["other.test", "www.other.test"]),
    ]);
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let addr = proxy
        .listen_tls(
            "127.0.0.1:0".parse().unwrap(),
            tls::acceptor_for(store).unwrap(),
        )
        .await
        .unwrap();
    Setup {
        _proxy: proxy,
        _app: app,
        addr,
        ca: ca_path,
        _dir: dir,
        _events: events,
    }
}

/// Whether `tool` is on PATH; when not, says the check is skipped.
fn installed(tool: &str, check: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool))));
    if !found {
        assert!(
            std::env::var_os("LULL_REQUIRE_TOOLS").is_none(),
            "{check}: {tool} is not installed, and LULL_REQUIRE_TOOLS (CI) forbids skipping"
        );
        eprintln!("skipping {check}: {tool} is not installed (scripts/setup-host installs it)");
    }
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What a tool printed and whether it succeeded.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.ok, self.stdout, self.stderr
        )
    }
}

async fn run(program: &str, args: &[&str]) -> Ran {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} ran for a minute"))
        .unwrap();
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Setup {
    /// `openssl s_client` to the listener with SNI `name`, trusting the test CA, plus `extra`.
    async fn s_client(&self, name: &str, extra: &[&str]) -> Ran {
        let connect = self.addr.to_string();
        let ca = self.ca.to_str().unwrap();
        let mut args = vec![
            "s_client",
            "-connect",
            &connect,
            "-servername",
            name,
            "-CAfile",
            ca,
        ];
        args.extend_from_slice(extra);
        run("openssl", &args).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_are_refused_by_the_server() {
    if !installed("openssl", "the TLS 1.0/1.1 refusal check") {
        return;
    }
    let s = setup().await;
    for version in ["-tls1", "-tls1_1"] {
        // SECLEVEL=0: Debian's OpenSSL would otherwise refuse these versions itself, before
        // the proxy could.
        let ran = s
            .s_client("app.test", &[version, "-cipher", "DEFAULT@SECLEVEL=0"])
            .await;
        assert!(!ran.ok, "{version}: {ran:?}");
        let all = format!("{}{}", ran.stdout, ran.stderr);
        assert!(
            !all.contains("no protocols available"),
            "{version}: the client refused before asking the server: {ran:?}"
        );
        // The alert the server sent (rustls answers a ClientHello without TLS 1.2 or 1.3
        // with handshake_failure; protocol_version would do as well).
        assert!(
            (all.contains("alert handshake failure") && all.contains("SSL alert number 40"))
                || (all.contains("alert protocol version") && all.contains("SSL alert number 70")),
            "{version}: expected the server's alert: {ran:?}"
        );
        assert!(!all.contains("BEGIN CERTIFICATE"), "{version}: {ran:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_are_accepted_and_verify() {
    if !installed("openssl", "the TLS 1.2/1.3 check") {
        return;
    }
    let s = setup().await;
    for (version, shown) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let ran = s
            .s_client("app.test", &[version, "-verify_return_error"])
            .await;
        assert!(ran.ok, "{version}: {ran:?}");
        assert!(
            ran.stdout.contains(&format!("Protocol  : {shown}"))
                || ran.stdout.contains(&format!("New, {shown}")),
            "{version}: {ran:?}"
        );
        assert!(
            ran.stdout.contains("Verify return code: 0 (ok)"),
            "{version}: {ran:?}"
        );
    }
}

/// The subject line `s_client` printed for the leaf certificate.
fn subject(ran: &Ran) -> String {
    ran.stdout
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no subject printed: {ran:?}"))
        .to_owned()
}

/// The leaf certificate's subject alternative names, as `openssl x509` prints them.
async fn sans(ran: &Ran) -> String {
    let pem = ran
        .stdout
        .find("-----BEGIN CERTIFICATE-----")
        .and_then(|start| {
            let end = ran.stdout[start..].find("-----END CERTIFICATE-----")? + start + 25;
            Some(ran.stdout[start..end].to_owned())
        })
        .unwrap_or_else(|| panic!("no certificate printed: {ran:?}"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("leaf.pem");
    std::fs::write(&file, pem).unwrap();
    let out = run(
        "openssl",
        &[
            "x509",
            "-in",
            file.to_str().unwrap(),
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    )
    .await;
    assert!(out.ok, "{out:?}");
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_the_certificate_and_unknown_names_get_the_default() {
    if !installed("openssl", "the SNI check") {
        return;
    }
    let s = setup().await;
    let app = s.s_client("app.test", &[]).await;
    assert!(app.ok, "{app:?}");
    assert!(subject(&app).contains("CN = app.test"), "{app:?}");
    assert!(sans(&app).await.contains("DNS:app.test"));
    assert!(app.stdout.contains("Verify return code: 0 (ok)"), "{app:?}");

    let other = s.s_client("www.other.test", &[]).await;
    assert!(other.ok, "{other:?}");
    assert!(subject(&other).contains("CN = other.test"), "{other:?}");
    let names = sans(&other).await;
    assert!(
        names.contains("DNS:other.test") && names.contains("DNS:www.other.test"),
        "{names}"
    );

    let unknown = s.s_client("nope.test", &[]).await;
    assert!(unknown.ok, "the handshake completes: {unknown:?}");
    assert!(
        subject(&unknown).contains(&format!("CN = {DEFAULT_NAME}")),
        "{unknown:?}"
    );
    assert!(
        sans(&unknown)
            .await
            .contains(&format!("DNS:{DEFAULT_NAME}"))
    );
    // Self-signed, not from the test CA.
    assert!(
        !unknown.stdout.contains("Verify return code: 0 (ok)"),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_negotiates_h2_and_http_1_1_by_alpn() {
    if !installed("curl", "the ALPN check") {
        return;
    }
    let s = setup().await;
    let url = format!("https://app.test:{}/alpn", s.addr.port());
    let resolve = format!("app.test:{}:127.0.0.1", s.addr.port());
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let ran = run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "20",
                flag,
                "--cacert",
                s.ca.to_str().unwrap(),
                "--resolve",
                &resolve,
                "-w",
                "\n%{http_version}",
                &url,
            ],
        )
        .await;
        assert!(ran.ok, "{flag}: {ran:?}");
        assert_eq!(ran.stdout, format!("app saw /alpn\n{version}"), "{flag}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_completes_100_requests_over_h2() {
    if !installed("h2load", "the h2load check") {
        return;
    }
    let s = setup().await;
    let url = format!("https://app.test:{}/load", s.addr.port());
    let connect_to = format!("--connect-to=127.0.0.1:{}", s.addr.port());
    let ran = run("h2load", &["-n", "100", "-c", "2", &connect_to, &url]).await;
    assert!(ran.ok, "{ran:?}");
    assert!(
        ran.stdout.contains("Application protocol: h2"),
        "h2 negotiated: {ran:?}"
    );
    assert!(
        ran.stdout.contains("100 succeeded, 0 failed, 0 errored"),
        "{ran:?}"
    );
    assert!(ran.stdout.contains("status codes: 100 2xx"), "{ran:?}");
}
