//! The control plane through its admin socket, without root: the real store (SQLite), the
//! real engine and proxy, instances from the fake host (small HTTP servers on loopback).
//! Create, deploy, update, a broken deploy, rollback, pause, resume, events, export, delete.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use lull_daemon::api::{Client, ErrorCode};
use lull_daemon::control::Control;
use lull_daemon::control::planner::SpecPlanner;
use lull_daemon::engine::{Engine, EngineSettings};
use lull_daemon::host::fake::FakeHost;
use lull_daemon::store::{SqliteStore, Store};
use lull_daemon::testing::InProcess;
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use serde_json::{Value, json};

struct Daemon {
    client: Client,
    proxy_addr: SocketAddr,
    _plane: InProcess,
    _dir: tempfile::TempDir,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start(dir.path()).await;
    Daemon {
        client: plane.client.clone(),
        proxy_addr: plane.proxy_addr,
        _plane: plane,
        _dir: dir,
    }
}

/// Follows an operation to its end; returns its lines and the end.
async fn follow(client: &Client, op: &str) -> (Vec<String>, Value) {
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/operations/{op}/progress"),
            None::<&()>,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(v) = lines.next().await.unwrap() {
        if let Some(line) = v.get("line") {
            out.push(line.as_str().unwrap().to_owned());
        } else if let Some(end) = v.get("end") {
            return (out, end.clone());
        }
    }
    panic!("operation {op} ended without an end: {out:?}");
}

/// GET / with the service's Host through the proxy.
async fn get(proxy: SocketAddr, host: &str) -> (u16, String, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let retry_after = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after: ")
            .map(str::to_owned)
    });
    (status, body.to_owned(), retry_after)
}

