//! The proxy's Prometheus metrics, in one registry the daemon exposes.
//!
//! Requests, latencies, queue waits, rejections, retries and CPU per request are recorded as
//! they happen. Per-instance state (in flight, health, the CPU gate's transitions and its
//! active and throttled time) is read from the pools at each scrape, so series of removed
//! instances disappear and nothing needs a poll loop.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use thread_local::ThreadLocal;

use crate::pool::Pool;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    service: String,
    /// "1xx" … "5xx".
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    service: String,
    instance: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    service: String,
    instance: String,
    /// "restore" or "throttle".
    direction: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn queue_wait_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn cpu_histogram() -> Histogram {
    // 10 µs to about 5 s of CPU.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

/// The proxy's metrics registry.
pub struct ProxyMetrics {
    registry: Registry,
    /// Requests and their latency, per service, counted per thread (see [`ServiceMetrics`]).
    per_request: Arc<RequestCollector>,
    queue_wait: HistogramFamily<ServiceLabels>,
    rejections: Family<ReasonLabels, Counter>,
    retries: Family<ServiceLabels, Counter>,
    request_cpu: HistogramFamily<ServiceLabels>,
    pools: Arc<PoolCollector>,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics").finish_non_exhaustive()
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics::new()
    }
}

impl ProxyMetrics {
    /// A registry whose metrics are all named `lull_proxy_*`.
    pub fn new() -> ProxyMetrics {
        let mut registry = Registry::with_prefix("lull_proxy");
        let per_request = Arc::new(RequestCollector::default());
        registry.register_collector(Box::new(per_request.clone()));
        let queue_wait: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(queue_wait_histogram);
        registry.register_with_unit(
            "queue_wait",
            "Time queued requests waited for a slot (served or not)",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests turned away with 503 (paused, queue_full, queue_timeout)",
            rejections.clone(),
        );
        let retries = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "retries",
            "Requests retried on another instance after a connection failure",
            retries.clone(),
        );
        let request_cpu: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(cpu_histogram);
        registry.register_with_unit(
            "request_cpu",
            "CPU time an instance used per request (its usage over a busy period, shared by the requests served in it)",
            Unit::Seconds,
            request_cpu.clone(),
        );
        let pools = Arc::new(PoolCollector::default());
        registry.register_collector(Box::new(pools.clone()));
        ProxyMetrics {
            registry,
            per_request,
            queue_wait,
            rejections,
            retries,
            request_cpu,
            pools,
        }
    }

    /// One answered request: its status (counted by class) and its whole duration.
    pub fn observe_request(&self, service: &str, status: u16, duration: Duration) {
        self.service(service).observe_request(status, duration);
    }

    /// One service's request counters and latency histogram, looked up once: recording
    /// through the handle takes no lock, allocates nothing and shares no cache line with
    /// another thread (what the proxy does per request).
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let mut all = self
            .per_request
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(found) = all.iter().find(|s| s.service == service) {
            return ServiceMetrics {
                series: found.clone(),
            };
        }
        let series = Arc::new(ServiceSeries {
            service: service.to_owned(),
            shards: ThreadLocal::new(),
        });
        all.push(series.clone());
        ServiceMetrics { series }
    }

    /// A request retried on another instance.
    pub fn retry(&self, service: &str) {
        self.retries.get_or_create(&service_labels(service)).inc();
    }

    /// The time a queued request waited (the pool records it).
    pub fn observe_queue_wait(&self, service: &str, waited: Duration) {
        self.queue_wait
            .get_or_create(&service_labels(service))
            .observe(waited.as_secs_f64());
    }

    /// A request turned away: `reason` is "paused", "queue_full" or "queue_timeout" (the
    /// pool records it).
    pub fn rejected(&self, service: &str, reason: &'static str) {
        self.rejections
            .get_or_create(&ReasonLabels {
                service: service.to_owned(),
                reason,
            })
            .inc();
    }

    /// CPU per request over a busy period, counted once for each of its `requests` (the
    /// pool records it).
    pub fn observe_request_cpu(&self, service: &str, per_request: Duration, requests: u32) {
        let histogram = self.request_cpu.get_or_create(&service_labels(service));
        for _ in 0..requests {
            histogram.observe(per_request.as_secs_f64());
        }
    }

    /// Reports `pool`'s instances at each scrape for as long as the pool lives.
    /// [`Pool::with_metrics`] calls it.
    pub fn watch_pool(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// The registry in the Prometheus text format (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String only fails if a metric's own encoding does.
            tracing::error!(error = %e, "encoding the proxy's metrics failed");
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of the request latency histogram in ns: 0.5 ms doubling to about 65 s
/// (18 buckets), then +Inf.
const LATENCY_BOUNDS_NS: [u64; 18] = {
    let mut bounds = [0u64; 18];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 500_000 << i;
        i += 1;
    }
    bounds
};

