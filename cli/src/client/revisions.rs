//! `lull revisions NAME`: every revision of a service, oldest first.

use std::process::ExitCode;

use clap::Args;

use super::{ClientArgs, Ctx, Exit, Outcome, cell, finish, print_json, print_table, service_path};

#[derive(Debug, Args)]
pub struct RevisionsArgs {
    /// The service's name.
    pub name: String,
}

pub async fn run(args: &ClientArgs, command: &RevisionsArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(list(&ctx, &command.name).await)
}

async fn list(ctx: &Ctx, name: &str) -> Outcome {
    let revisions = ctx
        .get(&format!("{}/revisions", service_path(name)))
        .await?;
    if ctx.json {
        print_json(&revisions);
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = revisions
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let mut marks = Vec::new();
            if r["current"] == true {
                marks.push("current");
            }
            if r["serving"] == true {
                marks.push("serving");
            }
            let number = if marks.is_empty() {
                cell(&r["number"])
            } else {
                format!("{} ({})", cell(&r["number"]), marks.join(", "))
            };
            vec![
                number,
                cell(&r["created_at"]),
                cell(&r["cause"]),
                cell(&r["image"]),
            ]
        })
        .collect();
    print_table(&["REVISION", "CREATED", "CAUSE", "IMAGE"], &rows);
    Ok(Exit::Ok)
}
