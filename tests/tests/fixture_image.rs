//! Privileged, end to end: the fixture web app's image pulled from the local registry (and
//! imported from an OCI layout and a docker archive), unpacked, launched in its own namespaces
//! with its own network namespace, answering HTTP there and nowhere else; its isolation read
//! from the host's /proc; its logs; its stop; and a hostile image refused at unpack time.
//!
//! Preconditions (CI guarantees them; the tests fail, never skip, without them): root, the
//! registry on 127.0.0.1:5000 and `target/fixtures/` as `cargo xtask fixtures` leaves them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lull_runtime::host::Runtime;
use lull_runtime::instance::{InstanceRequest, ProcessOverrides};
use lull_runtime::logs::{self, LogLimits, LogRecord, Stream};
use lull_runtime::pull::PullOptions;
use lull_runtime::store::ImageRecord;
use lull_tests::e2e::{
    FIXTURE_APP, FIXTURE_APP_ZSTD, HELLO, InstanceGuard, NetNsGuard, TestRuntime, fixture_path,
    free_host_port, is_rfc3339_utc, reference, require_registry,
};
use lull_tests::http;
use lull_tests::oci_layout::{RawTar, write_layout};
use lull_tests::scratch::{mounts_under, unique_name};

const ZYGOTE: &str = env!("CARGO_BIN_EXE_lull-test-zygote");
const READY: Duration = Duration::from_secs(20);

fn test_runtime(prefix: &str) -> TestRuntime {
    TestRuntime::new(prefix, Path::new(ZYGOTE))
}

async fn pull(t: &TestRuntime, image: &str) -> ImageRecord {
    require_registry();
    t.runtime
        .store
        .pull(&reference(image), &PullOptions::default())
        .await
        .unwrap_or_else(|e| panic!("pull {image}: {e}"))
}

/// Unpacks `image`, makes a network namespace and starts the image in it with `PORT=port`;
/// waits until `/healthz` answers.
async fn launch<'t>(
    t: &'t TestRuntime,
    image: &ImageRecord,
    port: u16,
) -> (NetNsGuard, InstanceGuard<'t>) {
    let layers = t.runtime.prepare(image).await.expect("prepare the image");
    let id = unique_name("app");
    let netns = NetNsGuard::create(&t.runtime.config.netns_dir(), &id);
    let request = InstanceRequest {
        id: id.clone(),
        layers,
        image: Runtime::image_process(image),
        overrides: ProcessOverrides {
            port: Some(port),
            ..Default::default()
        },
        resources: Default::default(),
        netns: Some(netns.netns().path().to_owned()),
        files: Vec::new(),
        log_limits: LogLimits::default(),
    };
    let instance = match t.runtime.instances.launch(request).await {
        Ok(instance) => instance,
        Err(e) => {
            let _ = t.runtime.instances.remove_files(&id);
            panic!("launch {id}: {e}");
        }
    };
    let instance = InstanceGuard::new(&t.runtime.instances, instance);
    let ready = http::wait_for(netns.netns(), port, "/healthz", READY);
    assert!(
        ready.as_ref().is_ok_and(|r| r.status == 200),
        "the app never became healthy: {ready:?}; output: {:?}",
        logs::read_all(&instance.paths().logs())
    );
    (netns, instance)
}

