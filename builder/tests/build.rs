//! `Builder::build` end to end without root: a real image store and layer cache in a tempdir,
//! a hand-made base image, and the [`FakeSandbox`] standing in for the build's instances.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lull_builder::apprunner::AppRunnerConfig;
use lull_builder::build::{BuildError, BuildOutput, BuildRequest, Builder, BuilderSettings};
use lull_builder::sandbox::fake::{Effect, FakeSandbox};
use lull_builder::sandbox::{LogSink, SandboxLimits};
use lull_runtime::digest::Digest;
use lull_runtime::layers::{LayerCache, UnpackLimits};
use lull_runtime::store::{BuiltLayer, ImageRecord, ImageStore};
use serde_json::Value;

const APPRUNNER: &str = "version: 1.0
runtime: python3
build:
  commands:
    build:
      - pip install -r requirements.txt
      - python compile.py
run:
  pre-run:
    - python migrate.py
  command: python app.py --port 8000
  network:
    port: 8000
  env:
    - name: GREETING
      value: hello
";

const PIP: &str = "pip install -r requirements.txt";
const COMPILE: &str = "python compile.py";
const MIGRATE: &str = "python migrate.py";

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: ImageStore,
    layers: Arc<LayerCache>,
    fake: Arc<FakeSandbox>,
    builder: Builder,
    base: ImageRecord,
    logs: Arc<Mutex<Vec<String>>>,
    next: u32,
}

/// An uncompressed tar of `files`, owned by whoever runs the test (unpacking chowns).
fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let mut dirs = BTreeSet::new();
    for (path, _) in files {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_owned());
            parent = p.parent();
        }
    }
    for dir in dirs {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_uid(uid.into());
        header.set_gid(gid.into());
        header.set_size(0);
        header.set_mtime(1_000_000_000);
        tar.append_data(&mut header, &dir, std::io::empty())
            .unwrap();
    }
    for (path, contents) in files {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o755);
        header.set_uid(uid.into());
        header.set_gid(gid.into());
        header.set_size(contents.len() as u64);
        header.set_mtime(1_000_000_000);
        tar.append_data(&mut header, path, contents.as_bytes())
            .unwrap();
    }
    tar.into_inner().unwrap()
}

/// A one-layer base image committed to the store as `base:1`.
async fn base_image(store: &ImageStore) -> ImageRecord {
    let tar = tar_of(&[
        ("bin/sh", "#!fake shell\n"),
        ("etc/os-release", "ID=fake\n"),
        ("etc/ssl/certs/ca-certificates.crt", "BASE CA\n"),
    ]);
    let (digest, size) = store.blobs().ingest_bytes(&tar, None).unwrap();
    let layer = BuiltLayer {
        diff_id: digest.clone(),
        digest,
        size,
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id.to_string()] },
        "history": [{ "created_by": "fake base" }],
    });
    let guard = store.hold_ingest().await;
    store
        .commit_built(
            &guard,
            &serde_json::to_vec(&config).unwrap(),
            &[layer],
            &["base:1".parse().unwrap()],
        )
        .unwrap()
}

impl World {
    async fn new(extra_ca_certs: Vec<PathBuf>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let store = ImageStore::open(root.join("data")).unwrap();
        let layers =
            Arc::new(LayerCache::open(root.join("layers"), UnpackLimits::default()).unwrap());
        let fake = Arc::new(FakeSandbox::new(root.join("sandbox"), root.join("layers")));
        fake.on(
            PIP,
            Effect::ok()
                .print("Successfully installed flask-3.0.3")
                .write(
                    "/usr/local/lib/python3.11/site-packages/flask/__init__.py",
                    "flask",
                ),
        );
        fake.on(COMPILE, Effect::ok().write("/app/app.pyc", "compiled"));
        fake.on(MIGRATE, Effect::ok().write("/app/migrated", "yes"));
        let builder = Builder {
            store: store.clone(),
            layers: layers.clone(),
            runner: fake.clone(),
            settings: BuilderSettings {
                work_dir: root.join("builds"),
                cache_dir: root.join("build-cache"),
                extra_ca_certs,
                limits: SandboxLimits::default(),
            },
        };
        let base = base_image(&store).await;
        World {
            _dir: dir,
            root,
            store,
            layers,
            fake,
            builder,
            base,
            logs: Arc::new(Mutex::new(Vec::new())),
            next: 0,
        }
    }

