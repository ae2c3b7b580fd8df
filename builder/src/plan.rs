//! The build plan: what a source build runs, in which order, on which files, in which
//! environment; pure (no host access: the source is a listing and a reader).
//!
//! A build runs in `/app` (the source's copy) on the runtime's base image. Each build command is
//! one shell line (`/bin/sh -c LINE`), as App Runner runs them. The commands of `pre-build` then
//! `build` are scanned from the first: the leading run of *dependency commands* becomes the
//! [`DependencyStep`], which runs on a tree holding only the files those commands read (the
//! manifests), so its layer is reused while they and the other inputs stay the same. Everything
//! from the first other command on (and all of `post-build`) is the [`BuildPlan::full_step`], run
//! on the full source over that layer: a later command may depend on an earlier one's side
//! effects, so nothing after a non-dependency command is moved before it.
//!
//! Dependency commands (anything else ends the run):
//! - `pip install` (also `pip3`, `pip3.11`, `python -m pip`, `python3 -m pip`, `uv pip install`)
//!   with requirement files (`-r`/`-c`, followed into nested `-r`/`-c` lines, relative to the
//!   file naming them) and/or named packages (`pip install --upgrade pip`, `gunicorn==22.0`), and
//!   options that do not name local files (`--no-cache-dir`, `-U`, `--user`, `-i URL`, ...).
//!   Not hoisted: `--target`/`--prefix`/`--root` (they could write into `/app` where the source
//!   then lands), `-e`/`--editable`, local paths (`.`, `./pkg`, wheels, `file:`), and
//!   requirement files holding any of those. `pip install .` is never hoisted, lock file or not:
//!   it builds the project itself, which needs its code, and pip reads no lock file.
//! - `pipenv install` with no packages: reads `Pipfile`, `Pipfile.lock`; not when the Pipfile
//!   names a local path.
//! - `uv sync`: reads `pyproject.toml`, `uv.lock`, `.python-version`, `uv.toml`. It installs the
//!   project itself too, which needs its code, so the dependency step runs it with
//!   `--no-install-project` and the full step runs the command as written (the dependencies are
//!   then already there). Not for uv workspaces or path sources.
//! - `npm ci`, `npm install`/`npm i` with no packages: read `package.json`, `package-lock.json`,
//!   `npm-shrinkwrap.json`, `.npmrc` (registry and resolution settings). `npm install express`
//!   changes the project and is not one; `npm install -g NAME...` is (it reads no manifest).
//! - `yarn`, `yarn install`: `package.json`, `yarn.lock`, `.yarnrc`, `.yarnrc.yml`, `.npmrc` and
//!   the files under `.yarn/releases`, `.yarn/plugins`, `.yarn/patches` (Yarn 2+ runs from them).
//! - `pnpm install`/`pnpm i`: `package.json`, `pnpm-lock.yaml`, `.npmrc`, `.pnpmfile.cjs`; not for
//!   pnpm workspaces or patched dependencies.
//!
//! Node installs are not hoisted when `package.json` has install-time scripts of the project
//! (`preinstall`, `install`, `postinstall`, `prepare`, ...; unless `--ignore-scripts`), a
//! `binding.gyp` at the root (npm builds it), workspaces, or local dependencies (`file:`,
//! `link:`, `portal:`, paths): those need the source. A command naming a tool but refused for
//! such a reason ends the run, and [`BuildPlan::not_hoisted`] says why.
//!
//! Compound commands are never hoisted: a line is hoisted only when it is one simple command
//! (words, quotes, backslashes) with no operator (`&&`, `||`, `;`, `|`, `&`, newline),
//! redirection, substitution or variable (`$`, backquote), glob (`*`, `?`, `[`), brace, tilde,
//! comment or leading `VAR=value`: any of these can make the command depend on more than its
//! manifests, and splitting shell safely is not worth the cache hits.
//!
//! The cache key ([`DependencyStep::cache_key`]) is a SHA-256 over, each length-prefixed:
//! [`PLAN_FORMAT`] (bumped whenever what lull hoists or how it runs a step changes), the base
//! image's digest (the interpreter, the package managers, the system libraries), the runtime's
//! name, the hoisted commands as they run, the build's environment (the runtime's defaults then
//! `build.env`, in order), and each manifest's path and the SHA-256 of its bytes, sorted by path.
//! The step runs those commands, in that environment, on that image, on a tree holding exactly
//! those files at those paths, in `/app`; nothing else of the source is visible to it. So every
//! local input that can change the layer's content is in the key, and a key never names a stale
//! layer for the same inputs. What is not in the key is what lies outside the build's inputs:
//! the package indexes. An unpinned requirement resolves to whatever the index serves when the
//! layer is made, as with any layer cache (Docker's, BuildKit's); pin versions (a lock file) to
//! make that moot, or rebuild without the cache. The package-manager caches
//! ([`crate::runtimes::Runtime::caches`]) are mounted in the step and not part of its layer, so
//! they are not inputs either.
//!
//! The run: `run.pre-run` commands run after the full step, in the image (they are build
//! commands). `run.command`, `run.network` (`PORT`, always set, and the variable
//! `run.network.env` names), `run.env` and `run.secrets` are service settings: the daemon
//! applies [`BuildPlan::run`] with `lull_daemon::spec::apply_apprunner_run` (which reads the
//! command as shell words, without a shell, as App Runner does), so changing them needs no
//! rebuild. The image's own environment is the runtime's ([`BuildPlan::image_env`]); its working
//! directory is [`WORK_DIR`]. `PORT` is not set during the build: App Runner sets it for the app
//! only, and a build that read it would make the layer depend on the port.

