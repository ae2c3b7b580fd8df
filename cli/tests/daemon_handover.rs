//! Privileged, end to end: the real `lull daemon` restarted under client load without a
//! refused connection or a failed request.
//!
//! - SIGUSR2, then `lull daemon upgrade`: the daemon replaces itself (its listening sockets
//!   passed at exec); the instances are adopted, not restarted; the old daemon exits 0; the
//!   new one serves and answers on the admin socket.
//! - A systemd restart, emulated: the test is the service manager (a notify socket that
//!   receives the daemon's `FDSTORE=1` sockets), SIGTERMs the daemon and starts the next one
//!   with those sockets in `LISTEN_FDS`.
//!
//! Each prints the longest request across the switch; the second also SIGKILLs the daemon
//! (a crash) with the sockets still in the fd store, and prints the gap that leaves. Preconditions: root and the registry
//! on 127.0.0.1:5000 with the fixture images (`cargo xtask fixtures`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lull_tests::daemon::{TestDaemon, wait_for_status};
use lull_tests::e2e::{FIXTURE_APP, require_registry, require_root};
use serde_json::json;

const HOST: &str = "web.localhost";

fn lull_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lull"))
}

/// Creates the fixture service and waits until it answers through the proxy.
fn create_service(d: &TestDaemon) {
    let created = d.api(
        "POST",
        "/v1/services",
        Some(&json!({"name": "web", "source": {"type": "image", "reference": FIXTURE_APP}})),
    );
    let op = created.json()["operation"]
        .as_str()
        .expect("an operation id")
        .to_owned();
    let (lines, end) = d.follow(&op);
    assert_eq!(end["state"], "succeeded", "{lines:#?}\n{end}");
    wait_for_status(d.http_port, HOST, 200, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
}

/// Instance id → pid, from `lull ps`.
fn instance_pids(d: &TestDaemon) -> BTreeMap<String, String> {
    let out = d.lull(&["ps"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let id = cols.next()?;
            let status = cols.next()?;
            let pid = cols.next()?;
            (status == "running").then(|| (id.to_owned(), pid.to_owned()))
        })
        .collect()
}

/// The pid listening on the admin socket (`SO_PEERCRED`).
fn daemon_pid(socket: &Path) -> std::io::Result<u32> {
    let stream = UnixStream::connect(socket)?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(cred.pid() as u32)
}

/// A process's state letter and exit code (the last field; meaningful for a zombie).
fn proc_state(pid: u32) -> Option<(String, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.last()?.parse().ok()?))
}