    /// A fresh source tree holding `files` (the build consumes it).
    fn source(&mut self, files: &[(&str, &str)]) -> PathBuf {
        self.next += 1;
        let dir = self.root.join(format!("src-{}", self.next));
        for (path, contents) in files {
            let path = dir.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
        dir
    }

    fn request(&mut self, files: &[(&str, &str)]) -> BuildRequest {
        let source = self.source(files);
        let config = AppRunnerConfig::parse(APPRUNNER).unwrap();
        let (recipe, _) =
            lull_builder::prepare::recipe(&config, &source, &self.base.manifest_digest.to_string())
                .unwrap();
        let logs = self.logs.clone();
        let log: LogSink = Arc::new(move |line: &str| logs.lock().unwrap().push(line.to_owned()));
        BuildRequest {
            service: "web".into(),
            build_id: format!("b-{}", self.next),
            source,
            recipe,
            base: self.base.clone(),
            log,
        }
    }

    async fn build(&mut self, files: &[(&str, &str)]) -> Result<BuildOutput, BuildError> {
        let req = self.request(files);
        self.builder.build(req).await
    }

    fn config(&self, image: &ImageRecord) -> Value {
        serde_json::from_slice(&self.store.read_config(image).unwrap()).unwrap()
    }

    /// The files (not dirs) of an unpacked layer, relative to its root.
    fn layer_files(&self, diff_id: &Digest) -> BTreeSet<String> {
        let dir = self.layers.path(diff_id).expect("the layer is unpacked");
        let mut out = BTreeSet::new();
        walk(&dir, Path::new(""), &mut out);
        out
    }
}

fn walk(root: &Path, rel: &Path, out: &mut BTreeSet<String>) {
    for entry in fs::read_dir(root.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let child = rel.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            walk(root, &child, out);
        } else {
            out.insert(child.to_string_lossy().into_owned());
        }
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

const V1: &[(&str, &str)] = &[
    ("requirements.txt", "flask==3.0.3\n"),
    ("app.py", "print('v1')\n"),
    ("lib/util.py", "X = 1\n"),
];
const V2: &[(&str, &str)] = &[
    ("requirements.txt", "flask==3.0.3\n"),
    ("app.py", "print('v2')\n"),
    ("lib/util.py", "X = 1\n"),
];
const V3: &[(&str, &str)] = &[
    ("requirements.txt", "flask==3.0.3\ngunicorn==22.0.0\n"),
    ("app.py", "print('v2')\n"),
    ("lib/util.py", "X = 1\n"),
];

#[tokio::test]
async fn a_first_build_runs_every_step_and_stacks_the_layers_in_order() {
    let mut w = World::new(Vec::new()).await;
    let out = w.build(V1).await.expect("the build succeeds");
    assert_eq!(w.fake.step_names(), ["dependencies", "build", "pre-run"]);
    assert_eq!(out.dependencies_cached, Some(false));
    assert!(!out.image_cached);

    // The dependency step saw the base and the manifests, not the rest of the source.
    let runs = w.fake.runs();
    let deps = &runs[0];
    assert_eq!(deps.commands, [PIP]);
    assert!(deps.step.id.starts_with("b.b-1."), "{}", deps.step.id);
    assert!(deps.lower_files.contains("app/requirements.txt"));
    assert!(deps.lower_files.contains("bin/sh"));
    assert!(
        !deps.lower_files.contains("app/app.py"),
        "{:?}",
        deps.lower_files
    );
    assert!(!deps.lower_files.contains("app/lib/util.py"));
    // The build step saw everything below it: the installed packages and the whole source.
    let build = &runs[1];
    assert_eq!(build.commands, [COMPILE]);
    assert!(build.lower_files.contains("app/app.py"));
    assert!(build.lower_files.contains("app/lib/util.py"));
    assert!(
        build
            .lower_files
            .contains("usr/local/lib/python3.11/site-packages/flask/__init__.py")
    );
    assert!(runs[2].lower_files.contains("app/app.pyc"));
    // The base's env first, then the build's; the package cache bound in.
    let env = &deps.step.env;
    assert_eq!(
        env[0],
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())
    );
    assert!(
        deps.step
            .binds
            .iter()
            .any(|b| b.destination == Path::new("/root/.cache/pip")
                && !b.read_only
                && b.source.starts_with(w.root.join("build-cache/downloads"))),
        "{:?}",
        deps.step.binds
    );
    // Each step's instance is removed, with its dirs.
    let ids: Vec<String> = runs.iter().map(|r| r.step.id.clone()).collect();
    assert_eq!(w.fake.removed(), ids);
    assert!(runs.iter().all(|r| !r.upper.exists()));

    // Layers: base, manifests, dependencies, source, build, pre-run.
    let image = &out.image;
    assert_eq!(image.layers.len(), 6);
    assert_eq!(image.layers[0].digest, w.base.layers[0].digest);
    let files: Vec<BTreeSet<String>> = image
        .layers
        .iter()
        .map(|l| w.layer_files(&l.diff_id))
        .collect();
    assert_eq!(files[1], set(&["app/requirements.txt"]));
    assert_eq!(
        files[2],
        set(&["usr/local/lib/python3.11/site-packages/flask/__init__.py"])
    );
    assert_eq!(
        files[3],
        set(&["app/app.py", "app/lib/util.py", "app/requirements.txt"])
    );
    assert_eq!(files[4], set(&["app/app.pyc"]));
    assert_eq!(files[5], set(&["app/migrated"]));
    let reported: Vec<(&str, bool)> = out
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.layer.is_some()))
        .collect();
    assert_eq!(
        reported,
        [
            ("source", true),
            ("dependencies", true),
            ("build", true),
            ("pre-run", true)
        ]
    );

    // The config: the base's env with the runtime's and PORT, /app, the command, the port, labels, history.
    let config = w.config(image);
    let run = &config["config"];
    let env: Vec<&str> = run["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"PATH=/usr/local/bin:/usr/bin:/bin"),
        "{env:?}"
    );
    assert!(env.contains(&"PORT=8000"), "{env:?}");
    assert!(
        env.contains(&"PYTHONUNBUFFERED=1"),
        "the runtime's env: {env:?}"
    );
    // run.env is the service's (the daemon puts it in the spec), not baked into the image.
    assert!(!env.iter().any(|e| e.starts_with("GREETING=")), "{env:?}");
    assert_eq!(run["WorkingDir"], "/app");
    assert_eq!(
        run["Cmd"],
        serde_json::json!(["python", "app.py", "--port", "8000"])
    );
    assert_eq!(run["Entrypoint"], serde_json::json!([]));
    assert!(run["ExposedPorts"].get("8000/tcp").is_some(), "{run}");
    assert_eq!(run["Labels"]["lull.runtime"], "python311");
    assert_eq!(
        run["Labels"]["org.opencontainers.image.base.digest"],
        w.base.manifest_digest.to_string()
    );
    let history: Vec<&str> = config["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["created_by"].as_str().unwrap())
        .collect();
    assert_eq!(
        history,
        [
            "fake base",
            "lull build: manifests",
            "lull build: dependencies",
            "lull build: source",
            "lull build: build",
            "lull build: pre-run"
        ]
    );
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 6);

    // The store has it under its tag and the reference names it by digest.
    assert_eq!(
        out.reference.to_string(),
        format!("lull.local/web@{}", image.manifest_digest)
    );
    let tagged = w
        .store
        .get(&"lull.local/web:b-1".parse().unwrap())
        .unwrap()
        .expect("tagged");
    assert_eq!(tagged.manifest_digest, image.manifest_digest);
    // The build's scratch space and the source it took over are gone.
    assert!(!w.root.join("builds/b-1").exists());
    assert!(!w.root.join("src-1").exists());
    let logs = w.logs.lock().unwrap().clone();
    assert!(
        logs.iter()
            .any(|l| l == "+ pip install -r requirements.txt"),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|l| l == "Successfully installed flask-3.0.3")
    );
}

