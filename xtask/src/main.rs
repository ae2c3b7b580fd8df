//! `cargo xtask`: lull's build, test and VM automation, written in Rust so it runs wherever
//! cargo does.

mod base_images;
mod bench;
mod bench_autoscale;
mod bench_build;
mod bench_lifecycle;
mod bench_netns;
mod bench_proxy;
mod bench_tls;
mod demo;
mod fixtures;
mod oci;
mod qemu;
mod registry;
mod test_cmd;
mod vm_check;
mod vm_test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "lull's build, test and VM automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per subcommand, each implemented in its own module.
#[derive(Debug, Subcommand)]
enum Command {
    /// Build the static fixture app, write its OCI images under target/fixtures and push them
    /// to the test registry ($LULL_REGISTRY, default 127.0.0.1:5000) when it answers
    Fixtures(fixtures::FixturesArgs),
    /// Build the managed-runtime base images (python 3.11, node 18, node 20) from Debian
    /// packages with mmdebstrap into OCI layouts under target/base-images and push them to the
    /// test registry as lull/base/python:3.11, lull/base/node:18 and lull/base/node:20
    BaseImages(base_images::BaseImagesArgs),
    /// Run the whole test suite in stages (lint, unit, fixtures, privileged, e2e, vm, bench),
    /// timing each, within CI's time budget
    Test(test_cmd::TestArgs),
    /// lull's main job end to end: build, push the fixture image, run it and show it answering
    /// HTTP
    Demo,
    /// Boot Debian's kernel under qemu with cgroup v2 and check the CPU gate there
    VmCheck(vm_check::VmCheckOpts),
    /// lull installed as a systemd service on a Debian VM (cgroup v2) under qemu: install,
    /// deploy, the gate, a restart under load, a watchdog kill, a reboot, uninstall (as root)
    VmTest(vm_test::VmTestArgs),
    /// Run a benchmark suite (as root) and print target, measured, ratio and pass; the full
    /// run writes docs/benchmarks.md
    Bench(bench::BenchArgs),
}

/// Whether this process runs as root (the privileged suites and the VM test need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fixtures(args) => fixtures::run(&args),
        Command::BaseImages(args) => base_images::run(&args),
        Command::Test(args) => test_cmd::run(&args),
        Command::Demo => demo::run(),
        Command::VmCheck(opts) => vm_check::run(opts),
        Command::VmTest(args) => vm_test::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line; no backtrace, whatever RUST_BACKTRACE says.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
