//! A git source: the `git` program fetches one commit (a branch, a tag or a commit id) of a
//! remote into a fresh dir, then its `.git` goes: the build sees the files only. Credentials
//! come from a lull secret as an `Authorization` header given through git's environment
//! (`GIT_CONFIG_*`), never in a URL, an argument or a log line, and only over HTTPS.
//!
//! The daemon runs as root for callers who are not: git must not reach what root can but they
//! cannot. Remotes are `https`, `http`, `ssh` (and scp-like `user@host:path`) or `git` only;
//! local paths and `file://` only when `[builder] git_allow_local` says so; no user or
//! system git config, no `HOME`, and ssh without root's keys or config.

use std::path::Path;
use std::process::Stdio;

use base64::Engine as _;
use tokio::process::Command;

use super::build::GitSource;

/// A git source a request may not ask for, with the body field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct GitRefused {
    /// `source.git.url` or `source.git.ref`.
    pub field: &'static str,
    pub message: String,
}

/// Checks what a request may ask of git: a remote of an allowed kind, no credentials in the
/// URL, no option injection.
pub fn check(git: &GitSource, allow_local: bool) -> Result<(), GitRefused> {
    let url_err = |message: String| GitRefused {
        field: "source.git.url",
        message,
    };
    if git.url.is_empty() || git.url.starts_with('-') || git.url.contains(char::is_whitespace) {
        return Err(url_err(format!("{:?} is not a git URL", git.url)));
    }
    let local = || {
        if allow_local {
            Ok(())
        } else {
            Err(url_err(format!(
                "{:?} is a path on the daemon's host: only remote repositories (https, ssh, git) are built, unless [builder] git_allow_local is set",
                git.url
            )))
        }
    };
    match git.url.split_once("://") {
        Some((scheme, rest)) => {
            let scheme = scheme.to_ascii_lowercase();
            let authority = rest.split('/').next().unwrap_or("");
            match scheme.as_str() {
                "https" | "http" | "ssh" | "git" => {}
                "file" => local()?,
                other => {
                    return Err(url_err(format!(
                        "scheme {other:?} is not one lull fetches (https, http, ssh, git)"
                    )));
                }
            }
            if matches!(scheme.as_str(), "http" | "https") && authority.contains('@') {
                return Err(url_err(
                    "put credentials in a lull secret (credentials_secret), not in the URL".into(),
                ));
            }
            if scheme == "http" && git.credentials_secret.is_some() {
                return Err(url_err(
                    "credentials go over https only: plain http would send them in clear".into(),
                ));
            }
        }
        None if git.url.starts_with('/') || git.url.starts_with('.') => local()?,
        // scp-like ssh (`git@host:path`); `transport::address` forms are refused.
        None if git.url.contains("::") => {
            return Err(url_err(format!(
                "{:?}: transport helpers are not fetched",
                git.url
            )));
        }
        None if git.url.contains(':') => {}
        None => local()?,
    }
    if let Some(r) = &git.reference
        && (r.is_empty() || r.starts_with('-') || r.contains(char::is_whitespace))
    {
        return Err(GitRefused {
            field: "source.git.ref",
            message: format!("{r:?} is not a branch, tag or commit"),
        });
    }
    Ok(())
}

