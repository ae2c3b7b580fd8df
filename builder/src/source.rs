//! The source folder a developer deploys, as a tar stream in both directions.
//!
//! [`pack_source`] (the CLI side) walks the folder with ripgrep's `ignore` crate, honouring
//! `.gitignore` files at every level, `.git/info/exclude` and `.lullignore` files (gitignore
//! syntax; one at the root is the documented place, nested ones work too), with hidden files
//! included and whatever lies above the folder or in the user's global git config ignored, so
//! the result depends on the folder alone. `.git` (directory or submodule file) is always left
//! out. The tar is deterministic: entries depth first with siblings in name byte order, uid/gid
//! 0, no user or group names, every mtime set to [`SOURCE_MTIME`], permissions kept (the
//! execute bits matter; set-id and sticky bits are dropped), symlinks kept as links.
//!
//! [`unpack_source`] (the daemon side) receives such a tar, or a user's tarball (plain or gzip,
//! told apart by magic bytes), and treats it as hostile, the way the runtime's layer unpacker
//! does (`lull_runtime::layers`): it iterates entries itself (never `tar::Archive::unpack`),
//! refuses absolute paths and `..`, resolves every parent with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` on a descriptor of the destination so an entry can never be written
//! through a symlink (an earlier entry's or otherwise), creates the final component relative
//! to that parent without following it, refuses devices, fifos and hardlinks to anything but a
//! regular file already unpacked, and caps stream bytes, entries, path length and the
//! PAX/long-name metadata held in memory ([`SourceLimits`]). Archive owners are ignored: what is
//! unpacked belongs to the daemon.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ignore::WalkBuilder;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;
use tar::{EntryType, Header};

use crate::capture::ExactReader;

/// The mtime of every entry [`pack_source`] writes: 1980-01-01T00:00:00Z, the earliest time a
/// zip file can hold (Python wheel builds fail on older files, as they would on 0).
pub const SOURCE_MTIME: u64 = 315_532_800;
/// The per-folder ignore file lull reads besides `.gitignore`.
pub const LULLIGNORE: &str = ".lullignore";

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// Room for the header blocks and padding read alongside an entry's PAX and long-name data.
const HEADER_SLACK: u64 = 16 * 512;
const COPY_BUFFER: usize = 64 * 1024;
const START: &str = "<start of archive>";

/// What a source tree amounted to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Regular files (hardlinks included).
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Top-level names of the folder left out by the ignore rules (and `.git`), sorted; empty
    /// when unpacking.
    pub ignored_top_level: Vec<PathBuf>,
    /// Sockets, fifos and devices found in the folder and left out; zero when unpacking.
    pub skipped_special: u64,
}

/// Caps and options for [`unpack_source`]. Every cap is checked; exceeding one fails the
/// unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimits {
    /// Bytes of the uncompressed tar stream (headers, padding and file data together).
    pub max_bytes: u64,
    /// Tar entries, counting every file, directory, link and global header.
    pub max_entries: u64,
    /// Length in bytes of an entry path or a link target.
    pub max_path_len: usize,
    /// Bytes of PAX and GNU long-name headers in front of one entry, which are held in memory.
    pub max_metadata_bytes: u64,
    /// Strip the single top-level directory every entry sits in (`tar --strip-components=1`),
    /// as in GitHub's `owner-repo-sha/` tarballs. An entry outside it is refused.
    pub strip_components: bool,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_bytes: 2 << 30,
            max_entries: 200_000,
            max_path_len: 4096,
            max_metadata_bytes: 1 << 20,
            strip_components: false,
        }
    }
}

