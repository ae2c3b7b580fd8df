//! `POST /v1/services/{name}/exec` through the admin socket, without root: the control plane in
//! this process over the fake host, whose exec runs the command as a plain host process (with
//! `FAKE_INSTANCE=<id>` in its environment). Bad requests, unknown services and instances, a
//! service without a running instance, and the framed stream: stdin, stdout, stderr, exit codes,
//! a command that does not exist, a terminal with its size and a resize, and the instance's CPU
//! held through the gate while an exec runs.

use std::time::Duration;

use http::Method;
use lull_daemon::api::{Client, ErrorCode};
use lull_daemon::control::exec::{
    ExecBody, ExecExit, FrameKind, UPGRADE_PROTOCOL, read_frame, resize_payload, write_frame,
};
use lull_daemon::testing::InProcess;
use serde_json::{Value, json};

struct Daemon {
    client: Client,
    plane: InProcess,
    _dir: tempfile::TempDir,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start(dir.path()).await;
    Daemon {
        client: plane.client.clone(),
        plane,
        _dir: dir,
    }
}

/// Creates `name` and follows its deploy to its end; returns the end's state.
async fn create(client: &Client, body: Value) -> String {
    let started: Value = client
        .call(Method::POST, "/v1/services", Some(&body))
        .await
        .unwrap();
    let op = started["operation"].as_str().unwrap().to_owned();
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/operations/{op}/progress"),
            None::<&()>,
        )
        .await
        .unwrap();
    while let Some(v) = lines.next().await.unwrap() {
        if let Some(end) = v.get("end") {
            return end["state"].as_str().unwrap_or_default().to_owned();
        }
    }
    panic!("operation {op} ended without an end");
}

fn body(command: &[&str]) -> ExecBody {
    ExecBody {
        command: command.iter().map(|s| s.to_string()).collect(),
        ..ExecBody::default()
    }
}

/// What a finished exec sent back.
#[derive(Debug, Default)]
struct Output {
    stdout: String,
    stderr: String,
    exit: Option<ExecExit>,
}

/// Runs an exec: sends `input` (then stdin-eof unless on a tty), collects everything until the
/// exit frame.
async fn exec(client: &Client, service: &str, body: &ExecBody, input: &[u8]) -> Output {
    let io = client
        .upgrade(
            Method::POST,
            &format!("/v1/services/{service}/exec"),
            body,
            UPGRADE_PROTOCOL,
        )
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(io);
    if !input.is_empty() {
        write_frame(&mut wr, FrameKind::Stdin, input).await.unwrap();
    }
    if !body.tty {
        write_frame(&mut wr, FrameKind::StdinEof, b"")
            .await
            .unwrap();
    }
    collect(&mut rd).await
}

async fn collect<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Output {
    let mut out = Output::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let frame = tokio::time::timeout_at(deadline, read_frame(rd))
            .await
            .expect("the exec ends in time")
            .unwrap();
        let Some(frame) = frame else {
            return out;
        };
        match frame.kind {
            FrameKind::Stdout => out
                .stdout
                .push_str(&String::from_utf8_lossy(&frame.payload)),
            FrameKind::Stderr => out
                .stderr
                .push_str(&String::from_utf8_lossy(&frame.payload)),
            FrameKind::Exit => out.exit = Some(serde_json::from_slice(&frame.payload).unwrap()),
            FrameKind::Error => panic!("error frame: {:?}", frame.payload),
            other => panic!("unexpected {other:?} from the daemon"),
        }
    }
}