fn runs(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// Waits until `pid` has exited; returns its wait status when it is still a zombie.
fn wait_exit(pid: u32, within: Duration, d: &TestDaemon) -> Option<i64> {
    let deadline = Instant::now() + within;
    loop {
        match proc_state(pid) {
            None => return None,
            Some((state, code)) if state == "Z" || state == "X" => return Some(code),
            Some(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} still runs after {within:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Daemons that are not the test's children (started by a handover): SIGKILLed at the end,
/// before the [`TestDaemon`] cleans up (declare it after the daemon).
#[derive(Default)]
struct Successors(Vec<u32>);

impl Drop for Successors {
    fn drop(&mut self) {
        for pid in &self.0 {
            if runs(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let deadline = Instant::now() + Duration::from_secs(5);
                while runs(*pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    failed: u64,
    refused: u64,
    /// Kept-alive connections the proxy closed while idle (a drain), the request then sent
    /// again on a new connection, as HTTP clients do.
    resent: u64,
    connections: u64,
    longest: Duration,
    failures: Vec<String>,
}

impl Stats {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }

    fn add(&mut self, other: Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.refused += other.refused;
        self.resent += other.resent;
        self.connections += other.connections;
        self.longest = self.longest.max(other.longest);
        for f in other.failures {
            if self.failures.len() < 20 {
                self.failures.push(f);
            }
        }
    }
}

/// Clients hammering the proxy: some with a new connection per request, some kept alive.
struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<Stats>>,
}

impl Load {
    fn start(port: u16, short: usize, kept_alive: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for i in 0..short + kept_alive {
            let stop = stop.clone();
            workers.push(std::thread::spawn(move || {
                if i < short {
                    short_worker(port, &stop)
                } else {
                    kept_alive_worker(port, &stop)
                }
            }));
        }
        Load { stop, workers }
    }

    fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Stats::default();
        for w in self.workers {
            total.add(w.join().expect("a load worker panicked"));
        }
        total
    }
}

fn connect(port: u16, stats: &mut Stats) -> Option<TcpStream> {
    stats.connections += 1;
    match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
        Ok(s) => {
            s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
            s.set_nodelay(true).ok()?;
            Some(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            stats.refused += 1;
            stats.fail(format!("connect: {e}"));
            None
        }
        Err(e) => {
            stats.fail(format!("connect: {e}"));
            None
        }
    }
}

fn short_worker(port: u16, stop: &AtomicBool) -> Stats {
    let mut stats = Stats::default();
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let Some(mut stream) = connect(port, &mut stats) else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let mut raw = Vec::new();
        let result = stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.read_to_end(&mut raw));
        stats.longest = stats.longest.max(started.elapsed());
        match result {
            Ok(_) if raw.starts_with(b"HTTP/1.1 200") => stats.ok += 1,
            Ok(_) => stats.fail(format!(
                "answer: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(120)])
            )),
            Err(e) => stats.fail(format!("request: {e}")),
        }
    }
    stats
}

/// One response off a kept-alive connection: `Ok(None)` when the connection closed before
/// any byte of it.
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(u16, bool)>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed in the headers"));
        }
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().map_err(std::io::Error::other)?;
        } else if header.starts_with("connection:") && header.contains("close") {
            close = true;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some((status, close)))
}

fn kept_alive_worker(port: u16, stop: &AtomicBool) -> Stats {
    let mut stats = Stats::default();
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    let mut conn: Option<(BufReader<TcpStream>, u64)> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        loop {
            if conn.is_none() {
                match connect(port, &mut stats) {
                    Some(s) => conn = Some((BufReader::new(s), 0)),
                    None => break,
                }
            }
            let Some((reader, served)) = conn.as_mut() else {
                break;
            };
            let reused = *served > 0;
            let sent = reader.get_mut().write_all(request.as_bytes());
            let answer = sent.and_then(|()| read_response(reader));
            match answer {
                Ok(Some((status, close))) => {
                    *served += 1;
                    if status == 200 {
                        stats.ok += 1;
                    } else {
                        stats.fail(format!("status {status}"));
                    }
                    if close {
                        conn = None;
                    }
                    break;
                }
                // Closed while idle between two requests: send it again on a new one.
                Ok(None) if reused => {
                    stats.resent += 1;
                    conn = None;
                }
                Err(e) if reused && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    stats.resent += 1;
                    conn = None;
                }
                Ok(None) => {
                    stats.fail("a new connection closed without an answer".into());
                    conn = None;
                    break;
                }
                Err(e) => {
                    stats.fail(format!("request: {e}"));
                    conn = None;
                    break;
                }
            }
        }
        stats.longest = stats.longest.max(started.elapsed());
    }
    stats
}

fn report(test: &str, stats: &Stats, switch: Duration) {
    eprintln!(
        "[{test}] switch {:.1} ms; {} ok, {} failed, {} refused, {} resent after an idle close, {} connections; longest request {:.1} ms",
        switch.as_secs_f64() * 1e3,
        stats.ok,
        stats.failed,
        stats.refused,
        stats.resent,
        stats.connections,
        stats.longest.as_secs_f64() * 1e3
    );
}

fn assert_clean(stats: &Stats, d: &TestDaemon) {
    assert_eq!(
        stats.refused, 0,
        "refused connections: {:?}",
        stats.failures
    );
    assert_eq!(
        stats.failed,
        0,
        "failed requests: {:?}\n{}",
        stats.failures,
        d.log()
    );
    assert!(
        stats.ok > 100,
        "too little load to mean anything: {stats:?}"
    );
}