#[tokio::test]
async fn rebuilds_reuse_the_dependency_layer_then_the_whole_image_and_a_manifest_change_reinstalls()
{
    let mut w = World::new(Vec::new()).await;
    let first = w.build(V1).await.unwrap();

    // Only code changed: the dependency layer comes from the cache.
    w.fake.clear();
    let second = w.build(V2).await.unwrap();
    assert_eq!(w.fake.step_names(), ["build", "pre-run"]);
    assert_eq!(second.dependencies_cached, Some(true));
    assert!(!second.image_cached);
    assert_ne!(second.image.manifest_digest, first.image.manifest_digest);
    assert_eq!(second.image.layers[1], first.image.layers[1], "manifests");
    assert_eq!(
        second.image.layers[2], first.image.layers[2],
        "dependencies"
    );
    assert_ne!(second.image.layers[3], first.image.layers[3], "source");
    assert_eq!(second.image.layers.len(), 6);
    // The cached dependency layer is below the build step all the same.
    assert!(
        w.fake.runs()[0]
            .lower_files
            .contains("usr/local/lib/python3.11/site-packages/flask/__init__.py")
    );

    // Nothing changed: the image is reused and nothing runs.
    w.fake.clear();
    let third = w.build(V2).await.unwrap();
    assert!(third.image_cached);
    assert_eq!(third.dependencies_cached, Some(true));
    assert!(w.fake.runs().is_empty(), "{:?}", w.fake.step_names());
    assert_eq!(third.image.manifest_digest, second.image.manifest_digest);
    assert_eq!(third.reference, second.reference);
    assert!(!w.root.join("src-3").exists(), "the source is consumed");

    // A manifest changed: the dependency step runs again, on the new manifests.
    w.fake.clear();
    let fourth = w.build(V3).await.unwrap();
    assert_eq!(w.fake.step_names(), ["dependencies", "build", "pre-run"]);
    assert_eq!(fourth.dependencies_cached, Some(false));
    assert_ne!(fourth.image.layers[1], second.image.layers[1]);
    let deps = &w.fake.runs()[0];
    let manifest = deps
        .step
        .layers
        .iter()
        .find(|l| **l == fourth.image.layers[1].diff_id.hex())
        .expect("the new manifests layer is below the dependency step");
    let manifest = w.layers.root().join(manifest).join("app/requirements.txt");
    assert!(fs::read_to_string(manifest).unwrap().contains("gunicorn"));
}

