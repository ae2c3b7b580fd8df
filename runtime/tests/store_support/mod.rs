//! Shared fixtures for the image store tests: OCI layouts built in the test, a real
//! `docker-registry` per test on a free loopback port, skopeo, and a bearer-token front proxy.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use lull_runtime::digest::Digest;
use serde_json::json;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_PLAIN: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A layer as written into the layout.
#[derive(Debug, Clone)]
pub struct TestLayer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub digest: Digest,
    pub diff_id: Digest,
    pub media_type: &'static str,
}

/// One platform image written into a layout.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub architecture: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub layers: Vec<TestLayer>,
}

/// A tar with the given regular files (deterministic headers).
pub fn make_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *content).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

pub fn layer_gzip(files: &[(&str, &[u8])]) -> TestLayer {
    let tar = make_tar(files);
    let blob = gzip(&tar);
    TestLayer {
        digest: Digest::of_bytes(&blob),
        diff_id: Digest::of_bytes(&tar),
        tar,
        blob,
        media_type: LAYER_GZIP,
    }
}

pub fn layer_zstd(files: &[(&str, &[u8])]) -> TestLayer {
    let tar = make_tar(files);
    let blob = zstd::encode_all(&tar[..], 3).unwrap();
    TestLayer {
        digest: Digest::of_bytes(&blob),
        diff_id: Digest::of_bytes(&tar),
        tar,
        blob,
        media_type: LAYER_ZSTD,
    }
}

pub fn layer_plain(files: &[(&str, &[u8])]) -> TestLayer {
    let tar = make_tar(files);
    TestLayer {
        digest: Digest::of_bytes(&tar),
        diff_id: Digest::of_bytes(&tar),
        blob: tar.clone(),
        tar,
        media_type: LAYER_PLAIN,
    }
}

/// An OCI image layout under construction.
pub struct Layout {
    pub dir: PathBuf,
    entries: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_owned(),
            entries: Vec::new(),
        }
    }

    pub fn write_blob(&self, bytes: &[u8]) -> Digest {
        let digest = Digest::of_bytes(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(digest.hex()), bytes).unwrap();
        digest
    }

    /// Writes config, layers and manifest blobs for one platform image.
    pub fn add_image(&self, architecture: &str, layers: Vec<TestLayer>) -> TestImage {
        let config = serde_json::to_vec(&json!({
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/app"],
                "Cmd": ["--serve"],
                "Env": ["PATH=/usr/bin:/bin", format!("ARCH={architecture}")],
                "WorkingDir": "/srv",
                "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}},
                "Labels": {"org.example.arch": architecture},
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            },
        }))
        .unwrap();
        let config_digest = self.write_blob(&config);
        for layer in &layers {
            self.write_blob(&layer.blob);
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config.len()},
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.blob.len(),
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let manifest_digest = self.write_blob(&manifest);
        TestImage {
            architecture: architecture.to_owned(),
            manifest,
            manifest_digest,
            config,
            config_digest,
            layers,
        }
    }

    /// Names a single-platform image in index.json.
    pub fn tag_image(&mut self, name: &str, image: &TestImage) {
        self.entries.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest_digest.to_string(),
            "size": image.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
        self.write_index();
    }

    /// Writes a nested index over `images` and names it in index.json; returns its digest.
    pub fn tag_index(&mut self, name: &str, images: &[&TestImage]) -> Digest {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": images.iter().map(|i| json!({
                "mediaType": OCI_MANIFEST,
                "digest": i.manifest_digest.to_string(),
                "size": i.manifest.len(),
                "platform": {"os": "linux", "architecture": i.architecture},
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let digest = self.write_blob(&index);
        self.entries.push(json!({
            "mediaType": OCI_INDEX,
            "digest": digest.to_string(),
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }));
        self.write_index();
        digest
    }

    fn write_index(&self) {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": self.entries,
        }))
        .unwrap();
        std::fs::write(self.dir.join("index.json"), index).unwrap();
    }
}

/// The standard two-layer test image (gzip + zstd) for `architecture`.
pub fn two_layer_image(layout: &Layout, architecture: &str) -> TestImage {
    let base = layer_gzip(&[
        ("etc/os-release", b"ID=lull-test\n"),
        (
            "srv/hello.txt",
            format!("hello from {architecture}\n").as_bytes(),
        ),
    ]);
    let app = layer_zstd(&[(
        "bin/app",
        format!("#!/bin/sh\necho {architecture}\n").as_bytes(),
    )]);
    layout.add_image(architecture, vec![base, app])
}