use std::collections::BTreeSet;
use std::io;

use sha2::{Digest, Sha256};

use crate::apprunner::{AppRunnerConfig, RunSection};
use crate::runtimes::{self, PackageCache, Runtime, RuntimeError};

/// The version of what the plan hoists and how; part of every cache key.
pub const PLAN_FORMAT: &str = "lull-dependency-step-v1";
/// Where the source lies and the commands run.
pub const WORK_DIR: &str = "/app";

/// A build command and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `build.commands.build[1]`, `run.pre-run[0]`.
    pub key: String,
    /// One shell line, run with `/bin/sh -c` in [`WORK_DIR`].
    pub line: String,
}

/// Commands run one after the other on one tree; the step's result is one layer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    pub commands: Vec<Command>,
}

/// A file the dependency step reads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Manifest {
    /// Relative to [`WORK_DIR`], `/`-separated.
    pub path: String,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

/// The leading dependency commands, run on the manifests only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyStep {
    /// As they run (a `uv sync` gets `--no-install-project`).
    pub commands: Vec<Command>,
    /// Sorted by path; the step's tree holds exactly these files.
    pub manifests: Vec<Manifest>,
    /// `sha256:HEX`; see the module's docs.
    pub cache_key: String,
    /// To mount during the step.
    pub caches: &'static [PackageCache],
}