#[test]
fn sigusr2_and_upgrade_replace_the_daemon_without_a_refused_connection() {
    require_root();
    require_registry();
    let mut d = TestDaemon::new(lull_path(), "lull-handover");
    let mut successors = Successors::default();
    d.start();
    create_service(&d);
    let instances = instance_pids(&d);
    assert!(!instances.is_empty(), "no instance runs");
    let first = d.pid().expect("the daemon runs");
    assert_eq!(daemon_pid(&d.socket()).unwrap(), first);

    // 1. SIGUSR2 under load.
    let load = Load::start(d.http_port, 6, 2);
    std::thread::sleep(Duration::from_millis(500));
    let switch = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let status = wait_exit(first, Duration::from_secs(60), &d);
    let switched = switch.elapsed();
    let second =
        daemon_pid(&d.socket()).unwrap_or_else(|e| panic!("admin socket: {e}\n{}", d.log()));
    successors.0.push(second);
    std::thread::sleep(Duration::from_millis(800));
    let stats = load.stop();
    report("sigusr2", &stats, switched);
    assert_eq!(status, Some(0), "the old daemon's exit status\n{}", d.log());
    assert_ne!(second, first);
    assert!(runs(second), "the new daemon is not running\n{}", d.log());
    assert_clean(&stats, &d);
    assert_eq!(instance_pids(&d), instances, "instances were restarted");
    let status = d.api_json("GET", "/v1/services/web", None);
    assert_eq!(status["status"]["serving"], 1, "{status}");

    // 2. `lull daemon upgrade` under load: the same again, asked by the client command.
    let load = Load::start(d.http_port, 6, 2);
    std::thread::sleep(Duration::from_millis(500));
    let switch = Instant::now();
    let out = d.lull(&[
        "daemon",
        "--config",
        d.config_path().to_str().expect("a UTF-8 path"),
        "upgrade",
    ]);
    let switched = switch.elapsed();
    let third =
        daemon_pid(&d.socket()).unwrap_or_else(|e| panic!("admin socket: {e}\n{}", d.log()));
    successors.0.push(third);
    std::thread::sleep(Duration::from_millis(800));
    let stats = load.stop();
    report("upgrade", &stats, switched);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lull daemon upgrade: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    assert!(
        stdout.contains(&format!("pid {second} handed over to pid {third}")),
        "{stdout}"
    );
    assert!(!runs(second));
    assert!(runs(third));
    assert_clean(&stats, &d);
    assert_eq!(instance_pids(&d), instances, "instances were restarted");
    d.api("GET", "/v1/status", None);
}

/// The test as systemd: a notify socket, the fd store, `LISTEN_FDS` for the next daemon.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    /// FDNAME → fds stored (each name once: later duplicates are dropped, as systemd does
    /// with an fd it holds already).
    store: Vec<(String, OwnedFd)>,
}

impl Manager {
    fn new(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Manager {
            socket,
            path,
            store: Vec::new(),
        }
    }

    /// Receives messages until one says `READY=1`; returns every message.
    fn wait_ready(&mut self, within: Duration, d: &TestDaemon) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut messages = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "no READY=1 within {within:?}: {messages:?}\n{}",
                d.log()
            );
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 16]);
            let Ok(msg) = nix::sys::socket::recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                continue;
            };
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().expect("control messages") {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = cmsg {
                    // SAFETY: SCM_RIGHTS installed these fds in our table just now.
                    fds.extend(
                        raw.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let len = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).map(str::to_owned))
            };
            if field("FDSTORE=").as_deref() == Some("1") {
                let name = field("FDNAME=").unwrap_or_else(|| "stored".into());
                assert_eq!(fds.len(), 1, "one fd per FDSTORE message: {text}");
                if !self.store.iter().any(|(n, _)| *n == name) {
                    self.store
                        .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                }
            }
            let ready = field("READY=").as_deref() == Some("1");
            messages.push(text);
            if ready {
                return messages;
            }
        }
    }
}

