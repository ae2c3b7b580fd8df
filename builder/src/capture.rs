//! Captures what a build step changed as an OCI layer, by walking the overlayfs upper directory
//! the step wrote to (what BuildKit and buildah do).
//!
//! The step ran on an overlay mount `lowerdir=<layers>,upperdir=<upper>` mounted without
//! `redirect_dir` and `metacopy`, so the upper directory holds every changed file in full plus
//! overlayfs' own markers, which are converted to the OCI forms:
//!
//! - a char device 0/0 (a whiteout) becomes an empty `.wh.NAME` entry, but only if NAME exists in
//!   some lower layer (overlayfs also leaves whiteouts for files the step created and deleted);
//! - a directory with `trusted.overlay.opaque=y` becomes the directory entry, then
//!   `.wh..wh..opq` inside it, then its children;
//! - overlay-internal xattrs (`trusted.overlay.*`, `user.overlay.*`) are never exported, and an
//!   upper carrying `redirect` or `metacopy` xattrs is refused: its files would be incomplete;
//! - regular files sharing an inode (hardlinks made by the step) become one file entry (the
//!   first path in walk order) and tar hardlink entries naming it;
//! - symlinks and fifos are kept, sockets are skipped, any other device node is refused.
//!
//! The output is a gzip-compressed tar (`application/vnd.oci.image.layer.v1.tar+gzip`) that is a
//! pure function of the upper directory's content: entries depth first with siblings sorted by
//! name bytes (so parents come before children), uid, gid, mode (set-id bits included) and
//! xattrs kept, mtimes clamped to [`CaptureOptions::mtime`], no user or group names, a gzip
//! header with mtime 0, no file name and a fixed compression level and deflate backend. Both
//! digests are computed while the stream is written.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::GzBuilder;
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

/// The media type of the blobs [`capture_layer`] writes.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The gzip level every layer is compressed with: changing it changes every layer digest.
const GZIP_LEVEL: u32 = 6;
/// The gzip header's operating system byte: "unknown", as Go's compress/gzip writes it.
const GZIP_OS_UNKNOWN: u8 = 255;
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";
const OVERLAY_XATTR_PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];
/// Overlay features whose upper files are not self-contained (a renamed directory that points
/// at its lower origin, a file whose data still lives below).
const UNSUPPORTED_OVERLAY_XATTRS: [&str; 2] = ["redirect", "metacopy"];

/// What to leave out of a captured layer and how to clamp its times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureOptions {
    /// Paths relative to the root (a leading `/` is allowed) left out entirely, with everything
    /// below them: mount points of build caches, injected CA files and secrets.
    pub exclude: Vec<PathBuf>,
    /// Every mtime is clamped to at most this many seconds since the epoch
    /// (`SOURCE_DATE_EPOCH` style).
    pub mtime: u64,
}

/// The layer [`capture_layer`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedLayer {
    /// `sha256:<hex>` of the uncompressed tar stream (the image config's `diff_ids`).
    pub diff_id: String,
    /// `sha256:<hex>` of the gzip blob (the manifest's layer descriptor digest).
    pub digest: String,
    /// Bytes of the gzip blob.
    pub size: u64,
    /// Tar entries written (files, directories, links, whiteouts and opaque markers).
    pub entries: u64,
}

/// Why an upper directory could not be captured. Paths are the full paths inside the upper
/// directory (or the lower one that was inspected).
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot {action} {path}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind} device {major}:{minor}, which a layer may not contain")]
    Device {
        path: PathBuf,
        kind: &'static str,
        major: u64,
        minor: u64,
    },
    #[error(
        "{path} carries the overlay xattr {xattr}: uppers of overlays mounted with redirect_dir or metacopy cannot be captured"
    )]
    OverlayFeature { path: PathBuf, xattr: String },
    #[error("{path} has an extended attribute whose name is not UTF-8")]
    XattrName { path: PathBuf },
    #[error("exclude path {path} must stay inside the root (no `..`)")]
    Exclude { path: PathBuf },
    #[error("cannot write the layer")]
    Write {
        #[source]
        source: io::Error,
    },
}