/// What a source build does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildPlan {
    pub runtime: &'static Runtime,
    pub base_image_digest: String,
    /// The environment of every build command and `run.pre-run`: the runtime's defaults, then
    /// `build.env` (a name set twice keeps its first place and its last value).
    pub build_env: Vec<(String, String)>,
    pub dependency_step: Option<DependencyStep>,
    /// The other build commands in order, on the full source.
    pub full_step: Step,
    /// Why the command after the dependency step was not hoisted, when it names a dependency
    /// tool (`npm ci` with a postinstall script ...); for the build log.
    pub not_hoisted: Option<String>,
    /// `run.pre-run`, run after the full step.
    pub pre_run: Step,
    /// The image's `Env`: the runtime's defaults.
    pub image_env: Vec<(String, String)>,
    /// The image's working directory, [`WORK_DIR`].
    pub working_dir: &'static str,
    /// The run section, for the daemon to apply onto the service (see the module's docs).
    pub run: RunSection,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("runtime is missing (a source build needs one, such as python3 or nodejs18)")]
    NoRuntime,
    #[error("run.command is missing (a source build needs the command that starts the app)")]
    NoRunCommand,
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{key}: {path:?} is outside the source (named by {named_by})")]
    OutsideSource {
        key: String,
        path: String,
        named_by: String,
    },
    #[error("{key}: {path} is not in the source (named by {named_by})")]
    MissingManifest {
        key: String,
        path: String,
        named_by: String,
    },
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The plan for building `config`'s source. `files` lists the source's regular files relative
/// to its root (`/`-separated, in any order); `read` returns a listed file's bytes; the base
/// image is the one the runtime's [`Runtime::base_image`] key maps to.
pub fn plan(
    config: &AppRunnerConfig,
    files: &[String],
    read: &dyn Fn(&str) -> io::Result<Vec<u8>>,
    base_image_digest: &str,
) -> Result<BuildPlan, PlanError> {
    let runtime_name = config.runtime.as_deref().ok_or(PlanError::NoRuntime)?;
    let runtime = runtimes::resolve(runtime_name, config.run.runtime_version.as_deref())?;
    if config.run.command.is_none() {
        return Err(PlanError::NoRunCommand);
    }
    let source = Source {
        files: files
            .iter()
            .map(|f| f.trim_start_matches("./").to_string())
            .collect(),
        read,
    };

    let mut build_env: Vec<(String, String)> = Vec::new();
    let mut set = |name: &str, value: &str| match build_env.iter_mut().find(|(n, _)| n == name) {
        Some(existing) => existing.1 = value.to_string(),
        None => build_env.push((name.to_string(), value.to_string())),
    };
    for (name, value) in runtime.build_defaults() {
        set(name, value);
    }
    let (commands, post_build) = match &config.build {
        Some(build) => {
            for entry in &build.env {
                set(&entry.name, &entry.value);
            }
            let c = &build.commands;
            let mut commands = keyed("build.commands.pre-build", &c.pre_build);
            commands.extend(keyed("build.commands.build", &c.build));
            (commands, keyed("build.commands.post-build", &c.post_build))
        }
        None => (Vec::new(), Vec::new()),
    };

    let mut hoisted: Vec<Command> = Vec::new();
    let mut rerun: Vec<Command> = Vec::new();
    let mut manifests: BTreeSet<String> = BTreeSet::new();
    let mut not_hoisted = None;
    let mut rest = commands.into_iter().peekable();
    while let Some(command) = rest.peek() {
        match recognise(command, &source)? {
            Verdict::Dependency(found) => {
                manifests.extend(found.manifests);
                hoisted.push(Command {
                    key: command.key.clone(),
                    line: found.line,
                });
                if found.rerun {
                    rerun.push(command.clone());
                }
                rest.next();
            }
            Verdict::Refused(reason) => {
                not_hoisted = Some(format!("{} not cached: {reason}", command.key));
                break;
            }
            Verdict::Other => break,
        }
    }
    let mut full_step = Step { commands: rerun };
    full_step.commands.extend(rest);
    full_step.commands.extend(post_build);

    let dependency_step = if hoisted.is_empty() {
        None
    } else {
        let mut read_manifests = Vec::new();
        for path in manifests {
            let bytes = source.read(&path)?;
            read_manifests.push(Manifest {
                path,
                sha256: hex(&Sha256::digest(&bytes)),
            });
        }
        let cache_key = cache_key(
            base_image_digest,
            runtime,
            &hoisted,
            &build_env,
            &read_manifests,
        );
        Some(DependencyStep {
            commands: hoisted,
            manifests: read_manifests,
            cache_key,
            caches: runtime.caches,
        })
    };

    Ok(BuildPlan {
        runtime,
        base_image_digest: base_image_digest.to_string(),
        build_env,
        dependency_step,
        full_step,
        not_hoisted,
        pre_run: Step {
            commands: keyed("run.pre-run", &config.run.pre_run),
        },
        image_env: runtime
            .env
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        working_dir: WORK_DIR,
        run: config.run.clone(),
    })
}

fn keyed(prefix: &str, lines: &[String]) -> Vec<Command> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| Command {
            key: format!("{prefix}[{i}]"),
            line: line.clone(),
        })
        .collect()
}

