//! `lull-bench-proxy [--smoke] [--gate-only] [--app PATH] [--markdown PATH] [--serve SECONDS]`:
//! the proxy benchmarks that `cargo xtask bench proxy` builds and runs (as root). Same machine,
//! same run, same upstream: four instances of the fixture app as plain host processes on
//! loopback, each in a cgroup of its own (one group per instance, under the cpu and cpuacct
//! hierarchies on v1, or in the unified hierarchy on v2; not the runtime's two-level layout),
//! and in front of them:
//!
//! - direct: the load generator talks to one instance, no proxy (one URL can only name one);
//! - lull: `lull_proxy::Proxy` in this process on a tokio runtime of its own (2 workers), all
//!   four instances in one pool, host `bench.local`;
//! - nginx and haproxy as keep-alive reverse proxies to the same four instances, run in the
//!   foreground as children with their configs, pid and log files in a scratch dir.
//!
//! Loads: wrk (HTTP/1.1) and h2load (h2c with prior knowledge) at 1, 50 and 256 connections,
//! median of 3 runs; fixed request rates from this program's own open-loop client (half of
//! direct's best with the load and the proxy pinned to separate CPUs, and half of the slowest
//! proxy's best with the CPUs shared); and the CPU gate on the same instances: per-request cost, the time from the
//! last response to the throttle, and the share of a CPU a spinning instance gets while idle.
//!
//! `--gate-only` runs the CPU gate's rows alone (for side-by-side runs of two builds);
//! `--serve` only starts the contenders and keeps them up, for a load and a profiler of one's own.
//!
//! Targets are reported, never enforced: the program fails only when the harness does.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lull_daemon::host::real::InstanceCpu;
use lull_proxy::config::ServiceConfig;
use lull_proxy::gate::{CpuControl, NoCpuControl};
use lull_proxy::metrics::ProxyMetrics;
use lull_proxy::pool::{InstanceSpec, Pool, PoolEvent};
use lull_proxy::{Proxy, ProxyOptions, Route, RouteTable};
use lull_runtime::cgroup::{
    CgroupLayout, Controller, CpuGate, CpuLimit, InstanceCgroup, V1Hierarchies,
};
use lull_tests::scratch::{ScratchDir, unique_name};
use lull_tests::{affinity, forwarding};

/// The allocator `lull daemon` serves the proxy with (see the cli crate).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: lull-bench-proxy [--smoke] [--gate-only] [--app PATH] [--markdown PATH] [--serve SECONDS]";

/// The host clients send; lull routes it to the pool of the four instances.
const HOST: &str = "bench.local";
/// The same four instances behind the CPU gate (a pool made for each gate-on run).
const GATE_HOST: &str = "gate.local";
/// The spinning instance behind its gate.
const SPIN_HOST: &str = "spin.local";
const INSTANCES: usize = 4;
/// Longest wait for an app or a peer proxy to answer.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Longest a request of the fixed-rate client may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of the fixed-rate client (hey's default).
const RATE_CONNS: usize = 50;
/// Every fixed-rate run first runs its schedule this long unrecorded: each proxy's upstream
/// connections are warm at the run's concurrency, whatever its idle timeout did to them
/// while the other contenders ran (lull's 4 s `upstream_idle` had closed them; nginx keeps
/// them 60 s), and the apps have a thread per connection ready.
const RATE_WARMUP: Duration = Duration::from_secs(1);
/// Request rate of the sparse gate measurement: one connection, so every request finds all
/// instances idle (throttled, with the gate on) and wakes one.
const SPARSE_RATE: f64 = 200.0;

struct Args {
    smoke: bool,
    app: PathBuf,
    markdown: Option<PathBuf>,
    /// Only start the four apps, lull, nginx and haproxy, print their addresses and keep them
    /// up this long (for profiling a contender under a load of one's own).
    serve: Option<Duration>,
    /// Only the CPU gate's rows (for A/B runs of the gate); lull's best rate comes from one
    /// wrk run at 50 connections instead of the closed-loop table.
    gate_only: bool,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe().context("find this executable")?;
    let mut parsed = Args {
        smoke: false,
        app: exe.with_file_name("lull-fixture-app"),
        markdown: None,
        serve: None,
        gate_only: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--smoke" => parsed.smoke = true,
            "--gate-only" => parsed.gate_only = true,
            "--app" => parsed.app = value("--app")?.into(),
            "--markdown" => parsed.markdown = Some(value("--markdown")?.into()),
            "--serve" => {
                let seconds: u64 = value("--serve")?
                    .parse()
                    .with_context(|| format!("--serve takes whole seconds\n{USAGE}"))?;
                parsed.serve = Some(Duration::from_secs(seconds));
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(parsed)
}

/// Durations and counts of one run.
struct Plan {
    concurrencies: Vec<usize>,
    runs: usize,
    /// Length of one wrk, h2load or fixed-rate run.
    seconds: u64,
    /// Requests timed from the last response to the throttle.
    throttle_samples: usize,
    /// Window over which the idle spinner's CPU share is measured.
    spin_window: Duration,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                concurrencies: vec![50],
                runs: 1,
                seconds: 1,
                throttle_samples: 20,
                spin_window: Duration::from_secs(1),
            }
        } else {
            Plan {
                concurrencies: vec![1, 50, 256],
                runs: 3,
                seconds: 5,
                throttle_samples: 200,
                spin_window: Duration::from_secs(2),
            }
        }
    }
}

