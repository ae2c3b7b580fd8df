//! The CPU gate's rows: the p99 the gate adds per request (sparse and at half of lull's best),
//! the time from the last response to the throttle, and an idle spinner's share of a CPU.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lull_runtime::cgroup::{CpuLimit, InstanceCgroup};

use crate::apps::{App, Apps};
use crate::conn::{Conn, get_once};
use crate::fixed_rate::rate_result;
use crate::lull::LullProxy;
use crate::rate_client::{RATE_WARMUP, fixed_rate};
use crate::report::{Report, Row};
use crate::{HOST, INSTANCES, Plan, RATE_CONNS, percentile};

/// The same four instances behind the CPU gate (a pool made for each gate-on run).
const GATE_HOST: &str = "gate.local";
/// The spinning instance behind its gate.
const SPIN_HOST: &str = "spin.local";
/// Request rate of the sparse gate measurement: one connection, so every request finds all
/// instances idle (throttled, with the gate on) and wakes one.
const SPARSE_RATE: f64 = 200.0;

pub(crate) fn cpu_gate(
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
