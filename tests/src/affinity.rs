//! CPU affinity for the benchmarks: which CPUs this process may run on, and pinning threads of
//! this or another process to some of them (so that a proxy has a CPU of its own, apart from
//! the load generator and the apps).

use std::fs;

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// The CPUs the calling thread may run on, ascending (the process's, from a thread nobody
/// pinned).
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("read this process's CPU affinity")?;
    Ok((0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect())
}

fn cpu_set(cpus: &[usize]) -> Result<CpuSet> {
    if cpus.is_empty() {
        bail!("an empty CPU set");
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    }
    Ok(set)
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cpu_set(cpus)?)
        .with_context(|| format!("pin this thread to CPUs {cpus:?}"))
}

/// Pins every thread of process `pid` whose name starts with `prefix` (every thread when
/// `None`) to `cpus`; threads they start later inherit it. Returns how many were pinned. A
/// thread that exits meanwhile is skipped.
pub fn pin_threads(pid: u32, prefix: Option<&str>, cpus: &[usize]) -> Result<usize> {
    let set = cpu_set(cpus)?;
    let dir = format!("/proc/{pid}/task");
    let mut pinned = 0;
    for task in fs::read_dir(&dir).with_context(|| format!("list {dir}"))? {
        let task = task.with_context(|| format!("list {dir}"))?;
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(prefix) = prefix {
            let Ok(name) = fs::read_to_string(task.path().join("comm")) else {
                continue;
            };
            if !name.trim_end().starts_with(prefix) {
                continue;
            }
        }
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            Ok(()) => pinned += 1,
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e).with_context(|| format!("pin thread {tid} of {pid}")),
        }
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pinned_runs_only_where_it_was_pinned() {
        let allowed = allowed_cpus().unwrap();
        assert!(!allowed.is_empty());
        let last = *allowed.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(&[last]).unwrap();
            let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
            // SAFETY: sched_getcpu has no preconditions; it returns the CPU this thread runs on.
            let running_on = unsafe { libc::sched_getcpu() };
            (
                (0..CpuSet::count())
                    .filter(|&c| set.is_set(c).unwrap())
                    .collect::<Vec<_>>(),
                running_on,
            )
        })
        .join()
        .unwrap();
        assert_eq!(seen.0, [last]);
        assert_eq!(seen.1, last as i32);
        // Other threads keep theirs.
        assert_eq!(allowed_cpus().unwrap(), allowed);
    }

    #[test]
    fn pin_threads_picks_threads_by_name() {
        let allowed = allowed_cpus().unwrap();
        let first = allowed[0];
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("lull-pin-test".into())
            .spawn(move || {
                ready_tx.send(()).unwrap();
                rx.recv().unwrap();
                let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
                (0..CpuSet::count())
                    .filter(|&c| set.is_set(c).unwrap())
                    .collect::<Vec<_>>()
            })
            .unwrap();
        ready_rx.recv().unwrap();
        let pinned = pin_threads(std::process::id(), Some("lull-pin-te"), &[first]).unwrap();
        tx.send(()).unwrap();
        assert_eq!(pinned, 1);
        assert_eq!(thread.join().unwrap(), [first]);
        assert_eq!(
            allowed_cpus().unwrap(),
            allowed,
            "the test thread keeps its own"
        );
        assert!(pin_threads(std::process::id(), None, &[]).is_err());
    }
}