/// Records of the instance's log store once `done` holds for them, or panics after a while.
async fn wait_for_logs(
    dir: &Path,
    what: &str,
    done: impl Fn(&[LogRecord]) -> bool,
) -> Vec<LogRecord> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let records = logs::read_all(dir).unwrap_or_default();
        if done(&records) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never showed in the logs of {}: {:?}",
            dir.display(),
            records.iter().rev().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn delete_all(t: &TestRuntime, netns: NetNsGuard, instance: InstanceGuard<'_>) {
    instance.delete().await.expect("delete the instance");
    netns.destroy().expect("destroy the network namespace");
    let left = mounts_under(t.scratch.path());
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

#[tokio::test]
async fn the_pulled_app_answers_inside_its_network_namespace_only() {
    let t = test_runtime("lull-e2e-net");
    let image = pull(&t, FIXTURE_APP).await;
    assert_eq!(
        image.config.user.as_deref(),
        Some("app"),
        "{:?}",
        image.config
    );
    let port = free_host_port();
    let (netns, instance) = launch(&t, &image, port).await;

    let root = http::get_in(netns.netns(), port, "/", Duration::from_secs(5)).unwrap();
    assert_eq!((root.status, root.body.as_str()), (200, HELLO));
    let env = http::get_in(netns.netns(), port, "/env", Duration::from_secs(5)).unwrap();
    assert_eq!(env.status, 200);
    assert!(
        env.body.lines().any(|l| l == format!("PORT={port}")),
        "PORT not given to the app: {}",
        env.body
    );
    let missing = http::get_in(netns.netns(), port, "/nope", Duration::from_secs(5)).unwrap();
    assert_eq!(missing.status, 404);

    // The port was free on the host before the launch and the app listens in its own
    // namespace: nothing answers on the host's loopback.
    match http::get_local(port, "/", Duration::from_secs(1)) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(response) => panic!("the app answered on the host's loopback: {response:?}"),
    }
    delete_all(&t, netns, instance).await;
}

fn status_field<'s>(status: &'s str, name: &str) -> &'s str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("{name} missing from /proc/<pid>/status:\n{status}"))
        .trim()
}

fn ns_inode(pid: &str, ns: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{ns}: {e}"))
}

/// Capability numbers (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// Docker's default capability set as a CapBnd mask.
fn docker_default_caps_mask() -> u64 {
    const CAPS: [(&str, u32); 14] = [
        ("chown", 0),
        ("dac_override", 1),
        ("fowner", 3),
        ("fsetid", 4),
        ("kill", 5),
        ("setgid", 6),
        ("setuid", 7),
        ("setpcap", 8),
        ("net_bind_service", 10),
        ("net_raw", 13),
        ("sys_chroot", 18),
        ("mknod", 27),
        ("audit_write", 29),
        ("setfcap", 31),
    ];
    CAPS.iter().fold(0, |mask, (_, cap)| mask | (1u64 << cap))
}

/// The hostname seen inside the UTS namespace of `pid`, read on a thread that entered it.
fn hostname_in_uts_of(pid: i32) -> String {
    std::thread::spawn(move || {
        let ns =
            std::fs::File::open(format!("/proc/{pid}/ns/uts")).expect("open the uts namespace");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWUTS)
            .expect("enter the uts namespace");
        nix::unistd::gethostname()
            .expect("gethostname")
            .into_string()
            .expect("utf-8 hostname")
    })
    .join()
    .expect("the uts thread panicked")
}

