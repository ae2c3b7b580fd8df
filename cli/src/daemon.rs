//! `lull daemon`: the control plane. Reads `lull.toml` (every key optional), then brings up,
//! in order: the state store, the secrets key, the runtime, the instance network, the proxy's
//! listening sockets, the deployment engine (adopting instances that still run), the proxy's
//! accept loops, the admin socket and the metrics endpoint. SIGTERM or Ctrl-C stop it;
//! instances keep running and the next daemon adopts them.
//!
//! # Listeners
//! Every listening socket is taken, by name, from the file descriptors passed at exec
//! (`LISTEN_FDS`, `LISTEN_FDNAMES`, see [`lull_systemd::listen`]) when one matches the
//! settings, else bound anew: `http-<ip>-<port>#<i>` and `https-<ip>-<port>#<i>` for the
//! proxy's sockets (one per proxy thread, `SO_REUSEPORT`; the IP's `:` written `_`, since
//! systemd forbids `:` in names),
//! `admin` for the admin socket and `metrics` for the metrics endpoint. A passed socket that
//! matches nothing is closed.
//!
//! # Restarts without a refused connection
//! - `lull daemon upgrade` (or SIGUSR2 to the daemon) replaces the daemon with the lull
//!   executable now on disk: the path it was started with, looked up again, with the same
//!   arguments. The old daemon first lets go of its instances ([`Engine::detach`]: no
//!   supervision, its CPU gates restore and never throttle), then starts the new one with
//!   every listening socket passed at exec and a pipe to report readiness on. The new
//!   daemon adopts the instances, waits (bounded) for them to be back in rotation, starts
//!   accepting and reports ready; only then does the old one stop accepting, let its requests
//!   in flight finish, and exit 0. Both accept from the same sockets for a moment, so no
//!   connection is refused. If the new daemon fails or is not ready within
//!   [`HANDOVER_DEADLINE`], it is killed, the old daemon adopts its instances again and serves
//!   on, and it logs why.
//! - Under systemd (`Type=notify`; `NOTIFY_SOCKET` set) the daemon also stores every
//!   listening socket in systemd's fd store (`FDSTORE=1`, `FDNAME=`) once it serves, so that
//!   after a `systemctl restart` the next daemon gets them back (`LISTEN_FDS`): connections
//!   made in between wait in the sockets' backlog. The unit needs
//!   `FileDescriptorStoreMax=` of at least the proxy's sockets (addresses × CPUs) plus two,
//!   and `NotifyAccess=all`: after an upgrade the old daemon tells systemd the new main pid
//!   (`MAINPID=`), and the new daemon's own messages come from a process that was not the main
//!   one when it started. The watchdog (`WatchdogSec=`) is fed at half its interval while the
//!   state store and every proxy thread answer (see [`crate::watchdog`]).
//!
//! Only a crash (`kill -9`) leaves a gap: until the next daemon is up, connections are
//! refused, unless systemd holds the sockets in its fd store.

use std::ffi::{CString, OsString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use lull_daemon::api::server::{self as api_server, SocketError, SocketOptions};
use lull_daemon::config::{DaemonConfig, ListenAddr};
use lull_daemon::control::planner::SpecPlanner;
use lull_daemon::control::secrets::registry_credentials;
use lull_daemon::control::secrets::secrets_redactor;
use lull_daemon::control::{Control, handlers};
use lull_daemon::engine::{AccessLogs, Engine, EngineSettings};
use lull_daemon::host::real::{RealHost, RealHostConfig};
use lull_daemon::secrets::SecretKey;
use lull_daemon::store::{DAEMON_RESTARTED, SqliteStore, Store};
use lull_daemon::telemetry::{self, DaemonMetrics, MetricsSource};
use lull_netns::network::{HostNetwork, InstanceNetwork};
use lull_proxy::metrics::ProxyMetrics;
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use lull_runtime::host::{Runtime, RuntimeConfig};
use lull_systemd::ListenFd;

/// How long a new daemon has to report ready before the old one gives up on it.
pub const HANDOVER_DEADLINE: Duration = Duration::from_secs(90);

/// How long a daemon taking over waits for adopted instances to be back in rotation before
/// it accepts connections anyway.
const ROTATION_WAIT: Duration = Duration::from_secs(10);

/// How long the proxy lets requests in flight finish when the daemon stops.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The variable naming the fd on which a daemon started by a handover reports `READY=1`.
const READY_FD_VAR: &str = "LULL_HANDOVER_READY_FD";

const ADMIN_FD: &str = "admin";
const METRICS_FD: &str = "metrics";

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The daemon's settings (a missing file means every default).
    #[arg(long, env = "LULL_CONFIG", default_value = lull_daemon::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Check the settings, print them and exit.
    #[arg(long)]
    pub check: bool,
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Replace the running daemon with the lull executable now on disk, without refusing a
    /// connection (the same as sending it SIGUSR2, and waiting for the new one).
    Upgrade(UpgradeArgs),
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Seconds to wait for the new daemon to take over.
    #[arg(long, default_value_t = HANDOVER_DEADLINE.as_secs() + 10)]
    pub timeout: u64,
}

/// Addresses a listener setting stands for: a given IP, or every IPv4 and IPv6 address.
fn addresses(listen: &ListenAddr) -> Vec<SocketAddr> {
    match listen.ip {
        Some(ip) => vec![SocketAddr::new(ip, listen.port)],
        None => vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), listen.port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), listen.port),
        ],
    }
}

