//! Network namespaces, veth pairs, the bridge and egress NAT for instances.
//!
//! For now: one isolated network namespace per instance with `lo` up. A namespace is created on
//! a dedicated thread (never by forking a multi-threaded process): the thread unshares its own
//! network namespace, bind-mounts `/proc/thread-self/ns/net` onto `<dir>/<name>` so the
//! namespace outlives the thread, and brings `lo` up before it ends.

pub mod firewall;
pub mod ipam;
pub mod link;
pub mod network;
pub mod resolv;
pub mod routes;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("create namespace directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("network namespace {path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("network namespace {path} not found")]
    NotFound { path: PathBuf },
    #[error("{path} is not a mounted namespace")]
    NotANamespace { path: PathBuf },
    #[error("open network namespace {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("unshare a network namespace for {path}")]
    Unshare { path: PathBuf, source: Errno },
    #[error("create mount point {path}")]
    CreateMountPoint { path: PathBuf, source: io::Error },
    #[error("bind-mount the network namespace onto {path}")]
    Mount { path: PathBuf, source: Errno },
    #[error("bring up lo in network namespace {path}")]
    LoopbackUp { path: PathBuf, source: Errno },
    #[error("enter network namespace {path}")]
    Setns { path: PathBuf, source: Errno },
    #[error("unmount network namespace {path}")]
    Unmount { path: PathBuf, source: Errno },
    #[error("remove {path}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("start a thread for network namespace {path}")]
    SpawnThread { path: PathBuf, source: io::Error },
    #[error("the thread working on network namespace {path} panicked")]
    ThreadPanicked { path: PathBuf },
}

/// A network namespace kept alive by a bind mount at `path()`. Dropping the value leaves the
/// namespace in place; `destroy` removes it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

