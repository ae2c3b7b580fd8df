//! The real `lull daemon` as a child process over scratch dirs, for end-to-end tests: a generated
//! `lull.toml` (unique bridge, table, link prefix and subnet; HTTP and metrics on free loopback
//! ports), a small synchronous client of its admin socket, requests through its proxy, and a
//! guard that kills the daemon and removes every instance, the network and the dirs even when
//! the test fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::e2e::free_host_port;
use crate::http::Response;
use crate::scratch::{CgroupParentGuard, ScratchDir};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Per-daemon names for the instance network on the real host, so that runs never meet each
/// other, the CLI's tests or an installed lull.
#[derive(Debug, Clone)]
pub struct NetworkNames {
    pub bridge: String,
    pub table: String,
    pub veth_prefix: String,
    pub subnet: String,
}

impl NetworkNames {
    pub fn unique() -> NetworkNames {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = std::process::id()
            .wrapping_mul(31)
            .wrapping_add(nanos >> 10)
            .wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed));
        let tag = format!("{:04x}", n & 0xffff);
        NetworkNames {
            bridge: format!("ldb{tag}"),
            table: format!("lull_dmn_{tag}"),
            veth_prefix: format!("ldv{tag}"),
            subnet: format!("10.75.{}.0/24", n % 250),
        }
    }

    /// The CLI's environment for the same network (`lull rm`, `lull network down`).
    pub fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("LULL_BRIDGE", &self.bridge),
            ("LULL_NFT_TABLE", &self.table),
            ("LULL_VETH_PREFIX", &self.veth_prefix),
            ("LULL_SUBNET", &self.subnet),
        ]
    }
}

/// An answer of the admin API.
#[derive(Debug, Clone)]
pub struct ApiAnswer {
    pub status: u16,
    pub body: String,
}

impl ApiAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("admin API answer is not JSON ({e}): {}", self.body))
    }

    /// The answer's JSON lines (progress, events).
    pub fn lines(&self) -> Vec<Value> {
        self.body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("streamed line is not JSON ({e}): {l}"))
            })
            .collect()
    }
}

/// `lull daemon` over a scratch dir. Fields drop in order after [`Drop::drop`] killed the
/// daemon and removed its instances and network: the cgroups (whatever still runs in them is
/// killed), then the scratch dir (unmounted, removed).
pub struct TestDaemon {
    lull: PathBuf,
    child: Option<Child>,
    pub http_port: u16,
    pub metrics_port: u16,
    pub net: NetworkNames,
    ip_forward: String,
    pub cgroups: CgroupParentGuard,
    pub scratch: ScratchDir,
}

impl TestDaemon {
    /// Writes the daemon's `lull.toml`; [`TestDaemon::start`] runs it. `lull` is the binary
    /// (`env!("CARGO_BIN_EXE_lull")`).
    pub fn new(lull: &Path, prefix: &str) -> TestDaemon {
        let scratch = ScratchDir::new(prefix).expect("create scratch dir");
        let daemon = TestDaemon {
            lull: lull.to_owned(),
            child: None,
            http_port: free_host_port(),
            metrics_port: free_host_port(),
            net: NetworkNames::unique(),
            ip_forward: std::fs::read_to_string(IP_FORWARD).unwrap_or_else(|_| "0".into()),
            cgroups: CgroupParentGuard::new("lull-test"),
            scratch,
        };
        let config = format!(
            "data_dir = {data:?}\nrun_dir = {run:?}\nstop_grace = \"2s\"\nrollback_window = \"10m\"\n\
             \n[listeners]\nhttp = \"127.0.0.1:{http}\"\nhttps = \"off\"\n\
             \n[metrics]\naddress = \"127.0.0.1:{metrics}\"\n\
             \n[network]\nbridge = {bridge:?}\nsubnet = {subnet:?}\nnft_table = {table:?}\nveth_prefix = {veth:?}\n",
            data = daemon.data_dir().display().to_string(),
            run = daemon.run_dir().display().to_string(),
            http = daemon.http_port,
            metrics = daemon.metrics_port,
            bridge = daemon.net.bridge,
            subnet = daemon.net.subnet,
            table = daemon.net.table,
            veth = daemon.net.veth_prefix,
        );
        std::fs::write(daemon.config_path(), config).expect("write lull.toml");
        daemon
    }

