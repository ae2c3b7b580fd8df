//! The per-instance shim: a small process, detached from the daemon, that launches one instance
//! through libcontainer, holds the read ends of its stdout and stderr (so the app never gets
//! SIGPIPE when the daemon dies), writes them to the log store, waits for the instance's init and
//! records its exit status in `exit.json`. Like conmon or containerd-shim, it outlives the daemon.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::config::{ExitStatus, InstancePaths, LaunchConfig, ShimState, write_json_atomic};
use super::pidfd::{PidFd, process_start_time};
use super::{overlay, spec, user};
use crate::logs::{LineSplitter, LogWriter, Stream};

/// How long output is still drained after the instance's init exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Runs the shim in a freshly forked, single-threaded, session-leading child. Never returns.
pub(crate) fn run(cfg: &LaunchConfig, report: OwnedFd) -> ! {
    let paths = InstancePaths::new(&cfg.dir);
    redirect_stdio(&paths.shim_log());
    // The shim must survive the signals aimed at a terminal's or a service's processes, but it
    // must not ignore them (SIG_IGN is inherited across exec, and a shell cannot trap a signal
    // ignored at its start): a no-op handler is reset to the default at the app's exec.
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: prctl takes integers; signal installs a handler that does nothing (async-signal-safe).
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
        for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGHUP, libc::SIGTERM] {
            libc::signal(sig, ignore as *const () as libc::sighandler_t);
        }
    }
    let mut report = File::from(report);
    match launch(cfg, &paths) {
        Ok((state, io)) => {
            let _ = writeln!(
                report,
                "{}",
                serde_json::to_string(&Ok::<_, String>(&state)).unwrap_or_default()
            );
            drop(report);
            supervise(cfg, &paths, &state, io);
            // SAFETY: ends the shim without running atexit handlers inherited from the zygote.
            unsafe { libc::_exit(0) }
        }
        Err(message) => {
            tracing::error!(instance = %cfg.id, "launch failed: {message}");
            cleanup_failed_launch(cfg, &paths);
            let _ = writeln!(
                report,
                "{}",
                serde_json::to_string(&Err::<ShimState, _>(message)).unwrap_or_default()
            );
            // SAFETY: as above.
            unsafe { libc::_exit(1) }
        }
    }
}

fn redirect_stdio(log: &Path) {
    let log = OpenOptions::new().create(true).append(true).open(log);
    if let Ok(log) = &log {
        // A private fd for diagnostics (close-on-exec, so the app never sees it).
        if let Ok(private) = log.try_clone() {
            super::zygote::set_diagnostics_fd(private.as_raw_fd());
            std::mem::forget(private);
        }
    }
    let null = File::open("/dev/null");
    // SAFETY: dup2 onto the standard fds of this single-threaded process; the sources are open.
    unsafe {
        if let Ok(null) = &null {
            libc::dup2(null.as_raw_fd(), 0);
        }
        if let Ok(log) = &log {
            libc::dup2(log.as_raw_fd(), 1);
            libc::dup2(log.as_raw_fd(), 2);
        }
    }
}

struct Output {
    stdout: OwnedFd,
    stderr: OwnedFd,
}

