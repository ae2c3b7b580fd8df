//! `cargo xtask demo`: lull's main job, shown end to end on this machine. Builds lull and the
//! fixture image, pushes the image to the local registry, then `lull run --check /` pulls it,
//! unpacks it, starts it as an isolated instance and shows it answering HTTP.

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

    eprintln!("==> lull run {DEMO_IMAGE} --check /");
    let lull = root.join("target/release/lull");
    let status = Command::new(&lull)
        .args(["run", DEMO_IMAGE, "--pull", "always", "--check", "/"])
        .status()
        .with_context(|| format!("run {}", lull.display()))?;
    // Take the instance network (bridge `lull0`, table `inet lull`) down again: the demo leaves
    // the host as it found it, apart from IP forwarding, which lull switches on and says so.
    let down = Command::new(&lull)
        .args(["network", "down"])
        .status()
        .with_context(|| format!("run {}", lull.display()))?;
    if !status.success() {
        bail!("lull run: {status}");
    }
    if !down.success() {
        bail!("lull network down: {down}");
    }
    Ok(())
}
