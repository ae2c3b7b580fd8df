//! `lull install` and `lull uninstall`: lull as a systemd service (see `lull_systemd::install`).

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Args;
use lull_daemon::config::DaemonConfig;
use lull_runtime::host::{DEFAULT_CGROUP_PARENT, Runtime, RuntimeConfig};
use lull_runtime::instance::Recovered;
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
    // Asked before the unit goes: where its instances' cgroups are.
    let unit_cgroup = Command::new("systemctl")
        .args(["show", "-p", "ControlGroup", "--value", "lull.service"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|cg| cg.starts_with('/'));
    let settings = plan.unit.config.clone();
    let handle = tokio::runtime::Handle::current();
    let mut cleanup = || {
        tokio::task::block_in_place(|| {
            handle.block_on(remove_instances(&settings, unit_cgroup.as_deref()))
        })
        .map_err(|e| format!("remove the instances the daemon left running: {e:#}"))
    };
    match uninstall(&RealSystem, &plan, args.purge, &mut cleanup) {
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

/// What a stopped daemon leaves on purpose for the next one to adopt: its instances (under
/// `<unit cgroup>/instances` on cgroup v2 with delegation, `/lull` otherwise) and the instance
/// network. Removes them all, with the settings' data and run directories and network names.
async fn remove_instances(
    settings: &Path,
    unit_cgroup: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let config = DaemonConfig::load(settings)?;
    let delegated = unit_cgroup
        .map(|cg| format!("{}/instances", cg.trim_end_matches('/')))
        .filter(|parent| cgroup_dir(parent).is_dir());
    let mut runtime_config = RuntimeConfig::new(&config.data_dir, &config.run_dir)
        .context("find the lull executable")?;
    runtime_config.cgroup_parent = delegated
        .clone()
        .unwrap_or_else(|| DEFAULT_CGROUP_PARENT.to_owned());
    let runtime = Runtime::open(runtime_config).context("open the runtime")?;
    let dir = runtime.config.instances_dir();
    let mut ids: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    ids.sort();
    let mut removed = 0;
    for id in &ids {
        match runtime.instances.get(id)? {
            Some(Recovered::Running(instance)) | Some(Recovered::Exited(instance, _)) => {
                runtime
                    .instances
                    .delete(instance)
                    .await
                    .with_context(|| format!("remove instance {id}"))?;
                removed += 1;
            }
            Some(Recovered::Removed { .. }) | None => {}
        }
        tokio::task::block_in_place(|| {
            lull_netns::network::remove_instance_network(&config.network, id)
        })
        .with_context(|| format!("remove the network of {id}"))?;
    }
    tokio::task::block_in_place(|| lull_netns::network::remove_host_network(&config.network))
        .context("remove the instance network")?;
    // The emptied delegated subtree: systemd removed the unit's cgroup only if it was empty.
    if let (Some(parent), Some(unit)) = (&delegated, unit_cgroup) {
        for dir in [cgroup_dir(parent), cgroup_dir(unit)] {
            let _ = std::fs::remove_dir(dir);
        }
    }
    Ok(vec![
        format!(
            "removed {removed} instance(s) the daemon had left running for its successor{}",
            delegated.map_or(String::new(), |p| format!(" (cgroups under {p})"))
        ),
        format!(
            "removed bridge {} and table inet {}",
            config.network.bridge, config.network.table
        ),
    ])
}

/// A cgroup's directory in the unified hierarchy.
fn cgroup_dir(cgroups_path: &str) -> std::path::PathBuf {
    Path::new("/sys/fs/cgroup").join(cgroups_path.trim_start_matches('/'))
}
