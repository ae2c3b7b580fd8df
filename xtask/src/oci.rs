//! Writes OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/`) with reproducible gzip
//! layers: entries sorted by path, every header field set explicitly (mode, uid/gid, names,
//! mtime clamped to one fixed instant), and digests computed while the bytes are written.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use flate2::Compression;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Every entry's mtime, and the image's `created` time: 2000-01-01T00:00:00Z.
pub const FIXED_MTIME: u64 = 946_684_800;
pub const FIXED_CREATED: &str = "2000-01-01T00:00:00Z";

/// Where an entry's content comes from.
#[derive(Debug, Clone)]
pub enum Content {
    Dir,
    Bytes(Vec<u8>),
    /// A file on the host, copied in full.
    HostFile(PathBuf),
    /// `len` bytes of deterministic pseudo-random (incompressible) data from `seed`.
    Random {
        seed: u64,
        len: u64,
    },
    Symlink(String),
    /// A hard link to the entry at this path, which must come earlier in the layer.
    Hardlink(String),
}

/// One tar entry. `path` is relative to the image root, without a leading `/` or `./`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch; [`FIXED_MTIME`] unless the entry came from elsewhere.
    pub mtime: u64,
    /// Extended attributes (e.g. `security.capability`), written as PAX `SCHILY.xattr.*` records.
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub content: Content,
}

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry::root_owned(path, mode, Content::Dir)
    }

    pub fn file(path: &str, mode: u32, content: Content) -> Entry {
        Entry::root_owned(path, mode, content)
    }

    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::root_owned(path, 0o777, Content::Symlink(target.to_string()))
    }

    fn root_owned(path: &str, mode: u32, content: Content) -> Entry {
        Entry {
            path: path.to_string(),
            mode,
            uid: 0,
            gid: 0,
            mtime: FIXED_MTIME,
            xattrs: Vec::new(),
            content,
        }
    }
}

/// A layer as written: compressed digest and size (the descriptor) and the uncompressed diff_id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub diff_id: String,
    /// A short description for the image history.
    pub created_by: String,
}

/// A content descriptor (media type, digest, size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn to_json(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        })
    }
}

/// The runtime part of an image config (`config` in the OCI image config).
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub exposed_ports: Vec<String>,
    pub user: String,
    pub working_dir: String,
    /// Image labels, in the order given.
    pub labels: Vec<(String, String)>,
}

impl RunConfig {
    fn to_json(&self) -> Value {
        let mut config = serde_json::Map::new();
        if !self.user.is_empty() {
            config.insert("User".into(), json!(self.user));
        }
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, Value> = self
                .exposed_ports
                .iter()
                .map(|p| (p.clone(), json!({})))
                .collect();
            config.insert("ExposedPorts".into(), Value::Object(ports));
        }
        if !self.env.is_empty() {
            config.insert("Env".into(), json!(self.env));
        }
        if !self.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            config.insert("Cmd".into(), json!(self.cmd));
        }
        if !self.working_dir.is_empty() {
            config.insert("WorkingDir".into(), json!(self.working_dir));
        }
        if !self.labels.is_empty() {
            let labels: serde_json::Map<String, Value> = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            config.insert("Labels".into(), Value::Object(labels));
        }
        Value::Object(config)
    }
}

/// Hex SHA-256 of `bytes` as an OCI digest string.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Passes writes through to `inner` while hashing and counting them.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Deterministic pseudo-random bytes (splitmix64), as a reader of a fixed length.
pub struct RandomReader {
    state: u64,
    left: u64,
    pending: [u8; 8],
    pending_len: usize,
}

impl RandomReader {
    pub fn new(seed: u64, len: u64) -> Self {
        RandomReader {
            state: seed,
            left: len,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut n = 0;
        while n < want {
            if self.pending_len == 0 {
                self.pending = self.next_u64().to_le_bytes();
                self.pending_len = 8;
            }
            let start = 8 - self.pending_len;
            let take = self.pending_len.min(want - n);
            buf[n..n + take].copy_from_slice(&self.pending[start..start + take]);
            self.pending_len -= take;
            n += take;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// An OCI image layout directory being written.
pub struct LayoutWriter {
    dir: PathBuf,
    /// Numbers the temporary files of layers being written (layers may be written in parallel).
    next_temp: AtomicU64,
}

impl LayoutWriter {
    /// Creates `dir` (which must not exist yet) with `oci-layout` and an empty blob store.
    pub fn create(dir: &Path) -> Result<LayoutWriter> {
        if dir.exists() {
            bail!("layout directory {} already exists", dir.display());
        }
        fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("create {}", dir.display()))?;
        let layout = LayoutWriter {
            dir: dir.to_path_buf(),
            next_temp: AtomicU64::new(0),
        };
        layout.write_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(layout)
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs/sha256").join(hex)
    }

    fn temp_blob_path(&self) -> PathBuf {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("blobs/sha256/.incoming-{n}"))
    }

    /// Stores `bytes` as a blob and returns its descriptor.
    pub fn add_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path(&digest);
        fs::write(&path, bytes).with_context(|| format!("write blob {}", path.display()))?;
        Ok(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
        })
    }

