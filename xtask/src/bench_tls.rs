//! `cargo xtask bench tls [--smoke]`: builds the TLS benchmark driver (`lull-bench-tls`, in the
//! lull-tests crate) and the fixture app in release mode, runs the driver as root and prints its
//! table: server CPU per full and per resumed TLS 1.3 handshake (P-256 and RSA-2048
//! certificates) and HTTPS req/s on keep-alive connections (h1, h2), lull against nginx and
//! haproxy terminating TLS with the same certificate. The full run also writes the results into
//! `docs/benchmarks.md` between the TLS markers, leaving every other part of the doc alone.
//! `--smoke` (what CI runs) does few iterations and fails only when the harness does.
//!
//! The peers (nginx, haproxy), the load generator (h2load) and `openssl` (which makes the
//! certificates) are Debian packages that `scripts/setup-host` installs; the driver starts the
//! peers itself, from configs in a scratch dir, and never touches the system's own setup.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{Section, results_section, update_doc};
use crate::bench_proxy::version_line;
use crate::fixtures;

const BEGIN: &str = "<!-- bench tls: begin (written by `cargo xtask bench tls`) -->";
const END: &str = "<!-- bench tls: end -->";

pub fn run(smoke: bool) -> Result<()> {
    if !crate::is_root() {
        bail!("the TLS benchmarks need root (peers as root): run `sudo -E cargo xtask bench tls`");
    }
    let root = fixtures::workspace_root();

    eprintln!("==> building lull-bench-tls and lull-fixture-app (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "lull-tests",
            "--bin",
            "lull-bench-tls",
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

    // Where cargo put them: CARGO_TARGET_DIR (relative to the workspace) or `target`.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let release = target.join("release");
    let results = target.join("bench/tls.md");
    if let Some(dir) = results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = fs::remove_file(&results);
    let mut command = Command::new(release.join("lull-bench-tls"));
    command
        .arg("--app")
        .arg(release.join("lull-fixture-app"))
        .arg("--markdown")
        .arg(&results);
    if smoke {
        command.arg("--smoke");
    }
    eprintln!("==> lull-bench-tls{}", if smoke { " --smoke" } else { "" });
    let status = command.status().context("run lull-bench-tls")?;
    if !status.success() {
        bail!("lull-bench-tls: {status}");
    }
    if smoke {
        return Ok(());
    }

    let table = fs::read_to_string(&results)
        .with_context(|| format!("read {} (written by lull-bench-tls)", results.display()))?;
    let section = Section {
        begin: BEGIN,
        end: END,
        heading: "### Latest results (TLS)",
        command: "sudo -E cargo xtask bench tls",
        peers: format!(
            "{}; {}; {}; {}",
            version_line("nginx", &["-v"]),
            version_line("haproxy", &["-v"]),
            version_line("openssl", &["version"]),
            version_line("h2load", &["--version"]),
        ),
    };
    let doc = root.join("docs/benchmarks.md");
    update_doc(&doc, BEGIN, END, &results_section(&root, &section, &table))?;
    eprintln!("==> results written to docs/benchmarks.md");
    Ok(())
}
