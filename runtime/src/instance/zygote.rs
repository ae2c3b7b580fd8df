//! The zygote: a single-threaded helper process, exec'd by the daemon, that forks one shim per
//! instance.
//!
//! libcontainer's `build()` clones from the calling thread and changes process-wide state
//! (working directory, dumpable flag), which deadlocks or races inside a multi-threaded tokio
//! process. The daemon therefore never calls it: it sends a [`LaunchConfig`] over a
//! `SOCK_SEQPACKET` socket to the zygote, which forks (safe: it has one thread), the child
//! detaches into its own session and forks the shim, and the shim does the libcontainer calls
//! and reports back. The zygote exits when the daemon goes away; shims do not.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Mutex;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

use super::config::{LaunchConfig, ShimState};
use super::exec::{self, ExecConfig, ExecStarted};
use super::shim;

/// The fd number the zygote finds its socket at.
pub const ZYGOTE_FD: RawFd = 3;
const MAX_MESSAGE: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("start zygote {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("zygote socket: {0}")]
    Socket(nix::Error),
    #[error("zygote exited (its log is on the daemon's stderr)")]
    Gone,
    #[error("zygote did not answer within {0:?}; a new one will be started")]
    Timeout(std::time::Duration),
    #[error("zygote protocol: {0}")]
    Protocol(String),
    #[error("launch {id}: {message}")]
    Launch { id: String, message: String },
    #[error("exec in instance {id}: {message}")]
    Exec { id: String, message: String },
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Launch(Box<LaunchConfig>),
    /// Run a command inside a running instance (see [`super::exec`]); answered with
    /// [`Response::ExecStarted`] and the session's fds attached.
    Exec(Box<ExecConfig>),
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Launched(ShimState),
    Failed(String),
    ExecStarted(ExecStarted),
}

/// The daemon's handle on its zygote.
pub struct Zygote {
    sock: Mutex<OwnedFd>,
    child: Mutex<Child>,
    /// Set when the socket may hold a reply nobody read, or the zygote stopped answering: the
    /// manager then replaces this zygote rather than risk pairing a reply with the wrong launch.
    broken: std::sync::atomic::AtomicBool,
}

/// How long a launch may take before the zygote is given up on (a shim stuck in the kernel,
/// e.g. on a hung mount): the manager starts a new zygote for the next launch.
pub const LAUNCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Zygote {
    /// Starts `program args...` with the zygote socket at fd [`ZYGOTE_FD`]. The program must call
    /// [`serve`] (the `lull` binary does for `lull __zygote`).
    ///
    /// The zygote dies with the *thread* that spawned it (`PR_SET_PDEATHSIG` follows the parent
    /// thread): call this from a thread that lives as long as the zygote is needed (the main
    /// thread, not a pool thread that may retire).
    pub fn spawn(program: &Path, args: &[String]) -> Result<Zygote, ZygoteError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ZygoteError::Socket)?;
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
        // functions (dup2, fcntl) on fds that are open in the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if theirs_raw == ZYGOTE_FD {
                    if libc::fcntl(ZYGOTE_FD, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_raw, ZYGOTE_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| ZygoteError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
        drop(theirs);
        let timeout = nix::sys::time::TimeVal::new(LAUNCH_TIMEOUT.as_secs() as _, 0);
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(ZygoteError::Socket)?;
        Ok(Zygote {
            sock: Mutex::new(ours),
            child: Mutex::new(child),
            broken: Default::default(),
        })
    }

    /// Launches an instance (blocking: call from a blocking thread). Returns when the instance's
    /// process runs, or with the reason it could not start.
    pub fn launch(&self, cfg: &LaunchConfig) -> Result<ShimState, ZygoteError> {
        let request = serde_json::to_vec(&Request::Launch(Box::new(cfg.clone())))
            .map_err(|e| ZygoteError::Protocol(e.to_string()))?;
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let broken = |e: ZygoteError| {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
            e
        };
        send(sock.as_raw_fd(), &request, MsgFlags::MSG_NOSIGNAL).map_err(|e| match e {
            nix::Error::EPIPE | nix::Error::ECONNRESET => broken(ZygoteError::Gone),
            e => broken(ZygoteError::Socket(e)),
        })?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = loop {
            match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => {
                    return Err(broken(ZygoteError::Timeout(LAUNCH_TIMEOUT)));
                }
                Err(e) => return Err(broken(ZygoteError::Socket(e))),
            }
        };
        if n == 0 {
            return Err(broken(ZygoteError::Gone));
        }
        match serde_json::from_slice(&buf[..n]).map_err(|e| ZygoteError::Protocol(e.to_string()))? {
            Response::Launched(state) => Ok(state),
            Response::Failed(message) => Err(ZygoteError::Launch {
                id: cfg.id.clone(),
                message,
            }),
            Response::ExecStarted(_) => Err(ZygoteError::Protocol(
                "an exec answer to a launch request".into(),
            )),
        }
    }
}

