//! Autoscaling through the engine, the fake host and a real proxy on loopback: a jump in
//! concurrent requests starts every missing instance at once, scale-in follows the stable
//! window, min 0 scales to zero and the next request is a measured cold start, and the host's
//! memory budget refuses an instance with an event that says why.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lull_daemon::autoscale::{
    HostBudget, HostLimits, PressureSource, ProcPressure, ScalingMetrics,
};
use lull_daemon::engine::{
    Engine, EngineSettings, InstanceState, Operation, OperationEnd, RevisionPlan,
};
use lull_daemon::host::InstanceHost;
use lull_daemon::host::budget::BudgetedHost;
use lull_daemon::host::fake::FakeHost;
use lull_daemon::store::{
    EventRecord, MemStore, NewService, RevisionCommit, RevisionRecord, Store,
};
use lull_proxy::config::{HealthCheck, HealthProbe};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Revision documents here: `{"image", "min", "max", "concurrency", "window_ms", "idle_ms",
/// "memory", "start_ms"}` (`start_ms`: the fake app listens that long after its start).
fn plan(record: &RevisionRecord) -> Result<RevisionPlan, String> {
    let doc = &record.doc;
    let mut plan = RevisionPlan::for_image(doc["image"].as_str().ok_or("image: missing")?);
    let num = |k: &str, default: u64| doc[k].as_u64().unwrap_or(default);
    plan.hostnames = vec![format!("{}.localhost", record.service)];
    plan.min_instances = num("min", 1) as u32;
    plan.scaling.max_instances = num("max", 10) as u32;
    plan.scaling.scale_in_window = Duration::from_millis(num("window_ms", 60_000));
    plan.scaling.idle_to_zero = Duration::from_millis(num("idle_ms", 300_000));
    plan.proxy.max_concurrency = num("concurrency", 100) as u32;
    plan.limits.memory_bytes = Some(num("memory", 64 << 20));
    if let Some(ms) = doc["start_ms"].as_u64() {
        plan.env.push(("FAKE_START_MS".into(), ms.to_string()));
    }
    plan.proxy.health = HealthCheck {
        probe: HealthProbe::Http {
            path: "/".into(),
            min_status: 200,
            max_status: 399,
        },
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(150),
        healthy_threshold: 1,
        unhealthy_threshold: 2,
    };
    Ok(plan)
}

struct Rig {
    host: FakeHost,
    store: Arc<MemStore>,
    engine: Engine,
    _proxy: Proxy,
    addr: SocketAddr,
}

impl Rig {
    async fn new(memory_total: u64) -> Rig {
        let host = FakeHost::new();
        let store = Arc::new(MemStore::new());
        let routes = Arc::new(RouteTable::new());
        let budget = Arc::new(HostBudget::new(HostLimits {
            memory_total,
            overcommit_ratio: 1.0,
            // The test must not depend on this machine's load: no pressure brake.
            cpu_pressure_brake: 101.0,
            memory_pressure_brake: 101.0,
            ..HostLimits::for_memory(memory_total)
        }));
        let budgeted: Arc<dyn InstanceHost> =
            Arc::new(BudgetedHost::new(Arc::new(host.clone()), budget.clone()));
        let pressure: Arc<dyn PressureSource> = Arc::new(ProcPressure::host());
        let settings = EngineSettings {
            startup_deadline: Duration::from_secs(5),
            stop_grace: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(3),
            rollback_window: Duration::ZERO,
            ..EngineSettings::default()
        };
        let engine = Engine::new(
            budgeted,
            store.clone(),
            routes.clone(),
            Arc::new(plan),
            settings,
        )
        .with_scaling(Arc::new(ScalingMetrics::new(budget, pressure)));
        let proxy = Proxy::new(routes, ProxyOptions::default());
        let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        Rig {
            host,
            store,
            engine,
            _proxy: proxy,
            addr,
        }
    }

    async fn deploy(&self, service: &str, doc: serde_json::Value) {
        self.store
            .create_service(&NewService {
                name: service.into(),
                state: "active".into(),
                doc: json!({}),
            })
            .unwrap();
        let mut op = self.start_deploy(service, doc).await;
        match op.wait().await {
            OperationEnd::Succeeded { .. } => {}
            other => panic!("deploy of {service}: {other:?}"),
        }
    }

