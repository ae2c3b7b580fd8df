//! Privileged, end to end: the real `lull` binary over scratch data, run and cgroup dirs. Images
//! from the local registry; instances run, checked, detached, logged, stopped and removed; bad
//! input refused with a message naming what is wrong.
//!
//! Preconditions: root and the registry on 127.0.0.1:5000 with the fixture images
//! (`cargo xtask fixtures`).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lull_tests::e2e::{BUSYBOX, FIXTURE_APP, HELLO, require_registry, require_root};
use lull_tests::scratch::{CgroupParentGuard, ScratchDir, mounts_under, unique_name};

/// The `lull` binary over its own scratch dirs. Dropping it removes the instances it started
/// (`lull rm`), kills whatever still runs in its cgroups and unmounts what is under its dirs.
struct Lull {
    started: Mutex<Vec<String>>,
    cgroups: CgroupParentGuard,
    scratch: ScratchDir,
    net: TestNetwork,
}

/// Per-test names for the instance network on the real host (bridge, table, link prefix, a
/// /24), so tests never meet each other or an installed lull; and the host's IP forwarding
/// setting, put back when the test ends.
struct TestNetwork {
    bridge: String,
    table: String,
    veth_prefix: String,
    subnet: String,
    ip_forward: String,
}

impl TestNetwork {
    fn new() -> TestNetwork {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = std::process::id().wrapping_mul(31) + COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:04x}", n & 0xffff);
        TestNetwork {
            bridge: format!("lcb{tag}"),
            table: format!("lull_cli_{tag}"),
            veth_prefix: format!("lcv{tag}"),
            subnet: format!("10.74.{}.0/24", n % 250),
            ip_forward: original_ip_forward(),
        }
    }

    fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("LULL_BRIDGE", &self.bridge),
            ("LULL_NFT_TABLE", &self.table),
            ("LULL_VETH_PREFIX", &self.veth_prefix),
            ("LULL_SUBNET", &self.subnet),
        ]
    }

    /// The host ends of instance links this test's lull left.
    fn links(&self) -> Vec<String> {
        std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.veth_prefix))
                    .collect()
            })
            .unwrap_or_default()
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The host's IP forwarding setting as this test process first found it (tests run in
/// parallel: one that starts after another switched forwarding on must not restore "on").
fn original_ip_forward() -> String {
    static ORIGINAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ORIGINAL
        .get_or_init(|| std::fs::read_to_string(IP_FORWARD).unwrap_or_else(|_| "0".into()))
        .clone()
}

/// What a `lull` command printed, and how it ended.
struct Run {
    args: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn success(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "`lull {}` failed\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a non-zero exit whose stderr contains every one of `needles`.
    fn failure(&self, needles: &[&str]) -> &Self {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "`lull {}` should have failed\nstdout:\n{}\nstderr:\n{}",
            self.args,
            self.stdout,
            self.stderr
        );
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "`lull {}`: stderr does not mention {needle:?}:\n{}",
                self.args,
                self.stderr
            );
        }
        self
    }
}

