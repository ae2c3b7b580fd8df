use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, ServerConnection};

use super::*;

/// Writes a self-signed certificate for `names`, valid between the years given, and its key
/// to `dir/<stem>.pem` and `dir/<stem>.key`.
fn make_cert(dir: &Path, stem: &str, names: &[&str], years: (i32, i32)) -> CertificateFiles {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
    params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    let files = CertificateFiles::new(
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 6, 1, 0, 0, 0).unwrap()
}

fn load(files: &CertificateFiles) -> Certificate {
    Certificate::load(files, now()).unwrap()
}

/// Accepts any certificate and records the leaf it was shown.
#[derive(Debug, Default)]
struct Recorder(Mutex<Option<Vec<u8>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An in-memory handshake against `server`: the leaf the client was shown and the ALPN
/// protocol agreed, or the error.
fn handshake(
    server: &Arc<rustls::ServerConfig>,
    sni: Option<&str>,
    alpn: &[&[u8]],
) -> Result<(Vec<u8>, Option<Vec<u8>>), rustls::Error> {
    let recorder = Arc::new(Recorder::default());
    let mut client_config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    client_config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    client_config.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("nosni.test").to_owned()).unwrap();
    let mut client = ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut server = ServerConnection::new(server.clone()).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        let mut slice = &buf[..];
        while !slice.is_empty() {
            server.read_tls(&mut slice).unwrap();
        }
        server.process_new_packets()?;
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        let mut slice = &buf[..];
        while !slice.is_empty() {
            client.read_tls(&mut slice).unwrap();
        }
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let leaf = recorder.0.lock().unwrap().clone().unwrap();
            return Ok((leaf, server.alpn_protocol().map(<[u8]>::to_vec)));
        }
    }
    panic!("handshake did not finish");
}

fn leaf(certificate: &Certificate) -> Vec<u8> {
    certificate.key.cert[0].to_vec()
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<CertStore>,
    config: Arc<rustls::ServerConfig>,
    exact: Certificate,
    wildcard: Certificate,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let exact = load(&make_cert(
        dir.path(),
        "a",
        &["app.example.com"],
        (2020, 2040),
    ));
    let wildcard = load(&make_cert(
        dir.path(),
        "w",
        &["*.example.com"],
        (2020, 2040),
    ));
    let store = Arc::new(CertStore::with_generated_default().unwrap());
    store.replace(vec![exact.clone(), wildcard.clone()]);
    let config = server_config(store.clone()).unwrap();
    Fixture {
        _dir: dir,
        store,
        config,
        exact,
        wildcard,
    }
}

#[test]
fn exact_then_wildcard_one_label_then_default() {
    let f = fixture();
    let default = f.store.default_certificate().cert[0].to_vec();
    let shown = |sni: &str| handshake(&f.config, Some(sni), &[b"h2"]).unwrap().0;
    assert_eq!(shown("app.example.com"), leaf(&f.exact));
    assert_eq!(shown("APP.Example.com"), leaf(&f.exact));
    assert_eq!(shown("other.example.com"), leaf(&f.wildcard));
    // A wildcard covers one label: not the parent, not two labels down.
    assert_eq!(shown("example.com"), default);
    assert_eq!(shown("a.b.example.com"), default);
    assert_eq!(shown("unknown.test"), default);
    // No SNI at all.
    assert_eq!(handshake(&f.config, None, &[]).unwrap().0, default);
}

#[test]
fn alpn_prefers_h2_then_http11() {
    let f = fixture();
    let (_, alpn) = handshake(&f.config, Some("app.example.com"), &[b"http/1.1", b"h2"]).unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (_, alpn) = handshake(&f.config, Some("app.example.com"), &[b"http/1.1"]).unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
}

#[test]
fn default_certificate_names_nothing_but_lull_invalid() {
    let store = CertStore::with_generated_default().unwrap();
    let der = &store.default_certificate().cert[0];
    let parsed = webpki::EndEntityCert::try_from(der).unwrap();
    let names: Vec<&str> = parsed.valid_dns_names().collect();
    assert_eq!(names, vec![DEFAULT_NAME]);
    let subject = String::from_utf8_lossy(parsed.subject()).into_owned();
    assert!(subject.contains(DEFAULT_NAME), "{subject}");
    assert!(!subject.contains("rcgen"), "{subject}");
}