/// Writes the changes recorded in the overlay upper directory `upper` as a gzip-compressed OCI
/// layer to `out`.
///
/// `lowers` are the unpacked lower layer directories in overlayfs lowerdir form, lowest first;
/// they decide which whiteouts are worth exporting. `out` receives the blob only; the caller
/// names it after the returned digest.
pub fn capture_layer(
    upper: &Path,
    lowers: &[PathBuf],
    options: &CaptureOptions,
    out: impl Write,
) -> Result<CapturedLayer, CaptureError> {
    let mut exclude = HashSet::new();
    for path in &options.exclude {
        exclude.insert(normalize_exclude(path)?);
    }
    let compressed = HashingWriter::new(out);
    let gzip = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS_UNKNOWN)
        .write(compressed, flate2::Compression::new(GZIP_LEVEL));
    let mut tar = tar::Builder::new(HashingWriter::new(gzip));
    tar.follow_symlinks(false);
    let mut capture = Capture {
        upper,
        lowers,
        mtime: options.mtime,
        exclude,
        tar,
        links: HashMap::new(),
        entries: 0,
    };
    let root_xattrs = capture.xattrs(upper)?;
    if root_xattrs.opaque {
        let root_meta = capture.metadata(upper)?;
        capture.append_marker(Path::new(OPAQUE_MARKER), &root_meta, upper)?;
    }
    capture.walk(Path::new(""), root_xattrs.opaque)?;

    let entries = capture.entries;
    let write_error = |source| CaptureError::Write { source };
    let uncompressed = capture.tar.into_inner().map_err(write_error)?;
    let (diff_id, _, gzip) = uncompressed.finish();
    let compressed = gzip.finish().map_err(write_error)?;
    let (digest, size, mut out) = compressed.finish();
    out.flush().map_err(write_error)?;
    Ok(CapturedLayer {
        diff_id,
        digest,
        size,
        entries,
    })
}

/// Turns an exclude path into the relative form the walk compares against.
fn normalize_exclude(path: &Path) -> Result<PathBuf, CaptureError> {
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => relative.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CaptureError::Exclude {
                    path: path.to_owned(),
                });
            }
        }
    }
    Ok(relative)
}

/// The xattrs of one upper path, overlay-internal ones already taken out.
struct Xattrs {
    /// Exported as `SCHILY.xattr.*` PAX records, sorted by name.
    exported: Vec<(String, Vec<u8>)>,
    /// The directory hides the lower layers' children.
    opaque: bool,
    /// The regular file is an overlayfs "xattr whiteout" (a zero-size file marked as one).
    whiteout: bool,
}

struct Capture<'a, W: Write> {
    upper: &'a Path,
    lowers: &'a [PathBuf],
    mtime: u64,
    exclude: HashSet<PathBuf>,
    tar: tar::Builder<HashingWriter<flate2::write::GzEncoder<HashingWriter<W>>>>,
    /// Regular files with more than one link seen so far: (dev, ino) → first relative path.
    links: HashMap<(u64, u64), PathBuf>,
    entries: u64,
}

