//! `cargo xtask test`: the whole test suite, in stages, each timed, under CI's time budget.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// CI stops at 90 minutes; stop starting stages past this point so the run ends with a clear
/// message rather than being killed.
const BUDGET: Duration = Duration::from_secs(80 * 60);

#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// Run only the named stages (comma separated): lint, unit, fixtures, base-images, privileged, e2e,
    /// vm, vm-systemd, bench.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

struct Stage {
    name: &'static str,
    what: &'static str,
    needs_root: bool,
    commands: Vec<Vec<String>>,
}

fn cargo(args: &[&str]) -> Vec<String> {
    std::iter::once("cargo")
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

fn stages() -> Vec<Stage> {
    vec![
        Stage {
            name: "lint",
            what: "cargo fmt --check and clippy -D warnings",
            needs_root: false,
            commands: vec![
                cargo(&["fmt", "--all", "--", "--check"]),
                cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
            ],
        },
        Stage {
            name: "unit",
            what: "unit and fake-backed tests (no host changes), the gate's loom model check",
            needs_root: false,
            commands: vec![
                cargo(&["test", "--workspace", "--lib", "--bins"]),
                // The proxy's CPU gate, model-checked with loom over every interleaving (its own
                // target dir: the cfg changes every crate's build).
                [
                    "env",
                    "RUSTFLAGS=--cfg lull_loom",
                    "CARGO_TARGET_DIR=target/loom",
                    "cargo",
                    "test",
                    "-p",
                    "lull-proxy",
                    "--release",
                    "--lib",
                    "gate",
                ]
                .map(str::to_owned)
                .to_vec(),
            ],
        },
        Stage {
            name: "fixtures",
            what: "fixture images built and pushed to the local registry",
            needs_root: false,
            commands: vec![cargo(&["xtask", "fixtures"])],
        },
        Stage {
            name: "base-images",
            what: "python and node base images built from Debian packages and pushed to the local registry",
            // mmdebstrap's root mode (chroot, mounts). Cold (a fresh clone, as in CI) about four
            // minutes, the three images built in parallel; cached, well under a second.
            needs_root: true,
            commands: vec![cargo(&["xtask", "base-images"])],
        },
        Stage {
            name: "privileged",
            what: "privileged integration tests (namespaces, cgroups, mounts, real registry)",
            needs_root: true,
            commands: vec![cargo(&["test", "--workspace", "--test", "*"])],
        },
        Stage {
            name: "e2e",
            what: "end to end: the README's main-job command",
            needs_root: true,
            commands: vec![cargo(&["xtask", "demo"])],
        },
        Stage {
            name: "vm",
            what: "the cgroup-v2 path on a real kernel under qemu",
            needs_root: false,
            commands: vec![cargo(&["xtask", "vm-check"])],
        },
        Stage {
            name: "vm-systemd",
            what: "lull installed as a systemd service on a Debian VM (cgroup v2): install, deploy, \
                   gate, restart under load, watchdog kill, reboot, uninstall",
            // mmdebstrap's root mode and mkfs.ext4 -d keeping owners. Cold about a minute for
            // the image, then about four minutes of two boots under TCG.
            needs_root: true,
            commands: vec![cargo(&["xtask", "vm-test"])],
        },
        Stage {
            name: "bench",
            what: "benchmark smoke runs (correctness of the harness, not speed)",
            needs_root: true,
            commands: vec![
                cargo(&["xtask", "bench", "runtime", "--smoke"]),
                cargo(&["xtask", "bench", "netns", "--smoke"]),
                cargo(&["xtask", "bench", "proxy", "--smoke"]),
                cargo(&["xtask", "bench", "tls", "--smoke"]),
                cargo(&["xtask", "bench", "lifecycle", "--smoke"]),
                cargo(&["xtask", "bench", "autoscale", "--smoke"]),
                cargo(&["xtask", "bench", "build", "--smoke"]),
            ],
        },
    ]
}

pub fn run(args: &TestArgs) -> Result<()> {
    let all = stages();
    for name in &args.only {
        if !all.iter().any(|s| s.name == name) {
            bail!(
                "unknown stage {name:?} in --only (stages: {})",
                all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let selected: Vec<&Stage> = all
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name))
        .collect();
    let root = crate::is_root();
    if let Some(stage) = selected.iter().find(|s| s.needs_root && !root) {
        bail!(
            "stage {:?} needs root (namespaces, cgroups, mounts): run `sudo -E cargo xtask test` or pick stages with --only",
            stage.name
        );
    }

    let started = Instant::now();
    let mut report = Vec::new();
    for stage in selected {
        if started.elapsed() > BUDGET {
            print_report(&report);
            bail!(
                "stopping before stage {:?}: {} elapsed, over the {}-minute budget that keeps CI under its 90-minute limit",
                stage.name,
                fmt_duration(started.elapsed()),
                BUDGET.as_secs() / 60
            );
        }
        eprintln!("\n==> stage {}: {}", stage.name, stage.what);
        let stage_started = Instant::now();
        for command in &stage.commands {
            eprintln!("    $ {}", command.join(" "));
            let status = run_within(command, started + BUDGET, stage.name)?;
            if !status.success() {
                report.push((stage.name, stage_started.elapsed(), false));
                print_report(&report);
                bail!(
                    "stage {:?} failed: `{}` {status}",
                    stage.name,
                    command.join(" ")
                );
            }
        }
        report.push((stage.name, stage_started.elapsed(), true));
        eprintln!(
            "<== stage {} passed in {}",
            stage.name,
            fmt_duration(stage_started.elapsed())
        );
    }
    print_report(&report);
    eprintln!("all stages passed in {}", fmt_duration(started.elapsed()));
    Ok(())
}

/// Runs `command` in its own process group; kills the whole group if it is still running at
/// `deadline`, so CI's hard limit is never what ends the run.
fn run_within(
    command: &[String],
    deadline: Instant,
    stage: &str,
) -> Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .process_group(0)
        .spawn()
        .with_context(|| format!("run {}", command[0]))?;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("wait for {}", command[0]))?
        {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            // SAFETY: kill takes plain integers; a negative pid names the child's process group.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!(
                "stage {stage:?} cut at the {}-minute budget that keeps CI under its 90-minute limit (`{}` killed)",
                BUDGET.as_secs() / 60,
                command.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_report(report: &[(&str, Duration, bool)]) {
    eprintln!("\nstage        duration   result");
    for (name, took, ok) in report {
        eprintln!(
            "{name:<12} {:>9}   {}",
            fmt_duration(*took),
            if *ok { "passed" } else { "FAILED" }
        );
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
