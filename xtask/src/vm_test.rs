//! `cargo xtask vm-test`: lull as a systemd service on a fresh Debian VM with cgroup v2.
//!
//! 1. The image: a Debian (trixie: systemd 257, so `DelegateSubgroup=`) root filesystem with
//!    systemd and its kernel, built by mmdebstrap from Debian's packages into an ext4 disk
//!    image, cached under `target/vm-test/image-<hash>` and rebuilt when its recipe (suite,
//!    packages, files written into it) changes.
//! 2. The payload: a second, read-only disk made for each run with the lull binary, the
//!    fixture app's OCI layout and the scenario script (`xtask/vm/scenario.sh`), mounted at
//!    `/opt/lull-payload`; the scenario runs at every boot as `lull-vm-scenario.service`.
//! 3. The boot: qemu (TCG unless `--accel kvm`) with the image's own kernel and initrd, a copy
//!    of the cached disk, and user-mode networking restricted to the guest (nothing leaves the
//!    machine). The guest reboots itself once; qemu exits when it powers off.
//! 4. The verdict: the scenario's `LULL-VM-STEP` lines from the serial console, printed as a
//!    table; every step must be there and pass, in both phases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::base_images::Mirrors;
use crate::fixtures::{self, FixturesArgs};

/// The Debian release the VM runs.
const SUITE: &str = "trixie";
/// What the image holds beyond Essential and apt.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "linux-image-amd64",
    "iproute2",
    "nftables",
    "curl",
    "ca-certificates",
    "crun",
    "umoci",
    "procps",
    "passwd",
];
/// Bump when the image's making changes in a way the recipe text below cannot see.
const IMAGE_VERSION: u32 = 1;
const DISK_SIZE: &str = "3G";
const STEP: &str = "LULL-VM-STEP ";
const BENCH: &str = "LULL-VM-BENCH|";
const BENCH_INFO: &str = "LULL-VM-BENCH-INFO ";
const DONE: &str = "LULL-VM-DONE ";
/// Every step the scenario reports, by phase; each must pass.
const STEPS: &[(u64, &str)] = &[
    (1, "install"),
    (1, "install-again"),
    (1, "unit"),
    (1, "deploy"),
    (1, "delegated-cgroup"),
    (1, "export-crun"),
    (1, "source-export-crun"),
    (1, "gate"),
    (1, "cpu-limit-view"),
    (1, "restart"),
    (1, "watchdog"),
    (1, "journal-fields"),
    (2, "after-reboot"),
    (2, "uninstall"),
];
const SCENARIO: &str = include_str!("../vm/scenario.sh");