fn main() -> ExitCode {
    lull_tests::bench_util::init_logging();
    let mut args = std::env::args().skip(1).peekable();
    let result = if args.peek().is_some_and(|a| a == "--rate-client") {
        rate_client(args.skip(1))
    } else {
        parse_args().and_then(run)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lull-bench-proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the proxy benchmarks need root (cgroups, peers binding as root)");
    }
    if !args.app.is_file() {
        bail!(
            "fixture app {} not found (build it: cargo build --release -p lull-fixture-app)",
            args.app.display()
        );
    }
    lull_tests::bench_util::require_tools(&[
        ("wrk", "--version", "wrk"),
        ("h2load", "--version", "nghttp2-client"),
        ("nginx", "-v", "nginx"),
        ("haproxy", "-v", "haproxy"),
    ])?;
    let plan = Plan::new(args.smoke);
    let mut report = Report {
        rows: Vec::new(),
        details: Vec::new(),
        tables: Vec::new(),
    };
    eprintln!(
        "lull-bench-proxy: {} run",
        if args.smoke { "smoke" } else { "full" }
    );

    let scratch = ScratchDir::new("lull-bench-proxy").context("create the scratch dir")?;
    let mut apps = Apps::new()?;
    for _ in 0..INSTANCES {
        apps.start(&args.app, false)?;
    }
    let upstreams: Vec<SocketAddr> = apps.apps.iter().map(|a| a.addr).collect();

    // The driver's own runtime (pools, health checks, gate timers); the proxy's listeners and
    // connections run on the per-CPU runtimes of `proxy_runtimes`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(DRIVER_THREAD_NAME)
        .enable_all()
        .build()
        .context("start the driver's tokio runtime")?;
    let lull = runtime.block_on(LullProxy::start(&upstreams, PROXY_THREAD_NAME, true))?;
    let mut peers = Peers::default();
    let nginx = peers.start_nginx(scratch.path(), &upstreams)?;
    let haproxy = peers.start_haproxy(scratch.path(), &upstreams)?;

    let targets = [
        Target {
            name: "direct",
            h1: upstreams[0],
            h2: None,
            cpu: CpuOf::Nothing,
        },
        Target {
            name: "lull",
            h1: lull.addr,
            h2: Some(lull.addr),
            cpu: CpuOf::Threads(std::process::id(), PROXY_THREAD_NAME),
        },
        Target {
            name: "nginx",
            h1: nginx.0,
            h2: Some(nginx.1),
            cpu: CpuOf::Tree(peers.pid("nginx")),
        },
        Target {
            name: "haproxy",
            h1: haproxy.0,
            h2: Some(haproxy.1),
            cpu: CpuOf::Tree(peers.pid("haproxy")),
        },
    ];
    for target in &targets {
        wait_until_answering(target.h1, HOST).with_context(|| format!("{} (h1)", target.name))?;
        if target.name != "direct" {
            let response = lull_tests::bench_util::proxy_get(
                target.h1.port(),
                HOST,
                "/headers",
                Duration::from_secs(5),
            )
            .with_context(|| format!("GET /headers through {}", target.name))?;
            forwarding::check(target.name, HOST, &response.body)?;
        }
    }
    if let Some(serve) = args.serve {
        // For A/B runs of one's own: lull without its HTTP/1 fast path (hyper for every
        // request), on threads of its own.
        let hyper_only =
            runtime.block_on(LullProxy::start(&upstreams, HYPER_ONLY_THREAD_NAME, false))?;
        println!(
            "lull without the HTTP/1 fast path: http://{} cpu of threads {HYPER_ONLY_THREAD_NAME}-*",
            hyper_only.addr
        );
        for target in &targets {
            println!(
                "{:<8} http://{} (h2c: {}) cpu of {:?}",
                target.name,
                target.h1,
                target
                    .h2
                    .map_or_else(|| "-".to_owned(), |a| format!("http://{a}")),
                target.cpu
            );
        }
        println!(
            "send Host: {HOST}; serving for {} s (or until SIGINT/SIGTERM)",
            serve.as_secs()
        );
        if lull_tests::bench_util::sleep_unless_stopped(serve)? {
            println!("stopped by a signal: cleaning up");
        }
        drop(peers);
        runtime.block_on(lull.proxy.shutdown(Duration::from_secs(1)));
        runtime.block_on(hyper_only.proxy.shutdown(Duration::from_secs(1)));
        drop(runtime);
        return apps.stop();
    }

    let lull_best = if args.gate_only {
        wrk(lull.addr, RATE_CONNS, plan.seconds)?.rps
    } else {
        let bests = closed_loop(&plan, &targets, scratch.path(), &mut report)?;
        split_fixed_rate(&plan, &targets, &apps, &peers, &mut report)?;
        fixed_rate_peers(
            &plan,
            &targets,
            RateOf::HalfOfSlowestProxy(bests.slowest_proxy),
            None,
            &mut report,
        )?;
        bests.lull
    };
    cpu_gate(
        &plan,
        &runtime,
        &lull,
        &mut apps,
        &args.app,
        lull_best,
        &mut report,
    )?;
    peers.check_alive()?;

    report.details.push(format!(
        "upstream: {INSTANCES} fixture apps (release build, std-only HTTP/1.1 server) on 127.0.0.1, `GET /` (a {}-byte body); direct = wrk/h2load/the fixed-rate client straight to one of them (a URL names one instance), the proxies spread the same load over all four",
        apps.body_len
    ));
    report.details.push(format!(
        "lull: lull_proxy::Proxy in the driver process, served by 2 current-thread tokio runtimes (one thread each, SO_REUSEPORT sockets: Proxy::listen_on), one pool of the four instances (ServiceConfig::default(), NoCpuControl unless the gate is on), clients send Host: {HOST}; nginx {}: worker_processes 2, upstream least_conn with keepalive 64, proxy_http_version 1.1, Connection \"\", h2c on a second `listen ... http2` port; haproxy {}: nbthread 2, mode http, balance leastconn, http-reuse always, h2c on a second bind with proto h2; all three send the app the same request: the client's Host, and X-Forwarded-For/-Proto/-Host, Forwarded and X-Request-Id added (the peers' config fragments in tests/src/forwarding.rs), checked through the app's /headers before the run",
        nginx_version(),
        haproxy_version()
    ));
    drop(peers);
    runtime.block_on(lull.proxy.shutdown(Duration::from_secs(1)));
    drop(runtime);
    apps.stop()?;

    report.print();
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

struct Target {
    name: &'static str,
    h1: SocketAddr,
    /// Where it speaks h2c with prior knowledge (the fixture app does not).
    h2: Option<SocketAddr>,
    /// Whose CPU time is the contender's.
    cpu: CpuOf,
}

/// Where a contender's CPU time is read: the scheduler's run time of its threads
/// (`/proc/<pid>/task/<tid>/schedstat`, in ns), summed.
#[derive(Debug, Clone, Copy)]
enum CpuOf {
    Nothing,
    /// The threads of process `.0` whose name starts with `.1` (lull's proxy threads in this
    /// process).
    Threads(u32, &'static str),
    /// A process and its children, all their threads (nginx's master and workers; haproxy).
    Tree(u32),
}

impl CpuOf {
    /// CPU time used so far; `None` when there is nothing to read.
    fn used(&self) -> Option<Duration> {
        let tasks_ns = |pid: u32, prefix: Option<&str>| -> u64 {
            let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
                return 0;
            };
            tasks
                .flatten()
                .filter(|t| {
                    prefix.is_none_or(|p| {
                        fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.trim_end().starts_with(p))
                    })
                })
                .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        };
        let ns = match *self {
            CpuOf::Nothing | CpuOf::Tree(0) => return None,
            CpuOf::Threads(pid, prefix) => tasks_ns(pid, Some(prefix)),
            CpuOf::Tree(root) => tree_pids(root)
                .into_iter()
                .map(|pid| tasks_ns(pid, None))
                .sum(),
        };
        Some(Duration::from_nanos(ns))
    }
}

