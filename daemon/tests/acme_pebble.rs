//! ACME against pebble, the CA test server, on loopback: lull's real certificate manager,
//! proxy (port-80 challenges, HTTPS with the issued certificate) and admin API, over the fake
//! instance host. pebble resolves names through `pebble-challtestsrv`, which answers every A
//! query with 127.0.0.1; pebble's nonce rejection stays on, so instant-acme's retries run.
//!
//! - HTTP-01: `domain add` prints the records and the DNS check, the name goes active, HTTPS
//!   serves the service with a certificate chaining to pebble's root, port 80 redirects, and
//!   `domain remove` revokes the certificate (pebble says so).
//! - TLS-ALPN-01 with pebble's certificates valid 30 s: renewal at two thirds of the
//!   lifetime, then the CA goes down: renewal fails with an event saying why, the current
//!   certificate keeps being served, and the expiry warning fires.
//!
//! - A CA that requires an external account binding: refused without one (the CA's words in
//!   `domain list`), issued with it.
//! - DNS-01 through the operator's hook (a script driving challtestsrv's TXT records): the
//!   base domain's wildcard certificate, serving every service under it.
//!
//! Needs the `pebble` package (`pebble`, `pebble-challtestsrv`); CI installs it. Without it
//! the tests say so and pass, unless `LULL_REQUIRE_TOOLS` is set (CI sets it).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use lull_daemon::api::Client;
use lull_daemon::config::{AcmeConfig, ChallengeKind};
use lull_daemon::testing::{InProcess, TlsSetup};
use serde_json::{Value, json};

fn tools_present() -> bool {
    let found = ["pebble", "pebble-challtestsrv", "curl", "openssl"]
        .iter()
        .all(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !found {
        assert!(
            std::env::var_os("LULL_REQUIRE_TOOLS").is_none(),
            "pebble, pebble-challtestsrv, curl or openssl missing (apt-get install pebble curl openssl)"
        );
        eprintln!("skipped: pebble, pebble-challtestsrv, curl or openssl not installed");
    }
    found
}

/// A loopback port free for both TCP and UDP, below the kernel's ephemeral range
/// (`ip_local_port_range` starts at 32768), so no outgoing connection of a test running
/// beside this one can take it between now and the moment pebble or lull binds it.
/// Never the same port twice in one test process.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let mut bytes = [0u8; 2];
        getrandom::fill(&mut bytes).unwrap();
        let port = 16384 + u16::from_le_bytes(bytes) % 16000;
        if !given.contains(&port)
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            given.push(port);
            return port;
        }
    }
    panic!("no free port among 1000 tried in 16384..32384");
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pebble and its DNS server, on free loopback ports.
struct Pebble {
    directory: String,
    management: SocketAddr,
    dns: SocketAddr,
    ca: PathBuf,
    /// challtestsrv's management API (set and clear TXT records).
    dns_management: SocketAddr,
    pebble: Option<Proc>,
    _dns_server: Proc,
}

impl Pebble {
    /// Starts both; pebble validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`
    /// of 127.0.0.1 and issues certificates valid `validity` seconds.
    fn start(dir: &Path, http_port: u16, tls_port: u16, validity: u64) -> Pebble {
        Pebble::start_with(dir, http_port, tls_port, validity, None)
    }

