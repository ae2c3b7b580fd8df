//! `cargo xtask vm-check`: proves the cgroup-v2 path of the CPU gate on a real kernel.
//!
//! Builds `lull-vm-guest` (package lull-tests) as a static binary, packs it as `/init` into a
//! newc initramfs written here, boots it with qemu on the host's Debian kernel (cgroup2, the cpu
//! controller and CFS bandwidth are built in, so no modules are needed), reads the guest's one
//! JSON line from the serial console and checks it. KVM is used only when a short probe boot
//! succeeds; TCG is the floor. qemu is killed on every exit path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

const MARKER: &str = "LULL-VM-RESULT ";
/// Where Debian's libseccomp-dev puts `libseccomp.a` (the guest links it statically).
const SECCOMP_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
const TARGET: &str = "x86_64-unknown-linux-gnu";
const THROTTLED_CPU_MAX: &str = "1000 1000000";
const RESTORED_CPU_MAX: &str = "max 100000";
const LIMITED_CPU_MAX: &str = "25000 100000";
const MAX_THROTTLED_SHARE: f64 = 0.01;
const MIN_RESTORED_SHARE: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Probe KVM with a short boot, fall back to TCG.
    Auto,
    Tcg,
    Kvm,
}

#[derive(Debug, Clone, clap::Args)]
pub struct VmCheckOpts {
    /// Kernel image to boot (default: the newest /boot/vmlinuz-*).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Hard timeout of the checking boot, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// Timeout of the KVM probe boot, in seconds.
    #[arg(long, default_value_t = 6)]
    pub kvm_probe_secs: u64,
    /// Boot this guest binary instead of building lull-vm-guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
}

impl Default for VmCheckOpts {
    fn default() -> VmCheckOpts {
        VmCheckOpts {
            kernel: None,
            accel: Accel::Auto,
            timeout_secs: 60,
            kvm_probe_secs: 6,
            guest: None,
        }
    }
}

