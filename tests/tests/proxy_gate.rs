//! Privileged, end to end without the daemon: the runtime, the instance network and the proxy
//! composed as the daemon will compose them. The fixture app runs with its spinner (`SPIN=1`)
//! behind the proxy's CPU gate: it gets the CPU while a request is in flight, loses it within
//! milliseconds of the last response, and gets it back for the next request.
//!
//! Everything network-facing runs inside a "host" namespace of the test's own (its bridge, and
//! the proxy's listener and upstream connections, made by a tokio runtime started there).
//! Preconditions: root, the registry on 127.0.0.1:5000 with the fixture images.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lull_netns::network::{AttachRequest, InstanceNetwork};
use lull_proxy::config::{HealthProbe, ServiceConfig};
use lull_proxy::health::HealthChecker;
use lull_proxy::metrics::ProxyMetrics;
use lull_proxy::pool::{InstanceSpec, Pool};
use lull_proxy::{Proxy, ProxyOptions, Route, RouteTable};
use lull_runtime::host::Runtime;
use lull_runtime::instance::{FileBind, InstanceRequest, ProcessOverrides};
use lull_runtime::logs::LogLimits;
use lull_runtime::store::ImageRecord;
use lull_tests::cpu::InstanceCpu;
use lull_tests::e2e::{
    FIXTURE_APP, HELLO, InstanceGuard, TestRuntime, reference, require_registry,
};
use lull_tests::host_net::Host;

const PORT: u16 = 8080;
/// The issue's bound on an idle instance's CPU share.
const IDLE_SHARE_MAX: f64 = 0.003;
/// How long an idle share is measured: a throttled period refills 1 ms, which the kernel may
/// overrun by a tick (4 ms) and charges to later periods, so one second can show 0.5 %; three
/// average it out under the bound.
const IDLE_WINDOW: Duration = Duration::from_secs(3);
/// The window right after a response is longer: it starts inside the period in which the
/// throttle came back, which may carry that period's quota and a tick's overrun (seen: 10 ms
/// over 3 s, 0.33 %, on a machine loaded by other benchmarks).
const AFTER_WINDOW: Duration = Duration::from_secs(5);
/// Idle tier 2's delay in this test: longer than the steps before the freeze check.
const FREEZE_AFTER: Duration = Duration::from_secs(4);

/// CPU share (of one CPU) the instance's group used over `window`, starting now.
async fn share_over(cpu: &InstanceCpuProbe, window: Duration) -> f64 {
    let before = cpu.usage();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let used = cpu.usage() - before;
    used as f64 / started.elapsed().as_nanos() as f64
}

/// Reads the instance group's usage counter (a second handle: the pool owns the gate).
struct InstanceCpuProbe(lull_runtime::cgroup::InstanceCgroup);

impl InstanceCpuProbe {
    fn usage(&self) -> u64 {
        self.0
            .cpu_usage_ns()
            .expect("read the instance's CPU usage")
    }
}

/// One GET through the proxy, as a client would send it; the response's status and body.
async fn get(proxy: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let response = lull_tests::http::parse(&raw).unwrap();
    (response.status, response.body)
}

#[test]
fn the_gate_gives_the_cpu_for_requests_and_takes_it_within_milliseconds_after() {
    let host = Host::new();
    let zygote = Path::new(env!("CARGO_BIN_EXE_lull-test-zygote"));
    require_registry();
    // The image comes from the registry on the real host's loopback, before entering the
    // test's host namespace.
    let t = TestRuntime::new("lull-proxy-gate", zygote);
    let (image, layers) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let image = t
            .runtime
            .store
            .pull(&reference(FIXTURE_APP), &Default::default())
            .await
            .unwrap();
        let layers = t.runtime.prepare(&image).await.unwrap();
        (image, layers)
    });
    host.run(|| {
        // Worker threads start in the host namespace, so the proxy's sockets are made there.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(scenario(&host, &t, &image, layers));
    });
}