impl<W: Write> Capture<'_, W> {
    /// Emits the children of the upper directory `dir` (relative), depth first, siblings in
    /// name byte order. `under_opaque`: an ancestor (or `dir`) is opaque, so nothing of the
    /// lower layers shows below it and whiteouts there are pointless.
    fn walk(&mut self, dir: &Path, under_opaque: bool) -> Result<(), CaptureError> {
        let full_dir = self.upper.join(dir);
        let mut names: Vec<OsString> = fs::read_dir(&full_dir)
            .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect())
            .map_err(|source| CaptureError::Io {
                path: full_dir.clone(),
                action: "read directory",
                source,
            })?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let relative = dir.join(&name);
            if self.exclude.contains(&relative) {
                continue;
            }
            let full = self.upper.join(&relative);
            let meta = self.metadata(&full)?;
            let file_type = meta.file_type();
            if file_type.is_char_device() && meta.rdev() == 0 {
                self.whiteout(dir, &name, &meta, under_opaque)?;
                continue;
            }
            if file_type.is_socket() {
                tracing::debug!(path = %full.display(), "socket left out of the layer");
                continue;
            }
            if file_type.is_char_device() || file_type.is_block_device() {
                return Err(CaptureError::Device {
                    path: full,
                    kind: if file_type.is_char_device() {
                        "char"
                    } else {
                        "block"
                    },
                    major: libc::major(meta.rdev()).into(),
                    minor: libc::minor(meta.rdev()).into(),
                });
            }
            let xattrs = self.xattrs(&full)?;
            if file_type.is_dir() {
                let mut header = self.header(&meta, EntryType::Directory, 0);
                self.append(&mut header, &relative, &xattrs, io::empty(), &full)?;
                if xattrs.opaque {
                    self.append_marker(&relative.join(OPAQUE_MARKER), &meta, &full)?;
                }
                self.walk(&relative, under_opaque || xattrs.opaque)?;
            } else if file_type.is_file() {
                if xattrs.whiteout && meta.len() == 0 {
                    self.whiteout(dir, &name, &meta, under_opaque)?;
                } else {
                    self.file(&relative, &full, &meta, &xattrs)?;
                }
            } else if file_type.is_symlink() {
                let target = fs::read_link(&full).map_err(|source| CaptureError::Io {
                    path: full.clone(),
                    action: "read symlink",
                    source,
                })?;
                let mut header = self.header(&meta, EntryType::Symlink, 0);
                self.append_pax(&xattrs, &full)?;
                self.tar
                    .append_link(&mut header, &relative, &target)
                    .map_err(|source| archive_error(&full, source))?;
                self.entries += 1;
            } else if file_type.is_fifo() {
                let mut header = self.header(&meta, EntryType::Fifo, 0);
                self.append(&mut header, &relative, &xattrs, io::empty(), &full)?;
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        relative: &Path,
        full: &Path,
        meta: &Metadata,
        xattrs: &Xattrs,
    ) -> Result<(), CaptureError> {
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key).cloned() {
                let mut header = self.header(meta, EntryType::Link, 0);
                self.append_pax(xattrs, full)?;
                self.tar
                    .append_link(&mut header, relative, &first)
                    .map_err(|source| archive_error(full, source))?;
                self.entries += 1;
                return Ok(());
            }
            self.links.insert(key, relative.to_owned());
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(full)
            .map_err(|source| CaptureError::Io {
                path: full.to_owned(),
                action: "open file",
                source,
            })?;
        let mut header = self.header(meta, EntryType::Regular, meta.len());
        let data = ExactReader::new(file, meta.len());
        self.append(&mut header, relative, xattrs, data, full)
    }

    /// Emits `.wh.NAME` in `dir` if NAME shows in the lower layers.
    fn whiteout(
        &mut self,
        dir: &Path,
        name: &OsStr,
        meta: &Metadata,
        under_opaque: bool,
    ) -> Result<(), CaptureError> {
        let hidden = dir.join(name);
        if under_opaque || !self.exists_below(&hidden)? {
            return Ok(());
        }
        let mut marker = OsString::from(WHITEOUT_PREFIX);
        marker.push(name);
        self.append_marker(&dir.join(marker), meta, &self.upper.join(&hidden))
    }

    /// Emits an empty regular file carrying a whiteout name (`.wh.NAME` or the opaque marker).
    fn append_marker(
        &mut self,
        relative: &Path,
        meta: &Metadata,
        full: &Path,
    ) -> Result<(), CaptureError> {
        let mut header = self.header(meta, EntryType::Regular, 0);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        let no_xattrs = Xattrs {
            exported: Vec::new(),
            opaque: false,
            whiteout: false,
        };
        self.append(&mut header, relative, &no_xattrs, io::empty(), full)
    }

    /// Whether `relative` is visible in the stack of lower layers: the topmost layer that says
    /// anything about it decides (a whiteout or a non-directory ancestor hides it, an opaque
    /// ancestor hides everything further down).
    fn exists_below(&self, relative: &Path) -> Result<bool, CaptureError> {
        let components: Vec<&OsStr> = relative.iter().collect();
        for lower in self.lowers.iter().rev() {
            let mut path = lower.clone();
            let mut opaque_ancestor = false;
            for (i, component) in components.iter().enumerate() {
                path.push(component);
                let meta = match fs::symlink_metadata(&path) {
                    Ok(meta) => meta,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(source) => {
                        return Err(CaptureError::Io {
                            path,
                            action: "inspect lower layer path",
                            source,
                        });
                    }
                };
                if meta.file_type().is_char_device() && meta.rdev() == 0 {
                    return Ok(false);
                }
                if i + 1 == components.len() {
                    return Ok(true);
                }
                if !meta.is_dir() {
                    return Ok(false);
                }
                if self.is_opaque_lower(&path)? {
                    opaque_ancestor = true;
                }
            }
            if opaque_ancestor {
                return Ok(false);
            }
        }
        Ok(false)
    }

    fn is_opaque_lower(&self, path: &Path) -> Result<bool, CaptureError> {
        for prefix in OVERLAY_XATTR_PREFIXES {
            let value =
                xattr::get(path, format!("{prefix}opaque")).map_err(|source| CaptureError::Io {
                    path: path.to_owned(),
                    action: "read extended attributes of",
                    source,
                })?;
            if value.as_deref() == Some(b"y") {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn metadata(&self, path: &Path) -> Result<Metadata, CaptureError> {
        fs::symlink_metadata(path).map_err(|source| CaptureError::Io {
            path: path.to_owned(),
            action: "inspect",
            source,
        })
    }

    /// Reads the xattrs of an upper path without following it.
    fn xattrs(&self, path: &Path) -> Result<Xattrs, CaptureError> {
        let read_error = |source| CaptureError::Io {
            path: path.to_owned(),
            action: "read extended attributes of",
            source,
        };
        let mut xattrs = Xattrs {
            exported: Vec::new(),
            opaque: false,
            whiteout: false,
        };
        for name in xattr::list(path).map_err(read_error)? {
            let Some(name) = name.to_str() else {
                return Err(CaptureError::XattrName {
                    path: path.to_owned(),
                });
            };
            let Some(value) = xattr::get(path, name).map_err(read_error)? else {
                continue;
            };
            if let Some(feature) = OVERLAY_XATTR_PREFIXES
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
            {
                if UNSUPPORTED_OVERLAY_XATTRS.contains(&feature) {
                    return Err(CaptureError::OverlayFeature {
                        path: path.to_owned(),
                        xattr: name.to_owned(),
                    });
                }
                match feature {
                    "opaque" => xattrs.opaque |= value == b"y",
                    "whiteout" => xattrs.whiteout = true,
                    _ => {}
                }
                continue;
            }
            xattrs.exported.push((name.to_owned(), value));
        }
        xattrs.exported.sort();
        Ok(xattrs)
    }

    /// A header with the path's owner, permissions (set-id and sticky bits included) and
    /// clamped mtime; no user or group names.
    fn header(&self, meta: &Metadata, kind: EntryType, size: u64) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0).min(self.mtime));
        header.set_size(size);
        header
    }

    fn append_pax(&mut self, xattrs: &Xattrs, full: &Path) -> Result<(), CaptureError> {
        if xattrs.exported.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = xattrs
            .exported
            .iter()
            .map(|(name, _)| format!("SCHILY.xattr.{name}"))
            .collect();
        let records = keys
            .iter()
            .zip(&xattrs.exported)
            .map(|(key, (_, value))| (key.as_str(), value.as_slice()));
        self.tar
            .append_pax_extensions(records)
            .map_err(|source| archive_error(full, source))
    }

    fn append(
        &mut self,
        header: &mut Header,
        relative: &Path,
        xattrs: &Xattrs,
        data: impl Read,
        full: &Path,
    ) -> Result<(), CaptureError> {
        self.append_pax(xattrs, full)?;
        self.tar
            .append_data(header, relative, data)
            .map_err(|source| archive_error(full, source))?;
        self.entries += 1;
        Ok(())
    }
}

