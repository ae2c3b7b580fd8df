//! Privileged, end to end: the real `lull daemon` autoscaling the fixture app. A service with
//! max concurrency 10 and at most 4 instances goes from 0 to 40 concurrent connections: all 4
//! instances serve within the benchmark's target (500 ms) and no request fails; it is back to
//! its minimum once the scale-in window has passed; with min 0 it scales to zero and the next
//! request is a cold start that is served.
//!
//! Preconditions: root and the registry on 127.0.0.1:5000 with the fixture images
//! (`cargo xtask fixtures`). The `lull` binary is the one cargo builds next to this test
//! (`cargo build -p lull` is run first, a no-op when the workspace's tests built it), or
//! `$LULL_BIN`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use lull_tests::daemon::{TestDaemon, proxy_get};
use lull_tests::e2e::{FIXTURE_APP, HELLO, require_registry, require_root, workspace_root};
use serde_json::{Value, json};

const SERVICE: &str = "burst";
const HOST: &str = "burst.localhost";
const CONNECTIONS: usize = 40;
const MAX_INSTANCES: usize = 4;
/// The benchmark's target for the reaction (`cargo xtask bench autoscale`).
const REACTION_TARGET: Duration = Duration::from_millis(500);
const SCALE_IN_WINDOW: Duration = Duration::from_secs(2);

/// The `lull` binary: `$LULL_BIN`, else `target/<profile>/lull`, built (or found up to date) by
/// cargo with this test's profile and target dir.
fn lull_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LULL_BIN") {
        return path.into();
    }
    let binary = lull_tests::scratch::sibling_binary("lull");
    let profile_dir = binary.parent().expect("target/<profile>").to_owned();
    let target_dir = profile_dir.parent().expect("target").to_owned();
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "lull",
            "--bin",
            "lull",
            "--target-dir",
        ])
        .arg(&target_dir)
        .current_dir(workspace_root());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build -p lull");
    assert!(
        status.success() && binary.is_file(),
        "precondition failed: could not build {} ({status}); run `cargo build -p lull` or set LULL_BIN",
        binary.display()
    );
    binary
}

