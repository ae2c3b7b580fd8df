//! The deployment engine against the fake host, the in-memory store and a real proxy on
//! loopback: deploys, failures, rollback, concurrency, crash loops, pause/resume/delete,
//! adoption and a deploy under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lull_daemon::engine::{
    Engine, EngineError, EngineSettings, InstanceState, OperationEnd, RevisionPlan, RollbackOutcome,
};
use lull_daemon::host::ExitInfo;
use lull_daemon::host::fake::FakeHost;
use lull_daemon::store::{MemStore, NewService, RevisionCommit, RevisionRecord, Store};
use lull_proxy::config::{HealthCheck, HealthProbe};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Revision documents in these tests: `{"image": ..., "env": {...}}`.
fn plan(record: &RevisionRecord) -> Result<RevisionPlan, String> {
    let image = record.doc["image"].as_str().ok_or("image: missing")?;
    let mut plan = RevisionPlan::for_image(image);
    if let Some(env) = record.doc["env"].as_object() {
        for (k, v) in env {
            plan.env
                .push((k.clone(), v.as_str().unwrap_or_default().to_owned()));
        }
    }
    plan.hostnames = vec![format!("{}.localhost", record.service)];
    plan.proxy.health = HealthCheck {
        probe: HealthProbe::Http {
            path: "/".into(),
            min_status: 200,
            max_status: 399,
        },
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(80),
        healthy_threshold: 1,
        unhealthy_threshold: 2,
    };
    plan.proxy.paused_retry_after = Duration::from_secs(7);
    Ok(plan)
}

struct Rig {
    host: FakeHost,
    store: Arc<MemStore>,
    routes: Arc<RouteTable>,
    engine: Engine,
    /// Serves on `addr` while the rig lives.
    _proxy: Proxy,
    addr: SocketAddr,
}

impl Rig {
    async fn new(settings: EngineSettings) -> Rig {
        let host = FakeHost::new();
        let store = Arc::new(MemStore::new());
        let routes = Arc::new(RouteTable::new());
        let engine = Engine::new(
            Arc::new(host.clone()),
            store.clone(),
            routes.clone(),
            Arc::new(plan),
            settings,
        );
        let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
        let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        Rig {
            host,
            store,
            routes,
            engine,
            _proxy: proxy,
            addr,
        }
    }

    fn create(&self, service: &str) {
        self.store
            .create_service(&NewService {
                name: service.into(),
                state: "active".into(),
                doc: json!({}),
            })
            .unwrap();
    }

    /// Commits a revision; returns its number.
    fn revision(&self, service: &str, env: serde_json::Value) -> u64 {
        self.store
            .commit_revision(&RevisionCommit {
                service: service.into(),
                expected_generation: None,
                doc: json!({"image": "example/app:1", "env": env}),
                cause: "test".into(),
                service_doc: None,
                state: None,
                event: None,
                make_current: true,
            })
            .unwrap()
            .revision
            .number
    }

    async fn deploy_ok(&self, service: &str, revision: u64) {
        let mut op = self.engine.deploy(service, revision).await.unwrap();
        match op.wait().await {
            OperationEnd::Succeeded { revision: r, .. } => assert_eq!(r, revision),
            other => panic!("deploy of {service} r{revision}: {other:?}"),
        }
    }

    async fn get(&self, host: &str) -> Reply {
        get(self.addr, host, "/").await
    }

    fn events(&self, service: &str) -> Vec<(String, String)> {
        self.store
            .list_events(service, 0, 10_000)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.message))
            .collect()
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// One HTTP/1.1 GET through the proxy on a fresh connection.
async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0),
        head: head.to_lowercase(),
        body: body.to_owned(),
    }
}

