//! `cargo xtask bench proxy [--smoke]`: builds the proxy benchmark driver
//! (`lull-bench-proxy`, in the lull-tests crate) and the fixture app in release mode, runs the
//! driver as root and prints its table. The full run also writes the results into
//! `docs/benchmarks.md` between the proxy markers, leaving every other part of the doc alone.
//! `--smoke` (what CI runs) does few iterations and fails only when the harness does.
//!
//! The peers (nginx, haproxy) and the load generators (wrk, h2load) are Debian packages that
//! `scripts/setup-host` installs; the driver starts the peers itself, from configs in a scratch
//! dir, and never touches the system's own nginx or haproxy setup.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{Section, results_section, update_doc};
use crate::fixtures;

const BEGIN: &str = "<!-- bench proxy: begin (written by `cargo xtask bench proxy`) -->";
const END: &str = "<!-- bench proxy: end -->";

pub fn run(smoke: bool) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the proxy benchmarks need root (cgroups, peers as root): run `sudo -E cargo xtask bench proxy`"
        );
    }
    let root = fixtures::workspace_root();

    eprintln!("==> building lull-bench-proxy and lull-fixture-app (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "lull-tests",
            "--bin",
            "lull-bench-proxy",
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
    let results = root.join("target/bench/proxy.md");
    if let Some(dir) = results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = fs::remove_file(&results);
    let mut command = Command::new(release.join("lull-bench-proxy"));
    command
        .arg("--app")
        .arg(release.join("lull-fixture-app"))
        .arg("--markdown")
        .arg(&results);
    if smoke {
        command.arg("--smoke");
    }
    eprintln!(
        "==> lull-bench-proxy{}",
        if smoke { " --smoke" } else { "" }
    );
    let status = command.status().context("run lull-bench-proxy")?;
    if !status.success() {
        bail!("lull-bench-proxy: {status}");
    }
    if smoke {
        return Ok(());
    }

    let table = fs::read_to_string(&results)
        .with_context(|| format!("read {} (written by lull-bench-proxy)", results.display()))?;
    let section = Section {
        begin: BEGIN,
        end: END,
        heading: "### Latest results (proxy)",
        command: "sudo -E cargo xtask bench proxy",
        peers: format!(
            "{}; {}; {}; {}",
            version_line("nginx", &["-v"]),
            version_line("haproxy", &["-v"]),
            version_line("wrk", &["-v"]),
            version_line("h2load", &["--version"]),
        ),
    };
    let doc = root.join("docs/benchmarks.md");
    update_doc(&doc, BEGIN, END, &results_section(&root, &section, &table))?;
    eprintln!("==> results written to docs/benchmarks.md");
    Ok(())
}

/// The first line `program args` prints on stdout, or else on stderr (nginx prints its
/// version there), whatever its exit status (`wrk -v` exits 1), or `unknown`.
pub fn version_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let first = |bytes: &[u8]| {
                String::from_utf8_lossy(bytes)
                    .lines()
                    .next()
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
            };
            first(&o.stdout).or_else(|| first(&o.stderr))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
