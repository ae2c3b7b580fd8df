//! Commands run inside a running instance (`lull exec`), through libcontainer's tenant builder.
//!
//! The daemon never calls libcontainer itself (see [`super::zygote`]): it sends an
//! [`ExecConfig`] to the zygote, which forks a child that detaches (its own session) and forks
//! the *exec waiter*. The waiter joins the instance with `ContainerBuilder::as_tenant()` (the
//! instance's namespaces, cgroup, user, capabilities and environment, from its bundle's
//! `config.json`), with the command's stdio wired either to three pipes or, in tty mode, to a
//! pseudo-terminal that libcontainer opens inside the instance's own `/dev/pts` (the slave
//! becomes the command's controlling terminal; the master comes back over a console socket).
//!
//! The waiter sends the daemon's ends (stdin's write end, stdout's and stderr's read ends, or the
//! pty master) and the read end of a *status pipe* back to the zygote with `SCM_RIGHTS`, which
//! forwards them to the daemon. The command is the waiter's child: the waiter stays behind,
//! waits for it and writes its [`ExitStatus`] as one JSON line on the status pipe, like the shim
//! does for an instance's main process. The daemon's [`ExecSession`] wraps those fds.
//!
//! A command that cannot be found or run ends with code 127 or 126 (as a shell's would), after
//! a line on its stderr saying why: the waiter's executor `execvp`s it itself.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::config::ExitStatus;

/// How long the waiter waits for libcontainer to hand over the pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most fds one exec hands back (status, stdin, stdout, stderr).
pub(crate) const MAX_EXEC_FDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("exec in instance {id}: the command is empty")]
    EmptyCommand { id: String },
    #[error("exec in instance {id}: working directory {cwd:?} must be an absolute path")]
    RelativeCwd { id: String, cwd: String },
    #[error("exec in instance {id}: environment entry {entry:?} must be KEY=VALUE")]
    BadEnv { id: String, entry: String },
    #[error("exec in instance {id}: {message}")]
    Start { id: String, message: String },
    #[error("exec in instance {id}: the zygote answered with {got} fds, expected {expected}")]
    Fds {
        id: String,
        got: usize,
        expected: usize,
    },
    #[error("exec in instance {id}: {what}: {source}")]
    Io {
        id: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("exec in instance {id}: {message}")]
    Status { id: String, message: String },
    #[error("exec in instance {id}: resize needs a tty (the command runs without one)")]
    NotATty { id: String },
}

impl ExecError {
    fn status(id: &str, message: impl Into<String>) -> ExecError {
        ExecError::Status {
            id: id.to_owned(),
            message: message.into(),
        }
    }
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// What to run inside an instance, as the daemon asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// The command and its arguments (`args[0]` is looked up in the instance's `PATH`).
    pub args: Vec<String>,
    /// `KEY=VALUE` entries added to (or replacing those of) the instance's environment.
    pub env: Vec<String>,
    /// The working directory (absolute); the instance's own when `None`.
    pub cwd: Option<String>,
    /// Run on a new pseudo-terminal of this size; on pipes when `None`.
    pub tty: Option<WindowSize>,
}

/// What the zygote is sent: an [`ExecRequest`] for one instance, with where its files are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecConfig {
    pub id: String,
    /// The instance dir: libcontainer's bundle (`config.json`).
    pub bundle: PathBuf,
    /// libcontainer's state root (the instance's state is in `<state_root>/<id>`).
    pub state_root: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub tty: Option<WindowSize>,
}

impl ExecConfig {
    /// Checks `request` and pairs it with the instance's paths.
    pub fn new(
        id: &str,
        bundle: PathBuf,
        state_root: PathBuf,
        request: ExecRequest,
    ) -> Result<ExecConfig, ExecError> {
        if request.args.first().is_none_or(|a| a.is_empty()) {
            return Err(ExecError::EmptyCommand { id: id.to_owned() });
        }
        if let Some(cwd) = &request.cwd
            && !cwd.starts_with('/')
        {
            return Err(ExecError::RelativeCwd {
                id: id.to_owned(),
                cwd: cwd.clone(),
            });
        }
        for entry in &request.env {
            if entry.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                return Err(ExecError::BadEnv {
                    id: id.to_owned(),
                    entry: entry.clone(),
                });
            }
        }
        Ok(ExecConfig {
            id: id.to_owned(),
            bundle,
            state_root,
            args: request.args,
            env: request.env,
            cwd: request.cwd,
            tty: request.tty,
        })
    }
}