/// The name of the proxy's `index`th plain HTTP socket on `addr` (no `:`, which systemd
/// forbids).
#[cfg(test)]
fn http_fd_name(addr: SocketAddr, index: usize) -> String {
    format!("{}{index}", http_fd_prefix(addr))
}

#[cfg(test)]
fn http_fd_prefix(addr: SocketAddr) -> String {
    proxy_fd_prefix("http", addr)
}

fn proxy_fd_prefix(scheme: &str, addr: SocketAddr) -> String {
    format!(
        "{scheme}-{}-{}#",
        addr.ip().to_string().replace(':', "_"),
        addr.port()
    )
}

/// The proxy's sockets for a listener setting: passed at exec (named `{scheme}-...`) or bound
/// anew, one per CPU, per address; a missing IPv6 stack only skips `[::]`. Also whether any
/// were passed.
fn proxy_sockets(
    inherited: &mut Inherited,
    scheme: &str,
    listen: &ListenAddr,
    cpus: usize,
) -> Result<(Vec<Vec<std::net::TcpListener>>, bool)> {
    let mut all = Vec::new();
    let mut handed = false;
    for addr in addresses(listen) {
        let passed = inherited.take_sockets(&proxy_fd_prefix(scheme, addr), addr);
        let sockets = if passed.is_empty() {
            match lull_proxy::server::bind_reuse_port(addr, cpus) {
                Ok(sockets) => sockets,
                Err(e) if addr.is_ipv6() && listen.ip.is_none() => {
                    tracing::warn!("no IPv6 {scheme} listener: {e}");
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("the {scheme} listener")),
            }
        } else {
            tracing::info!(%addr, sockets = passed.len(), "{scheme} sockets passed at exec");
            handed = true;
            passed
        };
        all.push(sockets);
    }
    Ok((all, handed))
}

pub async fn run(args: &DaemonArgs, cgroup_parent: Option<&str>) -> Result<ExitCode> {
    if let Some(DaemonCommand::Upgrade(upgrade)) = &args.command {
        return self::upgrade(args, upgrade).await;
    }
    // Before the daemon starts a thread of its own: what was passed at exec.
    // SAFETY: the only threads running are the async runtime's idle workers, which do not
    // read the environment; nothing in this process has used fds from 3 on yet (they were
    // passed to it, and are only taken here).
    let passed = unsafe { Passed::take() };
    let passed = match passed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lull daemon: file descriptors passed at exec: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let launch = Launch::current();
    let config = match DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lull daemon: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let clashes = config.combination_problems();
    if !clashes.is_empty() {
        for problem in clashes {
            eprintln!("lull daemon: {}: {problem}", args.config.display());
        }
        return Ok(ExitCode::from(2));
    }
    if config.acme.enabled {
        let port = |l: &Option<lull_daemon::config::ListenAddr>| l.as_ref().map(|l| l.port);
        let (needed, got) = match config.acme.challenge {
            lull_daemon::config::ChallengeKind::Http01 => (80, port(&config.listeners.http)),
            lull_daemon::config::ChallengeKind::TlsAlpn01 => (443, port(&config.listeners.https)),
        };
        if got != Some(needed) {
            eprintln!(
                "lull daemon: warning: the CA validates {} on port {needed}, and lull listens on {}: \
                 forward port {needed} here, or orders will fail",
                config.acme.challenge.as_str(),
                got.map_or("no port".to_owned(), |p| p.to_string())
            );
        }
    }
    // Certificates are settings too: a bad one stops the start (and fails --check) with
    // every reason, before anything is bound.
    if let Err(e) = lull_daemon::certs::load_all(&config.tls, chrono::Utc::now()) {
        eprintln!("lull daemon: {}: {e}", args.config.display());
        return Ok(ExitCode::from(2));
    }
    if args.check {
        println!("{config:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    notify(&[(
        "STATUS",
        "starting: state store, instance network, listeners, adopting running instances",
    )]);
    let daemon = Running::start_with(&config, cgroup_parent, passed.listeners).await?;
    daemon.store_fds();
    report_ready(passed.ready);
    let _watchdog =
        crate::watchdog::spawn(daemon.control.store.clone(), daemon.proxy_threads.clone());
    loop {
        match wait_for_signal().await {
            Signal::Stop => break,
            Signal::Upgrade => {}
        }
        eprintln!("lull daemon: handing over to a new daemon");
        match daemon.hand_over(&launch).await {
            Ok(successor) => {
                eprintln!("lull daemon: pid {successor} took over; finishing requests in flight");
                let status = format!("handed over to pid {successor}");
                notify(&[("MAINPID", &successor.to_string()), ("STATUS", &status)]);
                daemon.stop().await;
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                eprintln!("lull daemon: the new daemon did not take over, serving on: {e:#}");
                daemon.take_back().await;
            }
        }
    }
    notify(&[("STOPPING", "1")]);
    eprintln!("lull daemon stopping (instances keep running; the next daemon adopts them)");
    daemon.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// Sends `state` to systemd when it started us; a failure is logged.
