//! `cargo xtask bench build [--smoke]`: source builds end to end. Checks that buildah (the
//! peer) is installed and that lull's base images are in the local registry, builds `lull` and
//! the build benchmark driver (`lull-bench-build`, in the lull-tests crate) in release mode,
//! runs the driver as root against that `lull` and prints its table: cold, warm (code change)
//! and no-op builds of a Flask and an Express app, lull from source to serving through its
//! proxy against `buildah bud` of the equivalent Dockerfile, and the Flask app's cold start
//! with scale to zero. The full run also writes the results into `docs/benchmarks.md` between
//! the build markers, leaving every other part of the doc alone. `--smoke` (what CI runs) does
//! one round (one cold, one warm and one no-op build per app and tool; three cold starts) and
//! fails only when the harness does.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{Section, first_line, results_section, update_doc};
use crate::fixtures;

const BEGIN: &str = "<!-- bench build: begin (written by `cargo xtask bench build`) -->";
const END: &str = "<!-- bench build: end -->";

/// The base images the apps build on, in the local registry (`cargo xtask base-images`).
const BASE_IMAGES: [(&str, &str); 2] = [("lull/base/python", "3.11"), ("lull/base/node", "18")];

pub fn run(smoke: bool) -> Result<()> {
    if !crate::is_root() {
        bail!(
            "the build benchmarks need root (the daemon and buildah make namespaces, cgroups, mounts): run `sudo -E cargo xtask bench build`"
        );
    }
    let root = fixtures::workspace_root();
    let buildah = first_line(&root, "buildah", &["--version"]);
    if buildah == "unknown" {
        bail!(
            "buildah not found: it is the peer of this benchmark (`apt-get install buildah`; `scripts/setup-host` installs it)"
        );
    }
    let registry = std::env::var("LULL_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into());
    for (name, tag) in BASE_IMAGES {
        let url = format!("http://{registry}/v2/{name}/manifests/{tag}");
        let found = Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", "-I"])
            .args([
                "-H",
                "Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
            ])
            .arg(&url)
            .status()
            .context("run curl")?;
        if !found.success() {
            bail!(
                "{registry}/{name}:{tag} is not in the local registry: run `sudo cargo xtask base-images` first"
            );
        }
    }

    eprintln!("==> building lull and lull-bench-build (release)");
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
            "lull-bench-build",
        ])
        .current_dir(&root)
        .status()
        .context("run cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p lull -p lull-tests: {status}");
    }

    let release = root.join("target/release");
    let results = root.join("target/bench/build.md");
    if let Some(dir) = results.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = fs::remove_file(&results);
    let mut command = Command::new(release.join("lull-bench-build"));
    command
        .arg("--lull")
        .arg(release.join("lull"))
        .arg("--markdown")
        .arg(&results);
    if smoke {
        command.arg("--smoke");
    }
    eprintln!(
        "==> lull-bench-build{}",
        if smoke { " --smoke" } else { "" }
    );
    let status = command.status().context("run lull-bench-build")?;
    if !status.success() {
        bail!("lull-bench-build: {status}");
    }
    if smoke {
        return Ok(());
    }

    let table = fs::read_to_string(&results)
        .with_context(|| format!("read {} (written by lull-bench-build)", results.display()))?;
    let section = Section {
        begin: BEGIN,
        end: END,
        heading: "### Latest results (build)",
        command: "sudo -E cargo xtask bench build",
        peers: format!(
            "{buildah} (overlay storage driver, runc); Cloud Run's published cold start"
        ),
    };
    let doc = root.join("docs/benchmarks.md");
    update_doc(&doc, BEGIN, END, &results_section(&root, &section, &table))?;
    eprintln!("==> results written to docs/benchmarks.md");
    Ok(())
}