#[tokio::test]
async fn the_app_is_isolated_and_unprivileged() {
    let t = test_runtime("lull-e2e-iso");
    let image = pull(&t, FIXTURE_APP).await;
    let port = free_host_port();
    let (netns, instance) = launch(&t, &image, port).await;
    let pid = instance.init_pid().to_string();

    // Own namespaces: every one differs from the host's (this test process's).
    for ns in ["uts", "pid", "mnt", "ipc", "net", "cgroup"] {
        assert_ne!(
            ns_inode(&pid, ns),
            ns_inode("self", ns),
            "{ns} namespace shared with the host"
        );
    }
    let given =
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(netns.netns().path()).unwrap());
    assert_eq!(
        ns_inode(&pid, "net"),
        PathBuf::from(format!("net:[{given}]")),
        "the app runs in the network namespace it was given"
    );
    assert_eq!(hostname_in_uts_of(instance.init_pid()), instance.id);

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid: Vec<&str> = status_field(&status, "NSpid").split_whitespace().collect();
    assert_eq!(
        nspid.len(),
        2,
        "one pid namespace below the host's: {nspid:?}"
    );
    assert_eq!(nspid[1], "1", "the app is pid 1 inside: {nspid:?}");
    assert_eq!(
        status_field(&status, "Uid")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1000"; 4],
        "runs as the image's user app (uid 1000)"
    );
    assert_eq!(
        status_field(&status, "Gid").split_whitespace().next(),
        Some("1000")
    );
    let cap = |name| u64::from_str_radix(status_field(&status, name), 16).unwrap();
    assert_eq!(
        cap("CapEff"),
        0,
        "an unprivileged app has no effective capabilities"
    );
    assert_eq!(
        cap("CapPrm"),
        0,
        "an unprivileged app has no permitted capabilities"
    );
    assert_eq!(cap("CapAmb"), 0);
    assert_eq!(
        cap("CapBnd"),
        docker_default_caps_mask(),
        "bounding set is Docker's default 14 capabilities"
    );
    assert_eq!(cap("CapBnd") & (1 << CAP_SYS_ADMIN), 0);
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");

    // Only the app's own processes are visible in its /proc.
    let visible: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(
        visible,
        BTreeSet::from(["1".to_owned()]),
        "processes visible inside"
    );

    // Its mount table: its own rootfs at /, no host path mounted in, cgroups read-only.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let scratch = t.scratch.path().to_string_lossy().into_owned();
    let mut has_root = false;
    for line in mountinfo.lines() {
        let (pre, post) = line.split_once(" - ").expect("mountinfo line");
        let fields: Vec<&str> = pre.split(' ').collect();
        let (fs_root, mount_point, options) = (fields[3], fields[4], fields[5]);
        let fstype = post.split(' ').next().unwrap_or("");
        assert!(
            !mount_point.contains(&scratch) && !fs_root.contains(&scratch),
            "a host path is mounted into the instance: {line}"
        );
        let expected_place = mount_point == "/"
            || ["/proc", "/dev", "/sys"]
                .iter()
                .any(|top| Path::new(mount_point).starts_with(top));
        assert!(
            expected_place,
            "unexpected mount inside the instance: {line}"
        );
        if mount_point == "/" {
            has_root = true;
            assert_eq!(
                fstype, "overlay",
                "the root is the instance's overlay: {line}"
            );
        }
        if fstype == "cgroup" || fstype == "cgroup2" {
            assert!(mount_point.starts_with("/sys/fs/cgroup/"), "{line}");
            let named = post.contains("name=");
            // Read-only everywhere: on v2 the spec's cgroup mount, on v1 lull's binds of the
            // instance's own group (libcontainer would mount v1 hierarchies read-write).
            assert!(
                options.split(',').any(|o| o == "ro"),
                "cgroup mount not read-only: {line}"
            );
            assert!(!named, "the host's named hierarchy is visible: {line}");
            // Each hierarchy shows the instance's own group, not the host's hierarchy; the cpu
            // hierarchy shows the limit group around it, which holds its CPU limit.
            let super_options = post.split(' ').nth(2).unwrap_or("");
            let own = if super_options.split(',').any(|o| o == "cpu") {
                instance
                    .cgroups_path
                    .rsplit_once('/')
                    .map(|(limit, _)| limit)
                    .unwrap_or("")
            } else {
                instance.cgroups_path.as_str()
            };
            assert_eq!(fs_root, own, "{line}");
        }
        assert!(
            !mount_point.starts_with("/var/lib/lull") && !mount_point.starts_with("/run/lull"),
            "{line}"
        );
    }
    assert!(has_root, "no root mount in:\n{mountinfo}");
    // The app's working dir is the image's.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        PathBuf::from("/app")
    );
    delete_all(&t, netns, instance).await;
}

