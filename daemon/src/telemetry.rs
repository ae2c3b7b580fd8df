//! The daemon's metrics and health endpoint: Prometheus text (OpenMetrics) from every
//! registry (daemon, proxy, runtime) on `GET /metrics`, and `GET /healthz` answering 200
//! while the daemon's parts work and 503 with the reason when one does not.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Something that renders metrics in the OpenMetrics text format.
pub trait MetricsSource: Send + Sync {
    fn encode(&self) -> String;
}

impl MetricsSource for lull_proxy::metrics::ProxyMetrics {
    fn encode(&self) -> String {
        lull_proxy::metrics::ProxyMetrics::encode(self)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    service: String,
    cause: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    service: String,
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

type HistogramFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

fn deploy_histogram() -> Histogram {
    // 50 ms to about 7 minutes.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.05, 2.0, 14,
    ))
}

/// The control plane's own series, all named `lull_daemon_*`.
pub struct DaemonMetrics {
    registry: Registry,
    deployments: Family<OutcomeLabels, Counter>,
    deploy_duration: HistogramFamily,
    restarts: Family<CauseLabels, Counter>,
    events: Family<KindLabels, Counter>,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        DaemonMetrics::new()
    }
}

impl std::fmt::Debug for DaemonMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DaemonMetrics")
    }
}