pub fn run(opts: VmCheckOpts) -> anyhow::Result<()> {
    let root = workspace_root()?;
    let work_dir = root.join("target/vm-check");
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;

    let guest = match &opts.guest {
        Some(guest) => guest.clone(),
        None => build_guest(&root)?,
    };
    let kernel = match &opts.kernel {
        Some(kernel) => kernel.clone(),
        None => newest_kernel()?,
    };
    let initrd = work_dir.join("initramfs.cpio");
    write_initramfs(&guest, &initrd)?;
    eprintln!(
        "vm-check: kernel {}, initramfs {}",
        kernel.display(),
        initrd.display()
    );

    let use_kvm = match opts.accel {
        Accel::Tcg => false,
        Accel::Kvm => true,
        Accel::Auto => probe_kvm(
            &kernel,
            &initrd,
            &work_dir,
            Duration::from_secs(opts.kvm_probe_secs),
        ),
    };
    let accel = if use_kvm { "kvm" } else { "tcg" };
    let started = Instant::now();
    let boot = boot(
        &kernel,
        &initrd,
        accel,
        "",
        Duration::from_secs(opts.timeout_secs),
        &work_dir.join(format!("serial-{accel}.log")),
    )?;
    let result = boot.result.with_context(|| {
        format!(
            "no {MARKER:?} line from the guest ({}) within {} s; serial log in {}",
            boot.ending,
            opts.timeout_secs,
            work_dir.display()
        )
    })?;
    eprintln!(
        "vm-check: {accel} boot and check took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("{result}");
    verify(&result)
}

/// The checks on the guest's result; the error lists every failed one.
fn verify(result: &Value) -> anyhow::Result<()> {
    if result["ok"] != Value::Bool(true) {
        bail!("guest failed: {}", result["error"]);
    }
    let text = |key: &str| result[key].as_str().unwrap_or("<missing>").to_owned();
    let number = |key: &str| result[key].as_f64().unwrap_or(f64::NAN);
    let mut failures = Vec::new();
    if text("cpu_max_throttled") != THROTTLED_CPU_MAX {
        failures.push(format!(
            "cpu.max while throttled was {:?}, expected {THROTTLED_CPU_MAX:?}",
            text("cpu_max_throttled")
        ));
    }
    for key in ["cpu_max_restored", "cpu_max_after"] {
        if text(key) != RESTORED_CPU_MAX {
            failures.push(format!(
                "{key} was {:?}, expected {RESTORED_CPU_MAX:?}",
                text(key)
            ));
        }
    }
    if text("cpu_max_limited") != LIMITED_CPU_MAX {
        failures.push(format!(
            "cpu.max with a 0.25 cpu limit was {:?}, expected {LIMITED_CPU_MAX:?}",
            text("cpu_max_limited")
        ));
    }
    let restored = number("restored_share");
    let throttled = number("throttled_share");
    let resumed = number("resumed_share");
    if throttled.is_nan() || throttled > MAX_THROTTLED_SHARE {
        failures.push(format!(
            "throttled share {throttled:.4} is above {MAX_THROTTLED_SHARE}"
        ));
    }
    if restored.is_nan() || restored < MIN_RESTORED_SHARE {
        failures.push(format!(
            "restored share {restored:.3} is below {MIN_RESTORED_SHARE}"
        ));
    }
    if resumed.is_nan() || resumed < MIN_RESTORED_SHARE {
        failures.push(format!(
            "share after restoring again {resumed:.3} is below {MIN_RESTORED_SHARE}"
        ));
    }
    let ratio = if throttled > 0.0 {
        format!("{:.0}x", restored / throttled)
    } else {
        "unbounded (no CPU at all while throttled)".to_owned()
    };
    eprintln!(
        "vm-check: kernel {}: restored {:.1} % of a cpu, throttled {:.3} %, resumed {:.1} %, \
         0.25-cpu limit {:.1} %; restored/throttled {ratio}",
        text("kernel"),
        restored * 100.0,
        throttled * 100.0,
        resumed * 100.0,
        number("limited_share") * 100.0,
    );
    if !failures.is_empty() {
        bail!("vm-check failed:\n  {}", failures.join("\n  "));
    }
    eprintln!("vm-check: ok");
    Ok(())
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// `RUSTFLAGS="-C target-feature=+crt-static" LIBSECCOMP_LINK_TYPE=static cargo build -p
/// lull-tests --bin lull-vm-guest --release --target x86_64-unknown-linux-gnu`, in its own
/// target dir so that normal builds keep
/// their artifacts.
fn build_guest(root: &Path) -> anyhow::Result<PathBuf> {
    let target_dir = root.join("target/static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("vm-check: building lull-vm-guest (static)");
    let status = Command::new(cargo)
        .current_dir(root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // libcontainer's seccomp support links libseccomp: statically here (libseccomp-dev
        // ships the archive), as a static binary cannot load the shared library.
        .env("LIBSECCOMP_LINK_TYPE", "static")
        .env("LIBSECCOMP_LIB_PATH", SECCOMP_LIB_DIR)
        .args([
            "build",
            "-p",
            "lull-tests",
            "--bin",
            "lull-vm-guest",
            "--release",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "building lull-vm-guest failed: {status}");
    Ok(target_dir.join(TARGET).join("release/lull-vm-guest"))
}

fn newest_kernel() -> anyhow::Result<PathBuf> {
    let boot = Path::new("/boot");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(boot)
        .with_context(|| format!("cannot list {}", boot.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .context("no /boot/vmlinuz-* (install linux-image-amd64)")
}

/// One entry of a newc ("070701") cpio archive.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        if mode & 0o040000 != 0 { 2 } else { 1 },
        0, // mtime: reproducible
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name_size as u32,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// An initramfs with the guest as `/init` and a `/dev/console` for its output.
fn initramfs(guest: &[u8]) -> anyhow::Result<Vec<u8>> {
    ensure!(
        u32::try_from(guest.len()).is_ok(),
        "guest binary too large for cpio"
    );
    let mut out = Vec::with_capacity(guest.len() + 1024);
    cpio_entry(&mut out, 1, "dev", 0o040755, (0, 0), &[]);
    cpio_entry(&mut out, 2, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut out, 3, "proc", 0o040755, (0, 0), &[]);
    cpio_entry(&mut out, 4, "sys", 0o040755, (0, 0), &[]);
    cpio_entry(&mut out, 5, "init", 0o100755, (0, 0), guest);
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    Ok(out)
}

fn write_initramfs(guest: &Path, out: &Path) -> anyhow::Result<()> {
    let binary =
        std::fs::read(guest).with_context(|| format!("cannot read guest {}", guest.display()))?;
    let archive = initramfs(&binary)?;
    std::fs::write(out, archive).with_context(|| format!("cannot write {}", out.display()))
}

struct Boot {
    result: Option<Value>,
    /// How the boot ended, for error messages.
    ending: String,
}

fn boot(
    kernel: &Path,
    initrd: &Path,
    accel: &str,
    extra_append: &str,
    timeout: Duration,
    log_path: &Path,
) -> anyhow::Result<Boot> {
    let append = format!("console=ttyS0 quiet panic=-1 {extra_append}");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append.trim()])
        .args(["-nographic", "-no-reboot", "-m", "512", "-smp", "1"])
        .args(["-accel", accel]);
    let mut result = None;
    let ending = crate::qemu::run(&mut qemu, timeout, log_path, |line| {
        if let Some(start) = line.find(MARKER) {
            let json = &line[start + MARKER.len()..];
            let value: Value = serde_json::from_str(json.trim())
                .with_context(|| format!("guest printed bad JSON: {json}"))?;
            result = Some(value);
        }
        Ok(None)
    })?;
    Ok(Boot { result, ending })
}

/// Whether a KVM guest boots here: a probe boot that must print its marker within `timeout`.
fn probe_kvm(kernel: &Path, initrd: &Path, work_dir: &Path, timeout: Duration) -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("vm-check: no /dev/kvm, using TCG");
        return false;
    }
    let started = Instant::now();
    let probe = boot(
        kernel,
        initrd,
        "kvm",
        "LULL_MODE=probe",
        timeout,
        &work_dir.join("serial-kvm-probe.log"),
    );
    match probe {
        Ok(Boot {
            result: Some(value),
            ..
        }) if value["probe"] == Value::Bool(true) => {
            eprintln!(
                "vm-check: KVM probe booted in {:.1} s, using KVM",
                started.elapsed().as_secs_f64()
            );
            true
        }
        Ok(Boot { ending, .. }) => {
            eprintln!("vm-check: KVM probe failed ({ending}), using TCG");
            false
        }
        Err(error) => {
            eprintln!("vm-check: KVM probe failed ({error:#}), using TCG");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_is_a_valid_newc_archive() {
        let archive = initramfs(b"\x7fELF-guest").unwrap();
        assert_eq!(&archive[..6], b"070701");
        assert_eq!(archive.len() % 4, 0);
        // The console device node: mode 020600, rdev 5:1.
        let console = archive
            .windows(b"dev/console\0".len())
            .position(|w| w == b"dev/console\0")
            .unwrap();
        let header = &archive[console - 110..console];
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&header[6 + i * 8..14 + i * 8]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(1), 0o020600);
        assert_eq!((field(9), field(10)), (5, 1));
        let trailer = archive
            .windows(b"TRAILER!!!\0".len())
            .position(|w| w == b"TRAILER!!!\0");
        assert!(trailer.is_some());
        // The guest is stored as it is.
        assert!(
            archive
                .windows(b"\x7fELF-guest".len())
                .any(|w| w == b"\x7fELF-guest")
        );
    }

    #[test]
    fn verify_accepts_a_good_result_and_lists_every_failure() {
        let good = serde_json::json!({
            "ok": true, "kernel": "6.1.0",
            "cpu_max_restored": "max 100000", "cpu_max_throttled": "1000 1000000",
            "cpu_max_after": "max 100000", "cpu_max_limited": "25000 100000",
            "restored_share": 0.95, "throttled_share": 0.001, "resumed_share": 0.9,
            "limited_share": 0.25,
        });
        verify(&good).unwrap();
        let mut bad = good.clone();
        bad["cpu_max_throttled"] = "1000 100000".into();
        bad["throttled_share"] = 0.02.into();
        let message = verify(&bad).unwrap_err().to_string();
        assert!(
            message.contains("cpu.max while throttled was \"1000 100000\""),
            "{message}"
        );
        assert!(
            message.contains("throttled share 0.0200 is above 0.01"),
            "{message}"
        );
        let failed = serde_json::json!({ "ok": false, "error": "mount cgroup2" });
        assert!(
            verify(&failed)
                .unwrap_err()
                .to_string()
                .contains("mount cgroup2")
        );
    }
}
