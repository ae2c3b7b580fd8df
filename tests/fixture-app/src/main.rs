//! The web app lull's tests and benchmarks deploy: a small HTTP/1.1 server using only std, built
//! as a static binary so it runs in an image with nothing else in it.
//!
//! Endpoints: `/` (greeting), `/healthz`, `/sleep?ms=N`, `/burn?ms=N`, `/env`, `/headers` (the
//! request's headers, a `name: value` line each, names lowercased), `/echo` (streams
//! the request body back), `/log?lines=N` (writes lines to stdout), `/bytes?n=N` (streams N bytes
//! of a fixed pattern, for throughput tests). Environment: `PORT` (default 8080), `SPIN=1` (a
//! thread spinning forever), `LOG_EVERY_MS=N` (a `tick <seq>` line every N ms).

mod http;

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use http::{Body, BodyKind, ParseError, Request, Version};

/// How long an idle keep-alive connection waits for its next request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Upper bound for `ms` parameters (one hour).
const MAX_MS: u64 = 3_600_000;
/// Upper bound for `/log?lines=N`.
const MAX_LOG_LINES: u64 = 10_000_000;
/// Upper bound for `/bytes?n=N` (64 GiB): enough for any throughput test, small enough that a
/// typo cannot keep a connection busy for hours.
const MAX_BYTES: u64 = 64 << 30;
/// `/bytes` writes its body in pieces of this size, straight to the socket: the whole body is
/// never held in memory.
const BYTES_PIECE: usize = 256 * 1024;

mod signals {
    use std::os::raw::c_int;

    const SIGINT: c_int = 2;
    const SIGTERM: c_int = 15;

    unsafe extern "C" {
        fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
        fn _exit(status: c_int) -> !;
    }

    extern "C" fn exit_now(_signum: c_int) {
        // SAFETY: _exit is async-signal-safe; it ends the process without running any Rust code.
        // Stdout is line-buffered, so every complete line has already been written.
        unsafe { _exit(0) }
    }

    /// Makes SIGTERM and SIGINT end the process with status 0. As PID 1 of a pid namespace the
    /// default action for both is to ignore them, so an explicit handler is needed.
    pub fn exit_on_term() {
        for signum in [SIGTERM, SIGINT] {
            // SAFETY: signal() with a handler that only calls the async-signal-safe _exit; the
            // handler is a plain `extern "C" fn` with the signature the C library expects.
            unsafe {
                signal(signum, exit_now);
            }
        }
    }
}

struct Config {
    port: u16,
    spin: bool,
    log_every: Option<Duration>,
}

fn config_from_env() -> Result<Config, String> {
    let port = match std::env::var("PORT") {
        Ok(v) => v
            .parse::<u16>()
            .map_err(|_| format!("invalid PORT {v:?}: expected a port number"))?,
        Err(_) => 8080,
    };
    let spin = std::env::var("SPIN").is_ok_and(|v| v == "1");
    let log_every = match std::env::var("LOG_EVERY_MS") {
        Ok(v) => {
            let ms =
                v.parse::<u64>().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    format!("invalid LOG_EVERY_MS {v:?}: expected milliseconds > 0")
                })?;
            Some(Duration::from_millis(ms))
        }
        Err(_) => None,
    };
    Ok(Config {
        port,
        spin,
        log_every,
    })
}

/// Binds `[::]:port` (dual-stack where the host allows it) and `0.0.0.0:port`; one of the two
/// binds failing is fine as long as IPv4 is served.
fn bind(port: u16) -> io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    let v6 = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    let port = match &v6 {
        Ok(l) => l.local_addr()?.port(),
        Err(_) => port,
    };
    match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
        Ok(l) => listeners.push(l),
        // A dual-stack [::] socket already covers IPv4.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && v6.is_ok() => {}
        Err(e) => return Err(e),
    }
    if let Ok(l) = v6 {
        listeners.push(l);
    }
    Ok(listeners)
}

