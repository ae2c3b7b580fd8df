//! Source builds through the admin socket, without root: uploads, build bodies refused with the
//! field at fault, and an upload built (the builder's `FakeSandbox` runs the steps, on a real
//! image store and layer cache) then deployed on the fake host.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::Method;
use lull_builder::build::{Builder, BuilderSettings};
use lull_builder::capture::{CaptureOptions, LAYER_MEDIA_TYPE, capture_layer};
use lull_builder::sandbox::SandboxLimits;
use lull_builder::sandbox::fake::{Effect, FakeSandbox};
use lull_builder::source::pack_source;
use lull_daemon::api::server::{self, SocketOptions};
use lull_daemon::api::{Client, ErrorCode};
use lull_daemon::control::build::Builds;
use lull_daemon::control::planner::SpecPlanner;
use lull_daemon::control::{Control, handlers};
use lull_daemon::engine::Engine;
use lull_daemon::host::fake::FakeHost;
use lull_daemon::store::{SqliteStore, Store};
use lull_daemon::testing::{InProcess, test_settings};
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use lull_runtime::digest::Digest;
use lull_runtime::layers::{LayerCache, UnpackLimits};
use lull_runtime::pull::PullOptions;
use lull_runtime::store::{BuiltLayer, ImageStore};
use serde_json::{Value, json};

const BASE: &str = "base.test/lull/python:3.11";

struct Daemon {
    client: Client,
    data: std::path::PathBuf,
    fake: Arc<FakeSandbox>,
    store: ImageStore,
    _proxy: Proxy,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

/// A one-layer base image committed to the store as [`BASE`] (captured from a dir, so its
/// files are owned by whoever runs the test: unpacking it needs no root).
async fn base_image(store: &ImageStore, scratch: &Path) {
    let root = scratch.join("base-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/sh"), "shell").unwrap();
    let mut pending = store.blobs().begin().unwrap();
    let options = CaptureOptions {
        exclude: Vec::new(),
        mtime: 1_000_000_000,
    };
    let captured = capture_layer(&root, &[], &options, &mut pending).unwrap();
    let digest: Digest = captured.digest.parse().unwrap();
    let (digest, size) = pending.commit(Some(&digest), Some(captured.size)).unwrap();
    let layer = BuiltLayer {
        digest,
        diff_id: captured.diff_id.parse().unwrap(),
        size,
        media_type: LAYER_MEDIA_TYPE.into(),
    };
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": [layer.diff_id.to_string()] },
    });
    let guard = store.hold_ingest().await;
    store
        .commit_built(
            &guard,
            &serde_json::to_vec(&config).unwrap(),
            &[layer],
            &[BASE.parse().unwrap()],
        )
        .unwrap();
}

async fn daemon() -> Daemon {
    daemon_with(lull_daemon::control::build::DEFAULT_MAX_UPLOAD).await
}