impl DaemonMetrics {
    pub fn new() -> DaemonMetrics {
        let mut registry = Registry::with_prefix("lull_daemon");
        let deployments = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deployments",
            "Deployments finished, by service and outcome (succeeded, failed)",
            deployments.clone(),
        );
        let deploy_duration: HistogramFamily = Family::new_with_constructor(deploy_histogram);
        registry.register_with_unit(
            "deploy_duration",
            "Time from a deployment's start to traffic on the new revision (successful ones)",
            Unit::Seconds,
            deploy_duration.clone(),
        );
        let restarts = Family::<CauseLabels, Counter>::default();
        registry.register(
            "instance_restarts",
            "Instances restarted, by service and cause (exit, oom, unhealthy)",
            restarts.clone(),
        );
        let events = Family::<KindLabels, Counter>::default();
        registry.register(
            "events",
            "Lifecycle events recorded, by service and kind (deploy.started, instance.healthy, ...)",
            events.clone(),
        );
        DaemonMetrics {
            registry,
            deployments,
            deploy_duration,
            restarts,
            events,
        }
    }

    pub fn deployment_finished(&self, service: &str, succeeded: bool, took: Duration) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.deployments
            .get_or_create(&OutcomeLabels {
                service: service.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        if succeeded {
            self.deploy_duration
                .get_or_create(&ServiceLabels {
                    service: service.to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    pub fn instance_restarted(&self, service: &str, cause: &str) {
        self.restarts
            .get_or_create(&CauseLabels {
                service: service.to_owned(),
                cause: cause.to_owned(),
            })
            .inc();
    }

    pub fn event(&self, service: &str, kind: &str) {
        self.events
            .get_or_create(&KindLabels {
                service: service.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }
}

impl MetricsSource for DaemonMetrics {
    fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

/// All sources in one exposition: each source's `# EOF` dropped, one at the end.
pub fn encode_all(sources: &[Arc<dyn MetricsSource>]) -> String {
    let mut out = String::new();
    for source in sources {
        for line in source.encode().lines() {
            if line != "# EOF" {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str("# EOF\n");
    out
}

/// Errors getting the metrics endpoint's socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("metrics listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The metrics endpoint's socket on `addr`: `inherited` when it is bound there (a socket a
/// previous daemon passed on), else a new one (an inherited socket bound elsewhere, left
/// from an older setting, is closed). Returns the socket and whether it was inherited. Must
/// be called within a tokio runtime.
pub fn listener(
    addr: SocketAddr,
    inherited: Option<std::net::TcpListener>,
) -> Result<(TcpListener, bool), ListenerError> {
    let bind = |source| ListenerError::Bind { addr, source };
    let (socket, adopted) = match inherited {
        Some(socket) if socket.local_addr().ok() == Some(addr) => (socket, true),
        Some(other) => {
            tracing::info!(addr = %addr, found = ?other.local_addr().ok(), "inherited metrics socket is bound elsewhere: binding a new one");
            drop(other);
            (std::net::TcpListener::bind(addr).map_err(bind)?, false)
        }
        None => (std::net::TcpListener::bind(addr).map_err(bind)?, false),
    };
    socket.set_nonblocking(true).map_err(bind)?;
    Ok((TcpListener::from_std(socket).map_err(bind)?, adopted))
}

/// Whether the daemon works: `Err(reason)` makes `/healthz` answer 503 with it.
pub type HealthFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    sources: Vec<Arc<dyn MetricsSource>>,
    health: HealthFn,
    mut shutdown: watch::Receiver<bool>,
) {
    let sources = Arc::new(sources);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let sources = sources.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let sources = sources.clone();
                let health = health.clone();
                async move { Ok::<_, Infallible>(answer(&req, &sources, &health)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    sources: &[Arc<dyn MetricsSource>],
    health: &HealthFn,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        resp
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics and GET /healthz are served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode_all(sources),
        ),
        "/healthz" => match health() {
            Ok(()) => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("unhealthy: {reason}\n"),
            ),
        },
        other => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("{other}: not here (GET /metrics, GET /healthz)\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, "metrics")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn metrics_of_all_sources_and_health() {
        let daemon = Arc::new(DaemonMetrics::new());
        daemon.deployment_finished("web", true, Duration::from_millis(420));
        daemon.deployment_finished("web", false, Duration::from_secs(1));
        daemon.instance_restarted("web", "exit");
        daemon.event("web", "deploy.started");
        let proxy = Arc::new(lull_proxy::metrics::ProxyMetrics::new());
        proxy.observe_request("web", 200, Duration::from_millis(3));
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let health: HealthFn = Arc::new(move || {
            if h.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the state store does not answer".into())
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(serve(listener, vec![daemon, proxy], health, stop));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("lull_daemon_deployments_total{service=\"web\",outcome=\"succeeded\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("lull_daemon_deployments_total{service=\"web\",outcome=\"failed\"} 1")
        );
        assert!(body.contains("lull_daemon_deploy_duration_seconds_count{service=\"web\"} 1"));
        assert!(
            body.contains("lull_daemon_instance_restarts_total{service=\"web\",cause=\"exit\"} 1")
        );
        assert!(
            body.contains("lull_daemon_events_total{service=\"web\",kind=\"deploy.started\"} 1")
        );
        assert!(
            body.contains("lull_proxy_requests_total{service=\"web\""),
            "{body}"
        );
        assert_eq!(body.matches("# EOF").count(), 1);
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/healthz").await, (StatusCode::OK, "ok\n".into()));
        healthy.store(false, Ordering::Relaxed);
        let (status, body) = get(addr, "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("state store"));
        assert_eq!(get(addr, "/nope").await.0, StatusCode::NOT_FOUND);

        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn keeps_an_inherited_socket_on_its_address_and_rebinds_otherwise() {
        let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = inherited.local_addr().unwrap();
        let (listener, adopted) = super::listener(addr, Some(inherited)).unwrap();
        assert!(adopted);
        assert_eq!(listener.local_addr().unwrap(), addr);
        drop(listener);

        let stale = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stale_addr = stale.local_addr().unwrap();
        let wanted = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let wanted_addr = wanted.local_addr().unwrap();
        drop(wanted);
        let (listener, adopted) = super::listener(wanted_addr, Some(stale)).unwrap();
        assert!(!adopted);
        assert_eq!(listener.local_addr().unwrap(), wanted_addr);
        // The stale socket was closed.
        assert!(std::net::TcpStream::connect(stale_addr).is_err());
    }
}
