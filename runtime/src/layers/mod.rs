//! Secure layer unpacking and the cache of unpacked layers.
//!
//! Each image layer is unpacked once into `<root>/<diff_id hex>/`, a directory laid out as an
//! overlayfs lowerdir: whiteouts are char devices 0/0, opaque directories carry the
//! `trusted.overlay.opaque=y` xattr. Instances stack these directories read-only.
//!
//! Layers come from registries and users, so the unpacker treats every archive as hostile:
//!
//! - it iterates tar entries itself (never `tar::Archive::unpack`) and resolves every path with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` on a descriptor of the layer directory,
//!   so neither `..` nor a symlink planted by an earlier entry can reach outside it; the final
//!   component is always created relative to the resolved parent descriptor, never followed;
//! - `..` components are refused outright, leading `/` and `./` are stripped;
//! - devices are refused (the only char devices written are the whiteouts it makes itself),
//!   hardlinks must point at something already unpacked in the same layer;
//! - uncompressed bytes, entries, path and component lengths, and metadata headers are capped
//!   ([`UnpackLimits`]), so a compression bomb is cut off with an error;
//! - the sha256 of the whole uncompressed stream must equal the diff_id;
//! - the layer is unpacked into a temporary directory beside its final place and renamed into
//!   place only once complete and verified: a refused layer leaves nothing behind.

mod cache;
mod compression;
mod sys;
mod unpack;

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

pub use cache::{Ensured, LayerCache};
pub use compression::Compression;
pub use unpack::{UnpackStats, unpack_layer};

/// Caps applied while unpacking one layer. Every field is checked; exceeding one fails the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Uncompressed bytes of the tar stream (headers, padding and data together).
    pub max_uncompressed_bytes: u64,
    /// Tar entries, counting every file, directory, link and whiteout.
    pub max_entries: u64,
    /// Length in bytes of an entry path (after stripping leading `/` and `./`) or a link target.
    pub max_path_len: usize,
    /// Length in bytes of one path component.
    pub max_component_len: usize,
    /// Bytes of PAX and GNU long-name headers read in front of one entry; they are held in
    /// memory, so this bounds what one entry can make the unpacker allocate.
    pub max_metadata_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_uncompressed_bytes: 16 << 30,
            max_entries: 1_000_000,
            max_path_len: 4096,
            max_component_len: 255,
            max_metadata_bytes: 1 << 20,
        }
    }
}

/// Everything that can go wrong while unpacking or managing layers.
///
/// `entry` fields hold the entry path exactly as the archive spells it (lossily decoded), so a
/// refusal can be traced back to the offending member.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error(
        "layer blob {path} starts like a {found} stream but its media type {media_type:?} says {expected}"
    )]
    CompressionMismatch {
        path: PathBuf,
        media_type: String,
        expected: Compression,
        found: Compression,
    },
    #[error("cannot read layer blob {path}")]
    Blob {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the layer stream after entry {after:?}")]
    Stream {
        after: String,
        #[source]
        source: io::Error,
    },
    #[error("layer content has digest {actual}, not the expected diff_id {expected}")]
    DiffIdMismatch { expected: Digest, actual: Digest },
    #[error("layer exceeds the limit of {limit} uncompressed bytes (at entry {entry:?})")]
    TooLarge { limit: u64, entry: String },
    #[error(
        "layer has more than {limit} bytes of PAX or long-name headers in front of one entry (after entry {after:?})"
    )]
    MetadataTooLarge { limit: u64, after: String },
    #[error("layer has more than {limit} entries (refused at entry {entry:?})")]
    TooManyEntries { limit: u64, entry: String },
    #[error("layer entry {entry:?}: path is {len} bytes long, over the limit of {limit}")]
    PathTooLong {
        entry: String,
        len: usize,
        limit: usize,
    },
    #[error("layer entry {entry:?}: path component is {len} bytes long, over the limit of {limit}")]
    ComponentTooLong {
        entry: String,
        len: usize,
        limit: usize,
    },
    #[error("layer entry {entry:?}: path escapes the layer root through `..`")]
    PathEscape { entry: String },
    #[error("layer entry {entry:?} is a {kind} device, which layers may not contain")]
    Device { entry: String, kind: &'static str },
    #[error("layer entry {entry:?} has unsupported tar entry type {kind}")]
    UnsupportedType { entry: String, kind: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} {reason}")]
    HardlinkTarget {
        entry: String,
        target: String,
        reason: &'static str,
    },
    #[error("layer entry {entry:?}: invalid whiteout: {reason}")]
    Whiteout { entry: String, reason: &'static str },
    #[error("layer entry {entry:?}: {reason}")]
    InvalidEntry { entry: String, reason: &'static str },
    #[error("layer entry {entry:?}: cannot {action}")]
    Entry {
        entry: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("layer directory {path}: cannot {action}")]
    Dir {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    /// The archive entry this error concerns, when it concerns one.
    pub fn entry(&self) -> Option<&str> {
        match self {
            LayerError::TooLarge { entry, .. }
            | LayerError::TooManyEntries { entry, .. }
            | LayerError::PathTooLong { entry, .. }
            | LayerError::ComponentTooLong { entry, .. }
            | LayerError::PathEscape { entry }
            | LayerError::Device { entry, .. }
            | LayerError::UnsupportedType { entry, .. }
            | LayerError::HardlinkTarget { entry, .. }
            | LayerError::Whiteout { entry, .. }
            | LayerError::InvalidEntry { entry, .. }
            | LayerError::Entry { entry, .. } => Some(entry),
            _ => None,
        }
    }
}