/// A loopback port free now, below the kernel's ephemeral range (which starts at 32768), so
/// no other test's outgoing connection can take it before the registry binds it.
fn free_port() -> u16 {
    (0..1000)
        .map(|_| {
            let mut bytes = [0u8; 2];
            getrandom::fill(&mut bytes).unwrap();
            16384 + u16::from_le_bytes(bytes) % 16000
        })
        .find(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port among 1000 tried in 16384..32384")
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "docker-registry exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on port {port} within 20 s");
}

/// A docker-registry process on a free loopback port; killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// Username and password of the htpasswd registry.
pub const BASIC_USER: &str = "alice";
pub const BASIC_PASSWORD: &str = "lull-secret";
/// bcrypt (cost 4) of BASIC_PASSWORD, as docker-registry's htpasswd wants.
const BASIC_BCRYPT: &str = "$2b$04$JHIC1oXfI/uhFvrzVIqM7.T82ov8FRNIFxzR48Q/U9DzdKyPNojC.";

impl Registry {
    pub fn start() -> Registry {
        Registry::start_with(false)
    }

    pub fn start_with_htpasswd() -> Registry {
        Registry::start_with(true)
    }

    fn start_with(htpasswd: bool) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lull-registry-{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if htpasswd {
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{BASIC_USER}:{BASIC_BCRYPT}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lull-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("registry.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("docker-registry must be installed");
        wait_for_port(port, &mut child, &log);
        Registry {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs skopeo with a copy of the host's policy bypassed; panics with its output on failure.
pub fn skopeo(args: &[&str]) {
    let output = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("skopeo must be installed");
    assert!(
        output.status.success(),
        "skopeo {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Pushes `oci:<layout>:<name>` to `docker://<host>/<repo_tag>`.
pub fn push(layout: &Path, name: &str, host: &str, repo_tag: &str, extra: &[&str]) {
    let src = format!("oci:{}:{name}", layout.display());
    let dst = format!("docker://{host}/{repo_tag}");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(&src);
    args.push(&dst);
    skopeo(&args);
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn full(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// What the token proxy saw.
#[derive(Default)]
pub struct ProxyStats {
    pub tokens_issued: AtomicUsize,
    pub tokens_refused: AtomicUsize,
    pub forwarded: AtomicUsize,
    pub challenged: AtomicUsize,
}

struct ProxyState {
    backend: u16,
    port: u16,
    user: String,
    password: String,
    tokens: Mutex<HashSet<String>>,
    stats: Arc<ProxyStats>,
}

/// A bearer-token front for a registry: `/token` issues tokens for basic credentials, `/v2/..`
/// requests need a token and are forwarded to the backend registry. Stops on drop.
pub struct TokenProxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenProxy {
    pub async fn start(backend: u16, user: &str, password: &str) -> TokenProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(ProxyStats::default());
        let state = Arc::new(ProxyState {
            backend,
            port,
            user: user.to_owned(),
            password: password.to_owned(),
            tokens: Mutex::new(HashSet::new()),
            stats: stats.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, hyper::Error>(handle(req, state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenProxy { port, stats, task }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn handle(req: Request<Incoming>, state: Arc<ProxyState>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if path == "/token" {
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", state.user, state.password))
        );
        let query = req.uri().query().unwrap_or("");
        if authorization != expected || !query.contains("service=lull-test") {
            state.stats.tokens_refused.fetch_add(1, Ordering::SeqCst);
            return full(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid username or password"}]}"#,
            );
        }
        let n = state.stats.tokens_issued.fetch_add(1, Ordering::SeqCst);
        let token = format!("lull-token-{n}-{}", std::process::id());
        state.tokens.lock().unwrap().insert(token.clone());
        let body = json!({"token": token, "access_token": token, "expires_in": 300});
        return full(StatusCode::OK, &body.to_string());
    }
    let valid = authorization
        .strip_prefix("Bearer ")
        .is_some_and(|t| state.tokens.lock().unwrap().contains(t));
    if !valid {
        state.stats.challenged.fetch_add(1, Ordering::SeqCst);
        let mut response = full(
            StatusCode::UNAUTHORIZED,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        );
        let challenge = format!(
            "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"lull-test\",scope=\"repository:app:pull\"",
            state.port
        );
        response
            .headers_mut()
            .insert(hyper::header::WWW_AUTHENTICATE, challenge.parse().unwrap());
        return response;
    }
    state.stats.forwarded.fetch_add(1, Ordering::SeqCst);
    match forward(req, state.backend).await {
        Ok(response) => response.map(|b| b.boxed()),
        Err(e) => full(StatusCode::BAD_GATEWAY, &format!("proxy error: {e}")),
    }
}

async fn forward(
    mut req: Request<Incoming>,
    backend: u16,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let addr: SocketAddr = ([127, 0, 0, 1], backend).into();
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    req.headers_mut().remove(hyper::header::AUTHORIZATION);
    Ok(sender.send_request(req).await?)
}
