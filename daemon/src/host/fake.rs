//! A host for control-plane tests, without root: each instance is a real HTTP/1.1 server on
//! `127.0.0.1:0` inside the test's own process, so the real proxy pools and health checks work
//! against it.
//!
//! An instance answers every request with 200 and the body `fake <instance id> rev <n>`;
//! `GET /sleep/<ms>` answers the same after `ms` milliseconds (a request in flight). The
//! [`StartRequest`]'s environment changes how it behaves:
//!
//! - `FAKE_EXIT=<code>[@<ms>]`: the process exits with `code`, after `ms` milliseconds (at once,
//!   without ever listening, when `ms` is absent or 0).
//! - `FAKE_UNHEALTHY=1`: every request is answered with 500.
//! - `FAKE_START_MS=<ms>`: the port is bound at once but listens only after `ms` milliseconds
//!   (connections are refused until then), like an app that takes time to start.
//! - `FAKE_LOG=<line>`: the instance writes `line` to its log right after it starts.
//!
//! Stopping an instance is graceful, like an app handling SIGTERM: it stops accepting, lets the
//! requests in flight finish (up to the grace period) and exits with code 0; past the grace
//! period it is killed (signal 9). The [`FakeHost`] handle also lets a test kill an instance
//! (a crash), count starts and stops, make `ensure_image` fail and turn an instance unhealthy.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lull_proxy::gate::CpuControl;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::{
    ExecProcess, ExecRequest, ExitInfo, HostError, HostFuture, ImageInfo, InstanceHost, LogLine,
    RecoveredInstance, SecretFile, StartRequest, Started,
};

/// A CPU control that counts what the gate (or the engine) asked of it.
#[derive(Debug, Default)]
pub struct CountingCpu {
    restores: AtomicU64,
    throttles: AtomicU64,
    throttled: AtomicBool,
}

impl CountingCpu {
    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::SeqCst)
    }

    pub fn throttles(&self) -> u64 {
        self.throttles.load(Ordering::SeqCst)
    }

    /// Whether the last call was `throttle`.
    pub fn is_throttled(&self) -> bool {
        self.throttled.load(Ordering::SeqCst)
    }
}

impl CpuControl for CountingCpu {
    fn restore(&self) -> Result<(), String> {
        self.restores.fetch_add(1, Ordering::SeqCst);
        self.throttled.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn throttle(&self) -> Result<(), String> {
        self.throttles.fetch_add(1, Ordering::SeqCst);
        self.throttled.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn usage_ns(&self) -> Option<u64> {
        None
    }
}

/// What a fake instance shares with its server task.
struct Shared {
    id: String,
    revision: u64,
    unhealthy: AtomicBool,
    /// (time, line), oldest first.
    logs: Mutex<Vec<(String, String)>>,
    exit: watch::Sender<Option<ExitInfo>>,
    /// Set to the grace period when a stop begins.
    terminate: watch::Sender<Option<Duration>>,
}

impl Shared {
    fn log(&self, line: impl Into<String>) {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        lock(&self.logs).push((time, line.into()));
    }

    /// Records how the process ended (the first ending wins).
    fn exit(&self, exit: ExitInfo) {
        self.exit.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(exit);
            true
        });
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }
}

