//! The HTTPS listener's certificates: the proxy's [`CertStore`] filled from three sources,
//! `[tls]` files, certificates uploaded through the admin API, and ACME's. Every certificate
//! is read and checked before any is served; a start with a bad one fails with every reason,
//! and a reload with a bad one changes nothing (the certificates served keep being served).
//! Where sources overlap, the store serves the certificate valid the longest for each name.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use lull_proxy::tls::{CertStore, Certificate, CertificateError, StoreError};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// One line per bad certificate, each with its cause.
    #[error("{}", render(.0))]
    Invalid(Vec<CertificateError>),
    #[error("the default certificate")]
    Default(#[source] StoreError),
}

fn render(errors: &[CertificateError]) -> String {
    errors
        .iter()
        .map(|e| {
            let mut line = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                line.push_str(": ");
                line.push_str(&cause.to_string());
                source = cause.source();
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and checks every certificate `config` names, as valid at `now`.
pub fn load_all(config: &TlsConfig, now: DateTime<Utc>) -> Result<Vec<Certificate>, CertsError> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for entry in &config.certificates {
        let certificate = Certificate::load(&entry.files, now).and_then(|c| match &entry.names {
            Some(names) => c.restrict_to(names),
            None => Ok(c),
        });
        match certificate {
            Ok(c) => loaded.push(c),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(CertsError::Invalid(errors))
    }
}

/// Where a served certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `[tls] certificates` in lull.toml.
    Config,
    /// `lull cert add` (the admin API).
    Api,
    /// Issued by the ACME CA.
    Acme,
}

#[derive(Default)]
struct Sources {
    config: Vec<Certificate>,
    api: Vec<(String, Certificate)>,
    acme: Vec<Certificate>,
}

/// The certificates served, shared with the HTTPS listener.
pub struct Certificates {
    store: Arc<CertStore>,
    sources: Mutex<Sources>,
}

impl Certificates {
    /// A store with a freshly generated default certificate and every certificate in
    /// `config`; any bad one fails it.
    pub fn start(config: &TlsConfig) -> Result<Certificates, CertsError> {
        let loaded = load_all(config, Utc::now())?;
        let store = Arc::new(CertStore::with_generated_default().map_err(CertsError::Default)?);
        log(&loaded);
        let certificates = Certificates {
            store,
            sources: Mutex::new(Sources {
                config: loaded,
                ..Sources::default()
            }),
        };
        certificates.publish();
        Ok(certificates)
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands every source's certificates to the store (under the sources' lock, so two
    /// publishes never interleave).
    fn publish(&self) {
        let sources = self.sources();
        let mut all: Vec<Certificate> = sources.config.clone();
        all.extend(sources.api.iter().map(|(_, c)| c.clone()));
        all.extend(sources.acme.iter().cloned());
        // An expired certificate is served no more (and no longer turns on the redirect).
        let now = Utc::now();
        all.retain(|c| c.not_after > now);
        self.store.replace(all);
    }

    /// Serves `certificates` as ACME's from now on, instead of the ones before.
    pub fn set_acme(&self, certificates: Vec<Certificate>) {
        self.sources().acme = certificates;
        self.publish();
    }

    /// Serves `certificate` as the API's certificate `id` (replacing one with that id).
    pub fn put_api(&self, id: &str, certificate: Certificate) {
        {
            let mut sources = self.sources();
            sources.api.retain(|(held, _)| held != id);
            sources.api.push((id.to_owned(), certificate));
            sources.api.sort_by(|a, b| a.0.cmp(&b.0));
        }
        self.publish();
    }

    /// Stops serving the API's certificate `id`; whether it was there.
    pub fn remove_api(&self, id: &str) -> bool {
        let removed = {
            let mut sources = self.sources();
            let before = sources.api.len();
            sources.api.retain(|(held, _)| held != id);
            sources.api.len() != before
        };
        self.publish();
        removed
    }

    /// Whether an operator's unexpired certificate (config or API) covers `name`: ACME leaves
    /// such names alone.
    pub fn operator_covers(&self, name: &str) -> bool {
        let now = Utc::now();
        let sources = self.sources();
        sources
            .config
            .iter()
            .chain(sources.api.iter().map(|(_, c)| c))
            .any(|c| c.not_after > now && covers(&c.names, name))
    }

    /// Serves again what is held, less what expired since.
    pub fn refresh(&self) {
        self.publish();
    }

    /// Every certificate held, with its source and (for the API's) its id.
    pub fn list(&self) -> Vec<(Source, Option<String>, Certificate)> {
        let sources = self.sources();
        let mut out: Vec<_> = sources
            .config
            .iter()
            .map(|c| (Source::Config, None, c.clone()))
            .collect();
        out.extend(
            sources
                .api
                .iter()
                .map(|(id, c)| (Source::Api, Some(id.clone()), c.clone())),
        );
        out.extend(sources.acme.iter().map(|c| (Source::Acme, None, c.clone())));
        out
    }

    /// The resolver to give the HTTPS listener.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// Serves the certificates `config` names now, instead of those served so far, if every
    /// one of them is good; otherwise nothing changes and every reason is returned.
    pub fn reload(&self, config: &TlsConfig) -> Result<usize, CertsError> {
        let loaded = load_all(config, Utc::now())?;
        let count = loaded.len();
        log(&loaded);
        self.sources().config = loaded;
        self.publish();
        Ok(count)
    }
}

/// Whether `names` (exact, or `*.parent` one label up) cover `name`.
pub fn covers(names: &[String], name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    names.iter().any(|held| {
        held == &name
            || held.strip_prefix("*.").is_some_and(|parent| {
                name.split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent)
            })
    })
}

fn log(certificates: &[Certificate]) {
    for c in certificates {
        tracing::info!(
            cert = %c.source.display(),
            names = ?c.names,
            not_after = %c.not_after.to_rfc3339(),
            ocsp = c.stapled,
            "certificate loaded"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use lull_proxy::tls::CertificateFiles;

    use super::*;
    use crate::config::{CertificateConfig, DaemonConfig};

    fn write_cert(dir: &Path, stem: &str, names: &[&str], years: (i32, i32)) -> CertificateFiles {
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

    fn config_for(dir: &Path, entries: &[(&CertificateFiles, Option<&str>)]) -> TlsConfig {
        let mut text = String::from("[tls]\ncertificates = [\n");
        for (files, names) in entries {
            text.push_str(&format!(
                "  {{ cert = {:?}, key = {:?}{} }},\n",
                files.cert,
                files.key,
                names.map_or(String::new(), |n| format!(", names = [{n:?}]"))
            ));
        }
        text.push_str("]\n");
        let _ = dir;
        let config = DaemonConfig::parse(&text, "lull.toml").unwrap();
        config.tls
    }

    #[test]
    fn start_serves_the_configured_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_cert(dir.path(), "a", &["a.test", "*.a.test"], (2020, 2090));
        let b = write_cert(dir.path(), "b", &["b.test", "c.test"], (2020, 2090));
        let config = config_for(dir.path(), &[(&a, None), (&b, Some("c.test"))]);
        assert_eq!(
            config.certificates[1],
            CertificateConfig {
                files: b.clone(),
                names: Some(vec!["c.test".into()])
            }
        );
        let certs = Certificates::start(&config).unwrap();
        let names: Vec<String> = certs.store().names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["*.a.test", "a.test", "c.test"]);
    }

    #[test]
    fn every_bad_certificate_is_reported_and_a_failed_reload_keeps_what_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_cert(dir.path(), "good", &["good.test"], (2020, 2090));
        let old = write_cert(dir.path(), "old", &["old.test"], (2001, 2002));
        let other = write_cert(dir.path(), "other", &["other.test"], (2020, 2090));
        let mismatched = CertificateFiles::new(&good.cert, &other.key);
        let missing = CertificateFiles::new(dir.path().join("none.pem"), &good.key);
        let certs = Certificates::start(&config_for(dir.path(), &[(&good, None)])).unwrap();
        let served = certs.store().lookup(Some("good.test"));

        let bad = config_for(
            dir.path(),
            &[
                (&other, None),
                (&old, None),
                (&mismatched, None),
                (&missing, None),
                (&good, Some("bad.test")),
            ],
        );
        let e = certs.reload(&bad).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 4, "{e}");
        let expired = format!(
            "the certificate in {} expired on 2002-01-01T00:00:00Z",
            old.cert.display()
        );
        assert!(lines[0].starts_with(&expired), "{e}");
        assert_eq!(
            lines[1],
            format!(
                "the private key in {} does not match the certificate in {}",
                other.key.display(),
                good.cert.display()
            )
        );
        assert!(
            lines[2].starts_with(&format!("read {}: ", missing.cert.display())),
            "{e}"
        );
        assert_eq!(
            lines[3],
            format!(
                "the certificate in {} does not cover bad.test (it covers good.test)",
                good.cert.display()
            )
        );
        // Nothing changed: other.test (good in itself) is not served, good.test still is.
        assert!(Arc::ptr_eq(
            &certs.store().lookup(Some("good.test")),
            &served
        ));
        assert!(!Arc::ptr_eq(
            &certs.store().lookup(Some("other.test")),
            &certs.store().lookup(Some("good.test"))
        ));
        let names: Vec<String> = certs.store().names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["good.test"]);
        // A good reload swaps.
        let n = certs
            .reload(&config_for(dir.path(), &[(&other, None)]))
            .unwrap();
        assert_eq!(n, 1);
        let names: Vec<String> = certs.store().names().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["other.test"]);
    }
}
