//! `lull run`: pull (if needed), unpack, start an image as an isolated instance in its own
//! network namespace; follow its output, or check it answers HTTP and stop it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use lull_netns::network::{AttachRequest, HostNetwork, InstanceNetwork};
use lull_runtime::cgroup::Resources;
use lull_runtime::host::Runtime;
use lull_runtime::instance::{FileBind, Instance, InstanceRequest, ProcessOverrides};
use lull_runtime::logs::{self, LogLimits, LogRecord};

use crate::images::{RegistryArgs, parse_reference};
use crate::network::NetworkArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PullPolicy {
    /// Pull only when the image is not in the store.
    Missing,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image (e.g. 127.0.0.1:5000/lull/fixture-app:latest).
    pub image: String,
    /// Instance name (default: the repository's last part and a random suffix).
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The port the app listens on, given to it as PORT (default: the image's first exposed
    /// TCP port, else 8080).
    #[arg(long)]
    pub port: Option<u16>,
    /// CPU limit in vCPUs (e.g. 0.25).
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory limit (e.g. 64M, 1G).
    #[arg(long)]
    pub memory: Option<String>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids: Option<i64>,
    /// Run as this user (name, uid, name:group or uid:gid) instead of the image's.
    #[arg(long)]
    pub user: Option<String>,
    /// Replace the image's entrypoint.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// GET this path once the app answers, print the response, stop and remove the instance.
    #[arg(long, value_name = "PATH")]
    pub check: Option<String>,
    /// How long --check waits for the app to answer.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    pub check_timeout: u64,
    /// Start the instance and return (`lull logs`, `lull stop`, `lull rm` manage it).
    #[arg(long, short = 'd', conflicts_with = "check")]
    pub detach: bool,
    #[arg(long, value_enum, default_value = "missing")]
    pub pull: PullPolicy,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Arguments replacing the image's cmd.
    #[arg(last = true)]
    pub args: Vec<String>,
}

fn parse_env(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("--env {item:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// The image's name with a random suffix, for an instance.
fn default_name(image: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut base = crate::up::default_name(image);
    base.truncate(40);
    format!(
        "{}-{:06x}",
        base.trim_end_matches('-'),
        (nanos ^ std::process::id()) & 0xff_ffff
    )
}

pub async fn run(runtime: Runtime, args: &RunArgs, network_args: &NetworkArgs) -> Result<ExitCode> {
    let reference = parse_reference(&args.image)?;
    let env = parse_env(&args.env)?;
    let memory_bytes = args
        .memory
        .as_deref()
        .map(crate::size::parse)
        .transpose()
        .context("--memory")?;
    let resources = Resources {
        cpu: args.cpu,
        memory_bytes,
        pids: args.pids,
    };
    resources.to_linux_resources().context("resource limits")?;

    let cached = runtime.store.get(&reference)?;
    let image = match (args.pull, cached) {
        (PullPolicy::Never, None) => {
            bail!("image {reference} is not in the store and --pull never was given")
        }
        (PullPolicy::Never | PullPolicy::Missing, Some(image)) => image,
        (_, _) => {
            let started = Instant::now();
            let image = runtime
                .store
                .pull(&reference, &args.registry.options()?)
                .await?;
            println!(
                "pulled {reference} ({}) in {} ms",
                image.manifest_digest,
                started.elapsed().as_millis()
            );
            image
        }
    };
    let started = Instant::now();
    let layers = runtime.prepare(&image).await?;
    let unpacked = started.elapsed();

    let port = args.port.unwrap_or_else(|| {
        image
            .config
            .exposed_ports
            .iter()
            .find_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
            .unwrap_or(8080)
    });
    let id = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(reference.repository()));
    lull_runtime::instance::validate_id(&id)?;
    let network = network_args.start(&runtime.config.data_dir, &runtime.config.run_dir)?;
    let attachment = tokio::task::block_in_place(|| {
        network.attach(&AttachRequest {
            instance: id.clone(),
            service: id.clone(),
            allow_peers: false,
            hostname: id.clone(),
        })
    })
    .context("give the instance its network")?;
    let request = InstanceRequest {
        id: id.clone(),
        layers,
        image: Runtime::image_process(&image),
        overrides: ProcessOverrides {
            entrypoint: args.entrypoint.clone().map(|e| vec![e]),
            cmd: (!args.args.is_empty()).then(|| args.args.clone()),
            env,
            port: Some(port),
            user: args.user.clone(),
            working_dir: None,
        },
        resources,
        netns: Some(attachment.netns.clone()),
        files: attachment
            .files()
            .map(|(source, destination)| FileBind::new(source, destination))
            .to_vec(),
        log_limits: LogLimits::default(),
    };
    let launch_started = Instant::now();
    let instance = match runtime.instances.launch(request).await {
        Ok(instance) => instance,
        Err(e) => {
            // Leave an instance of the same name alone; otherwise remove what the failed
            // launch left, after showing the shim's own account of it.
            if !matches!(e, lull_runtime::instance::InstanceError::Exists(_)) {
                let shim_log = runtime.config.instances_dir().join(&id).join("shim.log");
                if let Ok(text) = std::fs::read_to_string(&shim_log) {
                    let lines: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
                    for line in lines.iter().skip(lines.len().saturating_sub(5)) {
                        eprintln!("  {line}");
                    }
                }
                let _ = runtime.instances.remove_files(&id);
            }
            if let Err(detach) = tokio::task::block_in_place(|| network.detach(&id)) {
                eprintln!("lull: remove the network of {id}: {detach:#}");
            }
            return Err(e).context(format!("start instance {id}"));
        }
    };
    println!(
        "instance {id} started in {} ms (layers ready in {} ms), at {}:{port}",
        launch_started.elapsed().as_millis(),
        unpacked.as_millis(),
        attachment.addr
    );

    if args.detach {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = match &args.check {
        Some(path) => {
            check(
                &instance,
                SocketAddr::from((attachment.addr, port)),
                path,
                Duration::from_secs(args.check_timeout),
            )
            .await
        }
        None => follow(&instance).await,
    };
    finish(&runtime, instance, &network).await?;
    outcome
}

async fn check(
    instance: &Instance,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<ExitCode> {
    let started = Instant::now();
    let mut last_error = String::new();
    while started.elapsed() < timeout {
        if instance.has_exited() {
            let status = instance.wait().await?;
            print_tail(instance, 20);
            bail!("instance {} {status} before answering HTTP", instance.id);
        }
        match crate::probe::get(addr, path, Duration::from_secs(2)) {
            Ok(response) => {
                println!(
                    "GET http://{addr}{path} → {} ({} ms after start)",
                    response
                        .status_line
                        .split_once(' ')
                        .map(|(_, s)| s)
                        .unwrap_or(&response.status_line),
                    started.elapsed().as_millis()
                );
                print!("{}", response.body);
                if !response.body.ends_with('\n') {
                    println!();
                }
                return Ok(if response.status < 400 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            Err(e) => last_error = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    print_tail(instance, 20);
    bail!(
        "instance {} did not answer on {addr} within {timeout:?}: {last_error}",
        instance.id
    )
}

fn print_record(r: &LogRecord) {
    println!("{} {} {}", r.time, r.stream.as_str(), r.text);
}

fn print_tail(instance: &Instance, lines: usize) {
    if let Ok(records) = logs::read_all(&instance.paths().logs()) {
        eprintln!("last output of {}:", instance.id);
        for r in records.iter().skip(records.len().saturating_sub(lines)) {
            print_record(r);
        }
    }
}

async fn follow(instance: &Instance) -> Result<ExitCode> {
    println!("following {}'s output; Ctrl-C stops it", instance.id);
    let mut follower = logs::Follower::from_start(&instance.paths().logs());
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                println!("stopping {}", instance.id);
                let status = instance.stop(Duration::from_secs(10)).await?;
                for r in follower.poll() { print_record(&r); }
                println!("instance {} {status}", instance.id);
                return Ok(ExitCode::SUCCESS);
            }
            _ = ticker.tick() => {
                for r in follower.poll() { print_record(&r); }
                if instance.has_exited() {
                    let status = instance.wait().await?;
                    for r in follower.poll() { print_record(&r); }
                    println!("instance {} {status}", instance.id);
                    return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
            }
        }
    }
}

async fn finish(runtime: &Runtime, instance: Instance, network: &HostNetwork) -> Result<()> {
    let stopped = if instance.has_exited() {
        Ok(())
    } else {
        instance.stop(Duration::from_secs(10)).await.map(|_| ())
    };
    // Delete and remove the network whatever the stop said (delete kills what still runs).
    let instance_id = instance.id.clone();
    let deleted = runtime.instances.delete(instance).await;
    let id = instance_id.as_str();
    let destroyed = network.detach(id).context("remove the instance's network");
    stopped?;
    deleted?;
    destroyed
}