    /// Writes a gzip-compressed layer holding `entries` (sorted by path here, so parents come
    /// before their children) and returns its digests. Safe to call from several threads.
    pub fn add_layer(
        &self,
        mut entries: Vec<Entry>,
        level: Compression,
        created_by: &str,
    ) -> Result<Layer> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for pair in entries.windows(2) {
            if pair[0].path == pair[1].path {
                bail!("duplicate layer entry {}", pair[0].path);
            }
        }
        self.add_layer_in_order(entries.into_iter().map(Ok), level, created_by)
    }

    /// Writes a gzip-compressed layer from `entries` in the order they come, without holding
    /// them all: the caller keeps parents before children and hard link targets before their
    /// links (a link to a path not yet written is refused). An `Err` item aborts the layer.
    pub fn add_layer_in_order(
        &self,
        entries: impl Iterator<Item = Result<Entry>>,
        level: Compression,
        created_by: &str,
    ) -> Result<Layer> {
        let temp = self.temp_blob_path();
        let file = File::create(&temp).with_context(|| format!("create {}", temp.display()))?;
        let compressed = HashingWriter::new(BufWriter::with_capacity(256 * 1024, file));
        let gz = flate2::GzBuilder::new().mtime(0).write(compressed, level);
        let mut tar = tar::Builder::new(HashingWriter::new(gz));
        tar.mode(tar::HeaderMode::Complete);
        let mut written = std::collections::HashSet::new();
        for entry in entries {
            let entry = entry?;
            if let Content::Hardlink(target) = &entry.content
                && !written.contains(target)
            {
                bail!("hard link {} comes before its target {target}", entry.path);
            }
            append_entry(&mut tar, &entry)
                .with_context(|| format!("add {} to layer", entry.path))?;
            written.insert(entry.path);
        }
        let uncompressed = tar.into_inner().context("finish layer tar")?;
        let (gz, diff_id, _) = uncompressed.finish();
        let compressed = gz.finish().context("finish layer gzip")?;
        let (mut file, digest, size) = compressed.finish();
        file.flush().context("flush layer blob")?;
        drop(file);
        let path = self.blob_path(&digest);
        fs::rename(&temp, &path).with_context(|| format!("rename layer to {}", path.display()))?;
        Ok(Layer {
            digest,
            size,
            diff_id,
            created_by: created_by.to_string(),
        })
    }

    /// Writes the image config and manifest for `layers` and returns the manifest descriptor.
    pub fn add_image(&self, run: &RunConfig, layers: &[Layer]) -> Result<Descriptor> {
        let history: Vec<Value> = layers
            .iter()
            .map(|l| json!({"created": FIXED_CREATED, "created_by": l.created_by}))
            .collect();
        let config = json!({
            "created": FIXED_CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": run.to_json(),
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": history,
        });
        let config = self.add_blob(MEDIA_TYPE_CONFIG, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": config.to_json(),
            "layers": layers.iter().map(|l| Descriptor {
                media_type: MEDIA_TYPE_LAYER_GZIP.to_string(),
                digest: l.digest.clone(),
                size: l.size,
            }.to_json()).collect::<Vec<_>>(),
        });
        self.add_blob(MEDIA_TYPE_MANIFEST, &serde_json::to_vec(&manifest)?)
    }

    /// Writes `index.json` listing `manifests`, each tagged with its ref name.
    pub fn write_index(&self, manifests: &[(Descriptor, &str)]) -> Result<()> {
        let manifests: Vec<Value> = manifests
            .iter()
            .map(|(d, name)| {
                let mut v = d.to_json();
                v["annotations"] = json!({ ANNOTATION_REF_NAME: name });
                v
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": manifests,
        });
        self.write_file("index.json", &serde_json::to_vec(&index)?)
    }
}

/// The digest of the manifest tagged `latest` in a layout's index.json.
pub fn manifest_of(dir: &Path) -> Result<String> {
    let path = dir.join("index.json");
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )
    .with_context(|| format!("parse {}", path.display()))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    for m in manifests {
        if m["annotations"][ANNOTATION_REF_NAME] == "latest"
            && let Some(digest) = m["digest"].as_str()
        {
            let blob = dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"));
            if blob.is_file() {
                return Ok(digest.to_string());
            }
        }
    }
    bail!("{} has no manifest tagged latest", path.display())
}

/// The total size of the files in `dir` (not recursive): a layout's blob store.
pub fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry.with_context(|| format!("read {}", dir.display()))?;
        total += entry.metadata().map(|m| m.len()).unwrap_or(0);
    }
    Ok(total)
}

