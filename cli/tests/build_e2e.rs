//! Privileged, end to end: source builds through the real `lull` CLI and the real daemon. The
//! Flask fixture deployed from a folder (cold build, then a code-only rebuild whose dependency
//! layer is cached and which serves the new code at once, then a no-op), a failing build that
//! reports the command's exit code and last lines and leaves the previous revision serving, the
//! built image exported as an OCI layout and run with umoci and runc, pushed to the local
//! registry (same manifest digest as the export), and a tarball source; the Express fixture
//! (`npm ci`) deployed from a local git repository, and a git ref that does not exist refused.
//!
//! Preconditions: root; the registry on 127.0.0.1:5000 with the fixture images
//! (`cargo xtask fixtures`) and the base images (`cargo xtask base-images`); umoci, runc, skopeo
//! and git on the PATH; egress to PyPI and the npm registry (the dependency steps download).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lull_tests::daemon::{TestDaemon, proxy_get};
use lull_tests::e2e::{REGISTRY, free_host_port, require_registry, require_root, workspace_root};
use lull_tests::scratch::{CgroupParentGuard, ScratchDir, unique_name};
use serde_json::Value;

/// The CA bundle the host trusts: this machine's egress intercepts TLS with a CA only it knows,
/// so builds must trust the same bundle.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Base images the fixtures build on, as `(repository, tag)` in the local registry.
const BASE_IMAGES: [(&str, &str); 2] = [("lull/base/python", "3.11"), ("lull/base/node", "18")];

/// Prints a step's figure as the test goes (shown with `--nocapture`, and on failure).
fn figure(step: &str, what: &str, took: Duration) {
    eprintln!("[build e2e] {step}: {what}: {:.2} s", took.as_secs_f64());
}

/// Panics unless the local registry holds the base images the fixtures name.
fn require_base_images() {
    for (repository, tag) in BASE_IMAGES {
        let path = format!("/v2/{repository}/tags/list");
        let port: u16 = REGISTRY
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the registry's port");
        let answer =
            lull_tests::http::get_local(port, &path, Duration::from_secs(5)).unwrap_or_else(|e| {
                panic!(
                    "precondition failed: the registry at {REGISTRY} must be running ({e}); start it and run `cargo xtask base-images`"
                )
            });
        assert!(
            answer.status == 200 && answer.body.contains(&format!("\"{tag}\"")),
            "precondition failed: {REGISTRY}/{repository}:{tag} is not in the registry ({} {}); run `cargo xtask base-images`",
            answer.status,
            answer.body.trim()
        );
    }
}

/// Panics unless `program` runs.
fn require_tool(program: &str, arg: &str) {
    let ran = Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        ran.is_ok_and(|s| s.success()),
        "precondition failed: `{program} {arg}` does not run; install {program} (scripts/setup-host)"
    );
}

/// A daemon whose `lull.toml` has a `[builder]` section: the host's CA bundle trusted inside
/// builds, the base images from the local registry.
fn start_daemon(prefix: &str) -> TestDaemon {
    let mut d = TestDaemon::new(Path::new(env!("CARGO_BIN_EXE_lull")), prefix);
    let mut config = std::fs::read_to_string(d.config_path()).expect("read lull.toml");
    config.push_str(&format!(
        "\n[builder]\nextra_ca_certs = [{HOST_CA_BUNDLE:?}]\ngit_allow_local = true\n\
         \n[builder.base_images]\npython311 = \"{REGISTRY}/lull/base/python:3.11\"\n\
         nodejs18 = \"{REGISTRY}/lull/base/node:18\"\n"
    ));
    std::fs::write(d.config_path(), config).expect("write lull.toml");
    let took = d.start();
    figure("0", "daemon start to socket answering", took);
    d
}

/// What a `lull` client command did: its exit code, stdout and stderr together, how long it
/// took.
struct Ran {
    code: Option<i32>,
    text: String,
    took: Duration,
}

