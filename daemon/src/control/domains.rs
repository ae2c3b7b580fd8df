//! Custom domains and certificates through the admin API: `lull domain add|list|remove` and
//! `lull cert add|list|rm|reload`.
//!
//! A domain is a hostname of its service (so routing and the one-host-one-service rule are
//! the service's), and adding or removing one is a change of the service (a new revision).
//! What the user must do in DNS, what DNS says now, and where the certificate stands come
//! from [`crate::acme`].

use std::path::PathBuf;
use std::sync::Arc;

use chrono::Utc;
use lull_proxy::tls::{Certificate, CertificateFiles};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Control, Started};
use crate::acme::dns::{self, Check, Record};
use crate::acme::{AcmeManager, NameView};
use crate::api::{ApiError, ErrorCode, FieldError};
use crate::certs::{Certificates, Source};
use crate::config::TlsConfig;
use crate::names;

/// The HTTPS side of the control plane.
pub struct TlsControl {
    pub certificates: Arc<Certificates>,
    pub acme: Arc<AcmeManager>,
    /// `<data>/certs`: certificates uploaded through the API (`<id>/fullchain.pem`, `key.pem`).
    pub api_dir: PathBuf,
    /// `[tls]` as loaded, for a reload.
    pub config: TlsConfig,
}

/// `POST /v1/services/{name}/domains`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDomain {
    pub domain: String,
    #[serde(default)]
    pub www: bool,
}

/// What `lull domain add` prints.
#[derive(Debug, Serialize)]
pub struct DomainAdded {
    pub names: Vec<String>,
    /// The records to create (A/AAAA to this host, or the CNAME alternative).
    pub records: Vec<Record>,
    /// Whether the addresses are the operator's (`[acme] public_addresses`) or this host's
    /// interface addresses, which may not be the public ones (behind NAT).
    pub addresses_configured: bool,
    /// What DNS answers now (empty when it was not asked: ACME off and no resolver set).
    pub checks: Vec<Check>,
    pub acme: bool,
    /// The service, and the revision and operation that add the names (`note` when nothing
    /// changed).
    #[serde(flatten)]
    pub started: Started,
}

/// `PUT /v1/certificates/{id}`: PEM text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutCertificate {
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub names: Option<Vec<String>>,
}

fn field(name: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(vec![FieldError {
        field: name.into(),
        message: message.into(),
    }])
}

/// A domain as given: lowercase, no trailing dot, a DNS name with a dot, not `.localhost`.
pub fn check_domain(text: &str) -> Result<String, ApiError> {
    let domain = text.trim().trim_end_matches('.').to_ascii_lowercase();
    if let Err(e) = names::check_dns_name(&domain) {
        return Err(field("domain", format!("{text:?}: {e}")));
    }
    if !domain.contains('.') {
        return Err(field(
            "domain",
            format!("{text:?} is a single label; a domain has a dot (example.com)"),
        ));
    }
    if domain == "localhost" || domain.ends_with(".localhost") {
        return Err(field(
            "domain",
            format!("{text:?}: .localhost names stay plain HTTP and need no domain"),
        ));
    }
    Ok(domain)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(field(
            "id",
            format!("{id:?}: letters, digits, '-', '_' and '.' (not first), at most 64"),
        ))
    }
}

