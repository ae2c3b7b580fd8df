//! `lull service create|update|list|show|delete|pause|resume|export`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use lull_builder::apprunner::{AppRunnerConfig, RunSection};
use lull_daemon::spec::{ExportError, split_words};
use serde_json::{Map, Value, json};

use super::{
    ClientArgs, Ctx, EXIT_CODES, Exit, Failure, Outcome, cell, finish, print_json, print_table,
    service_path,
};

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Create a service and deploy its first revision, following the deploy to its end.
    #[command(after_long_help = EXIT_CODES)]
    Create(Box<CreateArgs>),
    /// Change a service: a new revision, deployed blue/green. Only the flags given change.
    #[command(after_long_help = EXIT_CODES)]
    Update(Box<UpdateArgs>),
    /// Every service: state, revision, instances, URL.
    #[command(after_long_help = EXIT_CODES)]
    List,
    /// One service: its settings, URLs, instances and restarts.
    #[command(after_long_help = EXIT_CODES)]
    Show(NameArgs),
    /// Stop a service's instances, remove its routes and its definition.
    #[command(after_long_help = EXIT_CODES)]
    Delete(DeleteArgs),
    /// Stop a service's instances; requests get 503 with Retry-After until it is resumed.
    #[command(after_long_help = EXIT_CODES)]
    Pause(NameArgs),
    /// Bring a paused service back (the revision that served before the pause).
    #[command(after_long_help = EXIT_CODES)]
    Resume(WaitArgs),
    /// Print a service as an apprunner.yaml plus lull's settings (`--from-file` reads it back);
    /// with `--json`, its JSON form.
    #[command(after_long_help = EXIT_CODES)]
    Export(NameArgs),
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The service's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The service's name.
    pub name: String,
    /// Do not follow the deploy this starts (if any); return once it has started.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The service's name.
    pub name: String,
    /// Do not ask for confirmation (it is asked only on a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CpuModeArg {
    /// CPU only while requests are in flight (then throttled after the idle delay).
    Request,
    /// CPU all the time.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// The settings `create` and `update` share; each one given replaces the service's value.