async fn api_error(client: &Client, service: &str, body: &ExecBody) -> lull_daemon::api::ApiError {
    match client
        .upgrade(
            Method::POST,
            &format!("/v1/services/{service}/exec"),
            body,
            UPGRADE_PROTOCOL,
        )
        .await
    {
        Ok(_) => panic!("exec in {service} with {body:?} was accepted"),
        Err(e) => e
            .api()
            .cloned()
            .unwrap_or_else(|| panic!("not an API error: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_requests_are_checked_and_streams_round_trip() {
    let d = daemon().await;
    let c = &d.client;
    let state = create(
        c,
        json!({"name": "web", "source": {"type": "image", "reference": "fake/app:1"}}),
    )
    .await;
    assert_eq!(state, "succeeded");

    // Bad requests, each naming its field, before any upgrade.
    let err = api_error(c, "web", &body(&[])).await;
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert_eq!(err.fields[0].field, "command", "{err:?}");
    let mut relative = body(&["ls"]);
    relative.cwd = Some("tmp".into());
    assert_eq!(api_error(c, "web", &relative).await.fields[0].field, "cwd");
    let unknown_field = c
        .upgrade(
            Method::POST,
            "/v1/services/web/exec",
            &json!({"command": ["ls"], "tty": "yes"}),
            UPGRADE_PROTOCOL,
        )
        .await
        .unwrap_err();
    assert_eq!(unknown_field.api().unwrap().code, ErrorCode::InvalidJson);
    // Without the upgrade headers: told what to send.
    let plain = c
        .call::<_, Value>(Method::POST, "/v1/services/web/exec", Some(&body(&["ls"])))
        .await
        .unwrap_err();
    let plain = plain.api().unwrap();
    assert_eq!(plain.code, ErrorCode::InvalidRequest);
    assert!(plain.message.contains("Upgrade: lull-exec"), "{plain:?}");

    // Unknown service and instance: 404 naming them.
    let err = api_error(c, "nope", &body(&["ls"])).await;
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("nope"), "{err:?}");
    let mut other = body(&["ls"]);
    other.instance = Some("web-r9-000000".into());
    let err = api_error(c, "web", &other).await;
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("web-r9-000000"), "{err:?}");
    assert!(
        err.message.contains("web-r1-"),
        "lists the instances: {err:?}"
    );

    // A service whose only revision never became healthy has no instance to run in.
    let state = create(
        c,
        json!({"name": "broken", "source": {"type": "image", "reference": "fake/app:1"},
               "env": [{"name": "FAKE_EXIT", "value": "3"}]}),
    )
    .await;
    assert_eq!(state, "failed");
    let err = api_error(c, "broken", &body(&["ls"])).await;
    assert_eq!(err.code, ErrorCode::Conflict, "{err:?}");
    assert!(
        err.message
            .contains("service broken has no running instance; deploy it first"),
        "{err:?}"
    );

    // stdin to stdout; the default instance is the serving revision's.
    let mut cat = body(&["sh", "-c", "cat; echo \"in $FAKE_INSTANCE as $GREETING\""]);
    cat.env.insert("GREETING".into(), "hello".into());
    let out = exec(c, "web", &cat, b"line one\nline two\n").await;
    assert_eq!(
        out.exit,
        Some(ExecExit {
            code: Some(0),
            signal: None
        })
    );
    assert!(
        out.stdout.starts_with("line one\nline two\nin web-r1-"),
        "{out:?}"
    );
    assert!(out.stdout.ends_with(" as hello\n"), "{out:?}");
    let instance = out.stdout.lines().nth(2).unwrap()["in ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    // stdout and stderr apart, and the exit code; the instance asked for by id.
    let mut three = body(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    three.instance = Some(instance.clone());
    let out = exec(c, "web", &three, b"").await;
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.exit.unwrap().code, Some(3));

    // A command that does not exist: 127, and why on stderr.
    let out = exec(c, "web", &body(&["no-such-command-lull"]), b"").await;
    assert_eq!(out.exit.unwrap().code, Some(127), "{out:?}");
    assert!(out.stderr.contains("no-such-command-lull"), "{out:?}");

    // A terminal of the asked size; a resize reaches it.
    let mut tty = body(&["sh", "-c", "stty size; read x; stty size; tty"]);
    tty.tty = true;
    tty.rows = Some(33);
    tty.cols = Some(101);
    let io = c
        .upgrade(
            Method::POST,
            "/v1/services/web/exec",
            &tty,
            UPGRADE_PROTOCOL,
        )
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut seen = String::new();
    while !seen.contains("33 101") {
        let frame = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut rd))
            .await
            .expect("the first size in time")
            .unwrap()
            .expect("a frame");
        assert_eq!(frame.kind, FrameKind::Stdout, "a tty has no stderr frames");
        seen.push_str(&String::from_utf8_lossy(&frame.payload));
    }
    write_frame(&mut wr, FrameKind::Resize, &resize_payload(40, 120))
        .await
        .unwrap();
    write_frame(&mut wr, FrameKind::Stdin, b"go\r")
        .await
        .unwrap();
    let rest = collect(&mut rd).await;
    assert_eq!(rest.exit.unwrap().code, Some(0), "{rest:?}");
    assert!(rest.stdout.contains("40 120"), "{seen} {rest:?}");
    assert!(rest.stdout.contains("/dev/pts/"), "{rest:?}");
    drop(wr);

    // A client that goes away mid-command does not hold the daemon up: the next exec works.
    let io = c
        .upgrade(
            Method::POST,
            "/v1/services/web/exec",
            &body(&["sleep", "2"]),
            UPGRADE_PROTOCOL,
        )
        .await
        .unwrap();
    drop(io);
    let out = exec(c, "web", &body(&["echo", "still here"]), b"").await;
    assert_eq!(out.stdout, "still here\n");
}

/// Polls `cond` every 10 ms for up to 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GET / with `host` through the proxy; the status.
async fn get(proxy: std::net::SocketAddr, host: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_holds_the_instances_cpu_until_it_ends() {
    let d = daemon().await;
    let c = &d.client;
    let state = create(
        c,
        json!({"name": "web", "source": {"type": "image", "reference": "fake/app:1"}}),
    )
    .await;
    assert_eq!(state, "succeeded");
    let host = &d.plane.host;
    let id = host.running_of("web", 1).pop().expect("one instance");
    let cpu = host.cpu(&id).expect("the instance's CPU control");
    eventually("the idle instance is throttled", || cpu.is_throttled()).await;

    // A command waiting for its input: the CPU is restored before it starts and stays so.
    let io = c
        .upgrade(
            Method::POST,
            "/v1/services/web/exec",
            &body(&["sh", "-c", "read line; echo got $line"]),
            UPGRADE_PROTOCOL,
        )
        .await
        .unwrap();
    assert!(!cpu.is_throttled(), "restored before the command ran");
    let throttles = cpu.throttles();
    // A request that starts and ends meanwhile leaves the held instance alone.
    assert_eq!(get(d.plane.proxy_addr, "web.localhost").await, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !cpu.is_throttled(),
        "a request's end throttled an instance under exec"
    );
    assert_eq!(cpu.throttles(), throttles);

    let (mut rd, mut wr) = tokio::io::split(io);
    write_frame(&mut wr, FrameKind::Stdin, b"it\n")
        .await
        .unwrap();
    write_frame(&mut wr, FrameKind::StdinEof, b"")
        .await
        .unwrap();
    let out = collect(&mut rd).await;
    assert_eq!(out.stdout, "got it\n", "{out:?}");
    // The stream over, the gate throttles the idle instance again.
    eventually("throttled once the exec ended", || cpu.is_throttled()).await;
}
