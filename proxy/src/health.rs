//! Health checks: one prober per instance of a pool, HTTP (a GET of the service's path,
//! healthy on a status in its range) or TCP (a connection that opens), with the service's
//! interval, timeout and thresholds. Probers put instances in rotation and take them out
//! through [`Pool::set_healthy`], which tells the daemon why.
//!
//! A probe holds the instance's CPU through the gate (a throttled app would fail it) without
//! counting as a request. Until an instance is healthy the first time it is probed every
//! [`STARTUP_INTERVAL`] (bounded by the service's interval), so a new instance takes traffic
//! as soon as it answers; a suspect instance is probed at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::config::{HealthProbe, ServiceConfig, UpstreamProtocol};
use crate::pool::{Pool, Slot};

/// How often an instance that has never been healthy is probed.
pub const STARTUP_INTERVAL: Duration = Duration::from_millis(10);

/// Why a probe failed; its `Display` is the reason the daemon is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {reason}")]
    Connect { reason: String },
    #[error("timed out after {}", human(*.after))]
    TimedOut { after: Duration },
    #[error("GET {path}: {status}")]
    Status { path: String, status: u16 },
    #[error("GET {path}: {reason}")]
    Http { path: String, reason: String },
}

/// Probes `addr` once as `config.health` says. Returns the reason it is healthy (e.g.
/// "GET /healthz: 200", "connect: ok").
pub async fn probe(addr: SocketAddr, config: &ServiceConfig) -> Result<String, ProbeError> {
    let timeout = config.health.timeout;
    match tokio::time::timeout(timeout, probe_once(addr, config)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::TimedOut { after: timeout }),
    }
}

async fn probe_once(addr: SocketAddr, config: &ServiceConfig) -> Result<String, ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ProbeError::Connect {
            reason: io_reason(&e),
        })?;
    let HealthProbe::Http {
        path,
        min_status,
        max_status,
    } = &config.health.probe
    else {
        return Ok("connect: ok".to_owned());
    };
    let http_err = |reason: String| ProbeError::Http {
        path: path.clone(),
        reason,
    };
    // HTTP/1.1 wants the path and a Host header; HTTP/2 the whole URI (its :authority).
    let (uri, host) = match config.upstream {
        UpstreamProtocol::Http1 => (path.clone(), Some(addr.to_string())),
        UpstreamProtocol::H2c => (format!("http://{addr}{path}"), None),
    };
    let mut request = hyper::Request::get(uri).header(hyper::header::USER_AGENT, "lull-health");
    if let Some(host) = host {
        request = request.header(hyper::header::HOST, host);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_err(e.to_string()))?;
    let io = TokioIo::new(stream);
    let status = match config.upstream {
        UpstreamProtocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let result = sender.send_request(request).await;
            conn.abort();
            result.map_err(|e| http_err(e.to_string()))?.status()
        }
        UpstreamProtocol::H2c => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| http_err(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let result = sender.send_request(request).await;
            conn.abort();
            result.map_err(|e| http_err(e.to_string()))?.status()
        }
    };
    let status = status.as_u16();
    if (*min_status..=*max_status).contains(&status) {
        Ok(format!("GET {path}: {status}"))
    } else {
        Err(ProbeError::Status {
            path: path.clone(),
            status,
        })
    }
}

/// "refused", "reset", or the OS's message in lower case.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".to_owned(),
        std::io::ErrorKind::ConnectionReset => "reset".to_owned(),
        _ => {
            let text = e.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            text.to_lowercase()
        }
    }
}

