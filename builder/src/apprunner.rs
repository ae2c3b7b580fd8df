//! `apprunner.yaml` (App Runner's configuration file, version 1.0): the model and a strict
//! reader. Every unknown key and bad value is reported, each with its line and column and the
//! key's path (`run.network.port`), and what was expected. Scalars are read as written (YAML
//! 1.1's `yes`/`no` and `1.0` stay text), so `version: 1.0` and `value: 0123` mean what they say.
//!
//! Only the first YAML document is apprunner.yaml; documents after it (`---`) are left to their
//! own readers (lull's export puts its own settings there).
//!
//! Files in the wild deviate from the format. What the reader does with each deviation (a
//! warning is a [`Problem`] in [`Parsed::warnings`]: line, column, key, and the canonical form):
//!
//! | written                                         | read as                  | reported |
//! |-------------------------------------------------|--------------------------|----------|
//! | `build: commands: [a, b]` (a bare list)         | `build.commands.build`   | warning showing `build: commands: build: [...]` |
//! | `build: [a, b]` (the section is a list)         | `build.commands.build`   | warning, same |
//! | `build: npm ci` / `pre-run: ./x` (one string)   | a list of one command    | warning showing `- CMD` |
//! | `version: 1`                                    | 1.0                      | warning: write `1.0` |
//! | `version: 2.0`, `1.1`                           | -                        | problem |
//! | `runtime: python3.11`, `nodejs-18`, `node18`    | -                        | problem naming the canonical spelling (`python311`, `nodejs18`) |
//! | `runtime: cobol` (no App Runner runtime)        | -                        | problem listing the runtimes |
//! | `runtime: go1` (App Runner's, not built by lull)| `go1`                    | nothing here: the builder refuses it, with advice |
//! | `port: "8080"` (quoted)                         | 8080                     | warning: write it unquoted |
//! | `value: 8080`, `value: true`, `value: yes`      | the text as written      | nothing: App Runner's env values are text, and YAML 1.1's booleans and octals are not resolved |
//! | `command: [python, app.py]` (a list)            | -                        | problem: one command line is expected |

use std::fmt;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};
use saphyr_parser::Parser;

use crate::runtimes;

/// The file name App Runner looks for.
pub const FILE_NAME: &str = "apprunner.yaml";
/// The one version of the format.
pub const VERSION: &str = "1.0";
/// `run.network.port` when absent.
pub const DEFAULT_PORT: u16 = 8080;

/// An apprunner.yaml file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppRunnerConfig {
    /// Always [`VERSION`].
    pub version: String,
    /// `python3`, `nodejs18`, ...; absent for an image-based service.
    pub runtime: Option<String>,
    pub build: Option<BuildSection>,
    pub run: RunSection,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildSection {
    pub commands: BuildCommands,
    pub env: Vec<EnvEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildCommands {
    pub pre_build: Vec<String>,
    pub build: Vec<String>,
    pub post_build: Vec<String>,
}

/// The `run` section: how an instance starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunSection {
    pub runtime_version: Option<String>,
    /// Commands run before `command`, in the image being built.
    pub pre_run: Vec<String>,
    /// The start command, one line of shell words.
    pub command: Option<String>,
    pub network: RunNetwork,
    pub env: Vec<EnvEntry>,
    pub secrets: Vec<SecretEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunNetwork {
    /// `None`: [`DEFAULT_PORT`].
    pub port: Option<u16>,
    /// The name of an environment variable that receives the port (besides `PORT`).
    pub env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry {
    pub name: String,
    pub value: String,
}

/// `{name, value-from}`: an environment variable whose value is a secret, named by an ARN or a
/// path whose last segment names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub name: String,
    pub value_from: String,
}

/// A file read with the deviations it was forgiven.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub config: AppRunnerConfig,
    /// In file order; each reads like a problem (`LINE:COL: key: message`).
    pub warnings: Vec<Problem>,
}