/// What the waiter reports once the command runs (the fds travel beside it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ExecStarted {
    pub pid: i32,
}

/// `base` with `additions` applied: an addition replaces every entry of the same key.
pub fn merge_env(base: &[String], additions: &[String]) -> Vec<String> {
    let key = |entry: &str| entry.split_once('=').map_or(entry, |(k, _)| k).to_owned();
    let replaced: HashSet<String> = additions.iter().map(|e| key(e)).collect();
    base.iter()
        .filter(|e| !replaced.contains(&key(e)))
        .chain(additions.iter())
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Passing fds over a Unix socket.

/// Sends one message with `fds` attached (`SCM_RIGHTS`).
pub(crate) fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    loop {
        match sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::Error::EINTR) => continue,
            other => return other.map(|_| ()),
        }
    }
}

/// Receives one message and the fds attached to it (close-on-exec in this process).
pub(crate) fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_EXEC_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(msg) => msg,
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel installed these fds in this process for this message;
                    // nothing else owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        return Ok((msg.bytes, fds));
    }
}

// ---------------------------------------------------------------------------------------------
// The waiter: runs in a forked, single-threaded child of the zygote.

/// The executor of the command inside the instance: sets the terminal's size (libcontainer
/// does not apply `consoleSize`), then `execvp`s the command; when that fails, says why on
/// stderr and exits 127 (not found) or 126 (found, cannot run), as a shell does.
#[derive(Clone)]
struct CommandExecutor {
    size: Option<WindowSize>,
}

impl Executor for CommandExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(size) = self.size {
            let ws = libc::winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; fd 0 is the pty slave.
            unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &ws) };
        }
        let args: Vec<String> = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default();
        let Some(program) = args.first() else {
            return Err(ExecutorError::InvalidArg);
        };
        let cargs: Vec<std::ffi::CString> = args
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| ExecutorError::InvalidArg)?;
        let err = match nix::unistd::execvp(&cargs[0], &cargs) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        let (code, why) = match err {
            nix::Error::ENOENT | nix::Error::ENOTDIR => (127, "command not found".to_owned()),
            nix::Error::EACCES => (126, "permission denied".to_owned()),
            e => (126, format!("cannot run it: {e}")),
        };
        let line = format!("lull exec: {program}: {why}\n");
        // SAFETY: writes a valid buffer to fd 2 (the command's stderr), then ends this process
        // without unwinding into libcontainer's error path.
        unsafe {
            libc::write(2, line.as_ptr().cast(), line.len());
            libc::_exit(code)
        }
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        // Checked by execvp itself (see `exec`): the command learns why through its exit code.
        Ok(())
    }
}

/// Files the waiter made in the instance's state dir, removed when it is done with them.
struct Scratch {
    paths: Vec<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = fs::remove_file(path);
        }
    }
}

/// The fds of a started command, as the daemon gets them: the status pipe's read end first.
struct Started {
    pid: i32,
    status_w: OwnedFd,
    daemon_fds: Vec<OwnedFd>,
}

