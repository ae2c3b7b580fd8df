//! Image references: `[registry[:port]/]repository[:tag][@sha256:<hex>]`.
//!
//! Follows Docker's normalisation: a first path component is a registry only when it contains a
//! `.` or a `:` or is `localhost`; otherwise the registry is `docker.io` and single-component
//! repositories get the `library/` prefix. A reference with neither tag nor digest gets the tag
//! `latest`. `docker.io` is reached at `index.docker.io`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::Digest;

/// The registry name Docker Hub references are normalised to.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's API is served from.
pub const DOCKER_HUB_API_HOST: &str = "index.docker.io";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed, normalised image reference. Always carries a tag, a digest, or both.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid registry {registry:?} in image reference {input:?}: {reason}")]
    Registry {
        input: String,
        registry: String,
        reason: &'static str,
    },
    #[error("invalid repository {repository:?} in image reference {input:?}: {reason}")]
    Repository {
        input: String,
        repository: String,
        reason: &'static str,
    },
    #[error("invalid tag {tag:?} in image reference {input:?}: {reason}")]
    Tag {
        input: String,
        tag: String,
        reason: &'static str,
    },
    #[error("invalid digest {digest:?} in image reference {input:?}: {reason}")]
    Digest {
        input: String,
        digest: String,
        reason: String,
    },
}

impl Reference {
    /// Builds a reference from parts, validating each (the registry is taken as given, so pass
    /// `docker.io` rather than an empty string for Docker Hub).
    pub fn new(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Result<Self, ReferenceError> {
        let mut text = format!("{registry}/{repository}");
        if let Some(tag) = tag {
            text.push(':');
            text.push_str(tag);
        }
        if let Some(digest) = &digest {
            text.push('@');
            text.push_str(&digest.to_string());
        }
        text.parse()
    }

    /// The registry as written (normalised): `docker.io`, `ghcr.io`, `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host[:port] to talk to: `index.docker.io` for Docker Hub, else the registry.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// The repository path, e.g. `library/alpine`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        Reference::new(&self.registry, &self.repository, Some(tag), None)
    }

    /// The same repository pinned to a digest (no tag).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The registry host without its port, lowercased (`[::1]` keeps its brackets stripped).
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// Whether the registry is a loopback host (`localhost`, `127.0.0.0/8`, `::1`).
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The `oci-client` form of this reference.
    pub fn to_oci(&self) -> oci_client::Reference {
        let registry = self.registry.clone();
        let repository = self.repository.clone();
        match (&self.tag, &self.digest) {
            (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                registry,
                repository,
                tag.clone(),
                digest.to_string(),
            ),
            (None, Some(digest)) => {
                oci_client::Reference::with_digest(registry, repository, digest.to_string())
            }
            (Some(tag), None) => oci_client::Reference::with_tag(registry, repository, tag.clone()),
            (None, None) => {
                oci_client::Reference::with_tag(registry, repository, "latest".to_owned())
            }
        }
    }
}

