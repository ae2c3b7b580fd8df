//! What the benchmark drivers (`lull-bench-*`) share: their command line, percentiles and
//! durations in words, the results table (printed and as markdown), and a release `lull daemon`
//! over scratch dirs with a cgroup parent, an instance network (bridge, nftables table, link
//! prefix, subnet) and a loopback HTTP port of the run's own, driven through its admin socket
//! (`lull_daemon::api::Client`) and its proxy.
//!
//! Harness code for programs that report errors and exit: it uses `anyhow`, like the drivers.
//! Targets are reported, never enforced: a driver fails only when the harness does.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use lull_daemon::api::Client;
use serde_json::Value;

use crate::scratch::{CgroupParentGuard, ScratchDir};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

// ---------------------------------------------------------------------------------------------
// The command line

/// `--lull PATH [--smoke] [--markdown PATH]`, what every daemon benchmark takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchArgs {
    /// Few runs: checks that every measurement produces a number (CI).
    pub smoke: bool,
    /// The `lull` binary (default: next to the driver).
    pub lull: PathBuf,
    /// Where to write the results as markdown.
    pub markdown: Option<PathBuf>,
}

impl BenchArgs {
    /// Parses `args` (without the program name); `usage` ends every error.
    pub fn parse(args: impl IntoIterator<Item = String>, usage: &str) -> Result<BenchArgs> {
        let exe = std::env::current_exe().context("find this executable")?;
        let mut parsed = BenchArgs {
            smoke: false,
            lull: exe.with_file_name("lull"),
            markdown: None,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .with_context(|| format!("{name} needs a value\n{usage}"))
            };
            match arg.as_str() {
                "--smoke" => parsed.smoke = true,
                "--lull" => parsed.lull = value("--lull")?.into(),
                "--markdown" => parsed.markdown = Some(value("--markdown")?.into()),
                other => bail!("unknown argument {other:?}\n{usage}"),
            }
        }
        Ok(parsed)
    }

    /// Fails unless the driver runs as root and the `lull` binary exists.
    pub fn check(&self, what: &str) -> Result<()> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the {what} benchmarks need root (the daemon makes namespaces, cgroups, mounts)");
        }
        if !self.lull.is_file() {
            bail!(
                "lull binary {} not found (build it: cargo build --release -p lull)",
                self.lull.display()
            );
        }
        Ok(())
    }
}

/// Sleeps for `duration`, or until SIGINT or SIGTERM arrives: a driver serving until
/// stopped (`--serve`) then cleans up (peers, apps, cgroups) as at the end of its time.
/// Returns whether a signal cut the sleep short.
pub fn sleep_unless_stopped(duration: Duration) -> Result<bool> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use std::sync::atomic::{AtomicBool, Ordering};
    static STOPPED: AtomicBool = AtomicBool::new(false);
    extern "C" fn stop(_: libc::c_int) {
        STOPPED.store(true, Ordering::SeqCst);
    }
    let action = SigAction::new(SigHandler::Handler(stop), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("handle {signal}"))?;
    }
    let until = Instant::now() + duration;
    while Instant::now() < until {
        if STOPPED.load(Ordering::SeqCst) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    Ok(false)
}

/// Makes `command`'s process get SIGTERM when the thread that spawns it ends: the
/// drivers spawn their apps and peers (nginx, haproxy) from their main thread, so a driver
/// killed by a signal, which runs none of its cleanup, takes them with it instead of leaving
/// them serving.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid is async-signal-safe.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl,
    // getppid and raise, which are async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would send it.
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        })
    }
}

/// Fails naming the Debian package of the first of `tools` (`(program, version flag,
/// package)`) that cannot be run.
pub fn require_tools(tools: &[(&str, &str, &str)]) -> Result<()> {
    for (tool, version_arg, package) in tools {
        std::process::Command::new(tool)
            .arg(version_arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| format!("`{tool}` not found (Debian package {package})"))?;
    }
    Ok(())
}

/// Logs to stderr, filtered by `LULL_LOG` (default `warn`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// Nearest-rank percentile of `samples` (any order), `p` in 0..=100; zero when empty.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `12.3 ms` below 100 ms, `123 ms` above.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// Every sample in whole milliseconds: `12, 14, 13 ms`.
pub fn join_ms(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
        + " ms"
}

