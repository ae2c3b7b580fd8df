//! Pushing OCI image layouts to the local test registry (skopeo) and asking it, over plain
//! HTTP, what a tag currently points at. Shared by `cargo xtask fixtures` and
//! `cargo xtask base-images`.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub const DEFAULT_REGISTRY: &str = "127.0.0.1:5000";

/// The registry the images go to: `$LULL_REGISTRY`, else the local one.
pub fn registry_address() -> String {
    std::env::var("LULL_REGISTRY").unwrap_or_else(|_| DEFAULT_REGISTRY.into())
}

pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The skopeo reference of the manifest tagged `latest` in the layout at `dir`.
pub fn oci_ref(dir: &Path) -> Result<String> {
    let dir = dir.display().to_string();
    if dir.contains(':') {
        bail!("layout path {dir} contains ':', which skopeo cannot parse");
    }
    Ok(format!("oci:{dir}:latest"))
}

pub fn run_skopeo(skopeo: &Path, args: &[&str], what: &str) -> Result<()> {
    let output = Command::new(skopeo)
        .arg("--insecure-policy")
        .args(args)
        .output()
        .with_context(|| format!("{what}: run skopeo"))?;
    if !output.status.success() {
        bail!(
            "{what}: skopeo {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A request to copy one layout (its manifest tagged `latest`) to `<registry>/<reference>`,
/// keeping its layer compression.
pub struct Push<'a> {
    pub dir: &'a Path,
    /// The digest of the layout's manifest.
    pub manifest: &'a str,
    pub reference: String,
    /// `gzip` or `zstd`: what the layers are and must stay.
    pub compression: &'static str,
    /// Push the manifest byte for byte (`--preserve-digests`), so the registry's digest is the
    /// layout's; otherwise skopeo may rewrite it while enforcing `compression`.
    pub preserve_digests: bool,
}

/// What a push found or did.
pub struct Pushed {
    /// The registry's manifest digest for the reference after the push.
    pub digest: String,
    /// Whether skopeo ran (false: the registry already held it).
    pub pushed: bool,
}

impl Push<'_> {
    /// Pushes unless the registry already holds the layout's manifest under the reference, or
    /// still holds what the last push of the same layout left there (recorded in `stamps`).
    pub fn run(&self, skopeo: &Path, registry: &str, stamps: &Path) -> Result<Pushed> {
        let stamp = stamps.join(format!("push-{}", self.reference.replace(['/', ':'], "_")));
        let (repo, tag) = self
            .reference
            .rsplit_once(':')
            .with_context(|| format!("reference {} has no tag", self.reference))?;
        if let Ok((current, _)) = registry_manifest(registry, repo, tag) {
            let recorded = fs::read_to_string(&stamp).unwrap_or_default();
            if current == self.manifest || recorded.trim() == format!("{} {current}", self.manifest)
            {
                return Ok(Pushed {
                    digest: current,
                    pushed: false,
                });
            }
        }
        let dest = format!("docker://{registry}/{}", self.reference);
        let source = oci_ref(self.dir)?;
        let mut args = vec!["copy", "--quiet", "--dest-tls-verify=false"];
        if self.preserve_digests {
            args.push("--preserve-digests");
        } else {
            args.extend(["--dest-compress-format", self.compression]);
        }
        args.extend([source.as_str(), dest.as_str()]);
        run_skopeo(skopeo, &args, &format!("push {dest}"))?;
        let (pushed, manifest) =
            registry_manifest(registry, repo, tag).with_context(|| format!("read back {dest}"))?;
        let manifest: serde_json::Value =
            serde_json::from_str(&manifest).with_context(|| format!("parse manifest of {dest}"))?;
        let suffix = format!("+{}", self.compression);
        let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
        if layers.is_empty()
            || !layers.iter().all(|l| {
                l["mediaType"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(&suffix))
            })
        {
            bail!("{dest}: pushed layers are not all {}", self.compression);
        }
        if self.preserve_digests && pushed != self.manifest {
            bail!(
                "{dest}: the registry holds {pushed}, not the layout's {}",
                self.manifest
            );
        }
        fs::write(&stamp, format!("{} {pushed}", self.manifest))
            .with_context(|| format!("write {}", stamp.display()))?;
        Ok(Pushed {
            digest: pushed,
            pushed: true,
        })
    }
}

/// Sends one plain HTTP/1.0 request to the registry; returns the status, head and body.
fn registry_request(registry: &str, method: &str, path: &str) -> Result<(u16, String, String)> {
    let addr = registry
        .to_socket_addrs()
        .with_context(|| format!("resolve {registry}"))?
        .next()
        .with_context(|| format!("resolve {registry}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connect to {registry}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {registry}\r\n\
         Accept: application/vnd.oci.image.manifest.v1+json, \
         application/vnd.docker.distribution.manifest.v2+json\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .take(1024 * 1024)
        .read_to_end(&mut response)
        .with_context(|| format!("read response from {registry}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{registry} sent no HTTP status"))?;
    Ok((status, head.to_string(), body.to_string()))
}

pub fn registry_reachable(registry: &str) -> Result<()> {
    let (status, _, _) = registry_request(registry, "GET", "/v2/")?;
    if status != 200 && status != 401 {
        bail!("GET /v2/ answered {status}");
    }
    Ok(())
}

/// The digest and body of the manifest `repo:tag` in the registry. The digest is computed from
/// the body, which is what the registry stores.
pub fn registry_manifest(registry: &str, repo: &str, tag: &str) -> Result<(String, String)> {
    let (status, _, body) =
        registry_request(registry, "GET", &format!("/v2/{repo}/manifests/{tag}"))?;
    if status != 200 {
        bail!("manifest {repo}:{tag}: status {status}");
    }
    Ok((crate::oci::sha256_digest(body.as_bytes()), body))
}