    /// [`Pebble::start`]; with `eab` (key id, base64url HMAC key) pebble requires an external
    /// account binding with that key.
    fn start_with(
        dir: &Path,
        http_port: u16,
        tls_port: u16,
        validity: u64,
        eab: Option<(&str, &str)>,
    ) -> Pebble {
        // pebble's own HTTPS: a test CA and a certificate for 127.0.0.1 and localhost.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lull test: pebble's listener CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName("localhost".try_into().unwrap()),
            rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca = dir.join("pebble-ca.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(dir.join("pebble-cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem()).unwrap();

        // A port can still be taken between the choice and the bind (another test's listener):
        // each server is started again on new ports when it exits before it listens.
        let (dns, dns_management, dns_server) = spawn_listening(dir, "pebble-challtestsrv", || {
            let dns = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let mut command = Command::new("pebble-challtestsrv");
            command.args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &dns.to_string(),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &management.to_string(),
            ]);
            (dns, management, vec![management], command)
        });
        let config_path = dir.join("pebble.json");
        let (listen, management, pebble) = spawn_listening(dir, "pebble", || {
            let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config = json!({
                "pebble": {
                    "listenAddress": listen.to_string(),
                    "managementListenAddress": management.to_string(),
                    "certificate": dir.join("pebble-cert.pem"),
                    "privateKey": dir.join("pebble-key.pem"),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": eab.is_some(),
                    "externalAccountMACKeys": eab.map_or(json!({}), |(kid, key)| json!({ kid: key })),
                    "certificateValidityPeriod": validity,
                }
            });
            std::fs::write(&config_path, config.to_string()).unwrap();
            let mut command = Command::new("pebble");
            command
                .arg("-config")
                .arg(&config_path)
                .args(["-dnsserver", &dns.to_string()])
                .env("PEBBLE_VA_NOSLEEP", "1");
            (listen, management, vec![listen, management], command)
        });
        Pebble {
            directory: format!("https://{listen}/dir"),
            management,
            dns,
            ca,
            dns_management,
            pebble: Some(pebble),
            _dns_server: dns_server,
        }
    }

    /// Stops the CA (an outage).
    fn stop(&mut self) {
        self.pebble = None;
    }

    /// pebble's issuing root, PEM.
    fn root(&self, dir: &Path) -> PathBuf {
        let path = dir.join("pebble-root.pem");
        let out = curl(&[
            "--cacert",
            self.ca.to_str().unwrap(),
            &format!("https://{}/roots/0", self.management),
        ]);
        std::fs::write(&path, out).unwrap();
        path
    }

    /// What pebble says of a certificate's serial (hex): its status, e.g. `Valid`, `Revoked`.
    fn status(&self, serial_hex: &str) -> String {
        let out = curl(&[
            "--cacert",
            self.ca.to_str().unwrap(),
            &format!(
                "https://{}/cert-status-by-serial/{}",
                self.management,
                serial_hex.to_ascii_lowercase()
            ),
        ]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        v["Status"].as_str().unwrap_or(&out).to_owned()
    }
}