pub(crate) fn notify(state: &[(&str, &str)]) {
    if let Err(e) = lull_systemd::notify(state) {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Tells whoever waits that the daemon serves: the daemon that handed over (on its pipe),
/// else systemd (Type=notify).
fn report_ready(handover: Option<OwnedFd>) {
    match handover {
        Some(fd) => {
            let mut pipe = std::fs::File::from(fd);
            if let Err(e) = std::io::Write::write_all(&mut pipe, b"READY=1\n") {
                tracing::warn!("telling the previous daemon we are ready: {e}");
            }
            notify(&[("STATUS", "serving")]);
        }
        None => notify(&[("READY", "1"), ("STATUS", "serving")]),
    }
}

enum Signal {
    Stop,
    Upgrade,
}

async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut usr2) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::user_defined2()),
    ) {
        (Ok(term), Ok(usr2)) => (term, usr2),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("no SIGTERM or SIGUSR2 handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return Signal::Stop;
        }
    };
    tokio::select! {
        _ = term.recv() => Signal::Stop,
        _ = tokio::signal::ctrl_c() => Signal::Stop,
        _ = usr2.recv() => Signal::Upgrade,
    }
}

/// What was passed to this process at exec.
struct Passed {
    listeners: Inherited,
    /// Where to report readiness to the daemon that started us (a handover).
    ready: Option<OwnedFd>,
}

impl Passed {
    /// # Safety
    /// As [`lull_systemd::listen_fds`]: no other thread may use the environment meanwhile,
    /// and nothing may have taken the passed fds yet.
    unsafe fn take() -> Result<Passed> {
        // SAFETY: forwarded from the caller.
        let fds = unsafe { lull_systemd::listen_fds() }.context("LISTEN_FDS")?;
        let ready_var = std::env::var(READY_FD_VAR).ok();
        // SAFETY: forwarded from the caller (no concurrent use of the environment).
        unsafe { std::env::remove_var(READY_FD_VAR) };
        let mut ready = None;
        if let Some(value) = ready_var {
            let fd: RawFd = value
                .parse()
                .with_context(|| format!("{READY_FD_VAR} is not an fd number: {value:?}"))?;
            // SAFETY: the daemon that started us passed this fd for us alone; it is taken
            // once, here.
            let taken = unsafe { lull_systemd::listen::take(fd, vec![READY_FD_VAR.to_owned()]) }
                .context(READY_FD_VAR)?;
            ready = taken.into_iter().next().map(|f| f.fd);
        }
        if !fds.is_empty() {
            let names: Vec<&str> = fds.iter().map(|f| f.name.as_str()).collect();
            tracing::info!(?names, "listening sockets passed at exec");
        }
        Ok(Passed {
            listeners: Inherited { fds },
            ready,
        })
    }
}

/// Listening sockets passed at exec, taken by name as the settings ask for them.
struct Inherited {
    fds: Vec<ListenFd>,
}

impl Inherited {
    fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let pos = self.fds.iter().position(|f| f.name == name)?;
        Some(self.fds.remove(pos).fd)
    }

    /// The proxy's sockets named `prefix<i>`, in index order, each checked to be bound at
    /// `addr`.
    fn take_sockets(&mut self, prefix: &str, addr: SocketAddr) -> Vec<std::net::TcpListener> {
        let mut mine: Vec<(usize, std::net::TcpListener)> = Vec::new();
        let mut rest = Vec::new();
        for fd in self.fds.drain(..) {
            let index = fd
                .name
                .strip_prefix(prefix)
                .and_then(|i| i.parse::<usize>().ok());
            match index {
                Some(index) => {
                    let socket = std::net::TcpListener::from(fd.fd);
                    match socket.local_addr() {
                        Ok(local)
                            if local == addr || (addr.port() == 0 && local.ip() == addr.ip()) =>
                        {
                            mine.push((index, socket))
                        }
                        other => {
                            tracing::warn!(name = %fd.name, found = ?other, "passed socket is not bound where its name says: closed")
                        }
                    }
                }
                None => rest.push(fd),
            }
        }
        self.fds = rest;
        mine.sort_by_key(|(i, _)| *i);
        mine.into_iter().map(|(_, s)| s).collect()
    }

    /// Closes what no setting asked for.
    fn close_rest(&mut self) {
        for fd in self.fds.drain(..) {
            tracing::info!(name = %fd.name, "passed socket matches no setting: closed");
        }
    }
}

/// A daemon serving in this process.
pub struct Running {
    proxy: Proxy,
    control: Arc<Control>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The ACME manager's passes: they run until the daemon stops.
    acme_task: tokio::task::JoinHandle<()>,
    /// Duplicates of the admin socket and the metrics socket, to pass on.
    admin_fd: OwnedFd,
    metrics_fd: Option<OwnedFd>,
    /// The runtimes of the proxy's threads (none without a listener), for the watchdog.
    proxy_threads: Vec<tokio::runtime::Handle>,
}

impl Running {
    /// Brings the control plane up with `config`: store, key, runtime, network, proxy
    /// sockets, engine (adopting what runs), services, accept loops, admin socket, metrics.
    pub async fn start(config: &DaemonConfig, cgroup_parent: Option<&str>) -> Result<Running> {
        Running::start_with(config, cgroup_parent, Inherited { fds: Vec::new() }).await
    }

