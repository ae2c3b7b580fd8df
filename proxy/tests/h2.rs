//! The proxy's own HTTP/2 server, frame by frame: a raw client written here (frames by hand,
//! HPACK by `loona-hpack`) against the proxy on loopback, instances built in the test.
//! What real clients do with it (curl, h2load, hyper's client) is in `http.rs`,
//! `tls.rs` and `tls_tools.rs`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lull_proxy::config::ServiceConfig;
use lull_proxy::pool::{InstanceSpec, Pool};
use lull_proxy::routes::Route;
use lull_proxy::{Proxy, ProxyOptions, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "h2.test";
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Bytes,
}

impl Frame {
    fn code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// A response as the raw client read it.
#[derive(Debug, Default)]
struct Answer {
    fields: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Answer {
    fn status(&self) -> &str {
        self.field(":status").unwrap_or("")
    }
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/2 client that sends what it is told, frame by frame.
struct Raw {
    io: TcpStream,
    buf: BytesMut,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Raw {
    /// Connects and sends the preface and `settings`; the server's SETTINGS are read later.
    async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> Raw {
        let mut raw = Raw::open(addr).await;
        raw.io.write_all(PREFACE).await.unwrap();
        let mut payload = BytesMut::new();
        for &(id, value) in settings {
            payload.put_u16(id);
            payload.put_u32(value);
        }
        raw.send(SETTINGS, 0, 0, &payload).await;
        raw
    }

    async fn open(addr: SocketAddr) -> Raw {
        Raw {
            io: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
        }
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut out = BytesMut::new();
        let len = payload.len();
        out.put_u8((len >> 16) as u8);
        out.put_u16(len as u16);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(stream);
        out.put_slice(payload);
        // A server that ends the connection may stop reading before all is written.
        let _ = self.io.write_all(&out).await;
    }

    fn block(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        self.encoder
            .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    /// A request head for `path` (GET unless `extra` names another :method first).
    async fn request(&mut self, stream: u32, path: &str, extra: &[(&str, &str)], end: bool) {
        let mut fields = vec![(":method", "GET")];
        if let Some((_, m)) = extra.iter().find(|(n, _)| *n == ":method") {
            fields[0].1 = m;
        }
        fields.extend([(":scheme", "http"), (":authority", HOST), (":path", path)]);
        fields.extend(extra.iter().filter(|(n, _)| *n != ":method").copied());
        let block = self.block(&fields);
        let flags = END_HEADERS | if end { END_STREAM } else { 0 };
        self.send(HEADERS, flags, stream, &block).await;
    }

    /// The next frame, or None once the server closed the connection.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let head = self.buf.split_to(9);
                    let payload = self.buf.split_to(len).freeze();
                    return Some(Frame {
                        kind: head[3],
                        flags: head[4],
                        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
                        payload,
                    });
                }
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf))
                    .await
                    .expect("the server sends something within 10 s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next frame that is not connection housekeeping (SETTINGS are acknowledged).
    async fn next(&mut self) -> Option<Frame> {
        loop {
            let f = self.frame().await?;
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => self.send(SETTINGS, ACK, 0, &[]).await,
                PING if f.flags & ACK == 0 => self.send(PING, ACK, 0, &f.payload).await,
                SETTINGS | WINDOW_UPDATE | PING => {}
                _ => return Some(f),
            }
        }
    }

    /// Whether nothing but housekeeping comes for 300 ms.
    async fn silent(&mut self) -> Result<(), Frame> {
        match tokio::time::timeout(Duration::from_millis(300), self.next()).await {
            Err(_) => Ok(()),
            Ok(f) => Err(f.expect("the connection stays open")),
        }
    }

    /// Reads DATA frames to the end of their stream; the bytes read.
    async fn data_to_end(&mut self) -> usize {
        let mut got = 0;
        loop {
            let f = self.next().await.expect("the connection stays open");
            assert_eq!(f.kind, DATA, "{f:?}");
            got += f.payload.len();
            if f.flags & END_STREAM != 0 {
                return got;
            }
        }
    }

    /// Reads until the server's GOAWAY; its error code.
    async fn goaway(&mut self) -> u32 {
        loop {
            match self.next().await {
                Some(f) if f.kind == GOAWAY => return f.code(),
                Some(_) => {}
                None => panic!("the connection closed without a GOAWAY"),
            }
        }
    }

    /// Reads `stream`'s whole response (other streams' frames are dropped).
    async fn answer(&mut self, stream: u32) -> Answer {
        let mut a = Answer::default();
        loop {
            let f = self.next().await.expect("the connection stays open");
            assert_ne!(
                f.kind, GOAWAY,
                "GOAWAY while waiting for stream {stream}: {f:?}"
            );
            if f.stream != stream {
                continue;
            }
            match f.kind {
                HEADERS => {
                    let decoded = self.decoder.decode(&f.payload).unwrap();
                    let fields: Vec<_> = decoded
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect();
                    if a.fields.is_empty() || fields.iter().any(|(n, _)| n == ":status") {
                        a.fields = fields;
                    } else {
                        a.trailers = fields;
                    }
                }
                DATA => a.body.extend_from_slice(&f.payload),
                RST_STREAM => panic!("stream {stream} reset: code {}", f.code()),
                _ => {}
            }
            if f.flags & END_STREAM != 0 && a.status() != "100" {
                return a;
            }
        }
    }

    /// Reads until `stream` is reset; the code.
    async fn reset(&mut self, stream: u32) -> u32 {
        loop {
            let f = self.next().await.expect("the connection stays open");
            assert_ne!(
                f.kind, GOAWAY,
                "GOAWAY instead of a reset of {stream}: {f:?}"
            );
            if f.kind == RST_STREAM && f.stream == stream {
                return f.code();
            }
        }
    }
}

/// An instance answering `app saw <path>`, a body of `?size=N` bytes, or, for POSTs, the
/// length of what it received; `/hold` waits until dropped (counted in `dropped`).
struct Instance {
    addr: SocketAddr,
    holding: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Counted(Arc<AtomicUsize>);
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn instance() -> Instance {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holding = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (h, d) = (holding.clone(), dropped.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (h, d) = (h.clone(), d.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (h, d) = (h.clone(), d.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let query = req.uri().query().unwrap_or("").to_owned();
                        if path == "/early" {
                            // Answers before reading any of the body.
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = http::StatusCode::NO_CONTENT;
                            return Ok::<_, Infallible>(resp);
                        }
                        let body = if path == "/hold" {
                            let _counted = Counted(d);
                            h.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<()>().await;
                            unreachable!()
                        } else if req.method() == http::Method::POST {
                            let got = req.into_body().collect().await.unwrap().to_bytes();
                            format!("got {}", got.len()).into_bytes()
                        } else if let Some(n) = query.strip_prefix("size=") {
                            vec![b'x'; n.parse().unwrap()]
                        } else {
                            format!("app saw {path}").into_bytes()
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Instance {
        addr,
        holding,
        dropped,
        task,
    }
}

struct Setup {
    proxy: Proxy,
    addr: SocketAddr,
    instance: Instance,
    _events: tokio::sync::mpsc::UnboundedReceiver<lull_proxy::pool::PoolEvent>,
}

async fn setup() -> Setup {
    setup_with(ProxyOptions::default()).await
}

async fn setup_with(options: ProxyOptions) -> Setup {
    let instance = instance().await;
    let routes = Arc::new(RouteTable::new());
    let events = common::route(&routes, HOST, ServiceConfig::default(), instance.addr);
    let proxy = Proxy::new(routes, options);
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Setup {
        proxy,
        addr,
        instance,
        _events: events,
    }
}

#[tokio::test]
async fn requests_are_answered_and_the_connection_is_kept() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    for (stream, path) in [(1, "/a"), (3, "/b?x=1"), (5, "/c")] {
        c.request(stream, path, &[], true).await;
        let a = c.answer(stream).await;
        assert_eq!(a.status(), "200");
        let path = path.split('?').next().unwrap();
        assert_eq!(String::from_utf8_lossy(&a.body), format!("app saw {path}"));
        assert!(a.field("date").is_some(), "{:?}", a.fields);
    }
    // Two at once, answered on their own streams.
    c.request(7, "/d", &[], true).await;
    c.request(9, "/e", &[], true).await;
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let f = c.next().await.unwrap();
        if f.kind == DATA {
            bodies.push((f.stream, String::from_utf8(f.payload.to_vec()).unwrap()));
        }
        let f = c.next().await.unwrap();
        if f.kind == DATA {
            bodies.push((f.stream, String::from_utf8(f.payload.to_vec()).unwrap()));
        }
    }
    bodies.sort();
    assert_eq!(
        bodies,
        vec![(7, "app saw /d".into()), (9, "app saw /e".into())]
    );
    // An unknown host is the proxy's own 404.
    let block = c.block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "nope.test"),
        (":path", "/"),
    ]);
    c.send(HEADERS, END_HEADERS | END_STREAM, 11, &block).await;
    let a = c.answer(11).await;
    assert_eq!(a.status(), "404");
    assert!(String::from_utf8_lossy(&a.body).contains("no service answers"));
}

#[tokio::test]
async fn ping_and_settings_are_acknowledged() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    let first = c.frame().await.unwrap();
    assert_eq!(
        (first.kind, first.flags),
        (SETTINGS, 0),
        "the server's SETTINGS come first"
    );
    c.send(PING, 0, 0, b"12345678").await;
    let (mut settings_ack, mut ping_ack) = (false, false);
    while !(settings_ack && ping_ack) {
        let f = c.frame().await.expect("both acknowledgements come");
        match (f.kind, f.flags) {
            (SETTINGS, ACK) => settings_ack = true,
            (PING, ACK) => {
                assert_eq!(&f.payload[..], b"12345678");
                ping_ack = true;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn connection_errors_end_with_goaway_and_the_right_code() {
    let s = setup().await;
    type Case = (&'static str, Vec<(u8, u8, u32, Vec<u8>)>, u32);
    let big = vec![0u8; 16_385];
    let cases: Vec<Case> = vec![
        (
            "DATA on stream 0",
            vec![(DATA, 0, 0, b"x".to_vec())],
            PROTOCOL_ERROR,
        ),
        (
            "HEADERS on an even stream",
            vec![(HEADERS, END_HEADERS, 2, vec![0x82])],
            PROTOCOL_ERROR,
        ),
        (
            "a frame over 16384 bytes",
            vec![(DATA, 0, 1, big)],
            FRAME_SIZE_ERROR,
        ),
        (
            "PING of 7 bytes",
            vec![(PING, 0, 0, vec![0; 7])],
            FRAME_SIZE_ERROR,
        ),
        (
            "PUSH_PROMISE",
            vec![(PUSH_PROMISE, END_HEADERS, 1, vec![0, 0, 0, 2])],
            PROTOCOL_ERROR,
        ),
        (
            "RST_STREAM on an idle stream",
            vec![(RST_STREAM, 0, 5, vec![0, 0, 0, 8])],
            PROTOCOL_ERROR,
        ),
        (
            "WINDOW_UPDATE of 0",
            vec![(WINDOW_UPDATE, 0, 0, vec![0; 4])],
            PROTOCOL_ERROR,
        ),
        (
            "a connection window past 2^31-1",
            vec![(WINDOW_UPDATE, 0, 0, vec![0x7f, 0xff, 0xff, 0xff])],
            FLOW_CONTROL_ERROR,
        ),
        (
            "CONTINUATION alone",
            vec![(CONTINUATION, END_HEADERS, 1, vec![0x82])],
            PROTOCOL_ERROR,
        ),
        (
            "a field block cut by a PING",
            vec![(HEADERS, 0, 1, vec![0x82]), (PING, 0, 0, vec![0; 8])],
            PROTOCOL_ERROR,
        ),
        (
            "HPACK it cannot decode",
            vec![(HEADERS, END_HEADERS, 1, vec![0xff, 0xff, 0xff, 0xff])],
            COMPRESSION_ERROR,
        ),
        (
            "SETTINGS_ENABLE_PUSH of 2",
            vec![(SETTINGS, 0, 0, vec![0, 2, 0, 0, 0, 2])],
            PROTOCOL_ERROR,
        ),
        (
            "SETTINGS of 5 bytes",
            vec![(SETTINGS, 0, 0, vec![0; 5])],
            FRAME_SIZE_ERROR,
        ),
    ];
    for (what, frames, code) in cases {
        let mut c = Raw::connect(s.addr, &[]).await;
        for (kind, flags, stream, payload) in frames {
            c.send(kind, flags, stream, &payload).await;
        }
        assert_eq!(c.goaway().await, code, "{what}");
        assert!(
            c.frame().await.is_none(),
            "{what}: the connection closes after GOAWAY"
        );
    }
    // Not a preface at all: closed with nothing served (the fast path has it as HTTP/1,
    // a bad request).
    let mut c = Raw::open(s.addr).await;
    c.io.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(c.goaway().await, PROTOCOL_ERROR);
    // The first frame must be SETTINGS.
    let mut c = Raw::open(s.addr).await;
    c.io.write_all(PREFACE).await.unwrap();
    c.send(PING, 0, 0, &[0; 8]).await;
    assert_eq!(c.goaway().await, PROTOCOL_ERROR);
}

#[tokio::test]
async fn a_malformed_request_resets_only_its_stream() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("upper-case name", &[("X-Upper", "1")]),
        ("connection-specific field", &[("connection", "keep-alive")]),
        ("te other than trailers", &[("te", "gzip")]),
        ("content-length without DATA", &[("content-length", "5")]),
    ];
    let mut stream = 1;
    for (what, extra) in cases {
        c.request(stream, "/", extra, true).await;
        assert_eq!(c.reset(stream).await, PROTOCOL_ERROR, "{what}");
        stream += 2;
    }
    // No :path.
    let block = c.block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", HOST),
    ]);
    c.send(HEADERS, END_HEADERS | END_STREAM, stream, &block)
        .await;
    assert_eq!(c.reset(stream).await, PROTOCOL_ERROR);
    stream += 2;
    // DATA not adding up to content-length.
    c.request(
        stream,
        "/",
        &[(":method", "POST"), ("content-length", "10")],
        false,
    )
    .await;
    c.send(DATA, END_STREAM, stream, b"abc").await;
    assert_eq!(c.reset(stream).await, PROTOCOL_ERROR);
    stream += 2;
    // The connection still serves.
    c.request(stream, "/after", &[], true).await;
    let a = c.answer(stream).await;
    assert_eq!(a.status(), "200");
    assert_eq!(a.body, b"app saw /after");
}

#[tokio::test]
async fn a_field_block_may_continue_and_a_large_one_is_answered_431() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    let block = c.block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", HOST),
        (":path", "/continued"),
        ("x-filler", &"f".repeat(100)),
    ]);
    let (a, rest) = block.split_at(10);
    let (b, d) = rest.split_at(40);
    c.send(HEADERS, END_STREAM, 1, a).await;
    c.send(CONTINUATION, 0, 1, b).await;
    c.send(CONTINUATION, END_HEADERS, 1, d).await;
    let answer = c.answer(1).await;
    assert_eq!(answer.body, b"app saw /continued");

    let options = ProxyOptions {
        max_header_bytes: 1024,
        ..ProxyOptions::default()
    };
    let small = setup_with(options).await;
    let mut c = Raw::connect(small.addr, &[]).await;
    let huge = "h".repeat(2000);
    c.request(1, "/", &[("x-huge", &huge)], true).await;
    assert_eq!(c.answer(1).await.status(), "431");
    // The decoder stayed in step: the same fields, indexed now, decode.
    c.request(3, "/fine", &[], true).await;
    assert_eq!(c.answer(3).await.body, b"app saw /fine");
}