/// Runs the exec waiter. Never returns.
pub(crate) fn run_waiter(cfg: &ExecConfig, report: OwnedFd) -> ! {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing (async-signal-safe); reset at the command's
    // exec, so the command still gets the default dispositions.
    unsafe {
        for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGHUP, libc::SIGTERM] {
            libc::signal(sig, ignore as *const () as libc::sighandler_t);
        }
    }
    // Diagnostics (ours and libcontainer's, also from the command's process before its exec) go
    // to the zygote's stderr through a private copy: fd 2 becomes the command's stderr.
    // SAFETY: F_DUPFD_CLOEXEC on fd 2 returns a new fd or -1; no memory is involved.
    let private = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    if private >= 0 {
        super::zygote::set_diagnostics_fd(private);
    }
    match start(cfg) {
        Ok(started) => {
            let message = serde_json::to_vec(&Ok::<_, String>(ExecStarted { pid: started.pid }))
                .unwrap_or_default();
            let raw: Vec<RawFd> = started.daemon_fds.iter().map(|f| f.as_raw_fd()).collect();
            if let Err(e) = send_with_fds(report.as_raw_fd(), &message, &raw) {
                tracing::error!(instance = %cfg.id, "exec: report to the zygote: {e}");
            }
            // Our copies must go, or the command would never see stdin's end.
            drop(started.daemon_fds);
            drop(report);
            let status = wait_for(started.pid);
            let mut status_w = File::from(started.status_w);
            let _ = writeln!(
                status_w,
                "{}",
                serde_json::to_string(&status).unwrap_or_default()
            );
            drop(status_w);
            // The command's own children were reparented inside the instance; only libcontainer's
            // helpers could be left here.
            while let Ok(s) = waitpid(
                Pid::from_raw(-1),
                Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
            ) {
                if s == WaitStatus::StillAlive {
                    break;
                }
            }
            // SAFETY: ends the waiter without running atexit handlers inherited from the zygote.
            unsafe { libc::_exit(0) }
        }
        Err(message) => {
            tracing::warn!(instance = %cfg.id, "exec failed: {message}");
            let bytes = serde_json::to_vec(&Err::<ExecStarted, _>(message)).unwrap_or_default();
            let _ = send_with_fds(report.as_raw_fd(), &bytes, &[]);
            // SAFETY: as above.
            unsafe { libc::_exit(1) }
        }
    }
}

fn start(cfg: &ExecConfig) -> Result<Started, String> {
    let container_dir = cfg.state_root.join(&cfg.id);
    if !container_dir.is_dir() {
        return Err(format!(
            "instance {} has no libcontainer state at {}",
            cfg.id,
            container_dir.display()
        ));
    }
    let config_path = cfg.bundle.join("config.json");
    let spec =
        Spec::load(&config_path).map_err(|e| format!("read {}: {e}", config_path.display()))?;
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| format!("{} has no process", config_path.display()))?;
    process.set_args(Some(cfg.args.clone()));
    let base = process.env().clone().unwrap_or_default();
    process.set_env(Some(merge_env(&base, &cfg.env)));
    if let Some(cwd) = &cfg.cwd {
        process.set_cwd(PathBuf::from(cwd));
    }
    process.set_terminal(Some(cfg.tty.is_some()));
    process.set_console_size(None);

    let tag = format!("lull-exec-{}", std::process::id());
    let process_path = container_dir.join(format!("{tag}.json"));
    let mut scratch = Scratch {
        paths: vec![process_path.clone()],
    };
    let json = serde_json::to_vec(&process).map_err(|e| format!("encode the process: {e}"))?;
    fs::write(&process_path, json).map_err(|e| format!("write {}: {e}", process_path.display()))?;

    let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("status pipe: {e}"))?;
    let notify_before = tenant_files(&container_dir, "tenant-notify-");

    let mut builder = ContainerBuilder::new(cfg.id.clone(), SyscallType::default())
        .with_root_path(&cfg.state_root)
        .map_err(|e| format!("libcontainer root {}: {e}", cfg.state_root.display()))?
        .with_executor(CommandExecutor { size: cfg.tty });
    let mut daemon_fds = vec![status_r];
    let mut console = None;
    if cfg.tty.is_some() {
        // A short relative name: a socket path may not exceed 107 bytes, the state root may.
        std::env::set_current_dir(&container_dir)
            .map_err(|e| format!("chdir {}: {e}", container_dir.display()))?;
        let name = format!("{tag}.sock");
        let listener = UnixListener::bind(&name).map_err(|e| {
            format!(
                "console socket {}: {e}",
                container_dir.join(&name).display()
            )
        })?;
        let path = container_dir.join(&name);
        scratch.paths.push(path.clone());
        builder = builder.with_console_socket(Some(&path));
        console = Some((listener, path));
    } else {
        let pipe =
            || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        builder = builder
            .with_stdin(in_r)
            .with_stdout(out_w)
            .with_stderr(err_w);
        daemon_fds.extend([in_w, out_r, err_r]);
    }
    let built = builder
        .as_tenant()
        .with_process(Some(&process_path))
        .with_detach(cfg.tty.is_some())
        .build();
    // The notify socket the command's init listened on is not removed by libcontainer; only
    // this exec was building in this dir (the zygote runs one request at a time).
    for path in tenant_files(&container_dir, "tenant-notify-") {
        if !notify_before.contains(&path) {
            let _ = fs::remove_file(path);
        }
    }
    if let Some((_, console_path)) = &console {
        for link in tenant_files(&container_dir, "tenant-tty-") {
            if fs::read_link(&link).is_ok_and(|target| &target == console_path) {
                let _ = fs::remove_file(link);
            }
        }
    }
    let pid = built
        .map_err(|e| format!("join the instance: {e}"))?
        .as_raw();
    if let Some((listener, _)) = console {
        let master = receive_console(&listener)?;
        daemon_fds.push(master);
    }
    drop(scratch);
    Ok(Started {
        pid,
        status_w,
        daemon_fds,
    })
}

