//! Process file descriptors: signal and await a process without racing PID reuse, and without
//! `waitpid(-1)` (which would steal exit codes from other code in the daemon).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An open pidfd.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: i32,
}

impl PidFd {
    pub fn open(pid: i32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };
        Ok(PidFd { fd, pid })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal`; `ESRCH` (already gone) is reported as `Ok(false)`.
    pub fn signal(&self, signal: i32) -> io::Result<bool> {
        // SAFETY: pidfd_send_signal with a null siginfo and no flags only reads the fd.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(err)
        }
    }

    /// True once the process has exited (the fd polls readable).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, zero timeout.
        let ret = unsafe { libc::poll(&mut pfd, 1, 0) };
        ret > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// Waits (asynchronously) until the process exits.
    pub async fn exited(&self) -> io::Result<()> {
        let fd = self.fd.try_clone()?;
        // SAFETY: `fd` is an owned duplicate that the AsyncFd keeps open for its whole lifetime.
        let afd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }?;
        let _guard = afd.readable().await?;
        Ok(())
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with the
/// pid, it names a process unambiguously across PID reuse.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True if `pid` is alive, not a zombie, and started at `start_time`.
pub fn is_same_process_alive(pid: i32, start_time: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let state = stat[close + 1..].split_whitespace().next();
    state != Some("Z") && state != Some("X") && parse_start_time(&stat) == Some(start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_with_odd_command_names() {
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 100";
        assert_eq!(parse_start_time(stat), Some(98765));
    }

    #[test]
    fn own_process_is_alive_and_signalable() {
        let pid = std::process::id() as i32;
        let start = process_start_time(pid).unwrap();
        assert!(is_same_process_alive(pid, start));
        assert!(!is_same_process_alive(pid, start + 1));
        let fd = PidFd::open(pid).unwrap();
        assert!(fd.signal(0).unwrap());
        assert!(!fd.has_exited());
    }

    #[tokio::test]
    async fn observes_a_child_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.05")
            .spawn()
            .unwrap();
        let fd = PidFd::open(child.id() as i32).unwrap();
        fd.exited().await.unwrap();
        assert!(fd.has_exited());
        assert!(child.wait().unwrap().success());
    }
}
