//! `lull install` and `lull uninstall`: lull as a systemd service (see `lull_systemd::install`).

use std::process::ExitCode;

use clap::Args;
use lull_systemd::install::{InstallPlan, RealSystem, install, uninstall};
use lull_systemd::unit::{CANNOT_USE, render};

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Print the unit and the hardening options lull cannot use (and why), change nothing.
    #[arg(long)]
    pub explain: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Also remove the state (/var/lib/lull), the settings (/etc/lull), the installed binary
    /// and the `lull` group.
    #[arg(long)]
    pub purge: bool,
}

fn plan() -> Result<InstallPlan, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the running executable: {e}"))?;
    Ok(InstallPlan::standard(exe))
}

pub fn run_install(args: &InstallArgs) -> ExitCode {
    let plan = match plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lull install: {e}");
            return ExitCode::from(1);
        }
    };
    if args.explain {
        print!("{}", render(&plan.unit));
        println!("\n# Hardening lull leaves off, and why:");
        for (option, why) in CANNOT_USE {
            println!("#   {option}: {why}");
        }
        return ExitCode::SUCCESS;
    }
    match install(&RealSystem, &plan) {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
            println!(
                "`systemctl status lull` shows what the daemon is doing; `journalctl -u lull` its log"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lull install: {e}");
            ExitCode::from(1)
        }
    }
}

pub fn run_uninstall(args: &UninstallArgs) -> ExitCode {
    let plan = match plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lull uninstall: {e}");
            return ExitCode::from(1);
        }
    };
    match uninstall(&RealSystem, &plan, args.purge) {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lull uninstall: {e}");
            ExitCode::from(1)
        }
    }
}