/// The files of `dir` whose names start with `prefix`.
fn tenant_files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// Accepts libcontainer's connection on the console socket and takes the pty master from it.
fn receive_console(listener: &UnixListener) -> Result<OwnedFd, String> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, CONSOLE_TIMEOUT.as_millis() as libc::c_int) };
    if ready <= 0 {
        return Err(format!(
            "no pty master on the console socket within {CONSOLE_TIMEOUT:?}"
        ));
    }
    let (stream, _) = listener
        .accept()
        .map_err(|e| format!("console socket accept: {e}"))?;
    let mut buf = [0u8; 256];
    let (_, mut fds) = recv_with_fds(stream.as_raw_fd(), &mut buf)
        .map_err(|e| format!("console socket receive: {e}"))?;
    if fds.is_empty() {
        return Err("the console socket sent no pty master".into());
    }
    Ok(fds.swap_remove(0))
}

/// Waits for the command (the waiter's child) and says how it ended.
fn wait_for(pid: i32) -> ExitStatus {
    let finished = |code, signal| ExitStatus {
        code,
        signal,
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        oom_killed: false,
    };
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(_, code)) => return finished(Some(code), None),
            Ok(WaitStatus::Signaled(_, sig, _)) => return finished(None, Some(sig as i32)),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("exec: wait for process {pid}: {e}");
                return finished(None, None);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon's side.

/// One end of a pipe or pty master, read and written without blocking a thread. A pty master
/// reads `EIO` once the command's side is closed: that is its end of file.
#[derive(Debug)]
pub struct ExecFd {
    fd: AsyncFd<OwnedFd>,
}

