//! `lull status`: the daemon (version, HTTP port) and its services.

use std::process::ExitCode;

use serde_json::json;

use super::service::print_services;
use super::{ClientArgs, Ctx, Exit, Outcome, cell, finish, print_json};

pub async fn run(args: &ClientArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(status(&ctx).await)
}

async fn status(ctx: &Ctx) -> Outcome {
    let daemon = ctx.get("/v1/status").await?;
    let services = ctx.get("/v1/services").await?;
    if ctx.json {
        print_json(&json!({ "daemon": daemon, "services": services }));
        return Ok(Exit::Ok);
    }
    let running = daemon["services_running"]
        .as_array()
        .map_or(0, |names| names.len());
    let total = services.as_array().map_or(0, |list| list.len());
    println!(
        "daemon     lull {} on {}",
        cell(&daemon["version"]),
        ctx.client.socket().display()
    );
    println!(
        "http       {}",
        match daemon["http_port"].as_u64() {
            Some(port) => format!("port {port}"),
            None => "not listening".to_owned(),
        }
    );
    println!("services   {total} ({running} running)");
    println!();
    print_services(&services);
    Ok(Exit::Ok)
}