#[test]
fn updates_reach_new_handshakes_without_a_new_config() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let fresh = load(&make_cert(dir.path(), "n", &["new.test"], (2020, 2040)));
    let default = f.store.default_certificate().cert[0].to_vec();
    assert_eq!(
        handshake(&f.config, Some("new.test"), &[]).unwrap().0,
        default
    );
    f.store.replace(vec![fresh.clone()]);
    assert_eq!(
        handshake(&f.config, Some("new.test"), &[]).unwrap().0,
        leaf(&fresh)
    );
    // Replaced whole: the old names are gone.
    assert_eq!(
        handshake(&f.config, Some("app.example.com"), &[])
            .unwrap()
            .0,
        default
    );
    let names: Vec<String> = f.store.names().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["new.test"]);
}

#[test]
fn longest_valid_certificate_wins_a_shared_name() {
    let dir = tempfile::tempdir().unwrap();
    let short = load(&make_cert(dir.path(), "s", &["x.test"], (2020, 2031)));
    let long = load(&make_cert(dir.path(), "l", &["x.test"], (2020, 2035)));
    let store = CertStore::with_generated_default().unwrap();
    store.replace(vec![long.clone(), short.clone()]);
    assert_eq!(store.lookup(Some("x.test")).cert[0].to_vec(), leaf(&long));
    store.replace(vec![short.clone(), long.clone()]);
    assert_eq!(store.lookup(Some("x.test")).cert[0].to_vec(), leaf(&long));
}

#[test]
fn acme_tls_alpn_gets_the_challenge_certificate_only() {
    let f = fixture();
    // No challenge held: an acme-tls/1 client gets no certificate at all.
    assert!(handshake(&f.config, Some("app.example.com"), &[ACME_TLS_ALPN]).is_err());
    let challenge = store::generate_default().unwrap();
    f.store.set_challenge("App.Example.com", challenge.clone());
    let (shown, alpn) = handshake(&f.config, Some("app.example.com"), &[ACME_TLS_ALPN]).unwrap();
    assert_eq!(shown, challenge.cert[0].to_vec());
    assert_eq!(alpn.as_deref(), Some(ACME_TLS_ALPN));
    // Ordinary clients still get the real certificate, and a replace keeps the challenge.
    let (shown, _) = handshake(&f.config, Some("app.example.com"), &[b"h2"]).unwrap();
    assert_eq!(shown, leaf(&f.exact));
    f.store.replace(vec![f.exact.clone()]);
    let (shown, _) = handshake(&f.config, Some("app.example.com"), &[ACME_TLS_ALPN]).unwrap();
    assert_eq!(shown, challenge.cert[0].to_vec());
    // Another name has no challenge; without SNI there is none either.
    assert!(handshake(&f.config, Some("other.example.com"), &[ACME_TLS_ALPN]).is_err());
    assert!(handshake(&f.config, None, &[ACME_TLS_ALPN]).is_err());
    f.store.remove_challenge("app.example.com");
    assert!(handshake(&f.config, Some("app.example.com"), &[ACME_TLS_ALPN]).is_err());
}

#[test]
fn names_come_from_the_sans() {
    let dir = tempfile::tempdir().unwrap();
    let c = load(&make_cert(
        dir.path(),
        "c",
        &["B.example.com", "a.example.com", "*.x.example.com"],
        (2020, 2040),
    ));
    assert_eq!(
        c.names,
        ["*.x.example.com", "a.example.com", "b.example.com"]
    );
    assert_eq!(c.not_before.to_rfc3339(), "2020-01-01T00:00:00+00:00");
    assert_eq!(c.not_after.to_rfc3339(), "2040-01-01T00:00:00+00:00");
    assert!(c.covers("q.x.example.com"));
    assert!(!c.covers("x.example.com"));
    assert!(!c.stapled);
}

#[test]
fn missing_files_and_non_pem_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = CertificateFiles::new(dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let e = Certificate::load(&files, now()).unwrap_err();
    assert!(matches!(e, CertificateError::Read { .. }), "{e}");
    assert_eq!(e.to_string(), format!("read {}", files.cert.display()));
    std::fs::write(&files.cert, "not pem\n").unwrap();
    let e = Certificate::load(&files, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{} holds no PEM certificate", files.cert.display())
    );
    let good = make_cert(dir.path(), "g", &["a.test"], (2020, 2040));
    let files = CertificateFiles::new(&good.cert, dir.path().join("cert.pem"));
    let e = Certificate::load(&files, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{} holds no PEM private key", files.key.display())
    );
}