/// Starts the server `make` describes (two addresses it will serve on, returned as they are,
/// the TCP ones to wait for, its command) and waits until it listens on each of those. A
/// server that exits first (a port taken meanwhile) is started again on new ports, three
/// times at most; its output goes to `<dir>/<name>.log`, quoted when it never comes up.
fn spawn_listening(
    dir: &Path,
    name: &str,
    mut make: impl FnMut() -> (SocketAddr, SocketAddr, Vec<SocketAddr>, Command),
) -> (SocketAddr, SocketAddr, Proc) {
    let log_path = dir.join(format!("{name}.log"));
    for attempt in 1..=3 {
        let (first, second, tcp, mut command) = make();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Proc(
            command
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {name}: {e}")),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tcp
                .iter()
                .all(|addr| std::net::TcpStream::connect(addr).is_ok())
            {
                return (first, second, child);
            }
            if child.0.try_wait().unwrap().is_some() {
                eprintln!(
                    "{name} exited before listening (attempt {attempt}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} does not listen on {tcp:?} after 60 s: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "{name} did not start in three attempts: {}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The serial (hex) of the first certificate in a PEM file.
fn serial_of(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("serial=")
        .unwrap_or(text.trim())
        .to_owned()
}

/// The serial of the certificate the proxy serves for `name` on `https`.
fn served_serial(https: SocketAddr, name: &str) -> String {
    let script = format!(
        "openssl s_client -connect {https} -servername {name} </dev/null 2>/dev/null | openssl x509 -noout -serial"
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("serial=")
        .unwrap_or(text.trim())
        .to_owned()
}

fn acme_config(pebble: &Pebble, challenge: ChallengeKind) -> AcmeConfig {
    AcmeConfig {
        enabled: true,
        directory: pebble.directory.clone(),
        email: Some("ops@lull-test.example".into()),
        ca_certificates: Some(pebble.ca.clone()),
        challenge,
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(4),
        check_interval: Duration::from_millis(500),
        resolver: Some(pebble.dns),
        public_addresses: vec!["127.0.0.1".parse().unwrap()],
        ..AcmeConfig::default()
    }
}

/// The in-process daemon with its HTTP and HTTPS listeners on the loopback ports pebble
/// validates on.
async fn start_plane(
    dir: &Path,
    (http_port, tls_port): (u16, u16),
    acme: AcmeConfig,
    base_domain: Option<&str>,
) -> InProcess {
    InProcess::start_tls(
        dir,
        TlsSetup {
            http: SocketAddr::from(([127, 0, 0, 1], http_port)),
            https: SocketAddr::from(([127, 0, 0, 1], tls_port)),
            acme,
            base_domain: base_domain.map(str::to_owned),
        },
    )
    .await
}

async fn create_service(client: &Client, name: &str) {
    let started: Value = client
        .call(
            Method::POST,
            "/v1/services",
            Some(&json!({"name": name, "source": {"type": "image", "reference": "fake/app:1"}})),
        )
        .await
        .unwrap();
    follow(client, started["operation"].as_str().unwrap()).await;
}

async fn follow(client: &Client, op: &str) -> Value {
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/operations/{op}/progress"),
            None::<&()>,
        )
        .await
        .unwrap();
    while let Some(v) = lines.next().await.unwrap() {
        if let Some(end) = v.get("end") {
            assert_eq!(end["state"], "succeeded", "{end}");
            return end.clone();
        }
    }
    panic!("operation {op} ended without an end");
}

/// Polls the service's domains until every one has `status` (or panics after `within`).
async fn wait_status(client: &Client, service: &str, status: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let views: Value = client
            .get(&format!("/v1/services/{service}/domains"))
            .await
            .unwrap();
        let all = views.as_array().unwrap();
        if !all.is_empty() && all.iter().all(|v| v["status"] == status) {
            return views;
        }
        assert!(
            Instant::now() < deadline,
            "domains of {service} not all {status}: {views:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn events(client: &Client, service: &str) -> Vec<Value> {
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/services/{service}/events"),
            None::<&()>,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(v) = lines.next().await.unwrap() {
        out.push(v);
    }
    out
}

async fn wait_event(client: &Client, service: &str, kind: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = events(client, service)
            .await
            .into_iter()
            .find(|e| e["kind"] == kind)
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} event for {service}: {:#?}",
            events(client, service).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_serves_redirects_and_revokes() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (http_port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), http_port, tls_port, 3600);
    let plane = start_plane(
        dir.path(),
        (http_port, tls_port),
        acme_config(&pebble, ChallengeKind::Http01),
        None,
    )
    .await;
    let c = &plane.client;
    create_service(c, "web").await;

    // A bad domain is refused with the field named.
    let err = c
        .call::<_, Value>(
            Method::POST,
            "/v1/services/web/domains",
            Some(&json!({"domain": "shop.localhost"})),
        )
        .await
        .unwrap_err();
    assert_eq!(err.api().unwrap().fields[0].field, "domain", "{err}");

    let domain = "shop.lull-test.example";
    let added: Value = c
        .call(
            Method::POST,
            "/v1/services/web/domains",
            Some(&json!({"domain": domain, "www": true})),
        )
        .await
        .unwrap();
    assert_eq!(added["names"], json!([domain, format!("www.{domain}")]));
    let records: Vec<String> = added["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["name"].as_str().unwrap(),
                r["kind"].as_str().unwrap(),
                r["value"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        records,
        [
            format!("{domain} A 127.0.0.1"),
            format!("www.{domain} A 127.0.0.1")
        ]
    );
    assert!(
        added["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{added:#}"
    );
    follow(c, added["operation"].as_str().unwrap()).await;

    let views = wait_status(c, "web", "active", Duration::from_secs(60)).await;
    assert!(views[0]["not_after"].is_string(), "{views:#}");
    let issued = wait_event(c, "web", "certificate.issued", Duration::from_secs(5)).await;
    assert!(
        issued["message"].as_str().unwrap().contains(domain),
        "{issued}"
    );

    // HTTPS through the proxy with the issued certificate, verified against pebble's root.
    let root = pebble.root(dir.path());
    for name in [domain.to_owned(), format!("www.{domain}")] {
        let body = curl(&[
            "--cacert",
            root.to_str().unwrap(),
            "--resolve",
            &format!("{name}:{tls_port}:127.0.0.1"),
            &format!("https://{name}:{tls_port}/"),
        ]);
        assert!(body.contains("rev"), "{name}: {body}");
    }
    // Port 80 redirects the domain to HTTPS (the challenge path is never redirected: pebble's
    // validation above went through it); web.localhost stays plain HTTP.
    let head = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        &format!("Host: {domain}"),
        &format!("http://127.0.0.1:{http_port}/a?b=1"),
    ]);
    assert_eq!(
        head,
        format!("301 https://{domain}:{tls_port}/a?b=1"),
        "{head}"
    );
    let plain = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: web.localhost",
        &format!("http://127.0.0.1:{http_port}/"),
    ]);
    assert_eq!(plain, "200");

    // The key and certificate on disk are root's only.
    let certs: Value = c.get("/v1/certificates").await.unwrap();
    let acme = certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == "acme")
        .expect("an ACME certificate listed")
        .clone();
    let cert_file = PathBuf::from(acme["file"].as_str().unwrap());
    let key_file = cert_file.with_file_name("key.pem");
    use std::os::unix::fs::PermissionsExt;
    for f in [&cert_file, &key_file] {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }
    let serial = serial_of(&cert_file);
    assert_eq!(served_serial(plane.https_addr.unwrap(), domain), serial);
    assert_eq!(pebble.status(&serial), "Valid");

    // A restarted daemon serves the stored certificate without ordering another.
    plane.shutdown().await;
    let plane = start_plane(
        dir.path(),
        (http_port, tls_port),
        acme_config(&pebble, ChallengeKind::Http01),
        None,
    )
    .await;
    let c = &plane.client;
    wait_status(c, "web", "active", Duration::from_secs(20)).await;
    assert_eq!(served_serial(plane.https_addr.unwrap(), domain), serial);
    let issued = events(c, "web")
        .await
        .into_iter()
        .filter(|e| e["kind"] == "certificate.issued")
        .count();
    assert_eq!(issued, 1);

    // Removing the domain revokes its certificate.
    let removed: Value = c
        .call(
            Method::DELETE,
            &format!("/v1/services/web/domains/{domain}"),
            None::<&()>,
        )
        .await
        .unwrap();
    follow(c, removed["operation"].as_str().unwrap()).await;
    let revoked = wait_event(c, "web", "certificate.revoked", Duration::from_secs(20)).await;
    assert!(
        revoked["message"].as_str().unwrap().contains("revoked"),
        "{revoked}"
    );
    assert_eq!(pebble.status(&serial), "Revoked");
    assert!(!cert_file.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_renews_and_keeps_serving_through_a_ca_outage() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (http_port, tls_port) = (free_port(), free_port());
    // 30 s certificates: renewal due at 20 s, the expiry warning at 25 s.
    let mut pebble = Pebble::start(dir.path(), http_port, tls_port, 30);
    let plane = start_plane(
        dir.path(),
        (http_port, tls_port),
        acme_config(&pebble, ChallengeKind::TlsAlpn01),
        Some("apps.lull-test.example"),
    )
    .await;
    let c = &plane.client;
    create_service(c, "api").await;
    // The base domain's name wants a certificate without any `domain add`.
    let name = "api.apps.lull-test.example";
    let views = wait_status(c, "api", "active", Duration::from_secs(60)).await;
    assert_eq!(views[0]["name"], name);
    let https = plane.https_addr.unwrap();
    let first = served_serial(https, name);
    assert!(!first.is_empty());

    // Renewed at two thirds of its life, before it expires.
    let renewed = wait_event(c, "api", "certificate.renewed", Duration::from_secs(45)).await;
    assert!(renewed["message"].as_str().unwrap().contains(name));
    let second = served_serial(https, name);
    assert_ne!(second, first, "the renewed certificate is served");

    // The CA goes away: the next renewal fails, says why, and the current certificate stays.
    pebble.stop();
    let failed = wait_event(c, "api", "certificate.failed", Duration::from_secs(45)).await;
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains("not renewed") && message.contains("keeps being served"),
        "{message}"
    );
    assert_eq!(served_serial(https, name), second);
    let expiring = wait_event(c, "api", "certificate.expiring", Duration::from_secs(20)).await;
    assert!(expiring["message"].as_str().unwrap().contains(name));
    let views: Value = c.get("/v1/services/api/domains").await.unwrap();
    assert_eq!(views[0]["status"], "active", "{views:#}");
    assert!(
        views[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("renewal failed")),
        "{views:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns01_hook_gets_the_base_domain_a_wildcard() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (http_port, tls_port) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), http_port, tls_port, 3600);
    // The operator's hook: `HOOK present|cleanup _acme-challenge.NAME VALUE`.
    let hook = dir.path().join("dns-hook");
    let log = dir.path().join("dns-hook.log");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\n\
             echo \"$1 $2\" >> {log}\n\
             case \"$1\" in\n\
             present) path=set-txt; body=\"{{\\\"host\\\":\\\"$2.\\\",\\\"value\\\":\\\"$3\\\"}}\" ;;\n\
             cleanup) path=clear-txt; body=\"{{\\\"host\\\":\\\"$2.\\\"}}\" ;;\n\
             *) exit 2 ;;\n\
             esac\n\
             exec curl -sS --fail -X POST -d \"$body\" http://{mgmt}/$path\n",
            log = log.display(),
            mgmt = pebble.dns_management,
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plane = start_plane(
        dir.path(),
        (http_port, tls_port),
        AcmeConfig {
            dns01_hook: Some(hook.clone()),
            ..acme_config(&pebble, ChallengeKind::Http01)
        },
        Some("apps.lull-test.example"),
    )
    .await;
    let c = &plane.client;
    create_service(c, "one").await;
    create_service(c, "two").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let views: Value = c.get("/v1/domains").await.unwrap();
        let wildcard = views
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "*.apps.lull-test.example")
            .cloned()
            .unwrap_or(Value::Null);
        if wildcard["status"] == "active" {
            // The services' own names under the base domain need no certificate of their own.
            assert!(
                views
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|v| v["service"] == "*"),
                "{views:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no wildcard: {views:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let root = pebble.root(dir.path());
    for service in ["one", "two"] {
        let name = format!("{service}.apps.lull-test.example");
        let body = curl(&[
            "--cacert",
            root.to_str().unwrap(),
            "--resolve",
            &format!("{name}:{tls_port}:127.0.0.1"),
            &format!("https://{name}:{tls_port}/"),
        ]);
        assert!(body.contains("rev"), "{name}: {body}");
    }
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls,
        "present _acme-challenge.apps.lull-test.example\ncleanup _acme-challenge.apps.lull-test.example\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_sent_when_the_ca_requires_it() {
    if !tools_present() {
        return;
    }
    let (kid, key) = (
        "lull-kid-1",
        "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
    );
    for with_binding in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (http_port, tls_port) = (free_port(), free_port());
        let pebble = Pebble::start_with(dir.path(), http_port, tls_port, 3600, Some((kid, key)));
        let mut acme = acme_config(&pebble, ChallengeKind::Http01);
        if with_binding {
            acme.eab = Some((kid.to_owned(), key.to_owned()));
        }
        let plane = start_plane(
            dir.path(),
            (http_port, tls_port),
            acme,
            Some("eab.lull-test.example"),
        )
        .await;
        create_service(&plane.client, "web").await;
        if with_binding {
            wait_status(&plane.client, "web", "active", Duration::from_secs(60)).await;
        } else {
            let views = wait_status(&plane.client, "web", "failed", Duration::from_secs(60)).await;
            let reason = views[0]["reason"].as_str().unwrap();
            assert!(reason.contains("externalAccountRequired"), "{reason}");
            assert!(views[0]["retry_at"].is_string(), "{views:#}");
        }
        plane.shutdown().await;
    }
}