impl Lull {
    fn new(prefix: &str) -> Lull {
        require_root();
        require_registry();
        Lull {
            started: Mutex::new(Vec::new()),
            cgroups: CgroupParentGuard::new("lull-test"),
            scratch: ScratchDir::new(prefix).expect("create scratch dir"),
            net: TestNetwork::new(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    fn run_dir(&self) -> PathBuf {
        self.scratch.path().join("run")
    }

    fn run(&self, args: &[&str]) -> Run {
        let started = Instant::now();
        let output: Output = Command::new(env!("CARGO_BIN_EXE_lull"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--cgroup-parent")
            .arg(&self.cgroups.parent)
            .args(args)
            .env_remove("LULL_DATA_DIR")
            .env_remove("LULL_RUN_DIR")
            .env_remove("LULL_CGROUP_PARENT")
            .env_remove("LULL_LOG")
            .env_remove("LULL_UPLINK")
            .envs(self.net.env())
            .output()
            .expect("run the lull binary");
        Run {
            args: args.join(" "),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            took: started.elapsed(),
        }
    }

    /// Remembers an instance to remove if the test fails before it does.
    fn track(&self, id: &str) {
        self.started.lock().unwrap().push(id.to_owned());
    }

    /// `lull ps` rows (without the header) as (id, rest of the line).
    fn ps(&self) -> Vec<(String, String)> {
        let run = self.run(&["ps"]);
        run.success();
        let mut lines = run.stdout.lines();
        assert!(
            lines.next().is_some_and(|h| h.starts_with("INSTANCE")),
            "{}",
            run.stdout
        );
        lines
            .map(|l| {
                let (id, rest) = l.split_once(' ').unwrap_or((l, ""));
                (id.to_owned(), rest.trim().to_owned())
            })
            .collect()
    }

    /// Asserts nothing of any instance is left: no `lull ps` row, no mount, no network
    /// namespace, no instance or state dir, no cgroup below the parent.
    fn assert_no_instance_left(&self) {
        assert_eq!(self.ps(), vec![], "instances left behind");
        let mounts = mounts_under(self.scratch.path());
        assert!(mounts.is_empty(), "mounts left behind: {mounts:?}");
        for dir in [
            self.run_dir().join("netns"),
            self.run_dir().join("containers"),
            self.data_dir().join("instances"),
        ] {
            let left: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
        }
        let links = self.net.links();
        assert!(links.is_empty(), "instance links left behind: {links:?}");
        let ipam =
            std::fs::read_to_string(self.data_dir().join("network/ipam.json")).unwrap_or_default();
        if !ipam.is_empty() {
            let state: serde_json::Value = serde_json::from_str(&ipam).expect("ipam state");
            assert_eq!(
                state["allocations"],
                serde_json::json!({}),
                "addresses still allocated"
            );
        }
        for dir in self.cgroups.dirs() {
            let children: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            assert!(children.is_empty(), "cgroups left behind: {children:?}");
        }
    }

    fn blob_count(&self) -> usize {
        std::fs::read_dir(self.data_dir().join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Lull {
    fn drop(&mut self) {
        let started = std::mem::take(&mut *self.started.lock().unwrap());
        for id in started {
            if self.data_dir().join("instances").join(&id).exists() {
                let _ = self.run(&["rm", &id]);
            }
        }
        let _ = self.run(&["network", "down", "--force"]);
        let _ = std::fs::write(IP_FORWARD, &self.net.ip_forward);
    }
}

#[test]
fn pull_list_and_check_run_leave_nothing_behind() {
    let lull = Lull::new("lull-cli-check");
    let pulled = lull.run(&["image", "pull", FIXTURE_APP]);
    pulled.success();
    assert!(
        pulled
            .stdout
            .contains(&format!("pulled {FIXTURE_APP} (sha256:")),
        "{}",
        pulled.stdout
    );
    let listed = lull.run(&["image", "ls"]);
    listed.success();
    let row = listed
        .stdout
        .lines()
        .find(|l| l.starts_with(FIXTURE_APP))
        .unwrap_or_else(|| panic!("{FIXTURE_APP} not listed:\n{}", listed.stdout));
    assert!(
        row.split_whitespace().last() == Some("1"),
        "one layer: {row}"
    );

    let checked = lull.run(&["run", FIXTURE_APP, "--check", "/"]);
    checked.success();
    assert!(
        checked.stdout.contains("→ 200 OK"),
        "no 200 in:\n{}",
        checked.stdout
    );
    assert!(
        checked.stdout.contains(HELLO),
        "no greeting in:\n{}",
        checked.stdout
    );
    assert!(
        !checked.stdout.contains("pulled"),
        "the image was pulled again:\n{}",
        checked.stdout
    );
    lull.assert_no_instance_left();

    let missing = lull.run(&["run", FIXTURE_APP, "--check", "/nope"]);
    assert_ne!(missing.code, Some(0), "a 404 check succeeded");
    assert!(
        missing.stdout.contains("404"),
        "the 404 is not shown:\n{}",
        missing.stdout
    );
    lull.assert_no_instance_left();
}

#[test]
fn a_detached_instance_is_listed_logged_stopped_and_removed() {
    let lull = Lull::new("lull-cli-detach");
    let name = unique_name("web");
    lull.track(&name);
    let started = lull.run(&["run", "-d", "--name", &name, "--port", "9090", FIXTURE_APP]);
    started.success();
    assert!(
        started.stdout.contains(&format!("pulled {FIXTURE_APP}")),
        "run pulls a missing image:\n{}",
        started.stdout
    );
    assert_eq!(started.stdout.lines().last(), Some(name.as_str()));

    let rows = lull.ps();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, name);
    assert!(rows[0].1.starts_with("running"), "{rows:?}");
    let subnet_prefix = lull.net.subnet.trim_end_matches(".0/24");
    let addr = format!("{subnet_prefix}.2");
    assert!(
        rows[0].1.ends_with(&addr),
        "the instance's address in the test's subnet: {rows:?}"
    );
    // The host reaches the detached instance on its address, through the bridge.
    let target: std::net::SocketAddr = format!("{addr}:9090").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match lull_tests::http::get_at(target, "/", Duration::from_secs(2)) {
            Ok(r) => break r,
            Err(e) if Instant::now() > deadline => panic!("{target} never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!((answer.status, answer.body.as_str()), (200, HELLO));

    let listening = "listening on :9090";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = lull.run(&["logs", &name]);
        logs.success();
        if let Some(line) = logs.stdout.lines().find(|l| l.ends_with(listening)) {
            let mut fields = line.split(' ');
            let time = fields.next().unwrap_or_default();
            assert!(
                lull_tests::e2e::is_rfc3339_utc(time),
                "timestamp of {line:?}"
            );
            assert_eq!(fields.next(), Some("stdout"), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{listening:?} never logged:\n{}",
            logs.stdout
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let stopped = lull.run(&["stop", &name]);
    stopped.success();
    assert!(
        stopped.stdout.contains("exited with code 0"),
        "{}",
        stopped.stdout
    );
    assert!(
        stopped.took < Duration::from_secs(8),
        "stop waited for SIGKILL: {:?}",
        stopped.took
    );
    let rows = lull.ps();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].1.starts_with("exited with code 0"), "{rows:?}");

    lull.run(&["rm", &name]).success();
    lull.assert_no_instance_left();
    lull.run(&["rm", &name]).failure(&[&name, "not found"]);

    assert!(lull.blob_count() > 0);
    let removed = lull.run(&["image", "rm", FIXTURE_APP]);
    removed.success();
    assert!(
        removed.stdout.contains("removed") && removed.stdout.contains(FIXTURE_APP),
        "{}",
        removed.stdout
    );
    let listed = lull.run(&["image", "ls"]);
    listed.success();
    assert!(!listed.stdout.contains(FIXTURE_APP), "{}", listed.stdout);
    let gc = lull.run(&["image", "gc"]);
    gc.success();
    assert!(
        gc.stdout.contains("removed 3 blobs") && gc.stdout.contains("1 unpacked layers"),
        "manifest, config and layer blobs and the unpacked layer go:\n{}",
        gc.stdout
    );
    assert_eq!(lull.blob_count(), 0);
    let layers: Vec<PathBuf> = std::fs::read_dir(lull.data_dir().join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    assert!(layers.is_empty(), "layers left: {layers:?}");
}

#[test]
fn bad_input_is_refused_naming_what_is_wrong() {
    let lull = Lull::new("lull-cli-bad");
    lull.run(&["image", "pull", FIXTURE_APP]).success();
    lull.run(&["run", "--env", "NOEQUALS", FIXTURE_APP, "--check", "/"])
        .failure(&["--env", "NOEQUALS", "KEY=VALUE"]);
    lull.run(&["run", "--memory", "12X", FIXTURE_APP, "--check", "/"])
        .failure(&["--memory", "12X"]);
    lull.run(&["run", "Not A/Reference!", "--check", "/"])
        .failure(&["image reference", "Not A/Reference!"]);
    lull.run(&["image", "pull", "Not A/Reference!"])
        .failure(&["image reference"]);
    let unknown = "127.0.0.1:5000/lull/no-such-image:latest";
    lull.run(&["run", "--pull", "never", unknown, "--check", "/"])
        .failure(&[unknown, "--pull never"]);
    lull.run(&["run", "--name", "Bad Name", FIXTURE_APP, "--check", "/"])
        .failure(&["Bad Name"]);
    // Network settings, each named in its error, nothing made.
    lull.run(&[
        "run",
        "--subnet",
        "10.0.0.0/33",
        FIXTURE_APP,
        "--check",
        "/",
    ])
    .failure(&["--subnet", "10.0.0.0/33"]);
    lull.run(&[
        "run",
        "--veth-prefix",
        "toolong1",
        FIXTURE_APP,
        "--check",
        "/",
    ])
    .failure(&["veth_prefix", "toolong1"]);
    lull.run(&["run", "--allow-host-port", "0", FIXTURE_APP, "--check", "/"])
        .failure(&["--allow-host-port", "0"]);
    lull.run(&[
        "run",
        "--allow-host-port",
        "53/sctp",
        FIXTURE_APP,
        "--check",
        "/",
    ])
    .failure(&["53/sctp", "tcp or udp"]);
    lull.run(&[
        "run",
        "--uplink",
        "nosuchlink0",
        FIXTURE_APP,
        "--check",
        "/",
    ])
    .failure(&["uplink", "nosuchlink0"]);
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&lull.net.bridge)
            .exists(),
        "no bridge made for refused settings"
    );
    lull.assert_no_instance_left();
}

#[test]
fn a_missing_command_fails_at_once_with_the_reason() {
    let lull = Lull::new("lull-cli-nocmd");
    lull.run(&["image", "pull", BUSYBOX]).success();
    lull.run(&["image", "pull", FIXTURE_APP]).success();
    for args in [
        &["run", BUSYBOX, "--check", "/", "--", "/no/such"][..],
        &[
            "run",
            "--entrypoint",
            "/no/such",
            FIXTURE_APP,
            "--check",
            "/",
        ][..],
    ] {
        let run = lull.run(args);
        run.failure(&["/no/such"]);
        assert!(
            run.took < Duration::from_secs(10),
            "`lull {}` took {:?} to fail (the check timeout is 30 s)",
            run.args,
            run.took
        );
        lull.assert_no_instance_left();
    }
}
