//! `lull deploy NAME` and `lull rollback NAME [REVISION]`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use http::Method;
use serde_json::{Value, json};

use super::{ClientArgs, Ctx, Exit, Failure, Outcome, finish, print_json, service_path};

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The service's name (created when it does not exist and a source is given).
    pub name: String,
    /// A source folder with an apprunner.yaml (its .gitignore and .lullignore rules are
    /// honoured) or a tarball (.tar, .tar.gz, .tgz) to build and deploy. Without a source,
    /// the current revision is deployed again.
    pub source: Option<PathBuf>,
    /// Build from a git repository instead (any URL git understands).
    #[arg(long, value_name = "URL", conflicts_with = "source")]
    pub git: Option<String>,
    /// The branch, tag or commit to build (default: the repository's HEAD).
    #[arg(long = "ref", value_name = "REF", requires = "git")]
    pub git_ref: Option<String>,
    /// A lull secret holding `user:token` for the git remote (`lull secret set NAME`).
    #[arg(long, value_name = "SECRET", requires = "git")]
    pub git_credentials: Option<String>,
    /// An apprunner.yaml to build with, for a source without one (it wins over the source's).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Do not follow the deploy; return once it has started.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The service's name.
    pub name: String,
    /// The revision to go back to (default: the one before the current one).
    pub revision: Option<u64>,
    /// Do not follow the deploy a rollback outside the rollback window starts.
    #[arg(long)]
    pub no_wait: bool,
}

/// Deploys the service's current revision again (e.g. after a new push of its image's tag).
pub async fn deploy(args: &ClientArgs, command: &DeployArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(run_deploy(&ctx, command).await)
}

async fn run_deploy(ctx: &Ctx, args: &DeployArgs) -> Outcome {
    if args.source.is_some() || args.git.is_some() {
        let source = match (&args.source, &args.git) {
            (Some(path), _) => BuildFrom::Path(path.clone()),
            (None, Some(url)) => BuildFrom::Git {
                url: url.clone(),
                reference: args.git_ref.clone(),
                credentials: args.git_credentials.clone(),
            },
            (None, None) => unreachable!("checked above"),
        };
        let config = match &args.config {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| Failure::Usage(format!("--config {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let started = start_build(ctx, &args.name, &source, config).await?;
        return ctx.follow_started(&started, !args.no_wait).await;
    }
    let path = format!("{}/deploy", service_path(&args.name));
    let started = ctx.send(Method::POST, &path, None).await?;
    ctx.follow_started(&started, !args.no_wait).await
}

/// Where a build's source comes from.
pub enum BuildFrom {
    /// A folder (packed here) or a tarball (sent as it is).
    Path(PathBuf),
    Git {
        url: String,
        reference: Option<String>,
        credentials: Option<String>,
    },
}

/// Uploads the source if it is local and starts the build (and the deploy after it) of
/// service `name`, created if need be; answers what `follow_started` follows.
pub async fn start_build(
    ctx: &Ctx,
    name: &str,
    from: &BuildFrom,
    config: Option<String>,
) -> Result<Value, Failure> {
    let source = match from {
        BuildFrom::Path(path) => {
            let upload = upload_source(ctx, path).await?;
            json!({ "upload": upload })
        }
        BuildFrom::Git {
            url,
            reference,
            credentials,
        } => json!({ "git": {
            "url": url,
            "ref": reference,
            "credentials_secret": credentials,
        }}),
    };
    let mut body = json!({ "source": source, "create": true });
    if let Some(config) = config {
        body["apprunner"] = Value::String(config);
    }
    let path = format!("{}/builds", service_path(name));
    let mut started = ctx.send(Method::POST, &path, Some(&body)).await?;
    // What follow_started expects: no revision yet.
    started["revision"] = Value::Null;
    Ok(started)
}

/// Sends a folder (packed into a tar first, its ignore rules applied) or a tarball; answers
/// the upload's id.
async fn upload_source(ctx: &Ctx, path: &Path) -> Result<String, Failure> {
    let meta =
        std::fs::metadata(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
    let (file, content_type) = if meta.is_dir() {
        let dir = path.to_owned();
        let packed = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let mut tmp = tempfile::tempfile().map_err(|e| format!("a temporary file: {e}"))?;
            let stats =
                lull_builder::source::pack_source(&dir, &mut tmp).map_err(|e| e.to_string())?;
            use std::io::Seek;
            tmp.rewind().map_err(|e| format!("a temporary file: {e}"))?;
            Ok((tmp, stats))
        })
        .await
        .map_err(|e| Failure::Other(format!("pack task: {e}")))?
        .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        let (tmp, stats) = packed;
        if !ctx.json {
            println!(
                "packed {}: {} files, {} bytes",
                path.display(),
                stats.files,
                stats.bytes
            );
        }
        (tmp, "application/x-tar")
    } else {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        let mut magic = [0u8; 2];
        use std::io::{Read, Seek};
        let n = file.read(&mut magic).unwrap_or(0);
        file.rewind()
            .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
        let gzip = n == 2 && magic == [0x1f, 0x8b];
        (
            file,
            if gzip {
                "application/gzip"
            } else {
                "application/x-tar"
            },
        )
    };
    let answer: Value = ctx
        .client
        .upload("/v1/uploads", content_type, tokio::fs::File::from_std(file))
        .await?;
    answer["upload"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Failure::Other("the daemon answered no upload id".into()))
}

/// Switches back to an earlier revision: a routing switch inside the rollback window, else a
/// deploy of that revision (followed).
pub async fn rollback(args: &ClientArgs, command: &RollbackArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(run_rollback(&ctx, command).await)
}

async fn run_rollback(ctx: &Ctx, args: &RollbackArgs) -> Outcome {
    let path = format!("{}/rollback", service_path(&args.name));
    let body = match args.revision {
        Some(revision) => json!({ "revision": revision }),
        None => json!({}),
    };
    let answer = ctx.send(Method::POST, &path, Some(&body)).await?;
    if answer["mode"] == "switch" {
        if ctx.json {
            print_json(&answer);
        } else {
            let took = answer["took_ms"].as_f64().unwrap_or(0.0);
            println!(
                "{}: switched to revision {} in {took:.1} ms",
                args.name,
                answer["revision"]
                    .as_u64()
                    .map_or_else(|| "?".to_owned(), |r| r.to_string()),
            );
        }
        return Ok(Exit::Ok);
    }
    // Outside the window: a deploy of the older revision.
    let started = json!({
        "service": args.name,
        "revision": answer.get("revision").cloned().unwrap_or(Value::Null),
        "operation": answer["operation"],
    });
    if !ctx.json {
        println!(
            "{}: the revision is no longer running, deploying it again",
            args.name
        );
    }
    ctx.follow_started(&started, !args.no_wait).await
}