/// The instances of the serving revision (a previous revision's instances stand by for a
/// rollback, outside the autoscaler's count).
fn instances(d: &TestDaemon) -> Vec<Value> {
    let shown = d.api_json("GET", &format!("/v1/services/{SERVICE}"), None);
    let serving = shown["status"]["serving"].clone();
    shown["status"]["instances"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|i| i["revision"] == serving)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn healthy(d: &TestDaemon) -> usize {
    instances(d)
        .iter()
        .filter(|i| i["state"] == "healthy")
        .count()
}

fn events(d: &TestDaemon, kind: &str) -> Vec<Value> {
    d.events(SERVICE)
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Polls `check` every `every` until true; panics naming `what` (with the daemon's log) after
/// `timeout`. Returns how long it took.
fn wait_for(
    d: &TestDaemon,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n{}",
            d.log()
        );
        std::thread::sleep(every);
    }
    started.elapsed()
}

fn hello(d: &TestDaemon) -> Duration {
    let started = Instant::now();
    let answer = proxy_get(d.http_port, HOST, "/", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET / through the proxy: {e}\n{}", d.log()));
    let took = started.elapsed();
    assert_eq!((answer.status, answer.body.as_str()), (200, HELLO));
    took
}

fn operation(d: &TestDaemon, answer: &Value) {
    let id = answer["operation"].as_str().expect("an operation id");
    let (lines, end) = d.follow(id);
    assert_eq!(end["state"], "succeeded", "{lines:#?}\n{end}");
}

#[test]
fn forty_connections_scale_out_to_four_then_back_in_then_to_zero_and_a_cold_start() {
    require_root();
    require_registry();
    let lull = lull_binary();
    let mut d = TestDaemon::new(&lull, "lull-autoscale-e2e");
    // This machine's other load must not hold the scale-out this test times.
    let mut config = std::fs::read_to_string(d.config_path()).expect("read lull.toml");
    config.push_str("\n[scaling]\ncpu_pressure_brake = 100\nmemory_pressure_brake = 100\n");
    std::fs::write(d.config_path(), config).expect("write lull.toml");
    d.start();

    let created = d.api_json(
        "POST",
        "/v1/services",
        Some(&json!({
            "name": SERVICE,
            "source": {"type": "image", "reference": FIXTURE_APP},
            "size": {"memory": "32M"},
            "min_instances": 1,
            "max_instances": MAX_INSTANCES,
            "max_concurrency": 10,
            "health_check": {"protocol": "http", "path": "/healthz"},
            "scaling": {"scale_in_window": "2s"},
        })),
    );
    operation(&d, &created);
    hello(&d);
    assert_eq!(healthy(&d), 1);
    // Idle before the burst, as a service is.
    std::thread::sleep(Duration::from_millis(500));

    // 0 → 40 concurrent connections, each held 3 s by the app.
    let release = Arc::new(Barrier::new(CONNECTIONS + 1));
    let port = d.http_port;
    let requests: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let release = release.clone();
            std::thread::spawn(move || {
                release.wait();
                match proxy_get(port, HOST, "/sleep?ms=3000", Duration::from_secs(30)) {
                    Ok(r) if r.status == 200 => Ok(()),
                    Ok(r) => Err(format!("{} {}", r.status, r.body.trim())),
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    release.wait();
    let reaction = wait_for(
        &d,
        "4 instances healthy",
        Duration::from_secs(30),
        Duration::from_millis(2),
        || healthy(&d) == MAX_INSTANCES,
    );
    eprintln!(
        "[autoscale e2e] 0 → {CONNECTIONS} connections: {MAX_INSTANCES} instances serving after {:.1} ms (target {} ms)",
        reaction.as_secs_f64() * 1e3,
        REACTION_TARGET.as_millis()
    );
    let failures: Vec<String> = requests
        .into_iter()
        .filter_map(|r| r.join().expect("a request thread panicked").err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} requests failed while scaling out: {failures:?}",
        failures.len()
    );
    let outs = events(&d, "scale.out");
    let added: u64 = outs
        .iter()
        .map(|e| e["fields"]["decision"]["add"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(added, 3, "{outs:#?}");
    assert_eq!(
        outs.last().map(|e| e["fields"]["desired"].clone()),
        Some(json!(4))
    );
    assert!(
        reaction < REACTION_TARGET,
        "{MAX_INSTANCES} instances took {reaction:?} to serve (target {REACTION_TARGET:?}); scale-out events: {outs:#?}"
    );

    // Quiet: back to min after the window, one instance per 5 s step, each drained first.
    let back = wait_for(
        &d,
        "scale-in to 1 instance",
        SCALE_IN_WINDOW + Duration::from_secs(40),
        Duration::from_millis(50),
        || instances(&d).len() == 1,
    );
    eprintln!(
        "[autoscale e2e] back to 1 instance {:.1} s after the burst ended",
        back.as_secs_f64()
    );
    let ins = events(&d, "scale.in");
    assert_eq!(ins.len(), 3, "{ins:#?}");
    assert!(
        ins.iter()
            .all(|e| e["fields"]["decision"]["remove"] == json!(1)),
        "{ins:#?}"
    );
    hello(&d);

    // Min 0: the last instance stops after a second without a request.
    let patched = d.api_json(
        "PATCH",
        &format!("/v1/services/{SERVICE}"),
        Some(&json!({"min_instances": 0, "scaling": {"scale_to_zero_after": "1s"}})),
    );
    operation(&d, &patched);
    hello(&d);
    let zero = wait_for(
        &d,
        "scale to zero",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || instances(&d).is_empty(),
    );
    eprintln!(
        "[autoscale e2e] at zero instances {:.1} s after the last request",
        zero.as_secs_f64()
    );
    let ins = events(&d, "scale.in");
    assert!(
        ins.last()
            .and_then(|e| e["message"].as_str())
            .is_some_and(|m| m.contains("idle to zero")),
        "{ins:#?}"
    );
    std::thread::sleep(Duration::from_millis(300));

    // The next request waits for an instance and is served.
    let cold = hello(&d);
    eprintln!(
        "[autoscale e2e] cold start through the proxy: {:.1} ms",
        cold.as_secs_f64() * 1e3
    );
    let mut starts = Vec::new();
    wait_for(
        &d,
        "the cold start event",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            starts = events(&d, "scale.cold_start");
            !starts.is_empty()
        },
    );
    let reported = starts[0]["fields"]["took_ms"].as_f64().unwrap_or(0.0);
    assert!(
        reported > 0.0 && reported <= cold.as_secs_f64() * 1e3 + 1.0,
        "cold start reported {reported} ms, measured {cold:?}: {starts:#?}"
    );
    assert_eq!(instances(&d).len(), 1);

    let deleted = d.api_json("DELETE", &format!("/v1/services/{SERVICE}"), None);
    if deleted["operation"].is_string() {
        operation(&d, &deleted);
    }
}