/// `lull daemon` over `d`'s dirs with `NOTIFY_SOCKET`, and the stored fds passed as
/// systemd passes them (fds from 3, `LISTEN_PID` the daemon's own pid).
fn spawn_under_manager(d: &TestDaemon, manager: &Manager, passed: &[(String, OwnedFd)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(d.log_path())
        .unwrap();
    // `LISTEN_PID` must be the daemon's pid: a shell sets it to its own and execs lull.
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(lull_path())
        .arg("--data-dir")
        .arg(d.data_dir())
        .arg("--run-dir")
        .arg(d.run_dir())
        .arg("--cgroup-parent")
        .arg(&d.cgroups.parent)
        .arg("daemon")
        .arg("--config")
        .arg(d.config_path());
    for var in [
        "LULL_CONFIG",
        "LULL_DATA_DIR",
        "LULL_RUN_DIR",
        "LULL_CGROUP_PARENT",
        "LULL_UPLINK",
        "LULL_SUBNET6",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    ] {
        command.env_remove(var);
    }
    command
        .envs(d.net.env())
        .env("LULL_LOG", "info,libcgroups=error")
        .env("NOTIFY_SOCKET", &manager.path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if !passed.is_empty() {
        let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
        command
            .env("LISTEN_FDS", passed.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        // Above the range they go to, so that no dup2 clobbers another.
        let high: Vec<RawFd> = passed
            .iter()
            .map(|(_, fd)| {
                nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3 + passed.len() as RawFd + 64),
                )
                .expect("duplicate a stored fd")
            })
            .collect();
        // SAFETY: the hook only calls dup2 (async-signal-safe) on fds made before the fork.
        unsafe {
            command.pre_exec(move || {
                for (i, fd) in high.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn lull daemon");
        return child;
    }
    command.spawn().expect("spawn lull daemon")
}

/// Kills the daemons the test started itself (not through [`TestDaemon`]).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn a_systemd_restart_with_the_fd_store_refuses_no_connection() {
    require_root();
    require_registry();
    let d = TestDaemon::new(lull_path(), "lull-fdstore");
    let mut children = Children(Vec::new());
    let mut manager = Manager::new(d.scratch.path());

    children.0.push(spawn_under_manager(&d, &manager, &[]));
    let messages = manager.wait_ready(Duration::from_secs(60), &d);
    let names: Vec<&str> = manager.store.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"admin"), "{names:?} {messages:?}");
    assert!(names.contains(&"metrics"), "{names:?}");
    let http_prefix = format!("http-127.0.0.1-{}#", d.http_port);
    assert!(
        names.iter().any(|n| n.starts_with(&http_prefix)),
        "{names:?}"
    );
    create_service(&d);
    let instances = instance_pids(&d);
    assert!(!instances.is_empty());

    let load = Load::start(d.http_port, 6, 2);
    std::thread::sleep(Duration::from_millis(500));
    let switch = Instant::now();
    // systemctl restart: SIGTERM, wait for the exit, start the next with the stored fds.
    let mut first = children.0.pop().expect("the first daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = first.wait().unwrap();
    assert!(status.success(), "the first daemon: {status}\n{}", d.log());
    let stopped = switch.elapsed();
    let stored: Vec<(String, OwnedFd)> = manager
        .store
        .iter()
        .map(|(n, fd)| (n.clone(), fd.try_clone().unwrap()))
        .collect();
    children.0.push(spawn_under_manager(&d, &manager, &stored));
    let messages = manager.wait_ready(Duration::from_secs(60), &d);
    let switched = switch.elapsed();
    std::thread::sleep(Duration::from_millis(800));
    let stats = load.stop();
    eprintln!(
        "[fdstore] the old daemon stopped after {:.1} ms",
        stopped.as_secs_f64() * 1e3
    );
    report("fdstore", &stats, switched);
    assert!(
        messages.iter().any(|m| m.contains("READY=1")),
        "{messages:?}"
    );
    assert_clean(&stats, &d);
    assert_eq!(instance_pids(&d), instances, "instances were restarted");
    let new = daemon_pid(&d.socket()).unwrap();
    assert_eq!(
        new,
        children.0[0].id(),
        "the new daemon answers the admin socket"
    );
    d.api("GET", "/v1/status", None);

    // A crash (SIGKILL) with the sockets in the fd store: requests in flight in the killed
    // daemon fail, but still no connection is refused; the gap is the longest request.
    let load = Load::start(d.http_port, 6, 2);
    std::thread::sleep(Duration::from_millis(500));
    let switch = Instant::now();
    let mut crashed = children.0.pop().expect("the second daemon");
    crashed.kill().unwrap();
    crashed.wait().unwrap();
    let stored: Vec<(String, OwnedFd)> = manager
        .store
        .iter()
        .map(|(n, fd)| (n.clone(), fd.try_clone().unwrap()))
        .collect();
    children.0.push(spawn_under_manager(&d, &manager, &stored));
    manager.wait_ready(Duration::from_secs(60), &d);
    let switched = switch.elapsed();
    std::thread::sleep(Duration::from_millis(800));
    let stats = load.stop();
    report("crash with the fd store", &stats, switched);
    assert_eq!(stats.refused, 0, "{:?}", stats.failures);
    assert!(stats.ok > 100, "{stats:?}");
    assert_eq!(instance_pids(&d), instances, "instances were restarted");
}
