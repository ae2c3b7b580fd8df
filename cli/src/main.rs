//! The one `lull` binary. `image`, `run`, `ps`, `logs`, `stop`, `rm` and `network` drive the
//! runtime on this host directly; the client commands (`service`, `deploy`, `rollback`,
//! `revisions`, `events`, `status`) talk to a running daemon (see [`client`] for their exit
//! codes).

mod client;
mod daemon;
mod images;
mod install;
mod instances;
mod network;
mod probe;
mod run;
mod secrets;
mod size;
mod up;
mod watchdog;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lull_runtime::host::{DEFAULT_DATA_DIR, DEFAULT_RUN_DIR, Runtime, RuntimeConfig, ZYGOTE_ARG};

/// mimalloc: the proxy allocates and frees a few buffers of several KiB per request (hyper's
/// read buffers), which glibc's malloc serves from its slow path with consolidation; measured
/// with `cargo xtask bench proxy`, the proxy used about a tenth less CPU per request with it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "lull",
    version,
    about = "A self-hosted App Runner for a bare Linux VM",
    after_long_help = client::EXIT_CODES
)]
struct Cli {
    /// Where images, layers and instances are kept.
    #[arg(long, global = true, env = "LULL_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Runtime state cleared at reboot (libcontainer state, network namespaces).
    #[arg(long, global = true, env = "LULL_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// Parent cgroup of every instance [default: /lull; the daemon run by systemd on cgroup v2:
    /// `instances` in its unit's delegated cgroup]
    #[arg(long, global = true, env = "LULL_CGROUP_PARENT")]
    cgroup_parent: Option<String>,
    #[command(flatten)]
    network: network::NetworkArgs,
    #[command(flatten)]
    client: client::ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an image as a service and show its URL: uses the running daemon or starts one.
    Up(Box<up::UpArgs>),
    /// Run the control plane (admin API, proxy, deployments) in the foreground.
    Daemon(daemon::DaemonArgs),
    /// Images: pull, import, list, remove, collect garbage.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Run an image as an isolated instance.
    Run(Box<run::RunArgs>),
    /// List instances on this host.
    Ps,
    /// Show a service's output (its instances', merged) or a local instance's, oldest first,
    /// with RFC 3339 UTC times.
    Logs(instances::LogsArgs),
    /// Stop an instance: SIGTERM, then SIGKILL after the grace period.
    Stop(instances::StopArgs),
    /// Delete an instance (stopping it first if it runs).
    Rm(instances::RmArgs),
    /// The instance network: bridge, addresses, firewall.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Services on the daemon: create, update, list, show, delete, pause, resume, export.
    #[command(subcommand)]
    Service(client::service::ServiceCommand),
    /// Deploy a service's current revision again, following it to its end.
    #[command(after_long_help = client::EXIT_CODES)]
    Deploy(client::deploy::DeployArgs),
    /// Switch a service back to an earlier revision.
    #[command(after_long_help = client::EXIT_CODES)]
    Rollback(client::deploy::RollbackArgs),
    /// A service's revisions, oldest first, with the current and serving ones marked.
    #[command(after_long_help = client::EXIT_CODES)]
    Revisions(client::revisions::RevisionsArgs),
    /// Run a command inside a service's instance: `lull exec SVC [-t] [-i] -- CMD ARGS...`;
    /// exits with the command's code.
    Exec(client::exec::ExecArgs),
    /// A service's lifecycle events, oldest first (`-f` follows).
    #[command(after_long_help = client::EXIT_CODES)]
    Events(client::events::EventsArgs),
    /// The daemon and its services.
    #[command(after_long_help = client::EXIT_CODES)]
    Status,
    /// Secrets given to services (values from stdin or a file, never the command line).
    #[command(subcommand)]
    Secret(secrets::SecretCommand),
    /// Credentials for pulling from private registries.
    #[command(subcommand)]
    Registry(secrets::RegistryCommand),
    /// Custom domains: add one (with the DNS records to create), list their certificates
    /// status, remove one.
    #[command(subcommand, after_long_help = client::EXIT_CODES)]
    Domain(client::domain::DomainCommand),
    /// Certificates served on HTTPS: list, add an operator's, remove, reload lull.toml's.
    #[command(subcommand, after_long_help = client::EXIT_CODES)]
    Cert(client::domain::CertCommand),
    /// Install lull as a systemd service (unit, settings skeleton, `lull` group), enable and
    /// start it; again to bring it up to date.
    Install(install::InstallArgs),
    /// Stop and remove the systemd service, its instances and their network; state and
    /// settings stay unless --purge.
    Uninstall(install::UninstallArgs),
    /// Internal: the single-threaded process that launches instances.
    #[command(name = "__zygote", hide = true)]
    Zygote,
}