    /// [`Running::start`], with listening sockets from `inherited` where one matches the
    /// settings.
    async fn start_with(
        config: &DaemonConfig,
        cgroup_parent: Option<&str>,
        mut inherited: Inherited,
    ) -> Result<Running> {
        let store: Arc<dyn Store> = Arc::new(
            tokio::task::block_in_place(|| SqliteStore::open(&config.data_dir))
                .context("open the state store")?,
        );
        let interrupted = store
            .fail_interrupted_operations(DAEMON_RESTARTED)
            .context("close the operations a previous daemon left")?;
        if !interrupted.is_empty() {
            tracing::warn!(operations = ?interrupted, "marked failed: the daemon restarted during them");
        }
        let key = Arc::new(SecretKey::load_or_create(&config.data_dir).context("the secrets key")?);

        let mut runtime_config = RuntimeConfig::new(&config.data_dir, &config.run_dir)
            .context("find the lull executable")?;
        let layout = lull_runtime::cgroup::CgroupLayout::host().context("the host's cgroups")?;
        let placement = lull_runtime::cgroup::delegate::place_this_process(
            &layout,
            cgroup_parent,
            lull_runtime::host::DEFAULT_CGROUP_PARENT,
        );
        if placement.warn {
            tracing::warn!("{}", placement.why);
        } else {
            tracing::info!("{}", placement.why);
        }
        runtime_config.cgroup_parent = placement.parent;
        let runtime = Arc::new(Runtime::open(runtime_config).context("open the runtime")?);
        let (network, report) =
            tokio::task::block_in_place(|| HostNetwork::start(config.network.clone()))
                .context("set up the instance network")?;
        for conflict in &report.conflicts {
            eprintln!("warning: {conflict}");
        }
        let network: Arc<dyn InstanceNetwork> = Arc::new(network);
        let builds = source_builds(config, &runtime, &network, &store, &key).await?;
        let real_host = Arc::new(
            RealHost::new(
                runtime,
                network,
                RealHostConfig::under(&config.data_dir)
                    .with_retained_logs_max_bytes(config.logs.max_bytes),
            )
            .context("the instance host")?
            .with_registry_credentials(Arc::new(registry_credentials(store.clone(), key.clone()))),
        );
        // Every start is counted against the host's memory and instance cap.
        let memory_total = lull_daemon::autoscale::mem_total(Path::new("/proc/meminfo"))
            .context("the host's memory")?;
        let budget = Arc::new(lull_daemon::autoscale::HostBudget::new(
            config.scaling.limits(memory_total),
        ));
        let host = Arc::new(lull_daemon::host::budget::BudgetedHost::new(
            real_host,
            budget.clone(),
        ));
        let scaling_metrics = Arc::new(lull_daemon::autoscale::ScalingMetrics::new(
            budget,
            Arc::new(lull_daemon::autoscale::ProcPressure::host()),
        ));

        let routes = Arc::new(RouteTable::new());
        let proxy_metrics = Arc::new(ProxyMetrics::new());
        let daemon_metrics = Arc::new(DaemonMetrics::new());
        let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
        // The proxy's sockets now (a taken port fails the start early), its accept loops
        // once the engine has routes: a connection accepted before would find none.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let port_of = |sockets: &[Vec<std::net::TcpListener>]| {
            sockets
                .iter()
                .find_map(|s| s.first().and_then(|s| s.local_addr().ok()))
                .map(|a| a.port())
        };
        let (http_sockets, handed_http) = match &config.listeners.http {
            Some(listen) => proxy_sockets(&mut inherited, "http", listen, cpus)?,
            None => (Vec::new(), false),
        };
        let http_port = port_of(&http_sockets);
        // HTTPS comes up even with no certificate configured: unknown names get the default
        // certificate (self-signed for lull.invalid), and ACME's TLS-ALPN-01 will answer here.
        let certs = lull_daemon::certs::Certificates::start(&config.tls)
            .context("the HTTPS certificates")?;
        let (https_sockets, handed_https) = match &config.listeners.https {
            Some(listen) => proxy_sockets(&mut inherited, "https", listen, cpus)?,
            None => (Vec::new(), false),
        };
        let https_port = port_of(&https_sockets);
        let handed_http = handed_http || handed_https;
        let planner = Arc::new(SpecPlanner {
            store: store.clone(),
            key: Some(key.clone()),
            base_domain: config.base_domain.clone(),
        });
        let settings = EngineSettings {
            rollback_window: config.rollback_window,
            stop_grace: config.stop_grace,
            ..EngineSettings::default()
        };
        let engine = Engine::new(host, store.clone(), routes.clone(), planner, settings)
            .with_proxy_metrics(proxy_metrics.clone())
            .with_daemon_metrics(daemon_metrics.clone())
            .with_redaction({
                let key = key.clone();
                Arc::new(move |s: &dyn Store| secrets_redactor(s, &key))
            })
            .with_access_logs(AccessLogs {
                dir: config.data_dir.join("logs/access"),
                max_bytes: Some(config.logs.max_bytes),
            })
            .with_scaling(scaling_metrics.clone());
        let recovered = engine.recover().await.context("adopt running instances")?;
        if !recovered.adopted.is_empty() || !recovered.stopped.is_empty() {
            eprintln!(
                "adopted {} running instance(s), stopped {} of deleted services",
                recovered.adopted.len(),
                recovered.stopped.len()
            );
        }
        let certs = Arc::new(certs);
        // Plain HTTP answers ACME's HTTP-01 challenges itself and, with an HTTPS listener,
        // redirects the hosts it holds a certificate for (see `lull_proxy::edge`); the ACME
        // manager publishes its challenges there.
        let http01 = Arc::new(lull_proxy::tls::Http01Challenges::new());
        proxy.set_edge(lull_proxy::Edge {
            http01: http01.clone(),
            certificates: https_port.map(|_| certs.store().clone()),
            https_port: https_port.unwrap_or(443),
        });
        let (tls_control, acme_task) =
            lull_daemon::control::domains::start_tls(config, store.clone(), certs.clone(), http01)
                .map_err(|e| anyhow::anyhow!("certificates and ACME: {e}"))?;
        let acme_metrics = tls_control.acme.clone();
        let control = Arc::new(Control {
            store: store.clone(),
            engine,
            base_domain: config.base_domain.clone(),
            http_port,
            key: Some(key),
            builds,
            tls: Some(tls_control),
        });
        start_services(&control).await;