struct FakeInstance {
    service: String,
    secret_files: Vec<SecretFile>,
    addr: SocketAddr,
    cpu: Arc<CountingCpu>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// A removed instance's service, id and (time, line) lines.
type RetainedLogs = (String, String, Vec<(String, String)>);

#[derive(Default)]
struct State {
    instances: HashMap<String, FakeInstance>,
    starts: u64,
    stops: u64,
    removes: u64,
    kills: u64,
    image_error: Option<String>,
    images: Vec<String>,
    /// Logs of removed instances, in removal order.
    retained: Vec<RetainedLogs>,
}

/// The fake host; clones share one set of instances (keep one in the test as its handle).
#[derive(Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<State>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeHost {
    pub fn new() -> FakeHost {
        FakeHost::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The secret files instance `id` was started with.
    pub fn secret_files(&self, id: &str) -> Option<Vec<SecretFile>> {
        self.state()
            .instances
            .get(id)
            .map(|i| i.secret_files.clone())
    }

    /// Makes every later `ensure_image` fail with `reason` (`None`: succeed again).
    pub fn fail_images(&self, reason: Option<&str>) {
        self.state().image_error = reason.map(str::to_owned);
    }

    /// The references `ensure_image` was asked for, in order.
    pub fn images(&self) -> Vec<String> {
        self.state().images.clone()
    }

    /// Instances started so far.
    pub fn starts(&self) -> u64 {
        self.state().starts
    }

    /// Calls to `stop` so far.
    pub fn stops(&self) -> u64 {
        self.state().stops
    }

    /// Calls to `remove` that removed an instance.
    pub fn removes(&self) -> u64 {
        self.state().removes
    }

    /// Instances killed through [`FakeHost::kill`].
    pub fn kills(&self) -> u64 {
        self.state().kills
    }

    /// Ids of the instances whose process runs, sorted.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<_> = self
            .state()
            .instances
            .iter()
            .filter(|(_, i)| i.shared.exited().is_none())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Ids of the running instances of one service's revision, sorted.
    pub fn running_of(&self, service: &str, revision: u64) -> Vec<String> {
        let mut ids: Vec<_> = self
            .state()
            .instances
            .iter()
            .filter(|(_, i)| {
                i.service == service && i.shared.revision == revision && i.shared.exited().is_none()
            })
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Ids of every instance not yet removed (running or exited), sorted.
    pub fn present(&self) -> Vec<String> {
        let mut ids: Vec<_> = self.state().instances.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Ends an instance's process as a crash would; false if it is unknown or already ended.
    pub fn kill(&self, id: &str, exit: ExitInfo) -> bool {
        let mut state = self.state();
        state.kills += 1;
        let Some(instance) = state.instances.get(id) else {
            return false;
        };
        if instance.shared.exited().is_some() {
            return false;
        }
        instance.shared.log(format!("{exit}"));
        instance.shared.exit(exit);
        instance.task.abort();
        true
    }

    /// Makes an instance answer 500 (`true`) or 200 again.
    pub fn set_unhealthy(&self, id: &str, unhealthy: bool) -> bool {
        match self.state().instances.get(id) {
            Some(instance) => {
                instance.shared.unhealthy.store(unhealthy, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// The CPU control handed out for an instance.
    pub fn cpu(&self, id: &str) -> Option<Arc<CountingCpu>> {
        self.state().instances.get(id).map(|i| i.cpu.clone())
    }

    fn shared(&self, id: &str) -> Result<Arc<Shared>, HostError> {
        self.state()
            .instances
            .get(id)
            .map(|i| i.shared.clone())
            .ok_or_else(|| HostError::NotFound { id: id.to_owned() })
    }

    async fn start_instance(&self, request: StartRequest) -> Result<Started, HostError> {
        let id = request.id.clone();
        let start_err = |reason: String| HostError::Start {
            id: id.clone(),
            reason,
        };
        if !valid_id(&id) {
            return Err(HostError::BadId {
                id: id.clone(),
                reason: "use lowercase letters, digits, '-', '_' or '.', at most 63".into(),
            });
        }
        let exit_plan = match request.env_value("FAKE_EXIT") {
            Some(value) => {
                Some(parse_exit(value).map_err(|e| start_err(format!("FAKE_EXIT: {e}")))?)
            }
            None => None,
        };
        let start_delay = match request.env_value("FAKE_START_MS") {
            Some(value) => Duration::from_millis(value.parse().map_err(|_| {
                start_err(format!("FAKE_START_MS {value:?}: expected milliseconds"))
            })?),
            None => Duration::ZERO,
        };
        let socket = TcpSocket::new_v4().map_err(|e| start_err(format!("socket: {e}")))?;
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| start_err(format!("bind 127.0.0.1:0: {e}")))?;
        let addr = socket
            .local_addr()
            .map_err(|e| start_err(format!("local address: {e}")))?;
        let shared = Arc::new(Shared {
            id: id.clone(),
            revision: request.revision,
            unhealthy: AtomicBool::new(request.env_value("FAKE_UNHEALTHY") == Some("1")),
            logs: Mutex::new(Vec::new()),
            exit: watch::Sender::new(None),
            terminate: watch::Sender::new(None),
        });
        shared.log(format!("fake {id} rev {} starting", request.revision));
        if let Some(line) = request.env_value("FAKE_LOG") {
            shared.log(line);
        }
        // An app that exits at once never listens; one without a start delay listens before
        // `start` returns, as an app that is up at once.
        let exits_at_once = exit_plan.is_some_and(|(_, after)| after.is_zero());
        let start_delay = match exits_at_once {
            true => Duration::from_secs(3600),
            false => start_delay,
        };
        let socket = match start_delay.is_zero() {
            true => Socket::Listening(
                socket
                    .listen(1024)
                    .map_err(|e| start_err(format!("listen on {addr}: {e}")))?,
            ),
            false => Socket::Bound(socket, start_delay),
        };
        let cpu = Arc::new(CountingCpu::default());
        let mut state = self.state();
        if state.instances.contains_key(&id) {
            return Err(HostError::AlreadyExists { id });
        }
        state.starts += 1;
        let task = tokio::spawn(run_instance(shared.clone(), socket, exit_plan));
        state.instances.insert(
            id.clone(),
            FakeInstance {
                service: request.service.clone(),
                secret_files: request.secret_files.clone(),
                addr,
                cpu: cpu.clone(),
                shared,
                task,
            },
        );
        Ok(Started { id, addr, cpu })
    }

    async fn stop_instance(&self, id: &str, grace: Duration) -> Result<ExitInfo, HostError> {
        let shared = {
            let mut state = self.state();
            state.stops += 1;
            state
                .instances
                .get(id)
                .map(|i| i.shared.clone())
                .ok_or_else(|| HostError::NotFound { id: id.to_owned() })?
        };
        if let Some(exit) = shared.exited() {
            return Ok(exit);
        }
        shared.terminate.send_replace(Some(grace));
        let mut rx = shared.exit.subscribe();
        let waited = tokio::time::timeout(grace + Duration::from_millis(500), async {
            rx.wait_for(Option::is_some).await.map(|e| *e)
        })
        .await;
        match waited {
            Ok(Ok(Some(exit))) => Ok(exit),
            _ => {
                // The server task did not end in time: kill it.
                shared.exit(ExitInfo::signal(9));
                if let Some(instance) = self.state().instances.get(id) {
                    instance.task.abort();
                }
                Ok(shared.exited().unwrap_or(ExitInfo::signal(9)))
            }
        }
    }
}

impl FakeHost {
    /// `exec` for tests: the command runs as a plain process on the host, through
    /// `sh -c 'exec "$@"'` (so a missing command ends with 127, as in an instance), with
    /// `FAKE_INSTANCE=<id>` in its environment; on a new pseudo-terminal (its controlling
    /// terminal) when a tty is asked for.
    async fn exec_on_host(&self, id: &str, request: ExecRequest) -> Result<ExecProcess, HostError> {
        use std::process::Stdio;
        let shared = self.shared(id)?;
        let fail = |reason: String| HostError::Instance {
            id: id.to_owned(),
            action: "exec",
            reason,
        };
        if shared.exited().is_some() {
            return Err(fail("it is not running".into()));
        }
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg("exec \"$@\"")
            .arg("sh")
            .args(&request.command)
            .env("FAKE_INSTANCE", id)
            .envs(request.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = &request.cwd {
            cmd.current_dir(cwd);
        }
        let exit_of =
            |mut child: tokio::process::Child| -> HostFuture<'static, Result<ExitInfo, HostError>> {
                let id = id.to_owned();
                Box::pin(async move {
                    use std::os::unix::process::ExitStatusExt;
                    let status = child.wait().await.map_err(|e| HostError::Instance {
                        id,
                        action: "exec",
                        reason: format!("wait: {e}"),
                    })?;
                    Ok(ExitInfo {
                        code: status.code(),
                        signal: status.signal(),
                        oom_killed: false,
                    })
                })
            };
        let Some((rows, cols)) = request.tty else {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(|e| fail(format!("spawn: {e}")))?;
            let missing = || fail("no pipe".into());
            let stdin = child.stdin.take().ok_or_else(missing)?;
            let stdout = child.stdout.take().ok_or_else(missing)?;
            let stderr = child.stderr.take().ok_or_else(missing)?;
            return Ok(ExecProcess {
                stdin: Box::pin(stdin),
                stdout: Box::pin(stdout),
                stderr: Some(Box::pin(stderr)),
                resize: None,
                exit: exit_of(child),
            });
        };
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty =
            nix::pty::openpty(Some(&size), None).map_err(|e| fail(format!("openpty: {e}")))?;
        let slave = std::fs::File::from(pty.slave);
        let dup = |f: &std::fs::File| f.try_clone().map_err(|e| fail(format!("dup: {e}")));
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // SAFETY: between fork and exec only async-signal-safe calls: setsid, then ioctl to make
        // the pty slave (already fd 0) the new session's controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| fail(format!("spawn: {e}")))?;
        // The command holds the slave now: our copies (in `cmd`) must go, or no end is seen.
        drop(cmd);
        let master = pty.master;
        let fd_err = |e: std::io::Error| fail(format!("pty master: {e}"));
        let reader = master.try_clone().map_err(fd_err)?;
        let resize_fd = Arc::new(master.try_clone().map_err(fd_err)?);
        let resize: super::ExecResize = Arc::new(move |rows, cols| {
            use std::os::fd::AsRawFd;
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the fd is our pty master.
            if unsafe { libc::ioctl(resize_fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            Ok(())
        });
        Ok(ExecProcess {
            stdin: Box::pin(lull_runtime::instance::ExecFd::new(master).map_err(fd_err)?),
            stdout: Box::pin(lull_runtime::instance::ExecFd::new(reader).map_err(fd_err)?),
            stderr: None,
            resize: Some(resize),
            exit: exit_of(child),
        })
    }
}

impl InstanceHost for FakeHost {
    fn ensure_image<'a>(
        &'a self,
        reference: &'a str,
    ) -> HostFuture<'a, Result<ImageInfo, HostError>> {
        Box::pin(async move {
            let mut state = self.state();
            state.images.push(reference.to_owned());
            if let Some(reason) = &state.image_error {
                return Err(HostError::Image {
                    reference: reference.to_owned(),
                    reason: reason.clone(),
                });
            }
            let mut hasher = DefaultHasher::new();
            reference.hash(&mut hasher);
            let h = hasher.finish();
            Ok(ImageInfo {
                reference: reference.to_owned(),
                digest: format!("sha256:{h:016x}{h:016x}{h:016x}{h:016x}"),
                exposed_port: Some(8080),
            })
        })
    }

    fn start(&self, request: StartRequest) -> HostFuture<'_, Result<Started, HostError>> {
        Box::pin(self.start_instance(request))
    }

    fn wait<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<ExitInfo, HostError>> {
        Box::pin(async move {
            let shared = self.shared(id)?;
            let mut rx = shared.exit.subscribe();
            drop(shared);
            match rx.wait_for(Option::is_some).await {
                Ok(exit) => Ok(exit.unwrap_or_default()),
                // The sender lives as long as the instance record: removed while waited for.
                Err(_) => Err(HostError::NotFound { id: id.to_owned() }),
            }
        })
    }

    fn stop<'a>(
        &'a self,
        id: &'a str,
        grace: Duration,
    ) -> HostFuture<'a, Result<ExitInfo, HostError>> {
        Box::pin(self.stop_instance(id, grace))
    }

    fn remove<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            let mut state = self.state();
            let Some(instance) = state.instances.get(id) else {
                return Err(HostError::NotFound { id: id.to_owned() });
            };
            if instance.shared.exited().is_none() {
                return Err(HostError::Instance {
                    id: id.to_owned(),
                    action: "remove",
                    reason: "it is still running".into(),
                });
            }
            if let Some(instance) = state.instances.remove(id) {
                instance.task.abort();
                let lines = lock(&instance.shared.logs).clone();
                state
                    .retained
                    .push((instance.service.clone(), id.to_owned(), lines));
            }
            state.removes += 1;
            Ok(())
        })
    }

