//! Registry credentials: explicit ones, or read from a Docker-style `config.json`.
//!
//! Supported: `auths.<registry>.auth` (base64 `user:password`) and
//! `auths.<registry>.username`/`password`. Credential helpers (`credHelpers`, `credsStore`) and
//! identity tokens are not: asking for credentials they hold is an error naming them.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::reference::{DOCKER_HUB, DOCKER_HUB_API_HOST};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read docker config {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("docker config {path} is not valid json")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("docker config {path}: auths.{key}.auth is not valid base64 of \"user:password\"")]
    BadAuthField { path: PathBuf, key: String },
    #[error(
        "docker config {path}: credentials for {registry} are kept by credential helper \
         {helper:?} (docker-credential-{helper}), which lull does not support; put them in \
         auths.{registry}.auth or pass them explicitly"
    )]
    CredentialHelper {
        path: PathBuf,
        registry: String,
        helper: String,
    },
    #[error(
        "docker config {path}: auths.{key} holds only an identity token, which lull does not \
         support; use a username and password"
    )]
    IdentityToken { path: PathBuf, key: String },
}

/// A username and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    auths: BTreeMap<String, RawAuth>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// A parsed Docker `config.json`.
pub struct DockerConfig {
    path: PathBuf,
    raw: RawConfig,
}

impl DockerConfig {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<DockerConfig, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        DockerConfig::parse(&bytes, path)
    }

    /// Parses `bytes`; `path` names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<DockerConfig, AuthError> {
        let raw = serde_json::from_slice(bytes).map_err(|source| AuthError::Parse {
            path: path.to_owned(),
            source,
        })?;
        Ok(DockerConfig {
            path: path.to_owned(),
            raw,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub), if any.
    pub fn credentials_for(&self, registry: &str) -> Result<Option<Credentials>, AuthError> {
        let wanted = registry_aliases(registry);
        let matches = |key: &str| {
            wanted
                .iter()
                .any(|w| w.eq_ignore_ascii_case(&normalise_key(key)))
        };

        if let Some((_, helper)) = self.raw.cred_helpers.iter().find(|(k, _)| matches(k)) {
            return Err(AuthError::CredentialHelper {
                path: self.path.clone(),
                registry: registry.to_owned(),
                helper: helper.clone(),
            });
        }
        let Some((key, entry)) = self.raw.auths.iter().find(|(k, _)| matches(k)) else {
            return Ok(None);
        };
        if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let bad = || AuthError::BadAuthField {
                path: self.path.clone(),
                key: key.clone(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| bad())?;
            let text = String::from_utf8(decoded).map_err(|_| bad())?;
            let (username, password) = text.split_once(':').ok_or_else(bad)?;
            return Ok(Some(Credentials::new(username, password)));
        }
        if let (Some(username), Some(password)) = (&entry.username, &entry.password)
            && !username.is_empty()
        {
            return Ok(Some(Credentials::new(username, password)));
        }
        if entry
            .identitytoken
            .as_deref()
            .is_some_and(|t| !t.is_empty())
        {
            return Err(AuthError::IdentityToken {
                path: self.path.clone(),
                key: key.clone(),
            });
        }
        // An empty entry next to a credsStore means the store holds the secret.
        if let Some(helper) = &self.raw.creds_store {
            return Err(AuthError::CredentialHelper {
                path: self.path.clone(),
                registry: registry.to_owned(),
                helper: helper.clone(),
            });
        }
        Ok(None)
    }
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `http://host:5000` → `host:5000`.
fn normalise_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    key.split('/').next().unwrap_or(key).to_owned()
}

fn registry_aliases(registry: &str) -> Vec<&str> {
    if registry == DOCKER_HUB || registry == DOCKER_HUB_API_HOST {
        vec![DOCKER_HUB, DOCKER_HUB_API_HOST, "registry-1.docker.io"]
    } else {
        vec![registry]
    }
}

/// The config files consulted when no explicit path is given, in order:
/// `$DOCKER_CONFIG/config.json`, then `$HOME/.docker/config.json`.
pub fn default_docker_config_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        paths.push(PathBuf::from(dir).join("config.json"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        paths.push(PathBuf::from(home).join(".docker").join("config.json"));
    }
    paths
}

