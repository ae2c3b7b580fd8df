//! Which decompressor a layer blob needs: chosen by its media type and checked by magic bytes.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::LayerError;

/// The compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// An uncompressed tar stream (`application/vnd.oci.image.layer.v1.tar`, docker-archive).
    None,
    Gzip,
    Zstd,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const BLOB_BUFFER: usize = 256 * 1024;

impl Compression {
    /// The compression a layer media type announces. OCI (including the non-distributable
    /// variants), Docker schema 2 and plain tar media types are understood.
    pub fn from_media_type(media_type: &str) -> Result<Self, LayerError> {
        // Parameters (`; charset=...`) never matter for layers; ignore them.
        let essence = media_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/x-tar"
            | "application/tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Ok(Compression::Zstd)
            }
            _ => Err(LayerError::UnsupportedMediaType(media_type.to_owned())),
        }
    }

    /// The compression the first bytes of a blob reveal; anything that is neither gzip nor
    /// zstd is taken for a plain tar stream.
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "plain tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// Opens `blob`, checks that its magic bytes agree with `media_type`, and returns a streaming
/// reader of the uncompressed tar.
pub(super) fn open_blob(path: &Path, media_type: &str) -> Result<Box<dyn Read>, LayerError> {
    let expected = Compression::from_media_type(media_type)?;
    let blob_error = |source| LayerError::Blob {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(blob_error)?;
    let mut reader = BufReader::with_capacity(BLOB_BUFFER, file);
    let found = Compression::sniff(reader.fill_buf().map_err(blob_error)?);
    if found != expected {
        return Err(LayerError::CompressionMismatch {
            path: path.to_owned(),
            media_type: media_type.to_owned(),
            expected,
            found,
        });
    }
    decompress(reader, expected).map_err(blob_error)
}

/// Wraps `reader` in the decompressor for `compression`.
pub(super) fn decompress<R: BufRead + 'static>(
    reader: R,
    compression: Compression,
) -> std::io::Result<Box<dyn Read>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        // Layers written by Go's gzip may hold several members; read them all, as Go does.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compressions() {
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            ("application/x-tar", Compression::None),
        ];
        for (media_type, compression) in cases {
            assert_eq!(
                Compression::from_media_type(media_type).unwrap(),
                compression,
                "{media_type}"
            );
        }
        assert!(matches!(
            Compression::from_media_type("application/vnd.oci.image.config.v1+json"),
            Err(LayerError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn magic_bytes_are_recognised() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::sniff(b"etc/passwd\0"), Compression::None);
        assert_eq!(Compression::sniff(&[0x1f]), Compression::None);
    }

    #[test]
    fn media_type_and_magic_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, [0u8; 1024]).unwrap();
        let err = open_blob(&blob, "application/vnd.oci.image.layer.v1.tar+gzip")
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                LayerError::CompressionMismatch {
                    expected: Compression::Gzip,
                    found: Compression::None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(open_blob(&blob, "application/vnd.oci.image.layer.v1.tar").is_ok());
    }
}
