//! `lull image export SERVICE[@REVISION] --oci DIR` and `lull image push SERVICE[@REVISION]
//! REGISTRY/REPO:TAG`: a service revision's image (built from source or pulled). The daemon
//! names the revision's image; an export is written here, from the image store, with the
//! caller's own permissions (the daemon writes no path a request names); a push is the
//! daemon's (it holds the registry credentials).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use http::Method;
use serde_json::{Value, json};

use lull_runtime::reference::Reference;
use lull_runtime::store::ImageStore;

use super::{ClientArgs, Ctx, Exit, Failure, Outcome, finish, print_json, service_path};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// `SERVICE` (its current revision) or `SERVICE@REVISION`.
    pub revision: String,
    /// The OCI image layout directory to write (created, or added to if it is one).
    #[arg(long, value_name = "DIR")]
    pub oci: PathBuf,
    /// The image's name in the layout (default `SERVICE-REVISION`).
    #[arg(long)]
    pub tag: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// `SERVICE` (its current revision) or `SERVICE@REVISION`.
    pub revision: String,
    /// Where to push: `registry/repository:tag` (credentials from `lull registry login`).
    pub target: String,
}

/// `SERVICE[@REVISION]`.
fn service_revision(text: &str) -> Result<(String, Option<u64>), Failure> {
    match text.split_once('@') {
        None => Ok((text.to_owned(), None)),
        Some((service, revision)) => revision
            .parse::<u64>()
            .map(|r| (service.to_owned(), Some(r)))
            .map_err(|_| {
                Failure::Usage(format!(
                    "{text}: expected SERVICE or SERVICE@REVISION (a revision number)"
                ))
            }),
    }
}

pub async fn export(args: &ClientArgs, data_dir: &Path, command: &ExportArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(run_export(&ctx, data_dir, command).await)
}

async fn run_export(ctx: &Ctx, data_dir: &Path, args: &ExportArgs) -> Outcome {
    let (service, revision) = service_revision(&args.revision)?;
    let dir = std::path::absolute(&args.oci)
        .map_err(|e| Failure::Usage(format!("--oci {}: {e}", args.oci.display())))?;
    let revisions = ctx
        .send(
            Method::GET,
            &format!("{}/revisions", service_path(&service)),
            None,
        )
        .await?;
    let revisions = revisions.as_array().cloned().unwrap_or_default();
    let chosen = match revision {
        Some(n) => revisions.iter().find(|r| r["number"].as_u64() == Some(n)),
        None => revisions
            .iter()
            .find(|r| r["current"] == true)
            .or_else(|| revisions.last()),
    }
    .ok_or_else(|| match revision {
        Some(n) => Failure::Usage(format!("service {service} has no revision {n}")),
        None => Failure::Usage(format!("service {service} has no revision")),
    })?;
    let number = chosen["number"].as_u64().unwrap_or(0);
    let reference: Reference = chosen["image"]
        .as_str()
        .ok_or_else(|| Failure::Other(format!("revision {number} names no image")))?
        .parse()
        .map_err(|e| Failure::Other(format!("revision {number}'s image: {e}")))?;
    let store = ImageStore::open(data_dir).map_err(|e| {
        Failure::Other(format!(
            "open the image store in {} (an export reads it directly: run as root, or give --data-dir): {e}",
            data_dir.display()
        ))
    })?;
    let tag = args
        .tag
        .clone()
        .unwrap_or_else(|| format!("{service}-{number}"));
    let exported = store
        .export_oci_layout(reference.clone(), &dir, Some(&tag))
        .await
        .map_err(|e| Failure::Other(format!("export {reference}: {e}")))?;
    let answer = json!({
        "service": service,
        "revision": number,
        "image": reference.to_string(),
        "dir": dir,
        "tag": tag,
        "manifest": exported.manifest_digest.to_string(),
        "blobs_linked": exported.linked,
        "blobs_copied": exported.copied,
    });
    report(ctx, &answer, |a| {
        format!(
            "{}@{}: {} written to {} as {}",
            a["service"].as_str().unwrap_or_default(),
            a["revision"],
            a["manifest"].as_str().unwrap_or_default(),
            a["dir"].as_str().unwrap_or_default(),
            a["tag"].as_str().unwrap_or_default(),
        )
    })
}

pub async fn push(args: &ClientArgs, command: &PushArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(run_push(&ctx, command).await)
}

async fn run_push(ctx: &Ctx, args: &PushArgs) -> Outcome {
    let (service, revision) = service_revision(&args.revision)?;
    let body = json!({ "service": service, "revision": revision, "target": args.target });
    let answer = ctx
        .send(Method::POST, "/v1/images/push", Some(&body))
        .await?;
    report(ctx, &answer, |a| {
        format!(
            "{}@{}: pushed {} as {} ({} blobs sent, {} bytes; {} already there)",
            a["service"].as_str().unwrap_or_default(),
            a["revision"],
            a["manifest"].as_str().unwrap_or_default(),
            a["target"].as_str().unwrap_or_default(),
            a["uploaded"],
            a["bytes_uploaded"],
            a["existing"].as_u64().unwrap_or(0) + a["mounted"].as_u64().unwrap_or(0),
        )
    })
}

fn report(ctx: &Ctx, answer: &Value, text: impl Fn(&Value) -> String) -> Outcome {
    if ctx.json {
        print_json(answer);
    } else {
        println!("{}", text(answer));
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_revision_are_read() {
        assert_eq!(service_revision("web").unwrap(), ("web".into(), None));
        assert_eq!(service_revision("web@3").unwrap(), ("web".into(), Some(3)));
        assert!(service_revision("web@x").is_err());
    }
}
