//! apprunner.yaml and services: a `run` section applied onto a spec, and a spec exported as an
//! apprunner.yaml that lull reads back. The export is two YAML documents: the first is a plain
//! apprunner.yaml (`version`, `run`); the second, after `---`, holds lull's other settings under
//! a `lull:` key. App Runner reads only the first document; lull reads both.

use lull_builder::apprunner::{AppRunnerConfig, AppRunnerError, RunSection};
use saphyr::{LoadableYamlNode, Scalar, Yaml};
use serde_json::{Map, Value};

use super::words::{join_words, split_words};
use super::{SecretRef, SecretTarget, ServiceSpec, ServiceUpdate, SpecErrors};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    AppRunner(#[from] AppRunnerError),
    #[error("the lull document: {0}")]
    Lull(String),
    #[error(
        "no lull document after the apprunner.yaml (expected `---` then `lull:` with at least name and source)"
    )]
    MissingLull,
    #[error("{0}")]
    Spec(#[from] SpecErrors),
}

/// Applies App Runner's run settings: `command` (shell words) replaces the command and clears
/// args; `network.port` sets the port; `network.env` names an extra variable that receives the
/// port; `env` sets variables (in place when already set); each secret's `value-from` names the
/// lull secret by its last segment. `runtime-version` and `pre-run` concern builds and are left
/// to the builder. The caller validates the spec afterwards.
pub fn apply_apprunner_run(spec: &mut ServiceSpec, run: &RunSection) -> Result<(), SpecErrors> {
    if let Some(command) = &run.command {
        let words =
            split_words(command).map_err(|e| SpecErrors::one("run.command", e.to_string()))?;
        spec.command = Some(words);
        spec.args = None;
    }
    if let Some(port) = run.network.port {
        spec.port = port;
    }
    for var in &run.env {
        spec.set_env(&var.name, &var.value);
    }
    if let Some(name) = &run.network.env {
        let port = spec.port.to_string();
        spec.set_env(name, &port);
    }
    for secret in &run.secrets {
        let target = SecretTarget::Env(secret.name.clone());
        let name = secret.secret_name().to_string();
        match spec.secrets.iter_mut().find(|s| s.target == target) {
            Some(existing) => existing.secret = name,
            None => spec.secrets.push(SecretRef {
                target,
                secret: name,
            }),
        }
    }
    Ok(())
}

/// The spec as an apprunner.yaml plus lull's own settings (see the module's docs).
pub fn export(spec: &ServiceSpec) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# apprunner.yaml for lull service {}, exported by `lull service export`.\n",
        spec.name
    ));
    out.push_str("# App Runner reads this first document; lull reads both.\n");
    out.push_str("version: 1.0\n");
    out.push_str("# runtime: none, the service runs an image (see source below)\n");
    out.push_str("run:\n");
    let command_in_run = spec.command.is_some() && spec.args.is_none();
    if let (true, Some(command)) = (command_in_run, &spec.command) {
        out.push_str(&format!("  command: {}\n", quote(&join_words(command))));
    }
    out.push_str(&format!("  network:\n    port: {}\n", spec.port));
    if !spec.env.is_empty() {
        out.push_str("  env:\n");
        for var in &spec.env {
            out.push_str(&format!(
                "    - name: {}\n      value: {}\n",
                quote(&var.name),
                quote(&var.value)
            ));
        }
    }
    let env_secrets: Vec<(&String, &String)> = spec
        .secrets
        .iter()
        .filter_map(|s| match &s.target {
            SecretTarget::Env(name) => Some((name, &s.secret)),
            SecretTarget::File(_) => None,
        })
        .collect();
    if !env_secrets.is_empty() {
        out.push_str("  secrets:\n");
        for (name, secret) in env_secrets {
            out.push_str(&format!(
                "    - name: {}\n      value-from: {}\n",
                quote(name),
                quote(secret)
            ));
        }
    }
    let mut lull = match spec.to_json() {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    lull.remove("port");
    lull.remove("env");
    if command_in_run {
        lull.remove("command");
        lull.remove("args");
    }
    if let Some(Value::Array(secrets)) = lull.get_mut("secrets") {
        secrets.retain(|s| s.get("file").is_some());
    }
    out.push_str(
        "---\n# lull's settings for this service (App Runner does not read them).\nlull:\n",
    );
    emit_map(&lull, 2, &mut out);
    out
}

/// Reads an [`export`]: the lull document's settings, then the apprunner.yaml's run section
/// over them; validated. Secrets read from the run section come before the lull document's
/// (file) secrets.
pub fn import(text: &str) -> Result<ServiceSpec, ExportError> {
    let config = AppRunnerConfig::parse(text)?;
    let docs = Yaml::load_from_str(text).map_err(|e| ExportError::Lull(e.to_string()))?;
    let lull = docs
        .get(1)
        .and_then(|doc| match doc {
            Yaml::Mapping(map) => map
                .iter()
                .find(|(k, _)| k.as_str() == Some("lull"))
                .map(|(_, v)| v),
            _ => None,
        })
        .ok_or(ExportError::MissingLull)?;
    let value = to_json(lull).map_err(ExportError::Lull)?;
    let update = ServiceUpdate::from_value(value)?;
    let mut spec = ServiceSpec::from_update_unchecked(&update)?;
    // The run section's secrets come first, as export wrote them.
    let lull_secrets: Vec<SecretRef> = spec.secrets.drain(..).collect();
    apply_apprunner_run(&mut spec, &config.run)?;
    spec.secrets.extend(lull_secrets);
    spec.validate()?;
    Ok(spec)
}

fn to_json(yaml: &Yaml) -> Result<Value, String> {
    Ok(match yaml {
        Yaml::Value(scalar) => match scalar {
            Scalar::Null => Value::Null,
            Scalar::Boolean(b) => Value::Bool(*b),
            Scalar::Integer(i) => Value::from(*i),
            Scalar::FloatingPoint(f) => Value::from(f.0),
            Scalar::String(s) => Value::String(s.to_string()),
        },
        Yaml::Sequence(items) => Value::Array(items.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Mapping(map) => {
            let mut out = Map::new();
            for (k, v) in map.iter() {
                let key = k
                    .as_str()
                    .ok_or_else(|| format!("a key is not text: {k:?}"))?;
                out.insert(key.to_string(), to_json(v)?);
            }
            Value::Object(out)
        }
        other => return Err(format!("unsupported YAML node {other:?}")),
    })
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of it).
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some("null".to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(quote(s)),
        Value::Array(a) if a.is_empty() => Some("[]".to_string()),
        Value::Object(o) if o.is_empty() => Some("{}".to_string()),
        _ => None,
    }
}

fn emit_map(map: &Map<String, Value>, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (key, value) in map {
        match scalar(value) {
            Some(s) => out.push_str(&format!("{pad}{key}: {s}\n")),
            None => {
                out.push_str(&format!("{pad}{key}:\n"));
                emit_value(value, indent + 2, out);
            }
        }
    }
}

fn emit_value(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => emit_map(map, indent, out),
        Value::Array(items) => {
            for item in items {
                match scalar(item) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        // `- ` then the item's lines, the first one on the dash's line.
                        let mut inner = String::new();
                        emit_value(item, indent + 2, &mut inner);
                        let inner = inner.trim_start();
                        out.push_str(&format!("{pad}- {inner}"));
                    }
                }
            }
        }
        other => {
            if let Some(s) = scalar(other) {
                out.push_str(&format!("{pad}{s}\n"));
            }
        }
    }
}
