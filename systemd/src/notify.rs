//! sd_notify: newline-separated `KEY=VALUE` assignments in one datagram to the service
//! manager's socket (`$NOTIFY_SOCKET`: a path, or an abstract name written with a leading
//! `@`), with file descriptors attached (`SCM_RIGHTS`) for `FDSTORE=1`.
//!
//! ```text
//! notify(&[("READY", "1"), ("STATUS", "serving")])?;
//! notify_with_fds(&[("FDSTORE", "1"), ("FDNAME", "admin")], &[listener.as_fd()])?;
//! ```

use std::ffi::{OsStr, OsString};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg,
};

/// The variable that names the service manager's socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "notify field {key:?}: a key must be non-empty without '=' or a newline, a value without a newline"
    )]
    Field { key: String },
    #[error("notify socket {socket:?}: not an absolute path or an abstract name ('@...')")]
    Address { socket: OsString },
    #[error("notify socket {socket:?}: {source}")]
    Socket {
        socket: OsString,
        #[source]
        source: nix::Error,
    },
    #[error("notify socket {socket:?}: sending {message:?}: {source}")]
    Send {
        socket: OsString,
        message: String,
        #[source]
        source: nix::Error,
    },
}

/// Sends `state` to `$NOTIFY_SOCKET`. Returns `Ok(false)`, having sent nothing, when the
/// variable is unset (no service manager listens).
pub fn notify(state: &[(&str, &str)]) -> Result<bool, NotifyError> {
    notify_with_fds(state, &[])
}

/// [`notify`] with `fds` attached (for `FDSTORE=1`: the manager keeps a duplicate of each;
/// `FDNAME=` names them all).
pub fn notify_with_fds(
    state: &[(&str, &str)],
    fds: &[BorrowedFd<'_>],
) -> Result<bool, NotifyError> {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    notify_to(&socket, state, fds)?;
    Ok(true)
}

/// Sends `state` (and `fds`) to the notify socket `socket`.
pub fn notify_to(
    socket: &OsStr,
    state: &[(&str, &str)],
    fds: &[BorrowedFd<'_>],
) -> Result<(), NotifyError> {
    let message = message(state)?;
    let address = address(socket)?;
    let sender = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| NotifyError::Socket {
        socket: socket.to_owned(),
        source,
    })?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(message.as_bytes())];
    sendmsg(
        sender.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&address),
    )
    .map_err(|source| NotifyError::Send {
        socket: socket.to_owned(),
        message: message.trim_end().replace('\n', " "),
        source,
    })?;
    Ok(())
}

/// `KEY=VALUE\n` lines.
fn message(state: &[(&str, &str)]) -> Result<String, NotifyError> {
    let mut message = String::new();
    for (key, value) in state {
        if key.is_empty() || key.contains(['=', '\n']) || value.contains('\n') {
            return Err(NotifyError::Field {
                key: (*key).to_owned(),
            });
        }
        message.push_str(key);
        message.push('=');
        message.push_str(value);
        message.push('\n');
    }
    Ok(message)
}

fn address(socket: &OsStr) -> Result<UnixAddr, NotifyError> {
    let bytes = socket.as_bytes();
    let bad = || NotifyError::Address {
        socket: socket.to_owned(),
    };
    match bytes.first() {
        Some(b'@') if bytes.len() > 1 => UnixAddr::new_abstract(&bytes[1..]).map_err(|_| bad()),
        Some(b'/') => UnixAddr::new(bytes).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;
    use std::time::{SystemTime, UNIX_EPOCH};

    use nix::sys::socket::{ControlMessageOwned, recvmsg};

    fn unique(tag: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("lull-sd-test-{tag}-{}-{nanos}", std::process::id())
    }

    /// A fake service manager: receives one message and its fds.
    fn receive(manager: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        manager
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 8]);
        let msg = recvmsg::<()>(
            manager.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("the fake manager receives a message");
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().expect("control messages") {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS just installed this fd in our table; nobody else
                    // owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let len = msg.bytes;
        (String::from_utf8_lossy(&buf[..len]).into_owned(), fds)
    }

    #[test]
    fn sends_state_to_a_path_socket() {
        let dir = std::env::temp_dir().join(unique("path"));
        std::fs::create_dir_all(&dir).unwrap();
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _cleanup = Cleanup(dir.clone());
        let path = dir.join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        notify_to(
            path.as_os_str(),
            &[("READY", "1"), ("STATUS", "serving"), ("MAINPID", "42")],
            &[],
        )
        .unwrap();
        let (message, fds) = receive(&manager);
        assert_eq!(message, "READY=1\nSTATUS=serving\nMAINPID=42\n");
        assert!(fds.is_empty());
    }

    #[test]
    fn hands_fds_to_an_abstract_socket() {
        let name = unique("abstract");
        let manager = {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            UnixDatagram::bind_addr(&addr).unwrap()
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let (a, _b) = UnixDatagram::pair().unwrap();
        notify_to(
            OsStr::new(&format!("@{name}")),
            &[("FDSTORE", "1"), ("FDNAME", "http-127.0.0.1-80#0")],
            &[listener.as_fd(), a.as_fd()],
        )
        .unwrap();
        let (message, fds) = receive(&manager);
        assert_eq!(message, "FDSTORE=1\nFDNAME=http-127.0.0.1-80#0\n");
        assert_eq!(fds.len(), 2);
        // The first fd received is the very listening socket: same local address, and a
        // connection to it is accepted through the received fd.
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), local);
        drop(listener);
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (_conn, _) = received.accept().unwrap();
    }

    #[test]
    fn refuses_bad_fields_and_addresses() {
        for (key, value) in [
            ("", "1"),
            ("A=B", "1"),
            ("STATUS", "two\nlines"),
            ("A\n", ""),
        ] {
            assert!(
                matches!(
                    notify_to(OsStr::new("@x"), &[(key, value)], &[]),
                    Err(NotifyError::Field { .. })
                ),
                "{key:?}={value:?}"
            );
        }
        for socket in ["relative/path", "", "@", "vsock:2:1"] {
            assert!(
                matches!(
                    notify_to(OsStr::new(socket), &[("READY", "1")], &[]),
                    Err(NotifyError::Address { .. })
                ),
                "{socket:?}"
            );
        }
    }

    #[test]
    fn a_missing_manager_is_an_error_naming_the_socket() {
        let name = format!("@{}", unique("nobody"));
        let err = notify_to(OsStr::new(&name), &[("READY", "1")], &[]).unwrap_err();
        assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
        assert!(err.to_string().contains(&name), "{err}");
    }
}
