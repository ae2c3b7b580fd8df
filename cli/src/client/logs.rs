//! `lull logs NAME` for a service: its instances' output (or, with `--requests`, the proxy's
//! access log of it), oldest first, each line with its RFC 3339 UTC time and instance; `-f`
//! follows. A name the daemon does not know as a service is left to the local instance logs.

use http::Method;
use lull_daemon::api::ClientError;
use serde_json::Value;

use super::{ClientArgs, Ctx, Exit, Failure, Outcome, cell, print_json_line, service_path};

/// What `lull logs` asks of a service.
pub struct ServiceLogs<'a> {
    pub name: &'a str,
    pub follow: bool,
    pub since: Option<&'a str>,
    pub instance: Option<&'a str>,
    pub requests: bool,
}

/// `None` when no daemon answers or it has no such service: the caller falls back to a local
/// instance of that name.
pub async fn run(args: &ClientArgs, logs: &ServiceLogs<'_>) -> Option<Outcome> {
    let ctx = Ctx::new(args);
    match ctx.client.get::<Value>(&service_path(logs.name)).await {
        Ok(_) => Some(stream(&ctx, logs).await),
        Err(ClientError::Api(api)) if api.code == lull_daemon::api::ErrorCode::NotFound => None,
        Err(ClientError::NotRunning { .. } | ClientError::PermissionDenied { .. }) => None,
        Err(e) => Some(Err(Failure::Client(e))),
    }
}

async fn stream(ctx: &Ctx, logs: &ServiceLogs<'_>) -> Outcome {
    let mut query = Vec::new();
    if logs.follow {
        query.push("follow".to_owned());
    }
    if logs.requests {
        query.push("requests".to_owned());
    }
    if let Some(since) = logs.since {
        query.push(format!(
            "since={}",
            form_urlencoded::byte_serialize(since.as_bytes()).collect::<String>()
        ));
    }
    if let Some(instance) = logs.instance {
        query.push(format!("instance={instance}"));
    }
    let mut path = format!("{}/logs", service_path(logs.name));
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let mut lines = ctx.client.stream(Method::GET, &path, None::<&()>).await?;
    loop {
        let next = tokio::select! {
            next = lines.next() => next?,
            _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
        };
        let Some(line) = next else {
            return Ok(Exit::Ok);
        };
        if let Some(error) = line.get("error") {
            return Err(match serde_json::from_value(error.clone()) {
                Ok(api) => Failure::Client(ClientError::Api(api)),
                Err(_) => Failure::Other(format!("the daemon reported: {error}")),
            });
        }
        if ctx.json {
            print_json_line(&line);
        } else if logs.requests {
            println!(
                "{} {} {} {} {} {}ms {}",
                cell(&line["time"]),
                cell(&line["instance"]),
                cell(&line["method"]),
                cell(&line["path"]),
                cell(&line["status"]),
                cell(&line["duration_ms"]),
                cell(&line["request_id"]),
            );
        } else {
            println!(
                "{} {} {}",
                cell(&line["time"]),
                cell(&line["instance"]),
                cell(&line["text"])
            );
        }
    }
}
