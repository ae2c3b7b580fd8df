//! `cargo xtask bench autoscale [--smoke]`: makes sure the fixture images are in the local
//! registry, builds `lull` and the autoscale benchmark driver (`lull-bench-autoscale`, in the
//! lull-tests crate) in release mode, runs the driver as root against that `lull` and prints
//! its table. The full run also writes the results into `docs/benchmarks.md` between the
//! autoscale markers, leaving every other part of the doc alone. `--smoke` (what CI runs, about
//! two minutes) measures the reaction once, the cold start three times and density with 50
//! instances only, and fails only when the harness does.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{Section, results_section, update_doc};
use crate::fixtures::{self, FixturesArgs};

const BEGIN: &str = "<!-- bench autoscale: begin (written by `cargo xtask bench autoscale`) -->";
const END: &str = "<!-- bench autoscale: end -->";

pub fn run(smoke: bool) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the autoscale benchmarks need root (the daemon makes namespaces, cgroups, mounts): run `sudo -E cargo xtask bench autoscale`"
        );
    }
    let root = fixtures::workspace_root();

    eprintln!("==> fixture images");
    fixtures::run(&FixturesArgs { bulk: false })?;

    eprintln!("==> building lull and lull-bench-autoscale (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "lull",
            "--bin",
            "lull",
            "-p",
            "lull-tests",
            "--bin",
            "lull-bench-autoscale",
        ])
        .current_dir(&root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p lull -p lull-tests: {status}");
    }

    let release = root.join("target/release");
    let results = root.join("target/bench/autoscale.md");
    if let Some(dir) = results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = fs::remove_file(&results);
    let mut command = Command::new(release.join("lull-bench-autoscale"));
    command
        .arg("--lull")
        .arg(release.join("lull"))
        .arg("--markdown")
        .arg(&results);
    if smoke {
        command.arg("--smoke");
    }
    eprintln!(
        "==> lull-bench-autoscale{}",
        if smoke { " --smoke" } else { "" }
    );
    let status = command.status().context("run lull-bench-autoscale")?;
    if !status.success() {
        bail!("lull-bench-autoscale: {status}");
    }
    if smoke {
        return Ok(());
    }

    let table = fs::read_to_string(&results).with_context(|| {
        format!(
            "read {} (written by lull-bench-autoscale)",
            results.display()
        )
    })?;
    let section = Section {
        begin: BEGIN,
        end: END,
        heading: "### Latest results (autoscale)",
        command: "sudo -E cargo xtask bench autoscale",
        peers: "AWS App Runner's published figures (no side-by-side run is possible)".to_owned(),
    };
    let doc = root.join("docs/benchmarks.md");
    update_doc(&doc, BEGIN, END, &results_section(&root, &section, &table))?;
    eprintln!("==> results written to docs/benchmarks.md");
    Ok(())
}
