//! `lull-bench-build --lull PATH [--smoke] [--markdown PATH]`: the source-build benchmarks that
//! `cargo xtask bench build` builds and runs (as root), against the release `lull` binary given
//! and buildah, side by side in the same run.
//!
//! The apps are `tests/bench-apps/{flask,express}` (apprunner.yaml, dependency manifests, a
//! Dockerfile for buildah), copied into a scratch dir whose copy the run rewrites: each
//! code-only change writes a new `VERSION` string, which `GET /` answers.
//!
//! Each round starts a fresh `lull daemon` (empty data dir: no layer, image or download cache;
//! the base images are in the local registry and pulled by the first build) and a fresh buildah
//! storage, then for Flask and for Express, lull and buildah interleaved (which one goes first
//! alternates between rounds):
//!
//! - cold: the first build. lull: `lull deploy SVC DIR` creates the service; the figure runs
//!   from spawning `lull deploy` to the first `GET /` through lull's proxy answering the new
//!   version (polled every 10 ms while the deploy runs). buildah: `buildah bud --layers` with
//!   the Dockerfile on an empty storage, pulling the same base image from the local registry.
//! - warm: a code-only change (the version rewritten), then the same; lull must say
//!   `==> dependencies: cached`, buildah must take the dependency step from its layer cache.
//! - no-op: the same source again; lull must say `==> nothing changed since build`, buildah
//!   must use its cache for every step. The lull figure runs to `lull deploy`'s exit and then
//!   one `GET /` answering the version (the old code is the new code).
//!
//! The build part of a lull figure is the time between the operation's `==> build ...` and
//! `==> built in ...` lines, by the timestamps the CLI prints as it receives them.
//!
//! After the rounds, on the last round's daemon, the Flask service is set to scale to zero
//! (`--min 0 --scale-to-zero-after 1s`) and, each time its serving revision has no instance
//! left, one `GET /` through the proxy is timed from the connect to the whole answer (the
//! revision before it stands by with its instance for a rollback, taking no traffic).
//!
//! Targets are reported, never enforced: the program fails only when the harness does. Whatever
//! happens, the services are deleted, the daemon, its instances, network, cgroups and dirs
//! removed, buildah's storage removed, and what buildah's networking (netavark) made on the host
//! that was not there before the run is removed again.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lull_tests::bench_util::{
    BenchArgs, BenchDaemon, Network, Report, init_logging, join_ms, ms, percentile, proxy_get,
};
use lull_tests::e2e::workspace_root;
use lull_tests::scratch::ScratchDir;

const USAGE: &str = "usage: lull-bench-build --lull PATH [--smoke] [--markdown PATH]";
const DRIVER: &str = "lull-bench-build";

/// The host's CA bundle: this machine's egress intercepts TLS, so pip and npm must trust it in
/// lull's builds (`[builder] extra_ca_certs`) and in buildah's RUN steps (mounted) alike.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The daemon's `[builder]` for this machine.
const BUILDER: &str = "\n[builder]\nextra_ca_certs = [\"/etc/ssl/certs/ca-certificates.crt\"]\n";

/// One request's connect and read timeout, and the longest a deploy or a build may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BUILD_DEADLINE: Duration = Duration::from_secs(600);
/// How often the proxy is asked for the new version while a deploy runs.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// The targets (source to serving, through the proxy).
const WARM_TARGET: Duration = Duration::from_secs(10);
const NOOP_TARGET: Duration = Duration::from_secs(2);

/// An app under `tests/bench-apps/`.
struct App {
    /// The folder's name and the service's.
    service: &'static str,
    label: &'static str,
    /// The file holding `VERSION = "<prefix> N"`.
    code: &'static str,
    prefix: &'static str,
    /// Build arguments that point the package manager at the mounted CA bundle (what lull sets
    /// in its build sandbox).
    ca_build_args: &'static [&'static str],
    /// What the dependency step prints when it installs (absent when buildah's cache served it).
    installs: &'static str,
}

