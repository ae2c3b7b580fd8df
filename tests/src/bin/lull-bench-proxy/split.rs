//! Running the contenders with the CPUs split: the load generator and the apps pinned to one
//! half of the CPUs, each proxy (lull's threads, nginx's and haproxy's processes) to the other,
//! for issue 4's fixed-rate comparison at half of direct's best.

use std::fs;
use std::net::SocketAddr;

use anyhow::{Result, anyhow, bail};
use lull_tests::affinity;

use crate::apps::Apps;
use crate::closed_loop::{Load, median_run, wrk};
use crate::fixed_rate::{RateOf, fixed_rate_peers};
use crate::lull::PROXY_THREAD_NAME;
use crate::peers::Peers;
use crate::report::Report;
use crate::{Plan, RATE_CONNS, Target};

/// The driver's runtime thread (pools, health checks, gate timers), on the proxy's side of a
/// split run.
pub(crate) const DRIVER_THREAD_NAME: &str = "lull-driver";

/// The CPUs of a split run: the load generator and the apps on one side, the proxy on the
/// other, so that a fixed-rate run measures what the proxy adds rather than how it shares the
/// CPUs with the load it serves (on 2 CPUs shared, half of direct's best is about every
/// proxy's maximum: a proxied request costs about twice a direct one).
pub(crate) struct Split {
    pub(crate) clients: Vec<usize>,
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

    pub(crate) fn words(&self) -> String {
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
pub(crate) fn split_fixed_rate(
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

/// `root` and its children: the processes pinned for a peer, and those whose CPU time
/// `CpuOf::Tree` sums.
pub(crate) fn tree_pids(root: u32) -> Vec<u32> {
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