#[tokio::test]
async fn responses_wait_for_the_clients_windows() {
    let s = setup().await;
    // A stream window of 1000 bytes.
    let mut c = Raw::connect(s.addr, &[(0x4, 1000)]).await;
    c.request(1, "/big?size=200000", &[], true).await;
    let mut got = 0usize;
    let mut head = false;
    // Until the window is spent.
    while got < 1000 {
        let f = c.next().await.unwrap();
        match f.kind {
            HEADERS => head = true,
            DATA => got += f.payload.len(),
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert!(head);
    assert_eq!(got, 1000);
    // Nothing more comes until the client gives credit.
    let more = c.silent().await;
    assert!(more.is_ok(), "data past the stream's window: {more:?}");
    // The stream's window opened wide: the connection's (65,535 bytes) is the limit now.
    c.send(WINDOW_UPDATE, 0, 1, &0x7fff_0000u32.to_be_bytes())
        .await;
    while got < 65_535 {
        let f = c.next().await.unwrap();
        assert_eq!(f.kind, DATA);
        got += f.payload.len();
        assert!(
            f.payload.len() <= 16_384,
            "frames no larger than the client allows"
        );
    }
    assert_eq!(got, 65_535);
    let more = c.silent().await;
    assert!(more.is_ok(), "data past the connection's window: {more:?}");
    c.send(WINDOW_UPDATE, 0, 0, &1_000_000u32.to_be_bytes())
        .await;
    got += c.data_to_end().await;
    assert_eq!(got, 200_000);
}

#[tokio::test]
async fn a_request_body_flows_on_the_credit_the_server_gives_back() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // The server announces 1 MiB windows; send 3 MiB, waiting for credit when out of it.
    let total = 3 * 1024 * 1024;
    c.request(
        1,
        "/upload",
        &[(":method", "POST"), ("content-length", &total.to_string())],
        false,
    )
    .await;
    let mut conn_window: i64 = 65_535;
    let mut stream_window: i64 = 65_535;
    let mut sent = 0usize;
    let chunk = vec![b'u'; 16_384];
    while sent < total {
        while conn_window < chunk.len() as i64 || stream_window < chunk.len() as i64 {
            let f = c.frame().await.expect("credit comes");
            match f.kind {
                SETTINGS if f.flags & ACK == 0 => {
                    // SETTINGS_INITIAL_WINDOW_SIZE sets every stream's window.
                    for s in f.payload.chunks(6) {
                        if u16::from_be_bytes([s[0], s[1]]) == 0x4 {
                            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                            stream_window += i64::from(v) - 65_535;
                        }
                    }
                    c.send(SETTINGS, ACK, 0, &[]).await;
                }
                WINDOW_UPDATE => {
                    let inc = i64::from(f.code() & 0x7fff_ffff);
                    if f.stream == 0 {
                        conn_window += inc;
                    } else {
                        stream_window += inc;
                    }
                }
                SETTINGS | PING => {}
                _ => panic!("unexpected {f:?} before the body is sent"),
            }
        }
        let n = chunk.len().min(total - sent);
        sent += n;
        let end = if sent == total { END_STREAM } else { 0 };
        c.send(DATA, end, 1, &chunk[..n]).await;
        conn_window -= n as i64;
        stream_window -= n as i64;
    }
    let a = c.answer(1).await;
    assert_eq!(a.status(), "200");
    assert_eq!(String::from_utf8(a.body).unwrap(), format!("got {total}"));
}

#[tokio::test]
async fn data_past_the_windows_is_a_flow_control_error() {
    // One request at a time: a second one waits in the queue, its body unread.
    let instance = instance().await;
    let routes = Arc::new(RouteTable::new());
    let config = ServiceConfig {
        max_concurrency: 1,
        ..ServiceConfig::default()
    };
    let _events = common::route(&routes, HOST, config, instance.addr);
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let addr = proxy.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut c = Raw::connect(addr, &[]).await;
    c.request(1, "/hold", &[], true).await;
    reached(&instance.holding, "the first request holds the only slot").await;
    // The server's windows are 1 MiB (its SETTINGS and first WINDOW_UPDATE), and nothing is
    // read of the queued request's body: 1 MiB and one byte is past them.
    c.request(3, "/upload", &[(":method", "POST")], false).await;
    let chunk = vec![b'u'; 16_384];
    for _ in 0..64 {
        c.send(DATA, 0, 3, &chunk).await;
    }
    c.send(DATA, 0, 3, b"x").await;
    assert_eq!(c.goaway().await, FLOW_CONTROL_ERROR);
}

#[tokio::test]
async fn a_client_reset_cancels_the_request_at_the_instance() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    c.request(1, "/hold", &[], true).await;
    reached(&s.instance.holding, "the request reaches the instance").await;
    c.send(RST_STREAM, 0, 1, &8u32.to_be_bytes()).await;
    reached(&s.instance.dropped, "the instance's request is cancelled").await;
    // The connection serves on, and the instance's slot is free again.
    c.request(3, "/next", &[], true).await;
    assert_eq!(c.answer(3).await.body, b"app saw /next");
    let pool = s.proxy.routes().lookup(HOST).unwrap().pool.clone();
    assert_eq!(pool.in_flight("i0"), Some(0));
}