#[derive(Debug, Args)]
pub struct SpecFlags {
    /// The image to run (e.g. `registry.example:5000/app:1`).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// The port the app listens on (PORT is always set to it; default 8080).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// An environment variable; repeat for more. On update, the list given replaces the
    /// service's whole list.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// A secret given to instances: `ENV=SECRET` as an environment variable, `/PATH=SECRET` as
    /// a file (mode 0400, owned by the app's user, on a tmpfs); repeat for more. The list given
    /// replaces the service's list.
    #[arg(long = "secret", value_name = "ENV|/PATH=SECRET", value_parser = parse_secret)]
    pub secrets: Vec<Value>,
    /// A per-service host directory mounted into instances, kept across deploys:
    /// `NAME:/PATH`, with `:ro` (read-only) and/or `:shared` (several instances at once)
    /// after it; repeat for more. The list given replaces the service's list.
    #[arg(long = "volume", value_name = "NAME:/PATH[:ro][:shared]", value_parser = parse_volume)]
    pub volumes: Vec<Value>,
    /// vCPUs per instance (0.1, 0.25, 2).
    #[arg(long, value_name = "VCPU")]
    pub cpu: Option<f64>,
    /// Memory per instance (64M, 1G).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Instances kept running at least.
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,
    /// Instances at most.
    #[arg(long, value_name = "N")]
    pub max: Option<u32>,
    /// Requests in flight per instance at most.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u32>,
    /// Share of --concurrency one instance is sized for when scaling out (0.7: 70 %).
    #[arg(long, value_name = "RATIO")]
    pub target_utilisation: Option<f64>,
    /// How long demand must stay low before instances stop, e.g. `60s`.
    #[arg(long, value_name = "DURATION")]
    pub scale_in_window: Option<String>,
    /// With --min 0: time without a request before the last instance stops, e.g. `5m`.
    #[arg(long, value_name = "DURATION")]
    pub scale_to_zero_after: Option<String>,
    /// A hostname the service answers on besides `<name>.localhost`; repeat for more (the list
    /// given replaces the service's list).
    #[arg(long = "hostname", value_name = "HOST")]
    pub hostnames: Vec<String>,
    /// Health-check over HTTP on this path (default: a TCP connect to the port).
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
    /// How long an instance keeps its CPU after its last request (`cpu-mode request`), e.g.
    /// `500ms`, `2s`.
    #[arg(long, value_name = "DURATION")]
    pub idle_delay: Option<String>,
    /// Idle tier 2: freeze an instance this long after it was throttled (`30s`; `0`: never).
    /// Waking a frozen instance takes milliseconds instead of microseconds.
    #[arg(long, value_name = "DURATION")]
    pub freeze_after: Option<String>,
    /// When instances get CPU.
    #[arg(long, value_enum, value_name = "MODE")]
    pub cpu_mode: Option<CpuModeArg>,
    /// Redirect plain HTTP to HTTPS for the service's hostnames that have a certificate
    /// (`<name>.localhost` never is); on by default.
    #[arg(long, value_enum, value_name = "on|off")]
    pub https_redirect: Option<OnOff>,
    /// Strict-Transport-Security on HTTPS responses: `off` (the default) or
    /// `max-age=SECONDS[,include-subdomains][,preload]`. Browsers that saw it refuse plain
    /// HTTP to the service's hostnames for max-age (include-subdomains: every name under
    /// them too; preload: built into browsers, months to undo): turn it on only once HTTPS
    /// works for every hostname.
    #[arg(
        long,
        value_name = "off|max-age=N[,include-subdomains][,preload]",
        value_parser = parse_hsts
    )]
    pub hsts: Option<Value>,
    /// Settings from a file: JSON (the API's form of a service), an apprunner.yaml (its `run`
    /// section), or what `lull service export` printed. Flags override it.
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Do not follow the deploy; return once it has started.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The service's name: a DNS label (`web`); it answers on `<name>.localhost`.
    pub name: String,
    #[command(flatten)]
    pub flags: SpecFlags,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The service's name.
    pub name: String,
    #[command(flatten)]
    pub flags: SpecFlags,
    /// Remove an environment variable; repeat for more.
    #[arg(long, value_name = "KEY")]
    pub unset_env: Vec<String>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// `ENV=SECRET` or `/PATH=SECRET` as the API's JSON form of a secret.
fn parse_secret(text: &str) -> Result<Value, String> {
    match text.rsplit_once('=') {
        Some((target, secret)) if !target.is_empty() && !secret.is_empty() => {
            let kind = if target.starts_with('/') {
                "file"
            } else {
                "env"
            };
            Ok(json!({ kind: target, "secret": secret }))
        }
        _ => Err(format!(
            "expected ENV=SECRET or /PATH=SECRET (a lull secret's name), got {text:?}"
        )),
    }
}

/// `off` or `max-age=N[,include-subdomains][,preload]` as the API's JSON form of HSTS (every
/// field set, so the flag says the whole header). `N` is seconds, or a duration (`365d`).
fn parse_hsts(text: &str) -> Result<Value, String> {
    let bad = |why: &str| {
        format!(
            "expected off or max-age=SECONDS[,include-subdomains][,preload], got {text:?}: {why}"
        )
    };
    if text == "off" {
        return Ok(json!({"enabled": false}));
    }
    let mut parts = text.split(',').map(str::trim);
    let max_age = match parts.next().and_then(|p| p.strip_prefix("max-age=")) {
        Some(age) if !age.is_empty() && age.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{age}s")
        }
        Some(age) if !age.is_empty() => age.to_owned(),
        _ => return Err(bad("max-age comes first")),
    };
    let (mut include_subdomains, mut preload) = (false, false);
    for option in parts {
        match option {
            "include-subdomains" => include_subdomains = true,
            "preload" => preload = true,
            other => return Err(bad(&format!("unknown option {other:?}"))),
        }
    }
    Ok(json!({
        "enabled": true,
        "max_age": max_age,
        "include_subdomains": include_subdomains,
        "preload": preload,
    }))
}

