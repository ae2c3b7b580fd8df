//! `cargo xtask fixtures`: builds the fixture app as a static binary, writes the OCI image
//! layouts the tests deploy (`fixture-app`, `busybox`, optionally `bulk`) under
//! `target/fixtures/`, a docker-archive of the fixture app, and pushes the images to the local
//! test registry when one answers.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use sha2::{Digest, Sha256};

use crate::oci::{
    Content, Descriptor, Entry, Layer, LayoutWriter, RunConfig, dir_size, manifest_of,
};
use crate::registry::{
    Push, find_in_path, oci_ref, registry_address, registry_reachable, run_skopeo,
};

/// Bump when the image contents or layout code change in a way the input hash cannot see.
const FORMAT_VERSION: &str = "fixtures-v1";
const TARGET_TRIPLE: &str = "x86_64-unknown-linux-gnu";
const BUSYBOX: &str = "/bin/busybox";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Busybox applets linked into the busybox image's /bin (those the binary lacks are left out).
const APPLETS: &[&str] = &[
    "[", "awk", "basename", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "dirname",
    "du", "echo", "env", "false", "find", "free", "grep", "head", "hostname", "id", "ip", "kill",
    "ln", "ls", "mkdir", "mount", "mv", "nc", "netstat", "nproc", "nslookup", "ping", "printf",
    "ps", "pwd", "readlink", "rm", "rmdir", "sed", "seq", "sh", "sleep", "sort", "stat", "tail",
    "tee", "test", "timeout", "top", "touch", "tr", "true", "umount", "uname", "uniq", "vi", "wc",
    "wget", "which", "whoami", "xargs", "yes",
];

/// Data layers of the bulk image: count and size of each (4 × 24 MiB, about 100 MB in all
/// with the fixture app layer).
const BULK_LAYERS: u64 = 4;
const BULK_LAYER_BYTES: u64 = 24 * 1024 * 1024;

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      app:x:1000:1000:app:/app:/sbin/nologin\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n";

#[derive(Debug, clap::Args)]
pub struct FixturesArgs {
    /// Also build and push the ~100 MB `lull/bulk:latest` image for the pull benchmark
    #[arg(long)]
    pub bulk: bool,
}

/// One image layout as produced (or found unchanged) under target/fixtures.
struct BuiltImage {
    name: &'static str,
    dir: PathBuf,
    manifest: String,
    bytes: u64,
    rebuilt: bool,
}

pub fn run(args: &FixturesArgs) -> Result<()> {
    let root = workspace_root();
    let skopeo = check_tools()?;
    let out = root.join("target/fixtures");
    let stamps = out.join(".stamps");
    fs::create_dir_all(&stamps).with_context(|| format!("create {}", stamps.display()))?;

    let binary = build_fixture_app(&root)?;

    let mut images = vec![
        build_image(&out, "fixture-app", &[&binary], || {
            fixture_app_image(&binary)
        })?,
        build_image(&out, "busybox", &[Path::new(BUSYBOX)], busybox_image)?,
    ];
    if args.bulk {
        images.push(build_image(&out, "bulk", &[&binary], || {
            bulk_image(&binary)
        })?);
    }

    let zstd = zstd_layout(&skopeo, &images[0], &out)?;

    let archive = out.join("fixture-app.docker.tar");
    let archive_rebuilt = write_docker_archive(&skopeo, &images[0], &archive, &stamps)?;

    let registry = registry_address();
    let mut pushes = vec![
        push_of(&images[0], "lull/fixture-app:latest", "gzip"),
        push_of(&zstd, "lull/fixture-app:zstd", "zstd"),
        push_of(&images[1], "lull/busybox:latest", "gzip"),
    ];
    if let Some(bulk) = images.get(2) {
        pushes.push(push_of(bulk, "lull/bulk:latest", "gzip"));
    }
    let pushed = match registry_reachable(&registry) {
        Ok(()) => {
            let mut results = Vec::new();
            for push in &pushes {
                results.push(push.run(&skopeo, &registry, &stamps)?);
            }
            Some(results)
        }
        Err(why) => {
            println!("registry {registry} not reachable ({why}): images not pushed");
            None
        }
    };

    println!("fixture binary: {}", rel(&root, &binary));
    for image in images.iter().chain([&zstd]) {
        println!(
            "{:<16} oci layout {}:latest  {}  {:.1} MB  {}",
            image.name,
            rel(&root, &image.dir),
            image.manifest,
            image.bytes as f64 / 1e6,
            if image.rebuilt {
                "written"
            } else {
                "unchanged"
            }
        );
    }
    println!(
        "docker archive {} (lull/fixture-app:latest)  {}",
        rel(&root, &archive),
        if archive_rebuilt {
            "written"
        } else {
            "unchanged"
        }
    );
    if let Some(results) = pushed {
        for (push, result) in pushes.iter().zip(results) {
            println!(
                "registry {registry}/{}  {}  {}",
                push.reference,
                result.digest,
                if result.pushed {
                    "pushed"
                } else {
                    "up to date"
                }
            );
        }
    }
    Ok(())
}