#[tokio::test]
async fn shutdown_sends_goaway_and_finishes_the_open_streams() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // A slow upload keeps stream 1 open across the shutdown.
    c.request(1, "/upload", &[(":method", "POST")], false).await;
    c.send(DATA, 0, 1, b"part one ").await;
    // A PING answered: what came before it was read.
    c.send(PING, 0, 0, b"in order").await;
    loop {
        let f = c.frame().await.unwrap();
        if f.kind == PING && f.flags == ACK {
            break;
        }
    }
    let proxy = Arc::new(s.proxy);
    let shutting = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.shutdown(Duration::from_secs(10)).await })
    };
    // First a GOAWAY naming the highest stream there can be (requests on their way are still
    // taken) with a PING, then, once the PING is answered (`next` answers it), the one naming
    // the last stream taken.
    let last = |f: &Frame| u32::from_be_bytes(f.payload[..4].try_into().unwrap());
    let f = c.next().await.unwrap();
    assert_eq!(
        (f.kind, f.code(), last(&f)),
        (GOAWAY, NO_ERROR, 0x7fff_ffff)
    );
    let f = c.next().await.unwrap();
    assert_eq!((f.kind, f.code()), (GOAWAY, NO_ERROR));
    assert_eq!(last(&f), 1, "the last stream it will answer");
    // Streams opened after the GOAWAY are ignored, and so is what follows on them (DATA, a
    // reset); the open one is finished.
    c.request(3, "/late", &[(":method", "POST")], false).await;
    c.send(DATA, 0, 3, b"late body").await;
    c.request(5, "/late", &[], true).await;
    c.send(RST_STREAM, 0, 5, &8u32.to_be_bytes()).await;
    c.send(DATA, END_STREAM, 1, b"part two").await;
    let a = c.answer(1).await;
    assert_eq!(String::from_utf8(a.body).unwrap(), "got 17");
    assert!(
        c.frame().await.is_none(),
        "closed once its streams are done"
    );
    let report = shutting.await.unwrap();
    assert_eq!(report.forced, 0);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    c.request(
        1,
        "/upload",
        &[
            (":method", "POST"),
            ("expect", "100-continue"),
            ("content-length", "4"),
        ],
        false,
    )
    .await;
    let f = c.next().await.unwrap();
    assert_eq!(f.kind, HEADERS);
    assert_eq!(f.flags & END_STREAM, 0);
    let fields = c.decoder.decode(&f.payload).unwrap();
    assert_eq!(fields[0], (b":status".to_vec(), b"100".to_vec()));
    c.send(DATA, END_STREAM, 1, b"body").await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), "200");
    assert_eq!(a.body, b"got 4");
}