fn cache_key(
    base_image_digest: &str,
    runtime: &Runtime,
    commands: &[Command],
    env: &[(String, String)],
    manifests: &[Manifest],
) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(PLAN_FORMAT.as_bytes());
    field(base_image_digest.as_bytes());
    field(runtime.name.as_bytes());
    field(&(commands.len() as u64).to_be_bytes());
    for command in commands {
        field(command.line.as_bytes());
    }
    field(&(env.len() as u64).to_be_bytes());
    for (name, value) in env {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    field(&(manifests.len() as u64).to_be_bytes());
    for manifest in manifests {
        field(manifest.path.as_bytes());
        field(manifest.sha256.as_bytes());
    }
    format!("sha256:{}", hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Source<'a> {
    files: BTreeSet<String>,
    read: &'a dyn Fn(&str) -> io::Result<Vec<u8>>,
}

impl Source<'_> {
    fn has(&self, path: &str) -> bool {
        self.files.contains(path)
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, PlanError> {
        (self.read)(path).map_err(|source| PlanError::Read {
            path: path.to_string(),
            source,
        })
    }

    fn text(&self, path: &str) -> Result<String, PlanError> {
        Ok(String::from_utf8_lossy(&self.read(path)?).into_owned())
    }

    /// The listed ones of `names`.
    fn present(&self, names: &[&str]) -> Vec<String> {
        names
            .iter()
            .filter(|n| self.has(n))
            .map(|n| n.to_string())
            .collect()
    }

    fn under(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{dir}/");
        self.files
            .iter()
            .filter(|f| f.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

enum Verdict {
    Dependency(Found),
    /// A dependency tool, but this use needs more than manifests.
    Refused(String),
    Other,
}

struct Found {
    /// As the dependency step runs it.
    line: String,
    manifests: Vec<String>,
    /// The full step runs the command as written again.
    rerun: bool,
}

fn recognise(command: &Command, source: &Source) -> Result<Verdict, PlanError> {
    let Some(words) = simple_words(&command.line) else {
        return Ok(Verdict::Other);
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let (tool, args) = match w.as_slice() {
        [pip, "install", args @ ..] if is_pip(pip) => (Tool::Pip, args),
        [python, "-m", "pip", "install", args @ ..] if is_python(python) => (Tool::Pip, args),
        ["uv", "pip", "install", args @ ..] => (Tool::Pip, args),
        ["pipenv", "install", args @ ..] => (Tool::Pipenv, args),
        ["uv", "sync", args @ ..] => (Tool::UvSync, args),
        ["npm", "ci" | "clean-install" | "install" | "i", args @ ..] => (Tool::Npm, args),
        ["yarn", "install", args @ ..] => (Tool::Yarn, args),
        ["yarn", args @ ..] if args.iter().all(|a| a.starts_with('-')) => (Tool::Yarn, args),
        ["pnpm", "install" | "i", args @ ..] => (Tool::Pnpm, args),
        _ => return Ok(Verdict::Other),
    };
    let line = command.line.clone();
    match tool {
        Tool::Pip => pip(command, args, source),
        Tool::Pipenv => Ok(pipenv(line, args, source)),
        Tool::UvSync => Ok(uv_sync(line, args, source)),
        Tool::Npm | Tool::Yarn | Tool::Pnpm => node(tool, line, args, source),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Pip,
    Pipenv,
    UvSync,
    Npm,
    Yarn,
    Pnpm,
}

fn is_pip(word: &str) -> bool {
    word == "pip" || word.strip_prefix("pip3").is_some_and(version_suffix)
}

fn is_python(word: &str) -> bool {
    word == "python" || word.strip_prefix("python3").is_some_and(version_suffix)
}

/// `` or `.11`.
fn version_suffix(rest: &str) -> bool {
    rest.is_empty()
        || rest
            .strip_prefix('.')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Splits `line` into words if it is one simple command (see the module's docs).
fn simple_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '$' | '`' | '\\' | '!' => return None,
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next()? {
                    '\n' => return None,
                    c => word.push(c),
                }
            }
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '*' | '?' | '[' | ']' | '{'
            | '}' | '~' | '#' | '!' | '\n' | '\r' => return None,
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    // `VAR=value cmd`: the environment of one command, not a simple dependency command.
    if words.is_empty() || words[0].contains('=') {
        return None;
    }
    Some(words)
}

/// An option's value: `--opt VALUE`, `--opt=VALUE`, `-oVALUE`. `None` when `arg` is not `opt`.
fn option_value<'a>(
    arg: &'a str,
    opts: &[&str],
    rest: &mut std::slice::Iter<'_, &'a str>,
) -> Option<Option<&'a str>> {
    for opt in opts {
        if arg == *opt {
            return Some(rest.next().copied());
        }
        if let Some(value) = arg.strip_prefix(opt) {
            if opt.starts_with("--") {
                if let Some(value) = value.strip_prefix('=') {
                    return Some(Some(value));
                }
            } else if opt.len() == 2 {
                return Some(Some(value));
            }
        }
    }
    None
}

/// A requirement that is a local file or directory rather than a name (or a remote URL).
fn is_local_path(spec: &str) -> bool {
    let lower = spec.to_ascii_lowercase();
    if lower.contains("file:") {
        return true;
    }
    if lower.contains("://") {
        return false;
    }
    spec.starts_with('.')
        || spec.starts_with('/')
        || spec.contains('/')
        || [".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar"]
            .iter()
            .any(|ext| lower.ends_with(ext))
}

const PIP_FLAGS: &[&str] = &[
    "--no-cache-dir",
    "-U",
    "--upgrade",
    "--user",
    "-q",
    "-qq",
    "--quiet",
    "-v",
    "--verbose",
    "--no-deps",
    "--prefer-binary",
    "--disable-pip-version-check",
    "--no-warn-script-location",
    "--no-warn-conflicts",
    "--break-system-packages",
    "--require-hashes",
    "--no-compile",
    "--compile",
    "-I",
    "--ignore-installed",
    "--force-reinstall",
    "--pre",
    "--no-input",
    "--no-build-isolation",
    "--no-index",
    "--system",
];
const PIP_VALUE_OPTIONS: &[&str] = &[
    "--index-url",
    "--extra-index-url",
    "--trusted-host",
    "--upgrade-strategy",
    "--only-binary",
    "--no-binary",
    "--progress-bar",
    "--timeout",
    "--retries",
    "--root-user-action",
    "--exists-action",
    "-i",
];

fn pip(command: &Command, args: &[&str], source: &Source) -> Result<Verdict, PlanError> {
    let mut files: Vec<String> = Vec::new();
    let mut packages = 0;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if let Some(value) =
            option_value(arg, &["-r", "--requirement", "-c", "--constraint"], &mut it)
        {
            let Some(value) = value else {
                return Ok(Verdict::Other);
            };
            if value.contains("://") {
                return Ok(Verdict::Refused(format!(
                    "requirements from a URL ({value})"
                )));
            }
            files.push(in_source(&command.key, &command.line, "", value)?);
        } else if option_value(arg, PIP_VALUE_OPTIONS, &mut it).is_some() || PIP_FLAGS.contains(arg)
        {
            // Known, and names no local file.
        } else if arg.starts_with('-') {
            // --target, --prefix, --root, -e, --find-links, and what lull does not know.
            return Ok(Verdict::Refused(format!("pip option {arg}")));
        } else if is_local_path(arg) {
            return Ok(Verdict::Refused(format!("installs {arg} from the source")));
        } else {
            packages += 1;
        }
    }
    if files.is_empty() && packages == 0 {
        return Ok(Verdict::Other);
    }
    // Every requirement file, and the ones they name.
    let mut manifests = Vec::new();
    let mut queue = files;
    while let Some(path) = queue.pop() {
        if manifests.contains(&path) {
            continue;
        }
        if !source.has(&path) {
            return Err(PlanError::MissingManifest {
                key: command.key.clone(),
                path,
                named_by: command.line.clone(),
            });
        }
        let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
        let text = source.text(&path)?;
        for line in requirement_lines(&text) {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            let rest: Vec<&str> = words.collect();
            let mut it = rest.iter();
            if let Some(value) = option_value(
                first,
                &["-r", "--requirement", "-c", "--constraint"],
                &mut it,
            ) {
                let Some(value) = value else { continue };
                if value.contains("://") {
                    return Ok(Verdict::Refused(format!(
                        "{path} names requirements at a URL ({value})"
                    )));
                }
                queue.push(in_source(&command.key, &path, dir, value)?);
            } else if first.starts_with("-e") || first.starts_with("--editable") {
                return Ok(Verdict::Refused(format!(
                    "{path} has an editable install ({line})"
                )));
            } else if let Some(value) = option_value(first, &["-f", "--find-links"], &mut it) {
                if value.is_some_and(is_local_path) {
                    return Ok(Verdict::Refused(format!(
                        "{path} finds links in the source ({line})"
                    )));
                }
            } else if first.starts_with('-') {
            } else if is_local_path(first) || line.contains("file:") {
                return Ok(Verdict::Refused(format!(
                    "{path} installs from the source ({line})"
                )));
            }
        }
        manifests.push(path);
    }
    Ok(Verdict::Dependency(Found {
        line: command.line.clone(),
        manifests,
        rerun: false,
    }))
}

/// A requirements file's logical lines: continuations joined, comments and blanks dropped.
fn requirement_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let (body, continued) = match raw.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (raw, false),
        };
        current.push_str(body);
        if continued {
            continue;
        }
        let line = std::mem::take(&mut current);
        // A comment starts a line or follows whitespace.
        let line = match line.find(" #").or_else(|| line.find("\t#")) {
            Some(at) => line[..at].to_string(),
            None => line,
        };
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            out.push(line.to_string());
        }
    }
    out
}