/// `1.5 MiB`, `320 KiB`.
pub fn mib(bytes: u64) -> String {
    let kib = bytes as f64 / 1024.0;
    if kib >= 1024.0 {
        format!("{:.1} MiB", kib / 1024.0)
    } else {
        format!("{kib:.0} KiB")
    }
}

/// Milliseconds since the epoch now (to compare with the daemon's event times).
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------------
// The report

/// A results table with its notes: printed as aligned text, written as markdown.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Rows whose target was missed, by name.
    pub missed: Vec<String>,
    /// One paragraph each, under the table.
    pub details: Vec<String>,
    /// Further tables (heading, headers, rows), printed after the first.
    pub extra: Vec<(String, Vec<String>, Vec<Vec<String>>)>,
}

impl Report {
    pub fn new(headers: &[&str]) -> Report {
        Report {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            ..Report::default()
        }
    }

    /// Adds a row; `met` is whether it met its target (`None`: no target or no number), and a
    /// miss names the row (its first cell) in the summary.
    pub fn row(&mut self, cells: Vec<String>, met: Option<bool>) {
        if met == Some(false)
            && let Some(name) = cells.first()
        {
            self.missed.push(name.clone());
        }
        self.rows.push(cells);
    }

    pub fn detail(&mut self, text: impl Into<String>) {
        self.details.push(text.into());
    }

    /// The tables as aligned text, then the details.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out.push('\n');
        out.push_str(&aligned(&self.headers, &self.rows));
        for (heading, headers, rows) in &self.extra {
            let _ = write!(out, "\n{heading}\n\n{}", aligned(headers, rows));
        }
        out.push('\n');
        for d in &self.details {
            let _ = writeln!(out, "  {d}");
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = markdown_table(&self.headers, &self.rows);
        out.push('\n');
        if self.missed.is_empty() {
            out.push_str("Every target was met in this run.\n");
        } else {
            let _ = writeln!(
                out,
                "**Targets missed in this run:** {}.",
                self.missed.join("; ")
            );
        }
        for (heading, headers, rows) in &self.extra {
            let _ = write!(out, "\n{heading}\n\n{}", markdown_table(headers, rows));
        }
        out.push_str("\nDetails:\n\n");
        for d in &self.details {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}

fn aligned(headers: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
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
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(headers));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "{}", line(&rule));
    for row in rows {
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

fn markdown_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(headers.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The daemon under test and everything it makes

/// Per-run names for the instance network, so the run never meets a test or an installed lull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub bridge: String,
    pub table: String,
    pub veth_prefix: String,
    pub subnet: String,
}

impl Network {
    /// Names made of `letter` (one per driver, so that two drivers never meet), a tag of this
    /// run, and the subnet `subnet(n)` picks from a number of this run.
    pub fn new(letter: char, subnet: impl Fn(u32) -> String) -> Network {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = std::process::id().wrapping_mul(31) ^ nanos;
        let tag = format!("{:04x}", n & 0xffff);
        Network {
            bridge: format!("l{letter}b{tag}"),
            table: format!("lull_bench_{letter}_{tag}"),
            veth_prefix: format!("l{letter}v{tag}"),
            subnet: subnet(n),
        }
    }

    pub fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("LULL_BRIDGE", &self.bridge),
            ("LULL_NFT_TABLE", &self.table),
            ("LULL_VETH_PREFIX", &self.veth_prefix),
            ("LULL_SUBNET", &self.subnet),
        ]
    }
}

/// The daemon's settings file: the dirs, an HTTP listener on loopback, no HTTPS or metrics
/// listener, the run's network, then `extra` (more sections, e.g. `[scaling]`).
pub fn daemon_config(
    data_dir: &Path,
    run_dir: &Path,
    http_port: u16,
    net: &Network,
    extra: &str,
) -> String {
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
         veth_prefix = {prefix:?}\n\
         {extra}",
        data = data_dir.display().to_string(),
        run = run_dir.display().to_string(),
        bridge = net.bridge,
        subnet = net.subnet,
        table = net.table,
        prefix = net.veth_prefix,
    )
}

