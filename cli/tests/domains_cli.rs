//! `lull domain` and `lull cert` end to end without root, against the in-process control plane
//! with its HTTPS listener and ACME off (so nothing asks DNS or a CA): the records printed,
//! the pending status and its reason, an operator certificate added (bad files named, good
//! one served by SNI on the HTTPS listener and listed), the port-80 redirect it turns on, and
//! removals.

use std::net::SocketAddr;
use std::path::Path;

use lull_daemon::config::AcmeConfig;
use lull_daemon::testing::{InProcess, TlsSetup};

mod common;

use common::lull_at as lull;

/// The status line and `Location` of a request to `addr` with `host`.
async fn head(addr: SocketAddr, host: &str) -> (u16, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let location = text.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .starts_with("location: ")
            .then(|| l["location: ".len()..].trim().to_owned())
    });
    (status, location)
}

fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_and_operator_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start_tls(
        dir.path(),
        TlsSetup {
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            https: SocketAddr::from(([127, 0, 0, 1], 0)),
            acme: AcmeConfig {
                public_addresses: vec!["203.0.113.7".parse().unwrap()],
                ..AcmeConfig::default()
            },
            base_domain: Some("apps.example.net".into()),
        },
    )
    .await;
    let socket = plane.socket.clone();
    lull(
        &socket,
        &["service", "create", "web", "--image", "fake/app:1"],
    )
    .await
    .expect(0);

    // Bad domains: the field named, exit 2.
    let bad = lull(&socket, &["domain", "add", "web", "shop..example.com"])
        .await
        .expect(2);
    assert!(bad.stderr.contains("domain"), "{bad:#?}");
    lull(&socket, &["domain", "add", "nope", "shop.example.com"])
        .await
        .expect(3);

    let added = lull(
        &socket,
        &["domain", "add", "web", "shop.example.com", "--www"],
    )
    .await
    .expect(0);
    let out = &added.stdout;
    for line in [
        "shop.example.com",
        "A",
        "203.0.113.7",
        "www.shop.example.com",
        "CNAME",
        "web.apps.example.net.",
        "ACME is off",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    // Another service cannot take the domain.
    lull(
        &socket,
        &["service", "create", "api", "--image", "fake/app:1"],
    )
    .await
    .expect(0);
    let taken = lull(&socket, &["domain", "add", "api", "shop.example.com"])
        .await
        .expect(2);
    assert!(taken.stderr.contains("service web's"), "{taken:#?}");

    let listed = lull(&socket, &["domain", "list", "web"]).await.expect(0);
    for line in [
        "shop.example.com",
        "www.shop.example.com",
        "web.apps.example.net",
        "pending",
        "ACME is off",
    ] {
        assert!(
            listed.stdout.contains(line),
            "{line:?} missing from:\n{}",
            listed.stdout
        );
    }
    // No certificate for the domain yet: port 80 serves it plainly.
    let (status, _) = head(plane.proxy_addr, "shop.example.com").await;
    assert_eq!(status, 200);

    // An operator's certificate: a bad pair is refused naming the files; a good one is served.
    let (good_cert, good_key) = write_cert(
        dir.path(),
        "shop",
        &["shop.example.com", "www.shop.example.com"],
    );
    let (_, other_key) = write_cert(dir.path(), "other", &["other.example.com"]);
    let refused = lull(
        &socket,
        &[
            "cert", "add", "shop", "--cert", &good_cert, "--key", &other_key,
        ],
    )
    .await
    .expect(2);
    assert!(
        refused.stderr.contains(&other_key) && refused.stderr.contains(&good_cert),
        "{refused:#?}"
    );
    let missing = lull(
        &socket,
        &[
            "cert",
            "add",
            "shop",
            "--cert",
            "/nonexistent.pem",
            "--key",
            &good_key,
        ],
    )
    .await
    .expect(2);
    assert!(missing.stderr.contains("/nonexistent.pem"), "{missing:#?}");
    lull(
        &socket,
        &[
            "cert", "add", "shop", "--cert", &good_cert, "--key", &good_key,
        ],
    )
    .await
    .expect(0);
    let certs = lull(&socket, &["cert", "list"]).await.expect(0);
    assert!(
        certs.stdout.contains("api (shop)") && certs.stdout.contains("www.shop.example.com"),
        "{}",
        certs.stdout
    );
    // The operator's certificate covers the domain: ACME leaves it alone, and port 80 now
    // redirects it to HTTPS (web.localhost stays plain).
    let listed = lull(&socket, &["domain", "list", "web"]).await.expect(0);
    assert!(
        !listed.stdout.contains("www.shop.example.com"),
        "{}",
        listed.stdout
    );
    let https_port = plane.https_addr.unwrap().port();
    let (status, location) = head(plane.proxy_addr, "shop.example.com").await;
    assert_eq!(status, 301);
    assert_eq!(
        location.as_deref(),
        Some(format!("https://shop.example.com:{https_port}/x").as_str())
    );
    let (status, _) = head(plane.proxy_addr, "web.localhost").await;
    assert_eq!(status, 200);
    // It survives a restart of the certificate store: kept under <data>/certs.
    assert!(dir.path().join("data/certs/shop/key.pem").exists());

    // An operator's certificate about to expire: an event on the services it serves, and the
    // expiry metric for every certificate held.
    let soon = {
        use chrono::Datelike;
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["old.example.com".to_owned()]).unwrap();
        let end = chrono::Utc::now() + chrono::TimeDelta::days(3);
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.path().join("old.pem"), dir.path().join("old.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    };
    lull(
        &socket,
        &["domain", "add", "api", "old.example.com", "--no-wait"],
    )
    .await
    .expect(0);
    lull(
        &socket,
        &["cert", "add", "old", "--cert", &soon.0, "--key", &soon.1],
    )
    .await
    .expect(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let events = lull(&socket, &["events", "api"]).await.expect(0);
        if events.stdout.contains("certificate.expiring") {
            assert!(
                events.stdout.contains("old.example.com"),
                "{}",
                events.stdout
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no expiry event: {}",
            events.stdout
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    use lull_daemon::telemetry::MetricsSource;
    let metrics = plane.tls.as_ref().unwrap().acme.encode();
    assert!(
        metrics.contains(
            "lull_certificate_expiry_timestamp_seconds{name=\"old.example.com\",source=\"api\"}"
        ) && metrics.contains("lull_certificates_expiring 1"),
        "{metrics}"
    );

    lull(&socket, &["cert", "rm", "shop"]).await.expect(0);
    lull(&socket, &["cert", "rm", "shop"]).await.expect(3);
    lull(&socket, &["domain", "remove", "web", "shop.example.com"])
        .await
        .expect(0);
    let listed = lull(&socket, &["domain", "list", "web"]).await.expect(0);
    assert!(
        !listed.stdout.contains("shop.example.com"),
        "{}",
        listed.stdout
    );
    lull(&socket, &["domain", "remove", "web", "shop.example.com"])
        .await
        .expect(3);
}