/// `root` and its children.
fn tree_pids(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if parent_pid(pid) == Some(root) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The parent of `pid`, from `/proc/<pid>/stat` (the field after the state, which follows the
/// command name in parentheses).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The upstream: fixture apps in cgroups of their own

struct App {
    child: Child,
    addr: SocketAddr,
    cgroup: InstanceCgroup,
    gate: Arc<CgroupCpu>,
}

/// The fixture apps of this run. Dropping it kills them (after restoring their CPU) and removes
/// their cgroups, whether the run finished or not.
struct Apps {
    layout: CgroupLayout,
    apps: Vec<App>,
    /// Cgroups made, removed at the end (also those whose app failed to start).
    cgroups: Vec<InstanceCgroup>,
    body_len: usize,
}

impl Apps {
    fn new() -> Result<Apps> {
        let layout = match CgroupLayout::host().context("read the host's cgroup layout")? {
            // Only the CPU hierarchies: the apps' memory, pids and freezer cgroups are left
            // where the machine put them.
            CgroupLayout::V1(h) => CgroupLayout::V1(V1Hierarchies {
                cpu: h.cpu,
                cpuacct: h.cpuacct,
                ..V1Hierarchies::default()
            }),
            v2 => v2,
        };
        Ok(Apps {
            layout,
            apps: Vec::new(),
            cgroups: Vec::new(),
            body_len: 0,
        })
    }

    /// Starts the fixture app (`SPIN=1` if `spin`) on a free loopback port, in a new cgroup,
    /// with its CPU gate open (restored).
    fn start(&mut self, app: &Path, spin: bool) -> Result<&App> {
        let name = unique_name("lull-bench-proxy");
        let cgroup = InstanceCgroup::new(&self.layout, Path::new(&format!("/{name}")))
            .with_context(|| format!("cgroup /{name}"))?;
        cgroup.create()?;
        self.cgroups.push(cgroup.clone());
        if cgroup.controller_dir(Controller::Cpu).is_none() {
            bail!("the host has no cpu cgroup controller");
        }
        let gate = CpuGate::open(&cgroup, lull_runtime::instance::gate_limit())
            .with_context(|| format!("open the cpu gate of /{name}"))?;
        let gate = Arc::new(CgroupCpu {
            cpu: InstanceCpu::new(gate, cgroup.clone()),
            cgroup: cgroup.clone(),
        });
        gate.restore()
            .map_err(|e| anyhow!("restore /{name}: {e}"))?;
        let port = lull_tests::bench_util::free_port()?;
        let mut command = Command::new(app);
        lull_tests::bench_util::die_with_parent(&mut command);
        command
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if spin {
            command.env("SPIN", "1");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {}", app.display()))?;
        let stdout = child.stdout.take();
        // Into the list first, so that it is killed whatever happens next.
        self.apps.push(App {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            cgroup: cgroup.clone(),
            gate,
        });
        let index = self.apps.len() - 1;
        let pid = self.apps[index].child.id();
        cgroup
            .add_process(pid)
            .with_context(|| format!("move the fixture app (pid {pid}) into /{name}"))?;
        let stdout = stdout.context("the fixture app's stdout was not piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let line = rx
            .recv_timeout(START_DEADLINE)
            .map_err(|_| anyhow!("the fixture app did not start listening in {START_DEADLINE:?}"))?
            .context("read the fixture app's output")?;
        if line.trim() != format!("listening on :{port}") {
            bail!("the fixture app printed {line:?}, not `listening on :{port}`");
        }
        let addr = self.apps[index].addr;
        let (status, body_len) = get_once(addr, HOST)?;
        if status != 200 {
            bail!("the fixture app at {addr} answered {status} to GET /");
        }
        self.body_len = body_len;
        Ok(&self.apps[index])
    }

    /// Kills the apps and removes their cgroups; an error if a cgroup stays.
    fn stop(&mut self) -> Result<()> {
        for app in &mut self.apps {
            // A throttled app needs its CPU to die quickly.
            let _ = app.gate.restore();
            let _ = app.child.kill();
            let _ = app.child.wait();
        }
        self.apps.clear();
        let mut failed = Vec::new();
        for cgroup in self.cgroups.drain(..) {
            if let Err(e) = cgroup.remove() {
                failed.push(format!("{}: {e}", cgroup.cgroups_path().display()));
            }
        }
        if !failed.is_empty() {
            bail!("cgroups left behind: {}", failed.join("; "));
        }
        Ok(())
    }
}

impl Drop for Apps {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("lull-bench-proxy: {e:#}");
        }
    }
}

/// The daemon's CPU control of an instance (the runtime's gate, the cgroup's usage counter),
/// and the cgroup to check its quota in.
struct CgroupCpu {
    cpu: InstanceCpu,
    cgroup: InstanceCgroup,
}

impl CgroupCpu {
    /// Whether the cgroup's quota file holds the throttled limit right now.
    fn quota_is_throttled(&self) -> Result<bool> {
        let throttled = CpuLimit::THROTTLED;
        let dir = self
            .cgroup
            .controller_dir(Controller::Cpu)
            .context("no cpu controller")?;
        if self.cgroup.is_v2() {
            let path = dir.join("cpu.max");
            let value =
                fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            Ok(value.trim() == throttled.cpu_max_value())
        } else {
            let path = dir.join("cpu.cfs_quota_us");
            let value =
                fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            Ok(value.trim() == throttled.cfs_quota_value())
        }
    }
}

impl CpuControl for CgroupCpu {
    fn restore(&self) -> Result<(), String> {
        self.cpu.restore()
    }

    fn throttle(&self) -> Result<(), String> {
        self.cpu.throttle()
    }

    fn usage_ns(&self) -> Option<u64> {
        self.cpu.usage_ns()
    }
}

// ---------------------------------------------------------------------------------------------
// The contenders

/// Threads (each a current-thread runtime) serving lull's proxy: one per CPU of this machine.
const PROXY_THREADS: usize = 2;
/// Their names' prefix (`spawn_runtimes` appends `-<n>`).
const PROXY_THREAD_NAME: &str = "lull-proxy";
/// The driver's runtime thread (pools, health checks, gate timers).
const DRIVER_THREAD_NAME: &str = "lull-driver";
/// `--serve`'s second lull, without the HTTP/1 fast path.
const HYPER_ONLY_THREAD_NAME: &str = "lull-hyper";

struct LullProxy {
    proxy: Proxy,
    routes: Arc<RouteTable>,
    addr: SocketAddr,
    /// Keeps the pool's event channel open.
    _events: tokio::sync::mpsc::UnboundedReceiver<PoolEvent>,
}

impl LullProxy {
    /// The proxy as the daemon embeds it: one pool of all upstreams at `HOST`.
    /// lull on `upstreams`, served by threads named `thread_name`, its HTTP/1 fast path on
    /// or off.
    async fn start(
        upstreams: &[SocketAddr],
        thread_name: &str,
        http1_fast_path: bool,
    ) -> Result<LullProxy> {
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let metrics = Arc::new(ProxyMetrics::new());
        let pool = Pool::with_metrics(
            "bench",
            Arc::new(ServiceConfig::default()),
            events_tx,
            metrics,
        );
        for (i, addr) in upstreams.iter().enumerate() {
            let id = format!("bench-{i}");
            pool.add_instance(InstanceSpec {
                id: id.clone(),
                addr: *addr,
                cpu: Arc::new(NoCpuControl),
            });
            pool.set_healthy(&id, true, "bench");
        }
        let routes = Arc::new(RouteTable::new());
        routes.insert(HOST, Route::new(pool, "rev-1"));
        let options = ProxyOptions {
            http1_fast_path,
            ..ProxyOptions::default()
        };
        let proxy = Proxy::new(routes.clone(), options);
        // One current-thread runtime per CPU, each with its own SO_REUSEPORT socket, as the
        // daemon runs the proxy.
        let addr = proxy
            .listen_on(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                &lull_proxy::server::spawn_runtimes(PROXY_THREADS, thread_name)
                    .context("start the proxy's threads")?,
            )
            .context("start lull's proxy")?;
        Ok(LullProxy {
            proxy,
            routes,
            addr,
            _events: events,
        })
    }

    /// Routes `host` to a new pool of `apps` behind their real CPU gates; the instances are
    /// healthy (so throttled) when this returns.
    fn gate_route(&self, host: &str, apps: &[&App]) -> Arc<Pool> {
        let (events_tx, _) = tokio::sync::mpsc::unbounded_channel();
        let pool = Pool::new(host, Arc::new(ServiceConfig::default()), events_tx);
        for (i, app) in apps.iter().enumerate() {
            let id = format!("{host}-{i}");
            pool.add_instance(InstanceSpec {
                id: id.clone(),
                addr: app.addr,
                cpu: app.gate.clone(),
            });
            pool.set_healthy(&id, true, "bench");
        }
        self.routes.insert(host, Route::new(pool.clone(), "rev-1"));
        pool
    }

    /// Undoes [`LullProxy::gate_route`]: the instances leave the pool, which restores their CPU.
    fn remove_gate_route(&self, host: &str, pool: &Pool) {
        self.routes.remove(host);
        for instance in pool.snapshot().instances {
            pool.remove_instance(&instance.id);
        }
    }
}

/// nginx and haproxy, killed when dropped.
#[derive(Default)]
struct Peers {
    children: Vec<(&'static str, Child)>,
}

impl Peers {
    /// Returns the HTTP/1.1 and the h2c address.
    fn start_nginx(
        &mut self,
        scratch: &Path,
        upstreams: &[SocketAddr],
    ) -> Result<(SocketAddr, SocketAddr)> {
        let dir = scratch.join("nginx");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (h1, h2) = (
            lull_tests::bench_util::free_port()?,
            lull_tests::bench_util::free_port()?,
        );
        let servers: String = upstreams
            .iter()
            .map(|a| format!("    server {a};\n"))
            .collect();
        let d = dir.display();
        let config = format!(
            "worker_processes 2;\n\
             user root;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             {forwarding_http}\
             \x20 access_log off;\n\
             \x20 client_body_temp_path {d}/body;\n\
             \x20 proxy_temp_path {d}/proxy;\n\
             \x20 fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n\
             \x20 scgi_temp_path {d}/scgi;\n\
             \x20 keepalive_requests 1000000;\n\
             \x20 upstream app {{\n\
             \x20   least_conn;\n\
             {servers}\
             \x20   keepalive 64;\n\
             \x20   keepalive_requests 1000000;\n\
             \x20 }}\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{h1};\n\
             \x20   listen 127.0.0.1:{h2} http2;\n\
             \x20   location / {{\n\
             \x20     proxy_pass http://app;\n\
             \x20     proxy_http_version 1.1;\n\
             {forwarding_location}\
             \x20   }}\n\
             \x20 }}\n\
             }}\n",
            forwarding_http = forwarding::NGINX_HTTP,
            forwarding_location = forwarding::NGINX_LOCATION,
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let log = fs::File::create(dir.join("stderr.log"))?;
        let mut command = Command::new("nginx");
        let child = lull_tests::bench_util::die_with_parent(&mut command)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nginx")?;
        self.children.push(("nginx", child));
        let (h1, h2) = (
            SocketAddr::from((Ipv4Addr::LOCALHOST, h1)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, h2)),
        );
        wait_until_answering(h1, HOST).with_context(|| {
            format!(
                "nginx did not answer (see {})",
                dir.join("error.log").display()
            )
        })?;
        Ok((h1, h2))
    }

    /// Returns the HTTP/1.1 and the h2c address.
    fn start_haproxy(
        &mut self,
        scratch: &Path,
        upstreams: &[SocketAddr],
    ) -> Result<(SocketAddr, SocketAddr)> {
        let dir = scratch.join("haproxy");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (h1, h2) = (
            lull_tests::bench_util::free_port()?,
            lull_tests::bench_util::free_port()?,
        );
        let servers: String = upstreams
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  server app{i} {a}\n"))
            .collect();
        let config = format!(
            "global\n\
             \x20 nbthread 2\n\
             \x20 maxconn 4096\n\
             \x20 pidfile {pid}\n\
             defaults\n\
             \x20 mode http\n\
             \x20 timeout connect 5s\n\
             \x20 timeout client 60s\n\
             \x20 timeout server 60s\n\
             \x20 http-reuse always\n\
             frontend bench\n\
             \x20 bind 127.0.0.1:{h1}\n\
             \x20 bind 127.0.0.1:{h2} proto h2\n\
             {forwarding_frontend}\
             \x20 default_backend app\n\
             backend app\n\
             \x20 balance leastconn\n\
             {servers}",
            pid = dir.join("haproxy.pid").display(),
            forwarding_frontend = forwarding::HAPROXY_FRONTEND,
        );
        let path = dir.join("haproxy.cfg");
        fs::write(&path, config).with_context(|| format!("write {}", path.display()))?;
        let log = fs::File::create(dir.join("stderr.log"))?;
        let mut command = Command::new("haproxy");
        let child = lull_tests::bench_util::die_with_parent(&mut command)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start haproxy")?;
        self.children.push(("haproxy", child));
        let (h1, h2) = (
            SocketAddr::from((Ipv4Addr::LOCALHOST, h1)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, h2)),
        );
        wait_until_answering(h1, HOST).with_context(|| {
            format!(
                "haproxy did not answer (see {})",
                dir.join("stderr.log").display()
            )
        })?;
        Ok((h1, h2))
    }

    /// The pid of the peer started as `name` (0, which no process has, if none was).
    fn pid(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, child)| child.id())
    }

    /// An error if a peer died during the run (its numbers would be wrong).
    fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{name} exited during the run: {status}");
            }
        }
        Ok(())
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            stop_gracefully(name, child);
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited in 5 s. Not SIGKILL at once: nginx's workers
/// outlive a killed master (they would keep running, children of init); on SIGTERM the master
/// stops them and exits.
fn stop_gracefully(name: &str, child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill with a pid we spawned and have not yet reaped (so it cannot have been
        // reused) and a valid signal number; it touches no memory.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("lull-bench-proxy: {name} did not stop on SIGTERM in 5 s, killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn nginx_version() -> String {
    // nginx prints its version on stderr.
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .replace("nginx version: ", "")
        })
        .unwrap_or_else(|| "unknown".into())
}

fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(|v| format!("HAProxy {v}"))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Retries `GET /` until it answers 200 or the start deadline passes.
fn wait_until_answering(addr: SocketAddr, host: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        match get_once(addr, host) {
            Ok((200, _)) => return Ok(()),
            Ok((status, _)) if started.elapsed() > START_DEADLINE => {
                bail!("{addr} answered {status} to GET /")
            }
            Err(e) if started.elapsed() > START_DEADLINE => {
                return Err(e.context(format!("{addr} did not answer in {START_DEADLINE:?}")));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// One `GET /` on a new connection: the status and the body's length.
fn get_once(addr: SocketAddr, host: &str) -> Result<(u16, usize)> {
    let mut conn = Conn::connect(addr, host)?;
    conn.get()
}

// ---------------------------------------------------------------------------------------------
// The fixed-rate client

/// One keep-alive HTTP/1.1 connection sending `GET /` and reading `Content-Length` bodies.
struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    fn connect(addr: SocketAddr, host: &str) -> Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        Ok(Conn {
            stream,
            addr,
            request: format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its response; the status and the body's length.
    fn get(&mut self) -> Result<(u16, usize)> {
        let addr = self.addr;
        self.stream
            .write_all(&self.request)
            .with_context(|| format!("send to {addr}"))?;
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = self
                .stream
                .read(&mut chunk)
                .with_context(|| format!("read a response head from {addr}"))?;
            if n == 0 {
                bail!("{addr} closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{addr} sent no status line: {head:?}"))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .with_context(|| format!("{addr} sent no Content-Length: {head:?}"))?;
        while self.buf.len() < head_end + length {
            let n = self
                .stream
                .read(&mut chunk)
                .with_context(|| format!("read a response body from {addr}"))?;
            if n == 0 {
                bail!("{addr} closed the connection inside a body");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..head_end + length);
        Ok((status, length))
    }
}

/// A fixed-rate run's figures, as its client process reported them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RateRun {
    p50_us: f64,
    p99_us: f64,
    /// The rate achieved over the recorded part.
    achieved: f64,
    /// Requests sent more than 1 ms after their scheduled time (the answer to the one before
    /// on the connection came late, or the client could not keep up).
    late: usize,
}

impl RateRun {
    /// The client process's one line: `p50 p99 achieved late`.
    fn parse(line: &str) -> Result<RateRun> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [p50, p99, achieved, late] = fields[..] else {
            bail!("the fixed-rate client printed {line:?}, not `p50 p99 achieved late`");
        };
        let number = |name: &str, value: &str| -> Result<f64> {
            value
                .parse()
                .with_context(|| format!("the fixed-rate client's {name}, {value:?}"))
        };
        Ok(RateRun {
            p50_us: number("p50", p50)?,
            p99_us: number("p99", p99)?,
            achieved: number("achieved rate", achieved)?,
            late: late
                .parse()
                .with_context(|| format!("the fixed-rate client's late count, {late:?}"))?,
        })
    }

    fn line(&self) -> String {
        format!(
            "{:.1} {:.1} {:.1} {}",
            self.p50_us, self.p99_us, self.achieved, self.late
        )
    }
}

/// The arguments of `--rate-client`.
const RATE_CLIENT_USAGE: &str = "--rate-client ADDR HOST RATE CONNS MILLIS [CPU,CPU...]";

/// [`open_loop`] in a process of its own (this program with `--rate-client`), so that the
/// client shares no process with a contender: lull's proxy runs in this one, and sharing it
/// with the client's threads slowed lull's answers at a fixed rate (p99 1.3-1.9 ms and 2700-5300
/// late sends at 21780 req/s, against 0.6-1.5 ms and 70-810 with lull in a process of its own;
/// nginx and haproxy 0.5-2.6 ms either way).
fn fixed_rate(
    addr: SocketAddr,
    host: &str,
    rate: f64,
    conns: usize,
    duration: Duration,
    cpus: Option<&[usize]>,
) -> Result<RateRun> {
    let exe = std::env::current_exe().context("find this executable")?;
    let mut command = Command::new(exe);
    lull_tests::bench_util::die_with_parent(&mut command);
    command.args([
        "--rate-client".to_owned(),
        addr.to_string(),
        host.to_owned(),
        format!("{rate}"),
        conns.to_string(),
        duration.as_millis().to_string(),
    ]);
    if let Some(cpus) = cpus {
        let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
        command.arg(list.join(","));
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .context("run the fixed-rate client")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "the fixed-rate client failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    RateRun::parse(text.trim())
}

/// `--rate-client`: runs [`open_loop`] and prints its [`RateRun`] line.
fn rate_client(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut next = |name: &str| {
        args.next()
            .with_context(|| format!("{name} missing: {RATE_CLIENT_USAGE}"))
    };
    fn value<T: std::str::FromStr>(name: &str, text: String) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        text.parse()
            .with_context(|| format!("{name} {text:?}: {RATE_CLIENT_USAGE}"))
    }
    let addr: SocketAddr = value("ADDR", next("ADDR")?)?;
    let host = next("HOST")?;
    let rate: f64 = value("RATE", next("RATE")?)?;
    let conns: usize = value("CONNS", next("CONNS")?)?;
    let millis: u64 = value("MILLIS", next("MILLIS")?)?;
    let cpus = match args.next() {
        Some(list) => Some(
            list.split(',')
                .map(|c| c.parse::<usize>().with_context(|| format!("CPU {c:?}")))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    if let Some(extra) = args.next() {
        bail!("unexpected {extra:?}: {RATE_CLIENT_USAGE}");
    }
    if !(rate.is_finite() && rate > 0.0) || conns == 0 {
        bail!("RATE and CONNS must be positive: {RATE_CLIENT_USAGE}");
    }
    let run = open_loop(
        addr,
        &host,
        rate,
        conns,
        Duration::from_millis(millis),
        cpus.as_deref(),
    )?;
    println!("{}", run.line());
    Ok(())
}

/// `conns` connections to `addr` each send `GET /` at `rate / conns` per second for
/// `duration`, on a fixed schedule (staggered between connections), after [`RATE_WARMUP`] of
/// the same schedule unrecorded; a request whose slot has passed is sent at once. Latency runs
/// from sending the request to reading the whole response. The client's threads run on
/// `cpus` when given.
fn open_loop(
    addr: SocketAddr,
    host: &str,
    rate: f64,
    conns: usize,
    duration: Duration,
    cpus: Option<&[usize]>,
) -> Result<RateRun> {
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let mut connections = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = Conn::connect(addr, host)?;
        // Warm each connection (and the proxy's upstream connections) up.
        conn.get()?;
        connections.push(conn);
    }
    let start = Instant::now() + Duration::from_millis(20);
    let measured_from = start + RATE_WARMUP;
    let end = measured_from + duration;
    let threads: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let offset = interval.mul_f64(i as f64 / conns as f64);
            let cpus = cpus.map(<[usize]>::to_vec);
            std::thread::spawn(move || -> Result<(Vec<f64>, usize)> {
                if let Some(cpus) = cpus {
                    affinity::pin_current_thread(&cpus)?;
                }
                let mut latencies = Vec::new();
                let mut late = 0;
                let mut k = 0u32;
                loop {
                    let slot = start + offset + interval * k;
                    if slot >= end {
                        break;
                    }
                    k += 1;
                    let recorded = slot >= measured_from;
                    let now = Instant::now();
                    if slot > now {
                        std::thread::sleep(slot - now);
                    } else if recorded && now - slot > Duration::from_millis(1) {
                        late += 1;
                    }
                    let sent = Instant::now();
                    let (status, _) = conn.get()?;
                    if status != 200 {
                        bail!("{} answered {status}", conn.addr);
                    }
                    if recorded {
                        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                    }
                }
                Ok((latencies, late))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut late = 0;
    for thread in threads {
        let (latencies, thread_late) = thread
            .join()
            .map_err(|_| anyhow!("a client thread panicked"))??;
        all.extend(latencies);
        late += thread_late;
    }
    Ok(RateRun {
        p50_us: percentile(&all, 50.0),
        p99_us: percentile(&all, 99.0),
        // Over the time actually taken: a client that fell behind sends its last requests late.
        achieved: all.len() as f64 / measured_from.elapsed().as_secs_f64(),
        late,
    })
}

// ---------------------------------------------------------------------------------------------
// Closed-loop loads: wrk and h2load

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Failed requests, non-2xx answers and socket errors.
    errors: u64,
    /// Requests completed.
    requests: u64,
    /// The contender's CPU time over the run divided by `requests` (lull: its proxy threads;
    /// nginx: master and workers; haproxy: all its threads).
    cpu_per_request: Option<Duration>,
}

/// CPU per request in µs, or `-`.
fn cpu_text(cpu: Option<Duration>) -> String {
    cpu.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1} µs", d.as_secs_f64() * 1e6),
    )
}

/// The run with the median req/s of `runs`.
fn median_run(runs: &[Load]) -> Load {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted[sorted.len() / 2]
}

/// `wrk -t<min(2,c)> -c<conns> -d<s>s --latency` with the bench Host header.
fn wrk(addr: SocketAddr, conns: usize, seconds: u64) -> Result<Load> {
    let output = Command::new("wrk")
        .arg(format!("-t{}", conns.min(2)))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .args(["-H", &format!("Host: {HOST}")])
        .arg(format!("http://{addr}/"))
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("parse wrk's output: {text}"))
}

/// [`wrk`] on `cpus` only (it inherits the affinity of the thread that starts it).
fn wrk_pinned(addr: SocketAddr, conns: usize, seconds: u64, cpus: &[usize]) -> Result<Load> {
    let cpus = cpus.to_vec();
    std::thread::spawn(move || {
        affinity::pin_current_thread(&cpus)?;
        wrk(addr, conns, seconds)
    })
    .join()
    .map_err(|_| anyhow!("the thread running wrk panicked"))?
}

fn parse_wrk(text: &str) -> Result<Load> {
    let mut load = Load {
        rps: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        errors: 0,
        requests: 0,
        cpu_per_request: None,
    };
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", rps] => load.rps = rps.parse()?,
            [n, "requests", "in", ..] => load.requests = n.parse()?,
            ["50%", value] => load.p50_us = wrk_duration_us(value)?,
            ["99%", value] => load.p99_us = wrk_duration_us(value)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => load.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                load.errors += rest
                    .iter()
                    .filter_map(|f| f.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    if load.rps.is_nan() || load.p50_us.is_nan() || load.p99_us.is_nan() {
        bail!("no Requests/sec, 50% or 99% line");
    }
    Ok(load)
}

/// `123.45us`, `1.23ms`, `2.00s` in µs.
fn wrk_duration_us(value: &str) -> Result<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1e6)
    } else {
        bail!("unknown duration {value:?}");
    };
    Ok(number.parse::<f64>()? * scale)
}

