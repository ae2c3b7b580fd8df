//! The autoscaler's series, `lull_scaling_*`: decisions by action, cold starts, instances per
//! service, and the host's committed memory and pressure (read at scrape time).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::host::HostBudget;
use super::psi::PressureSource;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    service: String,
    action: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

type Histograms = Family<ServiceLabels, Histogram, fn() -> Histogram>;

fn cold_start_histogram() -> Histogram {
    // 10 ms to about 40 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 12,
    ))
}

pub struct ScalingMetrics {
    registry: Registry,
    decisions: Family<ActionLabels, Counter>,
    cold_starts: Histograms,
    instances: Family<ServiceLabels, Gauge>,
    budget: Arc<HostBudget>,
    pressure: Arc<dyn PressureSource>,
}

impl std::fmt::Debug for ScalingMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScalingMetrics")
    }
}

impl ScalingMetrics {
    pub fn new(budget: Arc<HostBudget>, pressure: Arc<dyn PressureSource>) -> ScalingMetrics {
        let mut registry = Registry::with_prefix("lull_scaling");
        let decisions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Autoscaler decisions that acted, by service and action (out, in, refused)",
            decisions.clone(),
        );
        let cold_starts: Histograms = Family::new_with_constructor(cold_start_histogram);
        registry.register_with_unit(
            "cold_start",
            "From a request reaching a service with no instance to an instance serving",
            Unit::Seconds,
            cold_starts.clone(),
        );
        let instances = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "instances",
            "Instances of the serving revision, started or starting, by service",
            instances.clone(),
        );
        ScalingMetrics {
            registry,
            decisions,
            cold_starts,
            instances,
            budget,
            pressure,
        }
    }

    pub fn budget(&self) -> &Arc<HostBudget> {
        &self.budget
    }

    pub fn pressure(&self) -> &Arc<dyn PressureSource> {
        &self.pressure
    }

    pub fn decision(&self, service: &str, action: &str) {
        self.decisions
            .get_or_create(&ActionLabels {
                service: service.to_owned(),
                action: action.to_owned(),
            })
            .inc();
    }

    pub fn cold_start(&self, service: &str, took: Duration) {
        self.cold_starts
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn instances(&self, service: &str, count: usize) {
        self.instances
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .set(count as i64);
    }

    /// The series, with the host's budget and pressure as of now.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        let body = out
            .trim_end()
            .strip_suffix("# EOF")
            .unwrap_or(&out)
            .to_owned();
        let mut out = body;
        let (count, memory) = self.budget.committed();
        let limits = self.budget.limits();
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP lull_host_{name} {help}");
            let _ = writeln!(out, "# TYPE lull_host_{name} gauge");
            let _ = writeln!(out, "lull_host_{name} {value}");
        };
        gauge(
            &mut out,
            "instances",
            "Instances counted against the host's budget",
            count as f64,
        );
        gauge(
            &mut out,
            "memory_committed_bytes",
            "Sum of the memory limits of the host's instances",
            memory as f64,
        );
        gauge(
            &mut out,
            "memory_allowed_bytes",
            "What the memory limits may add up to (host memory times the overcommit ratio)",
            limits.memory_allowed() as f64,
        );
        match self.pressure.read() {
            Ok(p) => {
                let series = [
                    (
                        "cpu_pressure_some_avg10",
                        "Share of time some task stalled on CPU, 10 s average (%)",
                        p.cpu_some_avg10,
                    ),
                    (
                        "memory_pressure_some_avg10",
                        "Share of time some task stalled on memory, 10 s average (%)",
                        p.memory_some_avg10,
                    ),
                    (
                        "memory_pressure_full_avg10",
                        "Share of time all tasks stalled on memory, 10 s average (%)",
                        p.memory_full_avg10,
                    ),
                ];
                for (name, help, value) in series {
                    if let Some(v) = value {
                        gauge(&mut out, name, help, v);
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "# host pressure unavailable: {e}");
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

impl crate::telemetry::MetricsSource for ScalingMetrics {
    fn encode(&self) -> String {
        ScalingMetrics::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::{HostLimits, Pressure, PressureError};

    struct Fixed(Pressure);
    impl PressureSource for Fixed {
        fn read(&self) -> Result<Pressure, PressureError> {
            Ok(self.0)
        }
    }

    #[test]
    fn renders_decisions_cold_starts_and_the_host() {
        let budget = Arc::new(HostBudget::new(HostLimits::for_memory(1 << 30)));
        budget.admit("a", 64 << 20).unwrap();
        let pressure = Fixed(Pressure {
            cpu_some_avg10: Some(3.5),
            memory_some_avg10: None,
            memory_full_avg10: None,
        });
        let m = ScalingMetrics::new(budget, Arc::new(pressure));
        m.decision("web", "out");
        m.cold_start("web", Duration::from_millis(80));
        m.instances("web", 3);
        let text = m.encode();
        assert!(
            text.contains(r#"lull_scaling_decisions_total{service="web",action="out"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"lull_scaling_cold_start_seconds_count{service="web"} 1"#));
        assert!(text.contains(r#"lull_scaling_instances{service="web"} 3"#));
        assert!(text.contains("lull_host_memory_committed_bytes 67108864"));
        assert!(text.contains("lull_host_cpu_pressure_some_avg10 3.5"));
        assert!(
            !text.contains("memory_pressure_some"),
            "absent when the kernel has none"
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
