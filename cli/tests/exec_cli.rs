//! `lull exec`, end to end without root: the built `lull` binary against the control plane in
//! this process (the fake host runs exec'd commands as plain host processes). The command's
//! output and exit code become lull's, stdin is forwarded with `-i` only, and an exec that
//! cannot start says what to do, with the client commands' exit codes.

use std::path::Path;
use std::process::Stdio;

use lull_daemon::testing::InProcess;
use tokio::io::AsyncWriteExt;

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the built `lull` against `socket` with `input` on its stdin.
async fn lull(socket: &Path, args: &[&str], input: Option<&[u8]>) -> Run {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lull"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("LULL_SOCKET")
        .env("LULL_LOG", "error")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run lull");
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input).await.expect("write lull's stdin");
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("lull exec ends in time")
        .expect("wait for lull");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lull_exec_runs_commands_and_exits_with_their_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plane = InProcess::start(dir.path()).await;
    let socket = plane.socket.clone();
    let run = lull(
        &socket,
        &["service", "create", "web", "--image", "fake/app:1"],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{run:#?}");

    // Output on stdout and stderr, the command's exit code as lull's.
    let run = lull(
        &socket,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        None,
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str(), run.stderr.as_str()),
        (3, "out\n", "err\n"),
        "{run:#?}"
    );

    // -i forwards stdin (its end ends `cat`); -e sets the environment.
    let run = lull(
        &socket,
        &[
            "exec",
            "-i",
            "-e",
            "WHO=lull",
            "web",
            "--",
            "sh",
            "-c",
            "cat; echo $WHO",
        ],
        Some(b"piped in\n"),
    )
    .await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "piped in\nlull\n"),
        "{run:#?}"
    );
    // Without -i the command's stdin is closed at once: `cat` ends without reading ours.
    let run = lull(&socket, &["exec", "web", "--", "cat"], Some(b"not sent\n")).await;
    assert_eq!((run.code, run.stdout.as_str()), (0, ""), "{run:#?}");

    // Not found: 127, as a shell says it.
    let run = lull(
        &socket,
        &["exec", "web", "--", "no-such-command-lull"],
        None,
    )
    .await;
    assert_eq!(run.code, 127, "{run:#?}");

    // Errors before the exec starts, with what to do and the client exit codes.
    let run = lull(&socket, &["exec", "nope", "--", "ls"], None).await;
    assert_eq!(run.code, 3, "{run:#?}");
    assert!(run.stderr.contains("nope"), "{run:#?}");
    let run = lull(
        &socket,
        &["exec", "--instance", "web-r7-abcdef", "web", "--", "ls"],
        None,
    )
    .await;
    assert_eq!(run.code, 3, "{run:#?}");
    assert!(run.stderr.contains("web-r7-abcdef"), "{run:#?}");
    let run = lull(&socket, &["exec", "web", "--", ""], None).await;
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("command[0]"), "{run:#?}");
    // -t needs a terminal; here stdin is a pipe.
    let run = lull(&socket, &["exec", "-t", "web", "--", "ls"], Some(b"")).await;
    assert_eq!(run.code, 2, "{run:#?}");
    assert!(run.stderr.contains("terminal"), "{run:#?}");
    drop(plane);
}