        if handed_http {
            // Passed sockets: clients are already connecting, served meanwhile by the daemon
            // handing over (or waiting in the backlog after a systemd restart). Accept once
            // the adopted instances answer here, not into pools with none in rotation.
            wait_for_rotation(&routes, ROTATION_WAIT).await;
        }
        let mut proxy_threads = Vec::new();
        if !http_sockets.is_empty() || !https_sockets.is_empty() {
            let runtimes = lull_proxy::server::spawn_runtimes(cpus, "lull-proxy")
                .context("start the proxy's threads")?;
            proxy_threads = runtimes.clone();
            for sockets in http_sockets {
                let bound = proxy
                    .listen_on_sockets(sockets, &runtimes)
                    .context("the HTTP listener")?;
                tracing::info!(%bound, "serving HTTP");
            }
            let acceptor = lull_proxy::tls::acceptor_for(certs.store().clone())
                .context("the HTTPS listener's TLS configuration")?;
            for sockets in https_sockets {
                let bound = proxy
                    .listen_tls_on_sockets(sockets, &runtimes, acceptor.clone())
                    .context("the HTTPS listener")?;
                tracing::info!(%bound, "serving HTTPS");
            }
        }

        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let socket_options = SocketOptions {
            path: config.socket.path.clone(),
            mode: 0o660,
            group: Some(config.socket.group.clone()),
        };
        let listener =
            admin_socket(inherited.take(ADMIN_FD), &socket_options).context("the admin socket")?;
        let admin_fd = listener
            .as_fd()
            .try_clone_to_owned()
            .context("duplicate the admin socket")?;
        let api = tokio::spawn(api_server::serve(
            listener,
            Arc::new(handlers::router()),
            control.clone(),
            stop.clone(),
        ));
        let mut metrics_fd = None;
        let metrics_task = match config.metrics {
            Some(addr) => {
                let passed = inherited.take(METRICS_FD).map(std::net::TcpListener::from);
                let (listener, _) = telemetry::listener(addr, passed)?;
                metrics_fd = Some(
                    listener
                        .as_fd()
                        .try_clone_to_owned()
                        .context("duplicate the metrics socket")?,
                );
                let sources: Vec<Arc<dyn MetricsSource>> =
                    vec![daemon_metrics, proxy_metrics, scaling_metrics, acme_metrics];
                let health_store = store.clone();
                let health: telemetry::HealthFn = Arc::new(move || {
                    health_store
                        .list_services()
                        .map(drop)
                        .map_err(|e| format!("the state store: {e}"))
                });
                Some(tokio::spawn(telemetry::serve(
                    listener,
                    sources,
                    health,
                    stop.clone(),
                )))
            }
            None => None,
        };
        inherited.close_rest();
        eprintln!(
            "lull daemon ready: admin socket {}, HTTP on port {}, HTTPS on port {}",
            config.socket.path.display(),
            http_port.map_or("off".to_owned(), |p| p.to_string()),
            https_port.map_or("off".to_owned(), |p| p.to_string())
        );
        let mut tasks = vec![api];
        tasks.extend(metrics_task);
        Ok(Running {
            proxy,
            control,
            stop_tx,
            tasks,
            acme_task,
            admin_fd,
            metrics_fd,
            proxy_threads,
        })
    }

    /// Every listening socket with its name, duplicated.
    fn listener_fds(&self) -> Result<Vec<(String, OwnedFd)>> {
        let mut fds = Vec::new();
        let mut counts: Vec<((bool, SocketAddr), usize)> = Vec::new();
        for socket in self
            .proxy
            .listener_fds()
            .context("duplicate the proxy's sockets")?
        {
            let key = (socket.tls, socket.addr);
            let index = match counts.iter_mut().find(|(a, _)| *a == key) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    counts.push((key, 0));
                    0
                }
            };
            let scheme = if socket.tls { "https" } else { "http" };
            fds.push((
                format!("{}{index}", proxy_fd_prefix(scheme, socket.addr)),
                socket.fd,
            ));
        }
        let admin = self
            .admin_fd
            .try_clone()
            .context("duplicate the admin socket")?;
        fds.push((ADMIN_FD.to_owned(), admin));
        if let Some(metrics) = &self.metrics_fd {
            let metrics = metrics
                .try_clone()
                .context("duplicate the metrics socket")?;
            fds.push((METRICS_FD.to_owned(), metrics));
        }
        Ok(fds)
    }

    /// Under systemd: hands every listening socket to its fd store, so that the next daemon
    /// gets them after a restart (systemd ignores one it holds already).
    fn store_fds(&self) {
        if std::env::var_os(lull_systemd::notify::NOTIFY_SOCKET).is_none() {
            return;
        }
        let fds = match self.listener_fds() {
            Ok(fds) => fds,
            Err(e) => {
                tracing::warn!("fd store: {e:#}");
                return;
            }
        };
        for (name, fd) in &fds {
            if let Err(e) =
                lull_systemd::notify_with_fds(&[("FDSTORE", "1"), ("FDNAME", name)], &[fd.as_fd()])
            {
                tracing::warn!(name, "fd store: {e}");
            }
        }
        tracing::info!(
            sockets = fds.len(),
            "listening sockets in systemd's fd store"
        );
    }

    /// Starts the lull executable on disk as the next daemon with every listening socket, and
    /// returns its pid once it serves. Before that, this daemon lets go of its instances; if
    /// the new daemon fails, it is killed and [`Running::take_back`] must follow.
    async fn hand_over(&self, launch: &Launch) -> Result<u32> {
        // A new daemon clears build scratch space and removes build sandboxes at start: a build
        // running here would be destroyed under this daemon's feet.
        if let Some(builds) = &self.control.builds
            && builds.running() > 0
        {
            bail!(
                "{} source build(s) running: upgrade when they have finished",
                builds.running()
            );
        }
        let exe = launch.executable()?;
        let fds = self.listener_fds()?;
        if let Some(tls) = &self.control.tls {
            // The order running (if any) ends first: its challenges are answered here.
            tls.acme.pause().await;
        }
        let detached = self.control.engine.detach().await;
        tracing::info!(services = ?detached, "supervisors detached for the handover");
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(std::io::Error::from)
            .context("a pipe for the new daemon's readiness")?;
        let pid = {
            let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
            let mut passed: Vec<BorrowedFd<'_>> = fds.iter().map(|(_, fd)| fd.as_fd()).collect();
            passed.push(write.as_fd());
            spawn_successor(&exe, &launch.args, &names, &passed)
                .with_context(|| format!("start {}", exe.display()))?
        };
        // Only the new daemon holds the pipe's writing end now: its end means the daemon's.
        drop(write);
        drop(fds);
        match wait_ready(read, pid, HANDOVER_DEADLINE).await {
            Ok(()) => Ok(pid.as_raw() as u32),
            Err(e) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ =
                    tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(pid, None)).await;
                Err(e)
            }
        }
    }

    /// After a failed handover: takes commands again, adopts the instances again (the failed
    /// daemon may have adopted some), and points the admin socket's credentials back here.
    async fn take_back(&self) {
        let engine = &self.control.engine;
        engine.reattach();
        if let Some(tls) = &self.control.tls {
            tls.acme.resume();
        }
        match engine.recover().await {
            Ok(report) => tracing::info!(adopted = ?report.adopted, "instances adopted again"),
            Err(e) => eprintln!("lull daemon: adopting the instances again: {e}"),
        }
        start_services(&self.control).await;
        // SAFETY: listen(2) on our own listening socket: only its backlog and the credentials
        // clients see change.
        if unsafe { libc::listen(self.admin_fd.as_raw_fd(), 128) } != 0 {
            tracing::warn!("admin socket: {}", std::io::Error::last_os_error());
        }
    }

    /// Stops serving: the admin socket and metrics close, the proxy drains. Instances keep
    /// running; the next daemon adopts them.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        self.acme_task.abort();
        let report = self.proxy.shutdown(DRAIN_GRACE).await;
        tracing::info!(?report, "proxy drained");
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn start_services(control: &Control) {
    match control.start_services().await {
        Ok(started) => {
            for (service, s) in started {
                eprintln!("starting {service} (revision {})", s.revision);
            }
        }
        Err(e) => eprintln!("warning: start services: {}", e.message),
    }
}