/// Why a source folder could not be packed or an archive unpacked. `entry` fields hold the
/// archive member path as the archive spells it (lossily decoded).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot walk source folder {path}")]
    Walk {
        path: PathBuf,
        #[source]
        source: ignore::Error,
    },
    #[error("cannot {action} {path}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the source archive")]
    Write {
        #[source]
        source: io::Error,
    },
    #[error("cannot read the source archive after entry {after:?}")]
    Stream {
        after: String,
        #[source]
        source: io::Error,
    },
    #[error("source archive exceeds the limit of {limit} bytes (at entry {entry:?})")]
    TooLarge { limit: u64, entry: String },
    #[error(
        "source archive has more than {limit} bytes of PAX or long-name headers in front of one entry (after entry {after:?})"
    )]
    MetadataTooLarge { limit: u64, after: String },
    #[error("source archive has more than {limit} entries (refused at entry {entry:?})")]
    TooManyEntries { limit: u64, entry: String },
    #[error("source entry {entry:?}: path is {len} bytes long, over the limit of {limit}")]
    PathTooLong {
        entry: String,
        len: usize,
        limit: usize,
    },
    #[error("source entry {entry:?}: absolute paths are not allowed")]
    AbsolutePath { entry: String },
    #[error("source entry {entry:?}: path escapes the destination through `..`")]
    PathEscape { entry: String },
    #[error("source entry {entry:?}: path goes through a symlink")]
    ThroughSymlink { entry: String },
    #[error("source entry {entry:?} is a {kind} device, which sources may not contain")]
    Device { entry: String, kind: &'static str },
    #[error("source entry {entry:?} has unsupported tar entry type {kind}")]
    UnsupportedType { entry: String, kind: String },
    #[error("source entry {entry:?}: hardlink target {target:?} {reason}")]
    HardlinkTarget {
        entry: String,
        target: String,
        reason: &'static str,
    },
    #[error("source entry {entry:?} is outside the common top-level directory {top:?}")]
    OutsideTopLevel { entry: String, top: String },
    #[error("source entry {entry:?}: {reason}")]
    InvalidEntry { entry: String, reason: &'static str },
    #[error("source entry {entry:?}: cannot {action}")]
    Entry {
        entry: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

impl SourceError {
    /// The archive entry this error concerns, when it concerns one.
    pub fn entry(&self) -> Option<&str> {
        match self {
            SourceError::TooLarge { entry, .. }
            | SourceError::TooManyEntries { entry, .. }
            | SourceError::PathTooLong { entry, .. }
            | SourceError::AbsolutePath { entry }
            | SourceError::PathEscape { entry }
            | SourceError::ThroughSymlink { entry }
            | SourceError::Device { entry, .. }
            | SourceError::UnsupportedType { entry, .. }
            | SourceError::HardlinkTarget { entry, .. }
            | SourceError::OutsideTopLevel { entry, .. }
            | SourceError::InvalidEntry { entry, .. }
            | SourceError::Entry { entry, .. } => Some(entry),
            SourceError::Stream { after, .. } | SourceError::MetadataTooLarge { after, .. } => {
                Some(after)
            }
            _ => None,
        }
    }
}

/// Writes the kept content of the source folder `dir` to `out` as an uncompressed tar.
pub fn pack_source(dir: &Path, out: impl Write) -> Result<SourceStats, SourceError> {
    let walker = WalkBuilder::new(dir)
        .standard_filters(false)
        .git_ignore(true)
        .git_exclude(true)
        .require_git(false)
        .add_custom_ignore_filename(LULLIGNORE)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.as_bytes().cmp(b.as_bytes()))
        .filter_entry(|entry| entry.file_name() != ".git")
        .build();
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut stats = SourceStats::default();
    let mut kept_top_level = BTreeSet::new();
    for entry in walker {
        let entry = entry.map_err(|source| SourceError::Walk {
            path: dir.to_owned(),
            source,
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let full = entry.path();
        let relative = full.strip_prefix(dir).unwrap_or(full);
        if entry.depth() == 1 {
            kept_top_level.insert(entry.file_name().to_owned());
        }
        let meta = fs::symlink_metadata(full).map_err(|source| SourceError::Io {
            path: full.to_owned(),
            action: "inspect",
            source,
        })?;
        let kind = meta.file_type();
        let mut header = Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(SOURCE_MTIME);
        header.set_mode(meta.mode() & 0o777);
        header.set_size(0);
        let archive_error = |source| SourceError::Io {
            path: full.to_owned(),
            action: "archive",
            source,
        };
        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            tar.append_data(&mut header, relative, io::empty())
                .map_err(archive_error)?;
            stats.dirs += 1;
        } else if kind.is_file() {
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(full)
                .map_err(|source| SourceError::Io {
                    path: full.to_owned(),
                    action: "open file",
                    source,
                })?;
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            tar.append_data(&mut header, relative, ExactReader::new(file, meta.len()))
                .map_err(archive_error)?;
            stats.files += 1;
            stats.bytes += meta.len();
        } else if kind.is_symlink() {
            let target = fs::read_link(full).map_err(|source| SourceError::Io {
                path: full.to_owned(),
                action: "read symlink",
                source,
            })?;
            header.set_entry_type(EntryType::Symlink);
            header.set_mode(0o777);
            tar.append_link(&mut header, relative, &target)
                .map_err(archive_error)?;
            stats.symlinks += 1;
        } else {
            tracing::debug!(path = %full.display(), "special file left out of the source");
            stats.skipped_special += 1;
        }
    }
    tar.into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|source| SourceError::Write { source })?;

    let mut ignored = Vec::new();
    let listing = fs::read_dir(dir).map_err(|source| SourceError::Io {
        path: dir.to_owned(),
        action: "read directory",
        source,
    })?;
    for child in listing {
        let child = child.map_err(|source| SourceError::Io {
            path: dir.to_owned(),
            action: "read directory",
            source,
        })?;
        let name: OsString = child.file_name();
        if !kept_top_level.contains(&name) {
            ignored.push(PathBuf::from(name));
        }
    }
    ignored.sort_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    stats.ignored_top_level = ignored;
    Ok(stats)
}

/// Unpacks a source archive (plain or gzip tar) from `input` into `dest`, an existing
/// directory, refusing anything that could write outside it. On error `dest` holds what was
/// unpacked so far; the caller removes it. Nothing is ever written outside `dest`.
pub fn unpack_source(
    input: impl Read,
    dest: &Path,
    limits: &SourceLimits,
) -> Result<SourceStats, SourceError> {
    let mut reader = BufReader::new(input);
    let head = reader.fill_buf().map_err(|source| SourceError::Stream {
        after: START.to_owned(),
        source,
    })?;
    let stream: Box<dyn Read + '_> = if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let root = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)
        .map_err(|source| SourceError::Io {
            path: dest.to_owned(),
            action: "open the directory to unpack into",
            source,
        })?;
    let mut unpacker = Unpacker {
        root: OwnedFd::from(root),
        limits,
        top: None,
        dirs: Vec::new(),
        stats: SourceStats::default(),
    };
    unpacker.run(stream)?;
    Ok(unpacker.stats)
}

/// Why the metered reader stopped the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trip {
    Total,
    Headers,
}

/// Counts the uncompressed bytes under the tar parser and, while it reads the headers in front
/// of an entry, how many it read for them.
struct Meter {
    read: Cell<u64>,
    headers_from: Cell<Option<u64>>,
    tripped: Cell<Option<Trip>>,
    max_total: u64,
    max_headers: u64,
}

struct MeteredReader<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Read for MeteredReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let meter = &self.meter;
        if meter.tripped.get().is_some() {
            return Err(io::Error::other("source archive limit exceeded"));
        }
        let n = self.inner.read(buf)?;
        let total = meter.read.get() + n as u64;
        meter.read.set(total);
        let trip = if total > meter.max_total {
            Some(Trip::Total)
        } else {
            match meter.headers_from.get() {
                Some(from) if total - from > meter.max_headers => Some(Trip::Headers),
                _ => None,
            }
        };
        if trip.is_some() {
            meter.tripped.set(trip);
            return Err(io::Error::other("source archive limit exceeded"));
        }
        Ok(n)
    }
}