#[tokio::test]
async fn a_failing_command_fails_the_build_with_its_exit_code_and_last_lines() {
    let mut w = World::new(Vec::new()).await;
    w.fake.on(
        COMPILE,
        Effect::ok()
            .write("/app/half-done", "x")
            .print("  File \"compile.py\", line 1")
            .print("SyntaxError: invalid syntax")
            .exit(2),
    );
    let images_before = w.store.list().unwrap().len();
    let err = w.build(V1).await.expect_err("the build fails");
    let BuildError::Step {
        step,
        exit_code,
        timed_out,
        last_lines,
    } = &err
    else {
        panic!("not a step failure: {err}");
    };
    assert_eq!(step, "build");
    assert_eq!(*exit_code, 2);
    assert!(!timed_out);
    assert!(
        last_lines.contains(&"SyntaxError: invalid syntax".to_owned()),
        "{last_lines:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with("build step: exit code 2; last lines:\n"),
        "{message}"
    );
    assert!(message.contains("SyntaxError"), "{message}");

    // The pre-run step never ran; no image; every instance and scratch dir is gone.
    assert_eq!(w.fake.step_names(), ["dependencies", "build"]);
    assert_eq!(w.store.list().unwrap().len(), images_before);
    let ids: Vec<String> = w.fake.runs().iter().map(|r| r.step.id.clone()).collect();
    assert_eq!(w.fake.removed(), ids);
    assert!(w.fake.runs().iter().all(|r| !r.upper.exists()));
    assert!(!w.root.join("builds/b-1").exists());
    assert!(!w.root.join("src-1").exists());
    assert_eq!(
        fs::read_dir(w.root.join("builds")).unwrap().count(),
        0,
        "scratch left in the work dir"
    );

    // A step past its deadline says so.
    w.fake
        .on(COMPILE, Effect::ok().print("still compiling").time_out());
    let err = w.build(V1).await.expect_err("the build fails");
    assert!(
        matches!(
            &err,
            BuildError::Step {
                timed_out: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().starts_with("build step: timed out"),
        "{err}"
    );

    // A command the table does not know fails like a shell would.
    w.fake.on(COMPILE, Effect::ok());
    let mut req = w.request(V1);
    req.recipe.build.push("make everything".into());
    let err = w.builder.build(req).await.expect_err("the build fails");
    assert!(
        matches!(&err, BuildError::Step { exit_code: 127, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_step_that_writes_nothing_adds_no_layer() {
    let mut w = World::new(Vec::new()).await;
    w.fake.on(MIGRATE, Effect::ok().print("nothing to migrate"));
    let out = w.build(V1).await.unwrap();
    assert_eq!(w.fake.step_names(), ["dependencies", "build", "pre-run"]);
    assert_eq!(
        out.image.layers.len(),
        5,
        "base, manifests, deps, source, build"
    );
    let pre_run = out.steps.iter().find(|s| s.name == "pre-run").unwrap();
    assert_eq!(pre_run.layer, None);
    let history: Vec<Value> = w.config(&out.image)["history"].as_array().unwrap().clone();
    assert_eq!(history.len(), 5);
    assert_eq!(history[4]["created_by"], "lull build: build");

    // A dependency step that installs nothing: no layer and nothing cached, so it runs again.
    let mut w = World::new(Vec::new()).await;
    w.fake.on(PIP, Effect::ok());
    let out = w.build(V1).await.unwrap();
    assert_eq!(
        out.image.layers.len(),
        5,
        "base, manifests, source, build, pre-run"
    );
    w.fake.clear();
    w.build(V2).await.unwrap();
    assert_eq!(w.fake.step_names(), ["dependencies", "build", "pre-run"]);
}

#[tokio::test]
async fn bind_destinations_and_network_files_stay_out_of_the_layers() {
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("corp-ca.pem");
    fs::write(&extra, "CORP CA\n").unwrap();
    let mut w = World::new(vec![extra]).await;
    w.fake.on(
        PIP,
        Effect::ok()
            .write(
                "/usr/local/lib/python3.11/site-packages/flask/__init__.py",
                "flask",
            )
            .write("/root/.cache/pip/http/abc", "downloaded")
            .write("/etc/resolv.conf", "nameserver 10.0.0.1\n")
            .write("/etc/hosts", "127.0.0.1 localhost\n")
            .write("/etc/ssl/certs/ca-certificates.crt", "overwritten\n"),
    );
    let out = w.build(V1).await.unwrap();
    let deps = w.layer_files(&out.image.layers[2].diff_id);
    assert_eq!(
        deps,
        set(&["usr/local/lib/python3.11/site-packages/flask/__init__.py"])
    );

    // The CA bundle: the base's own, then the extra CAs, mounted read-only; tools pointed at it.
    let run = &w.fake.runs()[0];
    let bundle = run
        .step
        .binds
        .iter()
        .find(|b| b.destination == Path::new("/etc/ssl/certs/ca-certificates.crt"))
        .expect("the CA bundle is bound");
    assert!(bundle.read_only);
    assert!(run.step.env.contains(&(
        "SSL_CERT_FILE".into(),
        "/etc/ssl/certs/ca-certificates.crt".into()
    )));
    let content = String::from_utf8(run.bound_files[&bundle.destination].clone()).unwrap();
    assert!(content.starts_with("BASE CA\n"), "{content:?}");
    assert!(content.contains("CORP CA\n"), "{content:?}");
    // The bundle lived in the build's scratch dir, gone with it.
    assert!(!bundle.source.exists());
    let image_files: BTreeSet<String> = out
        .image
        .layers
        .iter()
        .skip(1)
        .flat_map(|l| w.layer_files(&l.diff_id))
        .collect();
    assert!(
        !image_files.iter().any(|f| f.starts_with("etc/")),
        "{image_files:?}"
    );
}
