//! Closed-loop loads: wrk (HTTP/1.1) and h2load (h2c) against every contender, their output
//! parsed, the medians and each contender's CPU per request put in the report.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::report::{Report, Row};
use crate::{HOST, Plan, Target, percentile};

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// Failed requests, non-2xx answers and socket errors.
    pub(crate) errors: u64,
    /// Requests completed.
    pub(crate) requests: u64,
    /// The contender's CPU time over the run divided by `requests` (lull: its proxy threads;
    /// nginx: master and workers; haproxy: all its threads).
    pub(crate) cpu_per_request: Option<Duration>,
}

/// CPU per request in µs, or `-`.
pub(crate) fn cpu_text(cpu: Option<Duration>) -> String {
    cpu.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1} µs", d.as_secs_f64() * 1e6),
    )
}

/// The run with the median req/s of `runs`.
pub(crate) fn median_run(runs: &[Load]) -> Load {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted[sorted.len() / 2]
}

/// `wrk -t<min(2,c)> -c<conns> -d<s>s --latency` with the bench Host header.
pub(crate) fn wrk(addr: SocketAddr, conns: usize, seconds: u64) -> Result<Load> {
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
pub(crate) struct Bests {
    pub(crate) lull: f64,
    /// The lesser of the proxies' bests (lull, nginx, haproxy): a rate each of them sustains.
    pub(crate) slowest_proxy: f64,
}

/// wrk and h2load against every target.
pub(crate) fn closed_loop(
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

#[cfg(test)]
mod tests {
    use super::*;

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
