//! `lull deploy NAME` and `lull rollback NAME [REVISION]`.

use std::process::ExitCode;

use clap::Args;
use http::Method;
use serde_json::{Value, json};

use super::{ClientArgs, Ctx, Exit, Outcome, finish, print_json, service_path};

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The service's name.
    pub name: String,
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
    let path = format!("{}/deploy", service_path(&args.name));
    let started = ctx.send(Method::POST, &path, None).await?;
    ctx.follow_started(&started, !args.no_wait).await
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
