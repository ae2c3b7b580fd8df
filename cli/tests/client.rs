//! The client commands, end to end without root: the control plane in this process (SQLite
//! store in a tempdir, the engine over the fake host, a real proxy on loopback, the admin
//! socket), driven by the built `lull` binary with `--socket`. Create, list, show, update, a
//! broken deploy, rollback, pause/resume, revisions, events, export, delete; bad input,
//! missing services, conflicts and a missing daemon, each with its exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lull_daemon::testing::InProcess;
use serde_json::Value;

struct Daemon {
    socket: PathBuf,
    proxy_addr: SocketAddr,
    dir: tempfile::TempDir,
    _plane: InProcess,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let plane = InProcess::start(dir.path()).await;
    Daemon {
        socket: plane.socket.clone(),
        proxy_addr: plane.proxy_addr,
        dir,
        _plane: plane,
    }
}

mod common;

use common::{Run, lull_at};

async fn lull(d: &Daemon, args: &[&str]) -> Run {
    lull_at(&d.socket, args).await
}

/// GET / with `host` through the proxy: the status and the body.
async fn get(proxy: SocketAddr, host: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_through_the_cli_from_create_to_delete() {
    let d = daemon().await;
    let url = format!("http://web.localhost:{}/", d.proxy_addr.port());

    // Create: progress lines with a time, then the URL.
    let run = lull(&d, &["service", "create", "web", "--image", "fake/app:1"])
        .await
        .expect(0);
    assert!(run.stdout.contains("deploying revision 1"), "{run:#?}");
    assert!(run.stdout.contains("web revision 1 is serving"), "{run:#?}");
    assert!(run.stdout.contains(&url), "{run:#?}");
    let progress = run
        .stdout
        .lines()
        .find(|l| l.starts_with("  ") && l.trim_start().chars().nth(2) == Some(':'));
    assert!(progress.is_some(), "no timed progress line: {run:#?}");
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 1"));

    // Logs: the service's output with time and instance; its access log with --requests.
    let run = lull(&d, &["logs", "web"]).await.expect(0);
    let first = run.stdout.lines().next().unwrap_or_default().to_owned();
    assert!(
        first.contains(" web-r1-") && first.contains("rev 1 starting"),
        "{run:#?}"
    );
    let run = lull(&d, &["logs", "web", "--requests"]).await.expect(0);
    assert!(run.stdout.contains(" GET / 200 "), "{run:#?}");
    let run = lull(&d, &["logs", "web", "--since", "soon"])
        .await
        .expect(2);
    assert!(run.stderr.contains("since"), "{run:#?}");
    let run = lull(&d, &["logs", "nothing-here", "--requests"]).await;
    assert_ne!(run.code, 0, "{run:#?}");

    // A second create of the name: conflict.
    let run = lull(&d, &["service", "create", "web", "--image", "fake/app:1"])
        .await
        .expect(4);
    assert!(run.stderr.contains("web"), "{run:#?}");

    // List: one row with state, revision, healthy instances and the URL.
    let run = lull(&d, &["service", "list"]).await.expect(0);
    let header = run.stdout.lines().next().unwrap_or_default();
    for column in ["NAME", "STATE", "REVISION", "INSTANCES", "URL"] {
        assert!(header.contains(column), "{header}");
    }
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web: {run:#?}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells, ["web", "active", "1", "1/1", url.as_str()], "{row}");

    // Update: revision 2 serves, with the env var shown by `show`.
    let run = lull(&d, &["service", "update", "web", "-e", "GREETING=hi"])
        .await
        .expect(0);
    assert!(run.stdout.contains("revision 2 is serving"), "{run:#?}");
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 2"));
    let run = lull(&d, &["service", "show", "web"]).await.expect(0);
    assert!(run.stdout.contains("fake/app:1"), "{run:#?}");
    assert!(run.stdout.contains("GREETING=hi"), "{run:#?}");
    assert!(run.stdout.contains(&url), "{run:#?}");
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains(" 2 ") && l.contains("healthy")),
        "no healthy instance of revision 2: {run:#?}"
    );

    // An update that changes nothing: no revision, exit 0.
    let run = lull(&d, &["service", "update", "web", "--port", "8080"])
        .await
        .expect(0);
    assert!(run.stdout.contains("nothing changed"), "{run:#?}");

    // A broken revision: exit 1, the cause and the log line printed; revision 2 serves on.
    let run = lull(
        &d,
        &[
            "service",
            "update",
            "web",
            "-e",
            "FAKE_EXIT=3",
            "-e",
            "FAKE_LOG=boom: no such command",
        ],
    )
    .await
    .expect(1);
    assert!(run.stderr.contains("deploy of web failed"), "{run:#?}");
    assert!(run.stderr.contains("code 3"), "{run:#?}");
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("  ") && l.ends_with(" stdout boom: no such command")),
        "the log line, indented under the cause: {run:#?}"
    );
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 2"));
    // What serves stays current: revision 2.
    let run = lull(&d, &["service", "list"]).await.expect(0);
    let row = run.stdout.lines().nth(1).unwrap_or_default().to_owned();
    assert!(row.split_whitespace().nth(2) == Some("2"), "{run:#?}");

    // Rollback to revision 1: a routing switch.
    let run = lull(&d, &["rollback", "web", "1"]).await.expect(0);
    assert!(
        run.stdout.contains("switched to revision 1 in") && run.stdout.contains(" ms"),
        "{run:#?}"
    );
    assert!(get(d.proxy_addr, "web.localhost").await.1.contains("rev 1"));
    // A revision that does not exist: not found.
    lull(&d, &["rollback", "web", "9"]).await.expect(3);

    // Revisions: three, oldest first, current and serving marked.
    let run = lull(&d, &["revisions", "web"]).await.expect(0);
    let rows: Vec<&str> = run.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{run:#?}");
    assert!(rows[0].starts_with("1 (current, serving)"), "{rows:?}");
    assert!(rows[0].contains("created"), "{rows:?}");
    assert!(rows[1].contains("GREETING"), "{rows:?}");
    assert!(rows[2].starts_with("3 "), "{rows:?}");
    assert!(rows[2].contains("fake/app:1"), "{rows:?}");
    let revisions = json(
        &lull(&d, &["--json", "revisions", "web"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(revisions.as_array().map(Vec::len), Some(3), "{revisions}");
    assert_eq!(revisions[0]["serving"], true);

    // Pause: 503; an update while paused is a conflict; resume: 200 again.
    let run = lull(&d, &["service", "pause", "web"]).await.expect(0);
    assert!(run.stdout.contains("503"), "{run:#?}");
    assert_eq!(get(d.proxy_addr, "web.localhost").await.0, 503);
    let run = lull(&d, &["service", "update", "web", "--port", "9000"])
        .await
        .expect(4);
    assert!(run.stderr.contains("paused"), "{run:#?}");
    lull(&d, &["service", "resume", "web"]).await.expect(0);
    // `lull deploy` deploys the current revision (1, since the rollback) again.
    let run = lull(&d, &["deploy", "web"]).await.expect(0);
    assert!(run.stdout.contains("revision 1"), "{run:#?}");
    let (status, body) = get(d.proxy_addr, "web.localhost").await;
    assert_eq!(status, 200);
    assert!(body.contains("rev 1"), "{body}");

    // Events: RFC 3339 time, kind, message, oldest first; --since skips what was seen.
    let run = lull(&d, &["events", "web"]).await.expect(0);
    let first = run.stdout.lines().next().unwrap_or_default();
    let fields: Vec<&str> = first.split_whitespace().collect();
    assert!(
        chrono::DateTime::parse_from_rfc3339(fields[0]).is_ok(),
        "{first}"
    );
    assert_eq!(fields[1], "service.created", "{first}");
    assert!(run.stdout.contains("deploy"), "{run:#?}");
    let events: Vec<Value> = lull(&d, &["--json", "events", "web"])
        .await
        .expect(0)
        .stdout
        .lines()
        .map(json)
        .collect();
    assert!(events.len() >= 4, "{events:?}");
    let seq = |e: &Value| e["seq"].as_u64().expect("seq");
    let since = seq(&events[1]);
    let later: Vec<Value> = lull(
        &d,
        &["--json", "events", "web", "--since", &since.to_string()],
    )
    .await
    .expect(0)
    .stdout
    .lines()
    .map(json)
    .collect();
    assert_eq!(later.first().map(seq), Some(seq(&events[2])), "{later:?}");
    assert!(later.iter().all(|e| seq(e) > since), "{later:?}");
    let last_seq = seq(&events[events.len() - 1]);

    // Export: an apprunner.yaml plus lull's settings, which reads back as the same service.
    let run = lull(&d, &["service", "export", "web"]).await.expect(0);
    assert!(run.stdout.contains("version: 1.0"), "{run:#?}");
    assert!(run.stdout.contains("lull:"), "{run:#?}");
    let exported = d.dir.path().join("web.yaml");
    std::fs::write(&exported, &run.stdout).expect("write the export");
    let path = exported.to_string_lossy().into_owned();
    let run = lull(&d, &["service", "update", "web", "--from-file", &path])
        .await
        .expect(0);
    assert!(run.stdout.contains("nothing changed"), "{run:#?}");
    let spec = json(
        &lull(&d, &["--json", "service", "export", "web"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(spec["name"], "web");

    // --json answers parse.
    let list = json(
        &lull(&d, &["--json", "service", "list"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(list[0]["name"], "web", "{list}");
    let shown = json(
        &lull(&d, &["--json", "service", "show", "web"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(shown["urls"][0], url.as_str(), "{shown}");
    let status = json(&lull(&d, &["--json", "status"]).await.expect(0).stdout);
    assert_eq!(status["daemon"]["http_port"], d.proxy_addr.port());
    assert_eq!(status["services"][0]["name"], "web");
    let run = lull(&d, &["status"]).await.expect(0);
    assert!(run.stdout.contains("1 running"), "{run:#?}");

    // `events -f` follows new events and ends with the deletion.
    let follower = tokio::process::Command::new(env!("CARGO_BIN_EXE_lull"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["events", "web", "-f", "--since", &last_seq.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lull events -f");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Delete (no terminal: no question); then it is not found, and its last event says so.
    let run = lull(&d, &["service", "delete", "web"]).await.expect(0);
    assert!(run.stdout.contains("deleted web"), "{run:#?}");
    assert_eq!(get(d.proxy_addr, "web.localhost").await.0, 404);
    let run = lull(&d, &["service", "show", "web"]).await.expect(3);
    assert!(run.stderr.contains("web"), "{run:#?}");
    let run = lull(&d, &["events", "web"]).await.expect(0);
    let last = run.stdout.lines().last().unwrap_or_default();
    assert!(last.contains("service.deleted"), "{run:#?}");
    let followed = tokio::time::timeout(Duration::from_secs(10), follower.wait_with_output())
        .await
        .expect("events -f ends after the deletion")
        .expect("events -f output");
    assert_eq!(followed.status.code(), Some(0));
    let followed = String::from_utf8_lossy(&followed.stdout).into_owned();
    let kinds: Vec<&str> = followed
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(kinds.last(), Some(&"service.deleted"), "{followed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_exits_2() {
    let d = daemon().await;

    // A value the daemon refuses: one line per field, naming it.
    let run = lull(
        &d,
        &[
            "service",
            "create",
            "web",
            "--image",
            "fake/app:1",
            "--memory",
            "lots",
        ],
    )
    .await
    .expect(2);
    assert!(run.stderr.contains("  size.memory: "), "{run:#?}");

    let run = lull(
        &d,
        &[
            "service",
            "create",
            "Web!",
            "--image",
            "fake/app:1",
            "--port",
            "0",
        ],
    )
    .await
    .expect(2);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("  name: ")), "{run:#?}");
    assert!(lines.iter().any(|l| l.starts_with("  port: ")), "{run:#?}");

    // Refused before anything is sent.
    let run = lull(&d, &["service", "create", "web"]).await.expect(2);
    assert!(run.stderr.contains("--image"), "{run:#?}");
    let run = lull(
        &d,
        &["service", "create", "web", "--image", "x", "-e", "NOEQUALS"],
    )
    .await
    .expect(2);
    assert!(run.stderr.contains("KEY=VALUE"), "{run:#?}");
    lull(
        &d,
        &[
            "service",
            "create",
            "web",
            "--image",
            "x",
            "--cpu-mode",
            "sometimes",
        ],
    )
    .await
    .expect(2);
    let run = lull(&d, &["service", "update", "web"]).await.expect(2);
    assert!(run.stderr.contains("nothing to change"), "{run:#?}");

    // Nothing was created by any of that.
    let list = json(
        &lull(&d, &["--json", "service", "list"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(list, Value::Array(Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_json_and_apprunner_yaml_create_services() {
    let d = daemon().await;
    let json_file = d.dir.path().join("api.json");
    std::fs::write(
        &json_file,
        r#"{"source": {"type": "image", "reference": "fake/app:1"}, "env": [{"name": "A", "value": "1"}]}"#,
    )
    .expect("write");
    // The file's env, with -e set over it.
    let path = json_file.to_string_lossy().into_owned();
    lull(
        &d,
        &[
            "service",
            "create",
            "api",
            "--from-file",
            &path,
            "-e",
            "B=2",
            "--no-wait",
        ],
    )
    .await
    .expect(0);
    let shown = json(
        &lull(&d, &["--json", "service", "show", "api"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(
        shown["spec"]["env"],
        serde_json::json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
    );

    let yaml_file = d.dir.path().join("apprunner.yaml");
    std::fs::write(
        &yaml_file,
        "version: 1.0\nrun:\n  network:\n    port: 9000\n    env: APP_PORT\n  env:\n    - name: MODE\n      value: prod\n",
    )
    .expect("write");
    let path = yaml_file.to_string_lossy().into_owned();
    let out = lull(
        &d,
        &[
            "--json",
            "service",
            "create",
            "site",
            "--image",
            "fake/app:1",
            "--from-file",
            &path,
        ],
    )
    .await
    .expect(0);
    // JSON lines: what started, progress, the end.
    let lines: Vec<Value> = out.stdout.lines().map(json).collect();
    assert_eq!(lines[0]["service"], "site", "{lines:?}");
    assert_eq!(
        lines.last().map(|l| l["end"]["state"].clone()),
        Some(Value::from("succeeded")),
        "{lines:?}"
    );
    let shown = json(
        &lull(&d, &["--json", "service", "show", "site"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(shown["spec"]["port"], 9000);
    assert_eq!(
        shown["spec"]["env"],
        serde_json::json!([{"name": "MODE", "value": "prod"}, {"name": "APP_PORT", "value": "9000"}])
    );

    // --unset-env removes one variable and keeps the rest.
    lull(&d, &["service", "update", "site", "--unset-env", "MODE"])
        .await
        .expect(0);
    let shown = json(
        &lull(&d, &["--json", "service", "show", "site"])
            .await
            .expect(0)
            .stdout,
    );
    assert_eq!(
        shown["spec"]["env"],
        serde_json::json!([{"name": "APP_PORT", "value": "9000"}])
    );
    let run = lull(&d, &["service", "update", "site", "--unset-env", "NOPE"])
        .await
        .expect(2);
    assert!(run.stderr.contains("APP_PORT"), "{run:#?}");

    // A broken file: exit 2 naming it.
    let bad = d.dir.path().join("bad.json");
    std::fs::write(&bad, "{ not json").expect("write");
    let path = bad.to_string_lossy().into_owned();
    let run = lull(&d, &["service", "create", "x", "--from-file", &path])
        .await
        .expect(2);
    assert!(run.stderr.contains("bad.json"), "{run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_services_exit_3_and_a_missing_daemon_exits_5() {
    let d = daemon().await;
    for args in [
        &["service", "show", "nope"][..],
        &["service", "delete", "nope", "--yes"],
        &["service", "pause", "nope"],
        &["deploy", "nope"],
        &["revisions", "nope"],
        &["events", "nope"],
        &["service", "export", "nope"],
    ] {
        let run = lull(&d, args).await.expect(3);
        assert!(run.stderr.contains("nope"), "{args:?}: {run:#?}");
    }

    let gone = d.dir.path().join("no-daemon.sock");
    for args in [
        &["service", "list"][..],
        &["status"],
        &["service", "export", "x"],
    ] {
        let run = lull_at(&gone, args).await.expect(5);
        assert!(run.stderr.contains("no lull daemon answers"), "{run:#?}");
        assert!(run.stderr.contains("lull daemon"), "{run:#?}");
    }
    // LULL_SOCKET is the default for --socket.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lull"))
        .args(["service", "list"])
        .env("LULL_SOCKET", &gone)
        .output()
        .await
        .expect("run lull");
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-daemon.sock"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_settings_from_flags_are_shown_in_words() {
    let d = daemon().await;
    lull(&d, &["service", "create", "web", "--image", "fake/app:1"])
        .await
        .expect(0);
    let run = lull(
        &d,
        &[
            "service",
            "update",
            "web",
            "--min",
            "0",
            "--max",
            "3",
            "--target-utilisation",
            "0.5",
            "--scale-to-zero-after",
            "2m",
            "--freeze-after",
            "30s",
        ],
    )
    .await
    .expect(0);
    assert!(run.stdout.contains("revision 2 is serving"), "{run:#?}");
    let run = lull(&d, &["service", "show", "web"]).await.expect(0);
    assert!(
        run.stdout.contains(
            "0 to 3 instances, 100 requests in flight each (sized for 50%); scale in after 1m of low demand; to zero after 2m without a request"
        ),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("frozen 30s after it is throttled"),
        "{run:#?}"
    );
    let run = lull(
        &d,
        &["service", "update", "web", "--target-utilisation", "2"],
    )
    .await
    .expect(2);
    assert!(
        run.stderr
            .contains("scaling.target_utilisation: 2 is not in (0, 1]"),
        "{run:#?}"
    );
}
