//! `lull daemon`: the control plane. Reads `lull.toml` (every key optional), then brings up,
//! in order: the state store, the secrets key, the runtime, the instance network, the proxy's
//! listeners, the deployment engine (adopting instances that still run), the admin socket and
//! the metrics endpoint. SIGTERM or Ctrl-C stop it; instances keep running and the next daemon
//! adopts them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use lull_daemon::api::server::{self as api_server, SocketOptions};
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

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The daemon's settings (a missing file means every default).
    #[arg(long, env = "LULL_CONFIG", default_value = lull_daemon::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Check the settings, print them and exit.
    #[arg(long)]
    pub check: bool,
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

pub async fn run(args: &DaemonArgs, cgroup_parent: &str) -> Result<ExitCode> {
    let config = match DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lull daemon: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if args.check {
        println!("{config:#?}");
        return Ok(ExitCode::SUCCESS);
    }
    let daemon = Running::start(&config, cgroup_parent).await?;
    notify_ready();
    wait_for_stop().await;
    eprintln!("lull daemon stopping (instances keep running; the next daemon adopts them)");
    daemon.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// A daemon serving in this process.
pub struct Running {
    proxy: Proxy,
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Brings the control plane up with `config`: store, key, runtime, network, proxy,
    /// engine (adopting what runs), services, admin socket, metrics.
    pub async fn start(config: &DaemonConfig, cgroup_parent: &str) -> Result<Running> {
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
        runtime_config.cgroup_parent = cgroup_parent.to_owned();
        let runtime = Arc::new(Runtime::open(runtime_config).context("open the runtime")?);
        let (network, report) =
            tokio::task::block_in_place(|| HostNetwork::start(config.network.clone()))
                .context("set up the instance network")?;
        for conflict in &report.conflicts {
            eprintln!("warning: {conflict}");
        }
        let network: Arc<dyn InstanceNetwork> = Arc::new(network);
        let host = Arc::new(
            RealHost::new(
                runtime,
                network,
                RealHostConfig::under(&config.data_dir)
                    .with_retained_logs_max_bytes(config.logs.max_bytes),
            )
            .context("the instance host")?
            .with_registry_credentials(Arc::new(registry_credentials(store.clone(), key.clone()))),
        );

        let routes = Arc::new(RouteTable::new());
        let proxy_metrics = Arc::new(ProxyMetrics::new());
        let daemon_metrics = Arc::new(DaemonMetrics::new());
        let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
        let mut http_port = None;
        if let Some(listen) = &config.listeners.http {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let runtimes = lull_proxy::server::spawn_runtimes(cpus, "lull-proxy")
                .context("start the proxy's threads")?;
            for addr in addresses(listen) {
                match proxy.listen_on(addr, &runtimes) {
                    Ok(bound) => {
                        http_port = Some(bound.port());
                        tracing::info!(%bound, "serving HTTP");
                    }
                    Err(e) if addr.is_ipv6() && listen.ip.is_none() => {
                        tracing::warn!("no IPv6 listener: {e}");
                    }
                    Err(e) => return Err(e).context("the HTTP listener"),
                }
            }
        }
        if config.listeners.https.is_some() {
            tracing::info!(
                "HTTPS listener: certificates are not configured yet; serving HTTP only"
            );
        }

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
        let engine = Engine::new(host, store.clone(), routes, planner, settings)
            .with_proxy_metrics(proxy_metrics.clone())
            .with_daemon_metrics(daemon_metrics.clone())
            .with_redaction({
                let key = key.clone();
                Arc::new(move |s: &dyn Store| secrets_redactor(s, &key))
            })
            .with_access_logs(AccessLogs {
                dir: config.data_dir.join("logs/access"),
                max_bytes: Some(config.logs.max_bytes),
            });
        let recovered = engine.recover().await.context("adopt running instances")?;
        if !recovered.adopted.is_empty() || !recovered.stopped.is_empty() {
            eprintln!(
                "adopted {} running instance(s), stopped {} of deleted services",
                recovered.adopted.len(),
                recovered.stopped.len()
            );
        }
        let control = Arc::new(Control {
            store: store.clone(),
            engine,
            base_domain: config.base_domain.clone(),
            http_port,
            key: Some(key),
        });
        match control.start_services().await {
            Ok(started) => {
                for (service, s) in started {
                    eprintln!("starting {service} (revision {})", s.revision);
                }
            }
            Err(e) => eprintln!("warning: start services: {}", e.message),
        }

        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let listener = api_server::bind(&SocketOptions {
            path: config.socket.path.clone(),
            mode: 0o660,
            group: Some(config.socket.group.clone()),
        })
        .context("the admin socket")?;
        let api = tokio::spawn(api_server::serve(
            listener,
            Arc::new(handlers::router()),
            control.clone(),
            stop.clone(),
        ));
        let metrics_task = match config.metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("the metrics listener on {addr}"))?;
                let sources: Vec<Arc<dyn MetricsSource>> = vec![daemon_metrics, proxy_metrics];
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
        eprintln!(
            "lull daemon ready: admin socket {}, HTTP on port {}",
            config.socket.path.display(),
            http_port.map_or("off".to_owned(), |p| p.to_string())
        );
        let mut tasks = vec![api];
        tasks.extend(metrics_task);
        Ok(Running {
            proxy,
            stop_tx,
            tasks,
        })
    }

    /// Stops serving: the admin socket and metrics close, the proxy drains. Instances keep
    /// running; the next daemon adopts them.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        let report = self.proxy.shutdown(Duration::from_secs(10)).await;
        tracing::info!(?report, "proxy drained");
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("no SIGTERM handler: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Tells systemd (Type=notify) the daemon is ready, when it started us.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let sent = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.send_to(b"READY=1\nSTATUS=serving\n", &path));
    if let Err(e) = sent {
        tracing::warn!("sd_notify: {e}");
    }
}