/// `NAME:/PATH[:ro][:shared]` as the API's JSON form of a volume.
fn parse_volume(text: &str) -> Result<Value, String> {
    let bad = || format!("expected NAME:/PATH with :ro and/or :shared after it, got {text:?}");
    let mut parts = text.split(':');
    let (Some(name), Some(path)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    if name.is_empty() || !path.starts_with('/') {
        return Err(bad());
    }
    let mut volume = json!({ "name": name, "path": path });
    for option in parts {
        match option {
            "ro" => volume["read_only"] = json!(true),
            "shared" => volume["shared"] = json!(true),
            _ => return Err(bad()),
        }
    }
    Ok(volume)
}

pub async fn run(args: &ClientArgs, command: &ServiceCommand) -> ExitCode {
    let ctx = Ctx::new(args);
    finish(match command {
        ServiceCommand::Create(a) => create(&ctx, a).await,
        ServiceCommand::Update(a) => update(&ctx, a).await,
        ServiceCommand::List => list(&ctx).await,
        ServiceCommand::Show(a) => show(&ctx, &a.name).await,
        ServiceCommand::Delete(a) => delete(&ctx, a).await,
        ServiceCommand::Pause(a) => pause(&ctx, &a.name).await,
        ServiceCommand::Resume(a) => resume(&ctx, a).await,
        ServiceCommand::Export(a) => export(&ctx, &a.name).await,
    })
}

async fn create(ctx: &Ctx, args: &CreateArgs) -> Outcome {
    let mut body = match &args.flags.from_file {
        Some(path) => read_file(path)?,
        None => Map::new(),
    };
    match body.get("name").and_then(Value::as_str) {
        Some(named) if named != args.name => {
            return Err(Failure::Usage(format!(
                "{} describes service {named}, not {}: give the same name or drop `name` from the file",
                file_name(&args.flags),
                args.name
            )));
        }
        _ => {
            body.insert("name".into(), json!(args.name));
        }
    }
    // On create, -e sets variables over the file's (in place, else appended).
    let mut env = body.remove("env");
    if !args.flags.env.is_empty() {
        let mut list = env
            .take()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        for (key, value) in &args.flags.env {
            match list.iter_mut().find(|e| e["name"] == json!(key)) {
                Some(existing) => existing["value"] = json!(value),
                None => list.push(json!({"name": key, "value": value})),
            }
        }
        env = Some(Value::Array(list));
    }
    apply_flags(&mut body, &args.flags, false);
    if let Some(env) = env {
        body.insert("env".into(), env);
    }
    if !body.contains_key("source") {
        return Err(Failure::Usage(format!(
            "service {} needs an image: give --image REF (or a --from-file that names a source)",
            args.name
        )));
    }
    let body = Value::Object(body);
    let started = ctx.send(Method::POST, "/v1/services", Some(&body)).await?;
    ctx.follow_started(&started, !args.flags.no_wait).await
}

async fn update(ctx: &Ctx, args: &UpdateArgs) -> Outcome {
    let mut body = match &args.flags.from_file {
        Some(path) => read_file(path)?,
        None => Map::new(),
    };
    match body.remove("name") {
        Some(Value::String(named)) if named != args.name => {
            return Err(Failure::Usage(format!(
                "{} describes service {named}, not {}: a service cannot be renamed",
                file_name(&args.flags),
                args.name
            )));
        }
        _ => {}
    }
    apply_flags(&mut body, &args.flags, true);
    if !args.unset_env.is_empty() {
        let mut list = match body.remove("env") {
            Some(Value::Array(list)) => list,
            _ => {
                let view = ctx.get(&service_path(&args.name)).await?;
                view["spec"]["env"].as_array().cloned().unwrap_or_default()
            }
        };
        for key in &args.unset_env {
            let before = list.len();
            list.retain(|e| e["name"] != json!(key));
            if list.len() == before {
                let names: Vec<String> = list.iter().map(|e| cell(&e["name"])).collect();
                return Err(Failure::Usage(format!(
                    "--unset-env {key}: {} has no such variable (it has: {})",
                    args.name,
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                )));
            }
        }
        body.insert("env".into(), Value::Array(list));
    }
    if body.is_empty() {
        return Err(Failure::Usage(format!(
            "nothing to change in {}: give at least one setting (`lull service update --help` lists them)",
            args.name
        )));
    }
    let body = Value::Object(body);
    let started = ctx
        .send(Method::PATCH, &service_path(&args.name), Some(&body))
        .await?;
    ctx.follow_started(&started, !args.flags.no_wait).await
}

/// Writes the flags given into the API's JSON form of a service. `env_replaces`: `-e` sets
/// the whole list (update); otherwise the caller merged it (create).
fn apply_flags(body: &mut Map<String, Value>, flags: &SpecFlags, env_replaces: bool) {
    if let Some(image) = &flags.image {
        body.insert(
            "source".into(),
            json!({"type": "image", "reference": image}),
        );
    }
    if let Some(port) = flags.port {
        body.insert("port".into(), json!(port));
    }
    if env_replaces && !flags.env.is_empty() {
        let list: Vec<Value> = flags
            .env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        body.insert("env".into(), Value::Array(list));
    }
    if !flags.secrets.is_empty() {
        body.insert("secrets".into(), Value::Array(flags.secrets.clone()));
    }
    if !flags.volumes.is_empty() {
        body.insert("volumes".into(), Value::Array(flags.volumes.clone()));
    }
    let mut size = Map::new();
    if let Some(cpu) = flags.cpu {
        size.insert("cpu".into(), json!(cpu));
    }
    if let Some(memory) = &flags.memory {
        size.insert("memory".into(), json!(memory));
    }
    merge_object(body, "size", size);
    if let Some(n) = flags.min {
        body.insert("min_instances".into(), json!(n));
    }
    if let Some(n) = flags.max {
        body.insert("max_instances".into(), json!(n));
    }
    if let Some(n) = flags.concurrency {
        body.insert("max_concurrency".into(), json!(n));
    }
    let mut scaling = Map::new();
    if let Some(t) = flags.target_utilisation {
        scaling.insert("target_utilisation".into(), json!(t));
    }
    if let Some(w) = &flags.scale_in_window {
        scaling.insert("scale_in_window".into(), json!(w));
    }
    if let Some(z) = &flags.scale_to_zero_after {
        scaling.insert("scale_to_zero_after".into(), json!(z));
    }
    merge_object(body, "scaling", scaling);
    if !flags.hostnames.is_empty() {
        body.insert("hostnames".into(), json!(flags.hostnames));
    }
    if let Some(path) = &flags.health_path {
        let mut health = Map::new();
        health.insert("protocol".into(), json!("http"));
        health.insert("path".into(), json!(path));
        merge_object(body, "health_check", health);
    }
    if let Some(delay) = &flags.idle_delay {
        body.insert("idle_delay".into(), json!(delay));
    }
    if let Some(freeze) = &flags.freeze_after {
        body.insert("freeze_after".into(), json!(freeze));
    }
    if let Some(mode) = flags.cpu_mode {
        let mode = match mode {
            CpuModeArg::Request => "request",
            CpuModeArg::Always => "always",
        };
        body.insert("cpu_mode".into(), json!(mode));
    }
    if let Some(redirect) = flags.https_redirect {
        body.insert("https_redirect".into(), json!(redirect == OnOff::On));
    }
    if let Some(hsts) = &flags.hsts {
        body.insert("hsts".into(), hsts.clone());
    }
}

/// Sets `fields` inside `body[key]` (an object), keeping the fields it has.
fn merge_object(body: &mut Map<String, Value>, key: &str, fields: Map<String, Value>) {
    if fields.is_empty() {
        return;
    }
    let entry = body
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    match entry {
        Value::Object(existing) => existing.extend(fields),
        other => *other = Value::Object(fields),
    }
}

fn file_name(flags: &SpecFlags) -> String {
    flags
        .from_file
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the file".to_owned())
}

/// A `--from-file`: JSON (the API's form), an export (apprunner.yaml then lull's document), or
/// a plain apprunner.yaml (its run section).
fn read_file(path: &Path) -> Result<Map<String, Value>, Failure> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("--from-file {shown}: {e}")))?;
    let is_json =
        path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if is_json {
        return match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(Failure::Usage(format!(
                "{shown}: expected a JSON object (a service's settings)"
            ))),
            Err(e) => Err(Failure::Usage(format!("{shown}: not valid JSON: {e}"))),
        };
    }
    match lull_daemon::spec::import(&text) {
        Ok(spec) => match spec.to_json() {
            Value::Object(map) => Ok(map),
            _ => Err(Failure::Other(format!(
                "{shown}: the settings do not convert"
            ))),
        },
        Err(ExportError::MissingLull) => {
            // A plain apprunner.yaml: its run section.
            let config = AppRunnerConfig::parse(&text)
                .map_err(|e| Failure::Usage(format!("{shown}:\n{e}")))?;
            run_section(&config.run).map_err(|e| Failure::Usage(format!("{shown}: {e}")))
        }
        Err(ExportError::Spec(errors)) => {
            let mut text = format!("{shown}: invalid settings:");
            for e in &errors.0 {
                text.push_str(&format!("\n  {}: {}", e.path, e.message));
            }
            Err(Failure::Usage(text))
        }
        Err(e) => Err(Failure::Usage(format!("{shown}: {e}"))),
    }
}

