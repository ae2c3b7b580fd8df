//! Privileged tests against this host's real cgroup hierarchies (run as root, like CI).
//!
//! They create `lull-test-<pid>-<nanos>` under the cpu and cpuacct hierarchies only (the memory
//! cgroup the machine puts test processes in is left alone) and remove it in a Drop guard.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{
    CgroupLayout, Controller, CpuGate, CpuLimit, Gate, GateState, InstanceCgroup, V1Hierarchies,
};

/// Owns the test cgroup and the spinner in it; kills and removes both even when a test fails.
struct TestCgroup {
    cgroup: InstanceCgroup,
    child: Option<Child>,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(error) = self.cgroup.remove() {
            eprintln!("cleanup: {error}");
        }
    }
}

fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("/lull-test-{}-{nanos}", std::process::id())
}

/// The test cgroup: cpu and cpuacct only on v1/hybrid hosts, the unified directory on v2.
fn test_cgroup() -> TestCgroup {
    let layout = match CgroupLayout::host().unwrap() {
        CgroupLayout::V1(mounts) => CgroupLayout::V1(V1Hierarchies {
            cpu: mounts.cpu,
            cpuacct: mounts.cpuacct,
            ..V1Hierarchies::default()
        }),
        v2 => v2,
    };
    let cgroup = InstanceCgroup::new(&layout, &PathBuf::from(unique_name())).unwrap();
    assert!(!cgroup.exists());
    // The guard exists before the first mkdir, so a half-made cgroup is removed too.
    let test = TestCgroup {
        cgroup,
        child: None,
    };
    test.cgroup.create().unwrap();
    // The machine is shared with other builds: the highest weight keeps the restored share
    // near a full CPU, so that it measures the gate rather than the load.
    let cpu_dir = test.cgroup.controller_dir(Controller::Cpu).unwrap();
    let (file, weight) = if test.cgroup.is_v2() {
        ("cpu.weight", "10000")
    } else {
        ("cpu.shares", "262144")
    };
    std::fs::write(cpu_dir.join(file), weight).unwrap();
    test
}

/// The share of one CPU the cgroup used over `window`.
fn cpu_share(cgroup: &InstanceCgroup, window: Duration) -> f64 {
    let start_usage = cgroup.cpu_usage_ns().unwrap();
    let start = Instant::now();
    std::thread::sleep(window);
    let used = cgroup.cpu_usage_ns().unwrap() - start_usage;
    used as f64 / start.elapsed().as_nanos() as f64
}

#[test]
fn gate_throttles_and_restores_a_spinning_process_on_the_host() {
    let mut test = test_cgroup();
    let child = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    test.child = Some(child);
    test.cgroup.add_process(pid).unwrap();

    let gate = CpuGate::open(&test.cgroup, CpuLimit::UNLIMITED).unwrap();
    assert!(gate.restore().unwrap());
    assert_eq!(test.cgroup.cpu_limit().unwrap(), CpuLimit::UNLIMITED);
    std::thread::sleep(Duration::from_millis(100));
    let restored = cpu_share(&test.cgroup, Duration::from_secs(1));

    let started = Instant::now();
    assert!(gate.throttle().unwrap());
    let throttle_call = started.elapsed();
    assert!(!gate.throttle().unwrap());
    assert_eq!(gate.state(), GateState::Throttled);
    assert_eq!(test.cgroup.cpu_limit().unwrap(), CpuLimit::THROTTLED);
    // Let the refilled 1 ms run out, then measure over five periods of one second. A refill
    // may overrun by up to a tick (4 ms at HZ=250) before the kernel notices; the overrun is
    // charged as debt against later periods, so the share converges to 0.1 % over a few
    // periods (measured here: bursts of about 2 ms every other second), whereas a single
    // one-second window could show 0.4 %.
    std::thread::sleep(Duration::from_millis(200));
    let throttled = cpu_share(&test.cgroup, Duration::from_secs(5));

    let started = Instant::now();
    assert!(gate.restore().unwrap());
    let restore_call = started.elapsed();
    assert_eq!(test.cgroup.cpu_limit().unwrap(), CpuLimit::UNLIMITED);
    let resumed = cpu_share(&test.cgroup, Duration::from_millis(500));

    eprintln!(
        "host cgroup gate: restored {:.1} % of a cpu, throttled {:.3} %, resumed {:.1} %; \
         throttle call {throttle_call:?}, restore call {restore_call:?}",
        restored * 100.0,
        throttled * 100.0,
        resumed * 100.0
    );
    // Two cores shared with other work: a spinner gets most of one, never less than half.
    assert!(restored >= 0.5, "restored share {restored}");
    assert!(throttled <= 0.003, "throttled share {throttled}");
    assert!(resumed >= 0.5, "resumed share {resumed}");
}