const APPS: [App; 2] = [
    App {
        service: "flask",
        label: "Flask",
        code: "app.py",
        prefix: "flask-bench",
        ca_build_args: &["PIP_CERT"],
        installs: "Successfully installed",
    },
    App {
        service: "express",
        label: "Express",
        code: "server.js",
        prefix: "express-bench",
        ca_build_args: &["NODE_EXTRA_CA_CERTS", "npm_config_cafile"],
        installs: "added ",
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Cold,
    Warm,
    Noop,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Cold => "cold build",
            Case::Warm => "warm rebuild (code change)",
            Case::Noop => "no-op rebuild",
        }
    }
}

/// How many runs of what.
struct Plan {
    rounds: usize,
    warm_per_round: usize,
    noop_per_round: usize,
    cold_start_runs: usize,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                rounds: 1,
                warm_per_round: 1,
                noop_per_round: 1,
                cold_start_runs: 3,
            }
        } else {
            Plan {
                rounds: 3,
                warm_per_round: 3,
                noop_per_round: 3,
                cold_start_runs: 10,
            }
        }
    }
}

/// One lull deploy from source.
#[derive(Debug, Clone, Copy)]
struct LullSample {
    /// From spawning `lull deploy` to the new version answering through the proxy.
    serving: Duration,
    /// From spawning `lull deploy` to its exit.
    exited: Duration,
    /// From `==> build` to `==> built in` (the CLI's timestamps).
    build: Duration,
}

#[derive(Default)]
struct Samples {
    lull: Vec<LullSample>,
    buildah: Vec<Duration>,
}