    fn recover(&self) -> HostFuture<'_, Result<Vec<RecoveredInstance>, HostError>> {
        Box::pin(async move {
            let state = self.state();
            let mut found: Vec<_> = state
                .instances
                .iter()
                .filter(|(_, i)| i.shared.exited().is_none())
                .map(|(id, i)| RecoveredInstance {
                    service: i.service.clone(),
                    revision: i.shared.revision,
                    instance: Started {
                        id: id.clone(),
                        addr: i.addr,
                        cpu: i.cpu.clone(),
                    },
                })
                .collect();
            found.sort_by(|a, b| a.instance.id.cmp(&b.instance.id));
            Ok(found)
        })
    }

    fn exec<'a>(
        &'a self,
        id: &'a str,
        request: ExecRequest,
    ) -> HostFuture<'a, Result<ExecProcess, HostError>> {
        Box::pin(self.exec_on_host(id, request))
    }

    fn logs<'a>(&'a self, id: &'a str) -> HostFuture<'a, Result<Vec<LogLine>, HostError>> {
        Box::pin(async move {
            let lines = match self.shared(id) {
                Ok(shared) => lock(&shared.logs).clone(),
                Err(e) => self
                    .state()
                    .retained
                    .iter()
                    .find(|(_, retained, _)| retained == id)
                    .map(|(_, _, lines)| lines.clone())
                    .ok_or(e)?,
            };
            Ok(lines
                .into_iter()
                .map(|(time, text)| LogLine {
                    time,
                    stream: "stdout",
                    text,
                })
                .collect())
        })
    }

    fn retained_logs<'a>(
        &'a self,
        service: &'a str,
    ) -> HostFuture<'a, Result<Vec<String>, HostError>> {
        Box::pin(async move {
            Ok(self
                .state()
                .retained
                .iter()
                .filter(|(s, _, _)| s == service)
                .map(|(_, id, _)| id.clone())
                .collect())
        })
    }

    fn forget_logs<'a>(&'a self, service: &'a str) -> HostFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            self.state().retained.retain(|(s, _, _)| s != service);
            Ok(())
        })
    }
}