/// App Runner's run settings in the API's JSON form: `command` (shell words, no args), the
/// port (App Runner's default 8080), `env` (and `network.env` set to the port), secrets by the
/// last segment of `value-from`.
fn run_section(run: &RunSection) -> Result<Map<String, Value>, String> {
    let mut body = Map::new();
    if let Some(command) = &run.command {
        let words = split_words(command).map_err(|e| format!("run.command: {e}"))?;
        body.insert("command".into(), json!(words));
        body.insert("args".into(), json!([]));
    }
    let port = run.network.port.unwrap_or(lull_daemon::spec::DEFAULT_PORT);
    body.insert("port".into(), json!(port));
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: String| match env.iter_mut().find(|(n, _)| n == name) {
        Some(existing) => existing.1 = value,
        None => env.push((name.to_owned(), value)),
    };
    for var in &run.env {
        set(&var.name, var.value.clone());
    }
    if let Some(name) = &run.network.env {
        set(name, port.to_string());
    }
    if !env.is_empty() {
        let list: Vec<Value> = env
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        body.insert("env".into(), Value::Array(list));
    }
    if !run.secrets.is_empty() {
        let list: Vec<Value> = run
            .secrets
            .iter()
            .map(|s| json!({"env": s.name, "secret": s.secret_name()}))
            .collect();
        body.insert("secrets".into(), Value::Array(list));
    }
    Ok(body)
}