/// The host part of a `host[:port]` registry name, without IPv6 brackets.
pub(crate) fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_and_tag, digest) = match input.split_once('@') {
            Some((rest, digest_text)) => {
                let digest = digest_text
                    .parse::<Digest>()
                    .map_err(|e| ReferenceError::Digest {
                        input: input.to_owned(),
                        digest: digest_text.to_owned(),
                        reason: e.to_string(),
                    })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };

        // A tag follows the last ':' only when no '/' comes after it (else it is a port).
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(pos) if !name_and_tag[pos..].contains('/') => {
                (&name_and_tag[..pos], Some(&name_and_tag[pos + 1..]))
            }
            _ => (name_and_tag, None),
        };

        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = if registry == DOCKER_HUB_API_HOST || registry == "registry-1.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        validate_registry(input, &registry)?;

        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(input, &registry, &repository)?;

        if let Some(tag) = tag {
            validate_tag(input, tag)?;
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

fn validate_registry(input: &str, registry: &str) -> Result<(), ReferenceError> {
    let fail = |reason| ReferenceError::Registry {
        input: input.to_owned(),
        registry: registry.to_owned(),
        reason,
    };
    if registry.is_empty() {
        return Err(fail("registry is empty"));
    }
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| fail("unterminated '[' in IPv6 address"))?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(fail("not a valid IPv6 address"));
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(fail("unexpected characters after IPv6 address")),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Err(fail("host is empty"));
        }
        for label in host.split('.') {
            if label.is_empty() {
                return Err(fail("host has an empty label"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(fail(
                    "host may only contain letters, digits, '-' and '.' separators",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(fail("host label starts or ends with '-'"));
            }
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().map(|p| p == 0).unwrap_or(true)
    {
        return Err(fail("port is not a number between 1 and 65535"));
    }
    Ok(())
}

fn validate_repository(
    input: &str,
    registry: &str,
    repository: &str,
) -> Result<(), ReferenceError> {
    let fail = |reason| ReferenceError::Repository {
        input: input.to_owned(),
        repository: repository.to_owned(),
        reason,
    };
    if repository.is_empty() {
        return Err(fail("repository is empty"));
    }
    if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
        return Err(fail("name is longer than 255 characters"));
    }
    for component in repository.split('/') {
        if component.is_empty() {
            return Err(fail("repository has an empty path component"));
        }
        if component.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(fail("repository must be lowercase"));
        }
        if !component.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err(fail(
                "repository may only contain lowercase letters, digits, '.', '_', '-' and '/'",
            ));
        }
        let first = component.as_bytes()[0];
        let last = component.as_bytes()[component.len() - 1];
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return Err(fail(
                "each repository path component must start and end with a letter or digit",
            ));
        }
        // Separators: '.', '_', '__', or any run of '-'; never mixed or doubled otherwise.
        let bytes = component.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !bytes[i].is_ascii_alphanumeric() {
                i += 1;
            }
            let sep = &component[start..i];
            let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
            if !ok {
                return Err(fail(
                    "repository separators must be '.', '_', '__' or a run of '-'",
                ));
            }
        }
    }
    Ok(())
}