/// A release `lull daemon` and its scratch state. Dropping it stops the daemon, removes every
/// instance (`lull rm`), takes the network down (`lull network down --force`), puts IP
/// forwarding back, kills what is left in the cgroups and removes the dirs. Fields drop in
/// order: the cgroups (processes killed) before the scratch dir (mounts undone).
pub struct BenchDaemon {
    /// The driver's name, for messages.
    driver: String,
    lull: PathBuf,
    runtime: tokio::runtime::Runtime,
    daemon: Option<Child>,
    /// How many daemons this run spawned (each logs to `daemon-<n>.log`).
    spawned: usize,
    client: Client,
    pub http_port: u16,
    config: PathBuf,
    pub net: Network,
    ip_forward: String,
    pub cgroups: CgroupParentGuard,
    scratch: ScratchDir,
}

/// Longest wait for the daemon to answer or an operation to end.
pub const DEADLINE: Duration = Duration::from_secs(120);

impl BenchDaemon {
    /// Writes the settings; [`BenchDaemon::start`] runs the daemon. `extra` is appended to the
    /// settings file.
    pub fn new(driver: &str, lull: &Path, net: Network, extra: &str) -> Result<BenchDaemon> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the driver's tokio runtime")?;
        let scratch = ScratchDir::new(driver).context("create the scratch dir")?;
        let cgroups = CgroupParentGuard::new(driver);
        let http_port = free_port()?;
        let data_dir = scratch.path().join("data");
        let run_dir = scratch.path().join("run");
        let config = scratch.path().join("lull.toml");
        fs::write(
            &config,
            daemon_config(&data_dir, &run_dir, http_port, &net, extra),
        )
        .with_context(|| format!("write {}", config.display()))?;
        Ok(BenchDaemon {
            driver: driver.to_owned(),
            lull: lull.to_owned(),
            runtime,
            daemon: None,
            spawned: 0,
            client: Client::new(run_dir.join(lull_daemon::config::SOCKET_FILE)),
            http_port,
            config,
            net,
            ip_forward: fs::read_to_string(IP_FORWARD).unwrap_or_else(|_| "0".into()),
            cgroups,
            scratch,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.scratch.path().join("run")
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// `lull` with this run's dirs, cgroup parent and network names, nothing from the caller's
    /// environment.
    pub fn lull_command(&self) -> Command {
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
            .env_remove("NOTIFY_SOCKET")
            .envs(self.net.env());
        command
    }

    pub fn spawn_daemon(&mut self) -> Result<()> {
        self.spawned += 1;
        let log_path = self.log_path();
        let log = fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let child = self
            .lull_command()
            .env("LULL_LOG", "warn,libcgroups=error")
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

    pub fn start(&mut self) -> Result<()> {
        self.spawn_daemon()?;
        self.wait_for_api()
    }

    /// Waits until the admin socket answers `GET /v1/status` (or the daemon exits).
    pub fn wait_for_api(&mut self) -> Result<()> {
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

    /// SIGTERM, then SIGKILL after 15 s.
    pub fn stop_daemon(&mut self) {
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
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let parsed = method
            .parse()
            .with_context(|| format!("HTTP method {method}"))?;
        self.runtime
            .block_on(self.client.call(parsed, path, body))
            .with_context(|| format!("{method} {path}"))
    }

    /// Reads a JSON-lines answer to its end (events without `follow`).
    pub fn lines(&self, path: &str) -> Result<Vec<Value>> {
        self.runtime.block_on(async {
            let parsed = "GET".parse().context("HTTP method GET")?;
            let mut lines = self
                .client
                .stream(parsed, path, None::<&()>)
                .await
                .with_context(|| format!("GET {path}"))?;
            let mut all = Vec::new();
            while let Some(line) = lines.next().await.with_context(|| format!("GET {path}"))? {
                all.push(line);
            }
            Ok(all)
        })
    }

    /// The events of `service` of kind `kind` (every kind when empty), oldest first.
    pub fn events(&self, service: &str, kind: &str) -> Result<Vec<Value>> {
        Ok(self
            .lines(&format!("/v1/services/{service}/events"))?
            .into_iter()
            .filter(|e| kind.is_empty() || e["kind"] == kind)
            .collect())
    }

    /// Follows an operation's progress to its end and returns the end.
    pub fn follow(&self, id: &str) -> Result<Value> {
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

    /// Calls `method path` with `body` and follows the operation it starts (if any) to its
    /// end; fails unless the operation succeeded.
    pub fn operate(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let started = self.call(method, path, body)?;
        let Some(id) = started["operation"].as_str() else {
            return Ok(started);
        };
        let end = self.follow(id)?;
        if end["state"] != "succeeded" {
            bail!("{method} {path}: the operation ended {end}");
        }
        Ok(end)
    }

    /// Waits until `service` runs no operation (a deploy's drain, say).
    pub fn wait_idle(&self, service: &str) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let shown = self.call("GET", &format!("/v1/services/{service}"), None)?;
            if shown["status"]["operation"].is_null() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("service {service} is still busy: {}", shown["status"]);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The instances of `service` as the daemon lists them (`id`, `state`, `revision`, ...).
    pub fn instances(&self, service: &str) -> Result<Vec<Value>> {
        let shown = self.call("GET", &format!("/v1/services/{service}"), None)?;
        shown["status"]["instances"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("service {service} has no instance list: {shown}"))
    }

    /// How many instances of `service` are in rotation (state `healthy`).
    pub fn healthy(&self, service: &str) -> Result<usize> {
        Ok(self
            .instances(service)?
            .iter()
            .filter(|i| i["state"] == "healthy")
            .count())
    }

    /// Polls `check` every `every` until it returns true; fails after `timeout` naming `what`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        every: Duration,
        mut check: impl FnMut(&BenchDaemon) -> Result<bool>,
    ) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if check(self)? {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("{what}: not within {timeout:?}");
            }
            std::thread::sleep(every);
        }
    }

    /// One GET through the proxy with `host` as the Host header, on a connection of its own.
    pub fn get(&self, host: &str, path: &str, timeout: Duration) -> Result<crate::http::Response> {
        proxy_get(self.http_port, host, path, timeout)
            .with_context(|| format!("GET http://{host}{path} through the proxy"))
    }

    /// Deletes `service` if the daemon runs and knows it, following the deletion to its end.
    pub fn delete_service(&self, service: &str) -> Result<()> {
        if self.daemon.is_none() {
            return Ok(());
        }
        match self.operate("DELETE", &format!("/v1/services/{service}"), None) {
            Ok(_) => Ok(()),
            Err(e) if format!("{e:#}").contains("no service") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn log_path(&self) -> PathBuf {
        self.scratch
            .path()
            .join(format!("daemon-{}.log", self.spawned))
    }

    /// The last 40 lines of the last daemon's log, on stderr.
    pub fn print_daemon_log(&self) {
        if let Ok(text) = fs::read_to_string(self.log_path()) {
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
                    "{}: lull rm {id}: {}",
                    self.driver,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("{}: lull rm {id}: {e}", self.driver),
            }
        }
    }
}

impl Drop for BenchDaemon {
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
                "{}: lull network down: {}",
                self.driver,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("{}: lull network down: {e}", self.driver),
        }
        if let Err(e) = fs::write(IP_FORWARD, &self.ip_forward) {
            eprintln!("{}: restore {IP_FORWARD}: {e}", self.driver);
        }
    }
}

/// One GET through a proxy on 127.0.0.1:`port` with a `Host` header, `Connection: close`.
pub fn proxy_get(
    port: u16,
    host: &str,
    path: &str,
    timeout: Duration,
) -> std::io::Result<crate::http::Response> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    crate::http::parse(&raw)
}