pub(crate) fn check_name(name: &str) -> Result<(), NetnsError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name == "." || name == ".." {
        Some("not a file name")
    } else if name.contains('/') || name.contains('\0') {
        Some("contains '/' or NUL")
    } else if name.len() > 255 {
        Some("longer than 255 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetnsError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

impl NetNs {
    /// Creates the network namespace `<dir>/<name>` (creating `dir` if needed) with `lo` up.
    pub fn create(dir: &Path, name: &str) -> Result<NetNs, NetnsError> {
        check_name(name)?;
        fs::create_dir_all(dir).map_err(|source| NetnsError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(name);
        let thread_path = path.clone();
        let worker = std::thread::Builder::new()
            .name(format!("netns-create-{name}"))
            .spawn(move || create_on_this_thread(&thread_path))
            .map_err(|source| NetnsError::SpawnThread {
                path: path.clone(),
                source,
            })?;
        // The thread ends here, and its (thread-local) namespace with it, except for the bind
        // mount that keeps the namespace alive.
        worker
            .join()
            .map_err(|_| NetnsError::ThreadPanicked { path: path.clone() })??;
        tracing::debug!(netns = %path.display(), "created network namespace");
        Ok(NetNs {
            name: name.to_string(),
            path,
        })
    }

    /// Finds the existing network namespace `<dir>/<name>`.
    pub fn open(dir: &Path, name: &str) -> Result<NetNs, NetnsError> {
        check_name(name)?;
        let path = dir.join(name);
        let file = open_ns_file(&path)?;
        drop(file);
        Ok(NetNs {
            name: name.to_string(),
            path,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that holds the namespace (what `ip netns exec`-style tools and `setns`
    /// open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts the namespace (lazily: processes still inside keep it until they exit) and
    /// removes its file.
    pub fn destroy(self) -> Result<(), NetnsError> {
        match umount2(&self.path, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (any more); ENOENT: already gone.
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(source) => {
                return Err(NetnsError::Unmount {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetnsError::Remove {
                    path: self.path.clone(),
                    source,
                });
            }
        }
        tracing::debug!(netns = %self.path.display(), "destroyed network namespace");
        Ok(())
    }

    /// Runs `f` on a fresh thread that has entered the namespace, and returns its result. A
    /// panic in `f` is resumed on the calling thread.
    pub fn run_in<F, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = open_ns_file(&self.path)?;
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Setns {
                        path: self.path.clone(),
                        source,
                    })?;
                    drop(file);
                    Ok(f())
                })
                .map_err(|source| NetnsError::SpawnThread {
                    path: self.path.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

/// Opens a namespace file and checks that it is one (an nsfs mount, not the empty mount point
/// left behind by a failed create).
fn open_ns_file(path: &Path) -> Result<File, NetnsError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => NetnsError::NotFound {
            path: path.to_path_buf(),
        },
        _ => NetnsError::Open {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let stat = fstatfs(&file).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source: source.into(),
    })?;
    if stat.filesystem_type() != NSFS_MAGIC {
        return Err(NetnsError::NotANamespace {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

/// Runs on a thread of its own: moves the thread into a new network namespace, pins it at
/// `path` and brings `lo` up. On failure, undoes what it did.
fn create_on_this_thread(path: &Path) -> Result<(), NetnsError> {
    unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Unshare {
        path: path.to_path_buf(),
        source,
    })?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => NetnsError::AlreadyExists {
                path: path.to_path_buf(),
            },
            _ => NetnsError::CreateMountPoint {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let mounted = mount(
        Some("/proc/thread-self/ns/net"),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
    if let Err(source) = mounted {
        let _ = fs::remove_file(path);
        return Err(NetnsError::Mount {
            path: path.to_path_buf(),
            source,
        });
    }
    if let Err(source) = set_link_up("lo") {
        let _ = umount2(path, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(path);
        return Err(NetnsError::LoopbackUp {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Sets IFF_UP on interface `name` in the calling thread's network namespace.
fn set_link_up(name: &str) -> Result<(), Errno> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is a plain C struct (names and a union of integers/addresses) for which
    // all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(Errno::EINVAL);
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name in `req` and writes ifr_flags; `req`
    // is a valid, writable ifreq that lives across the call, and `sock` is an open socket.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(rc)?;
    // SAFETY: the kernel filled ifr_flags, the union member SIOCGIFFLAGS writes.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(rc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::net::if_::InterfaceFlags;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A unique directory for one test; on drop, unmounts and removes whatever is left in it.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> TestDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            TestDir(
                std::env::temp_dir()
                    .join(format!("lull-netns-{tag}-{}-{nanos}", std::process::id())),
            )
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            if let Ok(entries) = fs::read_dir(&self.0) {
                for entry in entries.flatten() {
                    let _ = umount2(&entry.path(), MntFlags::MNT_DETACH);
                }
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mounted_at(path: &Path) -> bool {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(path))
    }

    fn loopback_flags() -> InterfaceFlags {
        nix::ifaddrs::getifaddrs()
            .unwrap()
            .find(|ifa| ifa.interface_name == "lo")
            .map(|ifa| ifa.flags)
            .unwrap_or(InterfaceFlags::empty())
    }

    #[test]
    fn create_brings_lo_up_and_destroy_cleans_up() {
        let dir = TestDir::new("create");
        let ns = NetNs::create(&dir.0, "a").unwrap();
        assert_eq!(ns.path(), dir.0.join("a"));
        assert!(mounted_at(ns.path()), "no mount at {}", ns.path().display());

        let flags = ns.run_in(loopback_flags).unwrap();
        assert!(flags.contains(InterfaceFlags::IFF_UP), "lo flags {flags:?}");
        // 127.0.0.1 is only usable inside when lo is up.
        let echoed = ns
            .run_in(|| {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                let mut client = TcpStream::connect(listener.local_addr()?)?;
                let (mut server, _) = listener.accept()?;
                client.write_all(b"ping")?;
                let mut buf = [0u8; 4];
                server.read_exact(&mut buf)?;
                Ok::<_, io::Error>(buf)
            })
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, b"ping");

        // The namespace is a different one from the test's.
        let inside = ns
            .run_in(|| fs::read_link("/proc/thread-self/ns/net"))
            .unwrap()
            .unwrap();
        let outside = fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_ne!(inside, outside);

        let path = ns.path().to_path_buf();
        ns.destroy().unwrap();
        assert!(!mounted_at(&path), "mount left at {}", path.display());
        assert!(!path.exists(), "file left at {}", path.display());
    }

    #[test]
    fn listener_inside_is_reachable_only_from_inside() {
        let dir = TestDir::new("reach");
        let ns = NetNs::create(&dir.0, "r").unwrap();
        let listener = ns
            .run_in(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();

        // From the host namespace nothing may arrive at the listener.
        let _host_attempt = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
        std::thread::sleep(Duration::from_millis(50));
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("listener in the namespace was reached from the host: {other:?}"),
        }

        // From inside, it is.
        ns.run_in(|| TcpStream::connect(addr))
            .unwrap()
            .expect("connect inside the namespace");
        listener.set_nonblocking(false).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        assert!(peer.ip().is_loopback());

        drop(listener);
        ns.destroy().unwrap();
    }

    #[test]
    fn open_finds_existing_and_rejects_others() {
        let dir = TestDir::new("open");
        let ns = NetNs::create(&dir.0, "o").unwrap();
        let again = NetNs::open(&dir.0, "o").unwrap();
        assert_eq!(again.path(), ns.path());
        assert_eq!(again.name(), "o");

        assert!(matches!(
            NetNs::create(&dir.0, "o"),
            Err(NetnsError::AlreadyExists { .. })
        ));
        assert!(matches!(
            NetNs::open(&dir.0, "missing"),
            Err(NetnsError::NotFound { .. })
        ));
        fs::write(dir.0.join("plain"), b"").unwrap();
        let err = NetNs::open(&dir.0, "plain").unwrap_err();
        assert!(matches!(err, NetnsError::NotANamespace { .. }), "{err}");
        assert!(err.to_string().contains("plain"), "{err}");

        for bad in ["", ".", "..", "a/b"] {
            assert!(matches!(
                NetNs::create(&dir.0, bad),
                Err(NetnsError::InvalidName { .. })
            ));
        }
        ns.destroy().unwrap();
        assert!(matches!(
            again.run_in(|| ()),
            Err(NetnsError::NotFound { .. })
        ));
    }

    #[test]
    fn namespaces_are_isolated_from_each_other() {
        let dir = TestDir::new("two");
        let a = NetNs::create(&dir.0, "a").unwrap();
        let b = NetNs::create(&dir.0, "b").unwrap();
        let listener = a
            .run_in(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let from_b = b
            .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
            .unwrap();
        assert!(from_b.is_err(), "namespace b reached a listener in a");
        a.destroy().unwrap();
        b.destroy().unwrap();
    }

    #[test]
    fn create_makes_the_directory() {
        let dir = TestDir::new("mkdir");
        let nested = dir.0.join("x/y");
        let ns = NetNs::create(&nested, "n").unwrap();
        assert!(nested.is_dir());
        ns.destroy().unwrap();
        assert!(!nested.join("n").exists());
    }
}