fn validate_tag(input: &str, tag: &str) -> Result<(), ReferenceError> {
    let fail = |reason| ReferenceError::Tag {
        input: input.to_owned(),
        tag: tag.to_owned(),
        reason,
    };
    if tag.is_empty() {
        return Err(fail("tag is empty"));
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(fail("tag is longer than 128 characters"));
    }
    let bytes = tag.as_bytes();
    if !(bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_') {
        return Err(fail("tag must start with a letter, digit or '_'"));
    }
    if !bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(fail(
            "tag may only contain letters, digits, '_', '.' and '-'",
        ));
    }
    Ok(())
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_valid_references() {
        let digest = format!("sha256:{HEX}");
        // (input, registry, repository, tag, digest?, canonical)
        type Row<'a> = (String, &'a str, &'a str, Option<&'a str>, bool, String);
        let table: Vec<Row> = vec![
            (
                "alpine".into(),
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
                "docker.io/library/alpine:latest".into(),
            ),
            (
                "alpine:3.20".into(),
                "docker.io",
                "library/alpine",
                Some("3.20"),
                false,
                "docker.io/library/alpine:3.20".into(),
            ),
            (
                "user/app:v1".into(),
                "docker.io",
                "user/app",
                Some("v1"),
                false,
                "docker.io/user/app:v1".into(),
            ),
            (
                "docker.io/nginx".into(),
                "docker.io",
                "library/nginx",
                Some("latest"),
                false,
                "docker.io/library/nginx:latest".into(),
            ),
            (
                "index.docker.io/library/nginx:1".into(),
                "docker.io",
                "library/nginx",
                Some("1"),
                false,
                "docker.io/library/nginx:1".into(),
            ),
            (
                "ghcr.io/org/team/app:1.2.3".into(),
                "ghcr.io",
                "org/team/app",
                Some("1.2.3"),
                false,
                "ghcr.io/org/team/app:1.2.3".into(),
            ),
            (
                "localhost/app".into(),
                "localhost",
                "app",
                Some("latest"),
                false,
                "localhost/app:latest".into(),
            ),
            (
                "127.0.0.1:5000/my-app_x/y__z:tag_1".into(),
                "127.0.0.1:5000",
                "my-app_x/y__z",
                Some("tag_1"),
                false,
                "127.0.0.1:5000/my-app_x/y__z:tag_1".into(),
            ),
            (
                "[::1]:5000/app".into(),
                "[::1]:5000",
                "app",
                Some("latest"),
                false,
                "[::1]:5000/app:latest".into(),
            ),
            (
                format!("alpine@{digest}"),
                "docker.io",
                "library/alpine",
                None,
                true,
                format!("docker.io/library/alpine@{digest}"),
            ),
            (
                format!("reg.example:443/a/b:t@{digest}"),
                "reg.example:443",
                "a/b",
                Some("t"),
                true,
                format!("reg.example:443/a/b:t@{digest}"),
            ),
        ];
        for (input, registry, repository, tag, has_digest, canonical) in table {
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry(), registry, "{input}");
            assert_eq!(r.repository(), repository, "{input}");
            assert_eq!(r.tag(), tag, "{input}");
            assert_eq!(r.digest().is_some(), has_digest, "{input}");
            assert_eq!(r.to_string(), canonical, "{input}");
            // The canonical form parses back to the same reference.
            assert_eq!(canonical.parse::<Reference>().unwrap(), r);
        }
    }

    #[test]
    fn docker_hub_api_host_and_loopback() {
        let r: Reference = "alpine".parse().unwrap();
        assert_eq!(r.api_host(), "index.docker.io");
        assert!(!r.is_loopback());
        let oci = r.to_oci();
        assert_eq!(oci.resolve_registry(), "index.docker.io");
        assert_eq!(oci.repository(), "library/alpine");
        for input in [
            "127.0.0.1:5000/a",
            "localhost:1/a",
            "[::1]:5000/a",
            "127.3.2.1/a",
        ] {
            let r: Reference = input.parse().unwrap();
            assert!(r.is_loopback(), "{input}");
        }
        let r: Reference = "10.0.0.1:5000/a".parse().unwrap();
        assert!(!r.is_loopback());
        assert_eq!(r.host(), "10.0.0.1");
    }

    #[test]
    fn rejects_invalid_references_naming_the_part() {
        let cases = [
            ("", "empty"),
            ("Alpine", "repository"),
            ("ghcr.io/Org/app", "repository"),
            ("ghcr.io//app", "repository"),
            ("ghcr.io/app-/x", "repository"),
            ("ghcr.io/a..b", "repository"),
            ("ghcr.io/a$b", "repository"),
            ("alpine:", "tag"),
            ("alpine:-x", "tag"),
            ("alpine:a/b:c", "registry"),
            ("alpine:bad!tag", "tag"),
            ("alpine@sha256:abc", "digest"),
            ("alpine@md5:abc", "digest"),
            ("reg.example:0/a", "registry"),
            ("reg.example:99999/a", "registry"),
            ("reg.example:http/a", "registry"),
            ("reg..example/a", "registry"),
            ("[::zz]:5000/a", "registry"),
            ("reg_x.example/a", "registry"),
        ];
        for (input, part) in cases {
            let err = input
                .parse::<Reference>()
                .expect_err(&format!("{input:?} should be rejected"));
            let matches = matches!(
                (&err, part),
                (ReferenceError::Empty, "empty")
                    | (ReferenceError::Registry { .. }, "registry")
                    | (ReferenceError::Repository { .. }, "repository")
                    | (ReferenceError::Tag { .. }, "tag")
                    | (ReferenceError::Digest { .. }, "digest")
            );
            assert!(matches, "{input:?}: expected a {part} error, got {err}");
        }
        let long_tag = format!("alpine:{}", "a".repeat(129));
        assert!(matches!(
            long_tag.parse::<Reference>(),
            Err(ReferenceError::Tag { .. })
        ));
        let err = "ghcr.io/Org/app"
            .parse::<Reference>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"Org/app\"") && err.contains("lowercase"),
            "{err}"
        );
    }

    #[test]
    fn serde_round_trip() {
        let r: Reference = "ghcr.io/a/b:c".parse().unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"ghcr.io/a/b:c\"");
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
    }
}