impl Control {
    fn tls_control(&self) -> Result<&TlsControl, ApiError> {
        self.tls.as_deref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Conflict,
                "this daemon has no HTTPS listener ([listeners] https is off)",
            )
        })
    }

    /// The service's own hostnames and its current revision.
    async fn hostnames_of(&self, service: &str) -> Result<(Vec<String>, u64), ApiError> {
        let owned = service.to_owned();
        let record = self.blocking(move |s| s.get_service(&owned)).await?;
        Ok((
            Self::current_spec(&record)?.hostnames,
            record.current_revision.unwrap_or(0),
        ))
    }

    /// Adds `domain` (and `www.<domain>`) to `service`: a new revision answering on it, the
    /// DNS records to create, and what DNS says now.
    pub async fn add_domain(
        &self,
        service: &str,
        body: AddDomain,
    ) -> Result<DomainAdded, ApiError> {
        let tls = self.tls_control()?;
        let domain = check_domain(&body.domain)?;
        let mut names = vec![domain.clone()];
        if body.www {
            if domain.starts_with("www.") {
                return Err(field("www", format!("{domain} already starts with www.")));
            }
            names.push(format!("www.{domain}"));
        }
        let (mut hostnames, current) = self.hostnames_of(service).await?;
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !hostnames.contains(n))
            .cloned()
            .collect();
        let started = if missing.is_empty() {
            Started {
                service: service.to_owned(),
                revision: current,
                operation: None,
                note: Some(format!(
                    "{} already answers on {}",
                    service,
                    names.join(", ")
                )),
            }
        } else {
            hostnames.extend(missing);
            self.update(service, json!({ "hostnames": hostnames }))
                .await?
        };
        let acme = tls.acme.config();
        let configured = !acme.public_addresses.is_empty();
        let addresses = if configured {
            acme.public_addresses.clone()
        } else {
            dns::interface_addresses()
        };
        let cname_target = self
            .base_domain
            .as_deref()
            .map(|base| format!("{service}.{base}"));
        let records = names
            .iter()
            .flat_map(|n| dns::records(n, &addresses, cname_target.as_deref()))
            .collect();
        let mut checks = Vec::new();
        let ask = acme.enabled || acme.resolver.is_some();
        if ask && let Some(checker) = tls.acme.dns() {
            for name in &names {
                checks.push(checker.check(name).await);
            }
        }
        tls.acme.wake();
        Ok(DomainAdded {
            names,
            records,
            addresses_configured: configured,
            checks,
            acme: acme.enabled,
            started,
        })
    }

    /// Removes `domain` (and `www.<domain>` when the service has it); its certificate is
    /// revoked once no service answers on its names.
    pub async fn remove_domain(&self, service: &str, domain: &str) -> Result<Started, ApiError> {
        let tls = self.tls_control()?;
        let domain = check_domain(domain)?;
        let (hostnames, _) = self.hostnames_of(service).await?;
        if !hostnames.contains(&domain) {
            return Err(ApiError::not_found(format!(
                "{domain} is not a domain of service {service} (it has: {})",
                if hostnames.is_empty() {
                    "none".to_owned()
                } else {
                    hostnames.join(", ")
                }
            )));
        }
        let www = format!("www.{domain}");
        let kept: Vec<String> = hostnames
            .into_iter()
            .filter(|h| *h != domain && *h != www)
            .collect();
        let started = self.update(service, json!({ "hostnames": kept })).await?;
        tls.acme.wake();
        Ok(started)
    }

    /// Every name that wants a certificate, with its status; `service` narrows it.
    pub async fn list_domains(&self, service: Option<&str>) -> Result<Vec<NameView>, ApiError> {
        let tls = self.tls_control()?;
        if let Some(name) = service {
            let owned = name.to_owned();
            self.blocking(move |s| s.get_service(&owned)).await?;
        }
        tls.acme
            .refresh_wanted()
            .await
            .map_err(|e| ApiError::internal(format!("which names are wanted: {e}")))?;
        let mut views = tls.acme.views();
        if let Some(name) = service {
            views.retain(|v| v.service == name);
        }
        Ok(views)
    }

    /// Every certificate held.
    pub fn list_certificates(&self) -> Result<Value, ApiError> {
        let tls = self.tls_control()?;
        let now = Utc::now();
        let list: Vec<Value> = tls
            .certificates
            .list()
            .into_iter()
            .map(|(source, id, c)| {
                json!({
                    "source": source,
                    "id": id,
                    "names": c.names,
                    "not_before": c.not_before.to_rfc3339(),
                    "not_after": c.not_after.to_rfc3339(),
                    "expired": c.not_after <= now,
                    "file": c.source.display().to_string(),
                    "ocsp": c.stapled,
                })
            })
            .collect();
        Ok(Value::Array(list))
    }

    /// Checks and serves an operator's certificate; nothing changes when it is bad.
    pub async fn put_certificate(&self, id: &str, body: PutCertificate) -> Result<Value, ApiError> {
        let tls = self.tls_control()?;
        check_id(id)?;
        let api_dir = tls.api_dir.clone();
        let id_owned = id.to_owned();
        let served = tokio::task::spawn_blocking(move || -> Result<Certificate, ApiError> {
            let internal = |e: crate::acme::AcmeError| ApiError::internal(e.to_string());
            // A staging directory of its own: two uploads for one id never mix their files.
            let mut nonce = [0u8; 6];
            let _ = getrandom::fill(&mut nonce);
            let staging = api_dir.join(format!(".{id_owned}.{}", hex::encode(nonce)));
            crate::acme::files::make_private_dir(&staging).map_err(internal)?;
            let files =
                CertificateFiles::new(staging.join("fullchain.pem"), staging.join("key.pem"));
            let written = crate::acme::files::write_private(&files.cert, body.cert.as_bytes())
                .and_then(|()| crate::acme::files::write_private(&files.key, body.key.as_bytes()));
            if let Err(e) = written {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(internal(e));
            }
            let checked = Certificate::load(&files, Utc::now()).and_then(|c| match &body.names {
                Some(n) => c.restrict_to(n),
                None => Ok(c),
            });
            let certificate = match checked {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(certificate_error(&e, &files));
                }
            };
            let dir = api_dir.join(&id_owned);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&staging, &dir).map_err(|e| {
                let _ = std::fs::remove_dir_all(&staging);
                ApiError::internal(format!("store the certificate: {e}"))
            })?;
            Ok(Certificate {
                source: dir.join("fullchain.pem"),
                ..certificate
            })
        })
        .await
        .map_err(|e| ApiError::internal(format!("certificate task: {e}")))??;
        let names = served.names.clone();
        let not_after = served.not_after;
        tls.certificates.put_api(id, served);
        tls.acme.wake();
        Ok(json!({ "id": id, "names": names, "not_after": not_after.to_rfc3339() }))
    }

    pub async fn delete_certificate(&self, id: &str) -> Result<(), ApiError> {
        let tls = self.tls_control()?;
        check_id(id)?;
        if !tls.certificates.remove_api(id) {
            return Err(ApiError::not_found(format!(
                "no certificate {id} (see lull cert list)"
            )));
        }
        let dir = tls.api_dir.join(id);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        tls.acme.wake();
        Ok(())
    }

    /// Reads `[tls]`'s files again (renewed by another tool): all good, or nothing changes.
    pub async fn reload_certificates(&self) -> Result<Value, ApiError> {
        let tls = self.tls_control()?;
        let certificates = tls.certificates.clone();
        let config = tls.config.clone();
        let count = tokio::task::spawn_blocking(move || certificates.reload(&config))
            .await
            .map_err(|e| ApiError::internal(format!("reload task: {e}")))?
            .map_err(|e| field("tls.certificates", e.to_string()))?;
        tls.acme.wake();
        Ok(json!({ "reloaded": count }))
    }
}