/// The admin socket: the passed one when it is bound to the configured path, else a new one.
fn admin_socket(
    passed: Option<OwnedFd>,
    options: &SocketOptions,
) -> Result<tokio::net::UnixListener, SocketError> {
    if let Some(fd) = passed {
        match api_server::adopt(std::os::unix::net::UnixListener::from(fd), options) {
            Ok(listener) => return Ok(listener),
            Err(e @ SocketError::InheritedPath { .. }) => {
                tracing::info!("{e}: binding a new one");
            }
            Err(e) => return Err(e),
        }
    }
    api_server::bind(options)
}

/// Waits until every routed pool with instances has one in rotation (adopted instances
/// pass their first health check), or `within` passes.
async fn wait_for_rotation(routes: &RouteTable, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let waiting: Vec<String> = routes
            .hosts()
            .into_iter()
            .filter(|host| {
                routes.lookup(host).is_some_and(|route| {
                    let pool = route.pool.snapshot();
                    !pool.paused
                        && !pool.instances.is_empty()
                        && !pool.instances.iter().any(|i| i.in_rotation())
                })
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(hosts = ?waiting, "accepting before these hosts' instances are in rotation");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How this daemon was started, to start the next one the same way.
struct Launch {
    /// `argv[0]`, as given.
    program: OsString,
    /// The working directory at start, for a relative `argv[0]`.
    cwd: PathBuf,
    args: Vec<OsString>,
}

impl Launch {
    fn current() -> Launch {
        let mut argv = std::env::args_os();
        let program = argv.next().unwrap_or_else(|| OsString::from("lull"));
        Launch {
            program,
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            args: argv.collect(),
        }
    }

    /// The executable the daemon's start command names now: after an upgrade, the new file
    /// (`/proc/self/exe` would be the old one).
    fn executable(&self) -> Result<PathBuf> {
        let program = Path::new(&self.program);
        if program.as_os_str().as_bytes().contains(&b'/') {
            let path = self.cwd.join(program);
            if path.is_file() {
                return Ok(path);
            }
            bail!("the lull executable {} is gone", path.display());
        }
        let search = std::env::var_os("PATH").unwrap_or_default();
        for dir in std::env::split_paths(&search) {
            let path = dir.join(program);
            if path.is_file() {
                return Ok(path);
            }
        }
        bail!("no {} executable in PATH", program.to_string_lossy())
    }
}

/// Forks and executes `exe` with `args`, passing `fds` as fds 3, 4, ...: every listening
/// socket named by `names` (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID` set to the child's
/// own pid), then the readiness pipe ([`READY_FD_VAR`]).
fn spawn_successor(
    exe: &Path,
    args: &[OsString],
    names: &[&str],
    fds: &[BorrowedFd<'_>],
) -> Result<nix::unistd::Pid> {
    use nix::fcntl::{FcntlArg, fcntl};
    let listen_count = names.len();
    let first = lull_systemd::listen::FIRST_FD;
    let ceiling = first + fds.len() as RawFd;
    // Every fd above the range it goes to, so the dup2's in the child cannot clobber one.
    let mut high: Vec<OwnedFd> = Vec::with_capacity(fds.len());
    for fd in fds {
        let raw = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(ceiling))
            .context("duplicate a socket to pass")?;
        // SAFETY: F_DUPFD_CLOEXEC just made this fd; we own it.
        high.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let high_raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();

    let cstring = |bytes: &[u8]| CString::new(bytes).context("a NUL byte in an argument");
    let exe_c = cstring(exe.as_os_str().as_bytes())?;
    let mut argv_c = vec![exe_c.clone()];
    for arg in args {
        argv_c.push(cstring(arg.as_bytes())?);
    }
    let mut env_c = Vec::new();
    for (key, value) in std::env::vars_os() {
        let key_bytes = key.as_bytes();
        if [
            &b"LISTEN_PID"[..],
            b"LISTEN_FDS",
            b"LISTEN_FDNAMES",
            READY_FD_VAR.as_bytes(),
        ]
        .contains(&key_bytes)
        {
            continue;
        }
        let mut entry = key_bytes.to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        env_c.push(cstring(&entry)?);
    }
    env_c.push(cstring(format!("LISTEN_FDS={listen_count}").as_bytes())?);
    env_c.push(cstring(
        format!("LISTEN_FDNAMES={}", names.join(":")).as_bytes(),
    )?);
    env_c.push(cstring(
        format!("{READY_FD_VAR}={}", first + listen_count as RawFd).as_bytes(),
    )?);
    // LISTEN_PID=<the child's pid>, written by the child into this buffer after the fork.
    const PID_PREFIX: &[u8] = b"LISTEN_PID=";
    let mut pid_var = vec![0u8; PID_PREFIX.len() + 24];
    pid_var[..PID_PREFIX.len()].copy_from_slice(PID_PREFIX);
    let pid_buf = pid_var.as_mut_ptr();

    let argv: Vec<*const libc::c_char> = argv_c
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = env_c
        .iter()
        .map(|c| c.as_ptr())
        .chain([pid_buf as *const libc::c_char, std::ptr::null()])
        .collect();
    // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
    let mut no_signals: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset on a sigset_t we own.
    unsafe { libc::sigemptyset(&mut no_signals) };

    // SAFETY: the child only calls async-signal-safe functions (sigprocmask, dup2, getpid,
    // execve, _exit) and writes to memory allocated before the fork; the parent goes on as
    // usual.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // SAFETY: in the child after fork: async-signal-safe calls on pre-allocated memory
        // only (see above); `_exit` if anything fails.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &no_signals, std::ptr::null_mut());
            for (i, fd) in high_raw.iter().enumerate() {
                if libc::dup2(*fd, first + i as RawFd) < 0 {
                    libc::_exit(126);
                }
            }
            // The pid's decimal digits after the prefix, then NUL.
            let mut digits = [0u8; 20];
            let mut n = libc::getpid() as u64;
            let mut len = 0;
            loop {
                digits[len] = b'0' + (n % 10) as u8;
                len += 1;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            for i in 0..len {
                *pid_buf.add(PID_PREFIX.len() + i) = digits[len - 1 - i];
            }
            *pid_buf.add(PID_PREFIX.len() + len) = 0;
            libc::execve(exe_c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    drop(high);
    Ok(nix::unistd::Pid::from_raw(pid))
}

/// Waits for `READY=1` on the pipe from the new daemon `pid`; an early end of the pipe means
/// it exited (or closed it) first.
async fn wait_ready(read: OwnedFd, pid: nix::unistd::Pid, within: Duration) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read)
        .context("watch the new daemon's readiness pipe")?;
    let wait = async {
        let mut said = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let n = pipe.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            said.extend_from_slice(&buf[..n]);
            if said.split(|b| *b == b'\n').any(|line| line == b"READY=1") {
                return Ok(true);
            }
        }
    };
    match tokio::time::timeout(within, wait).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => {
            let status = tokio::task::spawn_blocking(move || nix::sys::wait::waitpid(pid, None))
                .await
                .ok()
                .and_then(Result::ok);
            match status {
                Some(status) => {
                    bail!("the new daemon (pid {pid}) ended before it was ready: {status:?}")
                }
                None => bail!(
                    "the new daemon (pid {pid}) closed its readiness pipe before it was ready"
                ),
            }
        }
        Ok(Err(e)) => Err(e).context("reading the new daemon's readiness pipe"),
        Err(_) => bail!("the new daemon (pid {pid}) was not ready within {within:?}"),
    }
}

/// `lull daemon upgrade`: finds the daemon's pid from its admin socket (`SO_PEERCRED`),
/// sends it SIGUSR2 and waits until another daemon answers there and the old one is gone.
async fn upgrade(args: &DaemonArgs, upgrade: &UpgradeArgs) -> Result<ExitCode> {
    let config = match DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lull daemon upgrade: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let socket = config.socket.path.clone();
    let old = daemon_pid(&socket)
        .with_context(|| format!("no daemon answers on {}", socket.display()))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .with_context(|| format!("signal the daemon (pid {old})"))?;
    eprintln!("asked the daemon (pid {old}) to hand over to the lull executable on disk");
    let deadline = Instant::now() + Duration::from_secs(upgrade.timeout);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !process_runs(old)
            && let Ok(new) = daemon_pid(&socket)
            && new != old
        {
            println!("daemon upgraded: pid {old} handed over to pid {new}");
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            eprintln!(
                "lull daemon upgrade: no new daemon took over within {}s (pid {old} {}); see the daemon's log",
                upgrade.timeout,
                if process_runs(old) {
                    "serves on"
                } else {
                    "is gone"
                }
            );
            return Ok(ExitCode::FAILURE);
        }
    }
}

/// The pid of the process that listens on the admin socket at `path`.
fn daemon_pid(path: &Path) -> Result<u32> {
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_PEERCRED");
    }
    Ok(cred.pid as u32)
}