#[tokio::test]
async fn priority_frames_are_read_and_checked() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // On an idle stream: allowed, and even a wrong one is not answered (no reset of a
    // stream never opened).
    c.send(PRIORITY, 0, 9, &[0, 0, 0, 0, 16]).await;
    c.send(PRIORITY, 0, 7, &[0, 0, 0, 7, 16]).await;
    // On an open stream, depending on itself: that stream is reset.
    c.request(3, "/upload", &[(":method", "POST")], false).await;
    c.send(PRIORITY, 0, 3, &[0, 0, 0, 3, 16]).await;
    assert_eq!(c.reset(3).await, PROTOCOL_ERROR);
    c.request(11, "/still", &[], true).await;
    assert_eq!(c.answer(11).await.body, b"app saw /still");
}

#[tokio::test]
async fn an_early_answer_stops_the_upload_and_what_was_in_flight_is_dropped() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // An unknown host: answered at once, the body never read.
    let block = c.block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "nope.test"),
        (":path", "/"),
    ]);
    c.send(HEADERS, END_HEADERS, 1, &block).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), "404");
    assert_eq!(
        c.reset(1).await,
        NO_ERROR,
        "the rest of the upload is not wanted"
    );
    // The client's DATA and trailers, sent before it saw the reset, are dropped.
    c.send(DATA, 0, 1, b"late data").await;
    let trailers = c.block(&[("x-trailer", "1")]);
    c.send(HEADERS, END_HEADERS | END_STREAM, 1, &trailers)
        .await;
    c.request(3, "/after", &[], true).await;
    assert_eq!(c.answer(3).await.body, b"app saw /after");
}