/// Files written into the image after mmdebstrap: (path, mode, contents).
const IMAGE_FILES: &[(&str, u32, &str)] = &[
    ("etc/hostname", 0o644, "lull-vm\n"),
    (
        "etc/fstab",
        0o644,
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n\
         /dev/vdb /opt/lull-payload ext4 ro,noload,nofail 0 0\n",
    ),
    (
        "etc/systemd/network/50-uplink.network",
        0o644,
        // Static: qemu's DHCP offers no router when the network is restricted. By name, as
        // Debian's images match: `Type=ether` would take lull's veth ends as well.
        "[Match]\nName=en*\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n",
    ),
    (
        "etc/systemd/system/lull-vm-scenario.service",
        0o644,
        "[Unit]\n\
         Description=lull's VM test scenario\n\
         After=multi-user.target network-online.target\n\
         Wants=network-online.target\n\
         RequiresMountsFor=/opt/lull-payload\n\
         ConditionPathExists=/opt/lull-payload/scenario.sh\n\n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/bin/bash /opt/lull-payload/scenario.sh\n\
         StandardOutput=journal+console\n\
         StandardError=journal+console\n\
         TimeoutStartSec=20min\n\n\
         [Install]\n\
         WantedBy=multi-user.target\n",
    ),
];
/// Symlinks written into the image: (link, target).
const IMAGE_LINKS: &[(&str, &str)] = &[
    (
        "etc/systemd/system/multi-user.target.wants/lull-vm-scenario.service",
        "/etc/systemd/system/lull-vm-scenario.service",
    ),
    (
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
        "/usr/lib/systemd/system/systemd-networkd.service",
    ),
    // network-online.target (which lull.service waits for) means an address and a route.
    (
        "etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service",
        "/usr/lib/systemd/system/systemd-networkd-wait-online.service",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmAccel {
    Tcg,
    Kvm,
}

/// The runtime benchmark inside the VM (after the scenario, lull uninstalled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmBench {
    /// Not run.
    None,
    /// A few iterations: the harness works on cgroup v2 and against crun.
    Smoke,
    /// The full run; writes the VM section of docs/benchmarks.md.
    Full,
}

#[derive(Debug, Clone, clap::Args)]
pub struct VmTestArgs {
    /// `lull-bench runtime` inside the VM, against crun, on cgroup v2.
    #[arg(long, value_enum, default_value_t = VmBench::Smoke)]
    pub bench: VmBench,
    /// Accelerator (KVM guests hang or abort on some hosts; TCG always works).
    #[arg(long, value_enum, default_value_t = VmAccel::Tcg)]
    pub accel: VmAccel,
    /// Hard timeout of the whole boot-reboot-poweroff run, in seconds.
    #[arg(long, default_value_t = 1500)]
    pub timeout_secs: u64,
    /// Build the image again even when the cached one matches the recipe.
    #[arg(long)]
    pub rebuild: bool,
}

pub fn run(args: &VmTestArgs) -> Result<()> {
    ensure!(
        crate::is_root(),
        "vm-test builds a root filesystem with mmdebstrap and mkfs.ext4 -d: run it as root"
    );
    for tool in ["mmdebstrap", "mkfs.ext4", "qemu-system-x86_64"] {
        ensure!(
            crate::registry::find_in_path(tool).is_some(),
            "{tool} not found: apt-get install -y mmdebstrap e2fsprogs qemu-system-x86"
        );
    }
    let root = fixtures::workspace_root();
    let work = root.join("target/vm-test");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    let image = image(&work, args.rebuild)?;
    eprintln!("vm-test: building lull and the fixture image");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args(["build", "-p", "lull"])
        .status()
        .context("run cargo build")?;
    ensure!(status.success(), "cargo build -p lull: {status}");
    if args.bench != VmBench::None {
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(&root)
            .args(["build", "--release", "-p", "lull-tests"])
            .args(["--bin", "lull-bench", "--bin", "lull-test-zygote"])
            .status()
            .context("run cargo build")?;
        ensure!(
            status.success(),
            "cargo build --release -p lull-tests: {status}"
        );
    }
    fixtures::run(&FixturesArgs { bulk: false })?;
    // The python base image a source build in the guest builds on (cached by its recipe).
    crate::base_images::run(&crate::base_images::BaseImagesArgs {
        only: vec!["python-3.11".to_owned()],
        rebuild: false,
    })?;

    let run_dir = work.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let payload = payload(&root, &run_dir, args.bench)?;
    let disk = run_dir.join("root.img");
    copy_sparse(&image.join("disk.img"), &disk)?;

    eprintln!(
        "vm-test: booting (log {})",
        run_dir.join("console.log").display()
    );
    let started = Instant::now();
    let outcome = boot(
        &image,
        &disk,
        &payload,
        args.accel,
        Duration::from_secs(args.timeout_secs),
        &run_dir.join("console.log"),
    )?;
    let verdict = judge(&outcome, args.bench != VmBench::None);
    print_table(&outcome, started.elapsed());
    if !outcome.bench.is_empty() {
        println!(
            "lull-bench runtime inside the VM:\n{}\n",
            outcome.bench.join("\n")
        );
    }
    if verdict.is_ok() && args.bench == VmBench::Full {
        write_bench_doc(&root, &outcome, args.accel)?;
    }
    match verdict {
        Ok(()) => {
            // The copies are large; the cached image stays.
            let _ = std::fs::remove_file(&disk);
            let _ = std::fs::remove_file(&payload);
            eprintln!("vm-test: ok");
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "vm-test failed (console: {})",
            run_dir.join("console.log").display()
        ))),
    }
}

/// The recipe as text: everything that makes the image, hashed for the cache key.
fn recipe_text(mirrors: &[String]) -> String {
    let mut text = format!("version {IMAGE_VERSION}\nsuite {SUITE}\nsize {DISK_SIZE}\n");
    let mut packages = PACKAGES.to_vec();
    packages.sort_unstable();
    text.push_str(&format!("packages {}\n", packages.join(",")));
    for m in mirrors {
        text.push_str(&format!("source {m}\n"));
    }
    for (path, mode, contents) in IMAGE_FILES {
        text.push_str(&format!("file {path} {mode:o}\n{contents}\n"));
    }
    for (link, target) in IMAGE_LINKS {
        text.push_str(&format!("link {link} {target}\n"));
    }
    text
}

