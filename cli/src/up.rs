//! `lull up IMAGE`: the newcomer's one command. Uses the running daemon, or starts one in this
//! process when none answers; creates the service (or points it at the image), follows the
//! deploy, prints the URL and follows the app's output. With `--check PATH` it GETs the path
//! through lull instead, prints the answer and exits; a service it deployed with an embedded
//! daemon is then deleted, so nothing is left running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use http::Method;
use lull_daemon::api::{Client, ClientError};
use lull_daemon::config::{DaemonConfig, ListenAddr};
use serde_json::{Value, json};

use crate::daemon::Running;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The image to run (e.g. 127.0.0.1:5000/lull/fixture-app:latest), or a source folder
    /// with an apprunner.yaml to build and run.
    pub image: String,
    /// The service's name (default: the image repository's last part).
    #[arg(long)]
    pub name: Option<String>,
    /// The port the app listens on (default 8080; PORT is always set).
    #[arg(long)]
    pub port: Option<u16>,
    /// Set an environment variable (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// With an embedded daemon: where the proxy listens, e.g. `:8080` (default: lull.toml's
    /// `[listeners] http`, else `:80`).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// The daemon's settings, for an embedded daemon and the socket's path.
    #[arg(long, env = "LULL_CONFIG", default_value = lull_daemon::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// GET this path through lull once deployed, print the answer and exit.
    #[arg(long, value_name = "PATH")]
    pub check: Option<String>,
}

/// A DNS label from an image reference: `registry/team/my_app:1` → `my-app`.
pub fn default_name(image: &str) -> String {
    let repo = image.split(['@']).next().unwrap_or(image);
    let last = repo.rsplit('/').next().unwrap_or(repo);
    let last = last.split(':').next().unwrap_or(last);
    let mut name: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    name = name.trim_matches('-').to_owned();
    if name.is_empty() {
        "app".to_owned()
    } else {
        name
    }
}

fn env_list(items: &[String]) -> Result<Vec<Value>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(json!({ "name": k, "value": v })),
            _ => bail!("--env {item:?}: expected KEY=VALUE"),
        })
        .collect()
}

pub async fn run(args: &UpArgs, cgroup_parent: Option<&str>) -> Result<ExitCode> {
    let mut config = match DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lull up: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(http) = &args.http {
        config.listeners.http = Some(ListenAddr::parse(http).with_context(|| {
            format!("--http {http:?}: expected :PORT or ADDRESS:PORT (e.g. :8080)")
        })?);
    }
    let client = Client::new(&config.socket.path);
    let embedded = match client.get::<Value>("/v1/status").await {
        Ok(_) => {
            eprintln!("using the lull daemon on {}", config.socket.path.display());
            None
        }
        Err(ClientError::NotRunning { .. }) => {
            eprintln!("no lull daemon runs: starting one in this process");
            Some(Running::start(&config, cgroup_parent).await?)
        }
        Err(e) => return Err(e).context("ask the lull daemon"),
    };
    let outcome = up(args, &client).await;
    let code = match (&outcome, &args.check) {
        (Ok((name, _)), Some(_)) if embedded.is_some() => {
            // Leave nothing running that this command started.
            let deleted: Result<Value, _> = client
                .call(Method::DELETE, &format!("/v1/services/{name}"), None::<&()>)
                .await;
            if let Err(e) = deleted {
                eprintln!("lull up: delete {name}: {e}");
            }
            outcome
                .as_ref()
                .map(|(_, c)| *c)
                .unwrap_or(ExitCode::FAILURE)
        }
        (Ok((_, code)), _) => *code,
        (Err(_), _) => ExitCode::FAILURE,
    };
    if let Some(daemon) = embedded {
        daemon.stop().await;
    }
    outcome?;
    Ok(code)
}

/// Deploys and checks or follows; returns the service's name and the exit code.
async fn up(args: &UpArgs, client: &Client) -> Result<(String, ExitCode)> {
    let source = std::path::Path::new(&args.image);
    if source.is_dir() {
        return up_source(args, client, source).await;
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&args.image));
    let mut body = json!({ "source": { "type": "image", "reference": args.image } });
    if let Some(port) = args.port {
        body["port"] = json!(port);
    }
    if !args.env.is_empty() {
        body["env"] = Value::Array(env_list(&args.env)?);
    }
    let exists = client
        .get::<Value>(&format!("/v1/services/{name}"))
        .await
        .is_ok();
    let started: Value = if exists {
        eprintln!("updating service {name}");
        client
            .call(Method::PATCH, &format!("/v1/services/{name}"), Some(&body))
            .await
    } else {
        eprintln!("creating service {name}");
        body["name"] = json!(name);
        client.call(Method::POST, "/v1/services", Some(&body)).await
    }
    .map_err(api_error)?;
    let mut operation = started["operation"].as_str().map(str::to_owned);
    if operation.is_none() {
        // Unchanged settings: deploy again unless it serves (a first deploy that failed, an
        // image pushed again under the same tag).
        let view: Value = client
            .get(&format!("/v1/services/{name}"))
            .await
            .map_err(api_error)?;
        if view["status"]["serving"].is_null() {
            let again: Value = client
                .call(
                    Method::POST,
                    &format!("/v1/services/{name}/deploy"),
                    None::<&()>,
                )
                .await
                .map_err(api_error)?;
            operation = again["operation"].as_str().map(str::to_owned);
        } else {
            eprintln!("nothing changed: {name} already runs this image and settings");
        }
    }
    if let Some(op) = operation
        && !follow_operation(client, &op).await?
    {
        return Ok((name, ExitCode::FAILURE));
    }
    after_deploy(args, client, name).await
}