/// "2s", "1.5s" or "300ms".
fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d >= Duration::from_secs(1) {
        format!("{}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Probes every instance of one pool, following its instances as they come and go. Dropping
/// it stops every prober.
pub struct HealthChecker {
    task: JoinHandle<()>,
}

impl HealthChecker {
    /// Starts checking `pool`'s instances (must be called within a tokio runtime).
    pub fn spawn(pool: Arc<Pool>) -> HealthChecker {
        HealthChecker {
            task: tokio::spawn(supervise(pool)),
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Aborts a prober when dropped (so the supervisor's own abort stops them all).
struct Prober(JoinHandle<()>);

impl Drop for Prober {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn supervise(pool: Arc<Pool>) {
    let mut members = pool.subscribe_members();
    // Keyed by the slot's address (an id may come back as a new instance).
    let mut probers: HashMap<usize, (Arc<Slot>, Prober)> = HashMap::new();
    loop {
        members.borrow_and_update();
        let slots = pool.slots();
        probers.retain(|_, (slot, _)| slots.iter().any(|s| Arc::ptr_eq(s, slot)));
        for slot in slots {
            let key = Arc::as_ptr(&slot) as usize;
            probers.entry(key).or_insert_with(|| {
                let task = tokio::spawn(run_prober(pool.clone(), slot.clone()));
                (slot, Prober(task))
            });
        }
        if members.changed().await.is_err() {
            return;
        }
    }
}

/// Holds an instance's CPU for one probe.
struct ProbeHold<'a> {
    pool: &'a Pool,
    slot: &'a Arc<Slot>,
}

impl<'a> ProbeHold<'a> {
    fn new(pool: &'a Pool, slot: &'a Arc<Slot>) -> Self {
        slot.gate.enter_probe();
        ProbeHold { pool, slot }
    }
}

impl Drop for ProbeHold<'_> {
    fn drop(&mut self) {
        let idle = self.slot.gate.leave_probe();
        self.pool.on_idle(self.slot, idle);
    }
}

async fn run_prober(pool: Arc<Pool>, slot: Arc<Slot>) {
    let config = pool.config().clone();
    let health = &config.health;
    // The prober's view: whether it has put the instance in rotation.
    let mut healthy = false;
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut first = true;
    let since = std::time::Instant::now();
    let (mut ever_healthy, mut startup_reported) = (false, false);
    loop {
        if !first {
            let started = pool.has_started(&slot);
            let wait = match started {
                true => health.interval,
                false => STARTUP_INTERVAL.min(health.interval),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = slot.probe_now.notified() => {
                    // A suspect mark: confirming it takes a full run of successes.
                    successes = 0;
                }
            }
        }
        first = false;
        // Idle tier 2: a frozen instance cannot answer, and thawing it for every check would
        // keep it from ever staying frozen. It is checked again once a request wakes it (the
        // request itself would mark it suspect if it no longer answered).
        if slot.gate.is_frozen() {
            continue;
        }
        let result = {
            let _hold = ProbeHold::new(&pool, &slot);
            probe(slot.addr, &config).await
        };
        let suspect = pool.is_suspect(&slot);
        match result {
            Ok(reason) => {
                successes = successes.saturating_add(1);
                failures = 0;
                if (!healthy || suspect) && successes >= health.healthy_threshold {
                    healthy = true;
                    ever_healthy = true;
                    pool.set_healthy(&slot.id, true, &reason);
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                successes = 0;
                let reason = e.to_string();
                tracing::debug!(service = %pool.service(), instance = %slot.id, %reason, "health check failed");
                if (healthy || suspect) && failures >= health.unhealthy_threshold {
                    healthy = false;
                    pool.set_healthy(&slot.id, false, &reason);
                }
                // Never healthy yet: say so once the app has had as long as a healthy
                // instance would need to be declared unhealthy (startup probes are frequent,
                // so counting them would report every slow start).
                let grace = health.interval * health.unhealthy_threshold;
                if !healthy && !ever_healthy && !startup_reported && since.elapsed() >= grace {
                    startup_reported = true;
                    pool.report_startup_failure(
                        &slot.id,
                        &format!(
                            "not healthy {:?} after it started: {reason}",
                            since.elapsed()
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(all(test, not(lull_loom)))]
mod tests {
    use super::*;
    use crate::config::{HealthCheck, HealthProbe};
    use crate::gate::CpuControl;
    use crate::pool::{InstanceSpec, PoolEvent};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU16, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// A tiny HTTP/1.1 server answering every request with the current `status`.
    async fn server(status: Arc<AtomicU16>, delay: Duration) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let status = status.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&seen);
                    assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
                    assert!(
                        head.to_lowercase().contains("\r\nhost: 127.0.0.1:"),
                        "{head}"
                    );
                    tokio::time::sleep(delay).await;
                    let code = status.load(Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn http_config(timeout_ms: u64) -> ServiceConfig {
        ServiceConfig {
            health: HealthCheck {
                probe: HealthProbe::Http {
                    path: "/healthz".into(),
                    min_status: 200,
                    max_status: 399,
                },
                interval: Duration::from_millis(timeout_ms * 3),
                timeout: Duration::from_millis(timeout_ms),
                healthy_threshold: 2,
                unhealthy_threshold: 2,
            },
            ..ServiceConfig::default()
        }
    }

    /// A port with nothing listening on it.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn http_probe_reports_status_refusal_and_timeout() {
        let status = Arc::new(AtomicU16::new(200));
        let addr = server(status.clone(), Duration::ZERO).await;
        let config = http_config(500);
        assert_eq!(probe(addr, &config).await.unwrap(), "GET /healthz: 200");
        status.store(500, Ordering::SeqCst);
        assert_eq!(
            probe(addr, &config).await.unwrap_err().to_string(),
            "GET /healthz: 500"
        );
        let closed = closed_port().await;
        assert_eq!(
            probe(closed, &config).await.unwrap_err().to_string(),
            "connect: refused"
        );
        let slow = server(Arc::new(AtomicU16::new(200)), Duration::from_secs(5)).await;
        let started = std::time::Instant::now();
        assert_eq!(
            probe(slow, &config).await.unwrap_err().to_string(),
            "timed out after 500ms"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(human(Duration::from_secs(2)), "2s");
    }

    #[tokio::test]
    async fn tcp_probe_needs_only_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = ServiceConfig::default();
        assert_eq!(
            probe(listener.local_addr().unwrap(), &config)
                .await
                .unwrap(),
            "connect: ok"
        );
        let closed = closed_port().await;
        drop(listener);
        assert!(matches!(
            probe(closed, &config).await,
            Err(ProbeError::Connect { .. })
        ));
    }

    #[derive(Default)]
    struct HeldCpu {
        calls: Mutex<Vec<&'static str>>,
    }

    impl CpuControl for HeldCpu {
        fn restore(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("restore");
            Ok(())
        }
        fn throttle(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("throttle");
            Ok(())
        }
        fn usage_ns(&self) -> Option<u64> {
            None
        }
    }

    async fn next_health(events: &mut mpsc::UnboundedReceiver<PoolEvent>) -> (bool, String) {
        let deadline = Duration::from_secs(5);
        loop {
            match tokio::time::timeout(deadline, events.recv()).await {
                Ok(Some(PoolEvent::Health {
                    healthy, reason, ..
                })) => return (healthy, reason),
                Ok(Some(_)) => continue,
                other => panic!("no health event: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn checker_moves_instances_in_and_out_of_rotation() {
        let status = Arc::new(AtomicU16::new(503));
        let addr = server(status.clone(), Duration::ZERO).await;
        let (tx, mut events) = mpsc::unbounded_channel();
        let pool = Pool::new("svc", Arc::new(http_config(100)), tx);
        let cpu = Arc::new(HeldCpu::default());
        let _checker = HealthChecker::spawn(pool.clone());
        pool.add_instance(InstanceSpec {
            id: "a".into(),
            addr,
            cpu: cpu.clone(),
        });
        // Starting: failing probes take nothing out, and the instance is not in rotation.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pool.snapshot().instances[0].healthy);
        assert!(
            cpu.calls.lock().unwrap().is_empty(),
            "never throttled while starting"
        );
        status.store(200, Ordering::SeqCst);
        assert_eq!(
            next_health(&mut events).await,
            (true, "GET /healthz: 200".into())
        );
        assert!(pool.snapshot().instances[0].in_rotation());
        // Probes hold the CPU: each one restores the idle instance and throttles it after.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let calls = cpu.calls.lock().unwrap().clone();
        assert!(calls.len() >= 3, "{calls:?}");
        assert_eq!(calls[0], "throttle");
        assert!(calls.windows(2).all(|w| w[0] != w[1]), "{calls:?}");
        status.store(500, Ordering::SeqCst);
        assert_eq!(
            next_health(&mut events).await,
            (false, "GET /healthz: 500".into())
        );
        assert!(!pool.snapshot().instances[0].healthy);
        status.store(200, Ordering::SeqCst);
        assert_eq!(
            next_health(&mut events).await,
            (true, "GET /healthz: 200".into())
        );
    }

    #[tokio::test]
    async fn a_suspect_is_probed_at_once_and_confirmed() {
        let addr = server(Arc::new(AtomicU16::new(200)), Duration::ZERO).await;
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut config = http_config(100);
        config.health.interval = Duration::from_secs(30);
        config.health.timeout = Duration::from_secs(1);
        config.health.healthy_threshold = 1;
        let pool = Pool::new("svc", Arc::new(config), tx);
        let _checker = HealthChecker::spawn(pool.clone());
        pool.add_instance(InstanceSpec {
            id: "a".into(),
            addr,
            cpu: Arc::new(HeldCpu::default()),
        });
        assert!(next_health(&mut events).await.0);
        let lease = pool.acquire(None).await.unwrap();
        lease.mark_suspect("connect: reset");
        drop(lease);
        assert!(!pool.snapshot().instances[0].in_rotation());
        // Confirmed long before the 30 s interval: a suspect is probed at once.
        let started = std::time::Instant::now();
        assert_eq!(
            next_health(&mut events).await,
            (true, "GET /healthz: 200".into())
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(pool.snapshot().instances[0].in_rotation());
    }

    #[tokio::test]
    async fn removed_instances_stop_being_probed() {
        // Accepts but never answers: every probe times out, so the instance stays in startup
        // and is probed every few tens of milliseconds.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _events) = mpsc::unbounded_channel();
        let pool = Pool::new("svc", Arc::new(http_config(100)), tx);
        let _checker = HealthChecker::spawn(pool.clone());
        pool.add_instance(InstanceSpec {
            id: "a".into(),
            addr,
            cpu: Arc::new(HeldCpu::default()),
        });
        let mut held = Vec::new();
        for _ in 0..2 {
            let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
            held.push(accepted.expect("the instance was probed").unwrap());
        }
        pool.remove_instance("a");
        // A probe already connecting may still land.
        while let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
        {
            held.push(conn);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(500), listener.accept())
                .await
                .is_err(),
            "probed after removal"
        );
    }
}
