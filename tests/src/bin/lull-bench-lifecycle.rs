//! `lull-bench-lifecycle --lull PATH [--smoke] [--markdown PATH]`: the service lifecycle
//! benchmarks that `cargo xtask bench lifecycle` builds and runs (as root), against the release
//! `lull` binary given: `lull daemon` over scratch data and run dirs, a cgroup parent, an
//! instance network (bridge, nftables table, link prefix, /24) and a loopback HTTP port of this
//! run's own, driven through its admin socket (`lull_daemon::api::Client`) and its proxy.
//!
//! One service, `bench`, runs the fixture image (pulled by its first deploy, cached for every
//! measured one). Each measurement runs N times (10, or 2 with `--smoke`):
//!
//! - deploy: `PATCH /v1/services/bench` with a new `BENCH_RUN` value (a new revision of a cached
//!   image) until its operation ends `succeeded` and `GET /env` through the proxy answers 200
//!   with the new value;
//! - failed deploy: the same with `command: ["/nonexistent"]`, until the operation ends `failed`
//!   (the previous revision keeps serving, which is checked);
//! - pause: `POST .../pause` until the proxy answers 503; resume: `POST .../resume` until it
//!   answers 200 again;
//! - daemon restart: `kill -9` of the daemon, a new one spawned, until the first 200 through the
//!   proxy, from the instances the new daemon adopted (their ids are compared: no new instance).
//!
//! Targets are reported, never enforced: the program fails only when the harness does. Whatever
//! happens, the daemon is stopped and its instances, network, cgroups and dirs are removed.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lull_daemon::api::Client;
use lull_tests::e2e::FIXTURE_APP;
use lull_tests::scratch::{CgroupParentGuard, ScratchDir};
use serde_json::{Value, json};

const USAGE: &str = "usage: lull-bench-lifecycle --lull PATH [--smoke] [--markdown PATH]";

/// The one service every measurement acts on.
const SERVICE: &str = "bench";
/// The environment variable each deploy changes (a new revision of the same image).
const MARKER: &str = "BENCH_RUN";
/// Longest wait for anything: a daemon to answer, a deploy to end, the proxy to change answer.
const DEADLINE: Duration = Duration::from_secs(60);
/// Between two probes through the proxy.
const PROBE_EVERY: Duration = Duration::from_millis(1);
/// One probe's connect and read timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

