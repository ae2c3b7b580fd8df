//! `cargo xtask demo`: lull's main job, shown end to end on this machine. Builds lull and the
//! fixture image, pushes the image to the local registry, then `lull up IMAGE --check /` starts
//! a daemon on lull's embedded defaults, deploys the image as a service and shows it answering
//! HTTP through lull's proxy (then deletes the service and takes the network down).

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::fixtures::{self, FixturesArgs};

/// The image the demo runs.
pub const DEMO_IMAGE: &str = "127.0.0.1:5000/lull/fixture-app:latest";

pub fn run() -> Result<()> {
    let root = fixtures::workspace_root();
    eprintln!("==> building lull (release)");
    let status = Command::new("cargo")
        .args(["build", "--release", "--package", "lull"])
        .current_dir(&root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release --package lull: {status}");
    }
    eprintln!("==> building and pushing the fixture image");
    fixtures::run(&FixturesArgs { bulk: false })?;

    // lull's embedded defaults serve on :80; a machine where something else holds it (a web
    // server the benchmarks installed, say) gets :8080 instead, said out loud.
    let mut up = vec!["up", DEMO_IMAGE, "--check", "/"];
    if std::net::TcpListener::bind(("0.0.0.0", 80)).is_err() {
        eprintln!("note: port 80 is taken on this machine; lull serves on :8080 instead");
        up.extend(["--http", ":8080"]);
    }
    eprintln!("==> lull {}", up.join(" "));
    let lull = root.join("target/release/lull");
    let status = Command::new(&lull)
        .args(&up)
        .status()
        .with_context(|| format!("run {}", lull.display()))?;
    let down = Command::new(&lull)
        .args(["network", "down"])
        .status()
        .with_context(|| format!("run {}", lull.display()))?;
    if !status.success() {
        bail!("lull up: {status}");
    }
    if !down.success() {
        bail!("lull network down: {down}");
    }
    Ok(())
}