fn main() -> ExitCode {
    signals::exit_on_term();
    let config = match config_from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fixture-app: {e}");
            return ExitCode::from(2);
        }
    };
    let listeners = match bind(config.port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fixture-app: listen on port {}: {e}", config.port);
            return ExitCode::from(1);
        }
    };
    let port = listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .map_or(config.port, |a| a.port());

    if config.spin {
        thread::spawn(|| {
            let mut x = 1u64;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
    }
    if let Some(every) = config.log_every {
        thread::spawn(move || tick(every));
    }

    // Not println!: a closed stdout must not stop the server.
    let _ = writeln!(io::stdout().lock(), "listening on :{port}");

    let mut accept_threads = Vec::new();
    for listener in listeners {
        accept_threads.push(thread::spawn(move || accept_loop(listener)));
    }
    for t in accept_threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

/// Writes `tick <seq>` every `every`, on a fixed schedule so slow writes do not drift it.
fn tick(every: Duration) {
    let start = Instant::now();
    let mut seq: u64 = 1;
    loop {
        // A failed write (stdout closed) must not kill the app; the gap in the sequence shows it.
        let _ = writeln!(io::stdout().lock(), "tick {seq}");
        let next = start + every * u32::try_from(seq).unwrap_or(u32::MAX);
        seq += 1;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

fn accept_loop(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let spawned = thread::Builder::new().spawn(move || {
                    let _ = serve_connection(stream);
                });
                if let Err(e) = spawned {
                    eprintln!("fixture-app: spawn connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("fixture-app: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_connection(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(16 * 1024, stream);
    loop {
        writer.get_ref().set_read_timeout(Some(IDLE_TIMEOUT))?;
        // Wait for the first byte of the next request under the idle timeout, then read the
        // rest of the head without one.
        if reader.fill_buf()?.is_empty() {
            return Ok(());
        }
        writer.get_ref().set_read_timeout(None)?;
        let req = match http::read_request(&mut reader) {
            Ok(req) => req,
            Err(ParseError::Closed) => return Ok(()),
            Err(ParseError::Io(e)) => return Err(e),
            Err(ParseError::Bad(why)) => {
                let resp = Response::text(400, format!("{why}\n"));
                resp.write(&mut writer, Version::Http11, false, false)?;
                return Ok(());
            }
        };
        if req.expect_continue && req.body != BodyKind::Empty {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        let mut body = Body::new(req.body, &mut reader);
        let keep_alive = handle(&req, &mut body, &mut writer)?;
        // Leave the connection at the start of the next request.
        body.drain()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            body: body.into(),
        }
    }

    fn write(
        &self,
        w: &mut impl Write,
        version: Version,
        keep_alive: bool,
        head_only: bool,
    ) -> io::Result<()> {
        write!(
            w,
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        )?;
        write_connection(w, version, keep_alive)?;
        w.write_all(b"\r\n")?;
        if !head_only {
            w.write_all(&self.body)?;
        }
        w.flush()
    }
}

fn write_connection(w: &mut impl Write, version: Version, keep_alive: bool) -> io::Result<()> {
    match (version, keep_alive) {
        (_, false) => w.write_all(b"Connection: close\r\n"),
        (Version::Http10, true) => w.write_all(b"Connection: keep-alive\r\n"),
        (Version::Http11, true) => Ok(()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Serves one request. Returns whether the connection may be kept open.
fn handle<R: BufRead>(
    req: &Request,
    body: &mut Body<'_, R>,
    w: &mut BufWriter<TcpStream>,
) -> io::Result<bool> {
    let head_only = req.method == "HEAD";
    let keep_alive = req.keep_alive;
    if req.path == "/echo" && !head_only {
        return echo(req, body, w);
    }
    if req.path == "/bytes" {
        return match http::query_u64(&req.query, "n", MAX_BYTES) {
            Ok(n) => {
                stream_bytes(w, n, req.version, keep_alive, head_only)?;
                Ok(keep_alive)
            }
            Err(e) => {
                Response::text(400, format!("{e}\n")).write(
                    w,
                    req.version,
                    keep_alive,
                    head_only,
                )?;
                Ok(keep_alive)
            }
        };
    }
    let resp = route(req);
    resp.write(w, req.version, keep_alive, head_only)?;
    Ok(keep_alive)
}

fn route(req: &Request) -> Response {
    match req.path.as_str() {
        "/" => Response::text(200, "hello from lull fixture\n"),
        "/healthz" => Response::text(200, "ok"),
        "/sleep" => match http::query_u64(&req.query, "ms", MAX_MS) {
            Ok(ms) => {
                thread::sleep(Duration::from_millis(ms));
                Response::text(200, format!("slept {ms} ms\n"))
            }
            Err(e) => Response::text(400, format!("{e}\n")),
        },
        "/burn" => match http::query_u64(&req.query, "ms", MAX_MS) {
            Ok(ms) => {
                let iterations = burn(Duration::from_millis(ms));
                Response::text(200, format!("burned {ms} ms, {iterations} iterations\n"))
            }
            Err(e) => Response::text(400, format!("{e}\n")),
        },
        "/env" => {
            let mut vars: Vec<String> = std::env::vars_os()
                .map(|(k, v)| format!("{}={}\n", k.to_string_lossy(), v.to_string_lossy()))
                .collect();
            vars.sort();
            Response::text(200, vars.concat())
        }
        "/headers" => Response::text(
            200,
            req.headers
                .iter()
                .map(|(name, value)| format!("{name}: {value}\n"))
                .collect::<String>(),
        ),
        "/log" => match http::query_u64(&req.query, "lines", MAX_LOG_LINES) {
            Ok(lines) => match log_lines(lines) {
                Ok(()) => Response::text(200, format!("logged {lines} lines\n")),
                Err(e) => Response::text(500, format!("write stdout: {e}\n")),
            },
            Err(e) => Response::text(400, format!("{e}\n")),
        },
        _ => Response::text(404, "not found\n"),
    }
}

/// Spins the CPU for `wall` of wall-clock time; returns how many iterations it managed, which
/// drops when the process is CPU-throttled.
fn burn(wall: Duration) -> u64 {
    let start = Instant::now();
    let mut iterations: u64 = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    loop {
        for _ in 0..1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x = std::hint::black_box(x);
        }
        iterations += 1024;
        if start.elapsed() >= wall {
            return iterations;
        }
    }
}

fn log_lines(lines: u64) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut batch = String::with_capacity(64 * 1024);
    for i in 1..=lines {
        use std::fmt::Write as _;
        let _ = writeln!(batch, "log line {i} of {lines}");
        if batch.len() >= 60 * 1024 {
            out.write_all(batch.as_bytes())?;
            batch.clear();
        }
    }
    out.write_all(batch.as_bytes())?;
    out.flush()
}

/// The byte at offset `i` of every `/bytes` body: a repeating `a..z` pattern, so a client can
/// check what it received.
pub fn pattern_byte(i: u64) -> u8 {
    b'a' + (i % 26) as u8
}

/// Writes a `200` with `n` bytes of [`pattern_byte`] as its body (`Content-Length: n`), in
/// pieces of at most [`BYTES_PIECE`], so memory stays bounded whatever `n` is.
fn stream_bytes(
    w: &mut impl Write,
    n: u64,
    version: Version,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n"
    )?;
    write_connection(w, version, keep_alive)?;
    w.write_all(b"\r\n")?;
    w.flush()?;
    if head_only || n == 0 {
        return Ok(());
    }
    // A whole number of pattern periods, so every piece starts at offset 0 of the pattern.
    let piece_len = BYTES_PIECE - BYTES_PIECE % 26;
    let piece: Vec<u8> = (0..piece_len as u64).map(pattern_byte).collect();
    let mut left = n;
    while left > 0 {
        let take = usize::try_from(left).map_or(piece.len(), |l| l.min(piece.len()));
        w.write_all(&piece[..take])?;
        left -= take as u64;
    }
    w.flush()
}

/// Streams the request body back as it arrives: chunked for HTTP/1.1; for HTTP/1.0 with the
/// request's Content-Length, or delimited by closing the connection.
fn echo<R: BufRead>(
    req: &Request,
    body: &mut Body<'_, R>,
    w: &mut BufWriter<TcpStream>,
) -> io::Result<bool> {
    let (framing, keep_alive) = match (req.version, req.body) {
        (Version::Http11, _) => (Framing::Chunked, req.keep_alive),
        (Version::Http10, BodyKind::Length(n)) => (Framing::Length(n), req.keep_alive),
        (Version::Http10, BodyKind::Empty) => (Framing::Length(0), req.keep_alive),
        (Version::Http10, BodyKind::Chunked) => (Framing::Close, false),
    };
    write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    )?;
    match framing {
        Framing::Chunked => w.write_all(b"Transfer-Encoding: chunked\r\n")?,
        Framing::Length(n) => write!(w, "Content-Length: {n}\r\n")?,
        Framing::Close => {}
    }
    write_connection(w, req.version, keep_alive)?;
    w.write_all(b"\r\n")?;
    w.flush()?;

    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // The body broke off: the response cannot be completed properly, so end the
                // connection without the terminating chunk.
                let _ = w.flush();
                return Err(e);
            }
        };
        if framing == Framing::Chunked {
            write!(w, "{n:x}\r\n")?;
            w.write_all(&buf[..n])?;
            w.write_all(b"\r\n")?;
        } else {
            w.write_all(&buf[..n])?;
        }
        w.flush()?;
    }
    if framing == Framing::Chunked {
        w.write_all(b"0\r\n\r\n")?;
    }
    w.flush()?;
    Ok(keep_alive)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Chunked,
    Length(u64),
    Close,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path_and_query: &str) -> Response {
        let raw = format!("GET {path_and_query} HTTP/1.1\r\n\r\n");
        route(&http::read_request(&mut raw.as_bytes()).unwrap())
    }

    #[test]
    fn routes() {
        let r = get("/");
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"hello from lull fixture\n"[..])
        );
        let r = get("/healthz");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        assert_eq!(get("/nope").status, 404);
        assert_eq!(get("/sleep?ms=1").status, 200);
        assert_eq!(get("/log?lines=0").status, 200);
    }

    #[test]
    fn bad_parameters_are_400_naming_the_parameter() {
        for (path, name) in [
            ("/sleep?ms=x", "ms"),
            ("/sleep", "ms"),
            ("/burn?ms=-1", "ms"),
            ("/log?lines=many", "lines"),
        ] {
            let r = get(path);
            assert_eq!(r.status, 400, "{path}");
            let text = String::from_utf8(r.body).unwrap();
            assert!(text.contains(name), "{path}: {text}");
        }
    }

    #[test]
    fn burn_spins_for_the_wall_time() {
        let start = Instant::now();
        let iterations = burn(Duration::from_millis(30));
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(iterations >= 1024);
    }

    /// Records everything written and the largest single write.
    struct Recorder {
        data: Vec<u8>,
        largest_write: usize,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.largest_write = self.largest_write.max(buf.len());
            self.data.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn split_head(response: &[u8]) -> (String, &[u8]) {
        let end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head ends in CRLF CRLF")
            + 4;
        (
            String::from_utf8(response[..end].to_vec()).unwrap(),
            &response[end..],
        )
    }

    #[test]
    fn bytes_streams_exactly_n_pattern_bytes_in_bounded_pieces() {
        for n in [0u64, 1, 25, 26, 27, BYTES_PIECE as u64 * 3 + 7] {
            let mut out = Recorder {
                data: Vec::new(),
                largest_write: 0,
            };
            stream_bytes(&mut out, n, Version::Http11, true, false).unwrap();
            let (head, body) = split_head(&out.data);
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains(&format!("Content-Length: {n}\r\n")), "{head}");
            assert!(!head.contains("Connection: close"), "{head}");
            assert_eq!(body.len() as u64, n);
            for (i, byte) in body.iter().enumerate() {
                assert_eq!(*byte, pattern_byte(i as u64), "n={n}: byte {i}");
            }
            assert!(
                out.largest_write <= BYTES_PIECE,
                "n={n}: one write of {} bytes",
                out.largest_write
            );
        }
        let mut out = Recorder {
            data: Vec::new(),
            largest_write: 0,
        };
        stream_bytes(&mut out, 1000, Version::Http10, false, true).unwrap();
        let (head, body) = split_head(&out.data);
        assert!(head.contains("Content-Length: 1000\r\n"), "{head}");
        assert!(head.contains("Connection: close\r\n"), "{head}");
        assert!(body.is_empty(), "HEAD must not carry a body");
    }

    /// Serves one connection on a loopback listener and returns the whole response to `request`.
    fn exchange(request: &str) -> Vec<u8> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve_connection(stream)
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.write_all(request.as_bytes()).unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).unwrap();
        server.join().unwrap().unwrap();
        response
    }

    #[test]
    fn bytes_endpoint_over_a_socket() {
        let n = 1_000_003u64;
        let response = exchange(&format!(
            "GET /bytes?n={n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ));
        let (head, body) = split_head(&response);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Length: {n}\r\n")), "{head}");
        assert_eq!(body.len() as u64, n);
        assert!(
            body.iter()
                .enumerate()
                .all(|(i, b)| *b == pattern_byte(i as u64))
        );

        let too_many = MAX_BYTES + 1;
        let response = exchange(&format!(
            "GET /bytes?n={too_many} HTTP/1.1\r\nConnection: close\r\n\r\n"
        ));
        let (head, body) = split_head(&response);
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        let text = String::from_utf8_lossy(body);
        assert!(text.contains("invalid parameter n"), "{text}");

        let response = exchange("GET /bytes HTTP/1.1\r\nConnection: close\r\n\r\n");
        let (head, body) = split_head(&response);
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        assert!(String::from_utf8_lossy(body).contains("missing parameter n"));
    }

    #[test]
    fn headers_endpoint_lists_the_request_headers() {
        let response = exchange(
            "GET /headers HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 192.0.2.7\r\n\
             Connection: close\r\n\r\n",
        );
        let (head, body) = split_head(&response);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(
            String::from_utf8_lossy(body),
            "host: app.example\nx-forwarded-for: 192.0.2.7\nconnection: close\n"
        );
    }

    #[test]
    fn response_framing() {
        let mut out = Vec::new();
        Response::text(200, "ok")
            .write(&mut out, Version::Http10, true, false)
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\
             Connection: keep-alive\r\n\r\nok"
        );
        let mut out = Vec::new();
        Response::text(404, "x")
            .write(&mut out, Version::Http11, false, true)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n"), "HEAD must not carry a body");
    }
}