#[tokio::test]
async fn a_client_resetting_request_after_request_is_cut_off() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // Each request opened and cancelled at once ("rapid reset"): past 200 in a second, the
    // connection ends.
    assert_eq!(
        cancel_flood(&mut c, RST_STREAM, &8u32.to_be_bytes()).await,
        0xb
    );
    // A connection that cancels now and then is served on.
    let mut c = Raw::connect(s.addr, &[]).await;
    c.request(1, "/hold", &[], true).await;
    c.send(RST_STREAM, 0, 1, &8u32.to_be_bytes()).await;
    c.request(3, "/fine", &[], true).await;
    assert_eq!(c.answer(3).await.body, b"app saw /fine");
}

#[tokio::test]
async fn a_field_block_in_too_many_pieces_ends_the_connection() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    c.send(HEADERS, 0, 1, &[0x82]).await;
    for _ in 0..100 {
        c.send(CONTINUATION, 0, 1, &[]).await;
    }
    assert_eq!(c.goaway().await, 0xb, "ENHANCE_YOUR_CALM");
}

#[tokio::test]
async fn hyper_serves_http2_when_the_own_server_is_off() {
    let options = ProxyOptions {
        own_http2: false,
        ..ProxyOptions::default()
    };
    let s = setup_with(options).await;
    let mut c = Raw::connect(s.addr, &[]).await;
    c.request(1, "/by-hyper", &[], true).await;
    let a = c.answer(1).await;
    assert_eq!(a.status(), "200");
    assert_eq!(a.body, b"app saw /by-hyper");
    // hyper's server answers a malformed request with a reset too, its own way.
    c.request(3, "/", &[("connection", "x")], true).await;
    assert_eq!(c.reset(3).await, PROTOCOL_ERROR);
}