fn archive_error(path: &Path, source: io::Error) -> CaptureError {
    CaptureError::Io {
        path: path.to_owned(),
        action: "archive",
        source,
    }
}

/// Reads exactly `len` bytes of a file whose size was taken from its metadata: a file that
/// shrank meanwhile is an error (the tar header already promised `len` bytes), one that grew
/// is cut at `len`.
pub(crate) struct ExactReader<R> {
    inner: io::Take<R>,
    remaining: u64,
}

impl<R: Read> ExactReader<R> {
    pub(crate) fn new(inner: R, len: u64) -> Self {
        ExactReader {
            inner: inner.take(len),
            remaining: len,
        }
    }
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was archived",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A writer that hashes (sha256) and counts everything written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// `sha256:<hex>`, the byte count and the inner writer.
    fn finish(self) -> (String, u64, W) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (digest, self.bytes, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_paths_are_normalised() {
        assert_eq!(
            normalize_exclude(Path::new("/run/secrets/")).unwrap(),
            Path::new("run/secrets")
        );
        assert_eq!(
            normalize_exclude(Path::new("./cache")).unwrap(),
            Path::new("cache")
        );
        assert!(matches!(
            normalize_exclude(Path::new("a/../../etc")),
            Err(CaptureError::Exclude { .. })
        ));
    }

    #[test]
    fn exact_reader_refuses_a_file_that_shrank() {
        let mut out = Vec::new();
        ExactReader::new(&b"abcdef"[..], 4)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abcd");
        let err = ExactReader::new(&b"ab"[..], 4)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn hashing_writer_hashes_what_passes() {
        let mut writer = HashingWriter::new(Vec::new());
        writer.write_all(b"").unwrap();
        let (digest, bytes, inner) = writer.finish();
        assert_eq!(
            digest,
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(bytes, 0);
        assert!(inner.is_empty());
    }
}