fn main() -> ExitCode {
    // The zygote must stay single-threaded: dispatch it before anything starts threads.
    if std::env::args().nth(1).as_deref() == Some(ZYGOTE_ARG) {
        init_logging(true);
        let code = lull_runtime::instance::zygote::serve(lull_runtime::instance::zygote::ZYGOTE_FD);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    init_logging(false);
    lull_daemon::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lull: start async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lull: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(zygote: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
        .unwrap_or_else(|_| "warn,libcgroups=error".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if zygote {
        builder
            .with_ansi(false)
            .with_writer(|| lull_runtime::instance::zygote::DiagnosticsWriter)
            .init();
    } else if stderr_is_journal() {
        // Under systemd: structured entries (span fields such as service and instance become
        // journal fields) instead of text lines.
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        match tracing_journald::layer() {
            Ok(journal) => {
                let filter = tracing_subscriber::EnvFilter::try_from_env("LULL_LOG")
                    .unwrap_or_else(|_| "info,libcgroups=error".into());
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journal.with_syslog_identifier("lull".to_owned()))
                    .init();
            }
            Err(_) => builder.with_writer(std::io::stderr).init(),
        }
    } else {
        builder.with_writer(std::io::stderr).init();
    }
}

/// Whether stderr is the journal's stream (systemd sets `JOURNAL_STREAM` to its device and
/// inode, see systemd.exec(5)); a redirected stderr keeps text lines.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match nix::sys::stat::fstat(libc::STDERR_FILENO) {
        Ok(stat) => stat.st_dev.to_string() == dev && stat.st_ino.to_string() == ino,
        Err(_) => false,
    }
}

fn open_runtime(cli: &Cli) -> Result<Runtime> {
    let mut config =
        RuntimeConfig::new(&cli.data_dir, &cli.run_dir).context("find the lull executable")?;
    config.cgroup_parent = cli
        .cgroup_parent
        .clone()
        .unwrap_or_else(|| lull_runtime::host::DEFAULT_CGROUP_PARENT.to_owned());
    Runtime::open(config).context("open the runtime")
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Up(args) => up::run(args, cli.cgroup_parent.as_deref()).await,
        Command::Daemon(args) => daemon::run(args, cli.cgroup_parent.as_deref()).await,
        Command::Image(images::ImageCommand::Gc) => images::gc(&open_runtime(&cli)?).await,
        Command::Image(images::ImageCommand::Export(args)) => {
            Ok(client::image::export(&cli.client, &cli.data_dir, args).await)
        }
        Command::Image(images::ImageCommand::Push(args)) => {
            Ok(client::image::push(&cli.client, args).await)
        }
        Command::Image(cmd) => images::run(&cli.data_dir, cmd).await,
        Command::Run(args) => run::run(open_runtime(&cli)?, args, &cli.network).await,
        Command::Ps => instances::ps(&open_runtime(&cli)?, &cli.network),
        Command::Logs(args) => {
            let service = client::logs::ServiceLogs {
                name: &args.id,
                follow: args.follow,
                since: args.since.as_deref(),
                instance: args.instance.as_deref(),
                requests: args.requests,
            };
            match client::logs::run(&cli.client, &service).await {
                Some(outcome) => Ok(client::finish(outcome)),
                None if args.since.is_some() || args.instance.is_some() || args.requests => {
                    anyhow::bail!(
                        "no service {} on the daemon at {} (--since, --instance and --requests are for services)",
                        args.id,
                        cli.client.socket.display()
                    )
                }
                None => instances::logs(&cli.data_dir, args).await,
            }
        }
        Command::Stop(args) => instances::stop(&open_runtime(&cli)?, args).await,
        Command::Rm(args) => instances::rm(&open_runtime(&cli)?, args, &cli.network).await,
        Command::Network(cmd) => network::run(cmd, &cli.network, &cli.data_dir, &cli.run_dir),
        Command::Service(cmd) => Ok(client::service::run(&cli.client, cmd).await),
        Command::Deploy(args) => Ok(client::deploy::deploy(&cli.client, args).await),
        Command::Rollback(args) => Ok(client::deploy::rollback(&cli.client, args).await),
        Command::Revisions(args) => Ok(client::revisions::run(&cli.client, args).await),
        Command::Events(args) => Ok(client::events::run(&cli.client, args).await),
        Command::Exec(args) => Ok(client::exec::run(&cli.client, args).await),
        Command::Status => Ok(client::status::run(&cli.client).await),
        Command::Secret(cmd) => Ok(secrets::run_secret(&cli.client, cmd).await),
        Command::Registry(cmd) => Ok(secrets::run_registry(&cli.client, cmd).await),
        Command::Install(args) => Ok(install::run_install(args)),
        Command::Uninstall(args) => Ok(install::run_uninstall(args)),
        Command::Domain(cmd) => Ok(client::domain::run_domain(&cli.client, cmd).await),
        Command::Cert(cmd) => Ok(client::domain::run_cert(&cli.client, cmd).await),
        Command::Zygote => unreachable!("dispatched before argument parsing"),
    }
}