/// `given` (named in a file in `dir`, or on the command line when `dir` is empty) as a path
/// relative to the source's root; `/app/x` is `x`.
fn in_source(key: &str, named_by: &str, dir: &str, given: &str) -> Result<String, PlanError> {
    let outside = || PlanError::OutsideSource {
        key: key.to_string(),
        path: given.to_string(),
        named_by: named_by.to_string(),
    };
    let joined = if let Some(rest) = given.strip_prefix('/') {
        match rest.strip_prefix(WORK_DIR.trim_start_matches('/')) {
            Some(inner) if inner.is_empty() || inner.starts_with('/') => inner.to_string(),
            _ => return Err(outside()),
        }
    } else if dir.is_empty() {
        given.to_string()
    } else {
        format!("{dir}/{given}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(outside());
                }
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(outside());
    }
    Ok(parts.join("/"))
}

fn pipenv(line: String, args: &[&str], source: &Source) -> Verdict {
    const FLAGS: &[&str] = &[
        "--deploy",
        "--system",
        "--ignore-pipfile",
        "--dev",
        "-d",
        "--skip-lock",
        "--pre",
        "-v",
        "--verbose",
        "-q",
        "--quiet",
    ];
    if !args.iter().all(|a| FLAGS.contains(a)) || !source.has("Pipfile") {
        return Verdict::Other;
    }
    if source
        .text("Pipfile")
        .is_ok_and(|text| names_local_path(&text))
    {
        return Verdict::Refused("the Pipfile names a local path".to_string());
    }
    Verdict::Dependency(Found {
        line,
        manifests: source.present(&["Pipfile", "Pipfile.lock"]),
        rerun: false,
    })
}