/// A refused upload as a field error: `cert`, `key` or `names` by what is wrong, the staging
/// paths (meaningless to the caller) replaced by those field names.
fn certificate_error(e: &lull_proxy::tls::CertificateError, files: &CertificateFiles) -> ApiError {
    use lull_proxy::tls::CertificateError as E;
    let on_key = |path: &std::path::Path| path == files.key;
    let name = match e {
        E::Read { path, .. }
        | E::NotPem { path, .. }
        | E::Pem { path, .. }
        | E::UnsupportedKey { path, .. }
            if on_key(path) =>
        {
            "key"
        }
        E::KeyMismatch { .. } => "key",
        E::NameNotCovered { .. } => "names",
        _ => "cert",
    };
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    let text = text
        .replace(&files.cert.display().to_string(), "cert")
        .replace(&files.key.display().to_string(), "key");
    field(name, text)
}

/// Loads the certificates kept under `<data>/certs` (uploaded through the API) into
/// `certificates`; a bad one is logged and skipped.
pub fn load_api_certificates(certificates: &Certificates, api_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(api_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        let dir = entry.path();
        let files = CertificateFiles::new(dir.join("fullchain.pem"), dir.join("key.pem"));
        match Certificate::load(&files, Utc::now()) {
            Ok(c) => certificates.put_api(&id, c),
            Err(e) => tracing::warn!(id, "stored certificate not served: {e}"),
        }
    }
}

/// The source tag `lull cert list` shows.
pub fn source_name(source: Source) -> &'static str {
    match source {
        Source::Config => "config",
        Source::Api => "api",
        Source::Acme => "acme",
    }
}