/// The control plane over the fake host, as [`InProcess`] starts it, with builds taking
/// uploads up to `max_upload` bytes.
async fn daemon_with(max_upload: u64) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = root.join("data");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&data).unwrap());
    let routes = Arc::new(RouteTable::new());
    let proxy = Proxy::new(routes.clone(), ProxyOptions::default());
    let proxy_addr = proxy
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let planner = Arc::new(SpecPlanner {
        store: store.clone(),
        key: None,
        base_domain: None,
    });
    let engine = Engine::new(
        Arc::new(FakeHost::new()),
        store.clone(),
        routes,
        planner,
        test_settings(),
    );

    let images = ImageStore::open(root.join("images")).unwrap();
    base_image(&images, root).await;
    let layers = Arc::new(LayerCache::open(root.join("layers"), UnpackLimits::default()).unwrap());
    let fake = Arc::new(FakeSandbox::new(root.join("sandbox"), root.join("layers")));
    fake.on(
        "pip install -r requirements.txt",
        Effect::ok()
            .print("Successfully installed flask")
            .write("/usr/lib/python3/flask/__init__.py", "flask"),
    );
    fake.on(
        "python -m compileall .",
        Effect::ok().write("/app/app.pyc", "x"),
    );
    let builder = Builder {
        store: images.clone(),
        layers,
        runner: fake.clone(),
        settings: BuilderSettings {
            work_dir: data.join("builds"),
            cache_dir: data.join("build-cache"),
            extra_ca_certs: Vec::new(),
            limits: SandboxLimits::default(),
        },
    };
    let base_images = BTreeMap::from([("python311".to_owned(), BASE.to_owned())]);
    let mut builds = Builds::new(builder, base_images, PullOptions::default(), &data);
    builds.max_upload = max_upload;
    let control = Arc::new(Control {
        store,
        engine,
        base_domain: None,
        http_port: Some(proxy_addr.port()),
        key: None,
        builds: Some(Arc::new(builds)),
        tls: None,
    });
    let socket = root.join("lull.sock");
    let listener = server::bind(&SocketOptions::new(&socket)).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(server::serve(
        listener,
        Arc::new(handlers::router()),
        control,
        stopped,
    ));
    Daemon {
        client: Client::new(&socket),
        data,
        fake,
        store: images,
        _proxy: proxy,
        _stop: stop,
        _dir: dir,
    }
}

/// A tar of `files` (packed as the CLI packs a folder), written to `path`.
fn write_tar(path: &Path, files: &[(&str, &str)]) {
    let dir = path.with_extension("d");
    let _ = std::fs::remove_dir_all(&dir);
    for (name, contents) in files {
        let file = dir.join(name);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, contents).unwrap();
    }
    let out = std::fs::File::create(path).unwrap();
    pack_source(&dir, out).unwrap();
}

async fn upload(client: &Client, dir: &Path, files: &[(&str, &str)]) -> String {
    let path = dir.join("source.tar");
    write_tar(&path, files);
    let file = tokio::fs::File::open(&path).await.unwrap();
    let answer: Value = client
        .upload("/v1/uploads", "application/x-tar", file)
        .await
        .expect("the upload is stored");
    assert!(answer["bytes"].as_u64().unwrap() > 0, "{answer}");
    assert!(
        answer["digest"].as_str().unwrap().starts_with("sha256:"),
        "{answer}"
    );
    answer["upload"].as_str().unwrap().to_owned()
}

/// Follows an operation to its end; returns its lines and the end.
async fn follow(client: &Client, op: &str) -> (Vec<String>, Value) {
    let mut lines = client
        .stream(
            Method::GET,
            &format!("/v1/operations/{op}/progress"),
            None::<&()>,
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(v) = lines.next().await.unwrap() {
        if let Some(line) = v.get("line") {
            out.push(line.as_str().unwrap().to_owned());
        } else if let Some(end) = v.get("end") {
            return (out, end.clone());
        }
    }
    panic!("operation {op} ended without an end: {out:?}");
}

async fn build_error(client: &Client, service: &str, body: Value) -> lull_daemon::api::ApiError {
    let err = client
        .call::<_, Value>(
            Method::POST,
            &format!("/v1/services/{service}/builds"),
            Some(&body),
        )
        .await
        .expect_err("refused");
    err.api().expect("an API error").clone()
}

const APPRUNNER: &str = "version: 1.0
runtime: python3
build:
  commands:
    build:
      - pip install -r requirements.txt
      - python -m compileall .
run:
  command: python app.py
  network:
    port: 8000
";

#[tokio::test]
async fn without_builds_the_build_routes_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let plane = InProcess::start(dir.path()).await;
    let err = build_error(
        &plane.client,
        "web",
        json!({"source": {"upload": "up-000000000000"}, "create": true}),
    )
    .await;
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(
        err.message.contains("does not build from source"),
        "{}",
        err.message
    );
    let path = dir.path().join("x.tar");
    write_tar(&path, &[("a", "b")]);
    // Refused before the body is read, which is drained so the client gets the answer (a
    // race once: repeated to catch it).
    for _ in 0..10 {
        let file = tokio::fs::File::open(&path).await.unwrap();
        let err = plane
            .client
            .upload::<Value>("/v1/uploads", "application/x-tar", file)
            .await
            .expect_err("refused");
        assert_eq!(
            err.api().map(|e| e.code),
            Some(ErrorCode::Conflict),
            "{err:?}"
        );
    }
    for route in ["/v1/images/push"] {
        let err = plane
            .client
            .call::<_, Value>(
                Method::POST,
                route,
                Some(&json!({"service": "web", "dir": "/tmp/x", "target": "r.test/x:1"})),
            )
            .await
            .expect_err("refused");
        assert_eq!(err.api().unwrap().code, ErrorCode::Conflict, "{route}");
    }
}