struct Unpacker<'a> {
    root: OwnedFd,
    limits: &'a SourceLimits,
    /// The top-level directory being stripped, once the first entry named it.
    top: Option<Vec<u8>>,
    /// Directories unpacked, with their mode and mtime, applied last (a read-only directory
    /// would refuse its own children, and creating children changes the mtime).
    dirs: Vec<(Vec<u8>, u32, u64, String)>,
    stats: SourceStats,
}

impl Unpacker<'_> {
    fn run(&mut self, stream: Box<dyn Read + '_>) -> Result<(), SourceError> {
        let meter = Rc::new(Meter {
            read: Cell::new(0),
            headers_from: Cell::new(None),
            tripped: Cell::new(None),
            max_total: self.limits.max_bytes,
            max_headers: self.limits.max_metadata_bytes.saturating_add(HEADER_SLACK),
        });
        let mut archive = tar::Archive::new(MeteredReader {
            inner: stream,
            meter: Rc::clone(&meter),
        });
        let mut last = String::from(START);
        let mut count: u64 = 0;
        let mut entries = archive.entries().map_err(|source| SourceError::Stream {
            after: last.clone(),
            source,
        })?;
        loop {
            meter.headers_from.set(Some(meter.read.get()));
            let next = entries.next();
            meter.headers_from.set(None);
            let mut entry = match next {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(source)) => {
                    let err = SourceError::Stream {
                        after: last.clone(),
                        source,
                    };
                    return Err(self.classify(&meter, &last, err));
                }
            };
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            count += 1;
            if count > self.limits.max_entries {
                return Err(SourceError::TooManyEntries {
                    limit: self.limits.max_entries,
                    entry: name,
                });
            }
            let applied = self.apply(&mut entry, &name).and_then(|()| {
                io::copy(&mut entry, &mut io::sink())
                    .map(drop)
                    .map_err(|source| SourceError::Stream {
                        after: name.clone(),
                        source,
                    })
            });
            if let Err(err) = applied {
                return Err(self.classify(&meter, &name, err));
            }
            last = name;
        }
        self.finish()
    }

    /// Turns an error caused by the meter cutting the stream into the limit error it stands for.
    fn classify(&self, meter: &Meter, entry: &str, err: SourceError) -> SourceError {
        match meter.tripped.get() {
            Some(Trip::Total) => SourceError::TooLarge {
                limit: self.limits.max_bytes,
                entry: entry.to_owned(),
            },
            Some(Trip::Headers) => SourceError::MetadataTooLarge {
                limit: self.limits.max_metadata_bytes,
                after: entry.to_owned(),
            },
            None => err,
        }
    }

    fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), SourceError> {
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // GitHub puts the commit id there; nothing in it applies to the files.
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let Some(components) = self.components(&raw, name, kind == EntryType::Directory)? else {
            return Ok(());
        };
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|_| invalid(name, "mode field is invalid"))?
            & 0o777;
        let mtime = header
            .mtime()
            .map_err(|_| invalid(name, "mtime field is invalid"))?;
        match kind {
            EntryType::Directory => self.directory(&components, mode, mtime, name),
            EntryType::Regular | EntryType::Continuous => {
                self.file(&components, mode, mtime, entry, name)
            }
            EntryType::Symlink => {
                let target = self.link_target(entry, name)?;
                self.symlink(&components, &target, mtime, name)
            }
            EntryType::Link => {
                let target = self.link_target(entry, name)?;
                self.hardlink(&components, &target, name)
            }
            EntryType::Char => Err(SourceError::Device {
                entry: name.to_owned(),
                kind: "char",
            }),
            EntryType::Block => Err(SourceError::Device {
                entry: name.to_owned(),
                kind: "block",
            }),
            other => Err(SourceError::UnsupportedType {
                entry: name.to_owned(),
                kind: format!("{other:?} ({:?})", char::from(other.as_byte())),
            }),
        }
    }

    /// Splits an entry path (or hardlink target) into components below `dest`, stripping the
    /// top-level directory if asked. `None`: the entry is the root itself (or the stripped top
    /// directory) and a directory, so there is nothing to create.
    fn components(
        &mut self,
        raw: &[u8],
        name: &str,
        is_dir: bool,
    ) -> Result<Option<Vec<Vec<u8>>>, SourceError> {
        let mut components = split_path(raw, name, self.limits.max_path_len)?;
        if self.limits.strip_components {
            let first = components.first().cloned();
            let top = match (&self.top, first) {
                (Some(top), _) => top.clone(),
                (None, Some(first)) => {
                    self.top = Some(first.clone());
                    first
                }
                (None, None) => Vec::new(),
            };
            if components.first() != Some(&top) || (components.len() == 1 && !is_dir) {
                return Err(SourceError::OutsideTopLevel {
                    entry: name.to_owned(),
                    top: String::from_utf8_lossy(&top).into_owned(),
                });
            }
            components.remove(0);
        }
        if components.is_empty() {
            if is_dir {
                return Ok(None);
            }
            return Err(invalid(name, "only a directory can stand for the root"));
        }
        Ok(Some(components))
    }

    fn link_target<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Vec<u8>, SourceError> {
        let target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        if target.is_empty() {
            return Err(invalid(name, "link without a target"));
        }
        if target.contains(&0) {
            return Err(invalid(name, "link target contains a NUL byte"));
        }
        if target.len() > self.limits.max_path_len {
            return Err(SourceError::PathTooLong {
                entry: name.to_owned(),
                len: target.len(),
                limit: self.limits.max_path_len,
            });
        }
        Ok(target)
    }

    /// Opens the parent directory of `components` below the root, creating missing
    /// directories one at a time, each relative to the one before; a symlink anywhere on the
    /// way is refused.
    fn parent(&self, components: &[Vec<u8>], name: &str) -> Result<OwnedFd, SourceError> {
        let parents = &components[..components.len() - 1];
        match open_beneath(&self.root, &join(parents)) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.resolve_error(name, e)),
        }
        let mut dir = open_beneath(&self.root, b".")
            .map_err(|e| errno_error(name, "open the destination", e))?;
        for component in parents {
            match nix::sys::stat::mkdirat(
                Some(dir.as_raw_fd()),
                os(component),
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(errno_error(name, "create parent directory", e)),
            }
            let next = open_beneath(&dir, component).map_err(|e| self.resolve_error(name, e))?;
            dir = next;
        }
        Ok(dir)
    }

    fn resolve_error(&self, name: &str, errno: Errno) -> SourceError {
        match errno {
            Errno::ELOOP | Errno::EXDEV => SourceError::ThroughSymlink {
                entry: name.to_owned(),
            },
            Errno::ENOTDIR => invalid(name, "a parent path component is not a directory"),
            e => errno_error(name, "resolve parent directory", e),
        }
    }

    /// Makes room for a new entry `base` in `parent`: an existing non-directory is removed; an
    /// existing directory is kept for a new directory (returns `true`) and refused otherwise.
    fn clear_slot(
        &self,
        parent: &OwnedFd,
        base: &[u8],
        new_is_dir: bool,
        name: &str,
    ) -> Result<bool, SourceError> {
        let existing = match nix::sys::stat::fstatat(
            Some(parent.as_raw_fd()),
            os(base),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(errno_error(name, "inspect existing path", e)),
        };
        if existing.st_mode & libc::S_IFMT == libc::S_IFDIR {
            if new_is_dir {
                return Ok(true);
            }
            return Err(invalid(name, "it would replace a directory"));
        }
        nix::unistd::unlinkat(
            Some(parent.as_raw_fd()),
            os(base),
            UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| errno_error(name, "remove the path it replaces", e))?;
        Ok(false)
    }

    fn directory(
        &mut self,
        components: &[Vec<u8>],
        mode: u32,
        mtime: u64,
        name: &str,
    ) -> Result<(), SourceError> {
        let parent = self.parent(components, name)?;
        let base = &components[components.len() - 1];
        if !self.clear_slot(&parent, base, true, name)? {
            nix::sys::stat::mkdirat(
                Some(parent.as_raw_fd()),
                os(base),
                Mode::from_bits_truncate(0o700),
            )
            .map_err(|e| errno_error(name, "create directory", e))?;
            self.stats.dirs += 1;
        }
        self.dirs
            .push((join(components), mode, mtime, name.to_owned()));
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        components: &[Vec<u8>],
        mode: u32,
        mtime: u64,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), SourceError> {
        let parent = self.parent(components, name)?;
        let base = &components[components.len() - 1];
        self.clear_slot(&parent, base, false, name)?;
        let fd = nix::fcntl::openat(
            Some(parent.as_raw_fd()),
            os(base),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| errno_error(name, "create file", e))?;
        let mut file = File::from(take_fd(fd));
        let mut buffer = vec![0; COPY_BUFFER];
        let mut copied: u64 = 0;
        loop {
            let n = entry
                .read(&mut buffer)
                .map_err(|source| SourceError::Stream {
                    after: name.to_owned(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            file.write_all(&buffer[..n])
                .map_err(|source| SourceError::Entry {
                    entry: name.to_owned(),
                    action: "write file data",
                    source,
                })?;
            copied += n as u64;
        }
        nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| errno_error(name, "set mode", e))?;
        let time = timespec(mtime);
        nix::sys::stat::futimens(file.as_raw_fd(), &time, &time)
            .map_err(|e| errno_error(name, "set modification time", e))?;
        self.stats.files += 1;
        self.stats.bytes += copied;
        Ok(())
    }

    fn symlink(
        &mut self,
        components: &[Vec<u8>],
        target: &[u8],
        mtime: u64,
        name: &str,
    ) -> Result<(), SourceError> {
        let parent = self.parent(components, name)?;
        let base = &components[components.len() - 1];
        self.clear_slot(&parent, base, false, name)?;
        // Stored as written: later entries never resolve through it, and the build sandbox
        // resolves it inside its own root.
        nix::unistd::symlinkat(os(target), Some(parent.as_raw_fd()), os(base))
            .map_err(|e| errno_error(name, "create symlink", e))?;
        let time = timespec(mtime);
        nix::sys::stat::utimensat(
            Some(parent.as_raw_fd()),
            os(base),
            &time,
            &time,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| errno_error(name, "set symlink modification time", e))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(
        &mut self,
        components: &[Vec<u8>],
        target: &[u8],
        name: &str,
    ) -> Result<(), SourceError> {
        let target_name = String::from_utf8_lossy(target).into_owned();
        let refuse = |reason| SourceError::HardlinkTarget {
            entry: name.to_owned(),
            target: target_name.clone(),
            reason,
        };
        if target.starts_with(b"/") {
            return Err(refuse("is an absolute path"));
        }
        let target_components = match self.components(target, name, false) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(refuse("is the destination root")),
            Err(SourceError::PathEscape { .. }) => {
                return Err(refuse("escapes the destination through `..`"));
            }
            Err(SourceError::OutsideTopLevel { .. }) => {
                return Err(refuse("is outside the common top-level directory"));
            }
            Err(e) => return Err(e),
        };
        let target_parent = match open_beneath(
            &self.root,
            &join(&target_components[..target_components.len() - 1]),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(refuse("does not exist")),
            Err(Errno::ELOOP | Errno::EXDEV) => return Err(refuse("goes through a symlink")),
            Err(e) => return Err(errno_error(name, "resolve hardlink target", e)),
        };
        let target_base = os(&target_components[target_components.len() - 1]);
        let stat = match nix::sys::stat::fstatat(
            Some(target_parent.as_raw_fd()),
            target_base,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Err(refuse("does not exist")),
            Err(e) => return Err(errno_error(name, "inspect hardlink target", e)),
        };
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(refuse("is not a regular file"));
        }
        let parent = self.parent(components, name)?;
        let base = &components[components.len() - 1];
        self.clear_slot(&parent, base, false, name)?;
        // Single components relative to resolved descriptors; flags 0 never follows a link.
        nix::unistd::linkat(
            Some(target_parent.as_raw_fd()),
            target_base,
            Some(parent.as_raw_fd()),
            os(base),
            AtFlags::empty(),
        )
        .map_err(|e| errno_error(name, "create hardlink", e))?;
        self.stats.files += 1;
        Ok(())
    }

    /// Applies directory modes and mtimes, deepest (latest) first.
    fn finish(&mut self) -> Result<(), SourceError> {
        for (path, mode, mtime, name) in std::mem::take(&mut self.dirs).iter().rev() {
            let dir = match open_beneath(&self.root, path) {
                Ok(dir) => dir,
                // Replaced by a later entry.
                Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
                Err(e) => return Err(self.resolve_error(name, e)),
            };
            nix::sys::stat::fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(*mode))
                .map_err(|e| errno_error(name, "set directory mode", e))?;
            let time = timespec(*mtime);
            nix::sys::stat::futimens(dir.as_raw_fd(), &time, &time)
                .map_err(|e| errno_error(name, "set directory modification time", e))?;
        }
        Ok(())
    }
}