/// The runtime's rule for instance ids.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// `<code>[@<ms>]`.
fn parse_exit(value: &str) -> Result<(i32, Duration), String> {
    let (code, after) = match value.split_once('@') {
        Some((code, ms)) => (
            code,
            ms.parse::<u64>()
                .map_err(|_| format!("{value:?}: expected milliseconds after '@'"))?,
        ),
        None => (value, 0),
    };
    let code = code
        .parse::<i32>()
        .map_err(|_| format!("{value:?}: expected an exit code"))?;
    Ok((code, Duration::from_millis(after)))
}

/// The instance's "process": listens (after the start delay), serves, and ends on its own
/// (`FAKE_EXIT`) or when told to terminate.
/// An instance's port: listening already, or bound and listening after a delay.
enum Socket {
    Listening(TcpListener),
    Bound(TcpSocket, Duration),
}

async fn run_instance(shared: Arc<Shared>, socket: Socket, exit_plan: Option<(i32, Duration)>) {
    let mut terminate = shared.terminate.subscribe();
    let exit_at = exit_plan.map(|(code, after)| (code, tokio::time::Instant::now() + after));
    let own_exit = async {
        match exit_at {
            Some((code, at)) => {
                tokio::time::sleep_until(at).await;
                code
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(own_exit);
    let mut connections = JoinSet::new();
    let listener = match socket {
        Socket::Listening(listener) => listener,
        Socket::Bound(socket, delay) => tokio::select! {
            code = &mut own_exit => return finish(&shared, ExitInfo::code(code)),
            _ = terminated(&mut terminate) => return finish(&shared, ExitInfo::code(0)),
            _ = tokio::time::sleep(delay) => match socket.listen(1024) {
                Ok(listener) => listener,
                Err(e) => {
                    shared.log(format!("listen: {e}"));
                    return finish(&shared, ExitInfo::code(1));
                }
            },
        },
    };
    shared.log(format!(
        "listening on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    ));
    let grace = loop {
        tokio::select! {
            code = &mut own_exit => return finish(&shared, ExitInfo::code(code)),
            grace = terminated(&mut terminate) => break grace,
            accepted = accept(&listener) => {
                if let Some(stream) = accepted {
                    connections.spawn(serve(shared.clone(), stream));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    drop(listener);
    shared.log("terminating");
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => finish(&shared, ExitInfo::code(0)),
        Err(_) => finish(&shared, ExitInfo::signal(9)),
    }
}

/// Resolves with the grace period once a stop begins (never if the instance record is gone).
async fn terminated(terminate: &mut watch::Receiver<Option<Duration>>) -> Duration {
    let grace = match terminate.wait_for(Option::is_some).await {
        Ok(grace) => *grace,
        Err(_) => None,
    };
    match grace {
        Some(grace) => grace,
        None => std::future::pending().await,
    }
}

fn finish(shared: &Shared, exit: ExitInfo) {
    shared.log(format!("{exit}"));
    shared.exit(exit);
}

async fn accept(listener: &TcpListener) -> Option<tokio::net::TcpStream> {
    match listener.accept().await {
        Ok((stream, _)) => Some(stream),
        Err(_) => {
            // Out of descriptors or similar: do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

/// One connection; on terminate, finishes the request in flight and closes.
async fn serve(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    let mut terminate = shared.terminate.subscribe();
    let handler = shared.clone();
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let shared = handler.clone();
        async move { Ok::<_, Infallible>(respond(&shared, request.uri().path()).await) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = terminated(&mut terminate) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn respond(shared: &Shared, path: &str) -> Response<Full<Bytes>> {
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = match shared.unhealthy.load(Ordering::SeqCst) {
        true => StatusCode::INTERNAL_SERVER_ERROR,
        false => StatusCode::OK,
    };
    let mut response = Response::new(Full::new(Bytes::from(format!(
        "fake {} rev {}",
        shared.id, shared.revision
    ))));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, env: &[(&str, &str)]) -> StartRequest {
        StartRequest {
            service: "web".into(),
            revision: 2,
            id: id.into(),
            image: "example/web:1".into(),
            command: None,
            args: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            port: 8080,
            limits: Default::default(),
            volumes: Vec::new(),
            secret_files: Vec::new(),
        }
    }

    async fn get(addr: SocketAddr) -> Result<(u16, String), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .await
            .map_err(|e| e.to_string())?;
        let status = reply
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad reply {reply:?}"))?;
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        Ok((status, body))
    }

    #[tokio::test]
    async fn an_instance_serves_its_id_and_revision_and_stops_gracefully() {
        let host = FakeHost::new();
        let started = host.start(request("web-r2-aaaaaa", &[])).await.unwrap();
        assert_eq!(
            get(started.addr).await.unwrap(),
            (200, "fake web-r2-aaaaaa rev 2".to_owned())
        );
        assert_eq!(host.running(), vec!["web-r2-aaaaaa".to_owned()]);
        let exit = host
            .stop("web-r2-aaaaaa", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(exit, ExitInfo::code(0));
        assert!(
            get(started.addr).await.is_err(),
            "still answering after stop"
        );
        assert_eq!(host.wait("web-r2-aaaaaa").await.unwrap(), exit);
        host.remove("web-r2-aaaaaa").await.unwrap();
        assert!(host.present().is_empty());
        assert_eq!((host.starts(), host.stops(), host.removes()), (1, 1, 1));
    }

    #[tokio::test]
    async fn env_drives_exit_health_start_delay_and_logs() {
        let host = FakeHost::new();
        let crashing = host
            .start(request(
                "web-r2-bbbbbb",
                &[("FAKE_EXIT", "3@50"), ("FAKE_LOG", "boom")],
            ))
            .await
            .unwrap();
        let t = std::time::Instant::now();
        assert_eq!(host.wait(&crashing.id).await.unwrap(), ExitInfo::code(3));
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        let logs = host.log_tail(&crashing.id, 10).await.unwrap();
        assert!(logs.iter().any(|l| l.ends_with(" stdout boom")), "{logs:?}");
        assert!(
            logs.last()
                .is_some_and(|l| l.ends_with(" stdout exited with code 3")),
            "{logs:?}"
        );
        assert_eq!(host.log_tail(&crashing.id, 1).await.unwrap().len(), 1);

        let sick = host
            .start(request("web-r2-cccccc", &[("FAKE_UNHEALTHY", "1")]))
            .await
            .unwrap();
        assert_eq!(get(sick.addr).await.unwrap().0, 500);
        host.set_unhealthy(&sick.id, false);
        assert_eq!(get(sick.addr).await.unwrap().0, 200);

        let slow = host
            .start(request("web-r2-dddddd", &[("FAKE_START_MS", "200")]))
            .await
            .unwrap();
        assert!(
            get(slow.addr).await.is_err(),
            "answered before its start delay"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(get(slow.addr).await.unwrap().0, 200);

        assert!(host.kill(&slow.id, ExitInfo::oom()));
        assert!(host.wait(&slow.id).await.unwrap().oom_killed);
        assert!(!host.kill(&slow.id, ExitInfo::code(1)), "killed twice");
        assert!(matches!(
            host.remove(&sick.id).await,
            Err(HostError::Instance { .. })
        ));
        let recovered = host.recover().await.unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].instance.id, "web-r2-cccccc");
        assert_eq!(
            (recovered[0].service.as_str(), recovered[0].revision),
            ("web", 2)
        );
    }

    #[tokio::test]
    async fn images_fail_when_told_and_bad_ids_are_refused() {
        let host = FakeHost::new();
        assert!(
            host.ensure_image("a:1")
                .await
                .unwrap()
                .digest
                .starts_with("sha256:")
        );
        host.fail_images(Some("manifest unknown"));
        let error = host.ensure_image("a:2").await.unwrap_err();
        assert_eq!(error.to_string(), "image a:2: manifest unknown");
        assert_eq!(host.images(), vec!["a:1".to_owned(), "a:2".to_owned()]);
        assert!(matches!(
            host.start(request("Bad/Id", &[])).await,
            Err(HostError::BadId { .. })
        ));
        assert!(matches!(
            host.start(request("web-r2-eeeeee", &[("FAKE_EXIT", "x")]))
                .await,
            Err(HostError::Start { .. })
        ));
    }
}