/// One thing wrong in the file (or, in [`Parsed::warnings`], forgiven).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// `run.env[1].name`; empty for the document itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.line, self.column, self.key, self.message
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppRunnerError {
    /// Every problem, in file order; each line reads `apprunner.yaml:LINE:COL: key: message`.
    #[error("{}", render(problems))]
    Invalid { problems: Vec<Problem> },
}

impl AppRunnerError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            AppRunnerError::Invalid { problems } => problems,
        }
    }
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{FILE_NAME}:{p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl AppRunnerConfig {
    /// Reads the first YAML document of `text` as an apprunner.yaml; deviations the reader
    /// forgives are dropped (see [`AppRunnerConfig::parse_with_warnings`]).
    pub fn parse(text: &str) -> Result<AppRunnerConfig, AppRunnerError> {
        Self::parse_with_warnings(text).map(|parsed| parsed.config)
    }

    /// Reads the first YAML document of `text` as an apprunner.yaml, with a warning for each
    /// deviation forgiven (see the module's docs).
    pub fn parse_with_warnings(text: &str) -> Result<Parsed, AppRunnerError> {
        let docs = load(text)?;
        let mut walk = Walk::default();
        let config = match docs.first() {
            Some(doc) => walk.document(doc),
            None => {
                walk.push(1, 1, "", format!("the file is empty (expected at least `version: {VERSION}` and a run section)"));
                AppRunnerConfig::default()
            }
        };
        if walk.problems.is_empty() {
            walk.warnings.sort_by_key(|p| (p.line, p.column));
            Ok(Parsed {
                config,
                warnings: walk.warnings,
            })
        } else {
            walk.problems.sort_by_key(|p| (p.line, p.column));
            Err(AppRunnerError::Invalid {
                problems: walk.problems,
            })
        }
    }
}

/// Loads every YAML document of `text` keeping scalars as written (no type resolution), with
/// their positions. Syntax errors come back as problems.
pub fn load(text: &str) -> Result<Vec<MarkedYaml<'_>>, AppRunnerError> {
    let mut loader: YamlLoader<'_, MarkedYaml<'_>> = YamlLoader::default();
    loader.early_parse(false);
    let mut parser = Parser::new_from_str(text);
    let scan = parser.load(&mut loader, true);
    let error = scan.err().or_else(|| loader.error().cloned());
    if let Some(e) = error {
        return Err(AppRunnerError::Invalid {
            problems: vec![Problem {
                line: e.marker().line(),
                column: e.marker().col() + 1,
                key: String::new(),
                message: format!("not valid YAML: {}", e.info()),
            }],
        });
    }
    Ok(loader.into_documents())
}

/// A scalar as written, or `None` for another kind of node. YAML's null (`~`, `null`, nothing)
/// is `Some("")` only when quoted.
pub fn scalar<'a>(node: &'a MarkedYaml<'_>) -> Option<Scalar<'a>> {
    match &node.data {
        YamlData::Representation(text, style, _) => Some(Scalar {
            text,
            quoted: !matches!(style, ScalarStyle::Plain),
        }),
        _ => None,
    }
}

/// A scalar's text and whether it was quoted (or a block scalar).
#[derive(Debug, Clone, Copy)]
pub struct Scalar<'a> {
    pub text: &'a str,
    pub quoted: bool,
}

impl Scalar<'_> {
    /// Plain `~`, `null` or nothing.
    pub fn is_null(&self) -> bool {
        !self.quoted && matches!(self.text, "" | "~" | "null" | "Null" | "NULL")
    }
}