#[tokio::test]
async fn an_instance_answering_before_the_upload_ends_stops_it_and_credit_is_not_lost() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // The instance answers 204 before reading: the rest of the upload is refused with
    // RST_STREAM(NO_ERROR) once nobody reads it.
    c.request(1, "/early", &[(":method", "POST")], false).await;
    c.send(DATA, 0, 1, &[b'e'; 1000]).await;
    let mut answered = false;
    loop {
        let f = c.next().await.expect("the connection stays open");
        match f.kind {
            HEADERS => {
                let fields = c.decoder.decode(&f.payload).unwrap();
                assert_eq!(fields[0], (b":status".to_vec(), b"204".to_vec()));
                answered = true;
            }
            RST_STREAM => {
                assert_eq!((f.stream, f.code()), (1, NO_ERROR));
                break;
            }
            DATA => {}
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert!(answered);
    // Uploads one after another, each whole, 4 MiB in all: four times the connection window
    // the server gave. Credit lost on any of them would stall the ones after.
    let chunk = vec![b'u'; 16_384];
    let mut conn_window: i64 = 1024 * 1024 - 1000;
    let mut stream = 3;
    for n in 0..32 {
        let path = if n % 2 == 0 { "/early" } else { "/upload" };
        let size = 128 * 1024;
        let length = size.to_string();
        c.request(
            stream,
            path,
            &[(":method", "POST"), ("content-length", &length)],
            false,
        )
        .await;
        let mut sent = 0;
        while sent < size {
            while conn_window < chunk.len() as i64 {
                let f = c.frame().await.expect("credit comes");
                match f.kind {
                    WINDOW_UPDATE if f.stream == 0 => conn_window += i64::from(f.code()),
                    SETTINGS if f.flags & ACK == 0 => c.send(SETTINGS, ACK, 0, &[]).await,
                    _ => {}
                }
            }
            sent += chunk.len();
            let end = if sent >= size { END_STREAM } else { 0 };
            c.send(DATA, end, stream, &chunk).await;
            conn_window -= chunk.len() as i64;
        }
        stream += 2;
    }
    c.request(stream, "/done", &[], true).await;
    assert_eq!(c.answer(stream).await.body, b"app saw /done");
}

#[tokio::test]
async fn streams_the_server_must_reset_count_as_cancelled_requests() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    // Each request sent on, then made to fail by a WINDOW_UPDATE of 0 on its stream ("made
    // you reset"): the server's resets of unanswered requests count like the client's own.
    assert_eq!(cancel_flood(&mut c, WINDOW_UPDATE, &[0; 4]).await, 0xb);
}

