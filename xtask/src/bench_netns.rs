//! `cargo xtask bench netns [--smoke]`: builds the network benchmark driver
//! (`lull-bench-netns`, in the lull-tests crate) and the fixture app in release mode, runs the
//! driver as root and prints its table. The full run also writes the results into
//! `docs/benchmarks.md` between the netns markers, leaving every other part of the doc alone.
//! `--smoke` (what CI runs) does few iterations and fails only when the harness does.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{Section, first_line, results_section, update_doc};
use crate::fixtures;

const BEGIN: &str = "<!-- bench netns: begin (written by `cargo xtask bench netns`) -->";
const END: &str = "<!-- bench netns: end -->";

pub fn run(smoke: bool) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the network benchmarks need root (namespaces, links): run `sudo -E cargo xtask bench netns`"
        );
    }
    let root = fixtures::workspace_root();

    eprintln!("==> building lull-bench-netns and lull-fixture-app (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "lull-tests",
            "--bin",
            "lull-bench-netns",
            "-p",
            "lull-fixture-app",
            "--bin",
            "lull-fixture-app",
        ])
        .current_dir(&root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p lull-tests -p lull-fixture-app: {status}");
    }

    let release = root.join("target/release");
    let results = root.join("target/bench/netns.md");
    if let Some(dir) = results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = fs::remove_file(&results);
    let mut command = Command::new(release.join("lull-bench-netns"));
    command
        .arg("--app")
        .arg(release.join("lull-fixture-app"))
        .arg("--markdown")
        .arg(&results);
    if smoke {
        command.arg("--smoke");
    }
    eprintln!(
        "==> lull-bench-netns{}",
        if smoke { " --smoke" } else { "" }
    );
    let status = command.status().context("run lull-bench-netns")?;
    if !status.success() {
        bail!("lull-bench-netns: {status}");
    }
    if smoke {
        return Ok(());
    }

    let table = fs::read_to_string(&results)
        .with_context(|| format!("read {} (written by lull-bench-netns)", results.display()))?;
    let section = Section {
        begin: BEGIN,
        end: END,
        heading: "### Latest results (netns)",
        command: "sudo -E cargo xtask bench netns",
        peers: first_line(&root, "ip", &["-V"]),
    };
    let doc = root.join("docs/benchmarks.md");
    update_doc(&doc, BEGIN, END, &results_section(&root, &section, &table))?;
    eprintln!("==> results written to docs/benchmarks.md");
    Ok(())
}