/// Handles on one service's per-request series (see [`ProxyMetrics::service`]).
///
/// Each thread records into a shard of its own, summed at scrape time: with one proxy thread
/// per core, a request costs a few uncontended stores instead of a lock and counters that
/// bounce between cores.
#[derive(Clone)]
pub struct ServiceMetrics {
    series: Arc<ServiceSeries>,
}

struct ServiceSeries {
    service: String,
    shards: ThreadLocal<Shard>,
}

/// One thread's counts. Only that thread writes them (a load and a store, no read-modify-write
/// needed); a scrape reads them from another thread.
#[derive(Default)]
struct Shard {
    requests: [AtomicU64; 5],
    /// Observations per latency bucket (not cumulative), the last one +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// Adds `n` to a counter only the calling thread writes.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl ServiceMetrics {
    pub fn observe_request(&self, status: u16, duration: Duration) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(LATENCY_BOUNDS_NS.len());
        let shard = self.series.shards.get_or_default();
        bump(&shard.requests[class], 1);
        bump(&shard.buckets[bucket], 1);
        bump(&shard.sum_ns, ns);
    }
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics")
            .field("service", &self.series.service)
            .finish_non_exhaustive()
    }
}

/// Encodes every service's per-request series, summing the threads' shards.
#[derive(Default)]
struct RequestCollector {
    services: Mutex<Vec<Arc<ServiceSeries>>>,
}

impl std::fmt::Debug for RequestCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCollector").finish_non_exhaustive()
    }
}

/// One service's shards, summed.
struct Totals {
    requests: [u64; 5],
    buckets: [u64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: u64,
}

impl ServiceSeries {
    fn totals(&self) -> Totals {
        let mut t = Totals {
            requests: [0; 5],
            buckets: [0; LATENCY_BOUNDS_NS.len() + 1],
            sum_ns: 0,
        };
        for shard in self.shards.iter() {
            for (total, n) in t.requests.iter_mut().zip(&shard.requests) {
                *total += n.load(Ordering::Relaxed);
            }
            for (total, n) in t.buckets.iter_mut().zip(&shard.buckets) {
                *total += n.load(Ordering::Relaxed);
            }
            t.sum_ns = t.sum_ns.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
        }
        t
    }
}

impl Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let services: Vec<Arc<ServiceSeries>> = self
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let totals: Vec<(&str, Totals)> = services
            .iter()
            .map(|s| (s.service.as_str(), s.totals()))
            .collect();