fn main() -> ExitCode {
    init_logging();
    match BenchArgs::parse(std::env::args().skip(1), USAGE).and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{DRIVER}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &BenchArgs) -> Result<()> {
    args.check("build")?;
    let buildah_version = command_line("buildah", &["--version"])
        .context("buildah is needed for the comparison (apt-get install buildah)")?;
    let plan = Plan::new(args.smoke);
    eprintln!(
        "{DRIVER}: {} run, lull {}, {buildah_version}",
        if args.smoke { "smoke" } else { "full" },
        args.lull.display()
    );
    // Dropped last: puts back what buildah's networking changed on the host.
    let _host = HostResidue::record();
    let report = measure(args, &plan, &buildah_version)?;
    print!("{}", report.text());
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn measure(args: &BenchArgs, plan: &Plan, buildah_version: &str) -> Result<Report> {
    let sources = ScratchDir::new("lull-bench-build-src").context("create the scratch dir")?;
    let mut samples: BTreeMap<(usize, Case), Samples> = BTreeMap::new();
    let mut version = 0u64;
    let mut cold_start = Vec::new();
    let mut to_zero = Vec::new();
    let mut base_notes = Vec::new();
    // What the Flask app answers: the version of its last build (the cold start checks it).
    let mut flask_version = String::new();
    for round in 0..plan.rounds {
        let net = Network::new('u', |n| format!("10.78.{}.0/24", n % 250));
        let mut daemon = BenchDaemon::new(DRIVER, &args.lull, net, BUILDER)?;
        let buildah = Buildah::new()?;
        let last = round + 1 == plan.rounds;
        let result = daemon.start().and_then(|()| {
            let lull_first = round % 2 == 0;
            for (a, app) in APPS.iter().enumerate() {
                let dir = sources.path().join(format!("{}-{round}", app.service));
                copy_dir(&workspace_root().join("tests/bench-apps").join(app.service), &dir)?;
                for (case, times) in [
                    (Case::Cold, 1),
                    (Case::Warm, plan.warm_per_round),
                    (Case::Noop, plan.noop_per_round),
                ] {
                    for _ in 0..times {
                        if case != Case::Noop {
                            version += 1;
                            set_version(&dir, app, version)?;
                        }
                        let expect = format!("{} {version}\n", app.prefix);
                        if a == 0 {
                            flask_version.clone_from(&expect);
                        }
                        let entry = samples.entry((a, case)).or_default();
                        let mut lull = || -> Result<()> {
                            let (s, lines) = lull_deploy(&daemon, app, &dir, &expect, case)
                                .with_context(|| format!("lull: {} {}", app.label, case.label()))?;
                            if case == Case::Cold && round == 0 {
                                base_notes.extend(
                                    lines.iter().filter(|l| l.contains("==> base image")).cloned(),
                                );
                            }
                            eprintln!(
                                "{DRIVER}: round {round} {} {}: lull serving {} (build {}, deploy exited {})",
                                app.label,
                                case.label(),
                                ms(s.serving),
                                ms(s.build),
                                ms(s.exited)
                            );
                            entry.lull.push(s);
                            Ok(())
                        };
                        let peer = |entry: &mut Vec<Duration>| -> Result<()> {
                            let took = buildah.build(app, &dir, case).with_context(|| {
                                format!("buildah: {} {}", app.label, case.label())
                            })?;
                            eprintln!(
                                "{DRIVER}: round {round} {} {}: buildah {}",
                                app.label,
                                case.label(),
                                ms(took)
                            );
                            entry.push(took);
                            Ok(())
                        };
                        let mut peer_samples = Vec::new();
                        if lull_first {
                            lull()?;
                            peer(&mut peer_samples)?;
                        } else {
                            peer(&mut peer_samples)?;
                            lull()?;
                        }
                        samples
                            .entry((a, case))
                            .or_default()
                            .buildah
                            .extend(peer_samples);
                    }
                }
            }
            if last {
                let (cold, zero) = measure_cold_start(&daemon, plan, &flask_version)?;
                cold_start = cold;
                to_zero = zero;
            }
            Ok(())
        });
        if result.is_err() {
            daemon.print_daemon_log();
        }
        for app in &APPS {
            if let Err(e) = daemon.delete_service(app.service) {
                eprintln!("{DRIVER}: delete service {}: {e:#}", app.service);
            }
        }
        drop(daemon);
        drop(buildah);
        result?;
    }
    Ok(build_report(
        plan,
        &samples,
        &cold_start,
        &to_zero,
        buildah_version,
        &base_notes,
    ))
}

// ---------------------------------------------------------------------------------------------
// lull

/// `lull deploy SVC DIR`, the proxy polled for `expect` meanwhile (after the exit for a no-op);
/// the sample and the CLI's lines.
fn lull_deploy(
    d: &BenchDaemon,
    app: &App,
    dir: &Path,
    expect: &str,
    case: Case,
) -> Result<(LullSample, Vec<String>)> {
    let mut command = d.lull_command();
    command
        .arg("--socket")
        .arg(d.run_dir().join(lull_daemon::config::SOCKET_FILE))
        .args(["deploy", app.service])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let host = format!("{}.localhost", app.service);
    let started = Instant::now();
    let mut child = command.spawn().context("spawn lull deploy")?;
    let stdout = child.stdout.take().context("lull deploy's stdout")?;
    let mut stderr = child.stderr.take().context("lull deploy's stderr")?;
    let out = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut serving = None;
    let mut exited = None;
    while serving.is_none() || exited.is_none() {
        if exited.is_none()
            && let Some(status) = child.try_wait().context("wait for lull deploy")?
        {
            exited = Some(started.elapsed());
            if !status.success() {
                let lines = out.join().unwrap_or_default();
                let err = err.join().unwrap_or_default();
                bail!(
                    "lull deploy {} exited {status}: {}\n{}",
                    app.service,
                    err.trim(),
                    lines.join("\n")
                );
            }
        }
        if serving.is_none()
            && (case != Case::Noop || exited.is_some())
            && let Ok(answer) = proxy_get(d.http_port, &host, "/", REQUEST_TIMEOUT)
            && answer.status == 200
            && answer.body == expect
        {
            serving = Some(started.elapsed());
        }
        if started.elapsed() > BUILD_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not answer {expect:?} within {BUILD_DEADLINE:?}",
                app.service
            );
        }
        if serving.is_none() || exited.is_none() {
            std::thread::sleep(POLL_EVERY);
        }
    }
    let lines = out.join().unwrap_or_default();
    let _ = err.join();
    let marker = match case {
        Case::Cold => "==> dependencies: on the dependency manifests alone",
        Case::Warm => "==> dependencies: cached",
        Case::Noop => "==> nothing changed since build",
    };
    if !lines.iter().any(|l| l.contains(marker)) {
        bail!(
            "a {} of {} did not say {marker:?}:\n{}",
            case.label(),
            app.service,
            lines.join("\n")
        );
    }
    let build = build_part(&lines).with_context(|| {
        format!(
            "no `==> build` and `==> built in` lines in:\n{}",
            lines.join("\n")
        )
    })?;
    let sample = LullSample {
        serving: serving.unwrap_or_default(),
        exited: exited.unwrap_or_default(),
        build,
    };
    Ok((sample, lines))
}

