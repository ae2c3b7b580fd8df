//! Privileged, end to end: the real `lull daemon` binary with a generated `lull.toml`, driven
//! through its admin socket, served through its proxy. A service created from the fixture
//! image, redeployed under load without a failed request, a broken revision refused fast,
//! rolled back, paused and resumed, its events in order, the daemon killed and restarted
//! (instances adopted, not restarted), and the service deleted leaving nothing behind.
//!
//! Preconditions: root and the registry on 127.0.0.1:5000 with the fixture images
//! (`cargo xtask fixtures`).

use std::time::{Duration, Instant};

use lull_tests::daemon::{
    LoadLoop, TestDaemon, now_millis, proxy_get, rfc3339_millis, wait_for_status,
};
use lull_tests::e2e::{FIXTURE_APP, HELLO, require_registry, require_root};
use serde_json::{Value, json};

const HOST: &str = "web.localhost";

/// Prints a step's figure as the test goes (shown with `--nocapture`, and on failure).
fn figure(step: &str, what: &str, took: Duration) {
    eprintln!(
        "[daemon e2e] {step}: {what}: {:.1} ms",
        took.as_secs_f64() * 1e3
    );
}

fn get(d: &TestDaemon, path: &str) -> lull_tests::http::Response {
    proxy_get(d.http_port, HOST, path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET {path} through the proxy: {e}\n{}", d.log()))
}

/// The ids of the instances serving the service's serving revision, sorted.
fn serving_instances(status: &Value) -> Vec<String> {
    let serving = status["status"]["serving"].as_u64();
    let mut ids: Vec<String> = status["status"]["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["revision"].as_u64() == serving)
                .filter_map(|i| i["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The first of `expected` missing from `kinds` in that order (other kinds may come between).
fn missing_in_order<'e>(kinds: &[String], expected: &[&'e str]) -> Option<&'e str> {
    let mut rest = kinds.iter();
    expected
        .iter()
        .find(|want| !rest.any(|k| k == *want))
        .copied()
}

#[test]
fn a_service_lives_through_deploys_a_failure_rollback_pause_and_a_daemon_restart() {
    require_root();
    require_registry();
    let whole = Instant::now();
    let mut d = TestDaemon::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_lull")),
        "lull-daemon-e2e",
    );
    let took = d.start();
    figure("0", "daemon start to socket answering", took);

    // The metrics endpoint comes up on its own port (bound just after the admin socket).
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        match lull_tests::http::get_local(d.metrics_port, "/metrics", Duration::from_secs(2)) {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => panic!("metrics on {}: {e}", d.metrics_port),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert_eq!(metrics.status, 200, "{}", metrics.body);

    // 1. Create: revision 1 deploys and serves on web.localhost.
    let started = Instant::now();
    let created = d.api(
        "POST",
        "/v1/services",
        Some(&json!({"name": "web", "source": {"type": "image", "reference": FIXTURE_APP}})),
    );
    assert_eq!(created.status, 202, "{}", created.body);
    let created = created.json();
    assert_eq!(created["revision"], 1, "{created}");
    let op = created["operation"]
        .as_str()
        .expect("an operation id")
        .to_owned();
    let (lines, end) = d.follow(&op);
    assert_eq!(end["state"], "succeeded", "{lines:#?}\n{end}");
    figure(
        "1",
        "create (pull, start, healthy, routed)",
        started.elapsed(),
    );
    let answer = get(&d, "/");
    assert_eq!((answer.status, answer.body.as_str()), (200, HELLO));
    let shown = d.api_json("GET", "/v1/services/web", None);
    assert_eq!(shown["state"], "active", "{shown}");
    assert_eq!(shown["status"]["serving"], 1, "{shown}");
    assert_eq!(
        shown["urls"][0],
        format!("http://web.localhost:{}/", d.http_port),
        "{shown}"
    );

    // 2. An env change (revision 2) deployed under load: not one request fails.
    let load = LoadLoop::start(d.http_port, HOST, 4);
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let updated = d.api_json(
        "PATCH",
        "/v1/services/web",
        Some(&json!({"env": [{"name": "GREETING", "value": "second"}]})),
    );
    assert_eq!(updated["revision"], 2, "{updated}");
    let (lines, end) = d.follow(updated["operation"].as_str().expect("an operation id"));
    let deploy_took = started.elapsed();
    assert_eq!(end["state"], "succeeded", "{lines:#?}\n{end}");
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    figure("2", "deploy of revision 2 under load", deploy_took);
    eprintln!(
        "[daemon e2e] 2: load during the deploy: {} requests, {} ok, {} failed, {} connections",
        report.sent, report.ok, report.failed, report.connections
    );
    assert_eq!(
        report.failed, 0,
        "requests failed across the deploy: {:#?}",
        report.failures
    );
    assert!(
        report.sent > 100,
        "too little load to mean anything: {report:?}"
    );
    let env = get(&d, "/env");
    assert_eq!(env.status, 200);
    assert!(
        env.body.contains("GREETING=second"),
        "revision 2 serves:\n{}",
        env.body
    );

    // 3. Broken revisions fail fast, naming the cause, and revision 2 serves on: a command
    //    that does not exist (refused when the instance is created), then an app that starts
    //    and exits with code 2 at once (the failure follows the exit within a second).
    let started = Instant::now();
    let broken = d.api_json(
        "PATCH",
        "/v1/services/web",
        Some(&json!({"command": ["/nonexistent"]})),
    );
    assert_eq!(broken["revision"], 3, "{broken}");
    let (lines, end) = d.follow(broken["operation"].as_str().expect("an operation id"));
    figure("3", "missing command: PATCH to failed", started.elapsed());
    assert_eq!(end["state"], "failed", "{lines:#?}\n{end}");
    let message = end["message"].as_str().unwrap_or_default();
    eprintln!("[daemon e2e] 3: the failure: {message}");
    assert!(
        message.contains("revision 3") && message.contains("/nonexistent"),
        "the failure names the revision and the command: {end:#}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a missing command took {:?} to fail",
        started.elapsed()
    );
    assert_eq!(get(&d, "/env").status, 200, "revision 2 still serves");

    let started = Instant::now();
    let broken = d.api_json(
        "PATCH",
        "/v1/services/web",
        Some(&json!({"command": [], "env": [
            {"name": "GREETING", "value": "second"},
            {"name": "LOG_EVERY_MS", "value": "0"},
        ]})),
    );
    assert_eq!(broken["revision"], 4, "{broken}");
    let (lines, end) = d.follow(broken["operation"].as_str().expect("an operation id"));
    let failed_at = now_millis();
    figure("3", "exiting app: PATCH to failed", started.elapsed());
    assert_eq!(end["state"], "failed", "{lines:#?}\n{end}");
    let message = end["message"].as_str().unwrap_or_default();
    eprintln!("[daemon e2e] 3: the failure: {message}");
    assert!(
        message.contains("revision 4") && message.contains("code 2"),
        "the failure names the revision and the exit code: {end:#}"
    );
    assert!(
        message.contains("invalid LOG_EVERY_MS"),
        "the failure shows the app's last log line: {end:#}"
    );
    // The instance ran: it started, wrote its complaint and exited. The failure carries its
    // last log lines, time-stamped by the log store; the exit came after the last of them.
    let events = d.events("web");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "instance.started" && e["fields"]["revision"] == 4),
        "no instance.started of revision 4: {:?}",
        kinds(&events)
    );
    let failed = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "deploy.failed")
        .unwrap_or_else(|| panic!("no deploy.failed event: {:?}", kinds(&events)));
    let failed_time = rfc3339_millis(failed["time"].as_str().unwrap_or_default())
        .unwrap_or_else(|| panic!("deploy.failed without a readable time: {failed}"));
    let last_log = end["logs"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("the failure has no log lines: {end:#}"));
    let logged_time = last_log
        .split(' ')
        .next()
        .and_then(rfc3339_millis)
        .unwrap_or_else(|| panic!("log line without a readable time: {last_log:?}"));
    let detection = Duration::from_millis((failed_time - logged_time).max(0) as u64);
    figure(
        "3",
        "app's last log line (then exit) to deploy.failed",
        detection,
    );
    figure(
        "3",
        "app's last log line to the failure reaching the client",
        Duration::from_millis((failed_at - logged_time).max(0) as u64),
    );
    assert!(
        detection < Duration::from_secs(1),
        "the failure came {detection:?} after the instance's exit: {last_log:?} {failed}"
    );
    let env = get(&d, "/env");
    assert_eq!(env.status, 200, "revision 2 still serves: {}", env.body);
    assert!(
        env.body.contains("GREETING=second") && !env.body.contains("LOG_EVERY_MS"),
        "{}",
        env.body
    );
    let shown = d.api_json("GET", "/v1/services/web", None);
    assert_eq!(shown["status"]["serving"], 2, "{shown}");

    // 4. Rollback: the revision before the serving one (1) serves again, by a routing switch.
    let started = Instant::now();
    let rolled = d.api_json("POST", "/v1/services/web/rollback", Some(&json!({})));
    figure("4", "rollback", started.elapsed());
    assert_eq!(rolled["mode"], "switch", "{rolled}");
    assert_eq!(rolled["revision"], 1, "{rolled}");
    let env = get(&d, "/env");
    assert_eq!(env.status, 200);
    assert!(
        !env.body.contains("GREETING="),
        "revision 1 serves:\n{}",
        env.body
    );
    assert_eq!(get(&d, "/").body, HELLO);

    // 5. Pause: 503 with Retry-After (never 404); resume: 200 again.
    let started = Instant::now();
    d.api("POST", "/v1/services/web/pause", None);
    figure("5", "pause", started.elapsed());
    let paused = get(&d, "/");
    assert_eq!(paused.status, 503, "{}", paused.body);
    assert!(
        paused.headers.iter().any(|(k, _)| k == "retry-after"),
        "no Retry-After: {:?}",
        paused.headers
    );
    assert_eq!(
        d.api_json("GET", "/v1/services/web", None)["state"],
        "paused"
    );
    let started = Instant::now();
    let resumed = d.api_json("POST", "/v1/services/web/resume", None);
    if let Some(op) = resumed["operation"].as_str() {
        let (lines, end) = d.follow(op);
        assert_eq!(end["state"], "succeeded", "{lines:#?}\n{end}");
    }
    let (answer, _) = wait_for_status(d.http_port, HOST, 200, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after resume: {e}"));
    figure("5", "resume to the first 200", started.elapsed());
    assert_eq!(answer.body, HELLO);

    // 6. The events tell the story in order. The engine records events through a writer
    //    queue after it answers, so the last ones may land a little after the API call that
    //    caused them: poll briefly, and report the lag.
    let expected = [
        "service.created",
        "deploy.started",
        "instance.started",
        "instance.healthy",
        "deploy.succeeded",
        "service.updated",
        "deploy.started",
        "deploy.succeeded",
        "service.updated",
        "deploy.started",
        "deploy.failed",
        "service.updated",
        "deploy.started",
        "instance.started",
        "deploy.failed",
        "rollback.switched",
        "service.paused",
        "service.resuming",
        "instance.started",
        "instance.healthy",
        "service.resumed",
    ];
    let polled = Instant::now();
    let events = loop {
        let events = d.events("web");
        let missing = missing_in_order(&kinds(&events), &expected);
        match missing {
            None => break events,
            Some(want) if polled.elapsed() > Duration::from_secs(2) => panic!(
                "event {want:?} missing or out of order; expected in order {expected:?}; events: {:?}",
                kinds(&events)
            ),
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    figure(
        "6",
        "lag until the event history was complete",
        polled.elapsed(),
    );
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() == events.len(),
        "event sequence numbers increase: {seqs:?}"
    );
    let last_seq = seqs.last().copied().unwrap_or(0);

    // 7. kill -9 the daemon; a new one adopts the instances (none started) and serves again.
    let before = d.api_json("GET", "/v1/services/web", None);
    let serving_before = serving_instances(&before);
    assert!(!serving_before.is_empty(), "nothing serves: {before}");
    let pid = d.pid();
    d.kill();
    eprintln!("[daemon e2e] 7: killed the daemon (pid {pid:?}) with SIGKILL");
    let still = proxy_get(d.http_port, HOST, "/", Duration::from_millis(500));
    assert!(
        still.is_err(),
        "the proxy answered with no daemon: {still:?}"
    );
    assert_eq!(
        d.instance_dirs().len(),
        before["status"]["instances"].as_array().map_or(0, Vec::len),
        "instances keep running without the daemon: {before}"
    );
    let started = Instant::now();
    d.spawn();
    let (answer, _) = wait_for_status(d.http_port, HOST, 200, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", d.log()));
    figure("7", "daemon spawn to the first 200", started.elapsed());
    assert_eq!(answer.body, HELLO);
    d.wait_ready(Duration::from_secs(10));
    let after = d.api_json("GET", "/v1/services/web", None);
    assert_eq!(after["status"]["serving"], 1, "{after}");
    assert_eq!(
        serving_instances(&after),
        serving_before,
        "the same instances serve after the restart:\nbefore {before}\nafter {after}"
    );
    let restarted: Vec<Value> = d
        .events("web")
        .into_iter()
        .filter(|e| e["seq"].as_u64().is_some_and(|s| s > last_seq))
        .collect();
    let restarted_kinds = kinds(&restarted);
    assert!(
        restarted_kinds.iter().any(|k| k == "instance.adopted"),
        "no instance.adopted event after the restart: {restarted_kinds:?}"
    );
    assert!(
        !restarted_kinds
            .iter()
            .any(|k| k == "instance.started" || k == "deploy.started"),
        "the restart started instances: {restarted_kinds:?}"
    );

    // 8. Delete: the host is unknown (404), the last event says so, no instance is left.
    let started = Instant::now();
    d.api("DELETE", "/v1/services/web", None);
    figure("8", "delete", started.elapsed());
    let gone = get(&d, "/");
    assert_eq!(gone.status, 404, "{}", gone.body);
    let events = d.events("web");
    assert_eq!(
        events.last().and_then(|e| e["kind"].as_str()),
        Some("service.deleted"),
        "{:?}",
        kinds(&events)
    );
    assert_eq!(
        d.try_api("GET", "/v1/services/web", None)
            .map(|a| a.status)
            .ok(),
        Some(404)
    );
    assert_eq!(
        d.instance_dirs(),
        Vec::<String>::new(),
        "instance dirs left"
    );
    assert_eq!(d.ps(), Vec::<String>::new(), "instances left");
    eprintln!(
        "[daemon e2e] whole test: {:.1} s",
        whole.elapsed().as_secs_f64()
    );
}
