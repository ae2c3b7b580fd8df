//! `lull install` and `lull uninstall`: lull as a systemd service (see `lull_systemd::install`).

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Args;
use lull_daemon::config::DaemonConfig;
use lull_runtime::host::{DEFAULT_CGROUP_PARENT, Runtime, RuntimeConfig};
use lull_runtime::instance::Recovered;
use lull_systemd::install::{InstallPlan, RealSystem, install, uninstall, unit_text};
use lull_systemd::unit::CANNOT_USE;

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
    finish(
        "lull install",
        plan().and_then(|plan| {
            if args.explain {
                print!("{}", unit_text(&RealSystem, &plan));
                println!("\n# Hardening lull leaves off, and why:");
                for (option, why) in CANNOT_USE {
                    println!("#   {option}: {why}");
                }
                return Ok(Vec::new());
            }
            let mut done = install(&RealSystem, &plan).map_err(|e| e.to_string())?;
            done.push(
                "`systemctl status lull` shows what the daemon is doing; `journalctl -u lull` its log"
                    .to_owned(),
            );
            Ok(done)
        }),
    )
}

pub fn run_uninstall(args: &UninstallArgs) -> ExitCode {
    finish(
        "lull uninstall",
        plan().and_then(|plan| {
            // Asked before the unit goes: where its cgroup is (or, the unit stopped already,
            // would be).
            let unit_cgroup = unit_cgroup();
            let settings = plan.unit.config.clone();
            let handle = tokio::runtime::Handle::current();
            let mut cleanup = || {
                tokio::task::block_in_place(|| {
                    handle.block_on(remove_instances(&settings, unit_cgroup.as_deref()))
                })
                .map_err(|e| format!("remove the instances the daemon left running: {e:#}"))
            };
            uninstall(&RealSystem, &plan, args.purge, &mut cleanup).map_err(|e| e.to_string())
        }),
    )
}

/// Prints what was done, a line each, or the error after `command`'s name.
fn finish(command: &str, result: Result<Vec<String>, String>) -> ExitCode {
    match result {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{command}: {e}");
            ExitCode::from(1)
        }
    }
}

/// `lull.service`'s cgroup: systemd's `ControlGroup` while it runs, else its slice's path with
/// the unit's name appended (where systemd puts it).
fn unit_cgroup() -> Option<String> {
    let show = |property: &str| {
        Command::new("systemctl")
            .args(["show", "-p", property, "--value", "lull.service"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(cg) = show("ControlGroup").filter(|cg| cg.starts_with('/')) {
        return Some(cg);
    }
    Some(format!("{}/lull.service", slice_cgroup(&show("Slice")?)?))
}

/// A slice's cgroup: it nests its parents (`a-b.slice` is `/a.slice/a-b.slice`), and the root
/// slice is the root.
fn slice_cgroup(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" {
        return Some(String::new());
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        prefix = if prefix.is_empty() {
            part.to_owned()
        } else {
            format!("{prefix}-{part}")
        };
        path.push_str(&format!("/{prefix}.slice"));
    }
    Some(path)
}

/// What a stopped daemon leaves on purpose for the next one to adopt: its instances (each at
/// the cgroup it was launched in) and the instance network. Removes them all, with the
/// settings' data and run directories and network names, then the emptied delegated cgroups.
/// Goes on past a failure and reports every one at the end.
async fn remove_instances(
    settings: &Path,
    unit_cgroup: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let config = DaemonConfig::load(settings)?;
    let mut done = Vec::new();
    let mut failures = Vec::new();
    if config.data_dir.join("instances").is_dir() {
        let mut runtime_config = RuntimeConfig::new(&config.data_dir, &config.run_dir)
            .context("find the lull executable")?;
        runtime_config.cgroup_parent = DEFAULT_CGROUP_PARENT.to_owned();
        let runtime = Runtime::open(runtime_config).context("open the runtime")?;
        let mut removed = 0;
        for found in runtime.instances.recover()? {
            match found {
                Recovered::Running(instance) | Recovered::Exited(instance, _) => {
                    let id = instance.id.clone();
                    match runtime.instances.delete(instance).await {
                        Ok(()) => removed += 1,
                        Err(e) => failures.push(format!("instance {id}: {e}")),
                    }
                }
                Recovered::Removed { .. } => {}
            }
        }
        done.push(format!(
            "removed {removed} instance(s) the daemon had left running for its successor"
        ));
    }
    // Every instance's links, namespaces and addresses, the table and the bridge.
    match tokio::task::block_in_place(|| lull_netns::network::remove_host_network(&config.network))
    {
        Ok(()) => done.push(format!(
            "removed the instance network (bridge {}, table inet {})",
            config.network.bridge, config.network.table
        )),
        Err(e) => failures.push(format!("the instance network: {e}")),
    }
    // The emptied delegated subtree: systemd removed the unit's cgroup only if it was empty.
    if let Some(unit) = unit_cgroup {
        let unit = unit.trim_end_matches('/');
        let children = [format!("{unit}/instances"), format!("{unit}/daemon")];
        for dir in children
            .iter()
            .map(|c| cgroup_dir(c))
            .chain([cgroup_dir(unit)])
        {
            match std::fs::remove_dir(&dir) {
                Ok(()) => done.push(format!("removed cgroup {}", dir.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failures.push(format!("cgroup {}: {e}", dir.display())),
            }
        }
    }
    if failures.is_empty() {
        Ok(done)
    } else {
        anyhow::bail!("{} (done: {})", failures.join("; "), done.join("; "))
    }
}

/// A cgroup's directory in the unified hierarchy.
fn cgroup_dir(cgroups_path: &str) -> std::path::PathBuf {
    Path::new("/sys/fs/cgroup").join(cgroups_path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_nest_their_parents() {
        assert_eq!(
            slice_cgroup("system.slice").as_deref(),
            Some("/system.slice")
        );
        assert_eq!(
            slice_cgroup("apps-web.slice").as_deref(),
            Some("/apps.slice/apps-web.slice")
        );
        assert_eq!(slice_cgroup("-.slice").as_deref(), Some(""));
        assert_eq!(slice_cgroup("lull.service"), None);
        assert_eq!(slice_cgroup("a--b.slice"), None);
    }
}