/// Pushing a fixture layout: skopeo enforces the layer compression (the registry's manifest
/// digest may then differ from the layout's).
fn push_of<'a>(image: &'a BuiltImage, reference: &str, compression: &'static str) -> Push<'a> {
    Push {
        dir: &image.dir,
        manifest: &image.manifest,
        reference: reference.to_string(),
        compression,
        preserve_digests: false,
    }
}

pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Checks every external tool before doing any work; returns the skopeo path.
fn check_tools() -> Result<PathBuf> {
    let mut missing = Vec::new();
    let skopeo = find_in_path("skopeo");
    if skopeo.is_none() {
        missing.push("skopeo not found in PATH: install the Debian package skopeo".to_string());
    }
    match fs::read(BUSYBOX) {
        Ok(bytes) => match elf_is_static(&bytes) {
            Ok(true) => {}
            Ok(false) => missing.push(format!(
                "{BUSYBOX} is dynamically linked: install the Debian package busybox-static"
            )),
            Err(e) => missing.push(format!("{BUSYBOX}: {e}")),
        },
        Err(_) => missing.push(format!(
            "{BUSYBOX} not found: install the Debian package busybox-static"
        )),
    }
    match skopeo {
        Some(path) if missing.is_empty() => Ok(path),
        _ => bail!("missing tools:\n  {}", missing.join("\n  ")),
    }
}

