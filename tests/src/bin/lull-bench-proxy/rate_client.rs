//! The fixed-rate open-loop client: a process of its own (this program with `--rate-client`),
//! the schedule it runs, the one line it prints, and how the driver starts it and reads that
//! line back.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lull_tests::affinity;

use crate::conn::Conn;
use crate::percentile;

/// Every fixed-rate run first runs its schedule this long unrecorded: each proxy's upstream
/// connections are warm at the run's concurrency, whatever its idle timeout did to them
/// while the other contenders ran (lull's 4 s `upstream_idle` had closed them; nginx keeps
/// them 60 s), and the apps have a thread per connection ready.
pub(crate) const RATE_WARMUP: Duration = Duration::from_secs(1);

/// A fixed-rate run's figures, as its client process reported them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateRun {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// The rate achieved over the recorded part.
    pub(crate) achieved: f64,
    /// Requests sent more than 1 ms after their scheduled time (the answer to the one before
    /// on the connection came late, or the client could not keep up).
    pub(crate) late: usize,
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
pub(crate) fn fixed_rate(
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
pub(crate) fn rate_client(mut args: impl Iterator<Item = String>) -> Result<()> {
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
}
