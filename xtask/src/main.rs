mod vm_check;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a cgroup-v2 VM and check the CPU gate on a real kernel.
    VmCheck(vm_check::VmCheckOpts),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::VmCheck(opts) => vm_check::run(opts),
    }
}
