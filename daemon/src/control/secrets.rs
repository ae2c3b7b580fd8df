//! Secrets and registry credentials through the admin API: set, list and delete, values sealed
//! with the daemon's key (see `crate::secrets`) and never answered back.
//!
//! Setting a secret that services use makes a new revision of each (same spec, cause
//! `secret NAME changed`) and deploys it, since the planner opens secrets when a revision
//! starts. A secret a service's current revision uses cannot be deleted. Registry credentials
//! are a JSON `{"username", "password"}` sealed under `registry/HOST`, opened when the host pulls
//! an image from that registry.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::{ACTIVE, Control, PAUSED};
use crate::api::{ApiError, ErrorCode, FieldError};
use crate::secrets::{Redactor, SecretKey, registry_credential_label, validate_secret_name};
use crate::spec::{self, ServiceSpec};
use crate::store::{RegistryCredentialRecord, SecretRecord, ServiceRecord, Store, StoreError};

/// The longest secret value accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// The longest registry host accepted.
const MAX_HOST_LEN: usize = 255;

/// A secret as the API shows it: never its value.
#[derive(Debug, Serialize)]
pub struct SecretView {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
    /// Services whose current definition uses it, by name.
    pub used_by: Vec<String>,
}

/// What a service got when a secret it uses was set.
#[derive(Debug, Serialize)]
pub struct SecretRollout {
    pub service: String,
    /// The new revision, when one was made.
    pub revision: Option<u64>,
    /// The deploy started, when one was.
    pub operation: Option<String>,
    /// Why nothing (or not everything) happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What `PUT /v1/secrets/{name}` answers.
#[derive(Debug, Serialize)]
pub struct SecretSet {
    #[serde(flatten)]
    pub secret: SecretView,
    /// True when the secret did not exist before.
    pub created: bool,
    /// True when the value is the one it already had (nothing redeployed).
    pub unchanged: bool,
    /// One entry per service using the secret.
    pub deploys: Vec<SecretRollout>,
}

/// A registry's credentials as the API shows them: never the password.
#[derive(Debug, Serialize)]
pub struct RegistryView {
    pub host: String,
    pub username: String,
    pub created_at: String,
    pub updated_at: String,
}

/// The sealed form of a registry's credentials.
#[derive(Serialize, Deserialize)]
struct RegistryBlob {
    username: String,
    password: String,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(vec![FieldError {
        field: field.to_owned(),
        message: message.into(),
    }])
}

/// The registry host under which credentials are kept: lowercase, Docker Hub's aliases as
/// `docker.io` (how image references name it).
pub fn normalize_registry_host(host: &str) -> Result<String, ApiError> {
    let host = host.trim().to_ascii_lowercase();
    if host.is_empty() {
        return Err(invalid("host", "a registry host is required"));
    }
    if host.len() > MAX_HOST_LEN {
        return Err(invalid(
            "host",
            format!("{host:?} is longer than {MAX_HOST_LEN} characters"),
        ));
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        || host.starts_with(['-', '.', ':'])
    {
        return Err(invalid(
            "host",
            format!(
                "{host:?} is not a registry host (HOST or HOST:PORT, e.g. ghcr.io or 127.0.0.1:5000)"
            ),
        ));
    }
    Ok(match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    })
}

/// The names of the secrets a spec uses.
fn secrets_of(doc: &Value) -> BTreeSet<String> {
    match serde_json::from_value::<ServiceSpec>(doc.clone()) {
        Ok(spec) => spec.secrets.into_iter().map(|s| s.secret).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Opens a registry's sealed credentials.
fn open_registry(
    key: &SecretKey,
    record: &RegistryCredentialRecord,
) -> Result<RegistryBlob, String> {
    let label = registry_credential_label(&record.registry);
    let value = key
        .open(&label, &record.ciphertext)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(value.as_bytes())
        .map_err(|_| format!("credentials of {}: not what lull stores", record.registry))
}

/// A lookup of stored registry credentials for the host: `(username, password)` for a registry
/// host (`host[:port]`, `docker.io`), or `None`. Blocking (it reads the store).
pub fn registry_credentials(
    store: Arc<dyn Store>,
    key: Arc<SecretKey>,
) -> impl Fn(&str) -> Option<(String, String)> + Send + Sync + 'static {
    move |host: &str| {
        let host = normalize_registry_host(host).ok()?;
        let record = match store.get_registry_credential(&host) {
            Ok(r) => r,
            Err(StoreError::NotFound { .. }) => return None,
            Err(e) => {
                tracing::warn!(registry = %host, "read registry credentials: {e}");
                return None;
            }
        };
        match open_registry(&key, &record) {
            Ok(blob) => Some((blob.username, blob.password)),
            Err(e) => {
                tracing::warn!(registry = %host, "registry credentials: {e}");
                None
            }
        }
    }
}

/// A redactor of every secret's value (those that open with `key`), for code off the async
/// threads (it may read the store). It comes from the key's cache, rebuilt only after a secret
/// was set or removed through [`Control`] (which invalidates it), opening only changed secrets.
pub fn secrets_redactor(store: &dyn Store, key: &SecretKey) -> Redactor {
    let cache = key.redactors();
    // Read before listing: a change made meanwhile leaves this build stale, not lost.
    let generation = cache.generation();
    if let Some(redactor) = cache.current(generation) {
        return redactor;
    }
    match store.list_secrets() {
        Ok(records) => cache.rebuild(
            key,
            generation,
            records.into_iter().map(|r| (r.name, r.ciphertext)),
        ),
        Err(e) => {
            tracing::warn!("list secrets to redact: {e}");
            Redactor::new()
        }
    }
}

/// Replaces every string in `value` that holds a known secret value.
pub fn redact_json(redactor: &Redactor, value: &mut Value) {
    if redactor.is_empty() {
        return;
    }
    match value {
        Value::String(s) => {
            if let std::borrow::Cow::Owned(r) = redactor.redact(s) {
                *s = r;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact_json(redactor, v)),
        Value::Object(map) => map.values_mut().for_each(|v| redact_json(redactor, v)),
        _ => {}
    }
}

impl Control {
    fn key(&self) -> Result<Arc<SecretKey>, ApiError> {
        self.key.clone().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unavailable,
                "this daemon has no secrets key: it cannot keep secrets",
            )
        })
    }