/// Finds credentials for `registry`: an explicit `path` must exist; otherwise the first default
/// path that exists is read (a missing default file means no credentials).
pub fn lookup_credentials(
    registry: &str,
    explicit_path: Option<&Path>,
    search_defaults: bool,
) -> Result<Option<Credentials>, AuthError> {
    if let Some(path) = explicit_path {
        return DockerConfig::load(path)?.credentials_for(registry);
    }
    if !search_defaults {
        return Ok(None);
    }
    for path in default_docker_config_paths() {
        match std::fs::read(&path) {
            Ok(bytes) => return DockerConfig::parse(&bytes, &path)?.credentials_for(registry),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuthError::Read { path, source }),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> DockerConfig {
        DockerConfig::parse(json.as_bytes(), Path::new("config.json")).unwrap()
    }

    #[test]
    fn reads_auth_field_and_username_password() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3:cr3t");
        let c = config(&format!(
            r#"{{"auths":{{
                "https://index.docker.io/v1/":{{"auth":"{encoded}"}},
                "127.0.0.1:5000":{{"username":"bob","password":"pw"}},
                "http://reg.example:8443/":{{"auth":"{encoded}"}},
                "other.example":{{}}
            }}}}"#
        ));
        assert_eq!(
            c.credentials_for("docker.io").unwrap(),
            Some(Credentials::new("alice", "s3:cr3t"))
        );
        assert_eq!(
            c.credentials_for("127.0.0.1:5000").unwrap(),
            Some(Credentials::new("bob", "pw"))
        );
        assert_eq!(
            c.credentials_for("reg.example:8443").unwrap(),
            Some(Credentials::new("alice", "s3:cr3t"))
        );
        // A different port is a different registry.
        assert_eq!(c.credentials_for("127.0.0.1:5001").unwrap(), None);
        assert_eq!(c.credentials_for("other.example").unwrap(), None);
        assert_eq!(c.credentials_for("ghcr.io").unwrap(), None);
    }

    #[test]
    fn rejects_bad_auth_field_naming_the_key() {
        let c = config(r#"{"auths":{"ghcr.io":{"auth":"!!!not base64"}}}"#);
        let err = c.credentials_for("ghcr.io").unwrap_err();
        assert!(matches!(err, AuthError::BadAuthField { ref key, .. } if key == "ghcr.io"));
        assert!(err.to_string().contains("auths.ghcr.io.auth"), "{err}");
        let no_colon = base64::engine::general_purpose::STANDARD.encode("nocolon");
        let c = config(&format!(
            r#"{{"auths":{{"ghcr.io":{{"auth":"{no_colon}"}}}}}}"#
        ));
        assert!(matches!(
            c.credentials_for("ghcr.io"),
            Err(AuthError::BadAuthField { .. })
        ));
    }

    #[test]
    fn credential_helpers_are_a_clear_error() {
        let c = config(r#"{"credHelpers":{"ghcr.io":"gh"},"auths":{}}"#);
        let err = c.credentials_for("ghcr.io").unwrap_err();
        assert!(
            matches!(err, AuthError::CredentialHelper { ref helper, .. } if helper == "gh"),
            "{err}"
        );
        assert!(err.to_string().contains("docker-credential-gh"), "{err}");
        assert_eq!(c.credentials_for("quay.io").unwrap(), None);

        // credsStore with the registry listed (empty entry) names the store.
        let c = config(r#"{"credsStore":"desktop","auths":{"ghcr.io":{}}}"#);
        let err = c.credentials_for("ghcr.io").unwrap_err();
        assert!(
            matches!(err, AuthError::CredentialHelper { ref helper, .. } if helper == "desktop")
        );
        // ...but an unlisted registry is simply anonymous.
        assert_eq!(c.credentials_for("quay.io").unwrap(), None);

        let c = config(r#"{"auths":{"ghcr.io":{"identitytoken":"tok"}}}"#);
        assert!(matches!(
            c.credentials_for("ghcr.io"),
            Err(AuthError::IdentityToken { .. })
        ));
    }

    #[test]
    fn explicit_path_must_exist_and_parse() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        assert!(matches!(
            lookup_credentials("ghcr.io", Some(&missing), true),
            Err(AuthError::Read { .. })
        ));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{not json").unwrap();
        let err = lookup_credentials("ghcr.io", Some(&bad), true).unwrap_err();
        assert!(matches!(err, AuthError::Parse { .. }));
        assert!(err.to_string().contains("bad.json"), "{err}");
        assert_eq!(lookup_credentials("ghcr.io", None, false).unwrap(), None);
    }

    #[test]
    fn debug_redacts_password() {
        let text = format!("{:?}", Credentials::new("u", "hunter2"));
        assert!(!text.contains("hunter2"));
    }
}