fn append_entry<W: Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> Result<()> {
    if entry.path.is_empty() || entry.path.starts_with('/') || entry.path.starts_with("./") {
        bail!("entry path must be relative without ./");
    }
    let mut header = tar::Header::new_gnu();
    header.set_mode(entry.mode);
    header.set_uid(entry.uid);
    header.set_gid(entry.gid);
    header.set_mtime(entry.mtime);
    let owner = |id: u64| if id == 0 { "root" } else { "" };
    header.set_username(owner(entry.uid))?;
    header.set_groupname(owner(entry.gid))?;
    if !entry.xattrs.is_empty() {
        let records: Vec<(String, &[u8])> = entry
            .xattrs
            .iter()
            .map(|(name, value)| (format!("SCHILY.xattr.{name}"), value.as_slice()))
            .collect();
        tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))?;
    }
    match &entry.content {
        Content::Dir => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, format!("{}/", entry.path), io::empty())?;
        }
        Content::Bytes(bytes) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(bytes.len() as u64);
            tar.append_data(&mut header, &entry.path, bytes.as_slice())?;
        }
        Content::HostFile(path) => {
            let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
            let len = file
                .metadata()
                .with_context(|| format!("stat {}", path.display()))?
                .len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(len);
            // take(len): a file growing while it is read must not corrupt the archive.
            tar.append_data(&mut header, &entry.path, file.take(len))?;
        }
        Content::Random { seed, len } => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(*len);
            tar.append_data(&mut header, &entry.path, RandomReader::new(*seed, *len))?;
        }
        Content::Symlink(target) => {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, &entry.path, target)?;
        }
        Content::Hardlink(target) => {
            header.set_entry_type(tar::EntryType::Link);
            header.set_size(0);
            tar.append_link(&mut header, &entry.path, target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use flate2::write::GzEncoder;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir()
                .join(format!("xtask-oci-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample_entries() -> Vec<Entry> {
        vec![
            Entry::file(
                "etc/passwd",
                0o644,
                Content::Bytes(b"root:x:0:0::/:/bin/sh\n".to_vec()),
            ),
            Entry::dir("tmp", 0o1777),
            Entry::dir("etc", 0o755),
            Entry::dir("bin", 0o755),
            Entry::symlink("bin/sh", "busybox"),
            Entry {
                path: "home/app".into(),
                mode: 0o700,
                uid: 1000,
                gid: 1000,
                mtime: FIXED_MTIME,
                xattrs: Vec::new(),
                content: Content::Dir,
            },
            Entry::dir("home", 0o755),
            Entry::file(
                "data/r.bin",
                0o600,
                Content::Random {
                    seed: 7,
                    len: 100_003,
                },
            ),
            Entry::dir("data", 0o755),
        ]
    }

    fn read_blob(layout: &Path, digest: &str) -> Vec<u8> {
        fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.strip_prefix("sha256:").unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn layers_are_reproducible_and_digests_match_contents() {
        let tmp = TempDir::new("repro");
        let a = LayoutWriter::create(&tmp.0.join("a")).unwrap();
        let b = LayoutWriter::create(&tmp.0.join("b")).unwrap();
        let la = a
            .add_layer(sample_entries(), Compression::default(), "test")
            .unwrap();
        let mut reversed = sample_entries();
        reversed.reverse();
        let lb = b
            .add_layer(reversed, Compression::default(), "test")
            .unwrap();
        assert_eq!(
            la, lb,
            "same entries in another order must give the same layer"
        );

        let blob = read_blob(a.dir(), &la.digest);
        assert_eq!(sha256_digest(&blob), la.digest);
        assert_eq!(blob.len() as u64, la.size);
        let mut tar_bytes = Vec::new();
        GzDecoder::new(blob.as_slice())
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(sha256_digest(&tar_bytes), la.diff_id);
        let leftovers: Vec<_> = fs::read_dir(a.dir().join("blobs/sha256"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn layer_entries_are_sorted_with_explicit_metadata() {
        let tmp = TempDir::new("meta");
        let layout = LayoutWriter::create(&tmp.0.join("l")).unwrap();
        let layer = layout
            .add_layer(sample_entries(), Compression::fast(), "test")
            .unwrap();
        let blob = read_blob(layout.dir(), &layer.digest);
        let mut archive = tar::Archive::new(GzDecoder::new(blob.as_slice()));
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let h = entry.header().clone();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            assert_eq!(h.mtime().unwrap(), FIXED_MTIME, "{path}");
            match path.as_str() {
                "tmp/" => assert_eq!(h.mode().unwrap(), 0o1777),
                "home/app/" => {
                    assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1000, 1000));
                    assert_eq!(h.mode().unwrap(), 0o700);
                }
                "bin/sh" => {
                    assert_eq!(h.entry_type(), tar::EntryType::Symlink);
                    assert_eq!(
                        entry.link_name().unwrap().unwrap().to_str(),
                        Some("busybox")
                    );
                }
                "data/r.bin" => {
                    let mut data = Vec::new();
                    entry.read_to_end(&mut data).unwrap();
                    let mut expected = Vec::new();
                    RandomReader::new(7, 100_003)
                        .read_to_end(&mut expected)
                        .unwrap();
                    assert_eq!(data, expected);
                }
                "etc/passwd" => {
                    assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
                    assert_eq!(h.username().unwrap(), Some("root"));
                    assert_eq!(h.mode().unwrap(), 0o644);
                }
                _ => {}
            }
            seen.push(path);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), 9);
    }

    #[test]
    fn a_hard_link_before_its_target_is_refused() {
        let tmp = TempDir::new("link");
        let layout = LayoutWriter::create(&tmp.0.join("l")).unwrap();
        let link = Entry::file("bin/a", 0o755, Content::Hardlink("bin/b".into()));
        let target = Entry::file("bin/b", 0o755, Content::Bytes(b"x".to_vec()));
        let err = layout
            .add_layer_in_order(
                [Ok(Entry::dir("bin", 0o755)), Ok(link), Ok(target)].into_iter(),
                Compression::fast(),
                "t",
            )
            .unwrap_err();
        assert!(err.to_string().contains("bin/a"), "{err}");
    }

    #[test]
    fn duplicate_entries_are_refused() {
        let tmp = TempDir::new("dup");
        let layout = LayoutWriter::create(&tmp.0.join("l")).unwrap();
        let entries = vec![Entry::dir("etc", 0o755), Entry::dir("etc", 0o700)];
        let err = layout
            .add_layer(entries, Compression::fast(), "t")
            .unwrap_err();
        assert!(err.to_string().contains("etc"), "{err}");
    }

    #[test]
    fn random_data_is_deterministic_and_incompressible() {
        let mut a = Vec::new();
        RandomReader::new(1, 65_536).read_to_end(&mut a).unwrap();
        let mut b = Vec::new();
        // Odd read sizes must give the same stream.
        let mut reader = RandomReader::new(1, 65_536);
        let mut buf = [0u8; 13];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            b.extend_from_slice(&buf[..n]);
        }
        assert_eq!(a.len(), 65_536);
        assert_eq!(a, b);
        let mut other = Vec::new();
        RandomReader::new(2, 65_536)
            .read_to_end(&mut other)
            .unwrap();
        assert_ne!(a, other);
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(&a).unwrap();
        let compressed = gz.finish().unwrap();
        assert!(
            compressed.len() > 65_000,
            "compressed to {}",
            compressed.len()
        );
    }

    #[test]
    fn index_and_manifest_reference_the_blobs() {
        let tmp = TempDir::new("index");
        let layout = LayoutWriter::create(&tmp.0.join("l")).unwrap();
        let layer = layout
            .add_layer(sample_entries(), Compression::fast(), "test")
            .unwrap();
        let run = RunConfig {
            entrypoint: vec!["/app/x".into()],
            env: vec!["PORT=8080".into()],
            exposed_ports: vec!["8080/tcp".into()],
            user: "app".into(),
            working_dir: "/app".into(),
            ..RunConfig::default()
        };
        let manifest = layout
            .add_image(&run, std::slice::from_ref(&layer))
            .unwrap();
        layout.write_index(&[(manifest.clone(), "latest")]).unwrap();

        let index: Value =
            serde_json::from_slice(&fs::read(layout.dir().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], json!(manifest.digest));
        assert_eq!(
            index["manifests"][0]["annotations"][ANNOTATION_REF_NAME],
            json!("latest")
        );
        let manifest_bytes = read_blob(layout.dir(), &manifest.digest);
        assert_eq!(manifest_bytes.len() as u64, manifest.size);
        let m: Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(m["layers"][0]["digest"], json!(layer.digest));
        assert_eq!(m["layers"][0]["mediaType"], json!(MEDIA_TYPE_LAYER_GZIP));
        let config_digest = m["config"]["digest"].as_str().unwrap();
        let config: Value =
            serde_json::from_slice(&read_blob(layout.dir(), config_digest)).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], json!(layer.diff_id));
        assert_eq!(config["config"]["User"], json!("app"));
        assert_eq!(config["config"]["ExposedPorts"]["8080/tcp"], json!({}));
        assert_eq!(config["config"]["Entrypoint"], json!(["/app/x"]));
        assert!(config["config"].get("Cmd").is_none());
        let layout_file = fs::read_to_string(layout.dir().join("oci-layout")).unwrap();
        assert!(layout_file.contains("1.0.0"));
    }
}