/// Builds the HTTPS side of the control plane: the API's stored certificates loaded into
/// `certificates`, the ACME manager (answering challenges through `http01` and the
/// certificate store, events into `store`) and its task, which runs until aborted.
pub fn start_tls(
    config: &crate::config::DaemonConfig,
    store: Arc<dyn crate::store::Store>,
    certificates: Arc<Certificates>,
    http01: Arc<lull_proxy::tls::Http01Challenges>,
) -> Result<(Arc<TlsControl>, tokio::task::JoinHandle<()>), String> {
    use crate::acme::challenges::{Dns01Journal, ProxyChallenges};
    use crate::acme::files::AcmeDir;
    use crate::acme::issuer::AcmeIssuer;

    let api_dir = config.data_dir.join("certs");
    crate::acme::files::make_private_dir(&api_dir).map_err(|e| e.to_string())?;
    load_api_certificates(&certificates, &api_dir);
    let dir = AcmeDir::open(&config.data_dir).map_err(|e| e.to_string())?;
    let challenges = Arc::new(ProxyChallenges {
        http01,
        store: certificates.store().clone(),
        dns01_hook: config.acme.dns01_hook.clone(),
        dns01_journal: Dns01Journal::new(dir.root().join("dns01-presented.json")),
    });
    let issuer = Arc::new(AcmeIssuer::new(
        config.acme.clone(),
        dir.clone(),
        challenges.clone(),
    ));
    // DNS is asked only when ACME is on or a resolver is named: a daemon with ACME off sends
    // no query anywhere.
    let dns = if config.acme.enabled || config.acme.resolver.is_some() {
        Some(crate::acme::dns::DnsChecker::new(
            config.acme.resolver,
            config.acme.public_addresses.clone(),
        )?)
    } else {
        None
    };
    let base_domain = config.base_domain.clone();
    // With a DNS-01 hook the base domain gets one wildcard certificate (under the pseudo
    // service `*`), and services' names under it need none of their own.
    let wildcard = config
        .base_domain
        .as_ref()
        .filter(|_| config.acme.dns01_hook.is_some())
        .map(|base| format!("*.{base}"));
    let wanted_store = store.clone();
    let wanted: crate::acme::manager::WantedSource = Arc::new(move || {
        let store = wanted_store.clone();
        let base_domain = base_domain.clone();
        let wildcard = wildcard.clone();
        Box::pin(async move {
            let records = tokio::task::spawn_blocking(move || store.list_services())
                .await
                .map_err(|e| format!("store task: {e}"))?
                .map_err(|e| format!("the state store: {e}"))?;
            let mut wanted: Vec<(String, Vec<String>)> = Vec::new();
            if let Some(wildcard) = &wildcard {
                wanted.push((
                    crate::acme::manager::WILDCARD_OWNER.to_owned(),
                    vec![wildcard.clone()],
                ));
            }
            for record in &records {
                let spec = Control::current_spec(record).map_err(|e| e.message)?;
                let names: Vec<String> = spec
                    .hostnames(base_domain.as_deref())
                    .into_iter()
                    .filter(|h| h != "localhost" && !h.ends_with(".localhost"))
                    .filter(|h| {
                        wildcard
                            .as_ref()
                            .is_none_or(|w| !crate::certs::covers(std::slice::from_ref(w), h))
                    })
                    .collect();
                wanted.push((record.name.clone(), names));
            }
            Ok(wanted)
        })
    });
    let events_store = store.clone();
    let events: crate::acme::manager::EventSink = Arc::new(move |event| {
        let store = events_store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.append_event(&event) {
                tracing::warn!(service = event.service, "record event: {e}");
            }
        });
    });
    let acme = AcmeManager::new(
        config.acme.clone(),
        dir,
        issuer,
        dns,
        certificates.clone(),
        wanted,
        events,
    );
    let manager = acme.clone();
    let task = tokio::spawn(async move {
        // Before any new order: what a killed predecessor left in DNS goes first.
        if challenges.dns01_hook.is_some() {
            challenges.withdraw_leftovers().await;
        }
        manager.run().await
    });
    Ok((
        Arc::new(TlsControl {
            certificates,
            acme,
            api_dir,
            config: config.tls.clone(),
        }),
        task,
    ))
}
