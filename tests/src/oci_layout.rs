//! OCI image layouts built inside a test, with tar layers written byte by byte, so that a test
//! can hand the runtime entries no well-behaved tar library would write (`../escape`, links out
//! of the layer).

use std::path::Path;

use lull_runtime::digest::Digest;

/// An uncompressed tar stream written header by header (ustar), names taken verbatim.
#[derive(Default)]
pub struct RawTar {
    bytes: Vec<u8>,
}

const BLOCK: usize = 512;

fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    field[..width].copy_from_slice(&text.as_bytes()[text.len() - width..]);
    field[width] = 0;
}

impl RawTar {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &[u8], kind: u8, mode: u32, link: &[u8], content: &[u8]) {
        assert!(name.len() <= 100 && link.len() <= 100, "names fit ustar");
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], content.len() as u64);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let text = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(text.as_bytes());
        self.bytes.extend_from_slice(&h);
        self.bytes.extend_from_slice(content);
        let pad = (BLOCK - content.len() % BLOCK) % BLOCK;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn dir(mut self, name: &str) -> Self {
        self.entry(name.as_bytes(), b'5', 0o755, b"", b"");
        self
    }

    pub fn file(mut self, name: &str, content: &[u8]) -> Self {
        self.entry(name.as_bytes(), b'0', 0o644, b"", content);
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), b'2', 0o777, target.as_bytes(), b"");
        self
    }

    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.entry(name.as_bytes(), b'1', 0o644, target.as_bytes(), b"");
        self
    }

    /// The tar stream with its two end-of-archive blocks.
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&[0u8; 2 * BLOCK]);
        self.bytes
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> std::io::Result<(Digest, usize)> {
    let digest = Digest::of_bytes(bytes);
    std::fs::write(dir.join("blobs/sha256").join(digest.hex()), bytes)?;
    Ok((digest, bytes.len()))
}

/// Writes an OCI image layout at `dir` holding one linux/amd64 image, tagged `latest`, whose
/// layers are the given uncompressed tars (lowest first) and whose command is `cmd`. Returns the
/// manifest digest.
pub fn write_layout(dir: &Path, layers: &[Vec<u8>], cmd: &[&str]) -> std::io::Result<Digest> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        let (digest, size) = put_blob(dir, tar)?;
        diff_ids.push(digest.to_string());
        layer_descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest.to_string(),
            "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let (config_digest, config_size) = put_blob(dir, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config_size,
        },
        "layers": layer_descriptors,
    });
    let (manifest_digest, manifest_size) = put_blob(dir, manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest.to_string(),
            "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": "latest" },
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string())?;
    Ok(manifest_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_a_valid_checksum_and_verbatim_names() {
        let tar = RawTar::new().file("../escape", b"x").finish();
        assert_eq!(tar.len(), 4 * BLOCK);
        assert_eq!(&tar[..9], b"../escape");
        let mut header = tar[..BLOCK].to_vec();
        let stored =
            u64::from_str_radix(std::str::from_utf8(&header[148..154]).unwrap().trim(), 8).unwrap();
        header[148..156].fill(b' ');
        assert_eq!(stored, header.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(&tar[BLOCK..BLOCK + 1], b"x");
    }
}