/// The cached image directory (`disk.img`, `vmlinuz`, `initrd.img`), built when missing.
fn image(work: &Path, rebuild: bool) -> Result<PathBuf> {
    let sources = Mirrors::for_host(Path::new("/etc/apt")).sources(SUITE);
    let recipe = recipe_text(&sources);
    let hash = hex::encode(Sha256::digest(recipe.as_bytes()))[..16].to_owned();
    let dir = work.join(format!("image-{hash}"));
    if dir.join("disk.img").is_file() && !rebuild {
        eprintln!("vm-test: image {} (cached)", dir.display());
        return Ok(dir);
    }
    // Older images go: each is a few hundred MB.
    if let Ok(entries) = std::fs::read_dir(work) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Older images, and what a failed build left.
            if name.starts_with("image-") || name.starts_with(".image-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let temp = work.join(format!(".image-{hash}.tmp"));
    let _ = std::fs::remove_dir_all(&temp);
    std::fs::create_dir_all(&temp)?;
    let started = Instant::now();
    eprintln!("vm-test: building the Debian {SUITE} image with mmdebstrap (about a minute)");
    let tarball = temp.join("rootfs.tar");
    let log_path = temp.join("mmdebstrap.log");
    let log = std::fs::File::create(&log_path)?;
    let status = Command::new("mmdebstrap")
        .args(["--variant=apt", "--mode=root"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&tarball)
        .args(&sources)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("run mmdebstrap")?;
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        bail!(
            "mmdebstrap {status}:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let rootfs = temp.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    run_quiet(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "-xpf"])
            .arg(&tarball),
        "unpack the root filesystem",
    )?;
    std::fs::remove_file(&tarball)?;
    for (path, mode, contents) in IMAGE_FILES {
        let target = rootfs.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&target, contents).with_context(|| format!("write {path}"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))?;
    }
    for (link, target) in IMAGE_LINKS {
        let path = rootfs.join(link);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).with_context(|| format!("link {link}"))?;
    }
    std::fs::create_dir_all(rootfs.join("opt/lull-payload"))?;
    let boot = rootfs.join("boot");
    for (prefix, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let found = std::fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no /boot/{prefix}* in the image"))?;
        std::fs::copy(&found, temp.join(name))?;
    }
    run_quiet(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "lull-vm", "-d"])
            .arg(&rootfs)
            .arg(temp.join("disk.img"))
            .arg(DISK_SIZE),
        "make the disk image",
    )?;
    std::fs::remove_dir_all(&rootfs)?;
    std::fs::rename(&temp, &dir)?;
    eprintln!(
        "vm-test: image built in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(dir)
}

/// The payload disk: lull, the fixture images' layouts and the scenario; with a benchmark,
/// lull-bench, its zygote and its arguments.
fn payload(root: &Path, run_dir: &Path, bench: VmBench) -> Result<PathBuf> {
    let dir = run_dir.join("payload");
    std::fs::create_dir_all(dir.join("layouts"))?;
    std::fs::copy(root.join("target/debug/lull"), dir.join("lull")).context("copy lull")?;
    std::fs::write(dir.join("scenario.sh"), SCENARIO)?;
    for layout in [
        "fixtures/fixture-app",
        "fixtures/busybox",
        "base-images/python-3.11",
    ] {
        let from = root.join("target").join(layout);
        let name = from.file_name().context("a layout's name")?.to_owned();
        run_quiet(
            Command::new("cp")
                .arg("-a")
                .arg(&from)
                .arg(dir.join("layouts").join(name)),
            "copy an image layout",
        )?;
    }
    if bench != VmBench::None {
        let bench_dir = dir.join("bench");
        std::fs::create_dir_all(&bench_dir)?;
        for program in ["lull-bench", "lull-test-zygote"] {
            std::fs::copy(
                root.join("target/release").join(program),
                bench_dir.join(program),
            )
            .with_context(|| format!("copy {program}"))?;
        }
        let args = if bench == VmBench::Smoke {
            "--smoke"
        } else {
            ""
        };
        std::fs::write(bench_dir.join("args"), args)?;
    }
    let bytes = du_bytes(&dir)?;
    let size_mb = bytes / (1 << 20) * 5 / 4 + 64;
    let image = run_dir.join("payload.img");
    run_quiet(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "lull-payload", "-d"])
            .arg(&dir)
            .arg(&image)
            .arg(format!("{size_mb}M")),
        "make the payload disk",
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(image)
}