impl Zygote {
    /// Runs a command inside a running instance (blocking: call from a blocking thread).
    /// Returns the command's pid and the session's fds (see [`super::exec`]).
    pub fn exec(&self, cfg: &ExecConfig) -> Result<(i32, Vec<OwnedFd>), ZygoteError> {
        let request = serde_json::to_vec(&Request::Exec(Box::new(cfg.clone())))
            .map_err(|e| ZygoteError::Protocol(e.to_string()))?;
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        let broken = |e: ZygoteError| {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
            e
        };
        send(sock.as_raw_fd(), &request, MsgFlags::MSG_NOSIGNAL).map_err(|e| match e {
            nix::Error::EPIPE | nix::Error::ECONNRESET => broken(ZygoteError::Gone),
            e => broken(ZygoteError::Socket(e)),
        })?;
        let mut buf = vec![0u8; 64 * 1024];
        let (n, fds) = match exec::recv_with_fds(sock.as_raw_fd(), &mut buf) {
            Ok(r) => r,
            Err(nix::Error::EAGAIN) => return Err(broken(ZygoteError::Timeout(LAUNCH_TIMEOUT))),
            Err(e) => return Err(broken(ZygoteError::Socket(e))),
        };
        if n == 0 {
            return Err(broken(ZygoteError::Gone));
        }
        match serde_json::from_slice(&buf[..n]).map_err(|e| ZygoteError::Protocol(e.to_string()))? {
            Response::ExecStarted(started) => Ok((started.pid, fds)),
            Response::Failed(message) => Err(ZygoteError::Exec {
                id: cfg.id.clone(),
                message,
            }),
            Response::Launched(_) => Err(ZygoteError::Protocol(
                "a launch answer to an exec request".into(),
            )),
        }
    }

    /// The zygote's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }

    /// True once this zygote can no longer be trusted with a launch (see [`LAUNCH_TIMEOUT`]).
    pub fn is_broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The zygote's main loop, on the socket at `fd`. Returns the process exit code. Must run in a
/// freshly exec'd, single-threaded process.
pub fn serve(fd: RawFd) -> i32 {
    // Die with the daemon: shims are detached and live on, the zygote has nothing left to do.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: the daemon passed this fd to us at exec; nothing else in this process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return 0,
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("zygote: receive: {e}");
                return 1;
            }
        };
        let (response, fds) = match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(Request::Launch(cfg)) => (launch(&cfg, sock.as_raw_fd()), Vec::new()),
            Ok(Request::Exec(cfg)) => exec_in_instance(&cfg, sock.as_raw_fd()),
            Err(e) => (
                Response::Failed(format!("zygote: bad request: {e}")),
                Vec::new(),
            ),
        };
        let bytes = match serde_json::to_vec(&response) {
            Ok(b) => b,
            Err(e) => format!("{{\"Failed\":\"zygote: encode response: {e}\"}}").into_bytes(),
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if let Err(e) = exec::send_with_fds(sock.as_raw_fd(), &bytes, &raw) {
            tracing::error!("zygote: send: {e}");
            return 1;
        }
        // The daemon has its own copies now.
        drop(fds);
    }
}