    pub fn config_path(&self) -> PathBuf {
        self.scratch.path().join("lull.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.scratch.path().join("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("lull.sock")
    }

    /// Where every daemon run's stderr goes (appended).
    pub fn log_path(&self) -> PathBuf {
        self.scratch.path().join("daemon.log")
    }

    /// What the daemons wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.lull);
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--cgroup-parent")
            .arg(&self.cgroups.parent);
        for var in [
            "LULL_CONFIG",
            "LULL_DATA_DIR",
            "LULL_RUN_DIR",
            "LULL_CGROUP_PARENT",
            "LULL_UPLINK",
            "LULL_SUBNET6",
            "NOTIFY_SOCKET",
        ] {
            command.env_remove(var);
        }
        command.envs(self.net.env());
        command
    }

    /// Spawns `lull daemon --config lull.toml` (its stderr appended to [`TestDaemon::log_path`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the daemon's log");
        let child = self
            .command()
            .env("LULL_LOG", "info,libcgroups=error")
            .arg("daemon")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log's fd"))
            .stderr(log)
            .spawn()
            .expect("spawn lull daemon");
        self.child = Some(child);
    }

    /// Waits until the admin socket answers `GET /v1/status`; panics with the daemon's log if
    /// the daemon exits or `timeout` passes first.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(answer) = self.try_api("GET", "/v1/status", None)
                && answer.status == 200
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "lull daemon exited ({status}) before it answered:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "lull daemon did not answer on {} within {timeout:?}:\n{}",
                self.socket().display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Spawns the daemon and waits for its socket; returns how long that took.
    pub fn start(&mut self) -> Duration {
        let started = Instant::now();
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
        started.elapsed()
    }

    /// SIGKILLs the daemon and reaps it (its instances keep running, by design).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The daemon's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// One admin API call (`Connection: close`), read to its end.
    pub fn try_api(&self, method: &str, path: &str, body: Option<&Value>) -> io::Result<ApiAnswer> {
        let mut stream = UnixStream::connect(self.socket())?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let payload = body.map(Value::to_string).unwrap_or_default();
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: lull\r\nConnection: close\r\n");
        if body.is_some() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str(&format!(
            "Content-Length: {}\r\n\r\n{payload}",
            payload.len()
        ));
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let response = crate::http::parse(&raw)?;
        Ok(ApiAnswer {
            status: response.status,
            body: response.body,
        })
    }

    /// An admin API call that must succeed (2xx); panics with the answer and the log otherwise.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> ApiAnswer {
        let answer = self
            .try_api(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        assert!(
            (200..300).contains(&answer.status),
            "{method} {path} answered {}: {}",
            answer.status,
            answer.body
        );
        answer
    }

    pub fn api_json(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.api(method, path, body).json()
    }

    /// Follows an operation's progress to its end: its lines and the `end` object.
    pub fn follow(&self, operation: &str) -> (Vec<String>, Value) {
        let answer = self.api("GET", &format!("/v1/operations/{operation}/progress"), None);
        let mut lines = Vec::new();
        for value in answer.lines() {
            if let Some(line) = value.get("line").and_then(Value::as_str) {
                lines.push(line.to_owned());
            } else if let Some(end) = value.get("end") {
                return (lines, end.clone());
            }
        }
        panic!("operation {operation} ended without an end: {lines:?}");
    }

    /// The service's events, oldest first.
    pub fn events(&self, service: &str) -> Vec<Value> {
        self.api("GET", &format!("/v1/services/{service}/events"), None)
            .lines()
    }

    /// Runs a `lull` client command over the daemon's dirs, cgroup parent and network.
    pub fn lull(&self, args: &[&str]) -> Output {
        self.command()
            .env_remove("LULL_LOG")
            .args(args)
            .output()
            .expect("run the lull binary")
    }

    /// Instance ids that have a dir under `<data_dir>/instances`.
    pub fn instance_dirs(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.data_dir().join("instances"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Ids `lull ps` lists.
    pub fn ps(&self) -> Vec<String> {
        let out = self.lull(&["ps"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- lull daemon log ----\n{}\n---- end ----", self.log());
        }
        let mut ids = self.ps();
        ids.extend(self.instance_dirs());
        ids.sort();
        ids.dedup();
        for id in ids {
            let _ = self.lull(&["rm", &id]);
        }
        let _ = self.lull(&["network", "down", "--force"]);
        let _ = std::fs::write(IP_FORWARD, &self.ip_forward);
    }
}

/// One request through the proxy with a `Host` header, on a connection of its own.
pub fn proxy_get(port: u16, host: &str, path: &str, timeout: Duration) -> io::Result<Response> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    crate::http::parse(&raw)
}

/// Retries [`proxy_get`] until it answers `status` or `timeout` passes; returns the answer and
/// how long it took.
pub fn wait_for_status(
    port: u16,
    host: &str,
    status: u16,
    timeout: Duration,
) -> Result<(Response, Duration), String> {
    let started = Instant::now();
    let mut last;
    loop {
        match proxy_get(port, host, "/", Duration::from_secs(2)) {
            Ok(r) if r.status == status => return Ok((r, started.elapsed())),
            Ok(r) => last = format!("{} {}", r.status, r.body.trim()),
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{host} did not answer {status} within {timeout:?}; last: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a [`LoadLoop`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    /// Errors and non-200 answers, each described (the first 20 kept).
    pub failed: u64,
    pub failures: Vec<String>,
    /// Connections opened (one per worker, plus one after each close by the proxy).
    pub connections: u64,
}

/// Workers doing keep-alive `GET /` through the proxy back to back until stopped.
pub struct LoadLoop {
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<LoadReport>>,
}

impl LoadLoop {
    pub fn start(port: u16, host: &str, workers: usize) -> LoadLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                let host = host.to_owned();
                std::thread::spawn(move || load_worker(port, &host, &stop))
            })
            .collect();
        LoadLoop { stop, workers }
    }

    /// Stops the workers and adds up what they saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        for worker in self.workers {
            let report = worker.join().expect("a load worker panicked");
            total.sent += report.sent;
            total.ok += report.ok;
            total.failed += report.failed;
            total.connections += report.connections;
            for f in report.failures {
                if total.failures.len() < 20 {
                    total.failures.push(f);
                }
            }
        }
        total
    }
}