#[test]
fn mismatched_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_cert(dir.path(), "a", &["a.test"], (2020, 2040));
    let b = make_cert(dir.path(), "b", &["b.test"], (2020, 2040));
    let files = CertificateFiles::new(&a.cert, &b.key);
    let e = Certificate::load(&files, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the private key in {} does not match the certificate in {}",
            b.key.display(),
            a.cert.display()
        )
    );
}

#[test]
fn expired_and_not_yet_valid_name_the_dates() {
    let dir = tempfile::tempdir().unwrap();
    let old = make_cert(dir.path(), "old", &["a.test"], (2001, 2002));
    let e = Certificate::load(&old, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the certificate in {} expired on 2002-01-01T00:00:00Z (it is now 2030-06-01T00:00:00Z)",
            old.cert.display()
        )
    );
    let future = make_cert(dir.path(), "future", &["a.test"], (2090, 2091));
    let e = Certificate::load(&future, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the certificate in {} is not valid before 2090-01-01T00:00:00Z (it is now 2030-06-01T00:00:00Z)",
            future.cert.display()
        )
    );
}

#[test]
fn names_not_covered_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_cert(dir.path(), "c", &["a.test", "*.w.test"], (2020, 2040));
    let c = load(&files);
    let kept = c
        .clone()
        .restrict_to(&["A.test".into(), "x.w.test".into(), "*.w.test".into()])
        .unwrap();
    assert_eq!(kept.names, ["*.w.test", "a.test", "x.w.test"]);
    let e = c.clone().restrict_to(&["b.test".into()]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the certificate in {} does not cover b.test (it covers *.w.test, a.test)",
            files.cert.display()
        )
    );
    assert!(c.clone().restrict_to(&["w.test".into()]).is_err());
    assert!(c.restrict_to(&["*.test".into()]).is_err());
}

#[test]
fn ocsp_response_is_stapled_when_supplied_beside_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_cert(dir.path(), "c", &["a.test"], (2020, 2040));
    let mut beside = files.cert.clone().into_os_string();
    beside.push(".ocsp");
    // The shape of an OCSPResponse (SEQUENCE { ENUMERATED successful, ... }).
    let response = vec![0x30, 0x06, 0x0a, 0x01, 0x00, 0xa0, 0x01, 0x00];
    std::fs::write(&beside, &response).unwrap();
    let c = load(&files);
    assert!(c.stapled);
    assert_eq!(c.key.ocsp.as_deref(), Some(&response[..]));
    std::fs::write(&beside, "-----BEGIN OCSP-----").unwrap();
    let e = Certificate::load(&files, now()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: not a DER OCSP response", beside.to_string_lossy())
    );
}

#[test]
fn single_certificate_config_serves_it_to_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_cert(dir.path(), "c", &["a.test"], (2020, 2090));
    let config = single_cert_config(&files.cert, &files.key).unwrap();
    let c = Certificate::load(&files, Utc::now()).unwrap();
    assert_eq!(
        handshake(&config, Some("zzz.test"), &[]).unwrap().0,
        leaf(&c)
    );
    assert_eq!(handshake(&config, None, &[]).unwrap().0, leaf(&c));
}

#[test]
fn covers_names_real_certificates_only() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_cert(dir.path(), "c", &["a.test", "*.w.test"], (2020, 2040));
    let store = CertStore::with_generated_default().unwrap();
    assert!(!store.covers("a.test"), "nothing but the default yet");
    assert!(
        !store.covers(DEFAULT_NAME),
        "the default certificate is not a real one"
    );
    store.replace(vec![load(&files)]);
    for name in ["a.test", "A.Test", "a.test.", "x.w.test"] {
        assert!(store.covers(name), "{name}");
    }
    for name in [
        "b.test",
        "w.test",
        "a.x.w.test",
        ".w.test",
        DEFAULT_NAME,
        "",
    ] {
        assert!(!store.covers(name), "{name}");
    }
    let challenge = make_cert(dir.path(), "ch", &["acme.test"], (2020, 2040));
    store.set_challenge("acme.test", load(&challenge).key);
    assert!(
        !store.covers("acme.test"),
        "a challenge certificate is not a real one"
    );
}