/// A TOML file with a `path = ...` key or a workspace: it reaches beyond its manifests.
fn names_local_path(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start_matches(['{', ' ', '\t']);
        line.contains("workspace")
            || line.split([',', '{']).any(|part| {
                let part = part.trim();
                part.strip_prefix("path")
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
                    || part.starts_with("editable")
            })
    })
}

fn uv_sync(line: String, args: &[&str], source: &Source) -> Verdict {
    const FLAGS: &[&str] = &[
        "--locked",
        "--frozen",
        "--no-dev",
        "--all-extras",
        "--all-groups",
        "--no-install-project",
        "--no-editable",
        "--compile-bytecode",
        "-q",
        "--quiet",
        "-v",
        "--verbose",
    ];
    const VALUE_OPTIONS: &[&str] = &["--extra", "--group", "--no-group", "--only-group"];
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if option_value(arg, VALUE_OPTIONS, &mut it).is_some() || FLAGS.contains(arg) {
            continue;
        }
        return Verdict::Refused(format!("uv sync option {arg}"));
    }
    if !source.has("pyproject.toml") {
        return Verdict::Other;
    }
    if source
        .text("pyproject.toml")
        .is_ok_and(|text| names_local_path(&text))
    {
        return Verdict::Refused("pyproject.toml names a local path or a workspace".to_string());
    }
    let has_flag = args.contains(&"--no-install-project");
    Verdict::Dependency(Found {
        line: if has_flag {
            line
        } else {
            format!("{line} --no-install-project")
        },
        manifests: source.present(&["pyproject.toml", "uv.lock", ".python-version", "uv.toml"]),
        rerun: !has_flag,
    })
}

const NODE_FLAGS: &[&str] = &[
    // npm
    "--production",
    "--no-audit",
    "--no-fund",
    "--legacy-peer-deps",
    "--ignore-scripts",
    "--silent",
    "-s",
    "-q",
    "--quiet",
    "--prefer-offline",
    "--no-optional",
    "--no-progress",
    "--unsafe-perm",
    "-g",
    "--global",
    // yarn
    "--frozen-lockfile",
    "--immutable",
    "--immutable-cache",
    "--pure-lockfile",
    "--prod",
    "--non-interactive",
    "--ignore-engines",
    "--check-files",
    "--check-cache",
    "--inline-builds",
    // pnpm
    "-P",
    "--dev",
    "-D",
    "--no-frozen-lockfile",
    "--shamefully-hoist",
    "--strict-peer-dependencies",
];
const NODE_VALUE_OPTIONS: &[&str] = &[
    "--omit",
    "--include",
    "--only",
    "--loglevel",
    "--registry",
    "--network-timeout",
    "--reporter",
    "--mode",
];

