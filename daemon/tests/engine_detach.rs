//! A daemon handing over to its successor: `Engine::detach` ends every supervisor without
//! stopping an instance, leaves the routes serving, restores the instances' CPU and never
//! throttles them again; commands are refused until `Engine::reattach`, after which
//! `Engine::recover` adopts the instances again and supervises them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lull_daemon::engine::{Engine, EngineError, EngineSettings, RevisionPlan};
use lull_daemon::host::ExitInfo;
use lull_daemon::host::fake::FakeHost;
use lull_daemon::store::{MemStore, NewService, RevisionCommit, RevisionRecord, Store};
use lull_proxy::config::{HealthCheck, HealthProbe};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn plan(record: &RevisionRecord) -> Result<RevisionPlan, String> {
    let image = record.doc["image"].as_str().ok_or("image: missing")?;
    let mut plan = RevisionPlan::for_image(image);
    plan.hostnames = vec![format!("{}.localhost", record.service)];
    plan.proxy.health = HealthCheck {
        probe: HealthProbe::Http {
            path: "/".into(),
            min_status: 200,
            max_status: 399,
        },
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(40),
        healthy_threshold: 1,
        unhealthy_threshold: 2,
    };
    Ok(plan)
}

fn settings() -> EngineSettings {
    EngineSettings {
        startup_deadline: Duration::from_secs(5),
        stop_grace: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(2),
        restart_backoff: Duration::from_millis(50),
        ..EngineSettings::default()
    }
}

async fn status_of(addr: SocketAddr) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: web.localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    String::from_utf8_lossy(&raw)
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Rig {
    host: FakeHost,
    engine: Engine,
    _proxy: Proxy,
    addr: SocketAddr,
}

async fn serving_rig() -> Rig {
    let host = FakeHost::new();
    let store = Arc::new(MemStore::new());
    let routes = Arc::new(RouteTable::new());
    let engine = Engine::new(
        Arc::new(host.clone()),
        store.clone(),
        routes.clone(),
        Arc::new(plan),
        settings(),
    );
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    store
        .create_service(&NewService {
            name: "web".into(),
            state: "active".into(),
            doc: json!({}),
        })
        .unwrap();
    let revision = store
        .commit_revision(&RevisionCommit {
            service: "web".into(),
            expected_generation: None,
            doc: json!({"image": "example/app:1"}),
            cause: "test".into(),
            service_doc: None,
            state: None,
            event: None,
            make_current: true,
        })
        .unwrap()
        .revision
        .number;
    let mut op = engine.deploy("web", revision).await.unwrap();
    op.wait().await;
    assert_eq!(status_of(addr).await, 200);
    Rig {
        host,
        engine,
        _proxy: proxy,
        addr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_instances_run_on_unsupervised_and_never_throttled() {
    let rig = serving_rig().await;
    let id = rig.host.running()[0].clone();
    let cpu = rig.host.cpu(&id).expect("the instance's cpu");
    eventually("the idle instance throttled", || cpu.is_throttled()).await;
    let (starts, stops) = (rig.host.starts(), rig.host.stops());

    assert_eq!(rig.engine.detach().await, vec!["web".to_owned()]);
    assert!(!cpu.is_throttled(), "detach leaves the cpu restored");
    let throttles = cpu.throttles();

    // The old process's proxy still serves through the routes, and never throttles again.
    for _ in 0..5 {
        assert_eq!(status_of(rig.addr).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cpu.throttles(), throttles, "a detached gate throttled");
    assert!(!cpu.is_throttled());

    // Nothing is supervised: a dead instance is not replaced, nothing is stopped.
    assert!(rig.host.kill(&id, ExitInfo::code(1)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rig.host.starts(),
        starts,
        "a detached engine restarted an instance"
    );
    assert_eq!(
        rig.host.stops(),
        stops,
        "a detached engine stopped an instance"
    );

    // Commands are refused, and no supervisor starts for them.
    assert!(matches!(
        rig.engine.status("web").await,
        Err(EngineError::Stopped { .. })
    ));
    assert!(matches!(
        rig.engine.deploy("web", 1).await,
        Err(EngineError::Stopped { .. })
    ));
    assert!(rig.engine.services().is_empty());
    assert_eq!(rig.host.starts(), starts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattached_engine_adopts_and_supervises_again() {
    let rig = serving_rig().await;
    let running = rig.host.running();
    let starts = rig.host.starts();
    rig.engine.detach().await;

    rig.engine.reattach();
    let report = rig.engine.recover().await.unwrap();
    assert_eq!(report.adopted, running);
    assert_eq!(rig.host.starts(), starts, "adoption restarted an instance");
    assert_eq!(rig.engine.status("web").await.unwrap().serving, Some(1));
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_of(rig.addr).await != 200 {
        assert!(Instant::now() < deadline, "re-adopted instance not serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Supervised again: a crash is replaced.
    assert!(rig.host.kill(&running[0], ExitInfo::code(1)));
    eventually("a replacement", || {
        let now = rig.host.running();
        now.len() == 1 && now[0] != running[0]
    })
    .await;
}