#[tokio::test]
async fn a_request_sent_as_the_shutdown_begins_is_still_answered() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    c.request(1, "/first", &[], true).await;
    assert_eq!(c.answer(1).await.body, b"app saw /first");
    let proxy = Arc::new(s.proxy);
    let shutting = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.shutdown(Duration::from_secs(10)).await })
    };
    // The first GOAWAY; a request crosses it before the client answers the PING.
    let ping = loop {
        let f = c.frame().await.expect("GOAWAY and PING come");
        if f.kind == PING && f.flags & ACK == 0 {
            break f.payload;
        }
    };
    c.request(3, "/between", &[], true).await;
    c.send(PING, ACK, 0, &ping).await;
    // The answer and the last GOAWAY, in either order.
    let (mut last, mut body, mut ended) = (None, Vec::new(), false);
    while last.is_none() || !ended {
        let f = c.next().await.expect("the answer and the GOAWAY come");
        match f.kind {
            GOAWAY => last = Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap())),
            DATA if f.stream == 3 => {
                body.extend_from_slice(&f.payload);
                ended = f.flags & END_STREAM != 0;
            }
            HEADERS if f.stream == 3 => {
                let _ = c.decoder.decode(&f.payload).unwrap();
                ended = f.flags & END_STREAM != 0;
            }
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(
        last,
        Some(3),
        "the request that crossed the first GOAWAY is taken"
    );
    assert_eq!(body, b"app saw /between");
    assert!(
        c.frame().await.is_none(),
        "closed once its streams are done"
    );
    assert_eq!(shutting.await.unwrap().forced, 0);
}

/// Opens 300 requests that wait at the instance, each followed at once by a `kind` frame
/// with `payload` on its stream; the code of the GOAWAY that ends it (ENHANCE_YOUR_CALM, 0xb,
/// expected).
async fn cancel_flood(c: &mut Raw, kind: u8, payload: &[u8]) -> u32 {
    let mut stream = 1;
    for _ in 0..300 {
        c.request(stream, "/hold", &[], true).await;
        c.send(kind, 0, stream, payload).await;
        stream += 2;
    }
    c.goaway().await
}

#[tokio::test]
async fn a_client_that_stops_sending_still_gets_its_answers() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[]).await;
    c.request(1, "/asked", &[], true).await;
    // An upload left unfinished: it fails, and takes nothing else with it.
    c.request(3, "/upload", &[(":method", "POST")], false).await;
    c.send(DATA, 0, 3, b"half").await;
    // No more from the client (its write side shut).
    c.io.shutdown().await.unwrap();
    let a = c.answer(1).await;
    assert_eq!(a.body, b"app saw /asked");
    // Then the server closes too.
    loop {
        match c.frame().await {
            None => break,
            Some(f) => assert!(f.stream != 1, "nothing more on stream 1: {f:?}"),
        }
    }
}