/// Whether an ELF executable has no program interpreter (PT_INTERP), i.e. is statically linked.
fn elf_is_static(bytes: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |off: usize| u16::from_le_bytes([bytes[off], bytes[off + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into()?) as usize;
    let phentsize = u16_at(0x36);
    let phnum = u16_at(0x38);
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let Some(p_type) = bytes.get(off..off + 4) else {
            bail!("truncated ELF program header table");
        };
        if u32::from_le_bytes(p_type.try_into()?) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Builds the fixture app statically into its own target dir (so the workspace's normal build
/// is not invalidated) and returns the binary's path.
fn build_fixture_app(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = root.join("target/static");
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "-p",
            "lull-fixture-app",
            "--release",
            "--target",
        ])
        .arg(TARGET_TRIPLE)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("run cargo build for lull-fixture-app")?;
    if !status.success() {
        bail!("cargo build of lull-fixture-app failed: {status}");
    }
    let binary = target_dir
        .join(TARGET_TRIPLE)
        .join("release/lull-fixture-app");
    let bytes = fs::read(&binary).with_context(|| format!("read {}", binary.display()))?;
    if !elf_is_static(&bytes).with_context(|| format!("inspect {}", binary.display()))? {
        bail!("{} is not statically linked", binary.display());
    }
    Ok(binary)
}

/// What goes into an image: its layers' entries and its run config.
struct ImageSpec {
    layers: Vec<(Vec<Entry>, Compression, String)>,
    run: RunConfig,
}

fn base_etc() -> Vec<Entry> {
    vec![
        Entry::dir("etc", 0o755),
        Entry::file("etc/passwd", 0o644, Content::Bytes(PASSWD.into())),
        Entry::file("etc/group", 0o644, Content::Bytes(GROUP.into())),
        Entry::dir("tmp", 0o1777),
    ]
}

fn fixture_app_entries(binary: &Path) -> Vec<Entry> {
    let mut entries = base_etc();
    entries.push(Entry::dir("app", 0o755));
    entries.push(Entry::file(
        "app/fixture-app",
        0o755,
        Content::HostFile(binary.to_path_buf()),
    ));
    entries
}

fn fixture_app_run() -> RunConfig {
    RunConfig {
        entrypoint: vec!["/app/fixture-app".into()],
        env: vec![PATH_ENV.into(), "PORT=8080".into()],
        exposed_ports: vec!["8080/tcp".into()],
        user: "app".into(),
        working_dir: "/app".into(),
        ..RunConfig::default()
    }
}

fn fixture_app_image(binary: &Path) -> Result<ImageSpec> {
    Ok(ImageSpec {
        layers: vec![(
            fixture_app_entries(binary),
            Compression::default(),
            "lull fixture app".into(),
        )],
        run: fixture_app_run(),
    })
}

fn busybox_image() -> Result<ImageSpec> {
    let output = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("run {BUSYBOX} --list"))?;
    let available = String::from_utf8_lossy(&output.stdout).into_owned();
    let available: Vec<&str> = available.lines().collect();
    let mut entries = base_etc();
    entries.push(Entry::dir("root", 0o700));
    entries.push(Entry::dir("bin", 0o755));
    entries.push(Entry::file(
        "bin/busybox",
        0o755,
        Content::HostFile(BUSYBOX.into()),
    ));
    for applet in APPLETS {
        if available.contains(applet) {
            entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
        }
    }
    if !available.contains(&"sh") {
        bail!("{BUSYBOX} has no sh applet");
    }
    Ok(ImageSpec {
        layers: vec![(entries, Compression::default(), "busybox".into())],
        run: RunConfig {
            cmd: vec!["sh".into()],
            env: vec![PATH_ENV.into()],
            ..RunConfig::default()
        },
    })
}

fn bulk_image(binary: &Path) -> Result<ImageSpec> {
    let mut layers = vec![(
        fixture_app_entries(binary),
        Compression::default(),
        "lull fixture app".to_string(),
    )];
    for i in 0..BULK_LAYERS {
        let entries = vec![
            Entry::dir("data", 0o755),
            Entry::file(
                &format!("data/bulk-{i}.bin"),
                0o644,
                Content::Random {
                    seed: 0x6c75_6c6c_0000_0000 + i,
                    len: BULK_LAYER_BYTES,
                },
            ),
        ];
        // The data does not compress: stored deflate blocks, which is also what gzip itself
        // falls back to for such data, at a fraction of the time.
        layers.push((entries, Compression::none(), format!("bulk data {i}")));
    }
    Ok(ImageSpec {
        layers,
        run: fixture_app_run(),
    })
}

/// Feeds a file's identity (path, size, modification time) to `hasher`: cheap, and it changes
/// whenever cargo or a package upgrade rewrites the file.
fn hash_file_identity(hasher: &mut Sha256, path: &Path) -> Result<()> {
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update(meta.len().to_le_bytes());
    hasher.update(mtime.to_le_bytes());
    Ok(())
}

/// Writes the layout `out/<name>` from `spec` unless the stamp shows the same inputs were
/// already written; layouts are replaced whole (written aside, then renamed into place).
fn build_image(
    out: &Path,
    name: &'static str,
    inputs: &[&Path],
    spec: impl FnOnce() -> Result<ImageSpec>,
) -> Result<BuiltImage> {
    let dir = out.join(name);
    let stamp = out.join(".stamps").join(name);
    let mut hasher = Sha256::new();
    hasher.update(FORMAT_VERSION.as_bytes());
    hasher.update(name.as_bytes());
    // The xtask binary itself: a change to the image code invalidates the layouts.
    if let Ok(exe) = std::env::current_exe() {
        hash_file_identity(&mut hasher, &exe)?;
    }
    for input in inputs {
        hash_file_identity(&mut hasher, input)?;
    }
    let key = hex::encode(hasher.finalize());

    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key)
        && let Ok(manifest) = manifest_of(&dir)
    {
        return Ok(BuiltImage {
            name,
            bytes: dir_size(&dir.join("blobs/sha256"))?,
            dir,
            manifest,
            rebuilt: false,
        });
    }

    let spec = spec()?;
    let temp = out.join(format!(".{name}.tmp"));
    if temp.exists() {
        fs::remove_dir_all(&temp).with_context(|| format!("remove {}", temp.display()))?;
    }
    let layout = LayoutWriter::create(&temp)?;
    // One thread per layer: the bulk image's data layers take seconds each to hash.
    let layers: Vec<Layer> = std::thread::scope(|scope| {
        let handles: Vec<_> = spec
            .layers
            .into_iter()
            .map(|(entries, level, created_by)| {
                let layout = &layout;
                scope.spawn(move || layout.add_layer(entries, level, &created_by))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("layer thread panicked")))
            })
            .collect::<Result<Vec<Layer>>>()
    })?;
    let manifest: Descriptor = layout.add_image(&spec.run, &layers)?;
    layout.write_index(&[(manifest.clone(), "latest")])?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    fs::rename(&temp, &dir).with_context(|| format!("rename layout to {}", dir.display()))?;
    fs::write(&stamp, &key).with_context(|| format!("write {}", stamp.display()))?;
    Ok(BuiltImage {
        name,
        bytes: dir_size(&dir.join("blobs/sha256"))?,
        dir,
        manifest: manifest.digest,
        rebuilt: true,
    })
}