/// What kind of node this is, for messages: "a list", "a map", "text".
pub fn kind(node: &MarkedYaml<'_>) -> &'static str {
    match &node.data {
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a map",
        YamlData::Representation(..) | YamlData::Value(_) => {
            if scalar(node).is_some_and(|s| s.is_null()) {
                "nothing"
            } else {
                "text"
            }
        }
        YamlData::Alias(_) => "an alias",
        YamlData::Tagged(..) => "a tagged value",
        YamlData::BadValue => "a bad value",
    }
}

const TOP_KEYS: &[&str] = &["version", "runtime", "build", "run"];
const BUILD_KEYS: &[&str] = &["commands", "env"];
const COMMAND_KEYS: &[&str] = &["pre-build", "build", "post-build"];
const RUN_KEYS: &[&str] = &[
    "runtime-version",
    "pre-run",
    "command",
    "network",
    "env",
    "secrets",
];
const NETWORK_KEYS: &[&str] = &["port", "env"];
const ENV_KEYS: &[&str] = &["name", "value"];
const SECRET_KEYS: &[&str] = &["name", "value-from"];

type Node<'i> = MarkedYaml<'i>;

const CANONICAL_BUILD: &str = "build: commands: build: [CMD, ...]";

#[derive(Default)]
struct Walk {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Walk {
    fn push(&mut self, line: usize, column: usize, key: &str, message: String) {
        self.problems.push(Problem {
            line,
            column,
            key: key.to_string(),
            message,
        });
    }

    fn at(&mut self, node: &Node, key: &str, message: String) {
        self.push(
            node.span.start.line(),
            node.span.start.col() + 1,
            key,
            message,
        );
    }

    fn warn(&mut self, node: &Node, key: &str, message: String) {
        self.warnings.push(Problem {
            line: node.span.start.line(),
            column: node.span.start.col() + 1,
            key: key.to_string(),
            message,
        });
    }

    fn wrong(&mut self, node: &Node, key: &str, expected: &str) {
        self.at(
            node,
            key,
            format!("found {} (expected {expected})", kind(node)),
        );
    }

    /// The entries of a map, unknown keys reported; `None` when `node` is not a map.
    fn map<'a, 'i>(
        &mut self,
        node: &'a Node<'i>,
        prefix: &str,
        known: &[&str],
        expected: &str,
    ) -> Option<Vec<(String, &'a Node<'i>)>> {
        let YamlData::Mapping(map) = &node.data else {
            self.wrong(node, prefix, expected);
            return None;
        };
        let mut out = Vec::new();
        for (key, value) in map.iter() {
            let Some(name) = scalar(key).map(|s| s.text) else {
                self.wrong(key, prefix, "a key");
                continue;
            };
            let path = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            };
            if known.contains(&name) {
                out.push((path, value));
            } else {
                self.at(
                    key,
                    &path,
                    format!("unknown key (expected one of {})", known.join(", ")),
                );
            }
        }
        Some(out)
    }

    fn text(&mut self, node: &Node, key: &str, expected: &str) -> Option<String> {
        match scalar(node) {
            Some(s) if !s.is_null() => Some(s.text.to_string()),
            _ => {
                self.wrong(node, key, expected);
                None
            }
        }
    }

    /// A value that may be empty (`value:` with nothing after it is "").
    fn value(&mut self, node: &Node, key: &str) -> Option<String> {
        match scalar(node) {
            Some(s) if s.is_null() => Some(String::new()),
            Some(s) => Some(s.text.to_string()),
            None => {
                self.wrong(node, key, "text");
                None
            }
        }
    }

    fn list<'a, 'i>(
        &mut self,
        node: &'a Node<'i>,
        key: &str,
        expected: &str,
    ) -> Vec<(String, &'a Node<'i>)> {
        match &node.data {
            YamlData::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (format!("{key}[{i}]"), item))
                .collect(),
            _ if scalar(node).is_some_and(|s| s.is_null()) => Vec::new(),
            _ => {
                self.wrong(node, key, expected);
                Vec::new()
            }
        }
    }

    fn commands(&mut self, node: &Node, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        // One command may be written without the list.
        if let Some(s) = scalar(node)
            && !s.is_null()
        {
            self.warn(
                node,
                key,
                format!(
                    "one command without a list, read as a list of one (write it as `- {}`)",
                    s.text
                ),
            );
            return vec![s.text.to_string()];
        }
        for (key, item) in self.list(node, key, "a list of commands") {
            if let Some(command) = self.text(item, &key, "a command") {
                out.push(command);
            }
        }
        out
    }

    fn document(&mut self, doc: &Node) -> AppRunnerConfig {
        let mut config = AppRunnerConfig::default();
        let Some(entries) = self.map(
            doc,
            "",
            TOP_KEYS,
            "a map with version, runtime, build and run",
        ) else {
            return config;
        };
        let mut has_version = false;
        let mut has_run = false;
        for (key, value) in entries {
            match key.as_str() {
                "version" => {
                    has_version = true;
                    if let Some(v) = self.text(value, &key, "1.0") {
                        if v == VERSION {
                            config.version = VERSION.to_string();
                        } else if v == "1" {
                            self.warn(
                                value,
                                &key,
                                "read as 1.0 (write `version: 1.0`)".to_string(),
                            );
                            config.version = VERSION.to_string();
                        } else {
                            self.at(
                                value,
                                &key,
                                format!("unsupported version {v:?} (expected 1.0)"),
                            );
                        }
                    }
                }
                "runtime" => {
                    config.runtime =
                        self.text(value, &key, "a runtime name such as python3 or nodejs18");
                    if let Some(name) = &config.runtime
                        && !runtimes::is_known(name)
                    {
                        let message = match runtimes::canonical_spelling(name) {
                            Some(canonical) => {
                                format!(
                                    "unknown runtime {name:?} (App Runner spells it {canonical})"
                                )
                            }
                            None => format!(
                                "unknown runtime {name:?} (expected one of {})",
                                runtimes::known_names().join(", ")
                            ),
                        };
                        self.at(value, &key, message);
                    }
                }
                "build" if matches!(value.data, YamlData::Sequence(_)) => {
                    self.warn(value, &key, format!("found a list, read as build.commands.build (App Runner expects {CANONICAL_BUILD})"));
                    let mut build = BuildSection::default();
                    build.commands.build = self.commands(value, "build.commands.build");
                    config.build = Some(build);
                }
                "build" => config.build = Some(self.build(value, &key)),
                "run" => {
                    has_run = true;
                    config.run = self.run(value, &key);
                }
                _ => {}
            }
        }
        if !has_version {
            self.at(
                doc,
                "version",
                format!("missing (expected `version: {VERSION}` at the top)"),
            );
        }
        if !has_run {
            self.at(
                doc,
                "run",
                "missing (expected a run section with at least a command)".to_string(),
            );
        }
        config
    }

    fn build(&mut self, node: &Node, prefix: &str) -> BuildSection {
        let mut build = BuildSection::default();
        let Some(entries) = self.map(node, prefix, BUILD_KEYS, "a map with commands and env")
        else {
            return build;
        };
        for (key, value) in entries {
            if key.ends_with(".commands") {
                if matches!(value.data, YamlData::Sequence(_)) {
                    self.warn(
                        value,
                        &key,
                        format!("found a list, read as build.commands.build (App Runner expects {CANONICAL_BUILD})"),
                    );
                    build.commands.build = self.commands(value, &format!("{key}.build"));
                    continue;
                }
                let Some(phases) = self.map(
                    value,
                    &key,
                    COMMAND_KEYS,
                    "a map with pre-build, build and post-build",
                ) else {
                    continue;
                };
                for (key, value) in phases {
                    let commands = self.commands(value, &key);
                    if key.ends_with(".pre-build") {
                        build.commands.pre_build = commands;
                    } else if key.ends_with(".post-build") {
                        build.commands.post_build = commands;
                    } else {
                        build.commands.build = commands;
                    }
                }
            } else {
                build.env = self.env(value, &key);
            }
        }
        build
    }

    fn env(&mut self, node: &Node, prefix: &str) -> Vec<EnvEntry> {
        let mut out = Vec::new();
        for (key, item) in self.list(node, prefix, "a list of {name, value}") {
            let Some(fields) = self.map(item, &key, ENV_KEYS, "{name, value}") else {
                continue;
            };
            let name = self.required(item, &key, &fields, "name", "a variable name");
            let value = fields
                .iter()
                .find(|(k, _)| k.ends_with(".value"))
                .and_then(|(k, v)| self.value(v, k));
            if !fields.iter().any(|(k, _)| k.ends_with(".value")) {
                self.at(
                    item,
                    &format!("{key}.value"),
                    "missing (expected a value)".to_string(),
                );
            }
            if let (Some(name), Some(value)) = (name, value) {
                out.push(EnvEntry { name, value });
            }
        }
        out
    }

    fn required(
        &mut self,
        item: &Node,
        key: &str,
        fields: &[(String, &Node)],
        field: &str,
        expected: &str,
    ) -> Option<String> {
        let suffix = format!(".{field}");
        match fields.iter().find(|(k, _)| k.ends_with(&suffix)) {
            Some((k, v)) => self.text(v, k, expected),
            None => {
                self.at(
                    item,
                    &format!("{key}{suffix}"),
                    format!("missing (expected {expected})"),
                );
                None
            }
        }
    }

    fn run(&mut self, node: &Node, prefix: &str) -> RunSection {
        let mut run = RunSection::default();
        let Some(entries) = self.map(
            node,
            prefix,
            RUN_KEYS,
            "a map with command, network, env and secrets",
        ) else {
            return run;
        };
        for (key, value) in entries {
            match key.trim_start_matches("run.") {
                "runtime-version" => {
                    run.runtime_version = self.text(value, &key, "a version such as 3.11")
                }
                "pre-run" => run.pre_run = self.commands(value, &key),
                "command" => {
                    run.command = self.text(value, &key, "a command line such as `python app.py`")
                }
                "network" => run.network = self.network(value, &key),
                "env" => run.env = self.env(value, &key),
                _ => run.secrets = self.secrets(value, &key),
            }
        }
        run
    }

    fn network(&mut self, node: &Node, prefix: &str) -> RunNetwork {
        let mut network = RunNetwork::default();
        let Some(entries) = self.map(node, prefix, NETWORK_KEYS, "a map with port and env") else {
            return network;
        };
        for (key, value) in entries {
            if key.ends_with(".port") {
                let Some(text) = self.text(value, &key, "a port number from 1 to 65535") else {
                    continue;
                };
                if scalar(value).is_some_and(|s| s.quoted) && text.parse::<u16>().is_ok() {
                    self.warn(
                        value,
                        &key,
                        format!("a quoted port, read as {text} (write it without quotes: `port: {text}`)"),
                    );
                }
                match text.parse::<u16>() {
                    Ok(port) if port > 0 => network.port = Some(port),
                    _ => self.at(
                        value,
                        &key,
                        format!("{text:?} is not a port (expected a number from 1 to 65535)"),
                    ),
                }
            } else {
                network.env = self.text(value, &key, "the name of an environment variable");
            }
        }
        network
    }

    fn secrets(&mut self, node: &Node, prefix: &str) -> Vec<SecretEntry> {
        let mut out = Vec::new();
        for (key, item) in self.list(node, prefix, "a list of {name, value-from}") {
            let Some(fields) = self.map(item, &key, SECRET_KEYS, "{name, value-from}") else {
                continue;
            };
            let name = self.required(item, &key, &fields, "name", "a variable name");
            let value_from =
                self.required(item, &key, &fields, "value-from", "a secret's ARN or path");
            if let (Some(name), Some(value_from)) = (name, value_from) {
                out.push(SecretEntry { name, value_from });
            }
        }
        out
    }
}

