//! The entry-by-entry unpacker.
//!
//! Every entry path is normalised (leading `/` and `./` stripped, `..` refused), its parent is
//! resolved with `openat2(RESOLVE_IN_ROOT)` on a descriptor of the layer directory (missing
//! parents are created one component at a time, each relative to an already resolved
//! descriptor), and the final component is created relative to that parent descriptor with
//! calls that never follow it. So neither a crafted path nor a symlink an earlier entry planted
//! can make a write land outside the layer directory.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use tar::EntryType;

use super::sys::{self, is_dir, join_components, lstat_at, open_at, open_dir_in_root, os};
use super::{LayerError, UnpackLimits, compression};
use crate::digest::{Digest, HashingReader};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OVERLAY_OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const XATTR_PAX_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Room for the header blocks and padding read alongside an entry's PAX and long-name data.
const HEADER_SLACK: u64 = 16 * 512;
const COPY_BUFFER: usize = 256 * 1024;
/// Name under which a replaced directory is parked (at the layer root) while it is removed.
const TRASH_PREFIX: &str = ".lull-replaced-";
/// What error messages call the position before the first entry.
const START: &str = "<start of layer>";

/// What unpacking one layer amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries processed.
    pub entries: u64,
    /// Bytes of the uncompressed tar stream (what the diff_id hashes).
    pub uncompressed_bytes: u64,
}

/// Unpacks the compressed layer `blob` of `media_type` into `dest`, an existing empty directory,
/// and checks that the uncompressed stream hashes to `diff_id`.
///
/// On error `dest` holds whatever was unpacked so far and the caller must remove it (the
/// [`LayerCache`](super::LayerCache) does); nothing is ever written outside `dest`.
pub fn unpack_layer(
    blob: &Path,
    media_type: &str,
    diff_id: &Digest,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, LayerError> {
    let stream = compression::open_blob(blob, media_type)?;
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)
        .map_err(|source| LayerError::Dir {
            path: dest.to_owned(),
            action: "open the directory to unpack into",
            source,
        })?;
    let mut unpacker = Unpacker {
        root: OwnedFd::from(root),
        root_path: dest,
        limits,
        dir_times: Vec::new(),
        parent_cache: None,
        buffer: vec![0; COPY_BUFFER],
        written: 0,
        root_meta_set: false,
        trash_counter: 0,
    };
    let stats = unpacker.run(stream, diff_id)?;
    tracing::debug!(
        %diff_id,
        entries = stats.entries,
        bytes = stats.uncompressed_bytes,
        "layer unpacked"
    );
    Ok(stats)
}

/// Why the metered reader stopped the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trip {
    Total,
    Headers,
}

/// Shared between the reader under the tar parser and the unpack loop: counts uncompressed
/// bytes, and while the parser reads headers (between entries) how many it read for them.
struct Meter {
    read: Cell<u64>,
    headers_from: Cell<Option<u64>>,
    tripped: Cell<Option<Trip>>,
    max_total: u64,
    max_headers: u64,
}

impl Meter {
    fn begin_headers(&self) {
        self.headers_from.set(Some(self.read.get()));
    }
    fn end_headers(&self) {
        self.headers_from.set(None);
    }
}

struct MeteredReader<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Read for MeteredReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let meter = &self.meter;
        if let Some(trip) = meter.tripped.get() {
            return Err(trip_error(trip));
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
        if let Some(trip) = trip {
            meter.tripped.set(Some(trip));
            return Err(trip_error(trip));
        }
        Ok(n)
    }
}

fn trip_error(trip: Trip) -> io::Error {
    io::Error::other(match trip {
        Trip::Total => "layer exceeds its uncompressed size limit",
        Trip::Headers => "layer entry headers exceed their size limit",
    })
}

/// Ownership, permissions, times and xattrs of an entry, read from its header and PAX records.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

struct Unpacker<'a> {
    root: OwnedFd,
    root_path: &'a Path,
    limits: &'a UnpackLimits,
    /// Directory mtimes, set once every entry is in place (creating children changes them).
    dir_times: Vec<(CString, TimeSpec)>,
    /// The last resolved parent directory: consecutive entries usually share it.
    parent_cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    buffer: Vec<u8>,
    /// Bytes written to regular files (sparse entries can expand far beyond the stream).
    written: u64,
    root_meta_set: bool,
    trash_counter: u64,
}

