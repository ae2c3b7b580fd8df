//! `lull events NAME [-f] [--since SEQ]`: a service's lifecycle events, oldest first.

use std::process::ExitCode;

use clap::Args;
use http::Method;
use serde_json::Value;

use super::{ClientArgs, Ctx, Exit, Failure, Outcome, cell, finish, print_json_line, service_path};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The service's name (a deleted service's events stay readable).
    pub name: String,
    /// Keep printing new events as they happen (ends when the service is deleted).
    #[arg(short, long)]
    pub follow: bool,
    /// Only events after this sequence number (`--json` shows each event's `seq`).
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
}

pub async fn run(args: &ClientArgs, command: &EventsArgs) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(stream(&ctx, command).await)
}

async fn stream(ctx: &Ctx, args: &EventsArgs) -> Outcome {
    let mut query = Vec::new();
    if let Some(since) = args.since {
        query.push(format!("since={since}"));
    }
    if args.follow {
        query.push("follow".to_owned());
    }
    let mut path = format!("{}/events", service_path(&args.name));
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let mut lines = ctx.client.stream(Method::GET, &path, None::<&()>).await?;
    while let Some(event) = lines.next().await? {
        if let Some(error) = event.get("error") {
            return Err(match serde_json::from_value(error.clone()) {
                Ok(api) => Failure::Client(lull_daemon::api::ClientError::Api(api)),
                Err(_) => Failure::Other(format!("the daemon reported: {error}")),
            });
        }
        if ctx.json {
            print_json_line(&event);
        } else {
            println!("{}", event_line(&event));
        }
    }
    Ok(Exit::Ok)
}

/// `TIME  KIND  MESSAGE`; a message of several lines keeps its lines, indented.
fn event_line(event: &Value) -> String {
    let message = cell(&event["message"]).replace('\n', "\n    ");
    format!(
        "{}  {:<20}  {message}",
        cell(&event["time"]),
        cell(&event["kind"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_event_is_one_line_with_time_kind_and_message() {
        let line = event_line(&json!({
            "seq": 4, "time": "2026-11-26T12:31:07.123Z", "kind": "deploy.failed",
            "message": "revision 3: exited with code 3\nboom",
        }));
        assert_eq!(
            line,
            "2026-11-26T12:31:07.123Z  deploy.failed         revision 3: exited with code 3\n    boom"
        );
    }
}
