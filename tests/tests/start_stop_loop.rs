//! Privileged: a thousand start/stop/delete cycles leave no mount, cgroup, state dir, process or
//! file descriptor behind. `LULL_LOOP_CYCLES` changes the count (CI runs the full thousand).

use std::time::{Duration, Instant};

use lull_tests::busybox::BusyboxHost;
use lull_tests::scratch::mounts_under;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Processes whose command line mentions `needle` (shims keep the zygote's name).
fn processes_named(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            (stat.contains(needle) && state != 'Z').then_some(stat)
        })
        .collect()
}

async fn wait_for_line(dir: &std::path::Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if lull_runtime::logs::read_all(dir)
            .map(|r| r.iter().any(|r| r.text == text))
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{text:?} never logged in {}", dir.display());
}

#[tokio::test]
async fn a_thousand_cycles_leak_nothing() {
    let cycles: usize = std::env::var("LULL_LOOP_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let host = BusyboxHost::new("lull-loop", env!("CARGO_BIN_EXE_lull-test-zygote"));
    let (manager, scratch, cgroups) = (&host.manager, &host.scratch, &host.cgroups);
    let run = |i: usize, script: &str| host.script(&format!("loop-{i}"), script);
    // Warm up once so lazily opened descriptors (runtime, zygote socket) are counted as baseline.
    let inst = manager.launch(run(0, "true")).await.unwrap();
    inst.wait().await.unwrap();
    manager.delete(inst).await.unwrap();
    let fds_before = open_fds();
    let shims_before = processes_named("lull-test-zygo").len();

    let started = Instant::now();
    for i in 1..=cycles {
        // Alternate a process that exits by itself and one that must be stopped.
        let script = if i.is_multiple_of(2) {
            "echo $$"
        } else {
            "trap 'exit 0' TERM; echo ready; while :; do usleep 10000; done"
        };
        let inst = manager
            .launch(run(i, script))
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        let status = if i.is_multiple_of(2) {
            inst.wait().await.unwrap()
        } else {
            // SIGTERM before the trap is set would be ignored by a pid 1 without a handler.
            wait_for_line(&inst.paths().logs(), "ready").await;
            inst.stop(Duration::from_secs(5)).await.unwrap()
        };
        assert_eq!(status.code, Some(0), "cycle {i}: {status:?}");
        manager
            .delete(inst)
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{cycles} cycles in {elapsed:?} ({:?} per cycle)",
        elapsed / cycles as u32
    );

    assert!(
        mounts_under(scratch.path()).is_empty(),
        "mounts left: {:?}",
        mounts_under(scratch.path())
    );
    assert_eq!(
        std::fs::read_dir(scratch.path().join("instances"))
            .unwrap()
            .count(),
        0,
        "instance dirs left"
    );
    assert_eq!(
        std::fs::read_dir(scratch.path().join("state"))
            .unwrap()
            .count(),
        0,
        "libcontainer state left"
    );
    for dir in cgroups.dirs() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let children: Vec<_> = entries
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.file_name())
                .collect();
            assert!(
                children.is_empty(),
                "cgroups left under {}: {children:?}",
                dir.display()
            );
        }
    }
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
    assert_eq!(
        processes_named("lull-test-zygo").len(),
        shims_before,
        "shims left running"
    );
}