/// Splits an archive path into components: empty and `.` components are dropped, absolute
/// paths and `..` are refused.
fn split_path(raw: &[u8], name: &str, max_len: usize) -> Result<Vec<Vec<u8>>, SourceError> {
    if raw.contains(&0) {
        return Err(invalid(name, "path contains a NUL byte"));
    }
    if raw.len() > max_len {
        return Err(SourceError::PathTooLong {
            entry: name.to_owned(),
            len: raw.len(),
            limit: max_len,
        });
    }
    if raw.starts_with(b"/") {
        return Err(SourceError::AbsolutePath {
            entry: name.to_owned(),
        });
    }
    let mut components = Vec::new();
    for component in raw.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                return Err(SourceError::PathEscape {
                    entry: name.to_owned(),
                });
            }
            _ => components.push(component.to_vec()),
        }
    }
    Ok(components)
}

/// Opens the directory `relative` below `dir` without crossing a symlink, `..` above `dir`, a
/// magic link or a mount point. (No `O_NOFOLLOW`: with `O_DIRECTORY` it turns a final symlink
/// into ENOTDIR, while `RESOLVE_NO_SYMLINKS` reports every symlink, the last one too, as ELOOP.)
fn open_beneath(dir: &OwnedFd, relative: &[u8]) -> nix::Result<OwnedFd> {
    let path = CString::new(relative).map_err(|_| Errno::EINVAL)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    let mut attempts = 0;
    loop {
        match nix::fcntl::openat2(dir.as_raw_fd(), path.as_c_str(), how) {
            Ok(fd) => return Ok(take_fd(fd)),
            Err(Errno::EAGAIN | Errno::EINTR) if attempts < 32 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

fn take_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: every caller passes a descriptor that a successful openat/openat2 call has just
    // returned; nothing else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Joins components with `/`, or `.` for none.
fn join(components: &[Vec<u8>]) -> Vec<u8> {
    if components.is_empty() {
        return b".".to_vec();
    }
    components.join(&b'/')
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

fn timespec(seconds: u64) -> TimeSpec {
    TimeSpec::new(i64::try_from(seconds).unwrap_or(i64::MAX), 0)
}

fn invalid(name: &str, reason: &'static str) -> SourceError {
    SourceError::InvalidEntry {
        entry: name.to_owned(),
        reason,
    }
}

fn errno_error(name: &str, action: &'static str, errno: Errno) -> SourceError {
    SourceError::Entry {
        entry: name.to_owned(),
        action,
        source: errno.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(path: &str) -> Result<Vec<String>, SourceError> {
        split_path(path.as_bytes(), path, 4096).map(|c| {
            c.into_iter()
                .map(|c| String::from_utf8(c).unwrap())
                .collect()
        })
    }

    #[test]
    fn paths_split_and_refuse_escapes() {
        assert_eq!(split("./a//b/").unwrap(), ["a", "b"]);
        assert!(split("./").unwrap().is_empty());
        assert!(matches!(
            split("/etc/passwd"),
            Err(SourceError::AbsolutePath { .. })
        ));
        assert!(matches!(
            split("a/../../x"),
            Err(SourceError::PathEscape { .. })
        ));
        assert!(matches!(
            split_path(b"abcdef", "abcdef", 5),
            Err(SourceError::PathTooLong {
                len: 6,
                limit: 5,
                ..
            })
        ));
    }
}