#[tokio::test]
async fn logs_arrive_complete_in_order_with_utc_timestamps() {
    let t = test_runtime("lull-e2e-logs");
    let image = pull(&t, FIXTURE_APP).await;
    let port = free_host_port();
    let (netns, instance) = launch(&t, &image, port).await;
    let dir = instance.paths().logs();

    let listening = format!("listening on :{port}");
    let records = wait_for_logs(&dir, &listening, |r| r.iter().any(|r| r.text == listening)).await;
    let line = records.iter().find(|r| r.text == listening).unwrap();
    assert_eq!(line.stream, Stream::Stdout);
    assert!(!line.partial);
    for r in &records {
        assert!(
            is_rfc3339_utc(&r.time),
            "timestamp {:?} is not RFC 3339 UTC",
            r.time
        );
    }

    let response = http::get_in(
        netns.netns(),
        port,
        "/log?lines=1000",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let is_ours = |r: &&LogRecord| r.text.starts_with("log line ");
    let records = wait_for_logs(&dir, "1000 log lines", |r| {
        r.iter().filter(is_ours).count() >= 1000
    })
    .await;
    let lines: Vec<&LogRecord> = records.iter().filter(is_ours).collect();
    assert_eq!(lines.len(), 1000, "lines duplicated");
    for (i, r) in lines.iter().enumerate() {
        assert_eq!(
            r.text,
            format!("log line {} of 1000", i + 1),
            "line {} out of order or lost",
            i + 1
        );
        assert_eq!(r.stream, Stream::Stdout);
        assert!(!r.partial, "{r:?}");
        assert!(is_rfc3339_utc(&r.time), "{r:?}");
    }
    let times: Vec<&str> = records.iter().map(|r| r.time.as_str()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "records are stored oldest first");
    delete_all(&t, netns, instance).await;
}

#[tokio::test]
async fn sigterm_stops_the_app_with_code_zero_and_the_status_is_recorded() {
    let t = test_runtime("lull-e2e-stop");
    let image = pull(&t, FIXTURE_APP).await;
    let port = free_host_port();
    let (netns, instance) = launch(&t, &image, port).await;

    let started = Instant::now();
    let status = instance.stop(Duration::from_secs(10)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}: SIGTERM was not enough",
        started.elapsed()
    );
    assert_eq!((status.code, status.signal), (Some(0), None), "{status:?}");
    assert!(status.success() && !status.oom_killed);
    assert!(instance.has_exited());
    assert_eq!(instance.exit_status().unwrap().as_ref(), Some(&status));
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(instance.paths().exit()).unwrap()).unwrap();
    assert_eq!(recorded["code"], 0, "{recorded}");
    assert!(
        is_rfc3339_utc(recorded["finished_at"].as_str().unwrap()),
        "{recorded}"
    );
    // Nothing answers any more.
    assert!(http::get_in(netns.netns(), port, "/", Duration::from_secs(1)).is_err());
    delete_all(&t, netns, instance).await;
}

#[tokio::test]
async fn the_zstd_variant_pulls_and_runs() {
    let t = test_runtime("lull-e2e-zstd");
    let image = pull(&t, FIXTURE_APP_ZSTD).await;
    assert!(
        image.layers.iter().all(|l| l.media_type.ends_with("+zstd")),
        "{:?}",
        image.layers
    );
    let port = free_host_port();
    let (netns, instance) = launch(&t, &image, port).await;
    let root = http::get_in(netns.netns(), port, "/", Duration::from_secs(5)).unwrap();
    assert_eq!((root.status, root.body.as_str()), (200, HELLO));
    delete_all(&t, netns, instance).await;
}

