//! `lull exec SERVICE [--instance ID] [-t] [-i] -- CMD [ARGS...]`: runs a command inside one of
//! a service's instances (by default the first healthy one of the serving revision) and streams
//! its input and output over the daemon's admin socket (see the daemon's `control::exec` for
//! the protocol).
//!
//! With `-t` the command gets a terminal: the local one goes raw (restored on every way out:
//! the command's end, an error, SIGTERM, SIGHUP) and its size follows the window's (SIGWINCH).
//! With `-i` local stdin is forwarded; without it the command's stdin is closed (or, on a
//! terminal, left without input). lull exits with the command's exit code (128 + N when a
//! signal N ended it; 127 or 126 when the command was not found or could not run), or with the
//! client commands' codes when the exec could not start.

use std::io::{self, Read};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Args;
use http::Method;
use lull_daemon::control::exec::{
    ExecBody, ExecExit, FrameKind, UPGRADE_PROTOCOL, read_frame, resize_payload, write_frame,
};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::{ClientArgs, Ctx, Failure, finish, service_path};

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The service whose instance runs the command.
    pub service: String,
    /// The instance (default: the first healthy instance of the serving revision).
    #[arg(long, value_name = "ID")]
    pub instance: Option<String>,
    /// Run the command on a terminal (the local one goes raw while it runs).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Forward local stdin to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Set an environment variable for the command (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command's working directory inside the instance (absolute).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// Runs `lull exec` and returns lull's exit code.
pub async fn run(args: &ClientArgs, exec: &ExecArgs) -> ExitCode {
    match exec_command(args, exec).await {
        Ok(code) => code,
        Err(failure) => finish(Err(failure)),
    }
}

/// The request's body from the command line.
fn body(exec: &ExecArgs, size: Option<(u16, u16)>) -> Result<ExecBody, Failure> {
    let mut env = std::collections::BTreeMap::new();
    for entry in &exec.env {
        match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => {
                env.insert(key.to_owned(), value.to_owned());
            }
            _ => {
                return Err(Failure::Usage(format!(
                    "--env {entry:?}: expected KEY=VALUE"
                )));
            }
        }
    }
    Ok(ExecBody {
        command: exec.command.clone(),
        instance: exec.instance.clone(),
        tty: exec.tty,
        env,
        cwd: exec.workdir.clone(),
        rows: size.map(|s| s.0),
        cols: size.map(|s| s.1),
    })
}

/// Lull's exit code for how the command ended.
pub fn exit_code(exit: &ExecExit) -> u8 {
    match (exit.code, exit.signal) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

async fn exec_command(args: &ClientArgs, exec: &ExecArgs) -> Result<ExitCode, Failure> {
    let is_tty = |fd| {
        // SAFETY: isatty only inspects the fd.
        unsafe { libc::isatty(fd) == 1 }
    };
    if exec.tty && !is_tty(0) {
        return Err(Failure::Usage(
            "-t needs a terminal on stdin: run it from one, or drop -t".into(),
        ));
    }
    let size = if exec.tty { window_size() } else { None };
    let ctx = Ctx::new(args);
    let path = format!("{}/exec", service_path(&exec.service));
    let upgraded = ctx
        .client
        .upgrade(Method::POST, &path, &body(exec, size)?, UPGRADE_PROTOCOL)
        .await?;
    // From here on every way out passes the guard's drop, which restores the terminal.
    let _raw = if exec.tty {
        Some(RawTerminal::enable(0).map_err(|e| Failure::Other(format!("raw terminal: {e}")))?)
    } else {
        None
    };
    let (mut from_daemon, mut to_daemon) = tokio::io::split(upgraded);
    let (tx, mut rx) = mpsc::channel::<(FrameKind, Bytes)>(16);
    let sender = tokio::spawn(async move {
        while let Some((kind, payload)) = rx.recv().await {
            if write_frame(&mut to_daemon, kind, &payload).await.is_err() {
                return;
            }
        }
    });
    if exec.interactive {
        forward_stdin(tx.clone());
    } else if !exec.tty {
        let _ = tx.send((FrameKind::StdinEof, Bytes::new())).await;
    }
    let mut winch = signal(SignalKind::window_change())
        .map_err(|e| Failure::Other(format!("watch the window size: {e}")))?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Failure::Other(format!("handle SIGTERM: {e}")))?;
    let mut hangup =
        signal(SignalKind::hangup()).map_err(|e| Failure::Other(format!("handle SIGHUP: {e}")))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| Failure::Other(format!("handle SIGINT: {e}")))?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let outcome = loop {
        let frame = tokio::select! {
            frame = read_frame(&mut from_daemon) => frame,
            _ = winch.recv(), if exec.tty => {
                if let Some((rows, cols)) = window_size() {
                    let _ = tx
                        .send((FrameKind::Resize, Bytes::copy_from_slice(&resize_payload(rows, cols))))
                        .await;
                }
                continue;
            }
            _ = term.recv() => break Err(Failure::Other("stopped by SIGTERM".into())),
            _ = hangup.recv() => break Err(Failure::Other("stopped by SIGHUP".into())),
            // Only without a terminal: a raw terminal sends ^C to the command instead.
            _ = interrupt.recv() => break Ok(ExitCode::from(130)),
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                break Err(Failure::Other(
                    "the daemon closed the exec stream before the command ended".into(),
                ));
            }
            Err(e) => break Err(Failure::Other(e.to_string())),
        };
        match frame.kind {
            FrameKind::Stdout => {
                let _ = stdout.write_all(&frame.payload).await;
                let _ = stdout.flush().await;
            }
            FrameKind::Stderr => {
                let _ = stderr.write_all(&frame.payload).await;
                let _ = stderr.flush().await;
            }
            FrameKind::Exit => {
                let exit: ExecExit = serde_json::from_slice(&frame.payload).unwrap_or_default();
                break Ok(ExitCode::from(exit_code(&exit)));
            }
            FrameKind::Error => {
                break Err(Failure::Other(format!(
                    "exec failed: {}",
                    String::from_utf8_lossy(&frame.payload)
                )));
            }
            FrameKind::Stdin | FrameKind::StdinEof | FrameKind::Resize => {}
        }
    };
    drop(tx);
    sender.abort();
    outcome
}