/// `h2load -c<conns> -t<min(2,c)> -m1 -D<s>` (h2c with prior knowledge); percentiles from its
/// per-request log.
fn h2load(addr: SocketAddr, conns: usize, seconds: u64, log: &Path) -> Result<Load> {
    let _ = fs::remove_file(log);
    let output = Command::new("h2load")
        .arg(format!("-c{conns}"))
        .arg(format!("-t{}", conns.min(2)))
        .arg("-m1")
        .arg(format!("-D{seconds}"))
        .args(["-H", &format!(":authority: {HOST}")])
        .arg("--log-file")
        .arg(log)
        .arg(format!("http://{addr}/"))
        .output()
        .context("run h2load")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "h2load failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let log_text = fs::read_to_string(log).with_context(|| format!("read {}", log.display()))?;
    parse_h2load(&text, &log_text).with_context(|| format!("parse h2load's output: {text}"))
}

fn parse_h2load(text: &str, log: &str) -> Result<Load> {
    let mut rps = f64::NAN;
    let mut errors = 0u64;
    let mut requests = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 5.00s, 12345.67 req/s, 1.23MB/s
            rps = rest
                .split(", ")
                .nth(1)
                .and_then(|f| f.strip_suffix(" req/s"))
                .context("no req/s on the `finished in` line")?
                .parse()?;
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout
            for field in rest.split(", ") {
                if let Some(n) = field.strip_suffix(" done") {
                    requests = n.trim().parse()?;
                }
                if let Some(n) = field
                    .strip_suffix(" failed")
                    .or_else(|| field.strip_suffix(" errored"))
                    .or_else(|| field.strip_suffix(" timeout"))
                {
                    errors += n.trim().parse::<u64>()?;
                }
            }
        }
    }
    // Each log line: start time (µs since the epoch), status, response time (µs).
    let mut latencies = Vec::new();
    for line in log.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let [_, status, elapsed] = fields.as_slice() else {
            bail!("unexpected log line {line:?}");
        };
        if !status.starts_with('2') {
            errors += 1;
        }
        latencies.push(elapsed.parse::<f64>()?);
    }
    if rps.is_nan() || latencies.is_empty() {
        bail!("no `finished in` line or no requests logged");
    }
    Ok(Load {
        rps,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
        errors,
        requests,
        cpu_per_request: None,
    })
}

/// The best HTTP/1.1 median req/s of the closed-loop runs.
struct Bests {
    lull: f64,
    /// The lesser of the proxies' bests (lull, nginx, haproxy): a rate each of them sustains.
    slowest_proxy: f64,
}

/// wrk and h2load against every target.
fn closed_loop(
    plan: &Plan,
    targets: &[Target],
    scratch: &Path,
    report: &mut Report,
) -> Result<Bests> {
    let mut proxy_bests: Vec<f64> = vec![0.0; targets.len()];
    for (protocol, tool) in [("HTTP/1.1", "wrk"), ("h2c", "h2load")] {
        for &conns in &plan.concurrencies {
            let mut runs: Vec<Vec<Load>> = vec![Vec::new(); targets.len()];
            for run in 0..plan.runs {
                // Interleaved: run r of every target, then run r+1.
                for (i, target) in targets.iter().enumerate() {
                    let cpu_before = target.cpu.used();
                    let mut load = match (tool, target.h2) {
                        ("wrk", _) => wrk(target.h1, conns, plan.seconds)?,
                        (_, Some(h2)) => {
                            h2load(h2, conns, plan.seconds, &scratch.join("h2load.log"))?
                        }
                        (_, None) => continue,
                    };
                    if let (Some(before), Some(after)) = (cpu_before, target.cpu.used())
                        && load.requests > 0
                    {
                        let requests = u32::try_from(load.requests).unwrap_or(u32::MAX);
                        load.cpu_per_request = Some(after.saturating_sub(before) / requests);
                    }
                    eprintln!(
                        "{tool} c={conns} run {}/{}: {:<8} {:>9.0} req/s p50 {:>8.1} µs p99 {:>8.1} µs cpu/req {}{}",
                        run + 1,
                        plan.runs,
                        target.name,
                        load.rps,
                        load.p50_us,
                        load.p99_us,
                        cpu_text(load.cpu_per_request),
                        if load.errors > 0 {
                            format!(" ({} errors)", load.errors)
                        } else {
                            String::new()
                        }
                    );
                    runs[i].push(load);
                }
            }
            let medians: Vec<Option<Load>> = runs
                .iter()
                .map(|r| (!r.is_empty()).then(|| median_run(r)))
                .collect();
            let direct = medians[0];
            if tool == "wrk" {
                for (best, median) in proxy_bests.iter_mut().zip(&medians) {
                    *best = best.max(median.map_or(0.0, |l| l.rps));
                }
            }
            add_load_rows(report, protocol, conns, targets, &medians, direct);
            let all: Vec<String> = targets
                .iter()
                .zip(&runs)
                .filter(|(_, r)| !r.is_empty())
                .map(|(t, r)| {
                    let list: Vec<String> = r.iter().map(|l| format!("{:.0}", l.rps)).collect();
                    let cpu: Vec<String> = r
                        .iter()
                        .filter_map(|l| l.cpu_per_request)
                        .map(|d| format!("{:.1}", d.as_secs_f64() * 1e6))
                        .collect();
                    let cpu = if cpu.is_empty() {
                        String::new()
                    } else {
                        format!(" (CPU µs/request {})", cpu.join("/"))
                    };
                    let errors: u64 = r.iter().map(|l| l.errors).sum();
                    format!(
                        "{} {}{cpu}{}",
                        t.name,
                        list.join("/"),
                        if errors > 0 {
                            format!(" ({errors} errors)")
                        } else {
                            String::new()
                        }
                    )
                })
                .collect();
            report.details.push(format!(
                "{tool} ({protocol}) c={conns}, {} s per run, req/s of each run: {}",
                plan.seconds,
                all.join("; ")
            ));
        }
    }
    Ok(Bests {
        lull: proxy_bests[1],
        slowest_proxy: proxy_bests[1..]
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min),
    })
}