/// Fetches `git`'s commit into `dest` (created), without `.git`.
pub async fn fetch(
    git: &GitSource,
    allow_local: bool,
    credentials: Option<&str>,
    dest: &Path,
    log: &(dyn Fn(&str) + Sync),
) -> Result<(), String> {
    check(git, allow_local).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let reference = git.reference.as_deref().unwrap_or("HEAD");
    log(&format!("==> git: fetching {reference} of {}", git.url));
    run(dest, &["init", "-q"], None, allow_local).await?;
    let shallow = run(
        dest,
        &["fetch", "-q", "--depth", "1", "--", &git.url, reference],
        credentials,
        allow_local,
    )
    .await;
    if let Err(shallow) = shallow {
        // Servers that refuse a commit id in a shallow fetch: fetch everything, then find it.
        tracing::debug!("shallow fetch failed: {shallow}");
        run(
            dest,
            &[
                "fetch",
                "-q",
                "--",
                &git.url,
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            credentials,
            allow_local,
        )
        .await?;
        let commit = format!("{reference}^{{commit}}");
        let remote = format!("origin/{reference}^{{commit}}");
        let resolved = match run(
            dest,
            &["rev-parse", "--verify", "-q", &commit],
            None,
            allow_local,
        )
        .await
        {
            Ok(r) => r,
            Err(_) => run(
                dest,
                &["rev-parse", "--verify", "-q", &remote],
                None,
                allow_local,
            )
            .await
            .map_err(|_| {
                format!(
                    "source.git.ref: {reference} is not a branch, tag or commit of {}",
                    git.url
                )
            })?,
        };
        run(
            dest,
            &["checkout", "-q", resolved.trim()],
            None,
            allow_local,
        )
        .await?;
    } else {
        run(dest, &["checkout", "-q", "FETCH_HEAD"], None, allow_local).await?;
    }
    let commit = run(dest, &["rev-parse", "HEAD"], None, allow_local).await?;
    log(&format!("==> git: commit {}", commit.trim()));
    std::fs::remove_dir_all(dest.join(".git")).map_err(|e| format!("remove .git: {e}"))?;
    Ok(())
}

async fn run(
    dir: &Path,
    args: &[&str],
    credentials: Option<&str>,
    allow_local: bool,
) -> Result<String, String> {
    let allowed_protocols = if allow_local {
        "https:http:ssh:git:file"
    } else {
        "https:http:ssh:git"
    };
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", "/nonexistent")
        .env("GIT_ALLOW_PROTOCOL", allowed_protocols)
        .env("GIT_PROTOCOL_FROM_USER", "0")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=none -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=accept-new",
        )
        .env_remove("GIT_DIR")
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(credentials) = credentials {
        let header = format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        command
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", header);
    }
    let output = command
        .output()
        .await
        .map_err(|e| format!("run git: {e} (is git installed?)"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "git {}: {}",
            args.first().unwrap_or(&""),
            stderr.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(url: &str, reference: Option<&str>) -> GitSource {
        GitSource {
            url: url.into(),
            reference: reference.map(str::to_owned),
            credentials_secret: None,
        }
    }

    #[test]
    fn urls_with_credentials_and_option_like_values_are_refused() {
        let field = |url: &str, reference: Option<&str>| {
            check(&source(url, reference), false).map_err(|e| e.field)
        };
        assert_eq!(
            field("https://u:p@example.com/r.git", None),
            Err("source.git.url")
        );
        assert_eq!(
            field("https://token@example.com/r.git", None),
            Err("source.git.url")
        );
        assert_eq!(field("--upload-pack=x", None), Err("source.git.url"));
        assert_eq!(field("", None), Err("source.git.url"));
        assert_eq!(
            field("https://example.com/r.git", Some("-x")),
            Err("source.git.ref")
        );
        assert_eq!(
            field("https://example.com/r.git", Some("a b")),
            Err("source.git.ref")
        );
        assert_eq!(
            field("https://example.com/r.git", Some("")),
            Err("source.git.ref")
        );
        // An @ in the path is not a credential.
        assert!(check(&source("https://example.com/@scope/r.git", None), false).is_ok());
        assert!(check(&source("https://example.com/r.git", Some("v1.0")), false).is_ok());
        assert!(check(&source("git@example.com:r.git", None), false).is_ok());
    }

    #[test]
    fn local_repositories_and_other_transports_need_leave() {
        for url in [
            "/root/private",
            "./repo",
            "file:///etc",
            "FILE:///etc",
            "repo",
        ] {
            assert_eq!(
                check(&source(url, None), false).map_err(|e| e.field),
                Err("source.git.url"),
                "{url}"
            );
            assert!(check(&source(url, None), true).is_ok(), "{url}");
        }
        for url in ["ext::sh -c id", "fd::3", "ftp://example.com/r.git"] {
            assert!(check(&source(url, None), true).is_err(), "{url}");
        }
        let mut over_http = source("http://example.com/r.git", None);
        over_http.credentials_secret = Some("token".into());
        assert!(check(&over_http, false).is_err());
    }
}