/// Forks the exec waiter (detached like a shim) and relays what it reports, fds included.
fn exec_in_instance(cfg: &ExecConfig, zygote_sock: RawFd) -> (Response, Vec<OwnedFd>) {
    let failed = |message: String| (Response::Failed(message), Vec::new());
    let (ours, theirs) = match socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(p) => p,
        Err(e) => return failed(format!("exec report socket: {e}")),
    };
    // SAFETY: the zygote is single-threaded, so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => failed(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(ours);
            // SAFETY: closing our copy of the zygote socket in the child; it is not used here.
            unsafe { libc::close(zygote_sock) };
            let _ = nix::unistd::setsid();
            // SAFETY: still single-threaded.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => exec::run_waiter(cfg, theirs),
                // SAFETY: _exit ends the intermediate child without running atexit handlers.
                Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(1) },
            }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(theirs);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut buf = vec![0u8; 64 * 1024];
            match exec::recv_with_fds(ours.as_raw_fd(), &mut buf) {
                Ok((0, _)) => failed("the exec waiter died before reporting".into()),
                Ok((n, fds)) => {
                    match serde_json::from_slice::<Result<ExecStarted, String>>(&buf[..n]) {
                        Ok(Ok(started)) => (Response::ExecStarted(started), fds),
                        Ok(Err(message)) => failed(message),
                        Err(e) => failed(format!("exec report: {e}")),
                    }
                }
                Err(e) => failed(format!("exec report: {e}")),
            }
        }
    }
}

fn launch(cfg: &LaunchConfig, zygote_sock: RawFd) -> Response {
    let (report_r, report_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return Response::Failed(format!("report pipe: {e}")),
    };
    // SAFETY: the zygote is single-threaded, so the child may run arbitrary code after fork.
    match unsafe { fork() } {
        Err(e) => Response::Failed(format!("fork: {e}")),
        Ok(ForkResult::Child) => {
            drop(report_r);
            // SAFETY: closing our copy of the zygote socket in the child; the fd is not used again here.
            unsafe { libc::close(zygote_sock) };
            let _ = nix::unistd::setsid();
            // SAFETY: still single-threaded.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => shim::run(cfg, report_w),
                // SAFETY: _exit ends the intermediate child without running the parent's atexit handlers.
                Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(1) },
            }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(report_w);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut line = String::new();
            let mut reader = BufReader::new(std::fs::File::from(report_r));
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => Response::Failed(
                    "the instance shim died before reporting (see shim.log in the instance dir)"
                        .into(),
                ),
                Ok(_) => match serde_json::from_str::<Result<ShimState, String>>(&line) {
                    Ok(Ok(state)) => Response::Launched(state),
                    Ok(Err(message)) => Response::Failed(message),
                    Err(e) => Response::Failed(format!("shim report: {e}")),
                },
            }
        }
    }
}

/// Where the zygote and its shims write diagnostics: stderr in the zygote, the instance's
/// `shim.log` in a shim. Not fd 2 itself, because libcontainer's init (forked from the shim)
/// points fd 2 at the app's stderr pipe and would mix its own messages into the app's log.
static DIAGNOSTICS_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(2);

pub(crate) fn set_diagnostics_fd(fd: RawFd) {
    DIAGNOSTICS_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
}

/// A `std::io::Write` for the zygote's log subscriber (see [`DIAGNOSTICS_FD`]).
pub struct DiagnosticsWriter;

impl std::io::Write for DiagnosticsWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let fd = DIAGNOSTICS_FD.load(std::sync::atomic::Ordering::Relaxed);
        // SAFETY: writes from a valid buffer to an fd this process keeps open for its lifetime.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