fn add_load_rows(
    report: &mut Report,
    protocol: &str,
    conns: usize,
    targets: &[Target],
    medians: &[Option<Load>],
    direct: Option<Load>,
) {
    let by_name = |name: &str| {
        targets
            .iter()
            .position(|t| t.name == name)
            .and_then(|i| medians[i])
    };
    let (Some(lull), nginx, haproxy) = (by_name("lull"), by_name("nginx"), by_name("haproxy"))
    else {
        return;
    };
    let best_peer = [nginx, haproxy]
        .into_iter()
        .flatten()
        .map(|l| l.rps)
        .fold(f64::NAN, f64::max);
    let ratio_to_direct = |l: Option<Load>| match (l, direct) {
        (Some(l), Some(d)) => format!("{:.2}x", l.rps / d.rps),
        _ => "-".into(),
    };
    let rps_text = |l: Option<Load>| l.map_or_else(|| "-".into(), |l| format!("{:.0}", l.rps));
    let lat_text = |l: Option<Load>| {
        l.map_or_else(
            || "-".into(),
            |l| format!("{:.0}/{:.0} µs", l.p50_us, l.p99_us),
        )
    };
    report.rows.push(Row {
        name: format!("{protocol} c={conns}: lull req/s vs the better of nginx, haproxy"),
        target: "≥ 1.0x".into(),
        measured: format!("{:.0} req/s", lull.rps),
        baseline: format!("{best_peer:.0} req/s"),
        ratio: format!("{:.2}x", lull.rps / best_peer),
        pass: Some(lull.rps >= best_peer),
    });
    let least_peer_cpu = [nginx, haproxy]
        .into_iter()
        .flatten()
        .filter_map(|l| l.cpu_per_request)
        .min();
    if let (Some(cpu), Some(peer)) = (lull.cpu_per_request, least_peer_cpu)
        && !peer.is_zero()
    {
        report.rows.push(Row {
            name: format!(
                "{protocol} c={conns}: lull CPU per request vs the lesser of nginx, haproxy"
            ),
            target: "(none)".into(),
            measured: cpu_text(Some(cpu)),
            baseline: cpu_text(Some(peer)),
            ratio: format!("{:.2}x", cpu.as_secs_f64() / peer.as_secs_f64()),
            pass: None,
        });
    }
    let direct_note = if direct.is_some() {
        String::new()
    } else {
        " (direct: the fixture app speaks no h2c)".to_owned()
    };
    report.details.push(format!(
        "{protocol} c={conns} medians, req/s (ratio to direct HTTP/1.1) and p50/p99: direct {} ({}), lull {} ({}) {}, nginx {} ({}) {}, haproxy {} ({}) {}{direct_note}",
        rps_text(direct),
        lat_text(direct),
        rps_text(Some(lull)),
        ratio_to_direct(Some(lull)),
        lat_text(Some(lull)),
        rps_text(nginx),
        ratio_to_direct(nginx),
        lat_text(nginx),
        rps_text(haproxy),
        ratio_to_direct(haproxy),
        lat_text(haproxy),
    ));
    report.tables.push((
        protocol.to_owned(),
        conns,
        [direct, Some(lull), nginx, haproxy],
    ));
}

// ---------------------------------------------------------------------------------------------
// Fixed rate

/// The median p99 (µs) over the runs of each target, and each run's p99.
struct RateResult {
    p99_us: f64,
    p50_us: f64,
    runs: Vec<f64>,
    late: usize,
}

fn rate_result(runs: &[RateRun]) -> RateResult {
    let p99s: Vec<f64> = runs.iter().map(|r| r.p99_us).collect();
    let p50s: Vec<f64> = runs.iter().map(|r| r.p50_us).collect();
    RateResult {
        p99_us: percentile(&p99s, 50.0),
        p50_us: percentile(&p50s, 50.0),
        runs: p99s,
        late: runs.iter().map(|r| r.late).sum(),
    }
}

/// The CPUs of a split run: the load generator and the apps on one side, the proxy on the
/// other, so that a fixed-rate run measures what the proxy adds rather than how it shares the
/// CPUs with the load it serves (on 2 CPUs shared, half of direct's best is about every
/// proxy's maximum: a proxied request costs about twice a direct one).
struct Split {
    clients: Vec<usize>,
    proxy: Vec<usize>,
    /// Every CPU this process may use: where the threads go back to.
    all: Vec<usize>,
}

impl Split {
    /// The first half of the CPUs this process may use for the clients and the apps, the rest
    /// for the proxy; `None` with fewer than two.
    fn of_allowed() -> Result<Option<Split>> {
        let all = affinity::allowed_cpus()?;
        if all.len() < 2 {
            return Ok(None);
        }
        let (clients, proxy) = all.split_at(all.len() / 2);
        Ok(Some(Split {
            clients: clients.to_vec(),
            proxy: proxy.to_vec(),
            all: all.clone(),
        }))
    }

    fn words(&self) -> String {
        let list = |cpus: &[usize]| {
            cpus.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "the load generator and the apps on CPU {}, the proxy on CPU {}",
            list(&self.clients),
            list(&self.proxy)
        )
    }
}

/// The threads pinned for a split run; dropping it lets them run on every CPU again.
struct Pinned {
    /// Processes, and the prefix of the thread names pinned (all threads when `None`).
    tasks: Vec<(u32, Option<&'static str>)>,
    all: Vec<usize>,
}

impl Pinned {
    /// Pins the apps to the clients' side, and lull's threads (proxy and driver), nginx's
    /// master and workers and haproxy's threads to the proxy's.
    fn pin(split: &Split, apps: &Apps, peers: &Peers) -> Result<Pinned> {
        let mut pinned = Pinned {
            tasks: Vec::new(),
            all: split.all.clone(),
        };
        let mut pin = |pid: u32, prefix: Option<&'static str>, cpus: &[usize]| -> Result<()> {
            pinned.tasks.push((pid, prefix));
            let n = affinity::pin_threads(pid, prefix, cpus)?;
            if n == 0 {
                bail!("no thread of process {pid} named {prefix:?} to pin");
            }
            Ok(())
        };
        for app in &apps.apps {
            pin(app.child.id(), None, &split.clients)?;
        }
        let me = std::process::id();
        pin(me, Some(PROXY_THREAD_NAME), &split.proxy)?;
        pin(me, Some(DRIVER_THREAD_NAME), &split.proxy)?;
        for peer in ["nginx", "haproxy"] {
            let root = peers.pid(peer);
            if root == 0 {
                bail!("{peer} is not running: nothing to pin");
            }
            for pid in tree_pids(root) {
                pin(pid, None, &split.proxy)?;
            }
        }
        Ok(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Every thread of each process, not only those pinned: threads they started meanwhile
        // inherited the pin, whatever their names.
        let mut pids: Vec<u32> = self.tasks.iter().map(|&(pid, _)| pid).collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if let Err(e) = affinity::pin_threads(pid, None, &self.all) {
                eprintln!("lull-bench-proxy: unpin process {pid}: {e:#}");
            }
        }
    }
}

/// Issue 4's fixed-rate comparison: half of direct's best, with the CPUs split (see [`Split`]):
/// direct's best is measured with wrk and the apps on the clients' side, then each contender
/// at half of it, the proxy on its own side.
fn split_fixed_rate(
    plan: &Plan,
    targets: &[Target],
    apps: &Apps,
    peers: &Peers,
    report: &mut Report,
) -> Result<()> {
    let Some(split) = Split::of_allowed()? else {
        report.details.push(
            "fixed rate at half of direct's best: not run, this process may use fewer than 2 CPUs"
                .into(),
        );
        return Ok(());
    };
    let _pinned = Pinned::pin(&split, apps, peers)?;
    let mut direct = Vec::new();
    for run in 0..plan.runs {
        let load = wrk_pinned(targets[0].h1, RATE_CONNS, plan.seconds, &split.clients)?;
        eprintln!(
            "wrk c={RATE_CONNS} direct, {} run {}/{}: {:.0} req/s",
            split.words(),
            run + 1,
            plan.runs,
            load.rps
        );
        direct.push(load);
    }
    let best = median_run(&direct).rps;
    let list: Vec<String> = direct.iter().map(|l| format!("{:.0}", l.rps)).collect();
    report.details.push(format!(
        "direct with {}: wrk (HTTP/1.1) c={RATE_CONNS}, {} s per run, req/s of each run: {}",
        split.words(),
        plan.seconds,
        list.join("/")
    ));
    fixed_rate_peers(
        plan,
        targets,
        RateOf::HalfOfDirect(best),
        Some(&split),
        report,
    )
}

/// The rate of a fixed-rate comparison, from a closed-loop HTTP/1.1 median.
#[derive(Clone, Copy)]
enum RateOf {
    /// Issue 4's: half of direct's best, measured and run with the CPUs split.
    HalfOfDirect(f64),
    /// Half of the lesser of the proxies' bests (CPUs shared): a rate each sustains when
    /// sharing the CPUs with the load, so the p99s compare what each adds below saturation.
    /// No target: issue 4's is at the rate above.
    HalfOfSlowestProxy(f64),
}

impl RateOf {
    fn rate(self) -> f64 {
        match self {
            RateOf::HalfOfDirect(best) | RateOf::HalfOfSlowestProxy(best) => {
                (best / 2.0).max(100.0)
            }
        }
    }

    fn words(self) -> String {
        match self {
            RateOf::HalfOfDirect(best) => {
                format!("half of direct's median wrk req/s at {RATE_CONNS} connections, {best:.0}")
            }
            RateOf::HalfOfSlowestProxy(best) => {
                format!(
                    "half of the lesser of lull's, nginx's and haproxy's best wrk medians, {best:.0}; every process on every CPU"
                )
            }
        }
    }
}

