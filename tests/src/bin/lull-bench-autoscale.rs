//! `lull-bench-autoscale --lull PATH [--smoke] [--markdown PATH]`: the autoscaling benchmarks
//! that `cargo xtask bench autoscale` builds and runs (as root), against the release `lull`
//! binary given: `lull daemon` over scratch data and run dirs, a cgroup parent, an instance
//! network (bridge, nftables table, link prefix, a /21) and a loopback HTTP port of this run's
//! own, driven through its admin socket (`lull_daemon::api::Client`) and its proxy.
//!
//! Every service runs the fixture image with 32M of memory per instance and an HTTP health
//! check on `/healthz`. Each measurement runs 10 times (the smoke run: reaction once, cold start
//! and wake 3 times, density with 50 instances only):
//!
//! - reaction: a new service (min 1, max 4, max concurrency 10) with its one instance idle;
//!   40 connections open at once, each `GET /sleep?ms=3000`; from their release to the daemon
//!   listing 4 instances healthy (in rotation). Every request must answer 200.
//! - cold start: a service with min 0 that scaled to zero (`scale_to_zero_after` 1s); one
//!   `GET /` through the proxy, from the connect to the whole answer.
//! - wake, tier 1: a service whose instance is idle and throttled by the CPU gate (idle delay
//!   0); `GET /` 300 ms after the previous answer. Tier 2: the same with `freeze_after` 200ms,
//!   `GET /` 500 ms after the previous answer, the instance checked frozen first. Tier 3
//!   (stopped) is the cold start. A service whose CPU is never throttled
//!   (`cpu_mode: always`) gives the floor.
//! - density: services of 50 instances each (min = max = 50) added until the run holds 100,
//!   250, 500, 750 then 1000 idle instances; at each step a probe sends sequential `GET /`
//!   round-robin over the services (each lands on an idle, throttled instance: ties rotate in
//!   a service), then the run stays idle a minute (5 s in the smoke run) while the instances'
//!   cgroup CPU and memory are read. The ramp stops at the first step whose probe p99 is
//!   10 ms or more, or whose instances fail to start.
//!
//! Targets are reported, never enforced: the program fails only when the harness does. Whatever
//! happens, the services are deleted and the daemon, its instances, network, cgroups and dirs
//! removed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lull_tests::bench_util::{
    BenchArgs, BenchDaemon, Network, Report, cgroup_number, cgroup_pids, init_logging, join_ms,
    mib, ms, now_millis, percentile, process_cpu, proxy_get, pss_bytes, rss_bytes,
};
use lull_tests::daemon::rfc3339_millis;
use lull_tests::e2e::{FIXTURE_APP, HELLO};
use serde_json::{Value, json};

const USAGE: &str = "usage: lull-bench-autoscale --lull PATH [--smoke] [--markdown PATH]";
const DRIVER: &str = "lull-bench-autoscale";

/// Memory per instance, for every service of the run.
const MEMORY: &str = "32M";
/// The reaction's service: max concurrency and instances, and the connections opened at once.
const REACT_CONCURRENCY: u32 = 10;
const REACT_MAX: usize = 4;
const REACT_CONNECTIONS: usize = 40;
/// How long each of the reaction's requests holds its slot.
const REACT_HOLD_MS: u64 = 3000;
/// Instances per density service.
const DENSITY_PER_SERVICE: usize = 50;
/// The density criterion: probe p99 through the proxy to an idle instance.
const DENSITY_P99: Duration = Duration::from_millis(10);
/// Between the last answer and the wake request (the idle delay is 0: throttled long before).
const WAKE_AFTER: Duration = Duration::from_millis(300);
/// Tier 2's `freeze_after` in the wake measurement.
const FREEZE_AFTER: Duration = Duration::from_millis(200);
/// One request's connect and read timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon's `[scaling]`: no pressure brake, so that the machine's other load cannot hold
/// a scale-out the run measures, and the host's instance cap at its most (the 1000 density
/// instances plus the other measurements' services).
const SCALING: &str =
    "\n[scaling]\ncpu_pressure_brake = 100\nmemory_pressure_brake = 100\nmax_instances = 1023\n";

