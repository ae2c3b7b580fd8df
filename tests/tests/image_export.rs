//! Privileged, end to end: an image built on top of the busybox fixture (one extra layer and an
//! edited config, committed with `commit_built`) is exported as an OCI image layout that other
//! tools accept: `skopeo inspect` reads its manifest, `umoci unpack` makes a bundle of it and
//! `runc run` runs that bundle, printing the new layer's file and the added environment
//! variable. The image is then pushed to the local registry (uploaded, then found there, then
//! mounted into a second repository) and pulled back into a fresh store with the same manifest
//! digest.
//!
//! Preconditions (CI guarantees them; the test fails, never skips, without them): root, the
//! registry on 127.0.0.1:5000 with the fixture images (`cargo xtask fixtures`), and `umoci`,
//! `runc` and `skopeo` on PATH (`scripts/setup-host`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lull_runtime::digest::Digest;
use lull_runtime::pull::PullOptions;
use lull_runtime::store::{BuiltLayer, HistoryEntry, ImageConfigEdit, ImageStore, media_types};
use lull_tests::e2e::{BUSYBOX, REGISTRY, reference, require_registry, require_root};
use lull_tests::oci_layout::RawTar;
use lull_tests::scratch::{ScratchDir, unique_name};

const BUILT_TEXT: &str = "built on top of busybox by lull\n";
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()));
    assert!(
        found,
        "precondition failed: {name} is not on PATH; install it (scripts/setup-host --print-packages lists it)"
    );
}