fn launch(cfg: &LaunchConfig, paths: &InstancePaths) -> Result<(ShimState, Output), String> {
    let started = Instant::now();
    let step =
        |what: &str| tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "{what}");
    for dir in [paths.rootfs(), paths.upper(), paths.work(), paths.logs()] {
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let (layers_dir, layers) = if cfg.layers.is_empty() {
        let empty = paths.empty_layer();
        fs::create_dir_all(&empty).map_err(|e| format!("create {}: {e}", empty.display()))?;
        (paths.dir.clone(), vec!["empty".to_owned()])
    } else {
        (cfg.layers_dir.clone(), cfg.layers.clone())
    };
    overlay::mount_overlay(
        &layers_dir,
        &layers,
        &paths.upper(),
        &paths.work(),
        &paths.rootfs(),
    )
    .map_err(|e| e.to_string())?;
    step("overlay mounted");

    let rootfs = paths.rootfs();
    let passwd = read_image_file(&rootfs, "etc/passwd");
    let group = read_image_file(&rootfs, "etc/group");
    let user = user::resolve_user(&cfg.process.user, &passwd, &group).map_err(|e| e.to_string())?;
    for file in cfg.files.iter().filter(|f| f.owned_by_app) {
        std::os::unix::fs::lchown(&file.source, Some(user.uid), Some(user.gid)).map_err(|e| {
            format!(
                "give {} to uid {} gid {}: {e}",
                file.source.display(),
                user.uid,
                user.gid
            )
        })?;
    }
    let spec = spec::build_spec(cfg, &user);
    let config_path = paths.dir.join("config.json");
    spec.save(&config_path)
        .map_err(|e| format!("write {}: {e}", config_path.display()))?;

    step("spec written");
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("stdout pipe: {e}"))?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("stderr pipe: {e}"))?;

    let mut container: Container = ContainerBuilder::new(cfg.id.clone(), SyscallType::default())
        .with_root_path(&cfg.state_root)
        .map_err(|e| format!("libcontainer root {}: {e}", cfg.state_root.display()))?
        .with_stdout(out_w)
        .with_stderr(err_w)
        .validate_id()
        .map_err(|e| format!("instance id {:?}: {e}", cfg.id))?
        .as_init(&paths.dir)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| format!("create instance: {e}"))?;
    step("instance created");
    // The groups exist now and the app has not started: put its CPU limit on its limit group.
    for write in &cfg.cpu_limit_writes {
        fs::write(&write.path, &write.value).map_err(|e| {
            format!(
                "set cpu limit: write {:?} to {}: {e}",
                write.value,
                write.path.display()
            )
        })?;
    }
    if let Some(gate) = &cfg.start_gate {
        wait_for_start(gate)?;
        step("start gate open");
    }
    container
        .start()
        .map_err(|e| format!("start instance: {e}"))?;
    let init_pid = container
        .pid()
        .ok_or("libcontainer reported no pid for the started instance")?
        .as_raw();

    let shim_pid = std::process::id() as i32;
    let state = ShimState {
        init_pid,
        init_start_time: process_start_time(init_pid)
            .ok_or_else(|| format!("instance process {init_pid} vanished right after start"))?,
        shim_pid,
        shim_start_time: process_start_time(shim_pid).unwrap_or_default(),
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
    };
    step("instance started");
    write_json_atomic(&paths.state(), &state)
        .map_err(|e| format!("write {}: {e}", paths.state().display()))?;
    Ok((
        state,
        Output {
            stdout: out_r,
            stderr: err_r,
        },
    ))
}

/// How long the shim waits at the start gate: less than the zygote's own wait for its report,
/// so a start that never comes fails here, with this reason.
const START_GATE_TIMEOUT: Duration = Duration::from_secs(50);

/// Waits for the go-ahead on the start gate FIFO (see [`LaunchConfig::start_gate`]).
fn wait_for_start(gate: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so the open returns even if the daemon (the writer) is already gone; the
    // read then sees end of file.
    let mut fifo = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(gate)
        .map_err(|e| format!("open the start gate {}: {e}", gate.display()))?;
    let deadline = Instant::now() + START_GATE_TIMEOUT;
    let mut byte = [0u8; 1];
    loop {
        match fifo.read(&mut byte) {
            Ok(1) if byte[0] == b'1' => return Ok(()),
            Ok(1) => return Err("the start was called off by the daemon".into()),
            Ok(_) => return Err("the daemon went away before starting the instance".into()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "no start signal within {}s of the instance's creation",
                        START_GATE_TIMEOUT.as_secs()
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: fifo.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd, owned by this frame, for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            Err(e) => return Err(format!("read the start gate {}: {e}", gate.display())),
        }
    }
}

/// Reads a small file of the image (passwd, group) without following symlinks out of the rootfs.
fn read_image_file(rootfs: &Path, relative: &str) -> String {
    let Ok(root) = File::open(rootfs) else {
        return String::new();
    };
    let Ok(path) = std::ffi::CString::new(relative) else {
        return String::new();
    };
    // SAFETY: open_how is plain old data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `path` (NUL-terminated) and `how` (size given) and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return String::new();
    }
    // SAFETY: openat2 returned a fresh fd that we own.
    let mut file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut out = String::new();
    let _ = Read::by_ref(&mut file)
        .take(1 << 20)
        .read_to_string(&mut out);
    out
}