impl Unpacker<'_> {
    fn run(&mut self, stream: Box<dyn Read>, diff_id: &Digest) -> Result<UnpackStats, LayerError> {
        let meter = Rc::new(Meter {
            read: Cell::new(0),
            headers_from: Cell::new(None),
            tripped: Cell::new(None),
            max_total: self.limits.max_uncompressed_bytes,
            max_headers: self.limits.max_metadata_bytes.saturating_add(HEADER_SLACK),
        });
        let metered = MeteredReader {
            inner: stream,
            meter: Rc::clone(&meter),
        };
        let mut archive = tar::Archive::new(HashingReader::new(metered));
        let mut count: u64 = 0;
        let mut last = String::from(START);
        {
            let mut entries = archive.entries().map_err(|source| LayerError::Stream {
                after: last.clone(),
                source,
            })?;
            loop {
                meter.begin_headers();
                let next = entries.next();
                meter.end_headers();
                let mut entry = match next {
                    None => break,
                    Some(Ok(entry)) => entry,
                    Some(Err(source)) => {
                        let err = LayerError::Stream {
                            after: last.clone(),
                            source,
                        };
                        return Err(self.classify(&meter, &last, err));
                    }
                };
                let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                count += 1;
                if count > self.limits.max_entries {
                    return Err(LayerError::TooManyEntries {
                        limit: self.limits.max_entries,
                        entry: name,
                    });
                }
                let applied = self.apply(&mut entry, &name).and_then(|()| {
                    // Whatever the entry carries beyond what was used (say, data on a
                    // directory) is read here, not while the parser looks for the next header.
                    io::copy(&mut entry, &mut io::sink())
                        .map(drop)
                        .map_err(|source| LayerError::Stream {
                            after: name.clone(),
                            source,
                        })
                });
                if let Err(err) = applied {
                    return Err(self.classify(&meter, &name, err));
                }
                last = name;
            }
        }
        // Hash through to the end of the stream: the end-of-archive blocks and any padding
        // after them belong to the diff_id too.
        let (actual, bytes, _) = archive.into_inner().finish().map_err(|source| {
            let err = LayerError::Stream {
                after: last.clone(),
                source,
            };
            self.classify(&meter, &last, err)
        })?;
        if actual != *diff_id {
            return Err(LayerError::DiffIdMismatch {
                expected: diff_id.clone(),
                actual,
            });
        }
        self.finish()?;
        Ok(UnpackStats {
            entries: count,
            uncompressed_bytes: bytes,
        })
    }

    /// Turns an error caused by the meter cutting the stream into the limit error it stands for.
    fn classify(&self, meter: &Meter, entry: &str, err: LayerError) -> LayerError {
        match meter.tripped.get() {
            Some(Trip::Total) => LayerError::TooLarge {
                limit: self.limits.max_uncompressed_bytes,
                entry: entry.to_owned(),
            },
            Some(Trip::Headers) => LayerError::MetadataTooLarge {
                limit: self.limits.max_metadata_bytes,
                after: entry.to_owned(),
            },
            None => err,
        }
    }

    /// Sets directory mtimes (deepest first is not needed: a directory's own mtime does not
    /// change when its children's times are set) and gives the layer root a sane mode when no
    /// entry described it.
    fn finish(&mut self) -> Result<(), LayerError> {
        if !self.root_meta_set {
            nix::sys::stat::fchmod(self.root.as_raw_fd(), Mode::from_bits_truncate(0o755))
                .map_err(|e| self.dir_error("set the mode of the layer root", e))?;
        }
        let dir_times = std::mem::take(&mut self.dir_times);
        for (path, mtime) in dir_times.iter().rev() {
            let dir = match open_dir_in_root(self.root.as_fd(), path, true) {
                Ok(dir) => dir,
                // Replaced by a later entry: that entry's metadata wins.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                Err(e) => return Err(entry_error(&lossy(path.as_bytes()), "reopen directory", e)),
            };
            nix::sys::stat::futimens(dir.as_raw_fd(), mtime, mtime).map_err(|e| {
                entry_error(
                    &lossy(path.as_bytes()),
                    "set directory modification time",
                    e,
                )
            })?;
        }
        Ok(())
    }

    fn dir_error(&self, action: &'static str, e: Errno) -> LayerError {
        LayerError::Dir {
            path: self.root_path.to_owned(),
            action,
            source: e.into(),
        }
    }

    fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), LayerError> {
        let path = entry.path_bytes().into_owned();
        let components = normalize(&path, name, self.limits)?;
        let kind = entry.header().entry_type();
        let meta = read_meta(entry, name)?;

        if let Some(base) = components.last()
            && base.starts_with(WHITEOUT_PREFIX)
        {
            if !matches!(kind, EntryType::Regular | EntryType::Continuous) {
                return Err(LayerError::Whiteout {
                    entry: name.to_owned(),
                    reason: "whiteouts must be regular files",
                });
            }
            if entry.size() != 0 {
                return Err(LayerError::Whiteout {
                    entry: name.to_owned(),
                    reason: "whiteouts must be empty",
                });
            }
            return self.whiteout(&components, &meta, name);
        }

        match kind {
            EntryType::Directory => self.directory(&components, &meta, name),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.file(&components, &meta, entry, name)
            }
            EntryType::Symlink => {
                let target = self.link_target(entry, name)?;
                self.symlink(&components, &target, &meta, name)
            }
            EntryType::Link => {
                let target = self.link_target(entry, name)?;
                self.hardlink(&components, &target, name)
            }
            EntryType::Fifo => self.fifo(&components, &meta, name),
            EntryType::Char => Err(LayerError::Device {
                entry: name.to_owned(),
                kind: "char",
            }),
            EntryType::Block => Err(LayerError::Device {
                entry: name.to_owned(),
                kind: "block",
            }),
            // Global PAX headers hold defaults for the whole archive that layers do not rely
            // on; Go and containerd ignore them as well.
            EntryType::XGlobalHeader => Ok(()),
            other => Err(LayerError::UnsupportedType {
                entry: name.to_owned(),
                kind: format!("{other:?} ({:?})", char::from(other.as_byte())),
            }),
        }
    }

    fn link_target<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Vec<u8>, LayerError> {
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
            return Err(LayerError::PathTooLong {
                entry: name.to_owned(),
                len: target.len(),
                limit: self.limits.max_path_len,
            });
        }
        Ok(target)
    }

    /// Resolves (creating if needed) the parent directory of `components` inside the root.
    /// `components` must not be empty.
    fn parent(&mut self, components: &[&[u8]], name: &str) -> Result<Rc<OwnedFd>, LayerError> {
        let parents = &components[..components.len() - 1];
        let key = join_components(parents);
        if let Some((cached, fd)) = &self.parent_cache
            && *cached == key
        {
            return Ok(Rc::clone(fd));
        }
        let path = cstring(&key, name)?;
        let fd = match open_dir_in_root(self.root.as_fd(), &path, false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => self.make_parents(parents, name)?,
            Err(Errno::ENOTDIR) => {
                return Err(invalid(name, "a parent path component is not a directory"));
            }
            Err(e) => return Err(entry_error(name, "resolve parent directory", e)),
        };
        let fd = Rc::new(fd);
        self.parent_cache = Some((key, Rc::clone(&fd)));
        Ok(fd)
    }

    /// Creates the missing directories of `parents`, each inside the already resolved previous
    /// one, the way tar does for archives that do not list every directory.
    fn make_parents(&mut self, parents: &[&[u8]], name: &str) -> Result<OwnedFd, LayerError> {
        let mut dir = open_dir_in_root(self.root.as_fd(), c".", false)
            .map_err(|e| entry_error(name, "open the layer root", e))?;
        for depth in 0..parents.len() {
            let prefix = cstring(&join_components(&parents[..=depth]), name)?;
            dir = match open_dir_in_root(self.root.as_fd(), &prefix, false) {
                Ok(next) => next,
                Err(Errno::ENOENT) => {
                    let component = os(parents[depth]);
                    match nix::sys::stat::mkdirat(
                        Some(dir.as_raw_fd()),
                        component,
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) => {}
                        Err(Errno::EEXIST) => {
                            return Err(invalid(
                                name,
                                "a parent path component is a symlink to a missing directory",
                            ));
                        }
                        Err(e) => return Err(entry_error(name, "create parent directory", e)),
                    }
                    let created = open_at(
                        dir.as_fd(),
                        component,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                        Mode::empty(),
                    )
                    .map_err(|e| entry_error(name, "open created parent directory", e))?;
                    // mkdirat honours the umask; implicit directories are always 0755.
                    nix::sys::stat::fchmod(created.as_raw_fd(), Mode::from_bits_truncate(0o755))
                        .map_err(|e| entry_error(name, "set parent directory mode", e))?;
                    created
                }
                Err(Errno::ENOTDIR) => {
                    return Err(invalid(name, "a parent path component is not a directory"));
                }
                Err(e) => return Err(entry_error(name, "resolve parent directory", e)),
            };
        }
        Ok(dir)
    }

    /// Makes room for a new entry called `base` in `parent`: an existing non-directory is
    /// unlinked, an existing directory is removed with its contents unless the new entry is a
    /// directory too (then it is kept and returned `true`).
    fn clear_slot(
        &mut self,
        parent: &OwnedFd,
        base: &[u8],
        new_is_dir: bool,
        name: &str,
    ) -> Result<bool, LayerError> {
        let existing = lstat_at(parent.as_fd(), os(base))
            .map_err(|e| entry_error(name, "inspect existing path", e))?;
        let Some(existing) = existing else {
            return Ok(false);
        };
        if is_dir(&existing) {
            if new_is_dir {
                return Ok(true);
            }
            self.remove_dir_at(parent, base, name)?;
        } else {
            nix::unistd::unlinkat(
                Some(parent.as_raw_fd()),
                os(base),
                UnlinkatFlags::NoRemoveDir,
            )
            .map_err(|e| entry_error(name, "remove the path it replaces", e))?;
        }
        // A cached parent may have been resolved through what was just removed.
        self.parent_cache = None;
        Ok(false)
    }

    /// Removes the directory `base` of `parent` and its contents: it is first moved to a fresh
    /// name at the layer root, which the unpacker knows by path, then removed from there.
    fn remove_dir_at(
        &mut self,
        parent: &OwnedFd,
        base: &[u8],
        name: &str,
    ) -> Result<(), LayerError> {
        loop {
            self.trash_counter += 1;
            let trash = format!("{TRASH_PREFIX}{}", self.trash_counter);
            match nix::fcntl::renameat2(
                Some(parent.as_raw_fd()),
                os(base),
                Some(self.root.as_raw_fd()),
                trash.as_str(),
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => {
                    return sys::remove_tree(&self.root_path.join(&trash)).map_err(|source| {
                        LayerError::Entry {
                            entry: name.to_owned(),
                            action: "remove the directory it replaces",
                            source,
                        }
                    });
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(entry_error(name, "move aside the directory it replaces", e)),
            }
        }
    }

    fn directory(
        &mut self,
        components: &[&[u8]],
        meta: &Meta,
        name: &str,
    ) -> Result<(), LayerError> {
        if components.is_empty() {
            // `./` describes the layer root itself.
            let root = self.root.try_clone().map_err(|source| LayerError::Entry {
                entry: name.to_owned(),
                action: "duplicate the layer root descriptor",
                source,
            })?;
            set_meta(&File::from(root), meta, false, name)?;
            self.root_meta_set = true;
            self.dir_times.push((c".".to_owned(), meta.mtime));
            return Ok(());
        }
        let parent = self.parent(components, name)?;
        let base = components[components.len() - 1];
        if !self.clear_slot(&parent, base, true, name)? {
            nix::sys::stat::mkdirat(
                Some(parent.as_raw_fd()),
                os(base),
                Mode::from_bits_truncate(0o700),
            )
            .map_err(|e| entry_error(name, "create directory", e))?;
        }
        let dir = open_at(
            parent.as_fd(),
            os(base),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(|e| entry_error(name, "open directory", e))?;
        set_meta(&File::from(dir), meta, false, name)?;
        self.dir_times
            .push((cstring(&join_components(components), name)?, meta.mtime));
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        components: &[&[u8]],
        meta: &Meta,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), LayerError> {
        if components.is_empty() {
            return Err(invalid(name, "the layer root cannot be a file"));
        }
        let parent = self.parent(components, name)?;
        let base = components[components.len() - 1];
        self.clear_slot(&parent, base, false, name)?;
        let fd = open_at(
            parent.as_fd(),
            os(base),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| entry_error(name, "create file", e))?;
        let mut file = File::from(fd);
        loop {
            let n = entry
                .read(&mut self.buffer)
                .map_err(|source| LayerError::Stream {
                    after: name.to_owned(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            self.written += n as u64;
            if self.written > self.limits.max_uncompressed_bytes {
                return Err(LayerError::TooLarge {
                    limit: self.limits.max_uncompressed_bytes,
                    entry: name.to_owned(),
                });
            }
            file.write_all(&self.buffer[..n])
                .map_err(|source| LayerError::Entry {
                    entry: name.to_owned(),
                    action: "write file data",
                    source,
                })?;
        }
        set_meta(&file, meta, true, name)
    }

    fn symlink(
        &mut self,
        components: &[&[u8]],
        target: &[u8],
        meta: &Meta,
        name: &str,
    ) -> Result<(), LayerError> {
        if components.is_empty() {
            return Err(invalid(name, "the layer root cannot be a symlink"));
        }
        let parent = self.parent(components, name)?;
        let base = os(components[components.len() - 1]);
        self.clear_slot(&parent, base.as_encoded_bytes(), false, name)?;
        // The target is stored as written: it is resolved inside the container, never here.
        nix::unistd::symlinkat(os(target), Some(parent.as_raw_fd()), base)
            .map_err(|e| entry_error(name, "create symlink", e))?;
        chown_no_follow(&parent, base, meta, name, "change symlink owner")?;
        nix::sys::stat::utimensat(
            Some(parent.as_raw_fd()),
            base,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| entry_error(name, "set symlink modification time", e))?;
        if !meta.xattrs.is_empty() {
            tracing::debug!(
                entry = name,
                "extended attributes on a symlink are not unpacked"
            );
        }
        Ok(())
    }

    fn hardlink(
        &mut self,
        components: &[&[u8]],
        target: &[u8],
        name: &str,
    ) -> Result<(), LayerError> {
        let target_name = lossy(target);
        let refuse = |reason| LayerError::HardlinkTarget {
            entry: name.to_owned(),
            target: target_name.clone(),
            reason,
        };
        if components.is_empty() {
            return Err(invalid(name, "the layer root cannot be a hardlink"));
        }
        let target_components = match normalize(target, name, self.limits) {
            Ok(c) if c.is_empty() => return Err(refuse("is the layer root")),
            Ok(c) => c,
            Err(LayerError::PathEscape { .. }) => {
                return Err(refuse("escapes the layer root through `..`"));
            }
            Err(e) => return Err(e),
        };
        // Resolve the target's parent inside the root without creating anything: the target
        // must be something this layer already unpacked.
        let target_parent_path = cstring(
            &join_components(&target_components[..target_components.len() - 1]),
            name,
        )?;
        let target_parent = match open_dir_in_root(self.root.as_fd(), &target_parent_path, false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => {
                return Err(refuse("does not exist in this layer"));
            }
            Err(e) => return Err(entry_error(name, "resolve hardlink target", e)),
        };
        let target_base = os(target_components[target_components.len() - 1]);
        let target_stat = match lstat_at(target_parent.as_fd(), target_base) {
            Ok(Some(stat)) => stat,
            Ok(None) => return Err(refuse("does not exist in this layer")),
            Err(e) => return Err(entry_error(name, "inspect hardlink target", e)),
        };
        if is_dir(&target_stat) {
            return Err(refuse("is a directory"));
        }
        let parent = self.parent(components, name)?;
        let base = os(components[components.len() - 1]);
        if let Ok(Some(existing)) = lstat_at(parent.as_fd(), base)
            && existing.st_dev == target_stat.st_dev
            && existing.st_ino == target_stat.st_ino
        {
            return Ok(());
        }
        self.clear_slot(&parent, base.as_encoded_bytes(), false, name)?;
        // Both names are single components relative to resolved descriptors, and flags 0 means
        // a symlink target is linked itself, not followed.
        nix::unistd::linkat(
            Some(target_parent.as_raw_fd()),
            target_base,
            Some(parent.as_raw_fd()),
            base,
            AtFlags::empty(),
        )
        .map_err(|e| entry_error(name, "create hardlink", e))
    }

    fn fifo(&mut self, components: &[&[u8]], meta: &Meta, name: &str) -> Result<(), LayerError> {
        if components.is_empty() {
            return Err(invalid(name, "the layer root cannot be a fifo"));
        }
        let parent = self.parent(components, name)?;
        let base = os(components[components.len() - 1]);
        self.clear_slot(&parent, base.as_encoded_bytes(), false, name)?;
        nix::sys::stat::mknodat(
            Some(parent.as_raw_fd()),
            base,
            SFlag::S_IFIFO,
            Mode::from_bits_truncate(0o600),
            0,
        )
        .map_err(|e| entry_error(name, "create fifo", e))?;
        chown_no_follow(&parent, base, meta, name, "change fifo owner")?;
        // After chown, which clears set-id bits. The name was just created as a fifo in a
        // directory only this unpacker writes to, so following it cannot lead elsewhere.
        nix::sys::stat::fchmodat(
            Some(parent.as_raw_fd()),
            base,
            Mode::from_bits_truncate(meta.mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| entry_error(name, "set fifo mode", e))?;
        nix::sys::stat::utimensat(
            Some(parent.as_raw_fd()),
            base,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| entry_error(name, "set fifo modification time", e))
    }

    /// `.wh..wh..opq` marks its directory opaque; `.wh.NAME` becomes a char device 0/0 NAME.
    fn whiteout(
        &mut self,
        components: &[&[u8]],
        meta: &Meta,
        name: &str,
    ) -> Result<(), LayerError> {
        let parent = self.parent(components, name)?;
        let base = components[components.len() - 1];
        if base == OPAQUE_MARKER {
            // Opacity hides the lower layers' children of this directory; it does not touch
            // what this layer puts in it, whatever the entry order.
            return sys::set_xattr(parent.as_fd(), OVERLAY_OPAQUE_XATTR, b"y").map_err(|source| {
                LayerError::Entry {
                    entry: name.to_owned(),
                    action: "mark directory opaque",
                    source,
                }
            });
        }
        let hidden = &base[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() {
            return Err(LayerError::Whiteout {
                entry: name.to_owned(),
                reason: "it names no file",
            });
        }
        if hidden == b"." || hidden == b".." {
            return Err(LayerError::Whiteout {
                entry: name.to_owned(),
                reason: "it targets `.` or `..`",
            });
        }
        self.clear_slot(&parent, hidden, false, name)?;
        let hidden = os(hidden);
        nix::sys::stat::mknodat(
            Some(parent.as_raw_fd()),
            hidden,
            SFlag::S_IFCHR,
            Mode::empty(),
            libc::makedev(0, 0),
        )
        .map_err(|e| entry_error(name, "create whiteout device", e))?;
        chown_no_follow(&parent, hidden, meta, name, "change whiteout owner")
    }
}

/// Owner, xattrs, mode (after chown, which clears set-id bits and file capabilities, so
/// `security.capability` goes after it too) and, for files, the mtime.
fn set_meta(file: &File, meta: &Meta, set_mtime: bool, name: &str) -> Result<(), LayerError> {
    let fd = file.as_raw_fd();
    nix::unistd::fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )
    .map_err(|e| entry_error(name, "change owner", e))?;
    for (key, value) in &meta.xattrs {
        match sys::set_xattr(file.as_fd(), key, value) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::warn!(entry = name, xattr = ?key, "file system does not support this extended attribute; skipped");
            }
            Err(source) => {
                tracing::warn!(entry = name, xattr = ?key, "cannot set extended attribute");
                return Err(LayerError::Entry {
                    entry: name.to_owned(),
                    action: "set extended attribute",
                    source,
                });
            }
        }
    }
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(meta.mode))
        .map_err(|e| entry_error(name, "set mode", e))?;
    if set_mtime {
        nix::sys::stat::futimens(fd, &meta.mtime, &meta.mtime)
            .map_err(|e| entry_error(name, "set modification time", e))?;
    }
    Ok(())
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Meta, LayerError> {
    let header = entry.header();
    let id = |value: io::Result<u64>, what: &'static str| -> Result<u32, LayerError> {
        match value {
            // u32::MAX means "leave unchanged" to chown: not an owner a file can have.
            Ok(v) if v < u64::from(u32::MAX) => Ok(v as u32),
            Ok(_) => Err(invalid(name, what)),
            Err(_) => Err(invalid(name, what)),
        }
    };
    let uid = id(header.uid(), "uid field is invalid or out of range")?;
    let gid = id(header.gid(), "gid field is invalid or out of range")?;
    let mode = header
        .mode()
        .map_err(|_| invalid(name, "mode field is invalid"))?
        & 0o7777;
    let seconds = header
        .mtime()
        .map_err(|_| invalid(name, "mtime field is invalid"))?;
    let mut mtime = TimeSpec::new(i64::try_from(seconds).unwrap_or(i64::MAX), 0);
    let mut xattrs = Vec::new();
    let pax = entry
        .pax_extensions()
        .map_err(|source| LayerError::Stream {
            after: name.to_owned(),
            source,
        })?;
    if let Some(pax) = pax {
        for record in pax {
            let record = record.map_err(|_| invalid(name, "malformed PAX record"))?;
            let key = record.key_bytes();
            if key.starts_with(b"GNU.sparse.") {
                // GNU's PAX sparse formats keep a sparse map inside the data, which the tar
                // crate would unpack as file content: refuse rather than write a wrong file.
                return Err(LayerError::UnsupportedType {
                    entry: name.to_owned(),
                    kind: "GNU sparse file in PAX format".to_owned(),
                });
            }
            if key == b"mtime" {
                if let Some(precise) = parse_pax_time(record.value_bytes()) {
                    mtime = precise;
                }
            } else if let Some(xattr) = key.strip_prefix(XATTR_PAX_PREFIX) {
                if xattr.starts_with(b"trusted.overlay.") {
                    // Overlay metadata (opaque, redirect, metacopy...) is the unpacker's to
                    // write; a layer carrying it could redirect lookups elsewhere.
                    tracing::warn!(entry = name, xattr = %String::from_utf8_lossy(xattr), "overlay xattr in layer skipped");
                    continue;
                }
                let key = CString::new(xattr)
                    .map_err(|_| invalid(name, "xattr name contains a NUL byte"))?;
                xattrs.push((key, record.value_bytes().to_vec()));
            }
        }
    }
    Ok(Meta {
        uid,
        gid,
        mode,
        mtime,
        xattrs,
    })
}

/// Parses a PAX time (`1700000000.123456789`, possibly negative) into a timespec.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10_i64.pow(8 - i as u32);
    }
    Some(if negative {
        if nanos == 0 {
            TimeSpec::new(-seconds, 0)
        } else {
            TimeSpec::new(-seconds - 1, 1_000_000_000 - nanos)
        }
    } else {
        TimeSpec::new(seconds, nanos)
    })
}