struct Args {
    smoke: bool,
    lull: PathBuf,
    markdown: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe().context("find this executable")?;
    let mut parsed = Args {
        smoke: false,
        lull: exe.with_file_name("lull"),
        markdown: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--smoke" => parsed.smoke = true,
            "--lull" => parsed.lull = value("--lull")?.into(),
            "--markdown" => parsed.markdown = Some(value("--markdown")?.into()),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lull-bench-lifecycle: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lifecycle benchmarks need root (the daemon makes namespaces, cgroups, mounts)");
    }
    if !args.lull.is_file() {
        bail!(
            "lull binary {} not found (build it: cargo build --release -p lull)",
            args.lull.display()
        );
    }
    let runs = if args.smoke { 2 } else { 10 };
    eprintln!(
        "lull-bench-lifecycle: {} run, {runs} runs per measurement, lull {}",
        if args.smoke { "smoke" } else { "full" },
        args.lull.display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the driver's tokio runtime")?;
    let mut bench = Bench::new(&args.lull, runtime)?;
    let result = measure(&mut bench, runs);
    // Whatever happened: the service deleted while the daemon answers, then the sweep in Drop.
    if let Err(e) = bench.delete_service() {
        eprintln!("lull-bench-lifecycle: delete the service: {e:#}");
    }
    if result.is_err() {
        bench.print_daemon_log();
    }
    drop(bench);
    let report = result?;
    report.print();
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn measure(bench: &mut Bench, runs: usize) -> Result<Report> {
    bench.start_daemon()?;
    let mut report = Report::default();
    report.details.push(format!(
        "daemon: `lull daemon` (release build) over scratch dirs, HTTP listener on 127.0.0.1:{}, \
         bridge {}, subnet {}; service `{SERVICE}` = {FIXTURE_APP} (fixture app, defaults: 1 \
         instance, TCP health check probed every 50 ms until healthy, rollback window 10 min)",
        bench.http_port, bench.net.bridge, bench.net.subnet
    ));

    // The first deploy pulls the image; every measured one finds it cached.
    let first = Instant::now();
    let started = bench.call("POST", "/v1/services", Some(&service_doc()))?;
    let end = bench.follow(&operation_id(&started)?)?;
    expect_state(&end, "succeeded", "the first deploy")?;
    bench.wait_for_marker("create", DEADLINE)?;
    report.details.push(format!(
        "first deploy (image pulled from the local registry): {} to serving",
        ms(first.elapsed())
    ));

    // Deploys of a new revision of the cached image.
    let mut deploy = Vec::new();
    let mut deploy_end = Vec::new();
    for i in 0..runs {
        bench.wait_idle()?;
        let marker = format!("deploy-{i}");
        let t0 = Instant::now();
        let started = bench.call(
            "PATCH",
            &format!("/v1/services/{SERVICE}"),
            Some(&json!({ "env": [{ "name": MARKER, "value": marker }] })),
        )?;
        let end = bench.follow(&operation_id(&started)?)?;
        let ended = t0.elapsed();
        expect_state(&end, "succeeded", &format!("deploy {i}"))?;
        bench.wait_for_marker(&marker, DEADLINE)?;
        deploy.push(t0.elapsed());
        deploy_end.push(ended);
    }
    report.row(
        "deploy of a cached image to serving",
        Duration::from_secs(1),
        &deploy,
        "minutes (≈5 min per update)",
    );
    report.details.push(format!(
        "deploy: PATCH (a new `{MARKER}` env value) → operation end `succeeded` → first 200 of \
         `GET /env` through the proxy showing the new value; per run {}; the operation's end \
         alone: p50 {}, max {}",
        join_ms(&deploy),
        ms(percentile(&deploy_end, 50.0)),
        ms(percentile(&deploy_end, 100.0))
    ));

    // Deploys that fail: the command does not exist.
    let mut failed = Vec::new();
    let mut causes = Vec::new();
    for i in 0..runs {
        bench.wait_idle()?;
        let t0 = Instant::now();
        let started = bench.call(
            "PATCH",
            &format!("/v1/services/{SERVICE}"),
            Some(&json!({
                "command": ["/nonexistent"],
                "env": [{ "name": MARKER, "value": format!("failed-{i}") }],
            })),
        )?;
        let end = bench.follow(&operation_id(&started)?)?;
        failed.push(t0.elapsed());
        expect_state(&end, "failed", &format!("failed deploy {i}"))?;
        let cause = end["cause"]
            .as_str()
            .or_else(|| end["message"].as_str())
            .unwrap_or("")
            .to_owned();
        if !cause.contains("/nonexistent") {
            bail!("failed deploy {i}: the reported failure does not name /nonexistent: {end}");
        }
        causes.push(cause);
        // The revision that served before keeps serving.
        bench.wait_for_marker(&format!("deploy-{}", runs - 1), Duration::from_secs(2))?;
    }
    report.row(
        "failed deploy (command not found) to reported failure",
        Duration::from_secs(1),
        &failed,
        "5–20 min",
    );
    report.details.push(format!(
        "failed deploy: PATCH with `command: [\"/nonexistent\"]` → operation end `failed`, the \
         previous revision still serving; per run {}; cause reported: {:?}",
        join_ms(&failed),
        causes.first().map_or("", String::as_str)
    ));

    // Back to a revision that runs.
    bench.wait_idle()?;
    let started = bench.call(
        "PATCH",
        &format!("/v1/services/{SERVICE}"),
        Some(&json!({ "command": [], "env": [{ "name": MARKER, "value": "restored" }] })),
    )?;
    let end = bench.follow(&operation_id(&started)?)?;
    expect_state(&end, "succeeded", "the deploy after the failed ones")?;
    bench.wait_for_marker("restored", DEADLINE)?;

    // Pause and resume.
    let mut pause = Vec::new();
    let mut resume = Vec::new();
    let mut pause_call = Vec::new();
    let mut resume_call = Vec::new();
    for i in 0..runs {
        bench.wait_idle()?;
        let t0 = Instant::now();
        bench.call("POST", &format!("/v1/services/{SERVICE}/pause"), None)?;
        pause_call.push(t0.elapsed());
        bench
            .wait_for_status(503, DEADLINE)
            .with_context(|| format!("pause {i}"))?;
        pause.push(t0.elapsed());

        bench.wait_idle()?;
        let t0 = Instant::now();
        let answer = bench.call("POST", &format!("/v1/services/{SERVICE}/resume"), None)?;
        if let Some(id) = answer["operation"].as_str() {
            let end = bench.follow(id)?;
            expect_state(&end, "succeeded", &format!("resume {i}"))?;
        }
        resume_call.push(t0.elapsed());
        bench
            .wait_for_status(200, DEADLINE)
            .with_context(|| format!("resume {i}"))?;
        resume.push(t0.elapsed());
    }
    report.row(
        "pause (API call to 503 at the proxy)",
        Duration::from_millis(200),
        &pause,
        "2–5 min",
    );
    report.row(
        "resume (API call to 200 at the proxy)",
        Duration::from_millis(200),
        &resume,
        "2–5 min",
    );
    report.details.push(format!(
        "pause: POST /pause → first 503 through the proxy (instances stopped, route kept); per \
         run {}; the call alone: p50 {}",
        join_ms(&pause),
        ms(percentile(&pause_call, 50.0))
    ));
    report.details.push(format!(
        "resume: POST /resume → first 200 through the proxy (instances started again, healthy); \
         per run {}; the call alone: p50 {}",
        join_ms(&resume),
        ms(percentile(&resume_call, 50.0))
    ));

    // Daemon restarts.
    let mut restart = Vec::new();
    let mut new_instances = Vec::new();
    let mut adopted = 0;
    for i in 0..runs {
        bench.wait_idle()?;
        let before = bench.instance_ids()?;
        let serving = bench.serving_instances()?;
        let t0 = Instant::now();
        bench.kill_daemon()?;
        bench.spawn_daemon()?;
        bench
            .wait_for_status(200, DEADLINE)
            .with_context(|| format!("restart {i}: the first 200 after the restart"))?;
        restart.push(t0.elapsed());
        bench.wait_for_api()?;
        let after = bench.instance_ids()?;
        let after_serving = bench.serving_instances()?;
        adopted = after.len();
        let added: Vec<String> = after
            .iter()
            .filter(|id| !before.contains(id))
            .cloned()
            .collect();
        if !added.is_empty() || after_serving != serving {
            new_instances.push(format!(
                "restart {i}: instances {before:?} → {after:?}, serving {serving:?} → {after_serving:?}"
            ));
        }
    }
    let mut row = Row::new(
        "daemon restart (kill -9) to first 200, instances adopted",
        Duration::from_secs(1),
        &restart,
        "- (managed)",
    );
    if !new_instances.is_empty() {
        row.pass = Some(false);
    }
    report.rows.push(row);
    report.details.push(format!(
        "daemon restart: kill -9 of the daemon, a new `lull daemon` spawned (same config) → \
         first 200 through the proxy; per run {}; the service listed {adopted} instance(s) \
         after the last one; {}",
        join_ms(&restart),
        if new_instances.is_empty() {
            "no instance started, the same ones serving before and after".to_owned()
        } else {
            format!("NEW INSTANCES: {}", new_instances.join("; "))
        }
    ));
    Ok(report)
}

fn service_doc() -> Value {
    json!({
        "name": SERVICE,
        "source": { "type": "image", "reference": FIXTURE_APP },
        "env": [{ "name": MARKER, "value": "create" }],
    })
}

fn operation_id(started: &Value) -> Result<String> {
    started["operation"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no operation started: {started}"))
}

fn expect_state(end: &Value, state: &str, what: &str) -> Result<()> {
    if end["state"].as_str() != Some(state) {
        bail!("{what}: expected the operation to end {state}, it ended {end}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The daemon under test and everything it makes

/// Per-run names for the instance network, so the run never meets a test or an installed lull.
struct Network {
    bridge: String,
    table: String,
    veth_prefix: String,
    subnet: String,
    ip_forward: String,
}

impl Network {
    fn new() -> Network {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = std::process::id().wrapping_mul(31) ^ nanos;
        let tag = format!("{:04x}", n & 0xffff);
        Network {
            bridge: format!("llb{tag}"),
            table: format!("lull_bench_lc_{tag}"),
            veth_prefix: format!("llv{tag}"),
            subnet: format!("10.76.{}.0/24", n % 250),
            ip_forward: fs::read_to_string(IP_FORWARD).unwrap_or_else(|_| "0".into()),
        }
    }

    fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("LULL_BRIDGE", &self.bridge),
            ("LULL_NFT_TABLE", &self.table),
            ("LULL_VETH_PREFIX", &self.veth_prefix),
            ("LULL_SUBNET", &self.subnet),
        ]
    }
}

/// The daemon's settings file for this run.
fn daemon_config(data_dir: &Path, run_dir: &Path, http_port: u16, net: &Network) -> String {
    format!(
        "data_dir = {data:?}\n\
         run_dir = {run:?}\n\
         \n\
         [listeners]\n\
         http = \"127.0.0.1:{http_port}\"\n\
         https = \"off\"\n\
         \n\
         [metrics]\n\
         address = \"off\"\n\
         \n\
         [network]\n\
         bridge = {bridge:?}\n\
         subnet = {subnet:?}\n\
         nft_table = {table:?}\n\
         veth_prefix = {prefix:?}\n",
        data = data_dir.display().to_string(),
        run = run_dir.display().to_string(),
        bridge = net.bridge,
        subnet = net.subnet,
        table = net.table,
        prefix = net.veth_prefix,
    )
}

/// The daemon and its scratch state. Dropping it stops the daemon, removes every instance
/// (`lull rm`), takes the network down (`lull network down --force`), puts IP forwarding back,
/// kills what is left in the cgroups and removes the dirs. Fields drop in order: the cgroups
/// (processes killed) before the scratch dir (mounts undone).
struct Bench {
    lull: PathBuf,
    runtime: tokio::runtime::Runtime,
    daemon: Option<Child>,
    /// How many daemons this run spawned (each logs to `daemon-<n>.log`).
    spawned: usize,
    client: Client,
    http_port: u16,
    config: PathBuf,
    net: Network,
    cgroups: CgroupParentGuard,
    scratch: ScratchDir,
}

impl Bench {
    fn new(lull: &Path, runtime: tokio::runtime::Runtime) -> Result<Bench> {
        let scratch = ScratchDir::new("lull-bench-lifecycle").context("create the scratch dir")?;
        let cgroups = CgroupParentGuard::new("lull-bench-lifecycle");
        let net = Network::new();
        let http_port = lull_tests::bench_util::free_port()?;
        let data_dir = scratch.path().join("data");
        let run_dir = scratch.path().join("run");
        let config = scratch.path().join("lull.toml");
        fs::write(&config, daemon_config(&data_dir, &run_dir, http_port, &net))
            .with_context(|| format!("write {}", config.display()))?;
        Ok(Bench {
            lull: lull.to_owned(),
            runtime,
            daemon: None,
            spawned: 0,
            client: Client::new(run_dir.join(lull_daemon::config::SOCKET_FILE)),
            http_port,
            config,
            net,
            cgroups,
            scratch,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    fn run_dir(&self) -> PathBuf {
        self.scratch.path().join("run")
    }

    /// `lull` with this run's dirs, cgroup parent and network names, nothing from the caller's
    /// environment.
    fn lull_command(&self) -> Command {
        let mut command = Command::new(&self.lull);
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--cgroup-parent")
            .arg(&self.cgroups.parent)
            .env_remove("LULL_DATA_DIR")
            .env_remove("LULL_RUN_DIR")
            .env_remove("LULL_CGROUP_PARENT")
            .env_remove("LULL_CONFIG")
            .env_remove("LULL_UPLINK")
            .env_remove("LULL_LOG")
            .envs(self.net.env());
        command
    }

    fn spawn_daemon(&mut self) -> Result<()> {
        self.spawned += 1;
        let log_path = self
            .scratch
            .path()
            .join(format!("daemon-{}.log", self.spawned));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let child = self
            .lull_command()
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone the log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} daemon", self.lull.display()))?;
        self.daemon = Some(child);
        Ok(())
    }

    fn start_daemon(&mut self) -> Result<()> {
        self.spawn_daemon()?;
        self.wait_for_api()
    }

    /// Waits until the admin socket answers `GET /v1/status` (or the daemon exits).
    fn wait_for_api(&mut self) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(child) = &mut self.daemon
                && let Some(status) = child.try_wait().context("wait for the daemon")?
            {
                bail!("the daemon exited ({status}) before it answered");
            }
            let answer: Result<Value, _> = self.runtime.block_on(self.client.get("/v1/status"));
            match answer {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("the daemon's admin socket never answered: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn kill_daemon(&mut self) -> Result<()> {
        let Some(mut child) = self.daemon.take() else {
            bail!("no daemon to kill");
        };
        child.kill().context("kill -9 the daemon")?;
        child.wait().context("reap the daemon")?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 15 s.
    fn stop_daemon(&mut self) {
        let Some(mut child) = self.daemon.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// One admin API call; the error is the daemon's, named with the call.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let parsed = method
            .parse()
            .with_context(|| format!("HTTP method {method}"))?;
        self.runtime
            .block_on(self.client.call(parsed, path, body))
            .with_context(|| format!("{method} {path}"))
    }

    /// Follows an operation's progress to its end and returns the end.
    fn follow(&self, id: &str) -> Result<Value> {
        let path = format!("/v1/operations/{id}/progress");
        self.runtime.block_on(async {
            let parsed = "GET".parse().context("HTTP method GET")?;
            let mut lines = self
                .client
                .stream(parsed, &path, None::<&()>)
                .await
                .with_context(|| format!("GET {path}"))?;
            let follow = async {
                while let Some(line) = lines.next().await.with_context(|| format!("GET {path}"))? {
                    if let Some(end) = line.get("end") {
                        return Ok(end.clone());
                    }
                }
                bail!("GET {path}: the stream ended without an end")
            };
            tokio::time::timeout(DEADLINE, follow)
                .await
                .map_err(|_| anyhow!("operation {id} did not end within {DEADLINE:?}"))?
        })
    }

    /// Waits until the service runs no operation (a deploy's drain, say), outside the timings.
    fn wait_idle(&self) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let service = self.call("GET", &format!("/v1/services/{SERVICE}"), None)?;
            if service["status"]["operation"].is_null() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("service {SERVICE} is still busy: {}", service["status"]);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The ids of the service's instances as the daemon reports them, sorted.
    fn instance_ids(&self) -> Result<Vec<String>> {
        let service = self.call("GET", &format!("/v1/services/{SERVICE}"), None)?;
        let mut ids: Vec<String> = service["status"]["instances"]
            .as_array()
            .ok_or_else(|| anyhow!("service {SERVICE} has no instance list: {service}"))?
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The ids of the instances in rotation (state `healthy`), sorted.
    fn serving_instances(&self) -> Result<Vec<String>> {
        let service = self.call("GET", &format!("/v1/services/{SERVICE}"), None)?;
        let mut ids: Vec<String> = service["status"]["instances"]
            .as_array()
            .ok_or_else(|| anyhow!("service {SERVICE} has no instance list: {service}"))?
            .iter()
            .filter(|i| i["state"] == "healthy")
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// One GET through the proxy with the service's host name.
    fn get(&self, path: &str) -> std::io::Result<lull_tests::http::Response> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
        stream.set_nodelay(true)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {SERVICE}.localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        lull_tests::http::parse(&raw)
    }

    /// Probes `/` until the proxy answers `status`.
    fn wait_for_status(&self, status: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.get("/") {
                Ok(r) if r.status == status => return Ok(()),
                Ok(r) => format!("{} {}", r.status, r.body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("the proxy never answered {status} within {timeout:?}; last: {last}");
            }
            std::thread::sleep(PROBE_EVERY);
        }
    }

    /// Probes `/env` until it answers 200 with `BENCH_RUN=<marker>`.
    fn wait_for_marker(&self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let wanted = format!("{MARKER}={marker}\n");
        loop {
            let last = match self.get("/env") {
                Ok(r) if r.status == 200 && r.body.contains(&wanted) => return Ok(()),
                Ok(r) => format!(
                    "{} {}",
                    r.status,
                    r.body
                        .lines()
                        .find(|l| l.starts_with(MARKER))
                        .unwrap_or(r.body.trim())
                ),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("the proxy never served {MARKER}={marker} within {timeout:?}; last: {last}");
            }
            std::thread::sleep(PROBE_EVERY);
        }
    }

    fn delete_service(&mut self) -> Result<()> {
        if self.daemon.is_none() {
            return Ok(());
        }
        match self.call("DELETE", &format!("/v1/services/{SERVICE}"), None) {
            Ok(_) => Ok(()),
            Err(e) if format!("{e:#}").contains("no service") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn print_daemon_log(&self) {
        let path = self
            .scratch
            .path()
            .join(format!("daemon-{}.log", self.spawned));
        if let Ok(text) = fs::read_to_string(&path) {
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- the last daemon's log (last 40 lines) ---");
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
            eprintln!("---");
        }
    }

    /// Removes every instance left in the data dir (they survive the daemon by design).
    fn remove_instances(&self) {
        let Ok(entries) = fs::read_dir(self.data_dir().join("instances")) else {
            return;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            let removed = self
                .lull_command()
                .args(["rm", &id])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            match removed {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "lull-bench-lifecycle: lull rm {id}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("lull-bench-lifecycle: lull rm {id}: {e}"),
            }
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop_daemon();
        self.remove_instances();
        let down = self
            .lull_command()
            .args(["network", "down", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match down {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "lull-bench-lifecycle: lull network down: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("lull-bench-lifecycle: lull network down: {e}"),
        }
        if let Err(e) = fs::write(IP_FORWARD, &self.net.ip_forward) {
            eprintln!("lull-bench-lifecycle: restore {IP_FORWARD}: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

/// Nearest-rank percentile of `samples` (any order), `p` in 0..=100.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

fn join_ms(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
        + " ms"
}

/// One line of the table.
struct Row {
    name: String,
    target: Duration,
    p50: Duration,
    max: Duration,
    runs: usize,
    app_runner: String,
    /// p50 under the target (and, for the restart, no new instance).
    pass: Option<bool>,
}

impl Row {
    fn new(name: &str, target: Duration, samples: &[Duration], app_runner: &str) -> Row {
        let p50 = percentile(samples, 50.0);
        Row {
            name: name.to_owned(),
            target,
            p50,
            max: percentile(samples, 100.0),
            runs: samples.len(),
            app_runner: app_runner.to_owned(),
            pass: (!samples.is_empty()).then_some(p50 < target),
        }
    }

    fn cells(&self) -> [String; 7] {
        [
            self.name.clone(),
            format!("< {} p50", ms(self.target)),
            ms(self.p50),
            ms(self.max),
            self.runs.to_string(),
            self.app_runner.clone(),
            match self.pass {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            }
            .to_owned(),
        ]
    }
}

const HEADERS: [&str; 7] = [
    "measurement",
    "target",
    "p50",
    "max",
    "runs",
    "App Runner",
    "pass",
];

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
}

impl Report {
    fn row(&mut self, name: &str, target: Duration, samples: &[Duration], app_runner: &str) {
        self.rows.push(Row::new(name, target, samples, app_runner));
    }

    fn print(&self) {
        let cells: Vec<[String; 7]> = self.rows.iter().map(Row::cells).collect();
        let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut out = String::new();
            for (c, w) in row.iter().zip(&widths) {
                let pad = w.saturating_sub(c.chars().count());
                let _ = write!(out, "{c}{}  ", " ".repeat(pad));
            }
            out.trim_end().to_owned()
        };
        let headers: Vec<String> = HEADERS.iter().map(|h| (*h).to_owned()).collect();
        println!();
        println!("{}", line(&headers));
        println!(
            "{}",
            line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>())
        );
        for row in &cells {
            println!("{}", line(row));
        }
        println!();
        for d in &self.details {
            println!("  {d}");
        }
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", HEADERS.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(HEADERS.len()));
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.cells().join(" | "));
        }
        let missed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.pass == Some(false))
            .map(|r| r.name.as_str())
            .collect();
        out.push('\n');
        if missed.is_empty() {
            out.push_str("Every target was met in this run.\n");
        } else {
            let _ = writeln!(
                out,
                "**Targets missed in this run:** {}.",
                missed.join("; ")
            );
        }
        out.push_str("\nDetails:\n\n");
        for d in &self.details {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let ms = |v: u64| Duration::from_millis(v);
        let samples = [ms(5), ms(1), ms(4), ms(2), ms(3)];
        assert_eq!(percentile(&samples, 50.0), ms(3));
        assert_eq!(percentile(&samples, 100.0), ms(5));
        assert_eq!(percentile(&[ms(7), ms(9)], 50.0), ms(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn the_daemon_config_parses_with_the_runs_own_names() {
        let net = Network {
            bridge: "llb1234".into(),
            table: "lull_bench_lc_1234".into(),
            veth_prefix: "llv1234".into(),
            subnet: "10.76.9.0/24".into(),
            ip_forward: "0".into(),
        };
        let data = Path::new("/tmp/bench x/data");
        let run = Path::new("/tmp/bench x/run");
        let text = daemon_config(data, run, 18080, &net);
        let config = lull_daemon::config::DaemonConfig::parse(&text, "lull.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.data_dir, data);
        assert_eq!(config.run_dir, run);
        assert_eq!(config.socket.path, run.join("lull.sock"));
        let http = config.listeners.http.expect("an HTTP listener");
        assert_eq!(http.to_string(), "127.0.0.1:18080");
        assert_eq!(config.listeners.https, None);
        assert_eq!(config.metrics, None);
        assert_eq!(config.network.bridge, "llb1234");
        assert_eq!(config.network.table, "lull_bench_lc_1234");
        assert_eq!(config.network.veth_prefix, "llv1234");
        assert_eq!(config.network.subnet.to_string(), "10.76.9.0/24");
    }

    #[test]
    fn a_missed_target_is_named_in_the_markdown() {
        let ms = |v: u64| Duration::from_millis(v);
        let mut report = Report::default();
        report.row("fast", ms(200), &[ms(10), ms(20)], "minutes");
        report.row("slow", ms(200), &[ms(300), ms(400)], "minutes");
        let text = report.markdown();
        assert!(
            text.contains("| fast | < 200 ms p50 | 10.0 ms | 20.0 ms | 2 | minutes | yes |"),
            "{text}"
        );
        assert!(
            text.contains("| slow | < 200 ms p50 | 300 ms | 400 ms | 2 |"),
            "{text}"
        );
        assert!(
            text.contains("**Targets missed in this run:** slow."),
            "{text}"
        );
    }
}