    /// Commits `doc` as `service`'s next revision and starts its deploy, without waiting.
    async fn start_deploy(&self, service: &str, doc: serde_json::Value) -> Operation {
        let revision = self
            .store
            .commit_revision(&RevisionCommit {
                service: service.into(),
                expected_generation: None,
                doc,
                cause: "test".into(),
                service_doc: None,
                state: None,
                event: None,
                make_current: true,
            })
            .unwrap()
            .revision
            .number;
        self.engine.deploy(service, revision).await.unwrap()
    }

    async fn healthy(&self, service: &str) -> usize {
        self.engine
            .status(service)
            .await
            .unwrap()
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Healthy)
            .count()
    }

    async fn instances(&self, service: &str) -> usize {
        self.engine.status(service).await.unwrap().instances.len()
    }

    fn events(&self, service: &str, kind: &str) -> Vec<EventRecord> {
        self.store
            .list_events(service, 0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }

    async fn wait_for(&self, what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !check().await {
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One HTTP/1.1 GET through the proxy on a fresh connection; the status.
async fn get(addr: SocketAddr, host: &str, path: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_connections_start_the_missing_instances_at_once_then_scale_back_in() {
    let rig = Rig::new(16 << 30).await;
    rig.deploy(
        "web",
        json!({"image": "example/app:1", "min": 1, "max": 4, "concurrency": 10, "window_ms": 1500}),
    )
    .await;
    assert_eq!(rig.healthy("web").await, 1);
    let starts_before = rig.host.starts();

    // 0 → 40 concurrent requests, each held 2 s by the app.
    let jump = Instant::now();
    let requests: Vec<_> = (0..40)
        .map(|_| tokio::spawn(get(rig.addr, "web.localhost", "/sleep/2000")))
        .collect();
    rig.wait_for("4 healthy instances", Duration::from_secs(5), async || {
        rig.healthy("web").await == 4
    })
    .await;
    let reaction = jump.elapsed();
    // Each crossing of the watermark decides at once, as the connections arrive: every
    // instance starts within moments of the first, none waits for another to be ready.
    let added = |outs: &[EventRecord]| -> u64 {
        outs.iter()
            .map(|e| e.fields["decision"]["add"].as_u64().unwrap())
            .sum()
    };
    // Events are written to the store in the background.
    rig.wait_for("the scale-out events", Duration::from_secs(3), async || {
        added(&rig.events("web", "scale.out")) >= 3
    })
    .await;
    let outs = rig.events("web", "scale.out");
    assert_eq!(added(&outs), 3, "{outs:?}");
    assert_eq!(outs.last().unwrap().fields["desired"], 4);
    // The first decision comes before any new instance is ready; the later ones follow within
    // moments (the spread below), without waiting for it. A fake instance can turn ready inside
    // that spread, so only the first decision's view of readiness is pinned.
    assert_eq!(
        outs[0].fields["ready"], 1,
        "the first decision came before any new instance was ready: {outs:?}"
    );
    let spread = outs.last().unwrap().time.as_datetime() - outs[0].time.as_datetime();
    assert!(
        spread.num_milliseconds() < 200,
        "decisions spread over {spread:?}"
    );
    assert!(outs[0].fields["demand"].as_u64().unwrap() > 7);
    assert_eq!(rig.host.starts() - starts_before, 3);
    for r in requests {
        assert_eq!(r.await.unwrap(), 200, "no request fails while scaling out");
    }
    eprintln!("0 → 40 connections: 4 instances serving after {reaction:?}");

    // Quiet: back to min after the window, one step at a time, each drained first.
    rig.wait_for("scale-in to min", Duration::from_secs(30), async || {
        rig.instances("web").await == 1
    })
    .await;
    rig.wait_for("the scale-in events", Duration::from_secs(3), async || {
        rig.events("web", "scale.in").len() == 3
    })
    .await;
    let ins = rig.events("web", "scale.in");
    assert!(
        ins.iter().all(|e| e.fields["decision"]["remove"] == 1),
        "{ins:?}"
    );
    assert_eq!(get(rig.addr, "web.localhost", "/").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_zero_scales_to_zero_and_the_next_request_is_a_measured_cold_start() {
    let rig = Rig::new(16 << 30).await;
    rig.deploy(
        "idle",
        json!({"image": "example/app:1", "min": 0, "max": 2, "window_ms": 500, "idle_ms": 800}),
    )
    .await;
    assert_eq!(get(rig.addr, "idle.localhost", "/").await, 200);
    rig.wait_for("scale to zero", Duration::from_secs(10), async || {
        rig.instances("idle").await == 0
    })
    .await;
    rig.wait_for("the instance stopped", Duration::from_secs(5), async || {
        rig.host.running().is_empty()
    })
    .await;
    rig.wait_for("the scale-in event", Duration::from_secs(3), async || {
        !rig.events("idle", "scale.in").is_empty()
    })
    .await;
    let zero = rig.events("idle", "scale.in");
    assert!(
        zero.last().unwrap().message.contains("idle to zero"),
        "{zero:?}"
    );

    let cold = Instant::now();
    assert_eq!(
        get(rig.addr, "idle.localhost", "/").await,
        200,
        "held, then served"
    );
    let took = cold.elapsed();
    rig.wait_for("the cold start event", Duration::from_secs(3), async || {
        !rig.events("idle", "scale.cold_start").is_empty()
    })
    .await;
    let events = rig.events("idle", "scale.cold_start");
    assert_eq!(events.len(), 1, "{events:?}");
    let reported = events[0].fields["took_ms"].as_f64().unwrap();
    assert!(reported > 0.0 && reported <= took.as_secs_f64() * 1000.0 + 1.0);
    eprintln!("cold start: {took:?} end to end, {reported:.1} ms reported");
    assert_eq!(rig.instances("idle").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_beyond_the_hosts_memory_is_refused_with_an_event() {
    // 150 MiB of host memory, 64 MiB instances: two fit, the third does not.
    let rig = Rig::new(150 << 20).await;
    rig.deploy(
        "big",
        json!({"image": "example/app:1", "min": 1, "max": 4, "concurrency": 2}),
    )
    .await;
    let requests: Vec<_> = (0..8)
        .map(|_| tokio::spawn(get(rig.addr, "big.localhost", "/sleep/1500")))
        .collect();
    rig.wait_for("a refusal", Duration::from_secs(5), async || {
        !rig.events("big", "scale.refused").is_empty()
    })
    .await;
    let refused = rig.events("big", "scale.refused");
    assert!(
        refused[0].message.contains("memory:"),
        "says which limit: {}",
        refused[0].message
    );
    rig.wait_for("2 healthy", Duration::from_secs(5), async || {
        rig.healthy("big").await == 2
    })
    .await;
    for r in requests {
        assert_eq!(
            r.await.unwrap(),
            200,
            "the queue serves what the instances can"
        );
    }
    assert_eq!(rig.instances("big").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_during_a_deploy_scales_the_serving_revision_out() {
    let rig = Rig::new(16 << 30).await;
    let doc = |start_ms: u64| json!({"image": "example/app:1", "min": 1, "max": 4, "concurrency": 10, "start_ms": start_ms});
    rig.deploy("web", doc(0)).await;
    // The next revision's instance takes 3 s to listen: the deploy is under way meanwhile.
    let mut deploy = rig.start_deploy("web", doc(3000)).await;
    let requests: Vec<_> = (0..40)
        .map(|_| tokio::spawn(get(rig.addr, "web.localhost", "/sleep/1500")))
        .collect();
    rig.wait_for(
        "scale-out during the deploy",
        Duration::from_secs(2),
        async || !rig.events("web", "scale.out").is_empty(),
    )
    .await;
    let outs = rig.events("web", "scale.out");
    let second_live = || {
        rig.events("web", "deploy.succeeded")
            .into_iter()
            .find(|e| e.fields["revision"] == 2)
    };
    assert!(
        second_live().is_none(),
        "the deploy was still under way: {:?}",
        second_live()
    );
    let added: u64 = outs
        .iter()
        .map(|e| e.fields["decision"]["add"].as_u64().unwrap())
        .sum();
    assert!(added >= 1, "{outs:?}");
    for r in requests {
        assert_eq!(r.await.unwrap(), 200, "no request fails during the deploy");
    }
    match deploy.wait().await {
        OperationEnd::Succeeded { revision, .. } => assert_eq!(revision, 2),
        other => panic!("deploy: {other:?}"),
    }
    // No scale-in happened while the deploy owned the new revision's count.
    rig.wait_for("the deploy's event", Duration::from_secs(3), async || {
        second_live().is_some()
    })
    .await;
    let live_at = second_live().unwrap().time.as_datetime();
    let ins_during: Vec<_> = rig
        .events("web", "scale.in")
        .into_iter()
        .filter(|e| e.time.as_datetime() < live_at)
        .collect();
    assert!(ins_during.is_empty(), "{ins_during:?}");
}