impl SecretEntry {
    /// The lull secret `value-from` names: the last segment of its ARN or path
    /// (`arn:aws:secretsmanager:...:secret:db-pass` → `db-pass`,
    /// `arn:aws:ssm:...:parameter/prod/db-pass` → `db-pass`).
    pub fn secret_name(&self) -> &str {
        self.value_from
            .rsplit([':', '/'])
            .next()
            .unwrap_or(&self.value_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match AppRunnerConfig::parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn the_documentation_example() {
        let text = "version: 1.0\nruntime: python3 \nbuild:\n  commands:\n    build:\n      - pip install pipenv\n      - pipenv install \nrun: \n  command: python app.py\n";
        let c = AppRunnerConfig::parse(text).unwrap();
        assert_eq!(c.version, "1.0");
        assert_eq!(c.runtime.as_deref(), Some("python3"));
        let build = c.build.unwrap();
        assert_eq!(
            build.commands.build,
            ["pip install pipenv", "pipenv install"]
        );
        assert!(build.commands.pre_build.is_empty());
        assert_eq!(c.run.command.as_deref(), Some("python app.py"));
        assert_eq!(c.run.network, RunNetwork::default());
    }

    #[test]
    fn every_key_of_a_full_file() {
        let text = r#"version: 1.0
runtime: nodejs18
build:
  commands:
    pre-build:
      - npm ci
    build: npm run build
    post-build:
      - npm prune --production
  env:
    - name: NODE_ENV
      value: production
run:
  runtime-version: 18.19.0
  pre-run:
    - node migrate.js
  command: node server.js --color "deep blue"
  network:
    port: 8000
    env: APP_PORT
  env:
    - name: FLAG
      value: yes
    - name: ZIP
      value: 0123
    - name: EMPTY
      value:
  secrets:
    - name: DB_PASS
      value-from: "arn:aws:secretsmanager:us-east-1:123456789012:secret:db-pass"
    - name: API_KEY
      value-from: arn:aws:ssm:us-east-1:123456789012:parameter/prod/api-key
"#;
        let c = AppRunnerConfig::parse(text).unwrap();
        let build = c.build.unwrap();
        assert_eq!(build.commands.pre_build, ["npm ci"]);
        assert_eq!(build.commands.build, ["npm run build"]);
        assert_eq!(build.commands.post_build, ["npm prune --production"]);
        assert_eq!(
            build.env,
            [EnvEntry {
                name: "NODE_ENV".into(),
                value: "production".into()
            }]
        );
        let run = c.run;
        assert_eq!(run.runtime_version.as_deref(), Some("18.19.0"));
        assert_eq!(run.pre_run, ["node migrate.js"]);
        assert_eq!(
            run.command.as_deref(),
            Some(r#"node server.js --color "deep blue""#)
        );
        assert_eq!(
            run.network,
            RunNetwork {
                port: Some(8000),
                env: Some("APP_PORT".into())
            }
        );
        // Scalars as written: no YAML 1.1 booleans, no octal, no lost zeros.
        let env: Vec<(&str, &str)> = run
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(env, [("FLAG", "yes"), ("ZIP", "0123"), ("EMPTY", "")]);
        let secrets: Vec<(&str, &str)> = run
            .secrets
            .iter()
            .map(|s| (s.name.as_str(), s.secret_name()))
            .collect();
        assert_eq!(secrets, [("DB_PASS", "db-pass"), ("API_KEY", "api-key")]);
    }

    #[test]
    fn later_documents_are_not_read() {
        let c =
            AppRunnerConfig::parse("version: 1.0\nrun:\n  command: ./app\n---\nanything: [goes\n")
                .err();
        // A syntax error anywhere in the stream is still a syntax error.
        assert!(c.is_some());
        let c =
            AppRunnerConfig::parse("version: 1.0\nrun:\n  command: ./app\n---\nlull:\n  size: 1\n")
                .unwrap();
        assert_eq!(c.run.command.as_deref(), Some("./app"));
    }

    #[test]
    fn every_problem_with_its_line_and_key() {
        let text = r#"version: 2.0
runtime: python3
biuld:
  commands: []
build:
  commands:
    - pip install -r requirements.txt
run:
  command: [python, app.py]
  network:
    port: 80800
    protocol: tcp
  env:
    - name: A
    - value: x
      nmae: B
  secrets:
    - name: S
"#;
        assert_eq!(
            problems(text),
            [
                "apprunner.yaml:1:10: version: unsupported version \"2.0\" (expected 1.0)",
                "apprunner.yaml:3:1: biuld: unknown key (expected one of version, runtime, build, run)",
                "apprunner.yaml:9:12: run.command: found a list (expected a command line such as `python app.py`)",
                "apprunner.yaml:11:11: run.network.port: \"80800\" is not a port (expected a number from 1 to 65535)",
                "apprunner.yaml:12:5: run.network.protocol: unknown key (expected one of port, env)",
                "apprunner.yaml:14:7: run.env[0].value: missing (expected a value)",
                "apprunner.yaml:15:7: run.env[1].name: missing (expected a variable name)",
                "apprunner.yaml:16:7: run.env[1].nmae: unknown key (expected one of name, value)",
                "apprunner.yaml:18:7: run.secrets[0].value-from: missing (expected a secret's ARN or path)",
            ]
        );
    }

    #[test]
    fn missing_sections_and_syntax_errors() {
        assert_eq!(
            problems("runtime: python3\n"),
            [
                "apprunner.yaml:1:1: version: missing (expected `version: 1.0` at the top)",
                "apprunner.yaml:1:1: run: missing (expected a run section with at least a command)",
            ]
        );
        assert_eq!(
            problems(""),
            [
                "apprunner.yaml:1:1: the file is empty (expected at least `version: 1.0` and a run section)"
            ]
        );
        let got = problems("version: 1.0\nrun:\n  command: \"python\n");
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("apprunner.yaml:3:") || got[0].starts_with("apprunner.yaml:4:"),
            "{got:?}"
        );
        assert!(got[0].contains("not valid YAML"), "{got:?}");
        let got = problems("- version\n");
        assert_eq!(
            got,
            [
                "apprunner.yaml:1:1: found a list (expected a map with version, runtime, build and run)"
            ]
        );
        let got = problems("version: 1.0\nversion: 1.0\nrun: {}\n");
        assert!(got[0].starts_with("apprunner.yaml:2:"), "{got:?}");
    }

    #[test]
    fn deviations_forgiven_with_a_warning() {
        const HEAD: &str = "version: 1.0\nruntime: python3\n";
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "build.commands as a bare list",
                "build:\n  commands:\n    - pip install -r requirements.txt\n    - python build.py\nrun:\n  command: python app.py\n",
                &[
                    "5:5: build.commands: found a list, read as build.commands.build (App Runner expects build: commands: build: [CMD, ...])",
                ],
            ),
            (
                "build as a list",
                "build:\n  - pip install -r requirements.txt\n  - python build.py\nrun:\n  command: python app.py\n",
                &[
                    "4:3: build: found a list, read as build.commands.build (App Runner expects build: commands: build: [CMD, ...])",
                ],
            ),
            (
                "one command as a string",
                "build:\n  commands:\n    build: pip install -r requirements.txt\n    post-build: python build.py\nrun:\n  command: python app.py\n",
                &[
                    "5:12: build.commands.build: one command without a list, read as a list of one (write it as `- pip install -r requirements.txt`)",
                    "6:17: build.commands.post-build: one command without a list, read as a list of one (write it as `- python build.py`)",
                ],
            ),
            (
                "a quoted port",
                "run:\n  command: python app.py\n  network:\n    port: \"8080\"\n",
                &[
                    "6:11: run.network.port: a quoted port, read as 8080 (write it without quotes: `port: 8080`)",
                ],
            ),
            (
                "env values that look like numbers and booleans: as written, no warning",
                "run:\n  command: python app.py\n  env:\n    - name: N\n      value: 8080\n    - name: B\n      value: true\n",
                &[],
            ),
        ];
        for (name, body, want) in cases {
            let parsed = AppRunnerConfig::parse_with_warnings(&format!("{HEAD}{body}"))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let got: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
            assert_eq!(&got, want, "{name}");
            let build = parsed.config.build.unwrap_or_default();
            if name.starts_with("build") {
                assert_eq!(
                    build.commands.build,
                    ["pip install -r requirements.txt", "python build.py"],
                    "{name}"
                );
            }
            if name.starts_with("one command") {
                assert_eq!(build.commands.build, ["pip install -r requirements.txt"]);
                assert_eq!(build.commands.post_build, ["python build.py"]);
            }
        }
        let parsed =
            AppRunnerConfig::parse_with_warnings("version: 1\nrun:\n  command: ./app\n").unwrap();
        assert_eq!(parsed.config.version, "1.0");
        assert_eq!(
            parsed.warnings[0].to_string(),
            "1:10: version: read as 1.0 (write `version: 1.0`)"
        );
        let c = AppRunnerConfig::parse(
            "version: 1.0\nrun:\n  command: ./app\n  network:\n    port: \"8080\"\n  env:\n    - name: B\n      value: true\n",
        )
        .unwrap();
        assert_eq!(c.run.network.port, Some(8080));
        assert_eq!(c.run.env[0].value, "true");
    }