fn load_worker(port: u16, host: &str, stop: &AtomicBool) -> LoadReport {
    let mut report = LoadReport::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            report.connections += 1;
            match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                s.set_nodelay(true)?;
                Ok(s)
            }) {
                Ok(s) => conn = Some(BufReader::new(s)),
                Err(e) => {
                    report.sent += 1;
                    report.fail(format!("connect: {e}"));
                    continue;
                }
            }
        }
        let Some(reader) = conn.as_mut() else {
            continue;
        };
        report.sent += 1;
        let result = reader
            .get_mut()
            .write_all(request.as_bytes())
            .and_then(|()| read_response(reader));
        match result {
            Ok((status, close, body)) => {
                if status == 200 {
                    report.ok += 1;
                } else {
                    report.fail(format!("{status} {}", body.trim()));
                }
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                report.fail(format!("request {}: {e}", report.sent));
                conn = None;
            }
        }
    }
    report
}

impl LoadReport {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// Reads one response off a keep-alive connection: status, whether the server closes the
/// connection after it, body (Content-Length or chunked).
fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, bool, String)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the answer",
        ));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0usize;
    let mut chunked = false;
    let mut close = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim().to_ascii_lowercase();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    length = value
                        .parse()
                        .map_err(|_| io::Error::other(format!("bad content-length {value}")))?
                }
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    }
    Ok((status, close, String::from_utf8_lossy(&body).into_owned()))
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp (`2026-11-26T06:30:01.123Z`).
pub fn rfc3339_millis(text: &str) -> Option<i64> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let millis = format!("{fraction:0<3}").get(..3)?.parse::<i64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60 * 1000 + s * 1000 + millis)
}

/// Milliseconds since the epoch now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_read_as_epoch_millis() {
        assert_eq!(rfc3339_millis("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_millis("1970-01-02T00:00:01.5Z"), Some(86_401_500));
        assert_eq!(
            rfc3339_millis("2026-11-26T06:30:01.123Z"),
            Some(1_795_674_601_123)
        );
        assert_eq!(rfc3339_millis("2026-11-26 06:30:01Z"), None);
    }
}