async fn list(ctx: &Ctx) -> Outcome {
    let services = ctx.get("/v1/services").await?;
    if ctx.json {
        print_json(&services);
        return Ok(Exit::Ok);
    }
    print_services(&services);
    Ok(Exit::Ok)
}

/// The services table (also part of `lull status`).
pub fn print_services(services: &Value) {
    let rows: Vec<Vec<String>> = services
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            vec![
                cell(&s["name"]),
                state_text(s),
                revision_text(s),
                instances_text(s),
                s["urls"].get(0).map(cell).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!("no services yet: `lull service create NAME --image REF` makes one");
        return;
    }
    print_table(&["NAME", "STATE", "REVISION", "INSTANCES", "URL"], &rows);
}

fn state_text(view: &Value) -> String {
    let state = cell(&view["state"]);
    match view["status"]["operation"].as_str() {
        Some(_) => format!("{state}, deploying"),
        None => state,
    }
}

/// The current revision, and the serving one when it differs (after a failed deploy or a
/// rollback).
fn revision_text(view: &Value) -> String {
    let current = view["revision"].as_u64();
    let serving = view["status"]["serving"].as_u64();
    match (current, serving) {
        (Some(c), Some(s)) if c != s => format!("{c} ({s} serving)"),
        (Some(c), _) => c.to_string(),
        (None, _) => "-".into(),
    }
}

/// Healthy instances of the serving revision over all of them.
fn instances_text(view: &Value) -> String {
    let Some(instances) = view["status"]["instances"].as_array() else {
        return "-".into();
    };
    let serving = view["status"]["serving"].as_u64();
    let of_serving: Vec<&Value> = instances
        .iter()
        .filter(|i| serving.is_none() || i["revision"].as_u64() == serving)
        .collect();
    let healthy = of_serving
        .iter()
        .filter(|i| i["state"] == "healthy")
        .count();
    format!("{healthy}/{}", of_serving.len())
}

