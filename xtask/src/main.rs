//! `cargo xtask`: lull's build, test and VM automation, written in Rust so it runs wherever
//! cargo does.

mod fixtures;
mod oci;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fixtures(args) => fixtures::run(&args),
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