impl Ran {
    fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs `lull --socket <the daemon's> ARGS`.
fn lull(d: &TestDaemon, args: &[&str]) -> Ran {
    let socket = d.socket().display().to_string();
    let mut all = vec!["--socket", socket.as_str()];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out: Output = d.lull(&all);
    let took = started.elapsed();
    Ran {
        code: out.status.code(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        took,
    }
}

/// `lull ARGS` that must succeed; panics with its output and the daemon's log otherwise.
fn lull_ok(d: &TestDaemon, args: &[&str]) -> Ran {
    let ran = lull(d, args);
    assert!(
        ran.success(),
        "`lull {}` exited {:?}:\n{}",
        args.join(" "),
        ran.code,
        ran.text
    );
    ran
}

/// `lull --json ARGS` that must succeed, its output read as one JSON object.
fn lull_json(d: &TestDaemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let ran = lull_ok(d, &all);
    serde_json::from_str(ran.text.trim()).unwrap_or_else(|e| {
        panic!(
            "`lull {}` printed no JSON ({e}):\n{}",
            all.join(" "),
            ran.text
        )
    })
}

/// One `GET /` through the proxy; panics unless it answers 200.
fn get_body(d: &TestDaemon, host: &str) -> String {
    let answer = proxy_get(d.http_port, host, "/", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("GET / on {host} through the proxy: {e}"));
    assert_eq!(
        answer.status, 200,
        "GET / on {host} answered {}: {}",
        answer.status, answer.body
    );
    answer.body
}

/// The fixture app `name` under `tests/fixtures/apps/`.
fn fixture_app(name: &str) -> PathBuf {
    let path = workspace_root().join("tests/fixtures/apps").join(name);
    assert!(path.is_dir(), "fixture app {} is missing", path.display());
    path
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("a dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Replaces `from` by `to` in `file` (which must contain it).
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replace(from, to))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

/// Runs a host tool that must succeed; answers its stdout.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A runc container run in the foreground; killed and deleted when dropped, even when the test
/// fails.
struct RuncContainer {
    root: PathBuf,
    id: String,
    child: Child,
}

impl RuncContainer {
    fn run(root: &Path, bundle: &Path, id: &str, log: &Path) -> RuncContainer {
        let log = std::fs::File::create(log).expect("create the container's log");
        let child = Command::new("runc")
            .arg("--root")
            .arg(root)
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log's fd"))
            .stderr(log)
            .spawn()
            .expect("spawn runc");
        RuncContainer {
            root: root.to_owned(),
            id: id.to_owned(),
            child,
        }
    }

    fn runc(&self, args: &[&str]) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        self.runc(&["kill", &self.id, "KILL"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.runc(&["delete", "--force", &self.id]);
    }
}

/// An image pushed to the local registry, deleted from it when dropped (its manifest; the
/// registry's garbage collection takes the blobs).
struct PushedImage(String);

impl Drop for PushedImage {
    fn drop(&mut self) {
        let _ = Command::new("skopeo")
            .args(["delete", "--tls-verify=false"])
            .arg(format!("docker://{}", self.0))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Checks that the daemon's guard left nothing behind: no instance, no bridge, no cgroup.
fn assert_cleaned_up(d: TestDaemon) {
    let bridge = d.net.bridge.clone();
    let cgroups = d.cgroups.dirs();
    let scratch = d.scratch.path().to_owned();
    let started = Instant::now();
    drop(d);
    figure(
        "-",
        "teardown (instances, network, cgroups, scratch dir)",
        started.elapsed(),
    );
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "bridge {bridge} left behind"
    );
    for dir in cgroups {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    if std::env::var_os("LULL_KEEP_SCRATCH").is_none() {
        assert!(!scratch.exists(), "{} left behind", scratch.display());
    }
}

#[test]
fn flask_builds_from_a_folder_fails_cleanly_exports_runs_under_runc_pushes_and_builds_from_a_tarball()
 {
    require_root();
    require_registry();
    require_base_images();
    for (program, arg) in [
        ("umoci", "--version"),
        ("runc", "--version"),
        ("skopeo", "--version"),
        ("tar", "--version"),
    ] {
        require_tool(program, arg);
    }
    let whole = Instant::now();
    let work = ScratchDir::new("lull-build-e2e-work").expect("scratch dir");
    let d = start_daemon("lull-build-e2e");
    const HOST: &str = "flask.localhost";

    // 1. A cold build from a folder (a copy of the fixture, edited below), through the CLI.
    let app = work.path().join("flask");
    copy_dir(&fixture_app("flask"), &app);
    let app_arg = app.display().to_string();
    let cold = lull_ok(&d, &["deploy", "flask", &app_arg]);
    figure(
        "1",
        "cold build and deploy (lull deploy flask DIR)",
        cold.took,
    );
    assert!(
        cold.text
            .contains("dependencies: on the dependency manifests alone"),
        "the first build ran no dependency step:\n{}",
        cold.text
    );
    assert_eq!(get_body(&d, HOST), "flask-v1\n", "{}", cold.text);

    // A code-only change: the dependency layer comes from the cache, and the very first request
    // after the deploy returns gets the new code.
    edit(&app.join("app.py"), "flask-v1", "flask-v2");
    let warm = lull_ok(&d, &["deploy", "flask", &app_arg]);
    figure("1", "code-only rebuild and deploy", warm.took);
    assert!(
        warm.text.contains("dependencies: cached"),
        "the code-only rebuild did not reuse the dependency layer:\n{}",
        warm.text
    );
    assert_eq!(get_body(&d, HOST), "flask-v2\n", "{}", warm.text);
    assert!(
        warm.took < cold.took,
        "the cached rebuild ({:?}) took longer than the cold build ({:?})",
        warm.took,
        cold.took
    );

    // The same source again: nothing to build, nothing to deploy.
    let again = lull_ok(&d, &["deploy", "flask", &app_arg]);
    figure("1", "unchanged source deployed again", again.took);
    assert!(
        again.text.contains("nothing changed"),
        "an unchanged source was built or deployed again:\n{}",
        again.text
    );
    assert_eq!(get_body(&d, HOST), "flask-v2\n");

    // 2. A failing build step: the CLI fails with the command's exit code and last lines; the
    // service keeps serving revision 2.
    let broken = work.path().join("flask-broken");
    copy_dir(&app, &broken);
    edit(&broken.join("app.py"), "flask-v2", "flask-broken");
    edit(
        &broken.join("apprunner.yaml"),
        "      - pip install -r requirements.txt\n",
        "      - pip install -r requirements.txt\n      - echo build-e2e-failure-marker; exit 7\n",
    );
    let failed = lull(&d, &["deploy", "flask", &broken.display().to_string()]);
    figure("2", "failing build", failed.took);
    eprintln!(
        "[build e2e] 2: what `lull deploy` printed:\n{}",
        failed.text
    );
    assert_eq!(
        failed.code,
        Some(1),
        "a failed build must exit 1 (the operation failed):\n{}",
        failed.text
    );
    assert!(
        failed.text.contains("exit code 7"),
        "the failure does not name the command's exit code:\n{}",
        failed.text
    );
    assert!(
        failed.text.contains("build-e2e-failure-marker"),
        "the failure does not show the command's last lines:\n{}",
        failed.text
    );
    assert_eq!(get_body(&d, HOST), "flask-v2\n", "{}", failed.text);
    let shown = d.api_json("GET", "/v1/services/flask", None);
    assert_eq!(shown["status"]["serving"], 2, "{shown}");

    // 4. The built image as an OCI layout, unpacked with umoci and run with runc in the host's
    // network namespace on a free loopback port.
    let layout = work.path().join("oci");
    let layout_arg = layout.display().to_string();
    // The export reads the daemon's image store itself (`lull_ok` passes its --data-dir).
    let exported = lull_json(
        &d,
        &[
            "image",
            "export",
            "flask",
            "--oci",
            &layout_arg,
            "--tag",
            "t",
        ],
    );
    let manifest = exported["manifest"]
        .as_str()
        .unwrap_or_else(|| panic!("the export names no manifest: {exported}"))
        .to_owned();
    assert!(manifest.starts_with("sha256:"), "{exported}");
    let bundle = work.path().join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{layout_arg}:t"),
            &bundle.display().to_string(),
        ],
    );
    let port = free_host_port();
    let runc_cgroup = CgroupParentGuard::new("lull-test-runc");
    let id = unique_name("lull-build-e2e");
    let config_path = bundle.join("config.json");
    let mut config: Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path).expect("read the bundle's config.json"),
    )
    .expect("config.json is JSON");
    config["process"]["terminal"] = Value::Bool(false);
    config["process"]["env"]
        .as_array_mut()
        .expect("process.env")
        .push(Value::String(format!("PORT={port}")));
    config["linux"]["namespaces"]
        .as_array_mut()
        .expect("linux.namespaces")
        .retain(|n| n["type"] != "network");
    config["linux"]["cgroupsPath"] = Value::String(format!("{}/{id}", runc_cgroup.parent));
    std::fs::write(&config_path, config.to_string()).expect("write config.json");
    let runc_root = work.path().join("runc");
    let runc_log = work.path().join("runc.log");
    let started = Instant::now();
    let container = RuncContainer::run(&runc_root, &bundle, &id, &runc_log);
    let answer = loop {
        match lull_tests::http::get_local(port, "/", Duration::from_secs(2)) {
            Ok(answer) => break answer,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the exported image run by runc did not answer on 127.0.0.1:{port} ({e}):\n{}",
                    std::fs::read_to_string(&runc_log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    figure(
        "4",
        "runc run of the exported image to its first answer",
        started.elapsed(),
    );
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, "flask-v2\n"),
        "{}",
        std::fs::read_to_string(&runc_log).unwrap_or_default()
    );
    drop(container);
    drop(runc_cgroup);

    // 5. The same image pushed to the registry: the registry serves the manifest the export
    // wrote.
    let target = format!("{REGISTRY}/lull-test/{}:v1", unique_name("build-e2e"));
    let _pushed_image = PushedImage(target.clone());
    let pushed = lull_json(&d, &["image", "push", "flask", &target]);
    assert_eq!(
        pushed["manifest"].as_str(),
        Some(manifest.as_str()),
        "{pushed}"
    );
    let inspected = tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
            &format!("docker://{target}"),
        ],
    );
    assert_eq!(
        inspected.trim(),
        manifest,
        "the registry's manifest for {target}"
    );

    // 6. A tarball with one top-level folder.
    let parent = work.path().join("tarball");
    let tarred = parent.join("flaskdir");
    copy_dir(&app, &tarred);
    edit(&tarred.join("app.py"), "flask-v2", "flask-v3");
    let tarball = work.path().join("app.tgz");
    tool(
        "tar",
        &[
            "czf",
            &tarball.display().to_string(),
            "-C",
            &parent.display().to_string(),
            "flaskdir",
        ],
    );
    let from_tarball = lull_ok(&d, &["deploy", "flask", &tarball.display().to_string()]);
    figure("6", "build and deploy from a tarball", from_tarball.took);
    assert!(
        from_tarball.text.contains("dependencies: cached"),
        "{}",
        from_tarball.text
    );
    assert_eq!(get_body(&d, HOST), "flask-v3\n", "{}", from_tarball.text);

    assert_cleaned_up(d);
    figure("-", "whole test", whole.elapsed());
}

#[test]
fn express_builds_with_npm_ci_from_a_local_git_repository_and_a_missing_ref_is_refused() {
    require_root();
    require_registry();
    require_base_images();
    require_tool("git", "--version");
    let whole = Instant::now();
    let work = ScratchDir::new("lull-build-e2e-git").expect("scratch dir");
    let repo = work.path().join("express");
    copy_dir(&fixture_app("express"), &repo);
    let git = |args: &[&str]| {
        let mut all = vec!["-C", repo.to_str().expect("a UTF-8 path")];
        all.extend_from_slice(args);
        tool("git", &all)
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&[
        "-c",
        "user.name=lull tests",
        "-c",
        "user.email=tests@lull.invalid",
        "commit",
        "-q",
        "-m",
        "the express fixture",
    ]);
    let url = format!("file://{}", repo.display());
    let d = start_daemon("lull-build-e2e-git");
    const HOST: &str = "express.localhost";

    // 3. `npm ci` on the committed lock, from the repository's main branch.
    let built = lull_ok(&d, &["deploy", "express", "--git", &url, "--ref", "main"]);
    figure("3", "cold build (npm ci) and deploy from git", built.took);
    assert!(
        built.text.contains("==> git: commit"),
        "the build names no commit:\n{}",
        built.text
    );
    assert!(
        built.text.contains("npm ci"),
        "the build did not run npm ci:\n{}",
        built.text
    );
    assert_eq!(get_body(&d, HOST), "express-v1\n", "{}", built.text);

    // A ref the repository does not have: a clear error naming it; the service keeps serving.
    let missing = lull(
        &d,
        &[
            "deploy",
            "express",
            "--git",
            &url,
            "--ref",
            "no-such-branch",
        ],
    );
    figure("3", "build of a missing ref", missing.took);
    assert!(!missing.success(), "{}", missing.text);
    assert!(
        missing.text.contains("no-such-branch")
            && missing.text.contains("is not a branch, tag or commit"),
        "the error does not say the ref is missing:\n{}",
        missing.text
    );
    assert_eq!(get_body(&d, HOST), "express-v1\n");

    assert_cleaned_up(d);
    figure("-", "whole test", whole.elapsed());
}
