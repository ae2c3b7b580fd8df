//! Thin wrappers over the system calls the unpacker and the cache rely on: in-root resolution
//! with `openat2`, extended attributes, inode flags, and a tree removal that copes with
//! immutable and read-only entries.

use std::ffi::{CStr, OsStr};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode};

/// `FS_IMMUTABLE_FL` and `FS_APPEND_FL` from `linux/fs.h`.
pub(super) const FS_IMMUTABLE_FL: libc::c_int = 0x10;
pub(super) const FS_APPEND_FL: libc::c_int = 0x20;

/// How many times `openat2` is retried when the kernel reports a concurrent rename (`EAGAIN`).
const OPENAT2_RETRIES: usize = 32;

/// Takes ownership of a descriptor a successful open call just returned.
pub(super) fn take_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: every caller passes a descriptor that a successful open/openat/openat2 call has
    // just returned; nothing else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens the directory `rel` (components joined by `/`, `.` for the root itself) resolved as if
/// `root` were `/`: `..` and absolute symlinks cannot climb above `root`, and magic links
/// (`/proc/self/fd/*`) are refused. Symlinks inside the root are followed, including a final
/// one unless `nofollow_last`.
pub(super) fn open_dir_in_root(
    root: BorrowedFd<'_>,
    rel: &CStr,
    nofollow_last: bool,
) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if nofollow_last {
        flags |= OFlag::O_NOFOLLOW;
    }
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let mut attempts = 0;
    loop {
        match nix::fcntl::openat2(root.as_raw_fd(), rel, how) {
            Ok(fd) => return Ok(take_fd(fd)),
            Err(Errno::EAGAIN | Errno::EINTR) if attempts < OPENAT2_RETRIES => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Opens the single component `name` of `dir` without following it if it is a symlink.
pub(super) fn open_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        mode,
    )
    .map(take_fd)
}

/// `lstat` of the single component `name` of `dir`; `None` if it does not exist.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn is_dir(stat: &FileStat) -> bool {
    stat.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Sets the extended attribute `name` on an open file or directory.
pub(super) fn set_xattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated, `value` points to `value.len()` readable bytes, and `fd`
    // is an open descriptor borrowed for the duration of the call.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads the inode flags (`chattr` attributes) of an open file or directory.
pub(super) fn inode_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which points to a live c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc == 0 {
        Ok(flags)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Replaces the inode flags of an open file or directory.
pub(super) fn set_inode_flags(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which points to a live c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Clears the immutable and append-only flags, which make even root's unlink fail with EPERM.
/// File systems without inode flags are left alone.
fn clear_protection_flags(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = match inode_flags(fd) {
        Ok(flags) => flags,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL)
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL) == 0 {
        return Ok(());
    }
    set_inode_flags(fd, flags & !(FS_IMMUTABLE_FL | FS_APPEND_FL))
}

/// Removes `path` and everything below it without following symlinks. If plain removal fails
/// with EPERM or EACCES (immutable or append-only inodes, directories without write or search
/// permission), the tree is unlocked and removal retried. Whiteout char devices and fifos are
/// ordinary directory entries to unlink. A missing `path` is not an error.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {}
        Err(e) => return Err(e),
    }
    unlock_tree(path)?;
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Clears protection flags and grants the owner rwx on every directory of the tree, and clears
/// protection flags on its regular files. Symlinks are never followed: every open uses
/// `O_NOFOLLOW` and only entries whose type is directory are descended into.
fn unlock_tree(path: &Path) -> io::Result<()> {
    let mut stack: Vec<PathBuf> = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let dir_file = match open_nofollow(&dir, libc::O_DIRECTORY) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        clear_protection_flags(dir_file.as_fd())?;
        let mode = dir_file.metadata()?.permissions().mode();
        if mode & 0o700 != 0o700 {
            dir_file.set_permissions(std::fs::Permissions::from_mode((mode | 0o700) & 0o7777))?;
        }
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                stack.push(entry.path());
            } else if file_type.is_file() {
                // O_NONBLOCK: never hang on a file that turned into a fifo.
                if let Ok(file) = open_nofollow(&entry.path(), libc::O_NONBLOCK) {
                    clear_protection_flags(file.as_fd())?;
                }
            }
        }
    }
    Ok(())
}

fn open_nofollow(path: &Path, extra_flags: libc::c_int) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | extra_flags)
        .open(path)
}

/// Joins path components with `/`, or returns `.` for none.
pub(super) fn join_components(components: &[&[u8]]) -> Vec<u8> {
    if components.is_empty() {
        return b".".to_vec();
    }
    let mut joined = Vec::with_capacity(components.iter().map(|c| c.len() + 1).sum());
    for (i, component) in components.iter().enumerate() {
        if i > 0 {
            joined.push(b'/');
        }
        joined.extend_from_slice(component);
    }
    joined
}

pub(super) fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}
