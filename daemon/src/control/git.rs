//! A git source: the `git` program fetches one commit (a branch, a tag or a commit id) of any
//! remote git understands into a fresh dir, then its `.git` goes: the build sees the files
//! only. Credentials come from a lull secret as an `Authorization` header given through git's
//! environment (`GIT_CONFIG_*`), never in a URL, an argument or a log line.

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

/// Checks what a request may ask of git: no credentials in the URL, no option injection.
pub fn check(git: &GitSource) -> Result<(), GitRefused> {
    if git.url.is_empty() || git.url.starts_with('-') {
        return Err(GitRefused {
            field: "source.git.url",
            message: format!("{:?} is not a git URL", git.url),
        });
    }
    if let Some((scheme, rest)) = git.url.split_once("://") {
        let authority = rest.split('/').next().unwrap_or("");
        if matches!(scheme, "http" | "https") && authority.contains('@') {
            return Err(GitRefused {
                field: "source.git.url",
                message: "put credentials in a lull secret (credentials_secret), not in the URL"
                    .into(),
            });
        }
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
    credentials: Option<&str>,
    dest: &Path,
    log: &(dyn Fn(&str) + Sync),
) -> Result<(), String> {
    check(git).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let reference = git.reference.as_deref().unwrap_or("HEAD");
    log(&format!("==> git: fetching {reference} of {}", git.url));
    run(dest, &["init", "-q"], None).await?;
    let shallow = run(
        dest,
        &["fetch", "-q", "--depth", "1", "--", &git.url, reference],
        credentials,
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
        )
        .await?;
        let commit = format!("{reference}^{{commit}}");
        let remote = format!("origin/{reference}^{{commit}}");
        let resolved = match run(dest, &["rev-parse", "--verify", "-q", &commit], None).await {
            Ok(r) => r,
            Err(_) => run(dest, &["rev-parse", "--verify", "-q", &remote], None)
                .await
                .map_err(|_| {
                    format!(
                        "source.git.ref: {reference} is not a branch, tag or commit of {}",
                        git.url
                    )
                })?,
        };
        run(dest, &["checkout", "-q", resolved.trim()], None).await?;
    } else {
        run(dest, &["checkout", "-q", "FETCH_HEAD"], None).await?;
    }
    let commit = run(dest, &["rev-parse", "HEAD"], None).await?;
    log(&format!("==> git: commit {}", commit.trim()));
    std::fs::remove_dir_all(dest.join(".git")).map_err(|e| format!("remove .git: {e}"))?;
    Ok(())
}

async fn run(dir: &Path, args: &[&str], credentials: Option<&str>) -> Result<String, String> {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_DIR")
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
            check(&source(url, reference)).map_err(|e| e.field)
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
        assert!(check(&source("https://example.com/@scope/r.git", None)).is_ok());
        assert!(check(&source("https://example.com/r.git", Some("v1.0"))).is_ok());
        assert!(check(&source("git@example.com:r.git", None)).is_ok());
    }
}