async fn show(ctx: &Ctx, name: &str) -> Outcome {
    let view = ctx.get(&service_path(name)).await?;
    if ctx.json {
        print_json(&view);
        return Ok(Exit::Ok);
    }
    let spec = &view["spec"];
    println!("{}  {}", cell(&view["name"]), state_text(&view));
    let row = |label: &str, value: String| println!("  {label:<12} {value}");
    row("revision", revision_text(&view));
    let urls: Vec<String> = view["urls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(cell)
        .collect();
    row(
        "urls",
        if urls.is_empty() {
            "- (the daemon has no HTTP listener)".into()
        } else {
            urls.join("\n               ")
        },
    );
    row("image", cell(&spec["source"]["reference"]));
    let words =
        |v: &Value| -> Vec<String> { v.as_array().into_iter().flatten().map(cell).collect() };
    let command = words(&spec["command"]);
    let args = words(&spec["args"]);
    if !command.is_empty() || !args.is_empty() {
        let shown = match (command.is_empty(), args.is_empty()) {
            (false, true) => command.join(" "),
            (true, false) => format!("(image's entrypoint) {}", args.join(" ")),
            _ => format!("{} {}", command.join(" "), args.join(" ")),
        };
        row("command", shown);
    }
    row("port", cell(&spec["port"]));
    let env: Vec<String> = spec["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| format!("{}={}", cell(&e["name"]), cell(&e["value"])))
        .collect();
    if !env.is_empty() {
        row("env", env.join("\n               "));
    }
    // Secrets by name only: their values never leave the daemon.
    let secrets: Vec<String> = spec["secrets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| match (s["env"].as_str(), s["file"].as_str()) {
            (Some(env), _) => format!("${env} from secret {}", cell(&s["secret"])),
            (_, Some(file)) => format!("{file} from secret {}", cell(&s["secret"])),
            _ => format!("secret {}", cell(&s["secret"])),
        })
        .collect();
    if !secrets.is_empty() {
        row("secrets", secrets.join("\n               "));
    }
    row(
        "size",
        format!(
            "{} vCPU, {} memory",
            cell(&spec["size"]["cpu"]),
            cell(&spec["size"]["memory"])
        ),
    );
    let scaling = &spec["scaling"];
    let target = scaling["target_utilisation"]
        .as_f64()
        .map_or("?".to_owned(), |t| format!("{:.0}%", t * 100.0));
    let mut scale = format!(
        "{} to {} instances, {} requests in flight each (sized for {target}); scale in after {} of low demand",
        cell(&spec["min_instances"]),
        cell(&spec["max_instances"]),
        cell(&spec["max_concurrency"]),
        cell(&scaling["scale_in_window"]),
    );
    if spec["min_instances"] == 0 {
        scale.push_str(&format!(
            "; to zero after {} without a request",
            cell(&scaling["scale_to_zero_after"])
        ));
    }
    row("scale", scale);
    let health = &spec["health_check"];
    row(
        "health",
        match health["protocol"].as_str() {
            Some("http") => format!(
                "GET {} answering {}, every {}",
                cell(&health["path"]),
                cell(&health["status"]),
                cell(&health["interval"])
            ),
            _ => format!("TCP connect, every {}", cell(&health["interval"])),
        },
    );
    row(
        "cpu",
        match spec["cpu_mode"].as_str() {
            Some("request") => match spec["idle_delay"].as_str() {
                Some("0" | "0s") | None => {
                    "while serving requests (throttled as soon as the last one ends)".into()
                }
                Some(delay) => {
                    format!("while serving requests (throttled {delay} after the last one)")
                }
            },
            _ => "always".into(),
        },
    );
    if let Some(freeze) = spec["freeze_after"].as_str()
        && !matches!(freeze, "0" | "0s")
    {
        row("idle", format!("frozen {freeze} after it is throttled"));
    }
    row("https", https_text(spec));
    for volume in spec["volumes"].as_array().into_iter().flatten() {
        let shared = match (volume["shared"] == true, volume["read_only"] == true) {
            (true, true) => " (shared, read-only)",
            (true, false) => " (shared)",
            (false, true) => " (read-only)",
            (false, false) => "",
        };
        row(
            "volume",
            format!(
                "{} at {}{shared}",
                cell(&volume["name"]),
                cell(&volume["path"])
            ),
        );
    }
    row("created", cell(&view["created_at"]));
    row("updated", cell(&view["updated_at"]));
    let status = &view["status"];
    if status.is_null() {
        row("running", "nothing (not deployed on this daemon)".into());
        return Ok(Exit::Ok);
    }
    if let Some(op) = status["operation"].as_str() {
        row("operation", format!("{op} running"));
    }
    row("restarts", cell(&status["restarts"]));
    let rows: Vec<Vec<String>> = status["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| vec![cell(&i["id"]), cell(&i["revision"]), cell(&i["state"])])
        .collect();
    println!();
    if rows.is_empty() {
        println!("no instances");
    } else {
        print_table(&["INSTANCE", "REVISION", "STATE"], &rows);
    }
    Ok(Exit::Ok)
}

/// What `service show` says of plain HTTP and HSTS.
fn https_text(spec: &Value) -> String {
    let redirect = if spec["https_redirect"] == false {
        "plain HTTP served as it is"
    } else {
        "plain HTTP redirected where a certificate covers the host"
    };
    let hsts = &spec["hsts"];
    let hsts = if hsts["enabled"] == true {
        let mut text = format!("HSTS max-age {}", cell(&hsts["max_age"]));
        if hsts["include_subdomains"] == true {
            text.push_str(", include-subdomains");
        }
        if hsts["preload"] == true {
            text.push_str(", preload");
        }
        text
    } else {
        "no HSTS".to_owned()
    };
    format!("{redirect}; {hsts}")
}

async fn delete(ctx: &Ctx, args: &DeleteArgs) -> Outcome {
    let stdin = std::io::stdin();
    if !args.yes && stdin.is_terminal() {
        print!(
            "delete service {}, stopping its instances and removing its routes? [y/N] ",
            args.name
        );
        std::io::stdout()
            .flush()
            .map_err(|e| Failure::Other(format!("write to the terminal: {e}")))?;
        let mut answer = String::new();
        stdin
            .lock()
            .read_line(&mut answer)
            .map_err(|e| Failure::Other(format!("read the answer: {e}")))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(Failure::Usage(format!(
                "{} not deleted (pass --yes to skip the question)",
                args.name
            )));
        }
    }
    let answer = ctx
        .send(Method::DELETE, &service_path(&args.name), None)
        .await?;
    if ctx.json {
        print_json(&answer);
    } else {
        println!(
            "deleted {}: instances stopped, routes removed (its events stay readable)",
            args.name
        );
    }
    Ok(Exit::Ok)
}

async fn pause(ctx: &Ctx, name: &str) -> Outcome {
    let sent = ctx
        .send(Method::POST, &format!("{}/pause", service_path(name)), None)
        .await;
    let answer = sent?;
    if ctx.json {
        print_json(&answer);
    } else {
        println!(
            "paused {name}: requests get 503 with Retry-After until `lull service resume {name}`"
        );
    }
    Ok(Exit::Ok)
}

async fn resume(ctx: &Ctx, args: &WaitArgs) -> Outcome {
    let name = &args.name;
    let sent = ctx
        .send(
            Method::POST,
            &format!("{}/resume", service_path(name)),
            None,
        )
        .await;
    let answer = sent?;
    if answer["operation"].is_string() {
        let started = json!({
            "service": name,
            "revision": answer["revision"],
            "operation": answer["operation"],
        });
        return ctx.follow_started(&started, !args.no_wait).await;
    }
    if ctx.json {
        print_json(&answer);
    } else {
        match answer["revision"].as_u64() {
            Some(revision) => println!("resumed {name}: revision {revision} serves again"),
            None => println!("resumed {name}"),
        }
    }
    Ok(Exit::Ok)
}

async fn export(ctx: &Ctx, name: &str) -> Outcome {
    if ctx.json {
        let view = ctx.get(&service_path(name)).await?;
        print_json(&view["spec"]);
        return Ok(Exit::Ok);
    }
    let yaml = ctx
        .get_text(&format!("{}/export", service_path(name)))
        .await?;
    print!("{yaml}");
    if !yaml.ends_with('\n') {
        println!();
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        flags: SpecFlags,
    }

    #[test]
    fn flags_become_the_api_form() {
        let probe = Probe::parse_from([
            "x",
            "--image",
            "fake/app:1",
            "--port",
            "9000",
            "-e",
            "A=1=2",
            "--cpu",
            "0.25",
            "--memory",
            "256M",
            "--min",
            "2",
            "--health-path",
            "/healthz",
            "--cpu-mode",
            "always",
            "--idle-delay",
            "2s",
        ]);
        let mut body = Map::new();
        body.insert("health_check".into(), json!({"interval": "5s"}));
        apply_flags(&mut body, &probe.flags, true);
        assert_eq!(
            Value::Object(body),
            json!({
                "source": {"type": "image", "reference": "fake/app:1"},
                "port": 9000,
                "env": [{"name": "A", "value": "1=2"}],
                "size": {"cpu": 0.25, "memory": "256M"},
                "min_instances": 2,
                "health_check": {"interval": "5s", "protocol": "http", "path": "/healthz"},
                "cpu_mode": "always",
                "idle_delay": "2s",
            })
        );
    }

    #[test]
    fn secret_and_volume_flags_become_the_api_form() {
        let probe = Probe::parse_from([
            "x",
            "--secret",
            "DB_PASS=db-pass",
            "--secret",
            "/run/secrets/tls.key=tls-key",
            "--volume",
            "data:/data",
            "--volume",
            "conf:/etc/app:ro:shared",
        ]);
        let mut body = Map::new();
        apply_flags(&mut body, &probe.flags, true);
        assert_eq!(
            Value::Object(body),
            json!({
                "secrets": [
                    {"env": "DB_PASS", "secret": "db-pass"},
                    {"file": "/run/secrets/tls.key", "secret": "tls-key"},
                ],
                "volumes": [
                    {"name": "data", "path": "/data"},
                    {"name": "conf", "path": "/etc/app", "read_only": true, "shared": true},
                ],
            })
        );
        for bad in ["DB_PASS", "=x", "X=", "/p="] {
            assert!(parse_secret(bad).is_err(), "{bad}");
        }
        for bad in ["data", "data:rel", ":/data", "data:/data:rw"] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn https_flags_become_the_api_form() {
        let probe = Probe::parse_from([
            "x",
            "--https-redirect",
            "off",
            "--hsts",
            "max-age=31536000,include-subdomains,preload",
        ]);
        let mut body = Map::new();
        apply_flags(&mut body, &probe.flags, true);
        assert_eq!(
            Value::Object(body),
            json!({
                "https_redirect": false,
                "hsts": {
                    "enabled": true,
                    "max_age": "31536000s",
                    "include_subdomains": true,
                    "preload": true,
                },
            })
        );
        assert_eq!(parse_hsts("off"), Ok(json!({"enabled": false})));
        assert_eq!(
            parse_hsts("max-age=365d"),
            Ok(
                json!({"enabled": true, "max_age": "365d", "include_subdomains": false, "preload": false})
            )
        );
        for bad in [
            "",
            "on",
            "max-age=",
            "include-subdomains",
            "max-age=1,sub",
            "preload,max-age=1",
        ] {
            assert!(parse_hsts(bad).is_err(), "{bad}");
        }
        let probe = Probe::parse_from(["x", "--https-redirect", "on"]);
        let mut body = Map::new();
        apply_flags(&mut body, &probe.flags, true);
        assert_eq!(Value::Object(body), json!({"https_redirect": true}));
        assert!(Probe::try_parse_from(["x", "--https-redirect", "yes"]).is_err());
    }

    #[test]
    fn show_describes_https() {
        let spec = json!({"https_redirect": true, "hsts": {"enabled": false}});
        assert_eq!(
            https_text(&spec),
            "plain HTTP redirected where a certificate covers the host; no HSTS"
        );
        let spec = json!({
            "https_redirect": false,
            "hsts": {"enabled": true, "max_age": "365d", "include_subdomains": true, "preload": false},
        });
        assert_eq!(
            https_text(&spec),
            "plain HTTP served as it is; HSTS max-age 365d, include-subdomains"
        );
    }

    #[test]
    fn env_flags_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=1").is_err());
    }
}