fn cleanup_failed_launch(cfg: &LaunchConfig, paths: &InstancePaths) {
    if let Ok(mut container) = Container::load(cfg.state_root.join(&cfg.id))
        && let Err(e) = container.delete(true)
    {
        tracing::warn!("delete half-created instance: {e}");
    }
    let _ = fs::remove_dir_all(cfg.state_root.join(&cfg.id));
    if let Err(e) = overlay::unmount(&paths.rootfs()) {
        tracing::warn!("{e}");
    }
}

struct Pipe {
    fd: OwnedFd,
    stream: Stream,
    splitter: LineSplitter,
    open: bool,
}

fn supervise(cfg: &LaunchConfig, paths: &InstancePaths, state: &ShimState, out: Output) {
    let mut writer = match LogWriter::open(&paths.logs(), cfg.log_limits) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!("{e}; output will be drained but not kept");
            None
        }
    };
    let mut pipes = [
        Pipe {
            fd: out.stdout,
            stream: Stream::Stdout,
            splitter: LineSplitter::default(),
            open: true,
        },
        Pipe {
            fd: out.stderr,
            stream: Stream::Stderr,
            splitter: LineSplitter::default(),
            open: true,
        },
    ];
    let init = PidFd::open(state.init_pid).ok();
    let mut status: Option<ExitStatus> = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];

    let record = |writer: &mut Option<LogWriter>,
                  stream: Stream,
                  partial: bool,
                  text: &[u8]|
     -> Result<(), ()> {
        if let Some(w) = writer.as_mut()
            && let Err(e) = w.record(stream, partial, text)
        {
            tracing::error!("{e}");
        }
        Ok(())
    };

    loop {
        if status.is_none() && init.as_ref().is_none_or(|p| p.has_exited()) {
            status = Some(reap(state.init_pid));
            drain_deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
        }
        let open: Vec<usize> = (0..pipes.len()).filter(|&i| pipes[i].open).collect();
        if status.is_some()
            && (open.is_empty() || drain_deadline.is_some_and(|d| Instant::now() >= d))
        {
            break;
        }
        let mut pollfds: Vec<libc::pollfd> = open
            .iter()
            .map(|&i| libc::pollfd {
                fd: pipes[i].fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if status.is_none()
            && let Some(p) = &init
        {
            pollfds.push(libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if status.is_some() { 100 } else { -1 };
        // SAFETY: pollfds is a valid array of the given length for the duration of the call.
        let ret =
            unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("poll: {err}");
            break;
        }
        for (slot, &i) in open.iter().enumerate() {
            if pollfds[slot].revents == 0 {
                continue;
            }
            let pipe = &mut pipes[i];
            match nix::unistd::read(pipe.fd.as_fd().as_raw_fd(), &mut buf) {
                Ok(0) => pipe.open = false,
                Ok(n) => {
                    let stream = pipe.stream;
                    let _ = pipe.splitter.feed(&buf[..n], |partial, text| {
                        record(&mut writer, stream, partial, text)
                    });
                }
                Err(nix::Error::EINTR) | Err(nix::Error::EAGAIN) => {}
                Err(e) => {
                    tracing::error!("read {}: {e}", pipe.stream.as_str());
                    pipe.open = false;
                }
            }
        }
    }
    for pipe in &mut pipes {
        let stream = pipe.stream;
        let _ = pipe
            .splitter
            .finish(|partial, text| record(&mut writer, stream, partial, text));
    }
    let status = status.unwrap_or_else(|| reap(state.init_pid));
    if let Err(e) = write_json_atomic(&paths.exit(), &status) {
        tracing::error!("write {}: {e}", paths.exit().display());
    }
    // Reap anything else that was reparented to us (we are a subreaper).
    while let Ok(s) = waitpid(
        Pid::from_raw(-1),
        Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL),
    ) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

fn reap(pid: i32) -> ExitStatus {
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
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!("wait for instance process {pid}: {e}");
                return finished(None, None);
            }
        }
    }
}