/// Prints where the service answers, then checks it (`--check`) or follows its logs.
async fn after_deploy(args: &UpArgs, client: &Client, name: String) -> Result<(String, ExitCode)> {
    let view: Value = client
        .get(&format!("/v1/services/{name}"))
        .await
        .map_err(api_error)?;
    let url = view["urls"][0].as_str().unwrap_or("").to_owned();
    println!("{name} is serving at {url}");
    match &args.check {
        Some(path) => {
            let ok = check(&view, &name, path).await?;
            Ok((
                name,
                if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            ))
        }
        None => {
            follow_logs(client, &name).await?;
            Ok((name, ExitCode::SUCCESS))
        }
    }
}

/// `lull up DIR`: builds the folder (its apprunner.yaml says how) and deploys it.
async fn up_source(
    args: &UpArgs,
    client: &Client,
    dir: &std::path::Path,
) -> Result<(String, ExitCode)> {
    if args.port.is_some() || !args.env.is_empty() {
        bail!(
            "--port and --env are for images; a source folder sets them in its apprunner.yaml (run.network.port, run.env)"
        );
    }
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let folder = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app".into());
    let name = args.name.clone().unwrap_or_else(|| default_name(&folder));
    let ctx = crate::client::Ctx {
        client: client.clone(),
        json: false,
    };
    let started = crate::client::deploy::start_build(
        &ctx,
        &name,
        &crate::client::deploy::BuildFrom::Path(absolute),
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let op = started["operation"]
        .as_str()
        .context("the daemon started no build operation")?
        .to_owned();
    if !follow_operation(client, &op).await? {
        return Ok((name, ExitCode::FAILURE));
    }
    after_deploy(args, client, name).await
}

fn api_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api(api) if !api.fields.is_empty() => {
            let fields: Vec<String> = api
                .fields
                .iter()
                .map(|f| format!("  {}: {}", f.field, f.message))
                .collect();
            anyhow::anyhow!("{}\n{}", api.message, fields.join("\n"))
        }
        other => anyhow::Error::new(other),
    }
}

/// Prints the operation's progress; true when it succeeded.
async fn follow_operation(client: &Client, op: &str) -> Result<bool> {
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/operations/{op}/progress"),
            None::<&()>,
        )
        .await
        .map_err(api_error)?;
    while let Some(v) = lines.next().await.map_err(api_error)? {
        if let Some(line) = v["line"].as_str() {
            println!("  {line}");
        } else if let Some(end) = v.get("end") {
            if end["state"] == "succeeded" {
                return Ok(true);
            }
            let what = if end["state"] == "build_failed" {
                "build"
            } else {
                "deploy"
            };
            eprintln!(
                "{what} failed: {}",
                end["message"].as_str().unwrap_or("no reason given")
            );
            return Ok(false);
        }
    }
    bail!("the daemon ended operation {op}'s progress without its outcome")
}

/// GET `path` through lull's proxy with the service's host name.
async fn check(view: &Value, name: &str, path: &str) -> Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = view["urls"][0]
        .as_str()
        .context("the service has no URL (the daemon serves no HTTP listener)")?;
    let rest = url.trim_start_matches("http://");
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().context("the service URL's port")?),
        None => (authority, 80),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET http://{host}:{port}{path}: timed out"))?
        .with_context(|| format!("GET http://{host}:{port}{path} via {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    println!("GET http://{host}:{port}{path} ({name}) → {status_line}");
    print!("{body}");
    if !body.ends_with('\n') {
        println!();
    }
    Ok((200..400).contains(&status))
}

/// Prints the app's output as it comes until Ctrl-C.
async fn follow_logs(client: &Client, name: &str) -> Result<()> {
    println!("following {name}'s output; Ctrl-C stops following");
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/services/{name}/logs?follow"),
            None::<&()>,
        )
        .await
        .map_err(api_error)?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            line = lines.next() => match line.map_err(api_error)? {
                Some(v) => println!(
                    "{} {} {}",
                    v["time"].as_str().unwrap_or(""),
                    v["instance"].as_str().unwrap_or(""),
                    v["text"].as_str().unwrap_or("")
                ),
                None => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_images() {
        assert_eq!(
            default_name("127.0.0.1:5000/lull/fixture-app:latest"),
            "fixture-app"
        );
        assert_eq!(default_name("ghcr.io/team/My_App@sha256:abc"), "my-app");
        assert_eq!(default_name("nginx"), "nginx");
        assert_eq!(default_name("___"), "app");
    }
}