        let mut m = encoder.encode_descriptor(
            "requests",
            "Requests answered, by service and status class",
            None,
            MetricType::Counter,
        )?;
        for (service, t) in &totals {
            for (class, n) in STATUS_CLASSES.iter().zip(t.requests) {
                let labels = StatusLabels {
                    service: (*service).to_owned(),
                    class,
                };
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "request_duration",
            "Time from a request's arrival to its response's end",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (service, t) in &totals {
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
                .iter()
                .map(|&ns| ns as f64 / 1e9)
                .chain(std::iter::once(f64::INFINITY))
                .zip(t.buckets)
                .collect();
            let count = t.buckets.iter().sum();
            m.encode_family(&service_labels(service))?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    t.sum_ns as f64 / 1e9,
                    count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

fn service_labels(service: &str) -> ServiceLabels {
    ServiceLabels {
        service: service.to_owned(),
    }
}

#[derive(Default)]
struct PoolCollector {
    pools: Mutex<Vec<Weak<Pool>>>,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCollector").finish_non_exhaustive()
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let snapshots: Vec<_> = pools.iter().map(|p| p.snapshot()).collect();
        let instances = || {
            snapshots.iter().flat_map(|s| {
                s.instances.iter().map(move |i| {
                    let labels = InstanceLabels {
                        service: s.service.clone(),
                        instance: i.id.clone(),
                    };
                    (labels, i)
                })
            })
        };

        let mut m = encoder.encode_descriptor(
            "in_flight",
            "Requests in flight per instance",
            None,
            MetricType::Gauge,
        )?;
        for (labels, i) in instances() {
            ConstGauge::new(i64::from(i.in_flight)).encode(m.encode_family(&labels)?)?;
        }

        let mut m = encoder.encode_descriptor(
            "queue_depth",
            "Requests waiting for a slot",
            None,
            MetricType::Gauge,
        )?;
        for s in &snapshots {
            let depth = i64::try_from(s.queue_depth).unwrap_or(i64::MAX);
            ConstGauge::new(depth).encode(m.encode_family(&service_labels(&s.service))?)?;
        }

        let mut m = encoder.encode_descriptor(
            "instance_healthy",
            "1 when the instance is in rotation (healthy and not suspect)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, i) in instances() {
            ConstGauge::new(i64::from(i.in_rotation())).encode(m.encode_family(&labels)?)?;
        }

        let mut m = encoder.encode_descriptor(
            "gate_transitions",
            "CPU gate transitions per instance (restore, throttle)",
            None,
            MetricType::Counter,
        )?;
        for (labels, i) in instances() {
            for (direction, count) in [("restore", i.gate.restores), ("throttle", i.gate.throttles)]
            {
                let labels = TransitionLabels {
                    service: labels.service.clone(),
                    instance: labels.instance.clone(),
                    direction,
                };
                ConstCounter::new(count).encode(m.encode_family(&labels)?)?;
            }
        }

        for (name, help, pick) in [
            (
                "gate_active",
                "Time an instance had its CPU",
                (|g| g.active) as fn(&crate::gate::GateMeter) -> Duration,
            ),
            ("gate_throttled", "Time an instance was throttled", |g| {
                g.throttled
            }),
        ] {
            let mut m =
                encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Counter)?;
            for (labels, i) in instances() {
                ConstCounter::new(millis(pick(&i.gate))).encode(m.encode_family(&labels)?)?;
            }
        }

        for (name, help, retired, pick) in [
            (
                "service_gate_active",
                "Time a service's instances had their CPU, removed instances included",
                (|s| s.retired_active) as fn(&crate::pool::PoolSnapshot) -> Duration,
                (|g| g.active) as fn(&crate::gate::GateMeter) -> Duration,
            ),
            (
                "service_gate_throttled",
                "Time a service's instances were throttled, removed instances included",
                |s| s.retired_throttled,
                |g| g.throttled,
            ),
        ] {
            let mut m =
                encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Counter)?;
            for s in &snapshots {
                let total =
                    retired(s) + s.instances.iter().map(|i| pick(&i.gate)).sum::<Duration>();
                ConstCounter::new(millis(total))
                    .encode(m.encode_family(&service_labels(&s.service))?)?;
            }
        }
        Ok(())
    }
}

/// Seconds, to the millisecond.
fn millis(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

#[cfg(all(test, not(lull_loom)))]
mod tests {
    use super::*;
    use crate::config::ServiceConfig;
    use crate::gate::CpuControl;
    use crate::pool::InstanceSpec;
    use std::net::SocketAddr;

    struct NoCpu;
    impl CpuControl for NoCpu {
        fn restore(&self) -> Result<(), String> {
            Ok(())
        }
        fn throttle(&self) -> Result<(), String> {
            Ok(())
        }
        fn usage_ns(&self) -> Option<u64> {
            Some(0)
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
    }

    #[test]
    fn requests_retries_and_rejections_are_counted() {
        let m = ProxyMetrics::new();
        m.observe_request("web", 200, Duration::from_millis(3));
        m.observe_request("web", 204, Duration::from_millis(3));
        m.observe_request("web", 503, Duration::from_millis(3));
        m.retry("web");
        m.rejected("web", "queue_full");
        m.observe_queue_wait("web", Duration::from_millis(20));
        m.observe_request_cpu("web", Duration::from_micros(150), 4);
        let text = m.encode();
        assert!(
            text.contains(r#"lull_proxy_requests_total{service="web",class="2xx"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_requests_total{service="web",class="5xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_retries_total{service="web"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_rejections_total{service="web",reason="queue_full"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_request_duration_seconds_count{service="web"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_queue_wait_seconds_count{service="web"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_request_cpu_seconds_count{service="web"} 4"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn requests_from_several_threads_are_summed_into_their_buckets() {
        let m = Arc::new(ProxyMetrics::new());
        let web = m.service("web");
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let web = web.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        web.observe_request(200, Duration::from_micros(700));
                    }
                    web.observe_request(404, Duration::from_secs(100));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // The same series whichever handle recorded it.
        m.observe_request("web", 500, Duration::from_micros(100));
        let text = m.encode();
        for expected in [
            r#"lull_proxy_requests_total{service="web",class="2xx"} 300"#,
            r#"lull_proxy_requests_total{service="web",class="4xx"} 3"#,
            r#"lull_proxy_requests_total{service="web",class="5xx"} 1"#,
            r#"lull_proxy_requests_total{service="web",class="1xx"} 0"#,
            r#"lull_proxy_request_duration_seconds_count{service="web"} 304"#,
            // 0.1 ms falls in the first bucket (0.5 ms), 0.7 ms in the second (1 ms), 100 s
            // only in +Inf.
            r#"lull_proxy_request_duration_seconds_bucket{le="0.0005",service="web"} 1"#,
            r#"lull_proxy_request_duration_seconds_bucket{le="0.001",service="web"} 301"#,
            r#"lull_proxy_request_duration_seconds_bucket{le="+Inf",service="web"} 304"#,
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
        let sum: f64 = line(
            &text,
            r#"lull_proxy_request_duration_seconds_sum{service="web"}"#,
        )
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
        assert!(
            (sum - (300.0 * 0.0007 + 300.0 + 0.0001)).abs() < 1e-6,
            "{sum}"
        );
    }

    #[tokio::test]
    async fn pools_are_reported_at_each_scrape() {
        let metrics = Arc::new(ProxyMetrics::new());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let pool = Pool::with_metrics(
            "api",
            Arc::new(ServiceConfig::default()),
            tx,
            metrics.clone(),
        );
        pool.add_instance(InstanceSpec {
            id: "i1".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            cpu: Arc::new(NoCpu),
        });
        pool.set_healthy("i1", true, "ok");
        let lease = pool.acquire(None).await.unwrap();
        let text = metrics.encode();
        assert!(
            text.contains(r#"lull_proxy_in_flight{service="api",instance="i1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_instance_healthy{service="api",instance="i1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_queue_depth{service="api"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lull_proxy_gate_transitions_total{service="api",instance="i1",direction="restore"} 1"#
            ),
            "{text}"
        );
        line(
            &text,
            r#"lull_proxy_gate_active_seconds_total{service="api",instance="i1"}"#,
        );
        line(
            &text,
            r#"lull_proxy_service_gate_throttled_seconds_total{service="api"}"#,
        );
        drop(lease);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"lull_proxy_gate_transitions_total{service="api",instance="i1",direction="throttle"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"lull_proxy_request_cpu_seconds_count{service="api"} 1"#),
            "{text}"
        );
        pool.remove_instance("i1");
        let text = metrics.encode();
        assert!(
            !text.contains(r#"instance="i1""#),
            "removed instances disappear:\n{text}"
        );
        line(
            &text,
            r#"lull_proxy_service_gate_active_seconds_total{service="api"}"#,
        );
    }
}
