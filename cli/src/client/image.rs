//! `lull image export SERVICE[@REVISION] --oci DIR` and `lull image push SERVICE[@REVISION]
//! REGISTRY/REPO:TAG`: a service revision's image (built from source or pulled), written as an
//! OCI image layout or pushed to a registry by the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use http::Method;
use serde_json::{Value, json};

use super::{ClientArgs, Ctx, Exit, Failure, Outcome, finish, print_json};

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

pub async fn export(args: &ClientArgs, command: &ExportArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(run_export(&ctx, command).await)
}

async fn run_export(ctx: &Ctx, args: &ExportArgs) -> Outcome {
    let (service, revision) = service_revision(&args.revision)?;
    let dir = std::path::absolute(&args.oci)
        .map_err(|e| Failure::Usage(format!("--oci {}: {e}", args.oci.display())))?;
    let body = json!({ "service": service, "revision": revision, "dir": dir, "tag": args.tag });
    let answer = ctx
        .send(Method::POST, "/v1/images/export", Some(&body))
        .await?;
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