#[tokio::test]
async fn build_bodies_are_refused_with_the_field_at_fault() {
    let d = daemon().await;
    let cases = [
        (json!({"create": true}), "source"),
        (
            json!({"source": {"upload": "up-1"}, "create": true, "colour": "blue"}),
            "colour",
        ),
        (json!({"source": {"zip": "x"}, "create": true}), "source"),
        (
            json!({"source": {"git": {"url": "https://e.test/r.git", "branch": "main"}}, "create": true}),
            "source.git.branch",
        ),
        (
            json!({"source": {"upload": 7}, "create": true}),
            "source.upload",
        ),
        (
            json!({"source": {"upload": "up-000000000000"}, "create": true}),
            "source.upload",
        ),
        (
            json!({"source": {"upload": "../../etc/passwd"}, "create": true}),
            "source.upload",
        ),
        (
            json!({"source": {"git": {"url": "https://user:token@e.test/r.git"}}, "create": true}),
            "source.git.url",
        ),
        (
            json!({"source": {"git": {"url": "--upload-pack=touch /tmp/x"}}, "create": true}),
            "source.git.url",
        ),
        (
            json!({"source": {"git": {"url": "https://e.test/r.git", "ref": "--output=/x"}}, "create": true}),
            "source.git.ref",
        ),
    ];
    for (body, field) in cases {
        let err = build_error(&d.client, "web", body.clone()).await;
        assert_eq!(err.code, ErrorCode::InvalidRequest, "{body}: {err:?}");
        let fields: Vec<&str> = err.fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, [field], "{body}: {err:?}");
    }
    // Credentials never come back in the error.
    let err = build_error(
        &d.client,
        "web",
        json!({"source": {"git": {"url": "https://user:token@e.test/r.git"}}, "create": true}),
    )
    .await;
    assert!(!format!("{err:?}").contains("token"), "{err:?}");
    // Nothing ran and no service was made.
    assert!(d.fake.runs().is_empty());
    let err = d
        .client
        .get::<Value>("/v1/services/web")
        .await
        .expect_err("no service");
    assert_eq!(err.api().unwrap().code, ErrorCode::NotFound);
    // Without "create", a service that does not exist is not found.
    let id = upload(&d.client, d._dir.path(), &[("apprunner.yaml", APPRUNNER)]).await;
    let err = build_error(&d.client, "web", json!({"source": {"upload": id}})).await;
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");
}