/// How many runs of what.
struct Plan {
    reaction_runs: usize,
    cold_runs: usize,
    wake_runs: usize,
    density_steps: Vec<usize>,
    probe_requests: usize,
    idle_window: Duration,
}

impl Plan {
    fn new(smoke: bool) -> Plan {
        if smoke {
            Plan {
                reaction_runs: 1,
                cold_runs: 3,
                wake_runs: 3,
                density_steps: vec![50],
                probe_requests: 100,
                idle_window: Duration::from_secs(5),
            }
        } else {
            Plan {
                reaction_runs: 10,
                cold_runs: 10,
                wake_runs: 10,
                density_steps: vec![100, 250, 500, 750, 1000],
                probe_requests: 500,
                idle_window: Duration::from_secs(60),
            }
        }
    }
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
    args.check("autoscale")?;
    let plan = Plan::new(args.smoke);
    eprintln!(
        "{DRIVER}: {} run, lull {}",
        if args.smoke { "smoke" } else { "full" },
        args.lull.display()
    );
    // A /21 of 10.77.0.0/16 for this run: room for 1000 instances and the gateway.
    let net = Network::new('a', |n| format!("10.77.{}.0/21", (n % 32) * 8));
    let mut daemon = BenchDaemon::new(DRIVER, &args.lull, net, SCALING)?;
    let mut services = Vec::new();
    let result = daemon
        .start()
        .and_then(|()| measure(&daemon, &plan, &mut services));
    if result.is_err() {
        daemon.print_daemon_log();
    }
    // Whatever happened: the services deleted while the daemon answers, then the sweep in Drop.
    for service in services.iter().rev() {
        if let Err(e) = daemon.delete_service(service) {
            eprintln!("{DRIVER}: delete service {service}: {e:#}");
        }
    }
    drop(daemon);
    let report = result?;
    print!("{}", report.text());
    if let Some(path) = &args.markdown {
        fs::write(path, report.markdown()).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// The service document every measurement starts from, with `extra`'s fields on top.
fn service_doc(name: &str, min: usize, max: usize, extra: Value) -> Value {
    let mut doc = json!({
        "name": name,
        "source": { "type": "image", "reference": FIXTURE_APP },
        "size": { "memory": MEMORY },
        "min_instances": min,
        "max_instances": max,
        "health_check": { "protocol": "http", "path": "/healthz" },
    });
    if let (Some(doc), Value::Object(extra)) = (doc.as_object_mut(), extra) {
        doc.extend(extra);
    }
    doc
}

fn host(service: &str) -> String {
    format!("{service}.localhost")
}

/// Creates `name` and waits for its deploy to succeed; remembers it for the cleanup.
fn create(d: &BenchDaemon, services: &mut Vec<String>, doc: &Value) -> Result<Duration> {
    let name = doc["name"].as_str().unwrap_or_default().to_owned();
    let started = Instant::now();
    services.push(name.clone());
    d.operate("POST", "/v1/services", Some(doc))
        .with_context(|| format!("create service {name}"))?;
    let took = started.elapsed();
    d.wait_idle(&name)?;
    Ok(took)
}

fn delete(d: &BenchDaemon, services: &mut Vec<String>, name: &str) -> Result<()> {
    d.delete_service(name)
        .with_context(|| format!("delete service {name}"))?;
    services.retain(|s| s != name);
    Ok(())
}

/// One GET of `/` through the proxy that must answer the greeting; how long it took.
fn timed_hello(d: &BenchDaemon, service: &str) -> Result<Duration> {
    let started = Instant::now();
    let answer = d.get(&host(service), "/", REQUEST_TIMEOUT)?;
    let took = started.elapsed();
    if answer.status != 200 || answer.body != HELLO {
        bail!(
            "GET / of {service} answered {} {:?}",
            answer.status,
            answer.body
        );
    }
    Ok(took)
}

fn measure(d: &BenchDaemon, plan: &Plan, services: &mut Vec<String>) -> Result<Report> {
    let mut report = Report::new(&[
        "measurement",
        "target",
        "p50",
        "p99",
        "runs",
        "App Runner",
        "met",
    ]);
    report.detail(format!(
        "daemon: `lull daemon` (release build) over scratch dirs, HTTP listener on 127.0.0.1:{}, \
         bridge {}, subnet {}, `[scaling]` pressure brakes off; every service runs \
         {FIXTURE_APP} (the fixture app) with {MEMORY} per instance and an HTTP health check \
         on /healthz (probed every {} ms until healthy, then every 5 s)",
        d.http_port,
        d.net.bridge,
        d.net.subnet,
        lull_proxy::health::STARTUP_INTERVAL.as_millis()
    ));

    // The first deploy pulls the image: outside every timing.
    let first = Instant::now();
    create(d, services, &service_doc("pull", 1, 1, json!({})))?;
    delete(d, services, "pull")?;
    report.detail(format!(
        "first deploy (image pulled from the local registry): {}",
        ms(first.elapsed())
    ));

    reaction(d, plan, services, &mut report)?;
    let cold = cold_start(d, plan, services, &mut report)?;
    wake(d, plan, services, &mut report, &cold)?;
    density(d, plan, services, &mut report)?;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Reaction

struct ReactionRun {
    /// From the connections' release to 4 instances listed healthy.
    serving: Duration,
    /// From the release to the first `scale.out` event (the decision), by event time.
    decided_ms: i64,
    /// From the release to the last new instance's `instance.healthy` event.
    last_healthy_ms: i64,
    /// Instances the scale-out events added, and how many events.
    added: u64,
    events: usize,
    ok: usize,
    failures: Vec<String>,
}

fn reaction(
    d: &BenchDaemon,
    plan: &Plan,
    services: &mut Vec<String>,
    report: &mut Report,
) -> Result<()> {
    let mut runs = Vec::new();
    for i in 0..plan.reaction_runs {
        let run = reaction_run(d, services, &format!("react-{i}"))
            .with_context(|| format!("reaction run {i}"))?;
        eprintln!(
            "{DRIVER}: reaction {i}: {} ({} ok, {} failed)",
            ms(run.serving),
            run.ok,
            run.failures.len()
        );
        runs.push(run);
    }
    let serving: Vec<Duration> = runs.iter().map(|r| r.serving).collect();
    let failed: usize = runs.iter().map(|r| r.failures.len()).sum();
    let target = Duration::from_millis(500);
    let p50 = percentile(&serving, 50.0);
    let met = p50 < target && failed == 0;
    report.row(
        vec![
            format!(
                "reaction: 0 → {REACT_CONNECTIONS} connections, 1 → {REACT_MAX} instances serving"
            ),
            "< 500 ms p50".into(),
            ms(p50),
            ms(percentile(&serving, 99.0)),
            runs.len().to_string(),
            "22 s, then 28 s".into(),
            yes_no(met),
        ],
        Some(met),
    );
    let median = |f: fn(&ReactionRun) -> i64| {
        let mut v: Vec<i64> = runs.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
    };
    let first_failures: Vec<&String> = runs.iter().flat_map(|r| &r.failures).take(3).collect();
    report.detail(format!(
        "reaction: a new service (min 1, max {REACT_MAX}, max concurrency {REACT_CONCURRENCY}, \
         target utilisation 70 %: one instance takes 7) with its instance idle; \
         {REACT_CONNECTIONS} connections released at once, each `GET /sleep?ms={REACT_HOLD_MS}`; \
         from the release to the admin API listing {REACT_MAX} instances healthy; per run {}; \
         median by the daemon's event times: first `scale.out` decision at {:+} ms, last new \
         instance healthy at {:+} ms; instances added by scale-out events: {} in {} event(s) \
         (last run); requests: {} answered 200, {failed} failed{}",
        join_ms(&serving),
        median(|r| r.decided_ms),
        median(|r| r.last_healthy_ms),
        runs.last().map_or(0, |r| r.added),
        runs.last().map_or(0, |r| r.events),
        runs.iter().map(|r| r.ok).sum::<usize>(),
        if first_failures.is_empty() {
            String::new()
        } else {
            format!(" (first: {first_failures:?})")
        }
    ));
    Ok(())
}

fn reaction_run(d: &BenchDaemon, services: &mut Vec<String>, name: &str) -> Result<ReactionRun> {
    let doc = service_doc(
        name,
        1,
        REACT_MAX,
        json!({ "max_concurrency": REACT_CONCURRENCY }),
    );
    create(d, services, &doc)?;
    timed_hello(d, name)?;
    // Idle, as a service is before a burst: its instance throttled, no demand in the history.
    std::thread::sleep(Duration::from_millis(500));

    let release = Arc::new(Barrier::new(REACT_CONNECTIONS + 1));
    let workers: Vec<_> = (0..REACT_CONNECTIONS)
        .map(|_| {
            let release = release.clone();
            let (port, host) = (d.http_port, host(name));
            std::thread::spawn(move || {
                release.wait();
                let path = format!("/sleep?ms={REACT_HOLD_MS}");
                match proxy_get(port, &host, &path, REQUEST_TIMEOUT) {
                    Ok(r) if r.status == 200 => Ok(()),
                    Ok(r) => Err(format!("{} {}", r.status, r.body.trim())),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    release.wait();
    let released = Instant::now();
    let released_ms = now_millis();
    let waited = d.wait_until(
        &format!("{REACT_MAX} instances of {name} healthy"),
        Duration::from_secs(60),
        Duration::from_millis(2),
        |d| Ok(d.healthy(name)? >= REACT_MAX),
    );
    let serving = released.elapsed();
    let mut ok = 0;
    let mut failures = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("a request thread panicked".into()),
        }
    }
    waited?;

    let events = d.events(name, "")?;
    let at = |e: &Value| {
        e["time"]
            .as_str()
            .and_then(rfc3339_millis)
            .map_or(0, |t| t - released_ms)
    };
    let outs: Vec<&Value> = events.iter().filter(|e| e["kind"] == "scale.out").collect();
    let added = outs
        .iter()
        .filter_map(|e| e["fields"]["decision"]["add"].as_u64())
        .sum();
    let decided_ms = outs.first().map_or(-1, |e| at(e));
    let last_healthy_ms = events
        .iter()
        .filter(|e| e["kind"] == "instance.healthy")
        .map(at)
        .filter(|t| *t >= 0)
        .max()
        .unwrap_or(-1);
    delete(d, services, name)?;
    Ok(ReactionRun {
        serving,
        decided_ms,
        last_healthy_ms,
        added,
        events: outs.len(),
        ok,
        failures,
    })
}

fn yes_no(met: bool) -> String {
    if met { "yes" } else { "NO" }.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Cold start (tier 3) and wake (tier 1)

fn cold_start(
    d: &BenchDaemon,
    plan: &Plan,
    services: &mut Vec<String>,
    report: &mut Report,
) -> Result<Vec<Duration>> {
    let name = "cold";
    let doc = service_doc(
        name,
        0,
        1,
        json!({ "scaling": { "scale_to_zero_after": "1s", "scale_in_window": "1s" } }),
    );
    create(d, services, &doc)?;
    let mut samples = Vec::new();
    let mut to_zero = Vec::new();
    for i in 0..plan.cold_runs {
        let zero = d
            .wait_until(
                &format!("service {name} at zero instances"),
                Duration::from_secs(60),
                Duration::from_millis(20),
                |d| Ok(d.instances(name)?.is_empty()),
            )
            .with_context(|| format!("cold start run {i}"))?;
        to_zero.push(zero);
        // The last instance's stop and removal are done before the request.
        std::thread::sleep(Duration::from_millis(300));
        let took = timed_hello(d, name).with_context(|| format!("cold start run {i}"))?;
        eprintln!("{DRIVER}: cold start {i}: {}", ms(took));
        samples.push(took);
    }
    let reported: Vec<Duration> = d
        .events(name, "scale.cold_start")?
        .iter()
        .filter_map(|e| e["fields"]["took_ms"].as_f64())
        .map(|t| Duration::from_secs_f64(t / 1e3))
        .collect();
    delete(d, services, name)?;

    let target = Duration::from_millis(100);
    let p50 = percentile(&samples, 50.0);
    report.row(
        vec![
            "cold start through the proxy (scale to zero)".into(),
            "< 100 ms p50".into(),
            ms(p50),
            ms(percentile(&samples, 99.0)),
            samples.len().to_string(),
            "- (no scale to zero)".into(),
            yes_no(p50 < target),
        ],
        Some(p50 < target),
    );
    report.detail(format!(
        "cold start: a service with min 0 (`scale_to_zero_after` 1s) at zero instances; one \
         `GET /` through the proxy, from the connect to the whole answer (the request waits in \
         the queue while an instance starts); per run {}; the daemon's `scale.cold_start` \
         events (request seen → instance healthy): p50 {}, p99 {}; the rest (proxy, queue, \
         the request itself) p50 {}; back to zero after each request in {}",
        join_ms(&samples),
        ms(percentile(&reported, 50.0)),
        ms(percentile(&reported, 99.0)),
        ms(percentile(&samples, 50.0).saturating_sub(percentile(&reported, 50.0))),
        join_ms(&to_zero),
    ));
    Ok(samples)
}

fn wake(
    d: &BenchDaemon,
    plan: &Plan,
    services: &mut Vec<String>,
    report: &mut Report,
    cold: &[Duration],
) -> Result<()> {
    let mut measured = Vec::new();
    let mut frozen_seen = 0;
    for (name, extra, idle) in [
        ("warm", json!({}), WAKE_AFTER),
        (
            "frozen",
            json!({ "freeze_after": format!("{}ms", FREEZE_AFTER.as_millis()) }),
            FREEZE_AFTER + WAKE_AFTER,
        ),
        ("hot", json!({ "cpu_mode": "always" }), WAKE_AFTER),
    ] {
        create(d, services, &service_doc(name, 1, 1, extra))?;
        timed_hello(d, name)?;
        let mut samples = Vec::new();
        let mut quota = None;
        for i in 0..plan.wake_runs {
            std::thread::sleep(idle);
            if i == 0 {
                quota = instance_quota(d, name)?;
            }
            if name == "frozen" && instance_frozen(d, name)? {
                frozen_seen += 1;
            }
            samples.push(timed_hello(d, name).with_context(|| format!("wake {name} run {i}"))?);
        }
        eprintln!("{DRIVER}: wake {name}: {}", join_ms(&samples));
        delete(d, services, name)?;
        measured.push((samples, quota));
    }
    let (tier1, tier1_quota) = &measured[0];
    let (tier2, _) = &measured[1];
    let (hot, hot_quota) = &measured[2];
    if frozen_seen < tier2.len() {
        bail!(
            "tier 2: the instance was frozen before {frozen_seen} of {} wakes only",
            tier2.len()
        );
    }
    let p99 = percentile(tier1, 99.0);
    let met = p99 < DENSITY_P99;
    report.row(
        vec![
            "wake, tier 1 (CPU throttled by the gate)".into(),
            "< 10 ms p99".into(),
            ms(percentile(tier1, 50.0)),
            ms(p99),
            tier1.len().to_string(),
            "- (throttled, figure not published)".into(),
            yes_no(met),
        ],
        Some(met),
    );
    report.row(
        vec![
            "wake, tier 2 (frozen)".into(),
            "-".into(),
            ms(percentile(tier2, 50.0)),
            ms(percentile(tier2, 99.0)),
            tier2.len().to_string(),
            "2–5 min (resume)".into(),
            "-".into(),
        ],
        None,
    );
    report.row(
        vec![
            "wake, tier 3 (stopped) = the cold start".into(),
            "< 100 ms p50".into(),
            ms(percentile(cold, 50.0)),
            ms(percentile(cold, 99.0)),
            cold.len().to_string(),
            "-".into(),
            "(above)".into(),
        ],
        None,
    );
    report.row(
        vec![
            "for comparison: CPU never throttled (`cpu_mode: always`)".into(),
            "-".into(),
            ms(percentile(hot, 50.0)),
            ms(percentile(hot, 99.0)),
            hot.len().to_string(),
            "-".into(),
            "-".into(),
        ],
        None,
    );
    let quota = |q: &Option<(i64, i64)>| match q {
        Some((quota, period)) => format!("cpu.cfs_quota_us {quota} of period {period}"),
        None => "quota not found".to_owned(),
    };
    report.detail(format!(
        "wake, tier 1: a service with one instance, idle delay 0 (the gate throttles it as its \
         last request ends); `GET /` through the proxy {} after the previous answer; per run \
         {}; the idle instance's CPU before the first wake: {}. The same with \
         `cpu_mode: always`: per run {}, {}. Tier 2: `freeze_after` {} (frozen by the cgroup \
         freezer that long after the throttle; checked frozen before every wake), `GET /` {} \
         after the previous answer; per run {}",
        ms(WAKE_AFTER),
        join_ms(tier1),
        quota(tier1_quota),
        join_ms(hot),
        quota(hot_quota),
        ms(FREEZE_AFTER),
        ms(FREEZE_AFTER + WAKE_AFTER),
        join_ms(tier2),
    ));
    Ok(())
}

/// Whether `service`'s one instance's gated cgroup is frozen (v1 `freezer.state`, v2
/// `cgroup.events`).
fn instance_frozen(d: &BenchDaemon, service: &str) -> Result<bool> {
    let instances = d.instances(service)?;
    let Some(id) = instances.first().and_then(|i| i["id"].as_str()) else {
        return Ok(false);
    };
    for mount in lull_tests::scratch::cgroup_mounts() {
        let root = mount.join(d.cgroups.parent.trim_start_matches('/'));
        let Some(dir) = find_dir(&root, id) else {
            continue;
        };
        let dir = if dir.join("app").is_dir() {
            dir.join("app")
        } else {
            dir
        };
        if let Ok(state) = fs::read_to_string(dir.join("freezer.state")) {
            return Ok(state.trim() == "FROZEN");
        }
        if let Ok(events) = fs::read_to_string(dir.join("cgroup.events")) {
            return Ok(events.lines().any(|l| l.trim() == "frozen 1"));
        }
    }
    Ok(false)
}

/// The CFS quota and period (v1) of `service`'s one instance's gated cgroup, or `None` when neither
/// is found (cgroup v2 hosts write `cpu.max`, read as quota and period too).
fn instance_quota(d: &BenchDaemon, service: &str) -> Result<Option<(i64, i64)>> {
    let instances = d.instances(service)?;
    let Some(id) = instances.first().and_then(|i| i["id"].as_str()) else {
        return Ok(None);
    };
    for mount in lull_tests::scratch::cgroup_mounts() {
        let root = mount.join(d.cgroups.parent.trim_start_matches('/'));
        let Some(dir) = find_dir(&root, id) else {
            continue;
        };
        // The gate acts on `<parent>/<id>/app`; `<parent>/<id>` holds the configured limit.
        let dir = if dir.join("app").is_dir() {
            dir.join("app")
        } else {
            dir
        };
        let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
        if let (Some(q), Some(p)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
            && let (Ok(q), Ok(p)) = (q.trim().parse(), p.trim().parse())
        {
            return Ok(Some((q, p)));
        }
        if let Some(max) = read("cpu.max") {
            let mut parts = max.split_whitespace();
            let q = parts.next().and_then(|q| q.parse().ok()).unwrap_or(-1);
            let p = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            return Ok(Some((q, p)));
        }
    }
    Ok(None)
}

/// The first directory under `root` whose name contains `id`.
fn find_dir(root: &Path, id: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(root).ok()?;
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if entry.file_name().to_string_lossy().contains(id) {
            return Some(path);
        }
        if let Some(found) = find_dir(&path, id) {
            return Some(found);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Density

struct Step {
    instances: usize,
    services: usize,
    /// Creating the services this step added, all together.
    start: Duration,
    p50: Duration,
    p99: Duration,
    /// The instances' cgroups together.
    memory_usage: Option<u64>,
    pss: u64,
    pids: usize,
    /// Share of one CPU the instances used over the idle window.
    idle_cpu: Option<f64>,
    daemon_cpu: Option<f64>,
    daemon_rss: Option<u64>,
}

fn density(
    d: &BenchDaemon,
    plan: &Plan,
    services: &mut Vec<String>,
    report: &mut Report,
) -> Result<()> {
    let mut steps: Vec<Step> = Vec::new();
    let mut held = 0;
    let mut stopped = String::new();
    let mut dens: Vec<String> = Vec::new();
    'ramp: for &target in &plan.density_steps {
        let started = Instant::now();
        let mut count: usize = dens.len() * DENSITY_PER_SERVICE;
        while count < target {
            let n = DENSITY_PER_SERVICE.min(target - count);
            let name = format!("dens-{}", dens.len());
            if let Err(e) = create(d, services, &service_doc(&name, n, n, json!({}))) {
                stopped = format!("at {target}: {name} failed to start: {e:#}");
                break 'ramp;
            }
            dens.push(name);
            count += n;
        }
        let start = started.elapsed();
        eprintln!(
            "{DRIVER}: density: {count} instances in {} services ({} to start this step)",
            dens.len(),
            ms(start)
        );
        // Settle: every instance idle and throttled.
        std::thread::sleep(Duration::from_secs(3));
        let step = density_step(d, plan, &dens, count, start)?;
        eprintln!(
            "{DRIVER}: density {count}: probe p50 {}, p99 {}",
            ms(step.p50),
            ms(step.p99)
        );
        let missed = step.p99 >= DENSITY_P99;
        if !missed {
            held = count;
        }
        steps.push(step);
        if missed {
            stopped = format!("at {count}: probe p99 not under {}", ms(DENSITY_P99));
            break;
        }
    }
    for name in dens.iter().rev() {
        delete(d, services, name)?;
    }

    let target = if plan.density_steps.len() == 1 {
        plan.density_steps[0]
    } else {
        500
    };
    let met = held >= target;
    report.row(
        vec![
            format!(
                "density: idle instances held, one answering < {} p99",
                ms(DENSITY_P99)
            ),
            format!("≥ {target}"),
            held.to_string(),
            "-".into(),
            steps.len().to_string(),
            "- (25 instances per service by default)".into(),
            yes_no(met),
        ],
        Some(met),
    );
    let rows = steps
        .iter()
        .map(|s| {
            let per = |total: u64| mib(total / s.instances.max(1) as u64);
            vec![
                s.instances.to_string(),
                s.services.to_string(),
                ms(s.start),
                ms(s.p50),
                ms(s.p99),
                s.memory_usage
                    .map_or("-".into(), |m| format!("{} ({} each)", mib(m), per(m))),
                format!("{} ({} each)", mib(s.pss), per(s.pss)),
                s.idle_cpu
                    .map_or("-".into(), |c| format!("{:.1} % of a CPU", c * 100.0)),
                s.daemon_cpu
                    .map_or("-".into(), |c| format!("{:.1} % of a CPU", c * 100.0)),
                s.daemon_rss.map_or("-".into(), mib),
                yes_no(s.p99 < DENSITY_P99),
            ]
        })
        .collect();
    report.extra.push((
        "Density steps:".into(),
        [
            "instances",
            "services",
            "started in",
            "probe p50",
            "probe p99",
            "instances' memory (cgroup)",
            "instances' PSS",
            "instances' CPU, idle",
            "daemon CPU, idle",
            "daemon RSS",
            "< 10 ms p99",
        ]
        .iter()
        .map(|h| (*h).to_owned())
        .collect(),
        rows,
    ));
    report.detail(format!(
        "density: services of {DENSITY_PER_SERVICE} instances each (min = max = \
         {DENSITY_PER_SERVICE}, {MEMORY}, the fixture app with its spinner off, idle delay 0) \
         added step by step, because a change of one service's instance count is a new \
         revision deployed beside the old one (blue/green), which would double the instances \
         for a while; at each step a probe of {} sequential `GET /` through the proxy, \
         round-robin over the services (ties rotate within a service, so each request wakes \
         an idle, throttled instance), then {} idle with only the health checks (every 5 s per \
         instance) while the instances' cgroups are read: CPU from `cpuacct.usage` of the run's \
         cgroup parent, memory from its `memory.usage_in_bytes` (page cache included) and PSS \
         summed over its processes ({} pids at the last step); {}",
        plan.probe_requests,
        secs(plan.idle_window),
        steps.last().map_or(0, |s| s.pids),
        if stopped.is_empty() {
            "every step held".to_owned()
        } else {
            format!("the ramp stopped {stopped}")
        }
    ));
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}

fn density_step(
    d: &BenchDaemon,
    plan: &Plan,
    dens: &[String],
    instances: usize,
    start: Duration,
) -> Result<Step> {
    let mut samples = Vec::with_capacity(plan.probe_requests);
    for r in 0..plan.probe_requests {
        let name = &dens[r % dens.len()];
        samples.push(timed_hello(d, name).with_context(|| format!("density probe {r}"))?);
    }
    let parent = d.cgroups.parent.as_str();
    let daemon_pid = d.pid();
    let cpu0 = cgroup_cpu(parent);
    let daemon0 = daemon_pid.and_then(process_cpu);
    let window_started = Instant::now();
    std::thread::sleep(plan.idle_window);
    let window = window_started.elapsed().as_secs_f64();
    let cpu1 = cgroup_cpu(parent);
    let daemon1 = daemon_pid.and_then(process_cpu);
    let pids = cgroup_pids(parent);
    let pss = pids.iter().filter_map(|p| pss_bytes(*p)).sum();
    Ok(Step {
        instances,
        services: dens.len(),
        start,
        p50: percentile(&samples, 50.0),
        p99: percentile(&samples, 99.0),
        memory_usage: cgroup_number(parent, "memory.usage_in_bytes")
            .or_else(|| cgroup_number(parent, "memory.current")),
        pss,
        pids: pids.len(),
        idle_cpu: cpu0
            .zip(cpu1)
            .map(|(a, b)| b.saturating_sub(a).as_secs_f64() / window),
        daemon_cpu: daemon0
            .zip(daemon1)
            .map(|(a, b)| b.saturating_sub(a).as_secs_f64() / window),
        daemon_rss: daemon_pid
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rss_bytes),
    })
}

/// The CPU time used so far by everything under the cgroup parent (v1 `cpuacct.usage`, else
/// v2 `cpu.stat`'s `usage_usec`).
fn cgroup_cpu(parent: &str) -> Option<Duration> {
    if let Some(ns) = cgroup_number(parent, "cpuacct.usage") {
        return Some(Duration::from_nanos(ns));
    }
    lull_tests::scratch::cgroup_mounts()
        .into_iter()
        .find_map(|m| {
            fs::read_to_string(m.join(parent.trim_start_matches('/')).join("cpu.stat")).ok()
        })
        .and_then(|stat| {
            stat.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
        })
        .map(Duration::from_micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_docs_carry_the_runs_settings() {
        let doc = service_doc("react-0", 1, 4, json!({ "max_concurrency": 10 }));
        assert_eq!(doc["size"]["memory"], MEMORY);
        assert_eq!(doc["health_check"]["path"], "/healthz");
        assert_eq!(doc["max_concurrency"], 10);
        assert_eq!(
            (doc["min_instances"].clone(), doc["max_instances"].clone()),
            (json!(1), json!(4))
        );
        // The daemon's own parser takes it.
        let update: lull_daemon::spec::ServiceUpdate =
            serde_json::from_value(doc).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(update.max_concurrency, Some(10));
    }

    #[test]
    fn the_smoke_plan_is_small() {
        let smoke = Plan::new(true);
        assert_eq!(
            (
                smoke.reaction_runs,
                smoke.cold_runs,
                smoke.density_steps.clone()
            ),
            (1, 3, vec![50])
        );
        let full = Plan::new(false);
        assert_eq!(full.reaction_runs, 10);
        assert!(full.density_steps.iter().all(|n| *n <= 1000));
        assert!(full.density_steps.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn find_dir_looks_at_every_depth() {
        let root = std::env::temp_dir().join(lull_tests::scratch::unique_name("find-dir"));
        fs::create_dir_all(root.join("a/b/web-1-abc/x")).unwrap();
        assert_eq!(
            find_dir(&root, "web-1-abc"),
            Some(root.join("a/b/web-1-abc"))
        );
        assert_eq!(find_dir(&root, "nope"), None);
        fs::remove_dir_all(&root).unwrap();
    }
}
