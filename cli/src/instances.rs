//! `lull ps|logs|stop|rm`: instances on this host.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::network::NetworkArgs;
use anyhow::{Context, Result, bail};
use clap::Args;
use lull_runtime::host::Runtime;
use lull_runtime::instance::config::read_json;
use lull_runtime::instance::pidfd::is_same_process_alive;
use lull_runtime::instance::{ExitStatus, InstancePaths, Recovered, ShimState};
use lull_runtime::logs;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A service on the daemon (its instances' output, merged) or a local instance.
    pub id: String,
    /// Keep printing new output.
    #[arg(short, long)]
    pub follow: bool,
    /// Service: only output after this time (RFC 3339, or a duration back such as 10m).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Service: only this instance's output.
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Service: the proxy's access log of it instead of the app's output.
    #[arg(long)]
    pub requests: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub id: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10")]
    pub grace: u64,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    pub id: String,
}

pub fn ps(runtime: &Runtime, network_args: &NetworkArgs) -> Result<ExitCode> {
    let network = network_args.config(&runtime.config.data_dir, &runtime.config.run_dir);
    // Addresses as the network last recorded them (read-only: no lock, no change).
    let ipam = lull_netns::ipam::Ipam::open(&network.ipam_file, network.subnet)
        .with_context(|| format!("read {}", network.ipam_file.display()))?;
    println!(
        "{:<40} {:<28} {:>8}  {:<32} ADDRESS",
        "INSTANCE", "STATUS", "PID", "STARTED"
    );
    let dir = runtime.config.instances_dir();
    let mut ids: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ids.sort();
    for id in ids {
        let paths = InstancePaths::new(dir.join(&id));
        let state: Option<ShimState> = read_json(&paths.state()).ok().flatten();
        let exit: Option<ExitStatus> = read_json(&paths.exit()).ok().flatten();
        let (status, pid, started) = match (&state, &exit) {
            (_, Some(exit)) => (
                exit.to_string(),
                "-".to_owned(),
                state
                    .as_ref()
                    .map(|s| s.started_at.clone())
                    .unwrap_or_default(),
            ),
            (Some(s), None) if is_same_process_alive(s.init_pid, s.init_start_time) => (
                "running".to_owned(),
                s.init_pid.to_string(),
                s.started_at.clone(),
            ),
            (Some(s), None) => (
                "dead (status lost)".to_owned(),
                "-".to_owned(),
                s.started_at.clone(),
            ),
            (None, None) => (
                "starting or failed to start".to_owned(),
                "-".to_owned(),
                String::new(),
            ),
        };
        let addr = ipam
            .address_of(&id)
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        println!("{id:<40} {status:<28} {pid:>8}  {started:<32} {addr}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(data_dir: &Path, args: &LogsArgs) -> Result<ExitCode> {
    lull_runtime::instance::validate_id(&args.id)?;
    let paths = InstancePaths::new(data_dir.join("instances").join(&args.id));
    if !paths.dir.exists() {
        bail!("instance {} not found", args.id);
    }
    let mut follower = logs::Follower::from_start(&paths.logs());
    loop {
        for r in follower.poll() {
            println!("{} {} {}", r.time, r.stream.as_str(), r.text);
        }
        if !args.follow || paths.exit().exists() {
            for r in follower.poll() {
                println!("{} {} {}", r.time, r.stream.as_str(), r.text);
            }
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

pub async fn stop(runtime: &Runtime, args: &StopArgs) -> Result<ExitCode> {
    match runtime.instances.get(&args.id)? {
        None => bail!("instance {} not found", args.id),
        Some(Recovered::Running(instance)) => {
            let status = instance.stop(Duration::from_secs(args.grace)).await?;
            println!("instance {} {status}", args.id);
        }
        Some(Recovered::Exited(_, status)) => {
            println!("instance {} had already ended: {status}", args.id)
        }
        Some(Recovered::Removed { .. }) => {
            println!("instance {} was dead; its leftovers were removed", args.id)
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rm(runtime: &Runtime, args: &RmArgs, network_args: &NetworkArgs) -> Result<ExitCode> {
    let known = match runtime.instances.get(&args.id)? {
        None => false,
        Some(Recovered::Running(instance)) | Some(Recovered::Exited(instance, _)) => {
            runtime.instances.delete(instance).await?;
            true
        }
        Some(Recovered::Removed { .. }) => true,
    };
    // The network goes whether or not the instance record is there: a `lull run` killed
    // between giving an instance its network and starting it leaves only the network.
    let config = network_args.config(&runtime.config.data_dir, &runtime.config.run_dir);
    let had_network = tokio::task::block_in_place(|| {
        let held = lull_netns::ipam::Ipam::open(&config.ipam_file, config.subnet)
            .map(|ipam| ipam.address_of(&args.id).is_some())
            .unwrap_or(false);
        lull_netns::network::remove_instance_network(&config, &args.id).map(|()| held)
    })
    .with_context(|| format!("remove the network of {}", args.id))?;
    if !known && !had_network {
        bail!("instance {} not found", args.id);
    }
    println!("removed {}", args.id);
    Ok(ExitCode::SUCCESS)
}