impl ExecFd {
    /// Wraps `fd` (made non-blocking). Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<ExecFd> {
        set_nonblocking(fd.as_fd().as_raw_fd())?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, stays open for its whole life and
        // always returns the same fd.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(ExecFd { fd })
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsyncRead for ExecFd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|inner| {
                // SAFETY: reads into the initialized, unfilled part of `buf`, within its length.
                let n = unsafe {
                    libc::read(
                        inner.get_ref().as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() == Some(libc::EIO) {
                        return Ok(0);
                    }
                    return Err(err);
                }
                Ok(n as usize)
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for ExecFd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let result = guard.try_io(|inner| {
                // SAFETY: writes from a valid buffer of the given length.
                let n = unsafe {
                    libc::write(
                        inner.get_ref().as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Resizes an exec's terminal; cheap to clone, usable after the session's halves are taken.
#[derive(Debug, Clone)]
pub struct TtyResizer {
    id: String,
    master: Arc<OwnedFd>,
}

impl TtyResizer {
    pub fn resize(&self, size: WindowSize) -> Result<(), ExecError> {
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the fd is a pty master we own.
        if unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(ExecError::Io {
                id: self.id.clone(),
                what: "resize the terminal",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// A command running inside an instance. Take its halves ([`take_stdin`](Self::take_stdin),
/// ...) to stream them; [`wait`](Self::wait) says how it ended.
///
/// Dropping stdin closes the command's stdin (on a tty, write `^D` instead: the terminal's
/// end-of-file). Dropping the session does not kill the command: on pipes it gets `SIGPIPE`
/// when it next writes, on a tty the kernel hangs it up.
#[derive(Debug)]
pub struct ExecSession {
    pub id: String,
    /// The command's pid (on the host).
    pub pid: i32,
    stdin: Option<ExecFd>,
    stdout: Option<ExecFd>,
    stderr: Option<ExecFd>,
    resizer: Option<TtyResizer>,
    status: Option<ExecFd>,
}

impl ExecSession {
    /// Wraps the fds the zygote handed back: status first, then stdin, stdout, stderr (pipes)
    /// or the pty master (tty).
    pub(crate) fn from_fds(
        id: &str,
        pid: i32,
        tty: bool,
        fds: Vec<OwnedFd>,
    ) -> Result<ExecSession, ExecError> {
        let expected = if tty { 2 } else { 4 };
        if fds.len() != expected {
            return Err(ExecError::Fds {
                id: id.to_owned(),
                got: fds.len(),
                expected,
            });
        }
        let io_err = |what| {
            let id = id.to_owned();
            move |source| ExecError::Io { id, what, source }
        };
        let mut fds = fds.into_iter();
        let mut next = || {
            fds.next()
                .ok_or_else(|| ExecError::status(id, "missing fd"))
        };
        let status = ExecFd::new(next()?).map_err(io_err("status pipe"))?;
        if tty {
            let master = next()?;
            let reader = master.try_clone().map_err(io_err("dup the pty master"))?;
            let resize = master.try_clone().map_err(io_err("dup the pty master"))?;
            return Ok(ExecSession {
                id: id.to_owned(),
                pid,
                stdin: Some(ExecFd::new(master).map_err(io_err("pty master"))?),
                stdout: Some(ExecFd::new(reader).map_err(io_err("pty master"))?),
                stderr: None,
                resizer: Some(TtyResizer {
                    id: id.to_owned(),
                    master: Arc::new(resize),
                }),
                status: Some(status),
            });
        }
        Ok(ExecSession {
            id: id.to_owned(),
            pid,
            stdin: Some(ExecFd::new(next()?).map_err(io_err("stdin pipe"))?),
            stdout: Some(ExecFd::new(next()?).map_err(io_err("stdout pipe"))?),
            stderr: Some(ExecFd::new(next()?).map_err(io_err("stderr pipe"))?),
            resizer: None,
            status: Some(status),
        })
    }

    /// True when the command runs on a terminal (its stdout carries its stderr too).
    pub fn is_tty(&self) -> bool {
        self.resizer.is_some()
    }

    pub fn take_stdin(&mut self) -> Option<ExecFd> {
        self.stdin.take()
    }

    pub fn take_stdout(&mut self) -> Option<ExecFd> {
        self.stdout.take()
    }

    /// `None` on a tty.
    pub fn take_stderr(&mut self) -> Option<ExecFd> {
        self.stderr.take()
    }

    /// The terminal's resizer (`None` without a tty).
    pub fn resizer(&self) -> Option<TtyResizer> {
        self.resizer.clone()
    }

    /// Sets the terminal's size (the command gets `SIGWINCH`).
    pub fn resize(&self, size: WindowSize) -> Result<(), ExecError> {
        match &self.resizer {
            Some(r) => r.resize(size),
            None => Err(ExecError::NotATty {
                id: self.id.clone(),
            }),
        }
    }

    /// Waits for the command to end and says how it did.
    pub async fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        let Some(mut status) = self.status.take() else {
            return Err(ExecError::status(&self.id, "already waited for"));
        };
        let mut text = String::new();
        status
            .read_to_string(&mut text)
            .await
            .map_err(|source| ExecError::Io {
                id: self.id.clone(),
                what: "read the exit status",
                source,
            })?;
        let line = text.trim();
        if line.is_empty() {
            return Err(ExecError::status(
                &self.id,
                "the exec waiter ended without reporting the exit status",
            ));
        }
        serde_json::from_str(line)
            .map_err(|e| ExecError::status(&self.id, format!("exit status {line:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_additions_replace_entries_of_the_same_key() {
        let base = vec![
            "PATH=/bin".to_owned(),
            "A=1".to_owned(),
            "A=2".to_owned(),
            "B=x".to_owned(),
        ];
        let merged = merge_env(&base, &["A=3".to_owned(), "C=".to_owned()]);
        assert_eq!(merged, vec!["PATH=/bin", "B=x", "A=3", "C="]);
    }

    #[test]
    fn exec_configs_are_checked() {
        let make = |args: &[&str], env: &[&str], cwd: Option<&str>| {
            ExecConfig::new(
                "web-1",
                "/b".into(),
                "/s".into(),
                ExecRequest {
                    args: args.iter().map(|s| s.to_string()).collect(),
                    env: env.iter().map(|s| s.to_string()).collect(),
                    cwd: cwd.map(str::to_owned),
                    tty: None,
                },
            )
        };
        assert!(matches!(
            make(&[], &[], None),
            Err(ExecError::EmptyCommand { .. })
        ));
        assert!(matches!(
            make(&[""], &[], None),
            Err(ExecError::EmptyCommand { .. })
        ));
        assert!(matches!(
            make(&["ls"], &["NOVALUE"], None),
            Err(ExecError::BadEnv { .. })
        ));
        assert!(matches!(
            make(&["ls"], &["=x"], None),
            Err(ExecError::BadEnv { .. })
        ));
        let err = make(&["ls"], &[], Some("tmp")).unwrap_err();
        assert!(err.to_string().contains("\"tmp\""), "{err}");
        let ok = make(&["ls", "-l"], &["A=b"], Some("/tmp")).unwrap();
        assert_eq!(ok.args, vec!["ls", "-l"]);
        assert_eq!(ok.bundle, PathBuf::from("/b"));
    }

    #[test]
    fn fds_travel_over_a_unix_socket() {
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        send_with_fds(a.as_raw_fd(), b"hello", &[w.as_raw_fd()]).unwrap();
        drop(w);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        let mut w = File::from(fds.into_iter().next().unwrap());
        w.write_all(b"through").unwrap();
        drop(w);
        let mut got = String::new();
        io::Read::read_to_string(&mut File::from(r), &mut got).unwrap();
        assert_eq!(got, "through");
    }

    #[tokio::test]
    async fn a_session_reads_pipes_and_its_status() {
        use tokio::io::AsyncWriteExt;
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (status_r, status_w) = pipe();
        let (in_r, in_w) = pipe();
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let mut session =
            ExecSession::from_fds("web-1", 42, false, vec![status_r, in_w, out_r, err_r]).unwrap();
        assert!(!session.is_tty());
        assert!(matches!(
            session.resize(WindowSize { rows: 1, cols: 1 }),
            Err(ExecError::NotATty { .. })
        ));
        let mut stdin = session.take_stdin().unwrap();
        stdin.write_all(b"in").await.unwrap();
        drop(stdin);
        let mut got = String::new();
        io::Read::read_to_string(&mut File::from(in_r), &mut got).unwrap();
        assert_eq!(got, "in");
        File::from(out_w).write_all(b"out").unwrap();
        drop(err_w);
        let mut out = String::new();
        session
            .take_stdout()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        assert_eq!(out, "out");
        let mut err = Vec::new();
        session
            .take_stderr()
            .unwrap()
            .read_to_end(&mut err)
            .await
            .unwrap();
        assert!(err.is_empty());
        writeln!(
            File::from(status_w),
            r#"{{"code":3,"signal":null,"finished_at":"t"}}"#
        )
        .unwrap();
        let status = session.wait().await.unwrap();
        assert_eq!(status.code, Some(3));
        assert!(
            session.wait().await.is_err(),
            "a second wait has nothing to read"
        );
    }

    #[tokio::test]
    async fn a_waiter_that_dies_without_a_status_is_an_error() {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (status_r, status_w) = pipe();
        let (_, master_like) = pipe();
        let mut session =
            ExecSession::from_fds("web-1", 42, true, vec![status_r, master_like]).unwrap();
        assert!(session.is_tty());
        assert!(session.take_stderr().is_none());
        drop(status_w);
        let err = session.wait().await.unwrap_err();
        assert!(err.to_string().contains("without reporting"), "{err}");
        assert!(
            ExecSession::from_fds("web-1", 42, false, Vec::new()).is_err(),
            "fd count is checked"
        );
    }
}