#[tokio::test]
async fn an_uploaded_source_is_built_then_deployed() {
    let d = daemon().await;
    let files = [
        ("apprunner.yaml", APPRUNNER),
        ("requirements.txt", "flask\n"),
        ("app.py", "print('hi')\n"),
    ];
    let id = upload(&d.client, d._dir.path(), &files).await;
    let answer: Value = d
        .client
        .call(
            Method::POST,
            "/v1/services/web/builds",
            Some(&json!({"source": {"upload": id}, "create": true})),
        )
        .await
        .expect("the build starts");
    assert_eq!(answer["service"], "web");
    let op = answer["operation"].as_str().unwrap().to_owned();
    let (lines, end) = follow(&d.client, &op).await;
    assert_eq!(end["state"], "succeeded", "{end}\n{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l == "Successfully installed flask"),
        "{lines:#?}"
    );
    assert_eq!(d.fake.step_names(), ["dependencies", "build"]);

    // The service runs the built image, by digest.
    let service: Value = d.client.get("/v1/services/web").await.unwrap();
    assert_eq!(service["revision"], 1, "{service}");
    let reference = service["spec"]["source"]["reference"].as_str().unwrap();
    assert!(reference.starts_with("lull.local/web@sha256:"), "{service}");
    let image = d
        .store
        .get(&reference.parse().unwrap())
        .unwrap()
        .expect("the image is in the store");
    assert_eq!(image.config.cmd, ["python", "app.py"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/app"));

    // The upload was used once.
    let err = build_error(&d.client, "web", json!({"source": {"upload": id}})).await;
    assert_eq!(err.fields[0].field, "source.upload", "{err:?}");

    // The same source again: nothing runs, nothing changes.
    d.fake.clear();
    let id = upload(&d.client, d._dir.path(), &files).await;
    let answer: Value = d
        .client
        .call(
            Method::POST,
            "/v1/services/web/builds",
            Some(&json!({"source": {"upload": id}})),
        )
        .await
        .unwrap();
    let (lines, end) = follow(&d.client, answer["operation"].as_str().unwrap()).await;
    assert_eq!(end["state"], "succeeded", "{end}\n{}", lines.join("\n"));
    assert!(d.fake.runs().is_empty(), "{:?}", d.fake.step_names());
    assert!(
        lines.iter().any(|l| l.contains("already runs this image")),
        "{lines:#?}"
    );
    let service: Value = d.client.get("/v1/services/web").await.unwrap();
    assert_eq!(service["revision"], 1);

    // A failing build leaves the service as it was.
    d.fake.on(
        "python -m compileall .",
        Effect::ok().print("SyntaxError: bad").exit(1),
    );
    let id = upload(
        &d.client,
        d._dir.path(),
        &[
            ("apprunner.yaml", APPRUNNER),
            ("requirements.txt", "flask\n"),
            ("app.py", "print(\n"),
        ],
    )
    .await;
    let answer: Value = d
        .client
        .call(
            Method::POST,
            "/v1/services/web/builds",
            Some(&json!({"source": {"upload": id}})),
        )
        .await
        .unwrap();
    let (lines, end) = follow(&d.client, answer["operation"].as_str().unwrap()).await;
    assert_ne!(end["state"], "succeeded", "{end}");
    assert!(
        end.to_string().contains("exit code 1"),
        "{end}\n{}",
        lines.join("\n")
    );
    let service: Value = d.client.get("/v1/services/web").await.unwrap();
    assert_eq!(service["revision"], 1);
    assert_eq!(service["spec"]["source"]["reference"], reference);
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_and_not_kept() {
    let d = daemon_with(4096).await;
    let big = "x".repeat(64 << 10);
    for _ in 0..5 {
        let path = d._dir.path().join("big.tar");
        write_tar(&path, &[("apprunner.yaml", APPRUNNER), ("blob.bin", &big)]);
        let file = tokio::fs::File::open(&path).await.unwrap();
        let err = d
            .client
            .upload::<Value>("/v1/uploads", "application/x-tar", file)
            .await
            .expect_err("refused");
        let api = err
            .api()
            .unwrap_or_else(|| panic!("not the daemon's answer: {err:?}"));
        assert_eq!(api.code, ErrorCode::PayloadTooLarge);
        assert!(api.message.contains("4096 bytes"), "{}", api.message);
    }
    let kept: Vec<_> = std::fs::read_dir(d.data.join("uploads")).unwrap().collect();
    assert!(kept.is_empty(), "{kept:?}");
    // An upload within the limit is taken.
    upload(&d.client, d._dir.path(), &[("apprunner.yaml", APPRUNNER)]).await;
}
