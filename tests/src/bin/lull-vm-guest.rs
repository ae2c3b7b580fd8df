//! PID 1 of the cgroup-v2 VM check (`cargo xtask vm-check`).
//!
//! Booted as `/init` from a tiny initramfs, it mounts proc, sysfs and cgroup2, creates
//! `/lull/inst` with the cpu, memory and pids controllers, moves a spinning child into it and
//! drives the runtime's real `CgroupLayout::detect` and `CpuGate` against the kernel: CPU share
//! restored, throttled and restored again, and the exact `cpu.max` contents at each step. It
//! prints one JSON line after [`MARKER`] on the console and powers the VM off.
//!
//! With `LULL_MODE=probe` in its environment (from the kernel command line) it only prints the
//! marker and powers off: the xtask uses that to see whether KVM boots at all.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lull_runtime::cgroup::{CgroupLayout, CpuGate, CpuLimit, Gate, InstanceCgroup};
use nix::mount::{MsFlags, mount};
use serde_json::{Value, json};

const MARKER: &str = "LULL-VM-RESULT ";
const CONTROLLERS: &str = "+cpu +memory +pids";

fn main() {
    if std::env::args().nth(1).as_deref() == Some("spin") {
        loop {
            std::hint::spin_loop();
        }
    }
    if std::process::id() != 1 {
        eprintln!("lull-vm-guest runs as PID 1 of the VM check's initramfs, not on a host");
        std::process::exit(2);
    }
    let result = if std::env::var("LULL_MODE").as_deref() == Ok("probe") {
        Ok(json!({ "probe": true }))
    } else {
        check()
    };
    let line = match result {
        Ok(mut value) => {
            value["ok"] = Value::Bool(true);
            value
        }
        Err(error) => json!({ "ok": false, "error": format!("{error:#}") }),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{MARKER}{line}");
    let _ = stdout.flush();
    power_off();
}

fn power_off() -> ! {
    // SAFETY: sync takes no arguments and only flushes filesystem buffers.
    unsafe { libc::sync() };
    // SAFETY: reboot with RB_POWER_OFF has no memory-safety preconditions; as PID 1 in a VM we
    // mean to stop the machine. It returns only on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    // Returning from PID 1 panics the kernel, which with `panic=-1 -no-reboot` also ends qemu.
    std::process::exit(1)
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags) -> anyhow::Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    mount(Some(source), target, Some(fstype), flags, None::<&str>)
        .with_context(|| format!("mount {fstype} on {target}"))
}

/// Kills the spinner even when a step fails.
struct Spinner(Child);

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_trimmed(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text.trim().to_owned())
}

fn cpu_share(cgroup: &InstanceCgroup, window: Duration) -> anyhow::Result<f64> {
    let start_usage = cgroup.cpu_usage_ns()?;
    let start = Instant::now();
    std::thread::sleep(window);
    let used = cgroup.cpu_usage_ns()?.saturating_sub(start_usage);
    Ok(used as f64 / start.elapsed().as_nanos() as f64)
}

fn check() -> anyhow::Result<Value> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // devtmpfs gives /dev/null, which spawning with Stdio::null needs.
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
    )?;
    mount_fs("proc", "/proc", "proc", flags)?;
    mount_fs("sysfs", "/sys", "sysfs", flags)?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", flags)?;
    let root = Path::new("/sys/fs/cgroup");
    std::fs::write(root.join("cgroup.subtree_control"), CONTROLLERS)
        .context("enable controllers in the root cgroup")?;

    let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo"))?;
    ensure!(layout.is_v2(), "layout detected as {layout:?}, expected v2");

    let parent = root.join("lull");
    std::fs::create_dir_all(&parent).context("mkdir /lull cgroup")?;
    std::fs::write(parent.join("cgroup.subtree_control"), CONTROLLERS)
        .context("enable controllers in /lull")?;
    let cgroup = InstanceCgroup::new(&layout, Path::new("/lull/inst"))?;
    cgroup.create()?;
    let cpu_max = cgroup
        .controller_dir(lull_runtime::cgroup::Controller::Cpu)
        .context("no cpu directory")?
        .join("cpu.max");
    let cpu_max_initial = read_trimmed(&cpu_max)?;

    let exe = std::env::current_exe().context("current exe")?;
    let exe_name = exe.display().to_string();
    let child = Command::new(&exe)
        .arg("spin")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn spinner {exe_name}"))?;
    let spinner = Spinner(child);
    cgroup.add_process(spinner.0.id())?;

    let gate = CpuGate::open(&cgroup, CpuLimit::UNLIMITED)?;
    ensure!(gate.restore()?, "first restore reported no change");
    let cpu_max_restored = read_trimmed(&cpu_max)?;
    std::thread::sleep(Duration::from_millis(100));
    let restored_share = cpu_share(&cgroup, Duration::from_secs(1))?;

    let started = Instant::now();
    ensure!(gate.throttle()?, "throttle reported no change");
    let throttle_call = started.elapsed();
    ensure!(!gate.throttle()?, "second throttle reported a change");
    let cpu_max_throttled = read_trimmed(&cpu_max)?;
    std::thread::sleep(Duration::from_millis(200));
    let throttled_share = cpu_share(&cgroup, Duration::from_secs(2))?;

    let started = Instant::now();
    ensure!(gate.restore()?, "restore reported no change");
    let restore_call = started.elapsed();
    let cpu_max_after = read_trimmed(&cpu_max)?;
    let resumed_share = cpu_share(&cgroup, Duration::from_secs(1))?;

    // A second gate with a fractional limit, as a service with `cpu: 0.25` gets.
    let limit = CpuLimit::from_vcpus(0.25)?;
    let limited = CpuGate::open(&cgroup, limit)?;
    limited.restore()?;
    let cpu_max_limited = read_trimmed(&cpu_max)?;
    std::thread::sleep(Duration::from_millis(200));
    let limited_share = cpu_share(&cgroup, Duration::from_secs(1))?;

    let cpu_stat = read_trimmed(
        &cgroup
            .controller_dir(lull_runtime::cgroup::Controller::Cpu)
            .context("no cpu directory")?
            .join("cpu.stat"),
    )?;
    let nr_throttled = cpu_stat
        .lines()
        .find_map(|line| line.strip_prefix("nr_throttled "))
        .and_then(|n| n.parse::<u64>().ok());
    let pids_current = cgroup.pids_current()?;
    let memory_current = cgroup.memory_current()?;
    let memory_peak = cgroup.memory_peak()?;
    let oom_kills = cgroup.oom_kills()?;

    drop(spinner);
    cgroup.remove()?;
    if cgroup.exists() {
        bail!("cgroup /lull/inst still exists after remove");
    }

    Ok(json!({
        "kernel": read_trimmed(Path::new("/proc/sys/kernel/osrelease"))?,
        "layout": "v2",
        "cpu_max_initial": cpu_max_initial,
        "cpu_max_restored": cpu_max_restored,
        "cpu_max_throttled": cpu_max_throttled,
        "cpu_max_after": cpu_max_after,
        "cpu_max_limited": cpu_max_limited,
        "restored_share": restored_share,
        "throttled_share": throttled_share,
        "resumed_share": resumed_share,
        "limited_share": limited_share,
        "throttle_call_us": throttle_call.as_secs_f64() * 1e6,
        "restore_call_us": restore_call.as_secs_f64() * 1e6,
        "nr_throttled": nr_throttled,
        "pids_current": pids_current,
        "memory_current": memory_current,
        "memory_peak": memory_peak,
        "oom_kills": oom_kills,
        "removed": true,
    }))
}