/// Splits an entry path into components: empty and `.` components (leading `/`, `./`, `//`)
/// are dropped, `..` is refused, lengths are checked against the limits.
pub(super) fn normalize<'p>(
    path: &'p [u8],
    name: &str,
    limits: &UnpackLimits,
) -> Result<Vec<&'p [u8]>, LayerError> {
    if path.contains(&0) {
        return Err(invalid(name, "path contains a NUL byte"));
    }
    let mut components = Vec::new();
    let mut len = 0;
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => {
                return Err(LayerError::PathEscape {
                    entry: name.to_owned(),
                });
            }
            _ => {}
        }
        if component.len() > limits.max_component_len {
            return Err(LayerError::ComponentTooLong {
                entry: name.to_owned(),
                len: component.len(),
                limit: limits.max_component_len,
            });
        }
        len += component.len() + usize::from(!components.is_empty());
        components.push(component);
    }
    if len > limits.max_path_len {
        return Err(LayerError::PathTooLong {
            entry: name.to_owned(),
            len,
            limit: limits.max_path_len,
        });
    }
    Ok(components)
}

fn cstring(bytes: &[u8], name: &str) -> Result<CString, LayerError> {
    CString::new(bytes).map_err(|_| invalid(name, "path contains a NUL byte"))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn invalid(name: &str, reason: &'static str) -> LayerError {
    LayerError::InvalidEntry {
        entry: name.to_owned(),
        reason,
    }
}

/// Sets an entry's owner from its header without following it (symlinks, fifos, whiteouts).
fn chown_no_follow(
    parent: &OwnedFd,
    base: &std::ffi::OsStr,
    meta: &Meta,
    name: &str,
    action: &'static str,
) -> Result<(), LayerError> {
    nix::unistd::fchownat(
        Some(parent.as_raw_fd()),
        base,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| entry_error(name, action, e))
}

fn entry_error(name: &str, action: &'static str, errno: Errno) -> LayerError {
    LayerError::Entry {
        entry: name.to_owned(),
        action,
        source: errno.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn components(path: &str) -> Result<Vec<String>, LayerError> {
        normalize(path.as_bytes(), path, &UnpackLimits::default()).map(|c| {
            c.into_iter()
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .collect()
        })
    }

    #[test]
    fn normalize_strips_leading_slashes_and_dots() {
        assert_eq!(components("/usr/bin/").unwrap(), ["usr", "bin"]);
        assert_eq!(components("./etc//passwd").unwrap(), ["etc", "passwd"]);
        assert_eq!(components(".//./a/./b").unwrap(), ["a", "b"]);
        assert!(components("./").unwrap().is_empty());
        assert!(components("/").unwrap().is_empty());
    }

    #[test]
    fn normalize_refuses_parent_components() {
        for path in [
            "../escape",
            "/abs/../../escape",
            "a/../../escape",
            "a/..",
            "..",
        ] {
            assert!(
                matches!(components(path), Err(LayerError::PathEscape { ref entry }) if entry == path),
                "{path}"
            );
        }
    }

    #[test]
    fn normalize_enforces_lengths() {
        let limits = UnpackLimits {
            max_path_len: 10,
            max_component_len: 4,
            ..UnpackLimits::default()
        };
        assert!(normalize(b"abcd/abcd", "x", &limits).is_ok());
        assert!(matches!(
            normalize(b"abcde", "x", &limits),
            Err(LayerError::ComponentTooLong {
                len: 5,
                limit: 4,
                ..
            })
        ));
        assert!(matches!(
            normalize(b"abcd/abcd/a", "x", &limits),
            Err(LayerError::PathTooLong {
                len: 11,
                limit: 10,
                ..
            })
        ));
        assert!(matches!(
            normalize(b"a\0b", "x", &limits),
            Err(LayerError::InvalidEntry { .. })
        ));
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(
            parse_pax_time(b"1700000000"),
            Some(TimeSpec::new(1_700_000_000, 0))
        );
        assert_eq!(
            parse_pax_time(b"1700000000.25"),
            Some(TimeSpec::new(1_700_000_000, 250_000_000))
        );
        assert_eq!(
            parse_pax_time(b"-1.5"),
            Some(TimeSpec::new(-2, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12x"), None);
        assert_eq!(parse_pax_time(b""), None);
    }

    #[test]
    fn meter_cuts_off_the_stream() {
        let meter = Rc::new(Meter {
            read: Cell::new(0),
            headers_from: Cell::new(None),
            tripped: Cell::new(None),
            max_total: 1000,
            max_headers: 100,
        });
        let mut reader = MeteredReader {
            inner: io::repeat(0),
            meter: Rc::clone(&meter),
        };
        let mut buf = [0u8; 64];
        reader.read_exact(&mut buf).unwrap();
        meter.begin_headers();
        reader.read_exact(&mut buf).unwrap();
        assert!(reader.read_exact(&mut buf).is_err());
        assert_eq!(meter.tripped.get(), Some(Trip::Headers));

        let meter = Rc::new(Meter {
            read: Cell::new(0),
            headers_from: Cell::new(None),
            tripped: Cell::new(None),
            max_total: 1000,
            max_headers: 100,
        });
        let mut reader = MeteredReader {
            inner: io::repeat(0),
            meter: Rc::clone(&meter),
        };
        let err = io::copy(&mut reader, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
        assert_eq!(meter.tripped.get(), Some(Trip::Total));
        assert!(meter.read.get() <= 1000 + 8192);
    }
}