    #[test]
    fn runtime_names_are_app_runners() {
        let cases: &[(&str, Option<&str>)] = &[
            ("python3", None),
            ("python311", None),
            ("nodejs22", None),
            // Known to App Runner, refused later by the builder with advice.
            ("go1", None),
            ("corretto11", None),
            (
                "python3.11",
                Some(
                    "apprunner.yaml:2:10: runtime: unknown runtime \"python3.11\" (App Runner spells it python311)",
                ),
            ),
            (
                "nodejs-18",
                Some(
                    "apprunner.yaml:2:10: runtime: unknown runtime \"nodejs-18\" (App Runner spells it nodejs18)",
                ),
            ),
            (
                "node18",
                Some(
                    "apprunner.yaml:2:10: runtime: unknown runtime \"node18\" (App Runner spells it nodejs18)",
                ),
            ),
            (
                "cobol",
                Some(
                    "apprunner.yaml:2:10: runtime: unknown runtime \"cobol\" (expected one of corretto8, corretto11, dotnet6, go1, nodejs12, nodejs14, nodejs16, nodejs18, nodejs20, nodejs22, php81, python3, python311, ruby31)",
                ),
            ),
        ];
        for (runtime, want) in cases {
            let text = format!("version: 1.0\nruntime: {runtime}\nrun:\n  command: ./app\n");
            match want {
                None => {
                    let c = AppRunnerConfig::parse(&text).unwrap();
                    assert_eq!(c.runtime.as_deref(), Some(*runtime));
                }
                Some(want) => assert_eq!(problems(&text), [*want], "{runtime}"),
            }
        }
        // A wrong version stays a problem, and `version: 1.0` quoted is fine.
        assert_eq!(
            problems("version: 1.1\nrun:\n  command: ./app\n"),
            ["apprunner.yaml:1:10: version: unsupported version \"1.1\" (expected 1.0)"]
        );
        let parsed =
            AppRunnerConfig::parse_with_warnings("version: \"1.0\"\nrun:\n  command: ./app\n")
                .unwrap();
        assert!(parsed.warnings.is_empty());
        // A list where one command line is expected stays a problem.
        assert_eq!(
            problems("version: 1.0\nrun:\n  command: [python, app.py]\n"),
            [
                "apprunner.yaml:3:12: run.command: found a list (expected a command line such as `python app.py`)"
            ]
        );
    }
}
