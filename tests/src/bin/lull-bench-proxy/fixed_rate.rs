//! The fixed-rate comparisons: every contender at one rate through the fixed-rate client, and
//! the p99 each proxy adds over direct put in the report.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::rate_client::{RATE_WARMUP, RateRun, fixed_rate};
use crate::report::{Report, Row};
use crate::split::Split;
use crate::{HOST, Plan, RATE_CONNS, Target, percentile};

/// The median p99 (µs) over the runs of each target, and each run's p99.
pub(crate) struct RateResult {
    pub(crate) p99_us: f64,
    pub(crate) p50_us: f64,
    pub(crate) runs: Vec<f64>,
    pub(crate) late: usize,
}

pub(crate) fn rate_result(runs: &[RateRun]) -> RateResult {
    let p99s: Vec<f64> = runs.iter().map(|r| r.p99_us).collect();
    let p50s: Vec<f64> = runs.iter().map(|r| r.p50_us).collect();
    RateResult {
        p99_us: percentile(&p99s, 50.0),
        p50_us: percentile(&p50s, 50.0),
        runs: p99s,
        late: runs.iter().map(|r| r.late).sum(),
    }
}

/// The rate of a fixed-rate comparison, from a closed-loop HTTP/1.1 median.
#[derive(Clone, Copy)]
pub(crate) enum RateOf {
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

pub(crate) fn fixed_rate_peers(
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