fn du_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            du_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    run_quiet(
        Command::new("cp").arg("--sparse=always").arg(from).arg(to),
        "copy the disk image",
    )
}

fn run_quiet(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().with_context(|| format!("{what}: spawn"))?;
    ensure!(
        output.status.success(),
        "{what}: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// What the boots printed.
#[derive(Debug, Default)]
struct Outcome {
    /// Each step's report, by (phase, step).
    steps: BTreeMap<(u64, String), Value>,
    /// Phases that said they ended.
    done: Vec<u64>,
    /// Boots seen by the firmware's banner (2: the first boot and the scenario's reboot).
    boots: usize,
    /// lull-bench's markdown, a line each.
    bench: Vec<String>,
    /// What the guest said of itself for the benchmark (kernel, crun).
    bench_info: Vec<String>,
    ending: String,
}

fn boot(
    image: &Path,
    disk: &Path,
    payload: &Path,
    accel: VmAccel,
    timeout: Duration,
    log_path: &Path,
) -> Result<Outcome> {
    let accel = match accel {
        VmAccel::Tcg => "tcg",
        VmAccel::Kvm => "kvm",
    };
    let drive =
        |path: &Path, extra: &str| format!("file={},format=raw,if=virtio{extra}", path.display());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel, "-m", "2048", "-smp", "2", "-nographic"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .args([
            "-append",
            // loglevel=3: kernel messages would interleave with the scenario's report lines.
            "console=ttyS0 root=/dev/vda rw panic=-1 loglevel=3 systemd.show_status=no",
        ])
        .args(["-drive", &drive(disk, "")])
        .args(["-drive", &drive(payload, ",readonly=on")])
        // User-mode networking, restricted: the guest has an uplink and a default route (as
        // a VM would) and cannot reach the host or anything beyond it.
        .args(["-nic", "user,restrict=on,model=virtio-net-pci"]);
    let mut outcome = Outcome::default();
    outcome.ending = crate::qemu::run(&mut qemu, timeout, log_path, |line| Ok(outcome.read(line)))?;
    Ok(outcome)
}

impl Outcome {
    /// Takes in one console line; an ending when the run must stop.
    fn read(&mut self, line: &str) -> Option<String> {
        // The firmware prints its banner at every boot (the kernel is quiet: loglevel=3).
        if line.contains("SeaBIOS (version") {
            self.boots += 1;
            if self.boots > 2 {
                return Some(
                    "the guest booted a third time (a panic or an unplanned reboot)".to_owned(),
                );
            }
        }
        if let Some(at) = line.find(BENCH_INFO) {
            self.bench_info
                .push(line[at + BENCH_INFO.len()..].trim().to_owned());
        } else if let Some(at) = line.find(BENCH) {
            self.bench
                .push(line[at + BENCH.len()..].trim_end().to_owned());
        }
        if let Some(at) = line.find(STEP) {
            let json = &line[at + STEP.len()..];
            if let Ok(value) = serde_json::from_str::<Value>(json.trim()) {
                let phase = value["phase"].as_u64().unwrap_or(0);
                let step = value["step"].as_str().unwrap_or("").to_owned();
                let ok = value["ok"].as_bool() == Some(true);
                eprintln!(
                    "vm-test: phase {phase} {step}: {}",
                    if ok { "ok" } else { "FAILED" }
                );
                self.steps.insert((phase, step), value);
            } else {
                eprintln!("vm-test: unreadable report: {json}");
            }
        }
        if let Some(at) = line.find(DONE) {
            let json = &line[at + DONE.len()..];
            if let Some(phase) = serde_json::from_str::<Value>(json.trim())
                .ok()
                .and_then(|v| v["phase"].as_u64())
            {
                self.done.push(phase);
            }
        }
        None
    }
}

/// Every expected step present and passed (the benchmark's too, when it ran), both phases
/// ended.
fn judge(outcome: &Outcome, bench: bool) -> Result<()> {
    let mut problems = Vec::new();
    let bench_step = (2, "bench");
    for (phase, step) in STEPS.iter().chain(bench.then_some(&bench_step)) {
        match outcome.steps.get(&(*phase, (*step).to_owned())) {
            None => problems.push(format!("phase {phase} {step}: not reported")),
            Some(v) if v["ok"].as_bool() != Some(true) => problems.push(format!(
                "phase {phase} {step}: {}",
                v["detail"].as_str().unwrap_or("")
            )),
            Some(_) => {}
        }
    }
    if outcome.boots != 2 {
        problems.push(format!(
            "{} boots seen, not 2 (the first and the scenario's reboot)",
            outcome.boots
        ));
    }
    for phase in [1, 2] {
        if !outcome.done.contains(&phase) {
            problems.push(format!("phase {phase} did not end ({})", outcome.ending));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

const DOC_BEGIN: &str = "<!-- bench vm: begin -->";
const DOC_END: &str = "<!-- bench vm: end -->";
/// The runtime suite's section, whose gate rows the VM's are set beside.
const RUNTIME_BEGIN: &str = "<!-- bench runtime: begin";
const RUNTIME_END: &str = "<!-- bench runtime: end -->";

/// The cells of a markdown table row (`| a | b |` → `["a", "b"]`).
fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_owned())
        .collect()
}

/// The VM section of docs/benchmarks.md: lull-bench's table from inside the VM, then its gate
/// rows beside the hybrid host's from the runtime suite's latest results.
fn vm_section(
    outcome: &Outcome,
    accel: VmAccel,
    host_doc: &str,
    commit: &str,
    date: &str,
) -> String {
    let (flag, accel) = match accel {
        VmAccel::Tcg => ("", "TCG (no KVM)"),
        VmAccel::Kvm => (" --accel kvm", "KVM"),
    };
    let mut out = format!(
        "{DOC_BEGIN}\n\n### Latest results (inside the VM)\n\n\
         - Command: `sudo -E cargo xtask vm-test --bench full{flag}` (commit {commit}, {date})\n\
         - Machine: a qemu guest under {accel}, 2 vCPUs, 2 GiB, Debian {SUITE}, cgroup v2; {}\n\n",
        outcome.bench_info.join("; ")
    );
    out.push_str(outcome.bench.join("\n").trim());
    out.push_str("\n\n");
    let host_rows: Vec<Vec<String>> = host_doc
        .find(RUNTIME_BEGIN)
        .and_then(|b| host_doc[b..].find(RUNTIME_END).map(|e| &host_doc[b..b + e]))
        .map(|section| {
            section
                .lines()
                .filter(|l| l.starts_with("| gate"))
                .map(cells)
                .collect()
        })
        .unwrap_or_default();
    let vm_rows: Vec<Vec<String>> = outcome
        .bench
        .iter()
        .filter(|l| l.starts_with("| gate"))
        .map(|l| cells(l))
        .collect();
    if !vm_rows.is_empty() {
        out.push_str(
            "The gate on cgroup v2 (`cpu.max`, in the VM) beside the hybrid host (`cpu.cfs_quota_us`, \
             the runtime suite's latest results above). TCG emulates every guest instruction, so \
             the VM's latencies are upper bounds, not the kernel's; the throttle factor is a \
             ratio and carries over.\n\n\
             | measurement | hybrid host (v1 cpu) | VM (v2 cpu.max) |\n|---|---|---|\n",
        );
        for row in vm_rows {
            let host = host_rows
                .iter()
                .find(|h| h.first() == row.first())
                .map(|h| measured(h))
                .unwrap_or_else(|| "-".to_owned());
            out.push_str(&format!("| {} | {host} | {} |\n", row[0], measured(&row)));
        }
        out.push('\n');
    }
    out.push_str(DOC_END);
    out.push('\n');
    out
}

/// A results row's measured value, with its ratio when it has one (`| name | target |
/// measured | baseline | ratio | pass |`).
fn measured(row: &[String]) -> String {
    let value = row.get(2).cloned().unwrap_or_else(|| "-".to_owned());
    match row.get(4).filter(|r| r.as_str() != "-" && !r.is_empty()) {
        Some(ratio) => format!("{value} ({ratio})"),
        None => value,
    }
}

fn write_bench_doc(root: &Path, outcome: &Outcome, accel: VmAccel) -> Result<()> {
    let doc = root.join("docs/benchmarks.md");
    let existing = std::fs::read_to_string(&doc).unwrap_or_default();
    let commit = crate::bench::first_line(root, "git", &["rev-parse", "--short", "HEAD"]);
    let date = crate::bench::first_line(root, "date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let section = vm_section(outcome, accel, &existing, &commit, &date);
    crate::bench::update_doc(&doc, DOC_BEGIN, DOC_END, &section)?;
    eprintln!("vm-test: results written to docs/benchmarks.md");
    Ok(())
}

fn print_table(outcome: &Outcome, elapsed: Duration) {
    println!(
        "\n{:<6} {:<17} {:<7} {:>8}  detail",
        "phase", "step", "result", "ms"
    );
    for ((phase, step), v) in &outcome.steps {
        println!(
            "{:<6} {:<17} {:<7} {:>8}  {}",
            phase,
            step,
            if v["ok"].as_bool() == Some(true) {
                "ok"
            } else {
                "FAILED"
            },
            v["ms"].as_u64().unwrap_or(0),
            v["detail"].as_str().unwrap_or("")
        );
    }
    println!(
        "boots: {}; {}; {:.0} s in all\n",
        outcome.boots,
        outcome.ending,
        elapsed.as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(phase: u64, name: &str, ok: bool) -> ((u64, String), Value) {
        (
            (phase, name.to_owned()),
            serde_json::json!({"phase": phase, "step": name, "ok": ok, "ms": 1, "detail": "d"}),
        )
    }

    #[test]
    fn judge_wants_every_step_passed_and_both_phases_ended() {
        let mut outcome = Outcome {
            steps: STEPS.iter().map(|(p, s)| step(*p, s, true)).collect(),
            done: vec![1, 2],
            boots: 2,
            ending: "qemu exited".into(),
            ..Outcome::default()
        };
        judge(&outcome, false).unwrap();
        outcome.boots = 3;
        let e = judge(&outcome, false).unwrap_err().to_string();
        assert!(e.contains("3 boots seen"), "{e}");
        outcome.boots = 2;
        let e = judge(&outcome, true).unwrap_err().to_string();
        assert!(e.contains("phase 2 bench: not reported"), "{e}");
        outcome
            .steps
            .insert(step(1, "gate", false).0, step(1, "gate", false).1);
        outcome.steps.remove(&(2, "uninstall".to_owned()));
        outcome.done = vec![1];
        let e = judge(&outcome, false).unwrap_err().to_string();
        assert!(e.contains("phase 1 gate: d"), "{e}");
        assert!(e.contains("phase 2 uninstall: not reported"), "{e}");
        assert!(e.contains("phase 2 did not end"), "{e}");
    }

    #[test]
    fn the_vm_section_sets_the_gate_beside_the_host() {
        let outcome = Outcome {
            bench: vec![
                "| measurement | target | measured | baseline | ratio | pass |".into(),
                "|---|---|---|---|---|---|".into(),
                "| gate: throttle factor | >= 300x | 0.099% | 100.3% | 1012x | yes |".into(),
                "| gate: odd row |".into(),
            ],
            bench_info: vec!["kernel 6.12".into()],
            ..Outcome::default()
        };
        let host = "x\n<!-- bench runtime: begin (written) -->\n\
                    | gate: throttle factor | >= 300x | 0.109% | 100.0% | 917x | yes |\n\
                    <!-- bench runtime: end -->\n";
        let text = vm_section(&outcome, VmAccel::Tcg, host, "abc", "today");
        assert!(text.starts_with(DOC_BEGIN) && text.trim_end().ends_with(DOC_END));
        assert!(
            text.contains("| gate: throttle factor | 0.109% (917x) | 0.099% (1012x) |"),
            "{text}"
        );
        assert!(text.contains("| gate: odd row | - | - |"), "{text}");
        assert!(text.contains("under TCG") && text.contains("kernel 6.12"));
    }

    #[test]
    fn the_recipe_hash_follows_the_recipe() {
        let a = recipe_text(&["deb http://a trixie main".into()]);
        let b = recipe_text(&["deb http://b trixie main".into()]);
        assert_ne!(a, b);
        assert!(a.contains("lull-vm-scenario.service"));
    }

    #[test]
    fn the_scenario_reports_every_step_the_judge_wants() {
        for (_, step) in STEPS.iter().chain([&(2, "bench")]) {
            assert!(
                SCENARIO.contains(&format!("report {step} ")),
                "scenario.sh never reports {step}"
            );
        }
    }
}