fn fast() -> EngineSettings {
    EngineSettings {
        startup_deadline: Duration::from_secs(5),
        stop_grace: Duration::from_millis(500),
        drain_timeout: Duration::from_secs(2),
        ..EngineSettings::default()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_serves_the_new_revision_and_keeps_the_old_standing_by() {
    let rig = Rig::new(fast()).await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    let mut op = rig.engine.deploy("web", r1).await.unwrap();
    assert!(op.id.starts_with("op-"));
    assert!(matches!(op.wait().await, OperationEnd::Succeeded { .. }));
    let reply = rig.get("web.localhost").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.ends_with("rev 1"), "{reply:?}");

    let r2 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r2).await;
    let reply = rig.get("web.localhost").await;
    assert!(reply.body.starts_with("fake web-r2-"), "{reply:?}");
    assert!(reply.body.ends_with("rev 2"), "{reply:?}");

    let old = rig.host.running_of("web", 1);
    assert_eq!(old.len(), 1, "the old revision stands by");
    eventually("the old revision standing by, throttled", || {
        rig.host.cpu(&old[0]).is_some_and(|c| c.is_throttled())
    })
    .await;
    let status = rig.engine.status("web").await.unwrap();
    assert_eq!(status.serving, Some(2));
    assert!(
        status
            .instances
            .iter()
            .any(|i| i.revision == 1 && i.state == InstanceState::Standby)
    );
    assert!(
        status
            .instances
            .iter()
            .any(|i| i.revision == 2 && i.state == InstanceState::Healthy)
    );

    let op_record = rig.store.get_operation(&op.id).unwrap();
    assert_eq!(op_record.state.as_str(), "succeeded");
    assert!(!op_record.progress.is_empty());
    eventually("the standby event recorded", || {
        rig.events("web")
            .iter()
            .any(|(k, _)| k == "revision.standby")
    })
    .await;
    let kinds: Vec<_> = rig.events("web").into_iter().map(|(k, _)| k).collect();
    for kind in [
        "deploy.started",
        "instance.started",
        "instance.healthy",
        "deploy.succeeded",
        "revision.standby",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_exiting_fails_the_deploy_at_once_with_its_code_and_logs() {
    let rig = Rig::new(fast()).await;
    rig.create("web");
    // A failed first deployment leaves the service deployable.
    let bad = rig.revision(
        "web",
        json!({"FAKE_EXIT": "3@100", "FAKE_START_MS": "5000", "FAKE_LOG": "cannot open config.yaml"}),
    );
    let started = Instant::now();
    let mut op = rig.engine.deploy("web", bad).await.unwrap();
    let OperationEnd::Failed(failure) = op.wait().await else {
        panic!("deploy did not fail");
    };
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1100),
        "failure reported after {took:?}"
    );
    assert!(failure.cause.contains("exited with code 3"), "{failure}");
    assert!(
        failure
            .logs
            .iter()
            .any(|l| l.ends_with(" cannot open config.yaml")),
        "{failure}"
    );
    assert_eq!(rig.get("web.localhost").await.status, 404);

    let good = rig.revision("web", json!({}));
    rig.deploy_ok("web", good).await;
    let bad_again = rig.revision("web", json!({"FAKE_EXIT": "7"}));
    let mut op = rig.engine.deploy("web", bad_again).await.unwrap();
    let end = op.wait().await;
    let OperationEnd::Failed(failure) = end else {
        panic!("deploy did not fail: {end:?} {:?}", rig.events("web"));
    };
    assert!(failure.cause.contains("exited with code 7"), "{failure}");
    let reply = rig.get("web.localhost").await;
    assert!(
        reply.body.ends_with(&format!("rev {good}")),
        "old revision stopped serving: {reply:?}"
    );
    assert_eq!(
        rig.host.running_of("web", bad_again).len(),
        0,
        "failed instances left running"
    );
    let record = rig.store.get_operation(&op.id).unwrap();
    assert_eq!(record.state.as_str(), "failed");
    let events = rig.events("web");
    assert!(
        events
            .iter()
            .any(|(k, m)| k == "deploy.failed" && m.contains("code 7")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_never_healthy_fails_the_deploy_at_the_startup_deadline() {
    let rig = Rig::new(EngineSettings {
        startup_deadline: Duration::from_millis(600),
        ..fast()
    })
    .await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    let sick = rig.revision("web", json!({"FAKE_UNHEALTHY": "1"}));
    let started = Instant::now();
    let mut op = rig.engine.deploy("web", sick).await.unwrap();
    let OperationEnd::Failed(failure) = op.wait().await else {
        panic!("deploy did not fail");
    };
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1600),
        "{took:?}"
    );
    assert!(failure.cause.contains("not healthy"), "{failure}");
    assert!(failure.cause.contains("GET /: 500"), "{failure}");
    assert!(rig.get("web.localhost").await.body.ends_with("rev 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_inside_the_window_is_a_routing_switch() {
    let rig = Rig::new(fast()).await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    let r2 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    rig.deploy_ok("web", r2).await;
    let old = rig.host.running_of("web", r1);
    eventually("revision 1 standing by", || {
        rig.host.cpu(&old[0]).is_some_and(|c| c.is_throttled())
    })
    .await;
    let starts = rig.host.starts();
    let restores = rig.host.cpu(&old[0]).unwrap().restores();
    let outcome = rig.engine.rollback("web", None).await.unwrap();
    let RollbackOutcome::Switched { revision, took } = outcome else {
        panic!("not a switch: {outcome:?}");
    };
    assert_eq!(revision, r1);
    assert!(took < Duration::from_millis(50), "switch took {took:?}");
    assert_eq!(
        rig.host.starts(),
        starts,
        "a rollback inside the window started instances"
    );
    // Restored by the switch (the gate throttles it again once it idles).
    assert!(
        rig.host.cpu(&old[0]).unwrap().restores() > restores,
        "CPU not restored"
    );
    let reply = rig.get("web.localhost").await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.ends_with("rev 1"), "{reply:?}");
    assert_eq!(rig.engine.status("web").await.unwrap().serving, Some(r1));

    // Outside the window (none here): a deploy.
    let rig = Rig::new(EngineSettings {
        rollback_window: Duration::ZERO,
        ..fast()
    })
    .await;
    rig.create("api");
    let a1 = rig.revision("api", json!({}));
    let a2 = rig.revision("api", json!({}));
    rig.deploy_ok("api", a1).await;
    rig.deploy_ok("api", a2).await;
    eventually("revision 1 stopped", || {
        rig.host.running_of("api", a1).is_empty()
    })
    .await;
    let RollbackOutcome::Deploying(mut op) = rig.engine.rollback("api", None).await.unwrap() else {
        panic!("a rollback outside the window switched");
    };
    assert!(matches!(op.wait().await, OperationEnd::Succeeded { revision, .. } if revision == a1));
    assert!(rig.get("api.localhost").await.body.ends_with("rev 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deploy_while_one_runs_is_rejected_naming_it() {
    let rig = Rig::new(fast()).await;
    rig.create("web");
    let slow = rig.revision("web", json!({"FAKE_START_MS": "400"}));
    let other = rig.revision("web", json!({}));
    let mut first = rig.engine.deploy("web", slow).await.unwrap();
    let error = rig.engine.deploy("web", other).await.unwrap_err();
    assert!(matches!(error, EngineError::Busy { .. }), "{error}");
    assert!(error.to_string().contains(&first.id), "{error}");
    assert!(matches!(
        rig.engine.pause("web").await,
        Err(EngineError::Busy { .. })
    ));
    assert!(matches!(first.wait().await, OperationEnd::Succeeded { .. }));
    rig.deploy_ok("web", other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_instance_restarts_with_growing_delays() {
    let rig = Rig::new(EngineSettings {
        restart_backoff: Duration::from_millis(100),
        restart_backoff_max: Duration::from_secs(2),
        ..fast()
    })
    .await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    let mut intervals = Vec::new();
    for round in 0..4 {
        let running = rig.host.running_of("web", r1);
        assert_eq!(running.len(), 1, "round {round}: {running:?}");
        let exit = match round {
            1 => ExitInfo::oom(),
            _ => ExitInfo::code(2),
        };
        let killed = Instant::now();
        assert!(rig.host.kill(&running[0], exit));
        eventually("a replacement", || {
            let now = rig.host.running_of("web", r1);
            now.len() == 1 && now[0] != running[0]
        })
        .await;
        intervals.push(killed.elapsed());
    }
    for pair in intervals.windows(2) {
        assert!(pair[1] > pair[0], "delays do not grow: {intervals:?}");
    }
    assert!(intervals[0] >= Duration::from_millis(100), "{intervals:?}");
    assert!(intervals[3] >= Duration::from_millis(800), "{intervals:?}");
    // The host runs the replacement a moment before the engine records it.
    eventually("four restart events", || {
        rig.events("web")
            .iter()
            .filter(|(k, _)| k == "instance.restarted")
            .count()
            == 4
    })
    .await;
    let status = rig.engine.status("web").await.unwrap();
    assert_eq!(status.restarts, 4);
    let events = rig.events("web");
    let restarted: Vec<_> = events
        .iter()
        .filter(|(k, _)| k == "instance.restarted")
        .collect();
    assert_eq!(restarted.len(), 4, "{events:?}");
    assert!(
        restarted[0].1.contains("exited with code 2"),
        "{restarted:?}"
    );
    assert!(restarted[1].1.contains("out of memory"), "{restarted:?}");

    // A failed health check is a cause too.
    eventually("the replacement healthy", || {
        rig.events("web")
            .last()
            .is_some_and(|(k, _)| k == "instance.healthy")
    })
    .await;
    let running = rig.host.running_of("web", r1);
    rig.host.set_unhealthy(&running[0], true);
    eventually("a restart after failed health checks", || {
        rig.events("web")
            .iter()
            .any(|(k, m)| k == "instance.restarted" && m.contains("failed its health check"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_answers_503_resume_serves_again_delete_answers_404() {
    let rig = Rig::new(fast()).await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    rig.engine.pause("web").await.unwrap();
    let reply = rig.get("web.localhost").await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.head.contains("retry-after: 7"), "{reply:?}");
    assert!(
        rig.host.running().is_empty(),
        "paused instances run: {:?}",
        rig.host.running()
    );
    assert_eq!(rig.store.get_service("web").unwrap().state, "paused");

    // A resume that fails leaves the service paused and deployable.
    rig.host.fail_images(Some("registry unreachable"));
    let error = rig.engine.resume("web").await.unwrap_err();
    assert!(
        error.to_string().contains("registry unreachable"),
        "{error}"
    );
    assert_eq!(rig.get("web.localhost").await.status, 503);
    rig.host.fail_images(None);

    let started = Instant::now();
    rig.engine.resume("web").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let reply = rig.get("web.localhost").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(!rig.engine.status("web").await.unwrap().paused);

    rig.engine.delete("web").await.unwrap();
    assert_eq!(rig.get("web.localhost").await.status, 404);
    assert!(
        rig.host.present().is_empty(),
        "left behind: {:?}",
        rig.host.present()
    );
    assert!(rig.routes.hosts().is_empty());
    let events = rig.events("web");
    assert_eq!(
        events.last().map(|(k, _)| k.as_str()),
        Some("service.deleted"),
        "{events:?}"
    );
    assert!(matches!(
        rig.engine.status("web").await,
        Err(EngineError::UnknownService { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_engine_adopts_running_instances_without_restarting_them() {
    let rig = Rig::new(fast()).await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    let starts = rig.host.starts();
    let running = rig.host.running();
    // The daemon restarts: a new engine, routes and proxy; the instances run on.
    let routes = Arc::new(RouteTable::new());
    let engine = Engine::new(
        Arc::new(rig.host.clone()),
        rig.store.clone(),
        routes.clone(),
        Arc::new(plan),
        fast(),
    );
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let report = engine.recover().await.unwrap();
    assert_eq!(report.adopted, running);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reply = get(addr, "web.localhost", "/").await;
        if reply.status == 200 {
            assert!(reply.body.ends_with("rev 1"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "adopted instance not serving: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.host.starts(), starts, "recovery restarted instances");
    assert_eq!(engine.status("web").await.unwrap().serving, Some(r1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_during_deploys_under_load() {
    let rig = Rig::new(EngineSettings {
        rollback_window: Duration::ZERO,
        ..fast()
    })
    .await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), rig.addr);
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let reply = get(addr, "web.localhost", "/sleep/5").await;
                if reply.status == 200 {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    failures.push(reply);
                }
            }
            failures
        }));
    }
    for _ in 0..3 {
        let revision = rig.revision("web", json!({}));
        rig.deploy_ok("web", revision).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(
        ok.load(Ordering::SeqCst) > 50,
        "only {} requests",
        ok.load(Ordering::SeqCst)
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert!(rig.get("web.localhost").await.body.ends_with("rev 4"));
    eventually("old revisions stopped", || rig.host.running().len() == 1).await;
}

/// A request still in flight when the drain times out keeps its instance's CPU until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_drain_timeout_keeps_its_cpu() {
    let rig = Rig::new(EngineSettings {
        drain_timeout: Duration::from_millis(100),
        ..fast()
    })
    .await;
    rig.create("web");
    let r1 = rig.revision("web", json!({}));
    let r2 = rig.revision("web", json!({}));
    rig.deploy_ok("web", r1).await;
    let old = rig.host.running_of("web", r1);
    let addr = rig.addr;
    let slow = tokio::spawn(async move { get(addr, "web.localhost", "/sleep/1500").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.deploy_ok("web", r2).await;
    // Past the drain timeout, the slow request still runs: its instance is not throttled.
    eventually("revision 1 standing by", || {
        rig.store
            .list_events("web", 0, 1000)
            .unwrap()
            .iter()
            .any(|e| e.kind == "revision.standby")
    })
    .await;
    assert!(
        !rig.host.cpu(&old[0]).unwrap().is_throttled(),
        "throttled with a request in flight"
    );
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
}