fn fixed_rate_peers(
    plan: &Plan,
    targets: &[Target],
    rate_of: RateOf,
    split: Option<&Split>,
    report: &mut Report,
) -> Result<()> {
    let rate = rate_of.rate();
    let duration = Duration::from_secs(plan.seconds);
    let clients = split.map(|s| s.clients.as_slice());
    let mut runs: Vec<Vec<RateRun>> = (0..targets.len()).map(|_| Vec::new()).collect();
    for run in 0..plan.runs {
        for (i, target) in targets.iter().enumerate() {
            let r = fixed_rate(target.h1, HOST, rate, RATE_CONNS, duration, clients)
                .with_context(|| format!("fixed rate against {}", target.name))?;
            eprintln!(
                "fixed rate {rate:.0} req/s run {}/{}: {:<8} achieved {:.0} req/s, p50 {:.1} µs p99 {:.1} µs, {} late",
                run + 1,
                plan.runs,
                target.name,
                r.achieved,
                r.p50_us,
                r.p99_us,
                r.late
            );
            runs[i].push(r);
        }
    }
    let results: Vec<RateResult> = runs.iter().map(|r| rate_result(r)).collect();
    let direct = &results[0];
    let added = |i: usize| results[i].p99_us - direct.p99_us;
    let lull_added = added(1);
    let peer_added = added(2).min(added(3));
    match rate_of {
        RateOf::HalfOfDirect(_) => {
            report.rows.push(Row {
                name: format!(
                    "p99 lull adds over direct at {rate:.0} req/s (half of direct's best; proxy on CPUs of its own)"
                ),
                target: "≤ 500 µs".into(),
                measured: format!("{lull_added:.0} µs"),
                baseline: "-".into(),
                ratio: "-".into(),
                pass: Some(lull_added <= 500.0),
            });
            report.rows.push(Row {
                name: "p99 lull adds vs the lesser that nginx, haproxy add, same rate and CPUs"
                    .into(),
                target: "≤ peers'".into(),
                measured: format!("{lull_added:.0} µs"),
                baseline: format!("{peer_added:.0} µs"),
                ratio: "-".into(),
                pass: Some(lull_added <= peer_added),
            });
        }
        RateOf::HalfOfSlowestProxy(_) => report.rows.push(Row {
            name: format!(
                "p99 lull adds vs the lesser that nginx, haproxy add, at {rate:.0} req/s (half of the slowest proxy's best)"
            ),
            target: "(none)".into(),
            measured: format!("{lull_added:.0} µs"),
            baseline: format!("{peer_added:.0} µs"),
            ratio: "-".into(),
            pass: None,
        }),
    }
    let text: Vec<String> = targets
        .iter()
        .zip(&results)
        .map(|(t, r)| {
            let list: Vec<String> = r.runs.iter().map(|p| format!("{p:.0}")).collect();
            format!(
                "{} p50 {:.0} µs p99 {:.0} µs (runs {}){}",
                t.name,
                r.p50_us,
                r.p99_us,
                list.join("/"),
                if r.late > 0 {
                    format!(", {} requests sent > 1 ms late", r.late)
                } else {
                    String::new()
                }
            )
        })
        .collect();
    let cpus = split.map_or_else(String::new, |s| format!(", {}", s.words()));
    report.details.push(format!(
        "fixed rate: {rate:.0} req/s ({}{cpus}) over {RATE_CONNS} keep-alive connections of this program's own client (one thread each, a fixed staggered schedule, latency from send to the last body byte, µs clock, after {} s of the same schedule unrecorded; hey prints 0.1 ms steps, too coarse for these targets), {} s, median p99 of {} runs: {}",
        rate_of.words(),
        RATE_WARMUP.as_secs(),
        plan.seconds,
        plan.runs,
        text.join("; ")
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The CPU gate

fn cpu_gate(
    plan: &Plan,
    runtime: &tokio::runtime::Runtime,
    lull: &LullProxy,
    apps: &mut Apps,
    app: &Path,
    lull_best: f64,
    report: &mut Report,
) -> Result<()> {
    let duration = Duration::from_secs(plan.seconds);
    // Half of what lull itself sustains: at half of direct's best lull may be saturated, and
    // its queueing would drown the gate's cost.
    let rate = (lull_best / 2.0).max(100.0);
    // Pools are built inside the runtime (their timers and tasks need it).
    let _guard = runtime.enter();
    let instances: Vec<&App> = apps.apps.iter().take(INSTANCES).collect();

    // Gate on vs off, interleaved; the gate's pool exists only during its runs, so the
    // gate-off runs never meet a throttled instance.
    let mut results = Vec::new();
    for (label, conns, rate) in [
        ("sparse", 1usize, SPARSE_RATE),
        ("half of lull's best", RATE_CONNS, rate),
    ] {
        let mut off = Vec::new();
        let mut on = Vec::new();
        let mut wakes = 0;
        for _ in 0..plan.runs {
            off.push(fixed_rate(lull.addr, HOST, rate, conns, duration, None).context("gate off")?);
            let pool = lull.gate_route(GATE_HOST, &instances);
            let before: u64 = pool
                .snapshot()
                .instances
                .iter()
                .map(|i| i.gate.restores)
                .sum();
            let run = fixed_rate(lull.addr, GATE_HOST, rate, conns, duration, None);
            let after: u64 = pool
                .snapshot()
                .instances
                .iter()
                .map(|i| i.gate.restores)
                .sum();
            lull.remove_gate_route(GATE_HOST, &pool);
            on.push(run.context("gate on")?);
            wakes += after - before;
        }
        for instance in &instances {
            if instance.gate.quota_is_throttled()? {
                bail!(
                    "{} is still throttled after its gate pool was removed",
                    instance.cgroup.cgroups_path().display()
                );
            }
        }
        let (off, on) = (rate_result(&off), rate_result(&on));
        // The unrecorded warm-up's requests wake instances too.
        let requests = rate * (duration + RATE_WARMUP).as_secs_f64() * plan.runs as f64;
        eprintln!(
            "gate {label}: off p50 {:.1} p99 {:.1} µs, on p50 {:.1} p99 {:.1} µs, {wakes} wakes",
            off.p50_us, off.p99_us, on.p50_us, on.p99_us
        );
        results.push((label, conns, rate, off, on, wakes, requests));
    }
    for (label, conns, rate, off, on, wakes, requests) in &results {
        let added = on.p99_us - off.p99_us;
        report.rows.push(Row {
            name: format!(
                "p99 the CPU gate adds per request, {label} ({rate:.0} req/s, {conns} conn)"
            ),
            target: "≤ 100 µs".into(),
            measured: format!("{:.0} µs", on.p99_us),
            baseline: format!("{:.0} µs", off.p99_us),
            ratio: format!("{added:+.0} µs"),
            pass: Some(added <= 100.0),
        });
        report.details.push(format!(
            "gate {label}: {rate:.0} req/s over {conns} connection(s) through lull, gate off (NoCpuControl) vs on (CpuGate per instance cgroup, idle delay 0), {} runs of {} s interleaved: off p50 {:.0} µs p99 {:.0} µs (runs {}), on p50 {:.0} µs p99 {:.0} µs (runs {}); {wakes} of about {requests:.0} requests woke a throttled instance",
            plan.runs,
            plan.seconds,
            off.p50_us,
            off.p99_us,
            join_us(&off.runs),
            on.p50_us,
            on.p99_us,
            join_us(&on.runs)
        ));
    }

    time_to_throttle(plan, lull, &instances, report)?;
    spinner_share(plan, lull, apps, app, report)
}

fn join_us(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// Requests one at a time through the gate; after each, the time from the client reading the
/// last byte to every instance's quota file showing the throttled limit.
fn time_to_throttle(
    plan: &Plan,
    lull: &LullProxy,
    instances: &[&App],
    report: &mut Report,
) -> Result<()> {
    let pool = lull.gate_route(GATE_HOST, instances);
    let measured = (|| -> Result<Vec<f64>> {
        let mut conn = Conn::connect(lull.addr, GATE_HOST)?;
        let mut samples = Vec::new();
        for _ in 0..plan.throttle_samples {
            std::thread::sleep(Duration::from_millis(5));
            let (status, _) = conn.get()?;
            let done = Instant::now();
            if status != 200 {
                bail!("the gate route answered {status}");
            }
            loop {
                let mut all = true;
                for instance in instances {
                    all &= instance.gate.quota_is_throttled()?;
                }
                if all {
                    break;
                }
                if done.elapsed() > Duration::from_secs(1) {
                    bail!("an instance was not throttled 1 s after its last response");
                }
            }
            samples.push(done.elapsed().as_secs_f64() * 1e6);
        }
        Ok(samples)
    })();
    lull.remove_gate_route(GATE_HOST, &pool);
    let samples = measured?;
    let (p50, p99, max) = (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        percentile(&samples, 100.0),
    );
    report.rows.push(Row {
        name: "last response to throttled (quota file written), p99".into(),
        target: "(none)".into(),
        measured: format!("{p99:.0} µs"),
        baseline: "-".into(),
        ratio: "-".into(),
        pass: None,
    });
    report.details.push(format!(
        "last response to throttled: {} requests 5 ms apart on one connection through the gate; from the client reading the last byte to every instance's {} reading the throttled limit (polled back to back; the first poll takes a few µs, so ≈ the first poll means it was already written): p50 {p50:.0} µs, p99 {p99:.0} µs, max {max:.0} µs. The kernel then stops the task once it has spent the 1 ms quota, at the next tick (see the runtime suite)",
        samples.len(),
        if instances.first().is_some_and(|i| i.cgroup.is_v2()) {
            "cpu.max"
        } else {
            "cpu.cfs_quota_us"
        }
    ));
    Ok(())
}

/// A fifth app with `SPIN=1` behind its own gate: its CPU share while idle (throttled) against
/// its share before the gate took it over.
fn spinner_share(
    plan: &Plan,
    lull: &LullProxy,
    apps: &mut Apps,
    app: &Path,
    report: &mut Report,
) -> Result<()> {
    let spinner = apps.start(app, true)?;
    let window = plan.spin_window;
    let share = |cgroup: &InstanceCgroup| -> Result<f64> {
        let before = cgroup.cpu_usage_ns()?;
        let started = Instant::now();
        std::thread::sleep(window);
        let used = cgroup.cpu_usage_ns()?.saturating_sub(before);
        Ok(used as f64 / started.elapsed().as_nanos() as f64)
    };
    let running = share(&spinner.cgroup)?;
    let pool = lull.gate_route(SPIN_HOST, &[spinner]);
    let measured = (|| -> Result<(f64, u16)> {
        // A request restores it, its end throttles it again.
        let (status, _) = get_once(lull.addr, SPIN_HOST)?;
        // Past the quota already granted and the tick that stops it.
        std::thread::sleep(Duration::from_millis(50));
        if !spinner.gate.quota_is_throttled()? {
            bail!("the spinner is not throttled after its request");
        }
        Ok((share(&spinner.cgroup)?, status))
    })();
    lull.remove_gate_route(SPIN_HOST, &pool);
    let (idle, status) = measured?;
    if status != 200 {
        bail!("the spinner answered {status} through the gate");
    }
    // The counter may not move at all in the window (the 1 ms quota granted at a period
    // boundary outside it): then the share is below what the window can show.
    let (measured, ratio, pass, per_cpu_text, slowdown_text) = if idle > 0.0 {
        let per_cpu = 1.0 / idle;
        (
            format!("{per_cpu:.0}x"),
            format!("{:.1}x", per_cpu / 60.0),
            per_cpu >= 300.0,
            format!("{per_cpu:.0}x"),
            format!("{:.0}x", running / idle),
        )
    } else {
        (
            "∞ (0 ns used)".to_owned(),
            "∞".to_owned(),
            true,
            "∞".to_owned(),
            "∞".to_owned(),
        )
    };
    report.rows.push(Row {
        name: "idle spinner: 1 / throttled share of a CPU vs App Runner's 60x".into(),
        target: "≥ 300x".into(),
        measured,
        baseline: "60x".into(),
        ratio,
        pass: Some(pass),
    });
    report.details.push(format!(
        "idle spinner (fixture app with SPIN=1, one thread spinning, its own cgroup): {:.3} % of a CPU over {:.1} s while idle behind the gate (throttled to {} µs per {} µs), so 1/share = {per_cpu_text}; {:.1} % of a CPU over the same window before the gate took it over, a {slowdown_text} slowdown; from cpuacct.usage / cpu.stat",
        idle * 100.0,
        window.as_secs_f64(),
        CpuLimit::THROTTLED.quota_us().unwrap_or(0),
        CpuLimit::THROTTLED.period_us(),
        running * 100.0
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report

/// Nearest-rank percentile of `samples` (any order), `p` in 0..=100.
fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One line of the table.
struct Row {
    name: String,
    target: String,
    measured: String,
    baseline: String,
    /// The figure compared with the target (a ratio, or the measured value itself).
    ratio: String,
    pass: Option<bool>,
}

fn pass_text(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

struct Report {
    rows: Vec<Row>,
    details: Vec<String>,
    /// Per protocol and concurrency: medians of direct, lull, nginx, haproxy.
    tables: Vec<(String, usize, [Option<Load>; 4])>,
}

impl Report {
    fn cells(&self) -> Vec<[String; 6]> {
        self.rows
            .iter()
            .map(|r| {
                [
                    r.name.clone(),
                    r.target.clone(),
                    r.measured.clone(),
                    r.baseline.clone(),
                    r.ratio.clone(),
                    pass_text(r.pass).to_owned(),
                ]
            })
            .collect()
    }

    /// The closed-loop medians as rows of (load, contender, req/s, ratio, p50, p99, CPU per
    /// request).
    fn load_cells(&self) -> Vec<[String; 7]> {
        let names = ["direct", "lull", "nginx", "haproxy"];
        let mut cells = Vec::new();
        for (protocol, conns, loads) in &self.tables {
            let direct = loads[0];
            for (name, load) in names.iter().zip(loads) {
                let Some(l) = load else { continue };
                cells.push([
                    format!("{protocol} c={conns}"),
                    (*name).to_owned(),
                    format!("{:.0}", l.rps),
                    direct.map_or_else(|| "-".into(), |d| format!("{:.2}x", l.rps / d.rps)),
                    format!("{:.0} µs", l.p50_us),
                    format!("{:.0} µs", l.p99_us),
                    cpu_text(l.cpu_per_request),
                ]);
            }
        }
        cells
    }

    fn print(&self) {
        print_table(
            &[
                "measurement",
                "target",
                "measured",
                "baseline",
                "ratio",
                "pass",
            ],
            &self.cells(),
        );
        print_table(
            &[
                "load",
                "contender",
                "req/s",
                "vs direct",
                "p50",
                "p99",
                "CPU/request",
            ],
            &self.load_cells(),
        );
        for d in &self.details {
            println!("  {d}");
        }
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        out.push_str("| measurement | target | measured | baseline | ratio | pass |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for row in self.cells() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
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
        out.push_str("\nClosed-loop medians (req/s as a ratio to direct HTTP/1.1 at the same connections; CPU/request: the contender's CPU time over the run divided by the requests served):\n\n");
        out.push_str("| load | contender | req/s | vs direct | p50 | p99 | CPU/request |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
        for row in self.load_cells() {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out.push_str("\nDetails:\n\n");
        for d in &self.details {
            let _ = writeln!(out, "- {d}");
        }
        out
    }
}

fn print_table<const N: usize>(headers: &[&str], cells: &[[String; N]]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in cells {
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
    let headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    println!();
    println!("{}", line(&headers));
    println!(
        "{}",
        line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>())
    );
    for row in cells {
        println!("{}", line(row));
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_clients_line_is_read_back() {
        let run = RateRun {
            p50_us: 112.5,
            p99_us: 1642.0,
            achieved: 21772.3,
            late: 4087,
        };
        assert_eq!(RateRun::parse(&run.line()).unwrap(), run);
        let err = RateRun::parse("112.5 1642.0 21772.3").unwrap_err();
        assert!(
            err.to_string().contains("not `p50 p99 achieved late`"),
            "{err}"
        );
        let err = RateRun::parse("112.5 x 21772.3 3").unwrap_err();
        assert!(format!("{err:#}").contains("p99, \"x\""), "{err:#}");
        assert!(
            RateRun::parse("1 2 3 -4").is_err(),
            "a count is never negative"
        );
    }

    #[test]
    fn the_rate_client_names_what_is_missing() {
        let args = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let err = rate_client(args(&["127.0.0.1:1", "h"]).into_iter()).unwrap_err();
        assert!(err.to_string().starts_with("RATE missing"), "{err}");
        let err = rate_client(args(&["127.0.0.1:1", "h", "10", "0", "5"]).into_iter()).unwrap_err();
        assert!(err.to_string().contains("must be positive"), "{err}");
        let err = rate_client(args(&["127.0.0.1:1", "h", "10", "1", "5", "0,x"]).into_iter())
            .unwrap_err();
        assert!(format!("{err:#}").contains("CPU \"x\""), "{err:#}");
    }

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 1s test @ http://127.0.0.1:1/\n  2 threads and 50 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   1.10ms  300.00us   5.00ms   70.00%\n  Latency Distribution\n     50%  950.00us\n     75%    1.20ms\n     90%    1.50ms\n     99%    2.50ms\n  45000 requests in 1.00s, 5.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  45000.50\nTransfer/sec:      5.00MB\n";
        let load = parse_wrk(text).unwrap();
        assert_eq!(load.rps, 45000.5);
        assert_eq!(load.p50_us, 950.0);
        assert_eq!(load.p99_us, 2500.0);
        assert_eq!(load.errors, 7);
        assert_eq!(load.requests, 45000);
        assert!(parse_wrk("Requests/sec: 1\n").is_err());
    }

    #[test]
    fn h2load_output_and_log_are_parsed() {
        let text = "finished in 1.00s, 20000.00 req/s, 1.00MB/s\nrequests: 20000 total, 20000 started, 20000 done, 19998 succeeded, 2 failed, 1 errored, 0 timeout\n";
        let log =
            "1700000000000000\t200\t100\n1700000000000100\t200\t300\n1700000000000200\t503\t200\n";
        let load = parse_h2load(text, log).unwrap();
        assert_eq!(load.rps, 20000.0);
        assert_eq!(load.p50_us, 200.0);
        assert_eq!(load.p99_us, 300.0);
        assert_eq!(load.errors, 4);
        assert_eq!(load.requests, 20000);
        assert!(parse_h2load(text, "").is_err());
    }

    #[test]
    fn median_run_is_the_middle_by_req_per_s() {
        let load = |rps| Load {
            rps,
            p50_us: rps,
            p99_us: 0.0,
            errors: 0,
            requests: 0,
            cpu_per_request: None,
        };
        assert_eq!(median_run(&[load(3.0), load(1.0), load(2.0)]).p50_us, 2.0);
    }
}
