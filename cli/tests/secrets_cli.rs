//! `lull secret` and `lull registry` as a user runs them: the built binary against a control
//! plane served in this process (SQLite store, fake host, no root). Values from stdin and from a
//! file, listing without values, removal refused while used, and the documented exit codes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use lull_daemon::api::Client;
use lull_daemon::secrets::SecretKey;
use lull_daemon::store::Store;
use lull_daemon::testing::InProcess;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

struct Daemon {
    socket: PathBuf,
    store: Arc<dyn Store>,
    key: Arc<SecretKey>,
    dir: tempfile::TempDir,
    _plane: InProcess,
}

async fn daemon() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start(dir.path()).await;
    Daemon {
        socket: plane.socket.clone(),
        store: plane.store.clone(),
        key: plane.key.clone(),
        dir,
        _plane: plane,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `lull ARGS` against `socket` (through LULL_SOCKET), `stdin` on its standard input.
async fn lull(socket: &Path, args: &[&str], stdin: &[u8]) -> Run {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lull"))
        .args(args)
        .env("LULL_SOCKET", socket)
        .env_remove("LULL_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("lull finished")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Daemon {
    fn value(&self, name: &str) -> String {
        let record = self.store.get_secret(name).unwrap();
        let value = self.key.open(name, &record.ciphertext).unwrap();
        value.as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lull_secret_set_list_rm_and_registry_login_logout() {
    let d = daemon().await;
    let s = d.socket.as_path();

    // From stdin: one trailing newline stripped.
    let run = lull(s, &["secret", "set", "db-password"], b"from stdin\n").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("secret db-password created"),
        "{}",
        run.stdout
    );
    assert_eq!(d.value("db-password"), "from stdin");

    // From a file: as is.
    let file = d.dir.path().join("value.txt");
    std::fs::write(&file, "from a file\n").unwrap();
    let run = lull(
        s,
        &[
            "secret",
            "set",
            "db-password",
            "--from-file",
            file.to_str().unwrap(),
        ],
        b"",
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("secret db-password updated"),
        "{}",
        run.stdout
    );
    assert_eq!(d.value("db-password"), "from a file\n");

    // Invalid input: exit 2.
    let run = lull(s, &["secret", "set", "bad/name"], b"x").await;
    assert_eq!(run.code, 2, "{} {}", run.stdout, run.stderr);
    let run = lull(s, &["secret", "set", "-bad"], b"x").await;
    assert_eq!(run.code, 2, "{} {}", run.stdout, run.stderr);
    let run = lull(s, &["secret", "set", ".bad"], b"x").await;
    assert_eq!(run.code, 2, "{} {}", run.stdout, run.stderr);
    assert!(run.stderr.contains(".bad"), "{}", run.stderr);
    let missing = d.dir.path().join("missing");
    let run = lull(
        s,
        &[
            "secret",
            "set",
            "x",
            "--from-file",
            missing.to_str().unwrap(),
        ],
        b"",
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("missing"), "{}", run.stderr);

    // A service using it.
    let client = Client::new(s);
    let _: Value = client
        .call(
            Method::POST,
            "/v1/services",
            Some(&json!({
                "name": "api",
                "source": {"type": "image", "reference": "fake/app:1"},
                "secrets": [{"secret": "db-password", "env": "DB_PASSWORD"}],
            })),
        )
        .await
        .unwrap();

    // The list: names and users, never values.
    let run = lull(s, &["secret", "list"], b"").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("db-password"))
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(row.ends_with("api"), "{row}");
    assert!(!run.stdout.contains("from a file"), "{}", run.stdout);

    // Setting it again redeploys the user.
    let run = lull(s, &["secret", "set", "db-password"], b"third\n").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("api: revision 2"), "{}", run.stdout);

    // In use: exit 4, naming the service; unknown: exit 3.
    let run = lull(s, &["secret", "rm", "db-password"], b"").await;
    assert_eq!(run.code, 4, "{} {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("api"), "{}", run.stderr);
    let run = lull(s, &["secret", "rm", "nope"], b"").await;
    assert_eq!(run.code, 3, "{} {}", run.stdout, run.stderr);

    let _: Value = client
        .call(Method::DELETE, "/v1/services/api", None::<&()>)
        .await
        .unwrap();
    let run = lull(s, &["secret", "rm", "db-password"], b"").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(d.store.list_secrets().unwrap().is_empty());

    // Registries: the password from stdin, never shown.
    let run = lull(
        s,
        &[
            "registry",
            "login",
            "127.0.0.1:5000",
            "--username",
            "bob",
            "--password-stdin",
        ],
        b"pw-from-stdin\n",
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("127.0.0.1:5000 as bob"),
        "{}",
        run.stdout
    );
    let lookup =
        lull_daemon::control::secrets::registry_credentials(d.store.clone(), d.key.clone());
    assert_eq!(
        lookup("127.0.0.1:5000"),
        Some(("bob".to_owned(), "pw-from-stdin".to_owned()))
    );
    let run = lull(s, &["registry", "list"], b"").await;
    assert!(run.stdout.contains("bob"), "{}", run.stdout);
    assert!(!run.stdout.contains("pw-from-stdin"), "{}", run.stdout);
    let run = lull(s, &["registry", "logout", "127.0.0.1:5000"], b"").await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = lull(s, &["registry", "logout", "127.0.0.1:5000"], b"").await;
    assert_eq!(run.code, 3, "{} {}", run.stdout, run.stderr);

    // No daemon: exit 5.
    let nowhere = d.dir.path().join("nowhere.sock");
    let run = lull(&nowhere, &["secret", "list"], b"").await;
    assert_eq!(run.code, 5, "{} {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("no lull daemon"), "{}", run.stderr);
}
