//! File descriptors passed at exec, as sd_listen_fds_with_names(3) reads them: when
//! `LISTEN_PID` is this process, `LISTEN_FDS` fds start at fd 3 ([`FIRST_FD`]), named by the
//! colon-separated `LISTEN_FDNAMES` (each `unknown` when it is unset). systemd passes them for
//! socket activation and, after a restart, from its fd store; a lull daemon replacing itself
//! passes its listeners the same way.
//!
//! A name may not contain `:` (it separates the names) and systemd refuses such an `FDNAME=`;
//! [`valid_name`] checks one.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The first passed fd.
pub const FIRST_FD: RawFd = 3;

/// Passed fds beyond this are refused (systemd's own limit on an fd store is lower).
pub const MAX_FDS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("LISTEN_PID is not a process id: {value:?}")]
    Pid { value: String },
    #[error("LISTEN_FDS is not a count of at most {MAX_FDS}: {value:?}")]
    Count { value: String },
    #[error("LISTEN_FDNAMES has {names} name(s) for {fds} fd(s)")]
    Names { names: usize, fds: usize },
    #[error("passed fd {fd} ({name}): {source}")]
    Fd {
        fd: RawFd,
        name: String,
        #[source]
        source: nix::Error,
    },
}

/// One passed file descriptor and its name.
#[derive(Debug)]
pub struct ListenFd {
    pub name: String,
    pub fd: OwnedFd,
}

/// What the three variables say for process `me`: `None` when nothing was passed to it
/// (no `LISTEN_PID`, or another process's), else the names of the fds from [`FIRST_FD`] on.
pub fn parse(
    me: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
) -> Result<Option<Vec<String>>, ListenError> {
    let Some(pid) = listen_pid else {
        return Ok(None);
    };
    let pid: u32 = pid.trim().parse().map_err(|_| ListenError::Pid {
        value: pid.to_owned(),
    })?;
    if pid != me {
        return Ok(None);
    }
    let count = match listen_fds {
        None => 0,
        Some(value) => value
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= MAX_FDS)
            .ok_or_else(|| ListenError::Count {
                value: value.to_owned(),
            })?,
    };
    let names: Vec<String> = match names {
        Some(names) if count > 0 => names.split(':').map(str::to_owned).collect(),
        _ => vec!["unknown".to_owned(); count],
    };
    if names.len() != count {
        return Err(ListenError::Names {
            names: names.len(),
            fds: count,
        });
    }
    Ok(Some(names))
}

/// Takes the fds passed to this process (sd_listen_fds_with_names with
/// `unset_environment`): each gets `FD_CLOEXEC` (so they go no further than this process),
/// and `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed from the environment
/// whatever they said. Empty when nothing was passed.
///
/// # Safety
/// It changes the environment: no other thread may read or write it meanwhile. And the
/// passed fds must not be in use yet by anything in this process (call it once, early).
pub unsafe fn listen_fds() -> Result<Vec<ListenFd>, ListenError> {
    let vars = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"].map(|v| std::env::var(v).ok());
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees no other thread touches the environment now.
        unsafe { std::env::remove_var(var) };
    }
    let names = match parse(
        std::process::id(),
        vars[0].as_deref(),
        vars[1].as_deref(),
        vars[2].as_deref(),
    )? {
        Some(names) => names,
        None => return Ok(Vec::new()),
    };
    // SAFETY: LISTEN_PID names this process, so fds FIRST_FD.. were passed to it, and the
    // caller guarantees nothing else took them.
    unsafe { take(FIRST_FD, names) }
}

/// Takes ownership of fds `first`, `first + 1`, ... (one per name), setting `FD_CLOEXEC`.
///
/// # Safety
/// Those fds must be open and owned by nothing else in this process.
pub unsafe fn take(first: RawFd, names: Vec<String>) -> Result<Vec<ListenFd>, ListenError> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let mut taken = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let fd = first + i as RawFd;
        let flags = fcntl(fd, FcntlArg::F_GETFD).map_err(|source| ListenError::Fd {
            fd,
            name: name.clone(),
            source,
        })?;
        // SAFETY: the caller guarantees the fd is open and ours to own (F_GETFD just
        // confirmed it is open).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let flags = FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC;
        fcntl(fd, FcntlArg::F_SETFD(flags)).map_err(|source| ListenError::Fd {
            fd,
            name: name.clone(),
            source,
        })?;
        taken.push(ListenFd { name, fd: owned });
    }
    Ok(taken)
}

