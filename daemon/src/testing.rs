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
    _stop: tokio::sync::watch::Sender<bool>,
    _proxy: Proxy,
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
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.join("data")).expect("open the state store"));
        let key = Arc::new(SecretKey::load_or_create(&dir.join("data")).expect("the secrets key"));
        let routes = Arc::new(RouteTable::new());
        let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
        let proxy_addr = proxy
            .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("the proxy's listener");
        let planner = Arc::new(SpecPlanner {
            store: store.clone(),
            key: Some(key.clone()),
            base_domain: None,
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
            base_domain: None,
            http_port: Some(proxy_addr.port()),
            key: Some(key.clone()),
            builds: None,
            tls: None,
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
            _stop: stop,
            _proxy: proxy,
        }
    }
}