    /// Each service with the secrets its current definition and current revision use.
    async fn secret_users(&self) -> Result<Vec<(ServiceRecord, BTreeSet<String>)>, ApiError> {
        self.blocking(|s| {
            let mut out = Vec::new();
            for record in s.list_services()? {
                let mut used = secrets_of(&record.doc);
                if let Some(number) = record.current_revision {
                    match s.get_revision(&record.name, number) {
                        Ok(revision) => used.extend(secrets_of(&revision.doc)),
                        Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                out.push((record, used));
            }
            Ok(out)
        })
        .await
    }

    fn secret_view(
        record: &SecretRecord,
        users: &[(ServiceRecord, BTreeSet<String>)],
    ) -> SecretView {
        SecretView {
            name: record.name.clone(),
            created_at: record.created_at.to_string(),
            updated_at: record.updated_at.to_string(),
            used_by: users
                .iter()
                .filter(|(_, used)| used.contains(&record.name))
                .map(|(r, _)| r.name.clone())
                .collect(),
        }
    }

    /// Every secret, by name, with the services using it; never values.
    pub async fn list_secrets(&self) -> Result<Vec<SecretView>, ApiError> {
        let records = self.blocking(|s| s.list_secrets()).await?;
        let users = self.secret_users().await?;
        Ok(records
            .iter()
            .map(|r| Self::secret_view(r, &users))
            .collect())
    }

    /// Creates or replaces secret `name`; each service using it gets a new revision, deployed.
    pub async fn set_secret(
        &self,
        name: &str,
        value: Zeroizing<String>,
    ) -> Result<SecretSet, ApiError> {
        validate_secret_name(name).map_err(|e| invalid("name", e.to_string()))?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(invalid(
                "value",
                format!(
                    "secret {name}: the value is {} bytes, more than {MAX_SECRET_BYTES}",
                    value.len()
                ),
            ));
        }
        let key = self.key()?;
        let owned = name.to_owned();
        let previous = match self.blocking(move |s| s.get_secret(&owned)).await {
            Ok(r) => Some(r),
            Err(e) if e.code == ErrorCode::NotFound => None,
            Err(e) => return Err(e),
        };
        let unchanged = previous
            .as_ref()
            .and_then(|p| key.open(name, &p.ciphertext).ok())
            .is_some_and(|old| old.as_bytes() == value.as_bytes());
        let sealed = key
            .seal(name, value.as_bytes())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        drop(value);
        let owned = name.to_owned();
        let stored = self.blocking(move |s| s.put_secret(&owned, &sealed)).await;
        // Stale either way: the write may have happened before an error was reported.
        key.redactors().invalidate();
        let record = stored?;
        tracing::info!(secret = name, "secret set");
        let users = self.secret_users().await?;
        let mut deploys = Vec::new();
        for (service, used) in &users {
            if !used.contains(name) {
                continue;
            }
            let rollout = if unchanged {
                SecretRollout {
                    service: service.name.clone(),
                    revision: None,
                    operation: None,
                    note: Some("the value did not change: no new revision".into()),
                }
            } else {
                self.roll_out_secret(service, name).await
            };
            deploys.push(rollout);
        }
        Ok(SecretSet {
            secret: Self::secret_view(&record, &users),
            created: previous.is_none(),
            unchanged,
            deploys,
        })
    }

    /// A new revision of `service` (same spec) because secret `name` changed, deployed unless
    /// the service is paused. Failures are told in the note, not returned: the secret is set.
    async fn roll_out_secret(&self, service: &ServiceRecord, name: &str) -> SecretRollout {
        let mut rollout = SecretRollout {
            service: service.name.clone(),
            revision: None,
            operation: None,
            note: None,
        };
        let spec = match Self::current_spec(service) {
            Ok(s) => s,
            Err(e) => {
                rollout.note = Some(e.message);
                return rollout;
            }
        };
        let committed = match self
            .commit(
                service,
                spec.to_json(),
                spec::secret_changed_cause(name),
                "service.updated",
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                rollout.note = Some(format!("no new revision: {}", e.message));
                return rollout;
            }
        };
        rollout.revision = Some(committed.number);
        if service.state == PAUSED {
            rollout.note = Some(format!(
                "the service is paused: revision {} is current; deploy it once resumed",
                committed.number
            ));
            return rollout;
        }
        if service.state != ACTIVE {
            rollout.note = Some(format!("the service is {}: not deployed", service.state));
            return rollout;
        }
        match self.deploy_revision(&service.name, committed.number).await {
            Ok(started) => rollout.operation = started.operation,
            Err(e) => rollout.note = Some(format!("not deployed: {}", e.message)),
        }
        rollout
    }