/// Whether `pid` runs (exists and is not a zombie).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The builder over the daemon's runtime and network (`[builder]` settings); sandboxes a
/// previous daemon left are removed first.
async fn source_builds(
    config: &DaemonConfig,
    runtime: &Arc<Runtime>,
    network: &Arc<dyn InstanceNetwork>,
    store: &Arc<dyn Store>,
    key: &Arc<SecretKey>,
) -> anyhow::Result<Option<Arc<lull_daemon::control::build::Builds>>> {
    use lull_builder::build::{Builder, BuilderSettings};
    use lull_builder::sandbox::SandboxLimits;
    let sandbox = Arc::new(lull_daemon::host::sandbox::RealSandbox::new(
        runtime.clone(),
        network.clone(),
        lull_runtime::logs::LogLimits::default(),
    ));
    sandbox.remove_leftovers().await;
    let b = &config.builder;
    let builder = Builder {
        store: runtime.store.clone(),
        layers: runtime.layers.clone(),
        runner: sandbox,
        settings: BuilderSettings {
            work_dir: config.data_dir.join("builds/work"),
            cache_dir: config.data_dir.join("build-cache"),
            extra_ca_certs: b.extra_ca_certs.clone(),
            limits: SandboxLimits {
                cpu: b.cpu,
                memory_bytes: b.memory_bytes,
                timeout: b.timeout,
                ..SandboxLimits::default()
            },
        },
    };
    // Scratch space of builds that a stopped daemon left half done.
    let _ = std::fs::remove_dir_all(&builder.settings.work_dir);
    std::fs::create_dir_all(&builder.settings.work_dir)
        .with_context(|| format!("create {}", builder.settings.work_dir.display()))?;
    let mut builds = lull_daemon::control::build::Builds::new(
        builder,
        b.base_images.clone(),
        lull_runtime::pull::PullOptions::default(),
        &config.data_dir,
    )
    .with_registry_credentials(Arc::new(registry_credentials(store.clone(), key.clone())));
    builds.max_upload = b.max_upload;
    builds.git_allow_local = b.git_allow_local;
    builds.slots = Arc::new(tokio::sync::Semaphore::new(b.concurrency));
    Ok(Some(Arc::new(builds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_fd_names_have_no_colon_and_match_their_address() {
        let v4: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let v6: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(http_fd_name(v4, 0), "http-0.0.0.0-80#0");
        assert_eq!(http_fd_name(v6, 3), "http-__-8080#3");
        assert_eq!(proxy_fd_prefix("https", v6), "https-__-8080#");
        for name in [http_fd_name(v4, 0), http_fd_name(v6, 3)] {
            assert!(lull_systemd::listen::valid_name(&name), "{name}");
        }
    }

    #[test]
    fn inherited_http_sockets_go_to_their_address_in_index_order() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = a.local_addr().unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = b.local_addr().unwrap();
        let a2 = a.try_clone().unwrap();
        let mut inherited = Inherited {
            fds: vec![
                ListenFd {
                    name: http_fd_name(addr, 1),
                    fd: a.into(),
                },
                ListenFd {
                    name: ADMIN_FD.into(),
                    fd: b.into(),
                },
                ListenFd {
                    name: http_fd_name(addr, 0),
                    fd: a2.into(),
                },
            ],
        };
        assert!(
            inherited
                .take_sockets(&http_fd_prefix(other), other)
                .is_empty()
        );
        let mine = inherited.take_sockets(&http_fd_prefix(addr), addr);
        assert_eq!(mine.len(), 2);
        assert!(mine.iter().all(|s| s.local_addr().unwrap() == addr));
        assert!(inherited.take(METRICS_FD).is_none());
        let admin = inherited.take(ADMIN_FD).expect("the admin fd is left");
        assert_eq!(
            std::net::TcpListener::from(admin).local_addr().unwrap(),
            other
        );
        assert!(inherited.fds.is_empty());
    }

    #[test]
    fn the_executable_is_looked_up_again() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("lull");
        std::fs::write(&exe, b"v1").unwrap();
        let launch = Launch {
            program: OsString::from("./lull"),
            cwd: dir.path().to_owned(),
            args: vec![],
        };
        assert_eq!(launch.executable().unwrap(), dir.path().join("./lull"));
        std::fs::remove_file(&exe).unwrap();
        assert!(
            launch.executable().is_err(),
            "a removed executable is reported"
        );
    }

    #[test]
    fn a_zombie_or_missing_process_does_not_run() {
        assert!(process_runs(std::process::id()));
        assert!(!process_runs(u32::MAX - 1));
    }
}