/// Recompresses the fixture app layout's layers with zstd into `out/fixture-app-zstd` (skopeo,
/// layout to layout). Recompressing while pushing does not work: skopeo reuses the gzip blob the
/// registry already holds.
fn zstd_layout(skopeo: &Path, source: &BuiltImage, out: &Path) -> Result<BuiltImage> {
    let name = "fixture-app-zstd";
    let dir = out.join(name);
    let stamp = out.join(".stamps").join(name);
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == source.manifest)
        && let Ok(manifest) = manifest_of(&dir)
    {
        return Ok(BuiltImage {
            name,
            bytes: dir_size(&dir.join("blobs/sha256"))?,
            dir,
            manifest,
            rebuilt: false,
        });
    }
    let temp = out.join(format!(".{name}.tmp"));
    if temp.exists() {
        fs::remove_dir_all(&temp).with_context(|| format!("remove {}", temp.display()))?;
    }
    let dest = format!("oci:{}:latest", temp.display());
    run_skopeo(
        skopeo,
        &[
            "copy",
            "--quiet",
            "--dest-compress-format",
            "zstd",
            &oci_ref(&source.dir)?,
            &dest,
        ],
        "recompress fixture-app with zstd",
    )?;
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    fs::rename(&temp, &dir).with_context(|| format!("rename layout to {}", dir.display()))?;
    fs::write(&stamp, &source.manifest).with_context(|| format!("write {}", stamp.display()))?;
    Ok(BuiltImage {
        name,
        bytes: dir_size(&dir.join("blobs/sha256"))?,
        manifest: manifest_of(&dir)?,
        dir,
        rebuilt: true,
    })
}

/// Writes the fixture app as a docker-archive (for `docker load`-style imports). Returns
/// whether it was (re)written.
fn write_docker_archive(
    skopeo: &Path,
    image: &BuiltImage,
    archive: &Path,
    stamps: &Path,
) -> Result<bool> {
    let stamp = stamps.join("docker-archive");
    if archive.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == image.manifest) {
        return Ok(false);
    }
    let temp = archive.with_extension("tar.tmp");
    if temp.exists() {
        fs::remove_file(&temp).with_context(|| format!("remove {}", temp.display()))?;
    }
    let dest = format!("docker-archive:{}:lull/fixture-app:latest", temp.display());
    run_skopeo(
        skopeo,
        &["copy", "--quiet", &oci_ref(&image.dir)?, &dest],
        "write docker archive",
    )?;
    fs::rename(&temp, archive).with_context(|| format!("rename to {}", archive.display()))?;
    fs::write(&stamp, &image.manifest).with_context(|| format!("write {}", stamp.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_program_headers(types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56 * types.len()];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let off = 64 + 56 * i;
            bytes[off..off + 4].copy_from_slice(&t.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn static_elf_detection() {
        // PT_PHDR, PT_INTERP, PT_LOAD: dynamic.
        assert!(!elf_is_static(&elf_with_program_headers(&[6, 3, 1])).unwrap());
        // PT_LOAD, PT_DYNAMIC (static-pie has one), PT_TLS: static.
        assert!(elf_is_static(&elf_with_program_headers(&[1, 2, 7])).unwrap());
        assert!(elf_is_static(b"#!/bin/sh\n").is_err());
        let mut truncated = elf_with_program_headers(&[1, 1]);
        truncated.truncate(64 + 56);
        assert!(elf_is_static(&truncated).is_err());
    }

    #[test]
    fn this_test_binary_is_dynamic() {
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!elf_is_static(&exe).unwrap());
    }

    #[test]
    fn fixture_app_image_spec() {
        let spec = fixture_app_image(Path::new("fixture-app")).unwrap();
        assert_eq!(spec.layers.len(), 1);
        let paths: Vec<&str> = spec.layers[0].0.iter().map(|e| e.path.as_str()).collect();
        for want in ["app/fixture-app", "etc/passwd", "etc/group", "tmp"] {
            assert!(paths.contains(&want), "missing {want}");
        }
        let tmp = spec.layers[0].0.iter().find(|e| e.path == "tmp").unwrap();
        assert_eq!(tmp.mode, 0o1777);
        assert!(PASSWD.contains("app:x:1000:1000:"));
        assert!(GROUP.contains("app:x:1000:"));
        assert_eq!(spec.run.user, "app");
        assert_eq!(spec.run.entrypoint, ["/app/fixture-app"]);
        assert!(spec.run.env.iter().any(|e| e == "PORT=8080"));
    }

    #[test]
    fn bulk_image_is_about_100_mb() {
        let spec = bulk_image(Path::new("fixture-app")).unwrap();
        let data: u64 = spec
            .layers
            .iter()
            .flat_map(|(entries, _, _)| entries)
            .map(|e| match e.content {
                Content::Random { len, .. } => len,
                _ => 0,
            })
            .sum();
        assert!((90_000_000..110_000_000).contains(&data), "{data}");
        // Distinct seeds: identical layers would be deduplicated by the registry.
        let mut seeds: Vec<u64> = spec
            .layers
            .iter()
            .flat_map(|(entries, _, _)| entries)
            .filter_map(|e| match e.content {
                Content::Random { seed, .. } => Some(seed),
                _ => None,
            })
            .collect();
        seeds.dedup();
        assert_eq!(seeds.len() as u64, BULK_LAYERS);
    }
}