#[tokio::test]
async fn imported_docker_archive_and_oci_layout_run() {
    let t = test_runtime("lull-e2e-import");
    let archive = t
        .runtime
        .store
        .import_docker_archive(&fixture_path("fixture-app.docker.tar"), None)
        .await
        .expect("import the docker archive");
    assert!(
        archive
            .references
            .iter()
            .any(|r| r.repository() == "lull/fixture-app" && r.tag() == Some("latest")),
        "tagged from RepoTags: {:?}",
        archive.references
    );
    let layout_ref = reference("lull/fixture-app:from-layout");
    let layout = t
        .runtime
        .store
        .import_oci_layout(&fixture_path("fixture-app"), None, &layout_ref)
        .await
        .expect("import the OCI layout");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_path("fixture-app/index.json")).unwrap())
            .unwrap();
    assert_eq!(
        layout.manifest_digest.to_string(),
        index["manifests"][0]["digest"].as_str().unwrap()
    );
    assert_eq!(
        t.runtime
            .store
            .get(&layout_ref)
            .unwrap()
            .map(|r| r.manifest_digest),
        Some(layout.manifest_digest.clone())
    );

    // Both run side by side on the same port, each in its own network namespace.
    let port = free_host_port();
    let (netns_a, instance_a) = launch(&t, &archive, port).await;
    let (netns_b, instance_b) = launch(&t, &layout, port).await;
    for netns in [&netns_a, &netns_b] {
        let root = http::get_in(netns.netns(), port, "/", Duration::from_secs(5)).unwrap();
        assert_eq!((root.status, root.body.as_str()), (200, HELLO));
    }
    instance_b.delete().await.unwrap();
    netns_b.destroy().unwrap();
    delete_all(&t, netns_a, instance_a).await;
}

/// Every path under `dir`, for before/after comparisons.
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            found.insert(path);
        }
    }
    found
}

#[tokio::test]
async fn hostile_layers_are_refused_and_nothing_is_written_outside() {
    let t = test_runtime("lull-e2e-hostile");
    let outside = t.scratch.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let sentinel = outside.join("sentinel");
    std::fs::write(&sentinel, "untouched").unwrap();
    let outside_abs = outside.to_str().unwrap().to_owned();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            RawTar::new()
                .dir("app")
                .file("../escape", b"pwned")
                .finish(),
            "../escape",
        ),
        (
            "symlink",
            RawTar::new()
                .symlink("link", &outside_abs)
                .file("link/escape", b"pwned")
                .finish(),
            "link/escape",
        ),
        (
            "hardlink",
            RawTar::new()
                .hardlink("escape", "../../../../outside/sentinel")
                .finish(),
            "escape",
        ),
    ];
    for (name, layer, entry) in cases {
        let layout_dir = t.scratch.path().join(format!("layout-{name}"));
        write_layout(&layout_dir, &[layer], &["/app/server"]).unwrap();
        let image = t
            .runtime
            .store
            .import_oci_layout(
                &layout_dir,
                None,
                &reference(&format!("hostile/{name}:latest")),
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: import: {e}"));
        let before = tree(t.scratch.path());
        let err = t
            .runtime
            .prepare(&image)
            .await
            .expect_err(&format!("{name}: a hostile layer was unpacked"));
        let message = err.to_string();
        assert!(
            message.contains(&format!("{entry:?}")),
            "{name}: the error does not name the entry {entry:?}: {message}"
        );
        let after = tree(t.scratch.path());
        // The per-layer lock file is the one thing the cache keeps.
        let locks = t.runtime.config.layers_dir().join(".locks");
        let added: Vec<&PathBuf> = after
            .difference(&before)
            .filter(|p| !p.starts_with(&locks))
            .collect();
        assert!(added.is_empty(), "{name}: files appeared: {added:?}");
        assert!(
            t.runtime.layers.list().is_empty(),
            "{name}: a layer dir was kept"
        );
        assert_eq!(
            std::fs::read_to_string(&sentinel).unwrap(),
            "untouched",
            "{name}"
        );
        let nlink = std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&sentinel).unwrap());
        assert_eq!(nlink, 1, "{name}: the sentinel was hardlinked");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            1,
            "{name}: something was written next to the sentinel"
        );
        for place in [
            t.scratch.path().join("escape"),
            t.data_dir().join("escape"),
            t.runtime.config.layers_dir().join("escape"),
        ] {
            assert!(!place.exists(), "{name}: {} written", place.display());
        }
    }
}