/// A loopback TCP port free now, below the kernel's ephemeral range (`ip_local_port_range`
/// starts at 32768), so the load tools' own outgoing connections cannot take it before the
/// server it is meant for binds it. Never the same port twice in one process.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let mut bytes = [0u8; 2];
        getrandom::fill(&mut bytes).context("find a free port: no randomness")?;
        let port = 16384 + u16::from_le_bytes(bytes) % 16000;
        if !given.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("find a free port: none free among 1000 tried in 16384..32384")
}

// ---------------------------------------------------------------------------------------------
// Cgroup figures of a cgroup parent (v1 hierarchies or the unified one)

/// The first existing `<mount>/<parent>/<file>` among the cgroup mounts, read as a number.
pub fn cgroup_number(parent: &str, file: &str) -> Option<u64> {
    crate::scratch::cgroup_mounts().into_iter().find_map(|m| {
        fs::read_to_string(m.join(parent.trim_start_matches('/')).join(file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    })
}

/// Pids in `cgroup.procs` anywhere under the parent in the first hierarchy that has it.
pub fn cgroup_pids(parent: &str) -> Vec<i32> {
    fn walk(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    for mount in crate::scratch::cgroup_mounts() {
        let dir = mount.join(parent.trim_start_matches('/'));
        if dir.is_dir() {
            walk(&dir, &mut pids);
            if !pids.is_empty() {
                break;
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// A process's proportional set size (`Pss` of `smaps_rollup`), in bytes.
pub fn pss_bytes(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A process's resident set size (`VmRSS` of `status`), in bytes.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A process's user + system CPU time so far (`/proc/<pid>/stat`).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_nanos(
        (utime + stime) * 1_000_000_000 / ticks,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let samples = [ms(5), ms(1), ms(4), ms(2), ms(3)];
        assert_eq!(percentile(&samples, 50.0), ms(3));
        assert_eq!(percentile(&samples, 99.0), ms(5));
        assert_eq!(percentile(&samples, 100.0), ms(5));
        assert_eq!(percentile(&[ms(7), ms(9)], 50.0), ms(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        let hundred: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&hundred, 99.0), ms(99));
    }

    #[test]
    fn durations_and_sizes_read_as_words() {
        assert_eq!(super::ms(ms(250)), "250 ms");
        assert_eq!(super::ms(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(super::ms(Duration::from_micros(450)), "0.45 ms");
        assert_eq!(join_ms(&[ms(12), ms(14)]), "12, 14 ms");
        assert_eq!(mib(3 << 20), "3.0 MiB");
        assert_eq!(mib(320 << 10), "320 KiB");
    }

    #[test]
    fn args_parse_and_refuse_unknown_ones() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let parsed = BenchArgs::parse(
            args(&["--smoke", "--lull", "/x/lull", "--markdown", "out.md"]),
            "usage",
        )
        .unwrap();
        assert!(parsed.smoke);
        assert_eq!(parsed.lull, PathBuf::from("/x/lull"));
        assert_eq!(parsed.markdown, Some(PathBuf::from("out.md")));
        let e = BenchArgs::parse(args(&["--fast"]), "usage: x").unwrap_err();
        assert_eq!(format!("{e}"), "unknown argument \"--fast\"\nusage: x");
        let e = BenchArgs::parse(args(&["--lull"]), "usage: x").unwrap_err();
        assert_eq!(format!("{e}"), "--lull needs a value\nusage: x");
    }

    #[test]
    fn a_missed_target_is_named_in_the_markdown() {
        let mut report = Report::new(&["measurement", "p50", "met"]);
        report.row(
            vec!["fast".into(), "10 ms".into(), "yes".into()],
            Some(true),
        );
        report.row(
            vec!["slow".into(), "900 ms".into(), "NO".into()],
            Some(false),
        );
        report.row(vec!["tier 2".into(), "not built".into(), "-".into()], None);
        report.detail("a note");
        let text = report.markdown();
        assert!(text.starts_with("| measurement | p50 | met |\n|---|---|---|\n"));
        assert!(text.contains("| slow | 900 ms | NO |\n"), "{text}");
        assert!(
            text.contains("**Targets missed in this run:** slow."),
            "{text}"
        );
        assert!(text.contains("- a note\n"), "{text}");
        let printed = report.text();
        assert!(printed.contains("tier 2       not built  -"), "{printed}");
    }

    #[test]
    fn the_daemon_config_parses_with_the_runs_own_names() {
        let net = Network::new('z', |n| format!("10.77.{}.0/21", (n % 32) * 8));
        assert!(net.bridge.len() <= 15 && net.bridge.starts_with("lzb"));
        assert_eq!(net.veth_prefix.len(), 7);
        let data = Path::new("/tmp/bench x/data");
        let run = Path::new("/tmp/bench x/run");
        let text = daemon_config(
            data,
            run,
            18080,
            &net,
            "\n[scaling]\ncpu_pressure_brake = 100\n",
        );
        let config = lull_daemon::config::DaemonConfig::parse(&text, "lull.toml")
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.data_dir, data);
        assert_eq!(config.run_dir, run);
        let http = config.listeners.http.expect("an HTTP listener");
        assert_eq!(http.to_string(), "127.0.0.1:18080");
        assert_eq!(config.network.bridge, net.bridge);
        assert_eq!(config.network.table, net.table);
        assert_eq!(config.network.subnet.to_string(), net.subnet);
        assert_eq!(config.scaling.cpu_pressure_brake, 100.0);
    }

    #[test]
    fn process_figures_of_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me as i32).is_some_and(|b| b > 0));
        assert!(pss_bytes(me as i32).is_some_and(|b| b > 0));
        assert!(process_cpu(me).is_some());
    }
}