/// Reads local stdin on a thread of its own (a blocking read that may never end must not hold
/// up the runtime's shutdown) and forwards it; its end becomes a stdin-eof frame.
fn forward_stdin(tx: mpsc::Sender<(FrameKind, Bytes)>) {
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .blocking_send((FrameKind::Stdin, Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = tx.blocking_send((FrameKind::StdinEof, Bytes::new()));
    });
}

/// The local terminal's size `(rows, cols)`, from stdout or stdin.
fn window_size() -> Option<(u16, u16)> {
    for fd in [1, 0] {
        // SAFETY: winsize is plain old data; all-zero is a valid value.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize to a valid pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// The local terminal in raw mode while this lives; its settings come back on drop (also when
/// unwinding from a panic).
struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    fn enable(fd: i32) -> io::Result<RawTerminal> {
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes to a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits a valid termios in place; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads the settings saved by `enable`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_command() {
        let code = |code, signal| exit_code(&ExecExit { code, signal });
        assert_eq!(code(Some(0), None), 0);
        assert_eq!(code(Some(3), None), 3);
        assert_eq!(code(Some(127), None), 127);
        assert_eq!(code(None, Some(9)), 137);
        assert_eq!(code(None, None), 1);
    }

    #[test]
    fn env_flags_are_key_value_pairs() {
        let args = |env: &[&str]| ExecArgs {
            service: "web".into(),
            instance: None,
            tty: false,
            interactive: false,
            env: env.iter().map(|s| s.to_string()).collect(),
            workdir: None,
            command: vec!["ls".into()],
        };
        let made = body(&args(&["A=1", "B=x=y"]), None).unwrap();
        assert_eq!(made.env.get("B").map(String::as_str), Some("x=y"));
        assert!(matches!(
            body(&args(&["NOPE"]), None),
            Err(Failure::Usage(_))
        ));
        assert!(matches!(body(&args(&["=v"]), None), Err(Failure::Usage(_))));
    }

    #[test]
    fn a_raw_terminal_is_restored() {
        let pty = match open_pty() {
            Some(p) => p,
            None => panic!("openpty failed"),
        };
        let (master, slave) = pty;
        let lflag = |fd| {
            // SAFETY: termios is plain old data; tcgetattr fills it.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
            t.c_lflag
        };
        let before = lflag(slave);
        assert_ne!(before & libc::ICANON, 0, "a new pty starts canonical");
        {
            let _raw = RawTerminal::enable(slave).unwrap();
            assert_eq!(lflag(slave) & libc::ICANON, 0, "raw while the guard lives");
        }
        assert_eq!(lflag(slave), before);
        // SAFETY: closes the fds openpty returned.
        unsafe {
            libc::close(master);
            libc::close(slave);
        }
    }

    fn open_pty() -> Option<(i32, i32)> {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two fds; the name, termios and winsize pointers may be null.
        let ret = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        (ret == 0).then_some((master, slave))
    }
}