async fn call(client: &Client, method: Method, path: &str, body: Value) -> Value {
    client.call(method, path, Some(&body)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_from_create_to_delete() {
    let d = daemon().await;
    let c = &d.client;

    // Bad input: every field named.
    let err = c
        .call::<_, Value>(
            Method::POST,
            "/v1/services",
            Some(&json!({"name": "Web!", "source": {"type": "image", "reference": "fake/app:1"}, "port": 0})),
        )
        .await
        .unwrap_err();
    let err = err.api().unwrap().clone();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
    assert!(
        fields.contains(&"name") && fields.contains(&"port"),
        "{err:?}"
    );

    // Create: revision 1 deploys and serves on web.localhost.
    let started = call(
        c,
        Method::POST,
        "/v1/services",
        json!({"name": "web", "source": {"type": "image", "reference": "fake/app:1"}}),
    )
    .await;
    assert_eq!(started["revision"], 1);
    let (lines, end) = follow(c, started["operation"].as_str().unwrap()).await;
    assert_eq!(end["state"], "succeeded", "{lines:?} {end}");
    let (status, body, _) = get(d.proxy_addr, "web.localhost").await;
    assert_eq!(status, 200);
    assert!(body.contains("rev 1"), "{body}");
    let shown = call(c, Method::GET, "/v1/services/web", Value::Null).await;
    assert_eq!(shown["state"], "active");
    assert_eq!(
        shown["urls"][0],
        format!("http://web.localhost:{}/", d.proxy_addr.port())
    );

    // The app's output, each line with its instance; the proxy's access log of the service.
    let mut logs = c
        .stream(Method::GET, "/v1/services/web/logs", None::<&()>)
        .await
        .unwrap();
    let first = logs.next().await.unwrap().expect("a log line");
    assert!(
        first["text"].as_str().unwrap().contains("rev 1 starting"),
        "{first}"
    );
    assert!(
        first["instance"].as_str().unwrap().starts_with("web-r1-"),
        "{first}"
    );
    assert!(first["time"].as_str().unwrap().ends_with('Z'), "{first}");
    let mut requests = c
        .stream(Method::GET, "/v1/services/web/logs?requests", None::<&()>)
        .await
        .unwrap();
    let entry = requests.next().await.unwrap().expect("an access log entry");
    assert_eq!(entry["status"], 200, "{entry}");
    assert_eq!(entry["host"], "web.localhost", "{entry}");
    let bad = c
        .get::<Value>("/v1/services/web/logs?since=yesterday")
        .await
        .unwrap_err();
    assert_eq!(bad.api().unwrap().fields[0].field, "since");
    // A duration far past the calendar is "since the beginning", not a crash.
    let mut all = c
        .stream(
            Method::GET,
            "/v1/services/web/logs?since=100000000d",
            None::<&()>,
        )
        .await
        .unwrap();
    assert!(all.next().await.unwrap().is_some());
    let outside = c
        .get::<Value>("/v1/services/..%2F..%2Fx/logs?requests")
        .await
        .unwrap_err();
    assert_eq!(outside.api().unwrap().code, ErrorCode::NotFound);

    // Another service may not take web's hostname.
    let taken = c
        .call::<_, Value>(
            Method::POST,
            "/v1/services",
            Some(&json!({"name": "thief", "source": {"type": "image", "reference": "fake/app:1"}, "hostnames": ["web.localhost"]})),
        )
        .await
        .unwrap_err();
    let taken = taken.api().unwrap();
    assert_eq!(taken.fields[0].field, "hostnames", "{taken:?}");
    assert!(taken.message.contains("service web"), "{taken:?}");

    // A second create of the same name: already exists.
    let again = c
        .call::<_, Value>(
            Method::POST,
            "/v1/services",
            Some(&json!({"name": "web", "source": {"type": "image", "reference": "fake/app:1"}})),
        )
        .await
        .unwrap_err();
    assert_eq!(again.api().unwrap().code, ErrorCode::AlreadyExists);

    // An update that changes nothing makes no revision.
    let same = call(c, Method::PATCH, "/v1/services/web", json!({"port": 8080})).await;
    assert!(same["operation"].is_null(), "{same}");

    // An env change: revision 2, deployed blue/green.
    let started = call(
        c,
        Method::PATCH,
        "/v1/services/web",
        json!({"env": [{"name": "GREETING", "value": "hi"}]}),
    )
    .await;
    assert_eq!(started["revision"], 2);
    let (_, end) = follow(c, started["operation"].as_str().unwrap()).await;
    assert_eq!(end["state"], "succeeded", "{end}");
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 2"));

    // A broken revision fails fast with the exit code and its log line; revision 2 serves on.
    let started_at = Instant::now();
    let started = call(
        c,
        Method::PATCH,
        "/v1/services/web",
        json!({"env": [{"name": "FAKE_EXIT", "value": "3"}, {"name": "FAKE_LOG", "value": "boom: no such command"}]}),
    )
    .await;
    let (_, end) = follow(c, started["operation"].as_str().unwrap()).await;
    assert_eq!(end["state"], "failed", "{end}");
    assert!(
        started_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        started_at.elapsed()
    );
    let message = end["message"].as_str().unwrap();
    assert!(message.contains("code 3"), "{message}");
    assert!(message.contains("boom: no such command"), "{message}");
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 2"));

    // Rollback to revision 1: a routing switch.
    let rolled = call(
        c,
        Method::POST,
        "/v1/services/web/rollback",
        json!({"revision": 1}),
    )
    .await;
    assert_eq!(rolled["mode"], "switch", "{rolled}");
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 1"));

    let revisions = call(c, Method::GET, "/v1/services/web/revisions", Value::Null).await;
    let causes: Vec<&str> = revisions
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cause"].as_str().unwrap())
        .collect();
    assert_eq!(causes.len(), 3, "{causes:?}");
    assert_eq!(causes[0], "created");
    assert!(causes[1].contains("GREETING"), "{causes:?}");

    // Pause: 503 with Retry-After, never 404; resume: served again.
    call(c, Method::POST, "/v1/services/web/pause", Value::Null).await;
    let (status, _, retry_after) = get(d.proxy_addr, "web.localhost").await;
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    let resumed = call(c, Method::POST, "/v1/services/web/resume", Value::Null).await;
    if let Some(op) = resumed["operation"].as_str() {
        assert_eq!(follow(c, op).await.1["state"], "succeeded");
    }
    assert_eq!(get(d.proxy_addr, "web.localhost").await.0, 200);

    // Export: an apprunner.yaml with lull's settings after it.
    let yaml = c
        .stream(Method::GET, "/v1/services/web/export", None::<&()>)
        .await
        .is_ok();
    assert!(yaml);

    // Delete: the host is unknown again (404), and the final event says so.
    call(c, Method::DELETE, "/v1/services/web", Value::Null).await;
    assert_eq!(get(d.proxy_addr, "web.localhost").await.0, 404);
    let mut events = c
        .stream(Method::GET, "/v1/services/web/events", None::<&()>)
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while let Some(e) = events.next().await.unwrap() {
        kinds.push(e["kind"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds.first().map(String::as_str), Some("service.created"));
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("service.deleted"),
        "{kinds:?}"
    );
    let gone = c.get::<Value>("/v1/services/web").await.unwrap_err();
    assert_eq!(gone.api().unwrap().code, ErrorCode::NotFound);
}

/// A paused service stays paused across a daemon restart, answering 503 (never 404), and
/// resumes; an active one with nothing running is started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_paused_stays_503_and_active_is_started() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("data")).unwrap());
    let up = |store: Arc<dyn Store>| async move {
        let routes = Arc::new(RouteTable::new());
        let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
        let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let planner = Arc::new(SpecPlanner {
            store: store.clone(),
            key: None,
            base_domain: None,
        });
        let engine = Engine::new(
            Arc::new(FakeHost::new()),
            store.clone(),
            routes,
            planner,
            EngineSettings::default(),
        );
        let control = Control {
            store,
            engine,
            base_domain: None,
            key: None,
            http_port: Some(addr.port()),
            builds: None,
            tls: None,
        };
        (control, proxy, addr)
    };
    let (first, _proxy1, addr1) = up(store.clone()).await;
    for name in ["paused", "active"] {
        let started = first
            .create(json!({"name": name, "source": {"type": "image", "reference": "fake/app:1"}}))
            .await
            .unwrap();
        let mut op = first
            .live_operation(started.operation.as_deref().unwrap())
            .unwrap();
        assert!(matches!(
            op.wait().await,
            lull_daemon::engine::OperationEnd::Succeeded { .. }
        ));
    }
    first.pause("paused").await.unwrap();
    assert_eq!(get(addr1, "paused.localhost").await.0, 503);

    // A new daemon over the same store, on a host where nothing runs (a reboot).
    let (second, _proxy2, addr2) = up(store.clone()).await;
    let started = second.start_services().await.unwrap();
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0].0, "active");
    let (status, _, retry_after) = get(addr2, "paused.localhost").await;
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    second.resume("paused").await.unwrap();
    assert_eq!(get(addr2, "paused.localhost").await.0, 200);
    let mut op = second
        .live_operation(started[0].1.operation.as_deref().unwrap())
        .unwrap();
    op.wait().await;
    assert_eq!(get(addr2, "active.localhost").await.0, 200);
}
