//! The control plane in this process over a [`FakeHost`], for tests without root (this crate's
//! and the CLI's): the real store (SQLite), engine, proxy on loopback and admin socket, with
//! timings shortened for tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lull_proxy::{Proxy, ProxyOptions, RouteTable};

use crate::api::Client;
use crate::api::server::{self, SocketOptions};
use crate::control::planner::SpecPlanner;
use crate::control::{Control, handlers};
use crate::engine::{AccessLogs, Engine, EngineSettings};
use crate::host::fake::FakeHost;
use crate::secrets::SecretKey;
use crate::store::{SqliteStore, Store};

/// A running in-process control plane; it stops when dropped.
pub struct InProcess {
    pub client: Client,
    pub socket: PathBuf,
    /// The proxy's HTTP address (services answer on `<name>.localhost` there).
    pub proxy_addr: SocketAddr,
    pub host: FakeHost,
    pub store: Arc<dyn Store>,
    pub key: Arc<SecretKey>,
    /// The HTTPS side, when started with [`InProcess::start_tls`].
    pub tls: Option<Arc<crate::control::domains::TlsControl>>,
    /// The proxy's HTTPS address, when started with [`InProcess::start_tls`].
    pub https_addr: Option<SocketAddr>,
    _stop: tokio::sync::watch::Sender<bool>,
    _proxy: Proxy,
    _acme: Option<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`InProcess::start_tls`] sets up beyond [`InProcess::start`].
pub struct TlsSetup {
    /// Where the proxy serves plain HTTP (ACME's HTTP-01 is answered here).
    pub http: SocketAddr,
    /// Where it serves HTTPS.
    pub https: SocketAddr,
    pub acme: crate::config::AcmeConfig,
    pub base_domain: Option<String>,
}

/// The engine's timings for tests: quick startup deadlines and stops.
pub fn test_settings() -> EngineSettings {
    EngineSettings {
        rollback_window: Duration::from_secs(60),
        startup_deadline: Duration::from_secs(5),
        stop_grace: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(2),
        ..EngineSettings::default()
    }
}

impl InProcess {
    /// Starts it with its state, secrets key, access logs and socket under `dir`.
    ///
    /// # Panics
    /// When a part cannot start: this is for tests.
    pub async fn start(dir: &Path) -> InProcess {
        InProcess::start_with(dir, None).await
    }

    /// [`InProcess::start`] with an HTTPS listener, the certificate store, the port-80 edge
    /// (challenges, redirects) and the ACME manager as the daemon has them.
    ///
    /// # Panics
    /// When a part cannot start: this is for tests.
    pub async fn start_tls(dir: &Path, setup: TlsSetup) -> InProcess {
        InProcess::start_with(dir, Some(setup)).await
    }

    /// Stops it and waits until its listening sockets are closed (so a next one may bind the
    /// same ports).
    pub async fn shutdown(self) {
        let _ = self._stop.send(true);
        self._proxy.shutdown(Duration::from_millis(200)).await;
    }

    async fn start_with(dir: &Path, setup: Option<TlsSetup>) -> InProcess {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.join("data")).expect("open the state store"));
        let key = Arc::new(SecretKey::load_or_create(&dir.join("data")).expect("the secrets key"));
        let routes = Arc::new(RouteTable::new());
        let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
        let http = setup
            .as_ref()
            .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |s| s.http);
        let proxy_addr = proxy.listen(http).await.expect("the proxy's listener");
        let base_domain = setup.as_ref().and_then(|s| s.base_domain.clone());
        let mut https_addr = None;
        let mut tls = None;
        let mut acme_task = None;
        if let Some(setup) = setup {
            let mut config =
                crate::config::DaemonConfig::with_dirs(dir.join("data"), dir.join("run"));
            config.acme = setup.acme;
            config.base_domain = setup.base_domain.clone();
            let certificates = Arc::new(
                crate::certs::Certificates::start(&config.tls).expect("the certificate store"),
            );
            let http01 = Arc::new(lull_proxy::tls::Http01Challenges::new());
            let acceptor = lull_proxy::tls::acceptor_for(certificates.store().clone())
                .expect("the TLS configuration");
            let bound = proxy
                .listen_tls(setup.https, acceptor)
                .await
                .expect("the proxy's HTTPS listener");
            proxy.set_edge(lull_proxy::Edge {
                http01: http01.clone(),
                certificates: Some(certificates.store().clone()),
                https_port: bound.port(),
            });
            let (control, task) =
                crate::control::domains::start_tls(&config, store.clone(), certificates, http01)
                    .expect("certificates and ACME");
            https_addr = Some(bound);
            tls = Some(control);
            acme_task = Some(AbortOnDrop(task));
        }
        let planner = Arc::new(SpecPlanner {
            store: store.clone(),
            key: Some(key.clone()),
            base_domain: base_domain.clone(),
        });
        let host = FakeHost::new();
        let engine = Engine::new(
            Arc::new(host.clone()),
            store.clone(),
            routes,
            planner,
            test_settings(),
        )
        .with_access_logs(AccessLogs {
            dir: dir.join("access"),
            max_bytes: None,
        })
        .with_redaction({
            let key = key.clone();
            Arc::new(move |s: &dyn Store| crate::control::secrets::secrets_redactor(s, &key))
        });
        let control = Arc::new(Control {
            store: store.clone(),
            engine,
            base_domain,
            http_port: Some(proxy_addr.port()),
            key: Some(key.clone()),
            builds: None,
            tls: tls.clone(),
        });
        let socket = dir.join("lull.sock");
        let listener = server::bind(&SocketOptions::new(&socket)).expect("the admin socket");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(server::serve(
            listener,
            Arc::new(handlers::router()),
            control,
            stopped,
        ));
        InProcess {
            client: Client::new(&socket),
            socket,
            proxy_addr,
            host,
            store,
            key,
            tls,
            https_addr,
            _stop: stop,
            _proxy: proxy,
            _acme: acme_task,
        }
    }
}