#[test]
fn gate_sets_a_fractional_limit_on_the_host() {
    let test = test_cgroup();
    let limit = CpuLimit::from_vcpus(0.25).unwrap();
    let gate = CpuGate::open(&test.cgroup, limit).unwrap();
    assert!(gate.throttle().unwrap());
    assert_eq!(test.cgroup.cpu_limit().unwrap(), CpuLimit::THROTTLED);
    assert!(gate.restore().unwrap());
    assert_eq!(test.cgroup.cpu_limit().unwrap(), limit);
    // The kernel itself rejects what CpuLimit refuses to build.
    let quota = test
        .cgroup
        .controller_dir(Controller::Cpu)
        .unwrap()
        .join(if test.cgroup.is_v2() {
            "cpu.max"
        } else {
            "cpu.cfs_quota_us"
        });
    let err = std::fs::write(
        &quota,
        if test.cgroup.is_v2() {
            "999 100000"
        } else {
            "999"
        },
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn remove_cleans_up_a_leftover_cgroup() {
    let test = test_cgroup();
    assert!(test.cgroup.exists());
    test.cgroup.remove().unwrap();
    assert!(!test.cgroup.exists());
    // Removing again is fine (crash recovery may run twice).
    test.cgroup.remove().unwrap();
}

/// A cgroup with the freezer (and cpuacct, to see whether its task runs), thawed before its
/// spinner is killed: a frozen task dies only once thawed.
struct FrozenTest {
    inner: TestCgroup,
}

impl Drop for FrozenTest {
    fn drop(&mut self) {
        if let Some(dir) = self.inner.cgroup.controller_dir(Controller::Freezer) {
            let (file, value) = match self.inner.cgroup.is_v2() {
                true => ("cgroup.freeze", "0"),
                false => ("freezer.state", "THAWED"),
            };
            let _ = std::fs::write(dir.join(file), value);
        }
    }
}

#[test]
fn the_freezer_stops_and_resumes_a_spinning_process_on_the_host() {
    let layout = match CgroupLayout::host().unwrap() {
        CgroupLayout::V1(mounts) => CgroupLayout::V1(V1Hierarchies {
            cpuacct: mounts.cpuacct,
            freezer: mounts.freezer,
            ..V1Hierarchies::default()
        }),
        v2 => v2,
    };
    let cgroup = InstanceCgroup::new(&layout, &PathBuf::from(unique_name())).unwrap();
    let mut test = FrozenTest {
        inner: TestCgroup {
            cgroup,
            child: None,
        },
    };
    test.inner.cgroup.create().unwrap();
    let child = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    test.inner.child = Some(child);
    test.inner.cgroup.add_process(pid).unwrap();
    let cgroup = &test.inner.cgroup;
    let fs: std::sync::Arc<dyn super::CgroupFs> = std::sync::Arc::new(super::HostCgroupFs);
    let freezer = super::Freezer::open(fs, cgroup).unwrap();

    assert!(!freezer.is_frozen().unwrap());
    let running = cpu_share(cgroup, Duration::from_millis(300));
    let started = Instant::now();
    freezer.freeze().unwrap();
    let freeze_call = started.elapsed();
    assert!(freezer.is_frozen().unwrap());
    let frozen = cpu_share(cgroup, Duration::from_millis(500));
    let started = Instant::now();
    freezer.thaw().unwrap();
    let thaw_call = started.elapsed();
    assert!(!freezer.is_frozen().unwrap());
    let thawed = cpu_share(cgroup, Duration::from_millis(300));
    eprintln!(
        "host freezer: running {:.1} % of a cpu, frozen {:.4} %, thawed {:.1} %; freeze {freeze_call:?}, thaw {thaw_call:?}",
        running * 100.0,
        frozen * 100.0,
        thawed * 100.0
    );
    assert!(running >= 0.3, "running share {running}");
    assert_eq!(frozen, 0.0, "a frozen task runs not at all");
    assert!(thawed >= 0.3, "thawed share {thawed}");
}