/// Whether `name` may be an fd's name (`FDNAME=`, `LISTEN_FDNAMES`): 1 to 255 printable
/// ASCII characters, no `:`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd};

    #[test]
    fn parses_like_sd_listen_fds_with_names() {
        assert_eq!(parse(10, None, Some("2"), Some("a:b")).unwrap(), None);
        // For another process (LISTEN_PID left over in an environment): nothing for us.
        assert_eq!(parse(10, Some("11"), Some("2"), Some("a:b")).unwrap(), None);
        assert_eq!(
            parse(10, Some("10"), Some("2"), Some("admin:metrics")).unwrap(),
            Some(vec!["admin".to_owned(), "metrics".to_owned()])
        );
        assert_eq!(
            parse(10, Some("10"), Some("2"), None).unwrap(),
            Some(vec!["unknown".to_owned(), "unknown".to_owned()])
        );
        assert_eq!(
            parse(10, Some("10"), Some("0"), Some("")).unwrap(),
            Some(vec![])
        );
        assert!(matches!(
            parse(10, Some("10"), Some("2"), Some("one")),
            Err(ListenError::Names { names: 1, fds: 2 })
        ));
        assert!(matches!(
            parse(10, Some("x"), Some("1"), None),
            Err(ListenError::Pid { .. })
        ));
        assert!(matches!(
            parse(10, Some("10"), Some("-1"), None),
            Err(ListenError::Count { .. })
        ));
        assert!(matches!(
            parse(10, Some("10"), Some("100000"), None),
            Err(ListenError::Count { .. })
        ));
    }

    /// dup2's `fds` to consecutive numbers from a free high fd without CLOEXEC, as exec leaves
    /// passed fds; returns the first.
    fn pass(fds: &[std::os::fd::BorrowedFd<'_>]) -> RawFd {
        let base = 900;
        for (i, fd) in fds.iter().enumerate() {
            // SAFETY: plain dup2 onto fds this test reserves for itself.
            let r = unsafe { libc::dup2(fd.as_raw_fd(), base + i as RawFd) };
            assert!(r >= 0, "dup2: {}", std::io::Error::last_os_error());
        }
        base
    }

    #[test]
    fn takes_passed_fds_with_cloexec() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = tcp.local_addr().unwrap();
        let (unix, _peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let first = pass(&[tcp.as_fd(), unix.as_fd()]);
        let flags = nix::fcntl::fcntl(first, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            0,
            "passed fds come without CLOEXEC"
        );
        // SAFETY: `pass` just made these two fds and nothing else owns them.
        let taken = unsafe { take(first, vec!["http".into(), "admin".into()]) }.unwrap();
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].name, "http");
        assert_eq!(taken[1].name, "admin");
        for t in &taken {
            let flags = nix::fcntl::fcntl(t.fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "{} has no CLOEXEC", t.name);
        }
        let http = std::net::TcpListener::from(taken.into_iter().next().unwrap().fd);
        assert_eq!(http.local_addr().unwrap(), local);
    }

    #[test]
    fn a_closed_passed_fd_is_an_error_naming_it() {
        let base = 950;
        // SAFETY: closing an fd number this test reserves (nothing of ours uses it).
        unsafe { libc::close(base) };
        // SAFETY: the fd is closed: take must report it without owning anything.
        let err = unsafe { take(base, vec!["metrics".into()]) }.unwrap_err();
        assert!(matches!(err, ListenError::Fd { .. }), "{err:?}");
        assert!(err.to_string().contains("metrics"), "{err}");
    }

    #[test]
    fn names_without_colons() {
        assert!(valid_name("http-0.0.0.0-80#0"));
        assert!(valid_name("admin"));
        assert!(!valid_name("http:0.0.0.0:80"));
        assert!(!valid_name(""));
        assert!(!valid_name("with space"));
        assert!(!valid_name(&"x".repeat(256)));
    }
}