    /// Deletes secret `name`, unless a service's current revision uses it.
    pub async fn delete_secret(&self, name: &str) -> Result<(), ApiError> {
        validate_secret_name(name).map_err(|e| invalid("name", e.to_string()))?;
        let users: Vec<String> = self
            .secret_users()
            .await?
            .into_iter()
            .filter(|(_, used)| used.contains(name))
            .map(|(r, _)| r.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "secret {name} is used by {} {}: remove it from their secrets first",
                    if users.len() == 1 {
                        "service"
                    } else {
                        "services"
                    },
                    users.join(", ")
                ),
            ));
        }
        let owned = name.to_owned();
        let deleted = self.blocking(move |s| s.delete_secret(&owned)).await;
        if let Some(key) = &self.key {
            key.redactors().invalidate();
        }
        deleted?;
        tracing::info!(secret = name, "secret deleted");
        Ok(())
    }

    /// Runs a store call off the async threads, returning the store's own error.
    async fn blocking_raw<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Result<T, StoreError>, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| ApiError::internal(format!("store task: {e}")))
    }

    /// A redactor for every stored secret's value (those that open with this key), from the
    /// key's cache (see [`secrets_redactor`]).
    pub async fn redactor(&self) -> Redactor {
        let Some(key) = self.key.clone() else {
            return Redactor::new();
        };
        if let Some(redactor) = key.redactors().current(key.redactors().generation()) {
            return redactor;
        }
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || secrets_redactor(store.as_ref(), &key))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!("redactor task: {e}");
                Redactor::new()
            })
    }

    /// Stores credentials for a registry host; answers the host and username.
    pub async fn registry_login(
        &self,
        host: &str,
        username: &str,
        password: Zeroizing<String>,
    ) -> Result<RegistryView, ApiError> {
        let host = normalize_registry_host(host)?;
        let mut fields = Vec::new();
        if username.is_empty() || username.contains(':') || username.chars().any(char::is_control) {
            fields.push(FieldError {
                field: "username".into(),
                message: "a username is required, without ':' or control characters".into(),
            });
        }
        if password.is_empty() {
            fields.push(FieldError {
                field: "password".into(),
                message: "a password (or token) is required".into(),
            });
        }
        if password.len() > MAX_SECRET_BYTES {
            fields.push(FieldError {
                field: "password".into(),
                message: format!("longer than {MAX_SECRET_BYTES} bytes"),
            });
        }
        if !fields.is_empty() {
            return Err(ApiError::invalid(fields));
        }
        let key = self.key()?;
        let blob = Zeroizing::new(
            serde_json::to_vec(&RegistryBlob {
                username: username.to_owned(),
                password: password.to_string(),
            })
            .map_err(|e| ApiError::internal(format!("encode credentials: {e}")))?,
        );
        drop(password);
        let sealed = key
            .seal(&registry_credential_label(&host), &blob)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let owned = host.clone();
        let record = self
            .blocking(move |s| s.put_registry_credential(&owned, &sealed))
            .await?;
        tracing::info!(registry = %host, username, "registry credentials stored");
        Ok(RegistryView {
            host,
            username: username.to_owned(),
            created_at: record.created_at.to_string(),
            updated_at: record.updated_at.to_string(),
        })
    }

    /// Every registry with stored credentials: hosts and usernames only.
    pub async fn list_registries(&self) -> Result<Vec<RegistryView>, ApiError> {
        let key = self.key()?;
        let records = self.blocking(|s| s.list_registry_credentials()).await?;
        Ok(records
            .into_iter()
            .map(|record| {
                let username = match open_registry(&key, &record) {
                    Ok(blob) => blob.username,
                    Err(e) => format!("(unreadable: {e})"),
                };
                RegistryView {
                    host: record.registry,
                    username,
                    created_at: record.created_at.to_string(),
                    updated_at: record.updated_at.to_string(),
                }
            })
            .collect())
    }

    pub async fn registry_logout(&self, host: &str) -> Result<Value, ApiError> {
        let host = normalize_registry_host(host)?;
        let owned = host.clone();
        self.blocking_raw(move |s| s.delete_registry_credential(&owned))
            .await?
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    ApiError::not_found(format!("no credentials stored for registry {host}"))
                }
                other => super::store_error(other),
            })?;
        tracing::info!(registry = %host, "registry credentials removed");
        Ok(json!({ "deleted": host }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_hosts_are_normalized_and_checked() {
        assert_eq!(normalize_registry_host("GHCR.io").unwrap(), "ghcr.io");
        assert_eq!(
            normalize_registry_host("127.0.0.1:5000").unwrap(),
            "127.0.0.1:5000"
        );
        assert_eq!(
            normalize_registry_host("index.docker.io").unwrap(),
            "docker.io"
        );
        for bad in ["", "a/b", "-x", "a b", "x@y"] {
            let e = normalize_registry_host(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
            assert_eq!(e.fields[0].field, "host", "{bad}");
        }
    }

    #[test]
    fn json_strings_holding_a_secret_are_redacted() {
        let redactor = Redactor::with_values([&crate::secrets::SecretValue::from("hunter2")]);
        let mut value = json!({"a": ["x hunter2 y", 3], "b": {"c": "hunter2"}, "d": "clean"});
        redact_json(&redactor, &mut value);
        assert_eq!(
            value,
            json!({"a": ["x [redacted] y", 3], "b": {"c": "[redacted]"}, "d": "clean"})
        );
    }

    #[test]
    fn the_redactor_is_cached_until_a_secret_changes_and_reopens_only_changes() {
        let store = crate::store::MemStore::new();
        let key = SecretKey::from_bytes(&[7; 32]);
        let put = |name: &str, value: &str| {
            store
                .put_secret(name, &key.seal(name, value.as_bytes()).unwrap())
                .unwrap();
            key.redactors().invalidate();
        };
        put("db", "hunter2");
        put("api", "tok-123");
        let r = secrets_redactor(&store, &key);
        assert_eq!(r.redact("x hunter2 tok-123"), "x [redacted] [redacted]");
        assert_eq!(key.opens(), 2);
        // Event after event: no decryption at all.
        for _ in 0..5 {
            let r = secrets_redactor(&store, &key);
            assert_eq!(r.redact("hunter2"), "[redacted]");
        }
        assert_eq!(key.opens(), 2);
        // One secret set: only it is opened again; its old value is no longer redacted.
        put("db", "swordfish");
        let r = secrets_redactor(&store, &key);
        assert_eq!(key.opens(), 3);
        assert_eq!(
            r.redact("hunter2 swordfish tok-123"),
            "hunter2 [redacted] [redacted]"
        );
        // One removed: nothing opened, its value no longer redacted.
        store.delete_secret("api").unwrap();
        key.redactors().invalidate();
        let r = secrets_redactor(&store, &key);
        assert_eq!(key.opens(), 3);
        assert_eq!(r.redact("swordfish tok-123"), "[redacted] tok-123");
        // Without an invalidation the cache is what is used (the store is not even read).
        store
            .put_secret("late", &key.seal("late", b"unseen").unwrap())
            .unwrap();
        assert_eq!(secrets_redactor(&store, &key).redact("unseen"), "unseen");
        assert_eq!(key.opens(), 3);
    }

    #[test]
    fn secrets_of_reads_a_specs_refs() {
        let doc = json!({
            "name": "web",
            "source": {"type": "image", "reference": "fake/app:1"},
            "secrets": [{"secret": "db", "env": "DB"}, {"secret": "api", "env": "API"}],
        });
        let spec = ServiceSpec::from_json(&doc.to_string()).unwrap();
        let names = secrets_of(&spec.to_json());
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["api", "db"]);
    }
}
