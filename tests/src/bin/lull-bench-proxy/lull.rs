//! lull as a contender: `lull_proxy::Proxy` in this process as the daemon embeds it, on
//! threads of its own, with one pool of the four instances; and the pools behind the real CPU
//! gates that the gate's runs route to.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result};
use lull_proxy::config::ServiceConfig;
use lull_proxy::gate::NoCpuControl;
use lull_proxy::metrics::ProxyMetrics;
use lull_proxy::pool::{InstanceSpec, Pool, PoolEvent};
use lull_proxy::{Proxy, ProxyOptions, Route, RouteTable};

use crate::HOST;
use crate::apps::App;

/// Threads (each a current-thread runtime) serving lull's proxy: one per CPU of this machine.
const PROXY_THREADS: usize = 2;
/// Their names' prefix (`spawn_runtimes` appends `-<n>`).
pub(crate) const PROXY_THREAD_NAME: &str = "lull-proxy";
/// `--serve`'s second lull, without the HTTP/1 fast path.
pub(crate) const HYPER_ONLY_THREAD_NAME: &str = "lull-hyper";

pub(crate) struct LullProxy {
    pub(crate) proxy: Proxy,
    routes: Arc<RouteTable>,
    pub(crate) addr: SocketAddr,
    /// Keeps the pool's event channel open.
    _events: tokio::sync::mpsc::UnboundedReceiver<PoolEvent>,
}

impl LullProxy {
    /// The proxy as the daemon embeds it: one pool of all upstreams at `HOST`.
    /// lull on `upstreams`, served by threads named `thread_name`, its HTTP/1 fast path on
    /// or off.
    pub(crate) async fn start(
        upstreams: &[SocketAddr],
        thread_name: &str,
        http1_fast_path: bool,
    ) -> Result<LullProxy> {
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let metrics = Arc::new(ProxyMetrics::new());
        let pool = Pool::with_metrics(
            "bench",
            Arc::new(ServiceConfig::default()),
            events_tx,
            metrics,
        );
        for (i, addr) in upstreams.iter().enumerate() {
            let id = format!("bench-{i}");
            pool.add_instance(InstanceSpec {
                id: id.clone(),
                addr: *addr,
                cpu: Arc::new(NoCpuControl),
            });
            pool.set_healthy(&id, true, "bench");
        }
        let routes = Arc::new(RouteTable::new());
        routes.insert(HOST, Route::new(pool, "rev-1"));
        let options = ProxyOptions {
            http1_fast_path,
            ..ProxyOptions::default()
        };
        let proxy = Proxy::new(routes.clone(), options);
        // One current-thread runtime per CPU, each with its own SO_REUSEPORT socket, as the
        // daemon runs the proxy.
        let addr = proxy
            .listen_on(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                &lull_proxy::server::spawn_runtimes(PROXY_THREADS, thread_name)
                    .context("start the proxy's threads")?,
            )
            .context("start lull's proxy")?;
        Ok(LullProxy {
            proxy,
            routes,
            addr,
            _events: events,
        })
    }

    /// Routes `host` to a new pool of `apps` behind their real CPU gates; the instances are
    /// healthy (so throttled) when this returns.
    pub(crate) fn gate_route(&self, host: &str, apps: &[&App]) -> Arc<Pool> {
        let (events_tx, _) = tokio::sync::mpsc::unbounded_channel();
        let pool = Pool::new(host, Arc::new(ServiceConfig::default()), events_tx);
        for (i, app) in apps.iter().enumerate() {
            let id = format!("{host}-{i}");
            pool.add_instance(InstanceSpec {
                id: id.clone(),
                addr: app.addr,
                cpu: app.gate.clone(),
            });
            pool.set_healthy(&id, true, "bench");
        }
        self.routes.insert(host, Route::new(pool.clone(), "rev-1"));
        pool
    }

    /// Undoes [`LullProxy::gate_route`]: the instances leave the pool, which restores their CPU.
    pub(crate) fn remove_gate_route(&self, host: &str, pool: &Pool) {
        self.routes.remove(host);
        for instance in pool.snapshot().instances {
            pool.remove_instance(&instance.id);
        }
    }
}