#[tokio::test]
async fn a_window_the_client_changes_mid_stream_applies_at_once() {
    let s = setup().await;
    let mut c = Raw::connect(s.addr, &[(0x4, 1000)]).await;
    c.request(1, "/big?size=50000", &[], true).await;
    let mut got = 0usize;
    while got < 1000 {
        let f = c.next().await.unwrap();
        if f.kind == DATA {
            got += f.payload.len();
        }
    }
    assert_eq!(got, 1000);
    // SETTINGS_INITIAL_WINDOW_SIZE 3000: the open stream's window grows by 2000.
    let mut settings = Vec::new();
    settings.extend_from_slice(&4u16.to_be_bytes());
    settings.extend_from_slice(&3000u32.to_be_bytes());
    c.send(SETTINGS, 0, 0, &settings).await;
    while got < 3000 {
        let f = c.next().await.unwrap();
        assert_eq!(f.kind, DATA);
        got += f.payload.len();
    }
    assert_eq!(got, 3000);
    let more = c.silent().await;
    assert!(more.is_ok(), "data past the new window: {more:?}");
    // Lowered below what was sent: the window is negative, nothing comes after an update
    // that does not lift it above zero.
    let mut settings = Vec::new();
    settings.extend_from_slice(&4u16.to_be_bytes());
    settings.extend_from_slice(&1000u32.to_be_bytes());
    c.send(SETTINGS, 0, 0, &settings).await;
    c.send(WINDOW_UPDATE, 0, 1, &1500u32.to_be_bytes()).await;
    let more = c.silent().await;
    assert!(
        more.is_ok(),
        "data with the window still below zero: {more:?}"
    );
    c.send(WINDOW_UPDATE, 0, 1, &100_000u32.to_be_bytes()).await;
    got += c.data_to_end().await;
    assert_eq!(got, 50_000);
}

/// A CPU control whose throttle, once armed, takes [`SLOW_THROTTLE`] (a cgroup write on a busy
/// host, exaggerated).
#[derive(Default)]
struct SlowThrottle {
    armed: AtomicBool,
    throttles: AtomicUsize,
}

const SLOW_THROTTLE: Duration = Duration::from_secs(1);

impl lull_proxy::gate::CpuControl for SlowThrottle {
    fn restore(&self) -> Result<(), String> {
        Ok(())
    }
    fn throttle(&self) -> Result<(), String> {
        if self.armed.load(Ordering::SeqCst) {
            std::thread::sleep(SLOW_THROTTLE);
        }
        self.throttles.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn usage_ns(&self) -> Option<u64> {
        None
    }
}

/// The request is recorded (slot, CPU gate, metrics, log) once the response's last bytes went
/// out: the throttle after a request never delays its answer, here an empty one (ending with
/// its head) and one with a body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_recorded_after_its_answer_is_written() {
    let instance = instance().await;
    let routes = Arc::new(RouteTable::new());
    let (tx, _events) = tokio::sync::mpsc::unbounded_channel();
    let pool = Pool::new(HOST, Arc::new(ServiceConfig::default()), tx);
    let cpu = Arc::new(SlowThrottle::default());
    pool.add_instance(InstanceSpec {
        id: "slow".into(),
        addr: instance.addr,
        cpu: cpu.clone(),
    });
    pool.set_healthy("slow", true, "test");
    assert_eq!(cpu.throttles.load(Ordering::SeqCst), 1, "idle once healthy");
    routes.insert(HOST, Route::new(pool.clone(), "rev-1"));
    // The proxy on a thread of its own, as the daemon runs it: the slow throttle blocks that
    // thread, not the test's runtime (whose I/O would stall with it).
    let proxy = Proxy::new(routes, ProxyOptions::default());
    let runtimes = lull_proxy::server::spawn_runtimes(1, "h2-after-write").unwrap();
    let sockets = lull_proxy::server::bind_reuse_port("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = proxy.listen_on_sockets(sockets, &runtimes).unwrap();
    cpu.armed.store(true, Ordering::SeqCst);
    let mut c = Raw::connect(addr, &[]).await;
    for (stream, path, status) in [(1, "/a", "200"), (3, "/early", "204")] {
        let started = std::time::Instant::now();
        c.request(stream, path, &[], true).await;
        let a = c.answer(stream).await;
        let took = started.elapsed();
        assert_eq!(a.status(), status);
        assert!(
            took < SLOW_THROTTLE,
            "{path}: the answer waited {took:?} for the throttle"
        );
        // Recorded after: the slot is free again and the instance throttled.
        let throttled = (stream as usize).div_ceil(2) + 1;
        tokio::time::timeout(Duration::from_secs(10), async {
            while cpu.throttles.load(Ordering::SeqCst) < throttled {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{path}: the request was never recorded"));
        assert_eq!(pool.in_flight("slow"), Some(0));
    }
}

/// Waits (10 s at most) for `count` to leave 0.
async fn reached(count: &AtomicUsize, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while count.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("within 10 s: {what}"));
}