fn node(tool: Tool, line: String, args: &[&str], source: &Source) -> Result<Verdict, PlanError> {
    let mut packages = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if option_value(arg, NODE_VALUE_OPTIONS, &mut it).is_some() || NODE_FLAGS.contains(arg) {
            continue;
        }
        if arg.starts_with('-') {
            return Ok(Verdict::Refused(format!("option {arg}")));
        }
        packages.push(*arg);
    }
    let global = tool == Tool::Npm && (args.contains(&"-g") || args.contains(&"--global"));
    if global {
        // `npm install -g pnpm`: a tool, no project.
        if packages.is_empty() {
            return Ok(Verdict::Other);
        }
        if let Some(local) = packages.iter().find(|p| is_local_node_spec(p)) {
            return Ok(Verdict::Refused(format!(
                "installs {local} from the source"
            )));
        }
        return Ok(Verdict::Dependency(Found {
            line,
            manifests: source.present(&[".npmrc"]),
            rerun: false,
        }));
    }
    // `npm install express` changes the project: not a manifest command.
    if !packages.is_empty() || !source.has("package.json") {
        return Ok(Verdict::Other);
    }
    let text = source.text("package.json")?;
    if let Some(reason) = needs_source(&text, args.contains(&"--ignore-scripts")) {
        return Ok(Verdict::Refused(reason));
    }
    if source.has("binding.gyp") && !args.contains(&"--ignore-scripts") {
        return Ok(Verdict::Refused(
            "binding.gyp: the install builds the project's native code".to_string(),
        ));
    }
    let manifests = match tool {
        Tool::Npm => source.present(&[
            "package.json",
            "package-lock.json",
            "npm-shrinkwrap.json",
            ".npmrc",
        ]),
        Tool::Yarn => {
            let mut m = source.present(&[
                "package.json",
                "yarn.lock",
                ".yarnrc",
                ".yarnrc.yml",
                ".npmrc",
            ]);
            for dir in [".yarn/releases", ".yarn/plugins", ".yarn/patches"] {
                m.extend(source.under(dir));
            }
            m
        }
        _ => {
            if source.has("pnpm-workspace.yaml") {
                return Ok(Verdict::Refused("a pnpm workspace".to_string()));
            }
            source.present(&["package.json", "pnpm-lock.yaml", ".npmrc", ".pnpmfile.cjs"])
        }
    };
    Ok(Verdict::Dependency(Found {
        line,
        manifests,
        rerun: false,
    }))
}

fn is_local_node_spec(spec: &str) -> bool {
    ["file:", "link:", "portal:", "./", "../", "/", "~"]
        .iter()
        .any(|p| spec.starts_with(p))
        || spec.contains("#./")
        || spec.ends_with(".tgz")
}

/// Why installing `package.json`'s dependencies needs more than the manifests, if it does.
fn needs_source(package_json: &str, ignore_scripts: bool) -> Option<String> {
    let Ok(serde_json::Value::Object(json)) = serde_json::from_str(package_json) else {
        return Some("package.json is not a JSON object".to_string());
    };
    if !ignore_scripts && let Some(serde_json::Value::Object(scripts)) = json.get("scripts") {
        for script in [
            "preinstall",
            "install",
            "postinstall",
            "prepublish",
            "preprepare",
            "prepare",
            "postprepare",
        ] {
            if scripts.contains_key(script) {
                return Some(format!("package.json has a {script} script"));
            }
        }
    }
    if json.contains_key("workspaces") {
        return Some("package.json has workspaces".to_string());
    }
    if json
        .get("pnpm")
        .is_some_and(|p| p.get("patchedDependencies").is_some())
    {
        return Some("package.json patches dependencies".to_string());
    }
    for group in [
        "dependencies",
        "devDependencies",
        "optionalDependencies",
        "peerDependencies",
        "resolutions",
        "overrides",
    ] {
        if let Some(serde_json::Value::Object(deps)) = json.get(group) {
            for (name, spec) in deps {
                if spec.as_str().is_some_and(is_local_node_spec) {
                    return Some(format!("{group}.{name} is in the source"));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