/// Runs `command` to completion, killing it after `timeout`.
fn run(mut command: Command, timeout: Duration) -> Output {
    let text = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {text}: {e}"));
    let deadline = Instant::now() + timeout;
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{text} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

fn run_ok(command: Command, timeout: Duration) -> String {
    let text = format!("{command:?}");
    let output = run(command, timeout);
    assert!(
        output.status.success(),
        "{text} failed ({}): stdout {:?} stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Deletes a runc container (force, so a running one is killed first) when dropped; its state
/// lives under a root of the test's own, so nothing else's containers are touched.
struct RuncContainer {
    root: PathBuf,
    id: String,
}

impl RuncContainer {
    fn command(&self) -> Command {
        let mut command = Command::new("runc");
        command.arg("--root").arg(&self.root);
        command
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let mut delete = self.command();
        delete.args(["delete", "--force", &self.id]);
        let _ = delete.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// Deletes the manifest `digest` from `repository` in the local registry when dropped (the
/// registry allows deletes; its blobs go at the registry's own garbage collection).
struct RegistryManifestGuard {
    repository: String,
    digest: Digest,
}

impl Drop for RegistryManifestGuard {
    fn drop(&mut self) {
        let Ok(mut stream) = TcpStream::connect(REGISTRY) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            stream,
            "DELETE /v2/{}/manifests/{} HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: close\r\n\r\n",
            self.repository, self.digest
        );
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
}

/// Sets `process.terminal` to false in an OCI runtime config, so runc runs without a tty.
fn no_terminal(bundle: &Path) {
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read the bundle's config.json"))
            .expect("config.json is json");
    config["process"]["terminal"] = serde_json::Value::Bool(false);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

#[tokio::test]
async fn a_built_image_exports_runs_under_runc_and_round_trips_through_the_registry() {
    require_root();
    require_registry();
    for tool in ["umoci", "runc", "skopeo"] {
        require_tool(tool);
    }
    let scratch = ScratchDir::new("lull-export").expect("scratch dir");
    let options = PullOptions::default();

    // The base, pulled into a store of the test's own.
    let store = ImageStore::open(scratch.path().join("store")).expect("open the store");
    let base = store
        .pull(&reference(BUSYBOX), &options)
        .await
        .expect("pull the busybox fixture");

    // One more layer, /built.txt, and a config that prints it and an added variable.
    let tar = RawTar::new()
        .file("built.txt", BUILT_TEXT.as_bytes())
        .finish();
    let guard = store.hold_ingest().await;
    let (digest, size) = store
        .blobs()
        .ingest_reader(tar.as_slice(), None, None)
        .expect("ingest the new layer");
    let added = BuiltLayer {
        diff_id: digest.clone(),
        digest,
        size,
        media_type: media_types::OCI_LAYER.into(),
    };
    let edit = ImageConfigEdit {
        env: vec![("GREETING".into(), "hello-from-built-image".into())],
        cmd: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat /built.txt; echo \"GREETING=$GREETING\"".into(),
        ]),
        labels: [("org.example.built".to_owned(), "yes".to_owned())].into(),
        history: vec![HistoryEntry {
            created_by: Some("COPY built.txt /built.txt".into()),
            ..HistoryEntry::default()
        }],
        added_diff_ids: vec![added.diff_id.clone()],
        ..ImageConfigEdit::default()
    };
    let config = edit
        .apply(&store.read_config(&base).expect("read the base config"))
        .expect("edit the base config");
    let mut layers: Vec<BuiltLayer> = base.layers.iter().map(BuiltLayer::from).collect();
    layers.push(added.clone());
    let built_ref = reference("lull-test/built:v1");
    let built = store
        .commit_built(&guard, &config, &layers, std::slice::from_ref(&built_ref))
        .expect("commit the built image");
    drop(guard);
    assert_eq!(built.layers.len(), base.layers.len() + 1);
    assert!(
        built
            .config
            .env
            .contains(&"GREETING=hello-from-built-image".to_owned()),
        "{:?}",
        built.config.env
    );

    // Exported as an OCI layout, other tools read it.
    let layout = scratch.path().join("layout");
    let report = store
        .export_oci_layout(built_ref.clone(), &layout, Some("v1"))
        .await
        .expect("export the built image");
    assert_eq!(report.manifest_digest, built.manifest_digest);
    let mut inspect = Command::new("skopeo");
    inspect
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:v1", layout.display()));
    let raw = run_ok(inspect, RUN_TIMEOUT);
    assert_eq!(
        Digest::of_bytes(raw.as_bytes()),
        built.manifest_digest,
        "skopeo reads back another manifest: {raw}"
    );

    let bundle = scratch.path().join("bundle");
    let mut unpack = Command::new("umoci");
    unpack
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:v1", layout.display()))
        .arg(&bundle);
    run_ok(unpack, RUN_TIMEOUT);
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/built.txt")).expect("built.txt unpacked"),
        BUILT_TEXT
    );
    no_terminal(&bundle);

    let container = RuncContainer {
        root: scratch.path().join("runc-root"),
        id: unique_name("lull-export"),
    };
    let mut run_container = container.command();
    run_container
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg(&container.id);
    let output = run_ok(run_container, RUN_TIMEOUT);
    assert_eq!(
        output,
        format!("{BUILT_TEXT}GREETING=hello-from-built-image\n")
    );
    drop(container);

    // Pushed to the registry: uploaded once, then found there; a second repository mounts
    // every blob from the first (the image is tagged with it).
    let repository = format!("lull-test/{}", unique_name("export"));
    let target = reference(&format!("{REGISTRY}/{repository}:v1"));
    let _pushed = RegistryManifestGuard {
        repository: repository.clone(),
        digest: built.manifest_digest.clone(),
    };
    let first = store
        .push(&built, &target, &options)
        .await
        .expect("push the built image");
    assert_eq!(first.manifest_digest, built.manifest_digest);
    assert!(
        first.uploaded.contains(&added.digest) && first.uploaded.contains(&built.config_digest),
        "{first:?}"
    );
    assert_eq!(
        first.uploaded.len() + first.existing.len() + first.mounted.len(),
        built.layers.len() + 1,
        "{first:?}"
    );
    let again = store
        .push(&built, &target, &options)
        .await
        .expect("push the built image again");
    assert!(again.uploaded.is_empty(), "{again:?}");
    assert_eq!(again.existing.len(), built.layers.len() + 1, "{again:?}");

    let tagged = store
        .tag(&built.manifest_digest, &target)
        .expect("tag the built image with its pushed name");
    let mirror_repository = format!("{repository}-mirror");
    let mirror = reference(&format!("{REGISTRY}/{mirror_repository}:v1"));
    let _mirrored = RegistryManifestGuard {
        repository: mirror_repository,
        digest: built.manifest_digest.clone(),
    };
    let mounted = store
        .push(&tagged, &mirror, &options)
        .await
        .expect("push the built image to a second repository");
    assert_eq!(mounted.mounted.len(), built.layers.len() + 1, "{mounted:?}");
    assert!(mounted.uploaded.is_empty(), "{mounted:?}");

    // Pulled back into a fresh store: the same manifest, config and layers.
    let fresh = ImageStore::open(scratch.path().join("fresh")).expect("open a fresh store");
    let pulled = fresh
        .pull(&target, &options)
        .await
        .expect("pull the pushed image");
    assert_eq!(pulled.manifest_digest, built.manifest_digest);
    assert_eq!(pulled.config_digest, built.config_digest);
    assert_eq!(pulled.layers, built.layers);
    assert_eq!(pulled.config, built.config);
    let pulled_mirror = fresh
        .pull(&mirror, &options)
        .await
        .expect("pull the mirrored image");
    assert_eq!(pulled_mirror.manifest_digest, built.manifest_digest);
}
