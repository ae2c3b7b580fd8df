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

mod apps;
mod closed_loop;
mod conn;
mod fixed_rate;
mod gate;
mod lull;
mod peers;
mod rate_client;
mod report;
mod split;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lull_tests::forwarding;
use lull_tests::scratch::ScratchDir;

use crate::apps::Apps;
use crate::closed_loop::{closed_loop, wrk};
use crate::conn::wait_until_answering;
use crate::fixed_rate::{RateOf, fixed_rate_peers};
use crate::gate::cpu_gate;
use crate::lull::{HYPER_ONLY_THREAD_NAME, LullProxy, PROXY_THREAD_NAME};
use crate::peers::{Peers, haproxy_version, nginx_version};
use crate::rate_client::rate_client;
use crate::report::Report;
use crate::split::{DRIVER_THREAD_NAME, split_fixed_rate, tree_pids};

/// The allocator `lull daemon` serves the proxy with (see the cli crate).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: lull-bench-proxy [--smoke] [--gate-only] [--app PATH] [--markdown PATH] [--serve SECONDS]";

/// The host clients send; lull routes it to the pool of the four instances.
const HOST: &str = "bench.local";
const INSTANCES: usize = 4;
/// Longest wait for an app or a peer proxy to answer.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Connections of the fixed-rate client (hey's default).
const RATE_CONNS: usize = 50;

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
