//! The proxy's HTTP layer end to end, in-process: small upstream servers built here, real
//! clients (hyper's, curl, raw sockets) in front.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lull_proxy::access_log::{AccessEntry, AccessLog};
use lull_proxy::config::{ServiceConfig, UpstreamProtocol};
use lull_proxy::gate::NoCpuControl;
use lull_proxy::pool::{InstanceSpec, Pool};
use lull_proxy::{Proxy, ProxyOptions, Route, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestBody = UnsyncBoxBody<Bytes, BoxError>;
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<TestBody>> + Send>>
        + Send
        + Sync,
>;

const HOST: &str = "app.test";

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into())
        .map_err(|n| match n {})
        .boxed_unsync()
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// An upstream app on a loopback port: HTTP/1.1 and h2c, upgrades allowed.
struct Upstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream(h: Handler) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, task }
}

/// Replies with what it received: method, version, headers (as JSON), body length.
fn echo() -> Handler {
    handler(|req: Request<Incoming>| async move {
        let version = format!("{:?}", req.version());
        let method = req.method().to_string();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let mut headers: HashMap<String, String> = HashMap::new();
        for (k, v) in req.headers() {
            headers.insert(k.to_string(), v.to_str().unwrap_or("").to_string());
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let json = serde_json::json!({
            "version": version, "method": method, "path": path,
            "headers": headers, "body_len": body.len(),
        });
        let mut resp = Response::new(full(json.to_string()));
        let h = resp.headers_mut();
        h.insert("server", "app-server/1".parse().unwrap());
        h.insert("connection", "x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-app", "kept".parse().unwrap());
        resp
    })
}

struct Setup {
    proxy: Proxy,
    addr: SocketAddr,
    pool: Arc<Pool>,
    _events: tokio::sync::mpsc::UnboundedReceiver<lull_proxy::pool::PoolEvent>,
    log_dir: tempfile::TempDir,
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// The access log once it holds at least `count` lines (a request is logged as its last
    /// bytes go to the client, so a client may read its answer a moment before the line).
    async fn log_entries(&self, count: usize) -> Vec<AccessEntry> {
        let path = self.log_dir.path().join("app.log");
        let started = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // Whole lines only: the last one may be on its way.
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let entries: Vec<AccessEntry> = whole
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if entries.len() >= count || started.elapsed() > Duration::from_secs(5) {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn setup_with(
    config: ServiceConfig,
    instances: &[SocketAddr],
    options: ProxyOptions,
) -> Setup {
    config.validate().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pool = Pool::new("app", Arc::new(config), tx);
    for (n, addr) in instances.iter().enumerate() {
        let id = format!("i{n}");
        pool.add_instance(InstanceSpec {
            id: id.clone(),
            addr: *addr,
            cpu: Arc::new(NoCpuControl),
        });
        pool.set_healthy(&id, true, "test");
    }
    let log_dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AccessLog::open(&log_dir.path().join("app.log"), None).unwrap());
    let routes = Arc::new(RouteTable::new());
    routes.insert(HOST, Route::new(pool.clone(), "rev-7").with_access_log(log));
    let proxy = Proxy::new(routes, options);
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Setup {
        proxy,
        addr,
        pool,
        _events: rx,
        log_dir,
    }
}

async fn setup(config: ServiceConfig, instances: &[SocketAddr]) -> Setup {
    setup_with(config, instances, ProxyOptions::default()).await
}

fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build_http()
}

fn get(url: &str) -> Request<TestBody> {
    let mut req = request("GET", url);
    req.headers_mut()
        .insert("host", http::HeaderValue::from_static(HOST));
    req
}

async fn text(resp: Response<Incoming>) -> String {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

async fn curl(args: &[&str]) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_rewritten_and_the_request_is_logged() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let req = Request::get(s.url("/p?q=1"))
        .header("host", "App.Test:8080")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-secret")
        .header("x-secret", "drop me")
        .header("proxy-authorization", "Basic eA==")
        .header("te", "trailers")
        .header("x-client", "kept")
        .body(full("hello"))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rh = resp.headers().clone();
    let seen: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "App.Test:8080");
    assert_eq!(h["host"], "App.Test:8080");
    assert_eq!(
        h["forwarded"],
        "for=127.0.0.1;proto=http;host=App.Test:8080"
    );
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["x-client"], "kept");
    assert!(h.get("x-secret").is_none(), "{h}");
    assert!(h.get("proxy-authorization").is_none(), "{h}");
    let id = h["x-request-id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(seen["path"], "/p?q=1");
    assert_eq!(seen["body_len"], 5);
    // The app's own headers come back untouched; its hop-by-hop ones do not.
    assert_eq!(rh["server"], "app-server/1");
    assert_eq!(rh["x-app"], "kept");
    assert!(!rh.contains_key("x-hop"), "{rh:?}");
    assert!(!rh.contains_key("keep-alive"), "{rh:?}");

    // A client's own request id is kept.
    let mut req = get(&s.url("/"));
    req.headers_mut()
        .insert("x-request-id", "mine-1".parse().unwrap());
    let seen: serde_json::Value =
        serde_json::from_str(&text(client().request(req).await.unwrap()).await).unwrap();
    assert_eq!(seen["headers"]["x-request-id"], "mine-1");

    let log = s.log_entries(2).await;
    assert_eq!(log.len(), 2, "{log:?}");
    let e = &log[0];
    assert_eq!(e.request_id, id);
    assert_eq!(e.service, "app");
    assert_eq!(e.revision, "rev-7");
    assert_eq!(e.instance, "i0");
    assert_eq!(e.method, "GET");
    assert_eq!(e.host, "App.Test:8080");
    assert_eq!(e.path, "/p?q=1");
    assert_eq!(e.status, 200);
    assert_eq!(e.bytes_in, 5);
    assert!(e.bytes_out > 100, "{e:?}");
    assert!(e.client.starts_with("127.0.0.1:"), "{e:?}");
    assert!(e.time.ends_with('Z'), "{e:?}");
    assert_eq!(log[1].request_id, "mine-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_gets_a_plain_404() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let mut req = get(&s.url("/"));
    req.headers_mut()
        .insert("host", "nope.test".parse().unwrap());
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body = text(resp).await;
    assert!(
        body.contains("no service answers for host \"nope.test\""),
        "{body}"
    );
    // Routes are looked up case-insensitively, port stripped, and can change at run time.
    let mut req = get(&s.url("/"));
    req.headers_mut()
        .insert("host", "APP.test:1234".parse().unwrap());
    assert_eq!(client().request(req).await.unwrap().status(), 200);
    s.proxy.routes().remove(HOST);
    let resp = client().request(get(&s.url("/"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_and_pipelining() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let url = s.url("/ten");
    let (out, err) = curl(&["-0", "-i", "-H", "Host: app.test", &url]).await;
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}{err}"
    );
    assert!(out.contains("\"path\":\"/ten\""), "{out}");
    // The instance is spoken to in HTTP/1.1 whatever the client speaks.
    assert!(out.contains("\"version\":\"HTTP/1.1\""), "{out}");

    // Two requests in one write: both answered, in order.
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(
        b"GET /one HTTP/1.1\r\nHost: app.test\r\n\r\nGET /two HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    let one = all.find("\"path\":\"/one\"").expect(&all);
    let two = all.find("\"path\":\"/two\"").expect(&all);
    assert!(one < two);
    assert_eq!(all.matches("HTTP/1.1 200").count(), 2, "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_from_clients_and_to_instances() {
    let up = upstream(echo()).await;
    let config = ServiceConfig {
        upstream: UpstreamProtocol::H2c,
        ..ServiceConfig::default()
    };
    let s = setup(config, &[up.addr]).await;
    let url = format!("http://app.test:{}/h2", s.addr.port());
    let resolve = format!("app.test:{}:127.0.0.1", s.addr.port());
    let (out, err) = curl(&[
        "--http2-prior-knowledge",
        "--resolve",
        &resolve,
        "-w",
        "\n%{http_version}",
        &url,
    ])
    .await;
    assert!(out.ends_with("\n2"), "{out}{err}");
    assert!(out.contains("\"version\":\"HTTP/2.0\""), "{out}");
    assert!(out.contains("\"path\":\"/h2\""), "{out}");
    assert!(out.contains("\"x-forwarded-host\":\"app.test:"), "{out}");
    // The app sees the Host the client asked for, even over h2c.
    assert!(
        out.contains(&format!("\"host\":\"app.test:{}\"", s.addr.port())),
        "{out}"
    );
}

fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=app.test"])
        .args(["-addext", "subjectAltName=DNS:app.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_http11_over_tls() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let acceptor = lull_proxy::tls::acceptor(&cert, &key).unwrap();
    let tls_addr = s
        .proxy
        .listen_tls("127.0.0.1:0".parse().unwrap(), acceptor)
        .await
        .unwrap();
    let url = format!("https://app.test:{}/secure", tls_addr.port());
    let resolve = format!("app.test:{}:127.0.0.1", tls_addr.port());
    let cert_s = cert.to_str().unwrap();
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (out, err) = curl(&[
            flag,
            "--cacert",
            cert_s,
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_version}",
            &url,
        ])
        .await;
        assert!(out.ends_with(&format!("\n{version}")), "{flag}: {out}{err}");
        assert!(out.contains("\"x-forwarded-proto\":\"https\""), "{out}");
    }
    // TLS 1.1 is refused.
    let (out, err) = curl(&[
        "--cacert",
        cert_s,
        "--resolve",
        &resolve,
        "--tls-max",
        "1.1",
        &url,
    ])
    .await;
    assert!(out.is_empty() && !err.is_empty(), "{out}{err}");
}

/// A response body that yields what the test sends, when it sends it.
fn channel_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> TestBody {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
    });
    StreamBody::new(stream).boxed_unsync()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_as_they_are_sent() {
    let tx_slot = Arc::new(Mutex::new(None::<tokio::sync::mpsc::Sender<Bytes>>));
    let slot = tx_slot.clone();
    let up = upstream(handler(move |_req| {
        let slot = slot.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(Bytes::from("data: first\n\n")).await.unwrap();
            *slot.lock().unwrap() = Some(tx);
            let mut resp = Response::new(channel_body(rx));
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            resp
        }
    }))
    .await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let resp = client().request(get(&s.url("/events"))).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event must arrive while the stream is open")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "data: first\n\n");
    let tx = tx_slot.lock().unwrap().take().unwrap();
    tx.send(Bytes::from("data: second\n\n")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.into_data().unwrap(), "data: second\n\n");
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap();
    assert!(end.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_go_through_both_ways() {
    let up = upstream(handler(|req: Request<Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let got = collected
            .trailers()
            .and_then(|t| t.get("x-req-sum"))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| "none".into());
        let mut trailers = HeaderMap::new();
        trailers.insert("x-resp-sum", "abc".parse().unwrap());
        let stream = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from(format!("req trailer: {got}")))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
        resp.headers_mut()
            .insert("trailer", "x-resp-sum".parse().unwrap());
        resp
    }))
    .await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-req-sum", "123".parse().unwrap());
    let stream = futures_util::stream::iter(vec![
        Ok::<_, BoxError>(Frame::data(Bytes::from("payload"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let req = Request::post(s.url("/t"))
        .header("host", HOST)
        .header("te", "trailers")
        .header("trailer", "x-req-sum")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let resp_trailers = collected.trailers().cloned();
    assert_eq!(collected.to_bytes(), "req trailer: 123");
    assert_eq!(resp_trailers.unwrap()["x-resp-sum"], "abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_is_answered_end_to_end() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, vec![b'x'; 100_000]).unwrap();
    let data = format!("@{}", file.display());
    let url = s.url("/upload");
    let (out, err) = curl(&[
        "-v",
        "-H",
        "Host: app.test",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &data,
        &url,
    ])
    .await;
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    assert!(out.contains("\"body_len\":100000"), "{out}");
    assert!(out.contains("\"expect\":\"100-continue\""), "{out}");
}

/// A request body of `left` bytes made of one reused chunk: nothing is held but the chunk.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_upload_streams_in_bounded_memory() {
    const SIZE: u64 = 1 << 30;
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let up = upstream(handler(move |req: Request<Incoming>| {
        let r = r.clone();
        async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame.unwrap().into_data() {
                    r.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Response::new(full(r.load(Ordering::Relaxed).to_string()))
        }
    }))
    .await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let before = rss_kib();
    let req = Request::put(s.url("/big"))
        .header("host", HOST)
        .body(
            Repeat {
                chunk: Bytes::from(vec![7u8; 256 * 1024]),
                left: SIZE,
            }
            .boxed_unsync(),
        )
        .unwrap();
    let start = Instant::now();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(text(resp).await, SIZE.to_string());
    let growth_mib = rss_kib().saturating_sub(before) / 1024;
    eprintln!(
        "1 GiB through the proxy in {:?}, RSS grew {growth_mib} MiB",
        start.elapsed()
    );
    assert!(
        growth_mib < 64,
        "RSS grew {growth_mib} MiB for a 1 GiB upload"
    );
    let log = s.log_entries(1).await;
    assert_eq!(log[0].bytes_in, SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_gives_413() {
    let up = upstream(echo()).await;
    let mut config = ServiceConfig::default();
    config.limits.max_body_bytes = Some(1000);
    config.limits.max_headers = 20;
    let s = setup(config, &[up.addr]).await;
    let req = Request::post(s.url("/"))
        .header("host", HOST)
        .body(full(vec![1u8; 2000]))
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 413);
    let req = Request::post(s.url("/"))
        .header("host", HOST)
        .body(full(vec![1u8; 900]))
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 200);
    let mut req = get(&s.url("/"));
    for n in 0..30 {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-h{n}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    assert_eq!(client().request(req).await.unwrap().status(), 431);
}

/// An app that holds each request until `release` is notified (or `hold` passes).
fn slow(hold: Duration, calls: Arc<AtomicUsize>) -> Handler {
    handler(move |_req| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(hold).await;
            Response::new(full("slow"))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_and_idle_connections_close() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(slow(Duration::from_secs(3), calls.clone())).await;
    let mut config = ServiceConfig::default();
    config.timeouts.first_byte = Duration::from_millis(300);
    let options = ProxyOptions {
        idle_keep_alive: Duration::from_millis(300),
        ..ProxyOptions::default()
    };
    let s = setup_with(config, &[up.addr], options).await;
    let start = Instant::now();
    let resp = client().request(get(&s.url("/"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(text(resp).await.contains("did not answer in time"));

    // The whole-request deadline cuts a response that trickles.
    let trickle = upstream(handler(|_req| async move {
        let stream = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from(format!("{n}\n")))),
                n + 1,
            ))
        });
        Response::new(StreamBody::new(stream).boxed_unsync())
    }))
    .await;
    let mut config = ServiceConfig::default();
    config.timeouts.first_byte = Duration::from_millis(400);
    config.timeouts.request = Duration::from_millis(600);
    let t = setup(config, &[trickle.addr]).await;
    let start = Instant::now();
    let resp = client().request(get(&t.url("/"))).await.unwrap();
    assert_eq!(resp.status(), 200);
    let end = resp.into_body().collect().await;
    assert!(
        end.is_err(),
        "a trickling response must be cut at the request deadline"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // An idle keep-alive connection is closed by the proxy.
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: nope.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"));
    let start = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
        .await
        .expect("the idle connection must be closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_a_queue_timeout_answer_503() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(slow(Duration::from_millis(1500), calls.clone())).await;
    let config = ServiceConfig {
        max_concurrency: 1,
        queue_size: 1,
        queue_timeout: Duration::from_millis(500),
        ..ServiceConfig::default()
    };
    let s = setup(config, &[up.addr]).await;
    let c = client();
    let first = tokio::spawn(c.request(get(&s.url("/1"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = tokio::spawn(c.request(get(&s.url("/2"))));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let overflow = c.request(get(&s.url("/3"))).await.unwrap();
    assert_eq!(overflow.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(overflow.headers().contains_key("retry-after"));
    assert!(start.elapsed() < Duration::from_millis(300));
    assert!(
        text(overflow)
            .await
            .contains("too many requests are waiting")
    );
    let timed_out = queued.await.unwrap().unwrap();
    assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        text(timed_out)
            .await
            .contains("no instance was free in time")
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_service_answers_503_with_retry_after() {
    let up = upstream(echo()).await;
    let config = ServiceConfig {
        paused_retry_after: Duration::from_secs(7),
        ..ServiceConfig::default()
    };
    let s = setup(config, &[up.addr]).await;
    s.pool.set_paused(true);
    let resp = client().request(get(&s.url("/"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert!(text(resp).await.contains("paused"));
    s.pool.set_paused(false);
    assert_eq!(
        client().request(get(&s.url("/"))).await.unwrap().status(),
        200
    );
}

/// Depends on the real pool's least-in-flight choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_in_flight_avoids_the_slow_instance() {
    let slow_calls = Arc::new(AtomicUsize::new(0));
    let fast_calls = Arc::new(AtomicUsize::new(0));
    let slow_up = upstream(slow(Duration::from_millis(2000), slow_calls.clone())).await;
    let fast_up = upstream(slow(Duration::from_millis(5), fast_calls.clone())).await;
    let s = setup(ServiceConfig::default(), &[slow_up.addr, fast_up.addr]).await;
    let c = client();
    let mut pending = Vec::new();
    for n in 0..20 {
        pending.push(tokio::spawn(c.request(get(&s.url(&format!("/{n}"))))));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap().status(), 200);
    }
    let (slow_n, fast_n) = (
        slow_calls.load(Ordering::SeqCst),
        fast_calls.load(Ordering::SeqCst),
    );
    assert_eq!(slow_n + fast_n, 20);
    assert!(slow_n <= 2, "the slow instance got {slow_n} of 20 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_another_instance() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[dead, up.addr]).await;
    let c = client();
    for n in 0..6 {
        let resp = c.request(get(&s.url(&format!("/{n}")))).await.unwrap();
        assert_eq!(resp.status(), 200, "request {n}");
    }
    // A POST whose body was never sent is retried too.
    let req = Request::post(s.url("/post"))
        .header("host", HOST)
        .body(full("body"))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(text(resp).await.contains("\"body_len\":4"));
    let snap = s.pool.snapshot();
    let dead_inst = snap.instances.iter().find(|i| i.id == "i0").unwrap();
    assert!(dead_inst.suspect, "{snap:?}");

    // With no other instance, a refused connection is a 502.
    let lone = setup(ServiceConfig::default(), &[dead]).await;
    let resp = c.request(get(&lone.url("/"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

async fn read_head(sock: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = sock.read(&mut byte).await.unwrap();
        assert_eq!(
            n,
            1,
            "connection closed in the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Accepts a WebSocket handshake and echoes every byte after it.
fn ws_echo() -> Handler {
    handler(|mut req: Request<Incoming>| async move {
        assert_eq!(req.headers()["upgrade"], "websocket");
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(full(""))
            .unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_tunnelled_and_closed_when_idle() {
    let up = upstream(ws_echo()).await;
    let mut config = ServiceConfig::default();
    config.timeouts.websocket_idle = Duration::from_millis(500);
    let s = setup(config, &[up.addr]).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // A masked text frame "hi" goes through and comes back byte for byte.
    let frame = [0x81u8, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    for _ in 0..3 {
        sock.write_all(&frame).await.unwrap();
        let mut back = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(5), sock.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, frame);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then silence: the proxy closes the tunnel after the idle timeout.
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf))
        .await
        .expect("an idle websocket must be closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    // The slot was held while the socket was open and is free now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.pool.snapshot().instances[0].in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(slow(Duration::from_millis(600), calls.clone())).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let c = client();
    let in_flight = tokio::spawn(c.request(get(&s.url("/"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = s.proxy.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.forced, 0);
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        TcpStream::connect(s.addr).await.is_err(),
        "the listener must be closed"
    );

    // A request longer than the grace is cut.
    let up = upstream(slow(Duration::from_secs(10), calls.clone())).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let in_flight = tokio::spawn(client().request(get(&s.url("/"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let report = s.proxy.shutdown(Duration::from_millis(300)).await;
    assert_eq!(report.forced, 1);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(in_flight.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_serves() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let v6 = s.proxy.listen("[::1]:0".parse().unwrap()).await.unwrap();
    let resp = client()
        .request(get(&format!("http://[::1]:{}/v6", v6.port())))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "::1");
    assert_eq!(
        seen["headers"]["forwarded"],
        "for=\"[::1]\";proto=http;host=app.test"
    );
}

#[derive(Default)]
struct CountingCpu {
    restores: AtomicUsize,
    throttles: AtomicUsize,
}

impl lull_proxy::gate::CpuControl for CountingCpu {
    fn restore(&self) -> Result<(), String> {
        self.restores.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn throttle(&self) -> Result<(), String> {
        self.throttles.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn usage_ns(&self) -> Option<u64> {
        None
    }
}

/// The gate's work shows in the access log, and an SSE stream lets the CPU go when streams do
/// not keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn woken_instances_are_logged_and_streams_can_release_the_cpu() {
    let open_stream = Arc::new(Mutex::new(None::<tokio::sync::mpsc::Sender<Bytes>>));
    let slot = open_stream.clone();
    let up = upstream(handler(move |req: Request<Incoming>| {
        let slot = slot.clone();
        async move {
            if req.uri().path() != "/events" {
                return Response::new(full("plain"));
            }
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(Bytes::from("data: 1\n\n")).await.unwrap();
            *slot.lock().unwrap() = Some(tx);
            let mut resp = Response::new(channel_body(rx));
            resp.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            resp
        }
    }))
    .await;
    let config = ServiceConfig {
        streams_keep_cpu: false,
        ..ServiceConfig::default()
    };
    let s = setup(config, &[]).await;
    let cpu = Arc::new(CountingCpu::default());
    s.pool.add_instance(InstanceSpec {
        id: "gated".into(),
        addr: up.addr,
        cpu: cpu.clone(),
    });
    s.pool.set_healthy("gated", true, "test");
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            text(c.request(get(&s.url("/"))).await.unwrap()).await,
            "plain"
        );
    }
    let log = s.log_entries(2).await;
    assert_eq!(log.len(), 2);
    assert!(
        log[1].woke,
        "the second request found the instance throttled: {log:?}"
    );
    assert!(cpu.restores.load(Ordering::SeqCst) >= 1);
    let throttles = cpu.throttles.load(Ordering::SeqCst);
    assert!(throttles >= 2, "{throttles}");

    let resp = c.request(get(&s.url("/events"))).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    // The stream is open, its slot held, and the instance is throttled all the same.
    assert_eq!(s.pool.snapshot().instances[0].in_flight, 1);
    assert_eq!(cpu.throttles.load(Ordering::SeqCst), throttles + 1);
    drop(open_stream.lock().unwrap().take());
    assert!(body.frame().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_answers_504() {
    // A loopback listener that never accepts and whose backlog is full: new connections hang.
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let f = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        f.set_nonblocking(true).unwrap();
        let _ = f.connect(&addr.into());
        fillers.push(f);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut config = ServiceConfig::default();
    config.timeouts.connect = Duration::from_millis(300);
    let s = setup(config, &[addr]).await;
    let start = Instant::now();
    let resp = client().request(get(&s.url("/"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(
        text(resp)
            .await
            .contains("connecting to the instance timed out")
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_connect_timeout_is_retried_on_another_instance_and_suspected() {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let hung = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let f = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        f.set_nonblocking(true).unwrap();
        let _ = f.connect(&hung.into());
        fillers.push(f);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let good = upstream(echo()).await;
    let mut config = ServiceConfig::default();
    config.timeouts.connect = Duration::from_millis(300);
    let s = setup(config, &[hung, good.addr]).await;
    // Both idle: the tie may go to either; ask until the hung one has been tried.
    let mut retried = false;
    for _ in 0..4 {
        let resp = client().request(get(&s.url("/"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        if s.pool.snapshot().instances[0].suspect {
            retried = true;
            break;
        }
    }
    assert!(retried, "the hung instance was never tried and suspected");
    assert!(!s.pool.snapshot().instances[0].in_rotation());
}

#[tokio::test]
async fn a_client_that_stops_reading_gives_its_slot_back() {
    // An app streaming a large response to a client that never reads it.
    let big = upstream(handler(|_req| async {
        Response::new(
            Repeat {
                chunk: Bytes::from(vec![b'x'; 64 * 1024]),
                left: 1 << 30,
            }
            .boxed_unsync(),
        )
    }))
    .await;
    let options = ProxyOptions {
        idle_keep_alive: Duration::from_millis(300),
        ..ProxyOptions::default()
    };
    let s = setup_with(ServiceConfig::default(), &[big.addr], options).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.pool.snapshot().instances[0].in_flight == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The client reads nothing: the socket buffers fill, the proxy's writes wait, and after
    // the idle keep-alive the connection is cut and the slot comes back.
    while s.pool.snapshot().instances[0].in_flight != 0 {
        assert!(
            Instant::now() < deadline,
            "a client that stopped reading still holds the slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(sock);
}

#[tokio::test]
async fn an_instance_that_never_gets_healthy_is_reported() {
    use lull_proxy::config::HealthProbe;
    use lull_proxy::health::HealthChecker;
    use lull_proxy::pool::PoolEvent;

    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut config = ServiceConfig::default();
    config.health.probe = HealthProbe::Tcp;
    config.health.interval = Duration::from_millis(200);
    config.health.timeout = Duration::from_millis(100);
    config.health.unhealthy_threshold = 2;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pool = Pool::new("app", Arc::new(config), tx);
    pool.add_instance(InstanceSpec {
        id: "never".into(),
        addr: closed,
        cpu: Arc::new(NoCpuControl),
    });
    let _checker = HealthChecker::spawn(pool.clone());
    let event = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(PoolEvent::Health {
                instance,
                healthy,
                reason,
                ..
            }) = rx.recv().await
            {
                return (instance, healthy, reason);
            }
        }
    })
    .await
    .expect("no health event for an instance that never became healthy");
    assert_eq!(event.0, "never");
    assert!(!event.1);
    assert!(
        event.2.contains("not healthy") && event.2.contains("connect"),
        "{}",
        event.2
    );
}

#[tokio::test]
async fn the_first_byte_timeout_counts_from_the_end_of_the_upload() {
    let up = upstream(echo()).await;
    let mut config = ServiceConfig::default();
    config.timeouts.first_byte = Duration::from_millis(300);
    let s = setup(config, &[up.addr]).await;
    // An upload trickling in over about a second, three times the first-byte timeout.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send(Bytes::from_static(b"0123456789")).await.is_err() {
                return;
            }
        }
    });
    let mut req = Request::post(s.url("/upload"))
        .header("host", HOST)
        .body(channel_body(rx))
        .unwrap();
    req.headers_mut().remove("content-length");
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(body["body_len"], 100);
}

#[tokio::test]
async fn one_address_served_by_several_runtimes() {
    let up = upstream(echo()).await;
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let pool = Pool::new("app", Arc::new(ServiceConfig::default()), tx);
    pool.add_instance(InstanceSpec {
        id: "i0".into(),
        addr: up.addr,
        cpu: Arc::new(NoCpuControl),
    });
    pool.set_healthy("i0", true, "test");
    let routes = Arc::new(RouteTable::new());
    routes.insert(HOST, Route::new(pool, "rev-1"));
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let mut handles = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..2 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        handles.push(runtime.handle().clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        std::thread::spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            })
        });
    }
    let addr = proxy
        .listen_on("127.0.0.1:0".parse().unwrap(), &handles)
        .unwrap();
    // Separate connections: the kernel spreads them over both sockets.
    for _ in 0..20 {
        let resp = client()
            .request(get(&format!("http://{addr}/")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = text(resp).await;
    }
    let report = proxy.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.forced, 0, "{report:?}");
    for stop in stops {
        let _ = stop.send(());
    }
}

/// An app that answers one request per connection with keep-alive, then closes the
/// connection as the next request arrives, unanswered: what an app whose keep-alive timer ran
/// out while it was frozen does the moment it is thawed.
async fn one_answer_per_connection() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                read_head(&mut sock).await;
                let body = "answered";
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(head.as_bytes()).await.unwrap();
                // The next request arrives; the app closes without a word.
                let mut byte = [0u8; 1];
                let _ = sock.read(&mut byte).await;
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_dropped_under_a_get_is_replayed_on_a_fresh_one() {
    let (addr, connections) = one_answer_per_connection().await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let c = client();
    for n in 0..3 {
        let resp = c.request(get(&s.url(&format!("/{n}")))).await.unwrap();
        assert_eq!(resp.status(), 200, "request {n}");
        assert_eq!(text(resp).await, "answered");
    }
    assert!(
        connections.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "each request after the first went on a fresh connection"
    );
    let snap = s.pool.snapshot();
    assert!(
        !snap.instances[0].suspect,
        "not the instance's fault: {snap:?}"
    );
}

/// Sends `request` on `sock` and reads the response to it.
async fn ask(sock: &mut TcpStream, request: &[u8]) -> (String, String) {
    sock.write_all(request).await.unwrap();
    read_response(sock).await
}

/// Reads one response from `sock`: its head, and its body (`Content-Length` or chunked,
/// decoded).
async fn read_response(sock: &mut TcpStream) -> (String, String) {
    let head = read_head(sock).await;
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        body.resize(len, 0);
        sock.read_exact(&mut body).await.unwrap();
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let size_line = read_line(sock).await;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size {size_line:?}"));
            if size == 0 {
                assert_eq!(read_line(sock).await, "", "no trailers expected");
                break;
            }
            let mut chunk = vec![0; size + 2];
            sock.read_exact(&mut chunk).await.unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    }
    (head, String::from_utf8_lossy(&body).into_owned())
}

async fn read_line(sock: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        assert_eq!(sock.read(&mut byte).await.unwrap(), 1, "closed mid-line");
        line.push(byte[0]);
    }
    line.truncate(line.len() - 2);
    String::from_utf8_lossy(&line).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_and_then_others_share_one_client_connection() {
    let up = upstream(echo()).await;
    let s = setup(ServiceConfig::default(), &[up.addr]).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    // A bodiless GET (the fast path), a POST with a body (hyper from here on), a GET.
    sock.write_all(
        b"GET /a?x=1 HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 203.0.113.9\r\n\
          Forwarded: for=spoofed\r\nConnection: keep-alive\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("server: app-server/1\r\n"), "{head}");
    assert!(lower.contains("x-app: kept\r\n"), "{head}");
    assert!(lower.contains("date: "), "{head}");
    assert!(
        !lower.contains("x-hop") && !lower.contains("keep-alive"),
        "{head}"
    );
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["path"], "/a?x=1");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=app.test");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(h.get("connection").is_none(), "{h}");
    assert_eq!(h["x-request-id"].as_str().unwrap().len(), 32, "{h}");

    let (head, body) = ask(
        &mut sock,
        b"POST /b HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nhey",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (seen["path"].as_str(), seen["body_len"].as_u64()),
        (Some("/b"), Some(3))
    );

    let (head, body) = ask(
        &mut sock,
        b"GET /c HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: mine\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/c");
    assert_eq!(seen["headers"]["x-request-id"], "mine");

    let log = s.log_entries(3).await;
    let paths: Vec<_> = log.iter().map(|e| (e.path.as_str(), e.status)).collect();
    assert_eq!(paths, [("/a?x=1", 200), ("/b", 200), ("/c", 200)]);
    assert_eq!(log[0].instance, "i0");
    assert!(log[0].bytes_out > 100, "{:?}", log[0]);
}

/// A hand-written instance: answers the requests on each connection it accepts with
/// `answers[n]` in turn (`n` counting over all connections), and records every request head.
async fn scripted(
    answers: Vec<&'static str>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(Mutex::new(answers.into_iter()));
    let (seen, accepted) = (heads.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let (seen, answers) = (seen.clone(), answers.clone());
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let Some(answer) = answers.lock().unwrap().next() else {
                        return;
                    };
                    sock.write_all(answer.as_bytes()).await.unwrap();
                    // `X-Then: hang-up`: closed as an app's keep-alive timer would, unsaid.
                    if answer.contains("Connection: close") || answer.contains("X-Then: hang-up") {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads, conns)
}

// One thread: idle connections to instances are kept per thread, and the reuse is checked.
#[tokio::test]
async fn chunked_and_close_delimited_answers_reach_the_client_chunked() {
    let (addr, heads, conns) = scripted(vec![
        "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n\
         HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
         5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nConnection: close\r\nX-Kind: until-close\r\n\r\nuntil the end",
        "HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let (head, body) = ask(&mut sock, b"GET /1 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 200 OK\r\n"),
        "103 is dropped: {head}"
    );
    assert!(head.contains("X-Kind: chunked\r\n"), "{head}");
    assert_eq!(body, "hello world");
    let (head, body) = ask(&mut sock, b"GET /2 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(
        !lower.contains("connection: close"),
        "the client's connection stays: {head}"
    );
    assert_eq!(body, "until the end");
    // The first two requests shared one connection to the instance; the one it closed
    // is not reused.
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    let (head, body) = ask(&mut sock, b"GET /3 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    assert_eq!(body, "");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    // The instance got the client's head with this hop's headers, in HTTP/1.1.
    let heads = heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with("GET /1 HTTP/1.1\r\nHost: app.test\r\n"),
        "{heads:?}"
    );
    assert!(
        heads[0].contains("x-forwarded-proto: http\r\n"),
        "{heads:?}"
    );
    let log = s.log_entries(3).await;
    let seen: Vec<_> = log.iter().map(|e| (e.status, e.bytes_out)).collect();
    assert_eq!(seen, [(200, 11), (200, 13), (204, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_answer_is_a_502_and_the_connection_goes_on() {
    let (addr, _heads, _conns) = scripted(vec![
        "HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let (head, body) = ask(&mut sock, b"GET /1 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{head}");
    assert!(body.contains("not usable"), "{body}");
    let (head, body) = ask(&mut sock, b"GET /2 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_queued_gives_its_place_up() {
    let calls = Arc::new(AtomicUsize::new(0));
    let up = upstream(slow(Duration::from_millis(1500), calls.clone())).await;
    let config = ServiceConfig {
        max_concurrency: 1,
        queue_size: 1,
        queue_timeout: Duration::from_secs(10),
        ..ServiceConfig::default()
    };
    let s = setup(config, &[up.addr]).await;
    let first = tokio::spawn(client().request(get(&s.url("/1"))));
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.pool.snapshot().instances[0].in_flight == 0 {
        assert!(Instant::now() < deadline, "the first request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut leaving = TcpStream::connect(s.addr).await.unwrap();
    leaving
        .write_all(b"GET /2 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    while s.pool.snapshot().queue_depth == 0 {
        assert!(
            Instant::now() < deadline,
            "the second request was never queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(leaving);
    while s.pool.snapshot().queue_depth != 0 {
        assert!(
            Instant::now() < deadline,
            "the queue kept a client that left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the request that left was never sent"
    );
    let log = s.log_entries(2).await;
    let statuses: Vec<_> = log.iter().map(|e| (e.path.as_str(), e.status)).collect();
    assert!(statuses.contains(&("/2", 499)), "{statuses:?}");
}

#[tokio::test]
async fn an_idle_connection_the_instance_closed_is_not_used_again() {
    let (addr, heads, conns) = scripted(vec![
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Then: hang-up\r\n\r\nok",
        "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let (_, body) = ask(&mut sock, b"GET /1 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(body, "ok");
    // The instance's close reaches the proxy's reactor while the connection is idle.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Not idempotent: had it gone on the closed connection, it could not be sent again.
    let (head, _) = ask(
        &mut sock,
        b"POST /2 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 201 Created\r\n"), "{head}");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    assert_eq!(heads.lock().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_just_after_a_drain_began_is_answered_whichever_path_serves_it() {
    let up = upstream(echo()).await;
    // A bodiless GET stays on the fast path; a POST with a body is handed to hyper, whose
    // graceful shutdown must not drop it. Several rounds: the order in which a connection
    // and a drain are looked at used to be a coin toss.
    for round in 0..16 {
        let request: &[u8] = if round % 2 == 0 {
            b"POST /p HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi"
        } else {
            b"GET /g HTTP/1.1\r\nHost: app.test\r\n\r\n"
        };
        let s = Arc::new(setup(ServiceConfig::default(), &[up.addr]).await);
        let mut sock = TcpStream::connect(s.addr).await.unwrap();
        // Accepted before the drain.
        while s.proxy.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let draining = s.clone();
        let shutdown =
            tokio::spawn(async move { draining.proxy.shutdown(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        sock.write_all(request).await.unwrap();
        let (head, body) = tokio::time::timeout(Duration::from_secs(5), read_response(&mut sock))
            .await
            .unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n"),
            "round {round}: {head}"
        );
        assert!(body.contains("\"path\""), "round {round}: {body}");
        assert_eq!(shutdown.await.unwrap().forced, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_a_quiet_event_stream_frees_its_slot() {
    let (addr, _heads, _conns) = scripted(vec![
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n\
         d\r\ndata: hello\n\n\r\n",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(b"GET /events HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut sock).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert_eq!(read_line(&mut sock).await, "d");
    assert_eq!(s.pool.snapshot().instances[0].in_flight, 1);
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.pool.snapshot().instances[0].in_flight != 0 {
        assert!(Instant::now() < deadline, "the stream kept its slot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One h2c (prior knowledge) connection to `addr`.
async fn h2c_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn request(method: &str, url: &str) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new().map_err(|n| match n {}).boxed_unsync())
        .unwrap()
}

// One thread: plain sockets to instances are kept per thread, and their reuse is checked.
#[tokio::test]
async fn bodiless_h2_requests_reach_http1_instances_over_plain_sockets() {
    let (addr, heads, conns) = scripted(vec![
        "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n\
         HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
         5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Secret\r\n\
         X-Secret: s\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nabcde",
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        "HTTP/1.1 200 OK\r\nConnection: close\r\nX-Kind: until-close\r\n\r\nuntil the end",
        "HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n",
        "HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut c = h2c_connect(s.addr).await;
    let url = |p: &str| format!("http://{HOST}:{}{p}", s.addr.port());
    let mut first = request("GET", &url("/1?q=1"));
    first.headers_mut().append("cookie", "a=1".parse().unwrap());
    first.headers_mut().append("cookie", "b=2".parse().unwrap());
    let resp = c.send_request(first).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-kind"], "chunked");
    assert!(resp.headers().contains_key("date"), "{:?}", resp.headers());
    let whole = resp.into_body().collect().await.unwrap();
    // The chunked body's trailers reach an HTTP/2 client, as hyper's client would pass them.
    assert_eq!(
        whole.trailers().map(|t| &t["x-sum"]),
        Some(&"1".parse().unwrap())
    );
    assert_eq!(whole.to_bytes(), "hello world");

    let resp = c.send_request(request("GET", &url("/2"))).await.unwrap();
    let h = resp.headers().clone();
    assert_eq!(text(resp).await, "abcde");
    assert_eq!(h["content-length"], "5");
    let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    for hop in ["connection", "keep-alive", "x-secret"] {
        assert!(!h.contains_key(hop), "{hop} in {h:?}");
    }

    let resp = c.send_request(request("HEAD", &url("/3"))).await.unwrap();
    assert_eq!(resp.headers()["content-length"], "100");
    assert_eq!(text(resp).await, "");

    let resp = c.send_request(request("GET", &url("/4"))).await.unwrap();
    assert_eq!(resp.headers()["x-kind"], "until-close");
    assert_eq!(text(resp).await, "until the end");
    // The first four went on one connection to the instance; the one it closed is not used
    // again.
    assert_eq!(conns.load(Ordering::SeqCst), 1);

    let resp = c.send_request(request("GET", &url("/5"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(text(resp).await, "");
    assert_eq!(conns.load(Ordering::SeqCst), 2);

    // A request with a body still goes through hyper's client, on a connection of its own.
    let post = Request::post(url("/6")).body(full("sent")).unwrap();
    let resp = c.send_request(post).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(text(resp).await, "made");

    let heads = heads.lock().unwrap().clone();
    let host = format!("host: {HOST}:{}\r\n", s.addr.port());
    assert!(
        heads[0].starts_with(&format!("GET /1?q=1 HTTP/1.1\r\n{host}")),
        "{heads:?}"
    );
    assert!(heads[0].contains("cookie: a=1; b=2\r\n"), "{heads:?}");
    assert!(
        heads[0].contains("x-forwarded-proto: http\r\n"),
        "{heads:?}"
    );
    assert!(heads[0].contains("x-request-id: "), "{heads:?}");
    assert!(heads[2].starts_with("HEAD /3 HTTP/1.1\r\n"), "{heads:?}");
    assert!(heads[5].starts_with("POST /6 HTTP/1.1\r\n"), "{heads:?}");
    let log = s.log_entries(6).await;
    let seen: Vec<_> = log.iter().map(|e| (e.status, e.bytes_out)).collect();
    assert_eq!(
        seen,
        [(200, 11), (200, 5), (200, 0), (200, 13), (204, 0), (201, 4)]
    );
}

// One thread: plain sockets to instances are kept per thread, so each request after the
// first takes the socket the one before gave back.
#[tokio::test]
async fn an_h2_get_on_a_reused_socket_the_instance_dropped_is_replayed() {
    let (addr, connections) = one_answer_per_connection().await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut c = h2c_connect(s.addr).await;
    for n in 0..3 {
        let url = format!("http://{HOST}:{}/{n}", s.addr.port());
        let resp = c.send_request(request("GET", &url)).await.unwrap();
        assert_eq!(resp.status(), 200, "request {n}");
        assert_eq!(text(resp).await, "answered");
    }
    // The second and third went on the socket given back, which the app dropped, and
    // again on a fresh one each.
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    assert!(!s.pool.snapshot().instances[0].suspect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_cut_answer_to_an_h2_request_is_not_passed_on_as_whole() {
    let (addr, _, conns) = scripted(vec![
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Then: hang-up\r\n\r\nabc",
        "HTTP/1.1 200 OK\r\nX-Bad: \x01\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    let mut c = h2c_connect(s.addr).await;
    let url = |p: &str| format!("http://{HOST}:{}{p}", s.addr.port());
    // Cut short mid-body: the client's stream is reset (before its head, when the cut is
    // seen at once), not ended as if whole.
    match c.send_request(request("GET", &url("/1"))).await {
        Ok(resp) => assert!(resp.into_body().collect().await.is_err()),
        Err(e) => assert!(format!("{e:?}").contains("Reset"), "{e:?}"),
    }
    let resp = c.send_request(request("GET", &url("/2"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let resp = c.send_request(request("GET", &url("/3"))).await.unwrap();
    assert_eq!(text(resp).await, "ok");
    assert_eq!(
        conns.load(Ordering::SeqCst),
        3,
        "no broken socket is reused"
    );
    let log = s.log_entries(3).await;
    let seen: Vec<_> = log.iter().map(|e| (e.path.as_str(), e.status)).collect();
    assert_eq!(seen, [("/1", 200), ("/2", 502), ("/3", 200)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_is_logged_with_the_body_bytes_it_had() {
    let (addr, _, _) = scripted(vec![
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Then: hang-up\r\n\r\nabc",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Then: hang-up\r\n\r\n4\r\nabcd\r\n",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    for path in ["/length", "/chunked"] {
        let mut sock = TcpStream::connect(s.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        sock.write_all(request.as_bytes()).await.unwrap();
        // The client's connection is closed once the instance's is: no whole response.
        let mut got = Vec::new();
        sock.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    }
    let log = s.log_entries(2).await;
    let seen: Vec<_> = log
        .iter()
        .map(|e| (e.path.as_str(), e.status, e.bytes_out))
        .collect();
    assert_eq!(seen, [("/length", 200, 3), ("/chunked", 200, 4)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_begins_mid_request_closes_the_connection_after_its_response() {
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (held, arriving) = (release.clone(), arrived.clone());
    let up = upstream(handler(move |req| {
        let (held, arriving) = (held.clone(), arriving.clone());
        async move {
            if req.uri().path() == "/held" {
                arriving.notify_one();
                held.notified().await;
            }
            Response::new(full("done"))
        }
    }))
    .await;
    let s = Arc::new(setup(ServiceConfig::default(), &[up.addr]).await);
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    // A first exchange, so the connection is a kept-alive one on the fast path.
    let (head, _) = ask(
        &mut sock,
        format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let request = format!("GET /held HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    sock.write_all(request.as_bytes()).await.unwrap();
    // The request is at the app when the drain begins.
    arrived.notified().await;
    let draining = s.clone();
    let shutdown =
        tokio::spawn(async move { draining.proxy.shutdown(Duration::from_secs(5)).await });
    // The drain has begun once the listener is closed; only then does the app answer.
    while TcpStream::connect(s.addr).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    release.notify_one();
    let (head, body) = read_response(&mut sock).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close\r\n"),
        "{head}"
    );
    assert_eq!(body, "done");
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(shutdown.await.unwrap().forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_own_reason_phrase_reaches_http1_clients_whichever_path_serves_them() {
    let (addr, heads, _) = scripted(vec![
        "HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let s = setup(ServiceConfig::default(), &[addr]).await;
    // HTTP/1.1 on the fast path; HTTP/1.0 through hyper's server and a plain socket.
    for version in ["1.1", "1.0"] {
        let mut sock = TcpStream::connect(s.addr).await.unwrap();
        let request = format!("GET /{version} HTTP/{version}\r\nHost: {HOST}\r\n\r\n");
        let (head, body) = ask(&mut sock, request.as_bytes()).await;
        assert!(head.contains(" 200 Fine Thanks\r\n"), "{version}: {head}");
        assert_eq!(body, "ok");
    }
    assert_eq!(heads.lock().unwrap().len(), 2);
}