/// The time between the `==> build ` and `==> built in ` lines, by the timestamps the CLI
/// prints before each line (`  HH:MM:SS.mmmZ  text`).
fn build_part(lines: &[String]) -> Option<Duration> {
    let at = |prefix: &str| {
        lines.iter().find_map(|l| {
            let (time, text) = l.trim_start().split_once("  ")?;
            if text.trim_start().starts_with(prefix) {
                clock_millis(time)
            } else {
                None
            }
        })
    };
    let start = at("==> build ")?;
    let end = at("==> built in ")?;
    const DAY: u64 = 24 * 3600 * 1000;
    Some(Duration::from_millis((end + DAY - start) % DAY))
}

/// `HH:MM:SS.mmmZ` as milliseconds since midnight.
fn clock_millis(time: &str) -> Option<u64> {
    let time = time.strip_suffix('Z')?;
    let (hms, millis) = time.split_once('.')?;
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() || millis.len() != 3 {
        return None;
    }
    Some(((h * 60 + m) * 60 + s) * 1000 + millis.parse::<u64>().ok()?)
}

// ---------------------------------------------------------------------------------------------
// Cold start with scale to zero

/// The Flask service set to min 0 and scale to zero after 1 s; each run waits for zero
/// instances, then times one `GET /`. The samples, and how long each wait for zero took.
fn measure_cold_start(
    d: &BenchDaemon,
    plan: &Plan,
    flask_version: &str,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let app = &APPS[0];
    let updated = d
        .lull_command()
        .arg("--socket")
        .arg(d.run_dir().join(lull_daemon::config::SOCKET_FILE))
        .args([
            "service",
            "update",
            app.service,
            "--min",
            "0",
            "--scale-to-zero-after",
            "1s",
            "--scale-in-window",
            "1s",
        ])
        .stdin(Stdio::null())
        .output()
        .context("run lull service update")?;
    if !updated.status.success() {
        bail!(
            "lull service update {} --min 0: {}{}",
            app.service,
            String::from_utf8_lossy(&updated.stdout),
            String::from_utf8_lossy(&updated.stderr)
        );
    }
    d.wait_idle(app.service)?;
    let host = format!("{}.localhost", app.service);
    let mut samples = Vec::new();
    let mut zero = Vec::new();
    for i in 0..plan.cold_start_runs {
        let waited = d
            .wait_until(
                &format!("service {} at zero instances", app.service),
                Duration::from_secs(60),
                Duration::from_millis(20),
                |d| serving_revision_at_zero(d, app.service),
            )
            .with_context(|| {
                let shown = d
                    .call("GET", &format!("/v1/services/{}", app.service), None)
                    .map_or_else(|e| format!("{e:#}"), |v| v.to_string());
                let events = d
                    .events(app.service, "")
                    .map(|e| {
                        let n = e.len();
                        e[n.saturating_sub(8)..]
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default();
                format!("cold start run {i} (the service: {shown}; its last events:\n{events})")
            })?;
        zero.push(waited);
        // The last instance's stop and removal are done before the request.
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let answer = proxy_get(d.http_port, &host, "/", Duration::from_secs(30))
            .with_context(|| format!("cold start run {i}: GET / of {}", app.service))?;
        let took = started.elapsed();
        if answer.status != 200 || answer.body != flask_version {
            bail!(
                "cold start run {i}: {} answered {} {:?}",
                app.service,
                answer.status,
                answer.body
            );
        }
        eprintln!("{DRIVER}: cold start {i}: {}", ms(took));
        samples.push(took);
    }
    Ok((samples, zero))
}

/// Whether the revision `service` serves has no instance. The revision the rebuilds replaced
/// keeps its instance on standby for a rollback (the rollback window): it takes no traffic and
/// is not counted.
fn serving_revision_at_zero(d: &BenchDaemon, service: &str) -> Result<bool> {
    let shown = d.call("GET", &format!("/v1/services/{service}"), None)?;
    let serving = &shown["status"]["serving"];
    let instances = shown["status"]["instances"]
        .as_array()
        .with_context(|| format!("service {service} has no instance list: {shown}"))?;
    Ok(!serving.is_null() && instances.iter().all(|i| &i["revision"] != serving))
}

// ---------------------------------------------------------------------------------------------
// buildah

/// A buildah storage (`--root`, `--runroot`, overlay driver) of this run's own, removed when
/// dropped.
struct Buildah {
    scratch: ScratchDir,
}

impl Buildah {
    fn new() -> Result<Buildah> {
        Ok(Buildah {
            scratch: ScratchDir::new("lull-bench-buildah").context("create buildah's storage")?,
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new("buildah");
        command
            .arg("--root")
            .arg(self.scratch.path().join("root"))
            .arg("--runroot")
            .arg(self.scratch.path().join("runroot"))
            .args(["--storage-driver", "overlay"])
            .env_remove("BUILDAH_LAYERS")
            .env_remove("STORAGE_DRIVER")
            .stdin(Stdio::null());
        command
    }

    /// `buildah bud --layers` of the app's Dockerfile in `dir`, checked against the case: the
    /// dependency step runs in a cold build and comes from the cache otherwise.
    fn build(&self, app: &App, dir: &Path, case: Case) -> Result<Duration> {
        let mut command = self.command();
        command.args([
            "bud",
            "--layers",
            "--runtime",
            "runc",
            "--tls-verify=false",
            "--volume",
            &format!("{CA_BUNDLE}:{CA_BUNDLE}:ro"),
        ]);
        for var in app.ca_build_args {
            command.args(["--build-arg", &format!("{var}={CA_BUNDLE}")]);
        }
        command
            .args(["-t", &format!("localhost/lull-bench-{}", app.service)])
            .arg(dir);
        let started = Instant::now();
        let output = command.output().context("run buildah bud")?;
        let took = started.elapsed();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!("buildah bud exited {}:\n{}", output.status, tail(&text, 30));
        }
        let installed = text.contains(app.installs);
        let cached = text.contains("Using cache");
        let fine = match case {
            Case::Cold => installed && !cached,
            Case::Warm | Case::Noop => !installed && cached,
        };
        if !fine {
            bail!(
                "buildah's {} did not {} the dependency step:\n{}",
                case.label(),
                if case == Case::Cold {
                    "run"
                } else {
                    "take from its cache"
                },
                tail(&text, 30)
            );
        }
        Ok(took)
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        for args in [&["rm", "--all"][..], &["rmi", "--all", "--force"][..]] {
            match self.command().args(args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "{DRIVER}: buildah {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("{DRIVER}: buildah {}: {e}", args.join(" ")),
            }
        }
        // The scratch dir unmounts what is left under it and removes it.
    }
}

/// What buildah's networking (netavark) and its default paths leave on the host: the
/// iptables-nft tables `ip nat` and `ip filter` (NETAVARK chains), `/etc/cni`,
/// `/run/containers`, `/var/lib/containers` (the blob-info cache). Whatever of these did not
/// exist when the run started is removed when it ends; what did exist is left alone. IP
/// forwarding (netavark turns it on) is put back.
struct HostResidue {
    tables: Vec<&'static str>,
    paths: Vec<&'static str>,
    ip_forward: Option<String>,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl HostResidue {
    fn record() -> HostResidue {
        let tables = ["nat", "filter"]
            .into_iter()
            .filter(|t| !nft_table_exists(t))
            .collect();
        let paths = ["/etc/cni", "/run/containers", "/var/lib/containers"]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        HostResidue {
            tables,
            paths,
            ip_forward: fs::read_to_string(IP_FORWARD).ok(),
        }
    }
}

fn nft_table_exists(table: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "ip", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for HostResidue {
    fn drop(&mut self) {
        for table in &self.tables {
            if nft_table_exists(table) {
                let deleted = Command::new("nft")
                    .args(["delete", "table", "ip", table])
                    .status();
                if !deleted.is_ok_and(|s| s.success()) {
                    eprintln!("{DRIVER}: nft delete table ip {table} failed");
                }
            }
        }
        for path in &self.paths {
            if Path::new(path).exists()
                && let Err(e) = fs::remove_dir_all(path)
            {
                eprintln!("{DRIVER}: remove {path}: {e}");
            }
        }
        if let Some(old) = &self.ip_forward
            && let Err(e) = fs::write(IP_FORWARD, old)
        {
            eprintln!("{DRIVER}: restore {IP_FORWARD}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sources

/// Copies the files of `from` (one level: the apps have no folders) into a new `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry.with_context(|| format!("read {}", from.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let dest = to.join(entry.file_name());
            fs::copy(entry.path(), &dest).with_context(|| {
                format!("copy {} to {}", entry.path().display(), dest.display())
            })?;
        }
    }
    Ok(())
}

/// The `"<prefix> N"` string in `text`, without its quotes.
fn version_in<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(&format!("\"{prefix} "))? + 1;
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// Rewrites the app's `"<prefix> N"` to `"<prefix> version"`: a code-only change.
fn set_version(dir: &Path, app: &App, version: u64) -> Result<()> {
    let path = dir.join(app.code);
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let old = version_in(&text, app.prefix)
        .with_context(|| format!("no \"{} N\" in {}", app.prefix, path.display()))?;
    let updated = text.replacen(old, &format!("{} {version}", app.prefix), 1);
    fs::write(&path, updated).with_context(|| format!("write {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The report

fn build_report(
    plan: &Plan,
    samples: &BTreeMap<(usize, Case), Samples>,
    cold_start: &[Duration],
    to_zero: &[Duration],
    buildah_version: &str,
    base_notes: &[String],
) -> Report {
    let mut report = Report::new(&[
        "measurement",
        "target",
        "lull source → serving (p50)",
        "lull build part (p50)",
        "buildah bud (p50)",
        "ratio lull build / buildah",
        "ratio lull serving / buildah",
        "runs",
        "met",
    ]);
    for ((a, case), s) in samples {
        let app = &APPS[*a];
        let serving: Vec<Duration> = s.lull.iter().map(|l| l.serving).collect();
        let build: Vec<Duration> = s.lull.iter().map(|l| l.build).collect();
        let exited: Vec<Duration> = s.lull.iter().map(|l| l.exited).collect();
        let (serving50, build50) = (percentile(&serving, 50.0), percentile(&build, 50.0));
        let peer50 = percentile(&s.buildah, 50.0);
        let target = match case {
            Case::Cold => None,
            Case::Warm => Some(WARM_TARGET),
            Case::Noop => Some(NOOP_TARGET),
        };
        let met = target.map(|t| serving50 < t);
        report.row(
            vec![
                format!("{}: {}", app.label, case.label()),
                target.map_or_else(|| "(none)".to_owned(), |t| format!("< {} s", t.as_secs())),
                secs(serving50),
                secs(build50),
                secs(peer50),
                ratio(build50, peer50),
                ratio(serving50, peer50),
                s.lull.len().to_string(),
                match met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "-".into(),
                },
            ],
            met,
        );
        report.detail(format!(
            "{} {}: lull source → serving {}; build part {}; `lull deploy` exited after {}; \
             buildah {}",
            app.label,
            case.label(),
            join_ms(&serving),
            join_ms(&build),
            join_ms(&exited),
            join_ms(&s.buildah),
        ));
    }
    let p50 = percentile(cold_start, 50.0);
    let p99 = percentile(cold_start, 99.0);
    report.extra.push((
        "Cold start through the proxy (scale to zero)".to_owned(),
        vec![
            "measurement".into(),
            "p50".into(),
            "p99".into(),
            "runs".into(),
            "Cloud Run (published, Python)".into(),
        ],
        vec![vec![
            "Flask (built by lull, dev server), min 0: one `GET /` from the connect to the whole answer"
                .into(),
            ms(p50),
            ms(p99),
            cold_start.len().to_string(),
            "1.5–2 s".into(),
        ]],
    ));
    report.detail(format!(
        "method: {} round(s), each with a fresh `lull daemon` (empty data dir: no layer, image \
         or download cache; base images in the local registry, pulled by the first build) and a \
         fresh buildah storage; per round and app one cold build, {} warm rebuild(s) and {} \
         no-op rebuild(s), lull and buildah interleaved (which goes first alternates by round). \
         lull source → serving: from spawning `lull deploy SVC DIR` to the first `GET /` \
         through lull's proxy answering the new version, polled every {} ms (no-op: to the \
         deploy's exit, then one `GET /`); build part: the operation's `==> build` to `==> \
         built in` lines by the CLI's timestamps; the rest is packing and upload, the \
         revision's deploy (instance start, health check) and routing",
        plan.rounds,
        plan.warm_per_round,
        plan.noop_per_round,
        POLL_EVERY.as_millis()
    ));
    report.detail(format!(
        "buildah: {buildah_version}, `buildah bud --layers --runtime runc --tls-verify=false` \
         with the app's Dockerfile (FROM the same base image, COPY the manifests, RUN the same \
         install, COPY . ., CMD), overlay storage driver on a scratch `--root`/`--runroot`, its \
         default network (netavark bridge with NAT, like lull's build sandbox), the host CA \
         bundle mounted into RUN steps and named by build arguments (what lull's \
         `extra_ca_certs` does); buildah only builds, so the ratio of lull's whole source → \
         serving to buildah's build favours buildah"
    ));
    if !base_notes.is_empty() {
        report.detail(format!(
            "base images (cold builds pull them from the local registry, both sides): {}",
            base_notes
                .iter()
                .map(|l| l
                    .trim()
                    .split_once("==> base image ")
                    .map_or(l.as_str(), |(_, b)| b))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    report.detail(format!(
        "cold start: the Flask service of the last round set to `--min 0 --scale-to-zero-after \
         1s --scale-in-window 1s`; each run waits for zero instances (then 300 ms), and times \
         one `GET /` through the proxy from the connect to the whole answer (Flask's \
         development server, import of flask included); per run {}; back to zero after each \
         request in {}. Cloud Run's 1.5–2 s is its published figure for Python, not measured \
         here",
        join_ms(cold_start),
        join_ms(to_zero)
    ));
    report
}

fn secs(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        ms(d)
    }
}

fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "-".into();
    }
    let r = a.as_secs_f64() / b.as_secs_f64();
    if r < 0.1 {
        format!("{r:.3}x")
    } else {
        format!("{r:.2}x")
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The first line `program args` prints, trimmed.
fn command_line(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_part_comes_from_the_clis_timestamps() {
        let lines: Vec<String> = [
            "packed x: 4 files, 1 bytes",
            "flask: building, then deploying (operation op-1)",
            "  23:59:59.900Z  ==> build 7d9f of flask",
            "  23:59:59.950Z  ==> dependencies: cached (requirements.txt unchanged), sha256:1",
            "  00:00:00.650Z  ==> built in 0.7 s: localhost/flask@sha256:2",
            "  00:00:01.000Z  ==> deploying revision 2 (op-2)",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(build_part(&lines), Some(Duration::from_millis(750)));
        assert_eq!(build_part(&lines[..3]), None);
        assert_eq!(clock_millis("01:02:03.004Z"), Some(3_723_004));
        assert_eq!(clock_millis("01:02:03Z"), None);
    }

    #[test]
    fn a_code_change_rewrites_only_the_version() {
        let dir = ScratchDir::new("lull-bench-build-test").unwrap();
        let app = &APPS[1];
        copy_dir(
            &workspace_root().join("tests/bench-apps").join(app.service),
            dir.path(),
        )
        .unwrap();
        let before = fs::read_to_string(dir.path().join(app.code)).unwrap();
        assert_eq!(version_in(&before, app.prefix), Some("express-bench 0"));
        set_version(dir.path(), app, 12).unwrap();
        let after = fs::read_to_string(dir.path().join(app.code)).unwrap();
        assert_eq!(version_in(&after, app.prefix), Some("express-bench 12"));
        assert_eq!(after.replace("express-bench 12", "express-bench 0"), before);
        for file in [
            "apprunner.yaml",
            "Dockerfile",
            "package.json",
            "package-lock.json",
        ] {
            assert!(dir.path().join(file).is_file(), "{file} copied");
        }
    }

    #[test]
    fn the_smoke_plan_is_one_round() {
        let smoke = Plan::new(true);
        assert_eq!(
            (smoke.rounds, smoke.warm_per_round, smoke.noop_per_round),
            (1, 1, 1)
        );
        assert!(Plan::new(false).rounds > 1);
    }
}
