//! `cargo xtask`: lull's build, test and VM automation, written in Rust so it runs wherever
//! cargo does.

mod fixtures;
mod oci;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "lull's build, test and VM automation")]
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fixtures(args) => fixtures::run(&args),
    }
}