async fn scenario(host: &Host, t: &TestRuntime, image: &ImageRecord, layers: Vec<String>) {
    let (network, _) = lull_netns::network::HostNetwork::start(host.config()).unwrap();
    let att = network
        .attach(&AttachRequest {
            instance: "gated".into(),
            service: "svc".into(),
            allow_peers: false,
            hostname: "gated".into(),
        })
        .unwrap();
    let request = InstanceRequest {
        id: "gated".into(),
        layers,
        image: Runtime::image_process(image),
        overrides: ProcessOverrides {
            port: Some(PORT),
            env: vec![("SPIN".into(), "1".into())],
            ..Default::default()
        },
        resources: Default::default(),
        netns: Some(att.netns.clone()),
        files: att
            .files()
            .map(|(source, destination)| FileBind::new(source, destination))
            .to_vec(),
        log_limits: LogLimits::default(),
    };
    let instance = t.runtime.instances.launch(request).await.unwrap();
    let instance = InstanceGuard::new(&t.runtime.instances, instance);
    let gate = instance.open_gate().unwrap();
    let probe = InstanceCpuProbe(instance.cgroup.clone());

    // Idle tier 2, checked last: frozen once throttled this long.
    let mut config = ServiceConfig {
        freeze_after: Some(FREEZE_AFTER),
        ..ServiceConfig::default()
    };
    config.health.probe = HealthProbe::Http {
        path: "/healthz".into(),
        min_status: 200,
        max_status: 299,
    };
    let (events, _events_rx) = tokio::sync::mpsc::unbounded_channel();
    let metrics = Arc::new(ProxyMetrics::new());
    let pool = Pool::with_metrics("svc", Arc::new(config), events, metrics.clone());
    pool.add_instance(InstanceSpec {
        id: "gated".into(),
        addr: SocketAddr::from((att.addr, PORT)),
        cpu: Arc::new(InstanceCpu::new(gate, instance.cgroup.clone())),
    });
    let checker = HealthChecker::spawn(pool.clone());
    let routes = Arc::new(RouteTable::new());
    routes.insert("app.test", Route::new(pool.clone(), "r1"));
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();

    // In rotation once healthy; then, with nothing in flight, throttled.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let snap = pool.snapshot();
        let i = &snap.instances[0];
        if i.healthy && i.gate.is_throttled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never healthy and throttled: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The throttle's first period still holds its refill (1 ms, overrun by up to a tick, which
    // the kernel charges to later periods): measure from the second period on.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = share_over(&probe, IDLE_WINDOW).await;
    println!("idle (throttled) share of a CPU: {:.3} %", idle * 100.0);
    assert!(idle <= IDLE_SHARE_MAX, "idle share {idle}");

    // During a request the spinner runs at full speed.
    let slow = tokio::spawn(get(addr, "/sleep?ms=800"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let busy = share_over(&probe, Duration::from_millis(500)).await;
    let (status, body) = slow.await.unwrap();
    let ended = Instant::now();
    assert_eq!(status, 200, "{body}");
    println!("share of a CPU during a request: {:.1} %", busy * 100.0);
    // Restored, not throttled: the throttle caps the spinner at 0.1 % of a CPU; 5 % is fifty
    // times that and still reached when other work on a loaded machine takes most of the CPUs.
    assert!(
        busy > 0.05,
        "the spinner should get its CPU back during a request: {busy}"
    );

    // Within 10 ms of the response the instance is throttled again.
    tokio::time::sleep(Duration::from_millis(10).saturating_sub(ended.elapsed())).await;
    assert!(
        pool.snapshot().instances[0].gate.is_throttled,
        "not throttled 10 ms after the last response"
    );
    let after = share_over(&probe, AFTER_WINDOW).await;
    println!(
        "share of a CPU from 10 ms after the response: {:.3} %",
        after * 100.0
    );
    assert!(after <= IDLE_SHARE_MAX, "share after the response {after}");

    // A request to the throttled instance wakes it and is served.
    let restores = pool.snapshot().instances[0].gate.restores;
    let started = Instant::now();
    let (status, body) = get(addr, "/").await;
    println!(
        "a request to the throttled instance took {:?}",
        started.elapsed()
    );
    assert_eq!((status, body.as_str()), (200, HELLO));
    assert_eq!(pool.snapshot().instances[0].gate.restores, restores + 1);
    // The metrics saw both requests, and the gate's transitions as the meter counts them. A
    // request is recorded as its last bytes go to the client, so the client may be a moment
    // ahead of the count.
    let counted = r#"lull_proxy_requests_total{service="svc",class="2xx"} 2"#;
    let deadline = Instant::now() + Duration::from_secs(2);
    let text = loop {
        let text = metrics.encode();
        if text.contains(counted) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(text.contains(counted), "{text}");
    let meter = pool.snapshot().instances[0].gate;
    for (direction, count) in [("restore", meter.restores), ("throttle", meter.throttles)] {
        let line = format!(
            r#"lull_proxy_gate_transitions_total{{service="svc",instance="gated",direction="{direction}"}} {count}"#
        );
        assert!(text.contains(&line), "{line} not in:\n{text}");
    }
    assert!(meter.throttles >= 2 && meter.restores >= 2, "{meter:?}");

    // Idle tier 2: left alone, the throttled instance is frozen; it then uses no CPU at all,
    // and the next request thaws it, restores its CPU and is served.
    let deadline = Instant::now() + FREEZE_AFTER + Duration::from_secs(5);
    while !pool.snapshot().instances[0].gate.is_frozen {
        assert!(Instant::now() < deadline, "never frozen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let freezer_state = instance
        .cgroup
        .controller_dir(lull_runtime::cgroup::Controller::Freezer)
        .map(|dir| match instance.cgroup.is_v2() {
            true => std::fs::read_to_string(dir.join("cgroup.events")).unwrap(),
            false => std::fs::read_to_string(dir.join("freezer.state")).unwrap(),
        })
        .unwrap();
    assert!(
        freezer_state.contains("FROZEN") || freezer_state.contains("frozen 1"),
        "{freezer_state}"
    );
    let frozen = share_over(&probe, Duration::from_millis(500)).await;
    println!("frozen share of a CPU: {:.4} %", frozen * 100.0);
    assert_eq!(frozen, 0.0, "a frozen instance runs not at all");
    let started = Instant::now();
    let (status, body) = get(addr, "/").await;
    println!(
        "a request to the frozen instance took {:?}",
        started.elapsed()
    );
    assert_eq!((status, body.as_str()), (200, HELLO));
    let meter = pool.snapshot().instances[0].gate;
    assert!(meter.freezes >= 1 && !meter.is_frozen, "{meter:?}");

    proxy.shutdown(Duration::from_secs(2)).await;
    drop(checker);
    instance.delete().await.unwrap();
    network.detach("gated").unwrap();
}
