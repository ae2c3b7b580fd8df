//! Layer unpacking through the public `LayerCache` API: round trips of every entry kind and
//! compression, a corpus of hostile archives, concurrency and removal. Runs as root (ownership,
//! whiteout devices, `trusted.*` xattrs and inode flags need it), like CI.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use lull_runtime::digest::Digest;
use lull_runtime::layers::{Compression, LayerCache, LayerError, UnpackLimits};
use tar::{EntryType, Header};

const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A tar member described field by field, written with raw headers so that the corpus can hold
/// what `tar::Builder`'s path setters refuse (`..`, absolute paths, devices).
#[derive(Clone)]
struct Member {
    kind: EntryType,
    path: String,
    link: String,
    data: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    pax: Vec<(String, Vec<u8>)>,
    device: (u32, u32),
}

fn member(kind: EntryType, path: &str) -> Member {
    Member {
        kind,
        path: path.to_owned(),
        link: String::new(),
        data: Vec::new(),
        mode: if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        },
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        pax: Vec::new(),
        device: (0, 0),
    }
}

fn file(path: &str, data: &[u8]) -> Member {
    Member {
        data: data.to_vec(),
        ..member(EntryType::Regular, path)
    }
}

fn dir(path: &str) -> Member {
    member(EntryType::Directory, path)
}

fn link(kind: EntryType, path: &str, target: &str) -> Member {
    Member {
        link: target.to_owned(),
        ..member(kind, path)
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "<len> <key>=<value>\n", where <len> counts the whole record including its own digits.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

fn raw_header(kind: EntryType, name: &[u8], link: &[u8], size: u64) -> Header {
    let mut header = Header::new_gnu();
    {
        let old = header.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        let n = link.len().min(100);
        old.linkname[..n].copy_from_slice(&link[..n]);
    }
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn append(builder: &mut tar::Builder<Vec<u8>>, m: &Member) {
    if m.path.len() > 100 {
        let mut long = m.path.clone().into_bytes();
        long.push(0);
        let mut header = raw_header(
            EntryType::GNULongName,
            b"././@LongLink",
            b"",
            long.len() as u64,
        );
        header.set_cksum();
        builder.append(&header, &long[..]).unwrap();
    }
    if !m.pax.is_empty() {
        let records: Vec<u8> = m.pax.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
        let mut header = raw_header(
            EntryType::XHeader,
            b"PaxHeaders/entry",
            b"",
            records.len() as u64,
        );
        header.set_cksum();
        builder.append(&header, &records[..]).unwrap();
    }
    let mut header = raw_header(
        m.kind,
        m.path.as_bytes(),
        m.link.as_bytes(),
        m.data.len() as u64,
    );
    header.set_mode(m.mode);
    header.set_uid(m.uid);
    header.set_gid(m.gid);
    header.set_mtime(m.mtime);
    header.set_device_major(m.device.0).unwrap();
    header.set_device_minor(m.device.1).unwrap();
    header.set_cksum();
    builder.append(&header, &m.data[..]).unwrap();
}

fn tar_of(members: &[Member]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for m in members {
        append(&mut builder, m);
    }
    builder.into_inner().unwrap()
}

fn compress(tar: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(tar).unwrap();
            encoder.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 1).unwrap(),
    }
}

/// A test's private world: `outer/` holds a sentinel file and the cache root `outer/layers`,
/// so that anything escaping the layer directory shows up in `outer`'s listing.
struct World {
    _tmp: tempfile::TempDir,
    outer: PathBuf,
    blobs: PathBuf,
    cache: LayerCache,
}

impl World {
    fn new(limits: UnpackLimits) -> World {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("lull-layers-{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let outer = tmp.path().join("outer");
        let blobs = tmp.path().join("blobs");
        fs::create_dir_all(&outer).unwrap();
        fs::create_dir_all(&blobs).unwrap();
        fs::write(outer.join("sentinel"), b"untouched").unwrap();
        let cache = LayerCache::open(outer.join("layers"), limits).unwrap();
        World {
            _tmp: tmp,
            outer,
            blobs,
            cache,
        }
    }

    fn blob(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.blobs.join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    /// Writes `tar` compressed and unpacks it with its true diff_id.
    fn ensure(
        &self,
        tar: &[u8],
        compression: Compression,
        media_type: &str,
    ) -> Result<PathBuf, LayerError> {
        let diff_id = Digest::of_bytes(tar);
        let blob = self.blob(&diff_id.hex()[..16], &compress(tar, compression));
        self.cache.ensure(&diff_id, &blob, media_type)
    }

    /// Every path under `outer` except the lock files, which refused layers may leave.
    fn snapshot(&self) -> BTreeSet<PathBuf> {
        let mut paths = BTreeSet::new();
        let mut stack = vec![self.outer.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(&self.outer).unwrap().to_owned();
                if rel.starts_with("layers/.locks") {
                    continue;
                }
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    stack.push(path.clone());
                }
                paths.insert(rel);
            }
        }
        paths
    }
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 1024];
    // SAFETY: both strings are NUL-terminated and `buf` has `buf.len()` writable bytes.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn set_inode_flags(path: &Path, add: libc::c_int) {
    let file = fs::File::open(path).unwrap();
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through a pointer to a live c_int.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(rc, 0, "get inode flags of {}", path.display());
    flags |= add;
    // SAFETY: FS_IOC_SETFLAGS reads one int through a pointer to a live c_int.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    assert_eq!(rc, 0, "set inode flags of {}", path.display());
}

const FS_IMMUTABLE_FL: libc::c_int = 0x10;
const FS_APPEND_FL: libc::c_int = 0x20;

/// A file capability set granting cap_net_bind_service, effective (vfs_cap_data revision 2).
const NET_BIND_CAP: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn rich_layer() -> Vec<u8> {
    let mut root = dir("./");
    root.mode = 0o755;
    root.mtime = 1_400_000_000;
    let mut app = dir("app/");
    app.mode = 0o750;
    app.uid = 1000;
    app.gid = 1001;
    app.mtime = 1_500_000_000;
    app.pax = vec![
        ("SCHILY.xattr.user.dir".into(), b"d".to_vec()),
        (
            "SCHILY.xattr.trusted.overlay.redirect".into(),
            b"/elsewhere".to_vec(),
        ),
    ];
    let mut suid = file("app/suid", b"#!/bin/sh\necho hi\n");
    suid.mode = 0o4755;
    suid.uid = 1000;
    suid.gid = 1001;
    suid.mtime = 1_600_000_123;
    let mut sgid = file("/app/sgid", b"x");
    sgid.mode = 0o2711;
    sgid.gid = 50;
    let mut capped = file("./app/capped", b"\x7fELF");
    capped.mode = 0o755;
    capped.pax = vec![
        (
            "SCHILY.xattr.security.capability".into(),
            NET_BIND_CAP.to_vec(),
        ),
        ("SCHILY.xattr.user.note".into(), b"hello".to_vec()),
        ("mtime".into(), b"1600000000.5".to_vec()),
    ];
    let mut sticky = dir("tmp/");
    sticky.mode = 0o1777;
    let mut fifo = member(EntryType::Fifo, "app/fifo");
    fifo.mode = 0o640;
    let mut symlink = link(EntryType::Symlink, "app/rel", "suid");
    symlink.mtime = 1_234_567_890;
    symlink.uid = 1000;
    let long_name = format!("app/{}", "n".repeat(150));
    vec![
        root,
        app,
        suid,
        sgid,
        capped,
        sticky,
        fifo,
        symlink,
        link(EntryType::Symlink, "app/abs", "/etc/passwd"),
        link(EntryType::Symlink, "app/up", "../../../../etc/shadow"),
        link(EntryType::Link, "app/hard", "app/suid"),
        link(EntryType::Link, "./app/hard-abs", "/app/suid"),
        file("deep/a/b/c.txt", b"implicit parents"),
        file(&long_name, b"long"),
        dir("old/"),
        file("old/.wh.gone", b""),
        file(".wh.top", b""),
        dir("opq/"),
        file("opq/.wh..wh..opq", b""),
        file("opq/kept", b"new content"),
    ]
    .iter()
    .fold(tar::Builder::new(Vec::new()), |mut b, m| {
        append(&mut b, m);
        b
    })
    .into_inner()
    .unwrap()
}

fn check_rich_layer(layer: &Path) {
    let meta = |p: &str| fs::symlink_metadata(layer.join(p)).unwrap();

    assert_eq!(
        fs::read(layer.join("app/suid")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    let suid = meta("app/suid");
    assert_eq!(suid.mode() & 0o7777, 0o4755, "setuid kept after chown");
    assert_eq!((suid.uid(), suid.gid()), (1000, 1001));
    assert_eq!(suid.mtime(), 1_600_000_123);

    let sgid = meta("app/sgid");
    assert_eq!(sgid.mode() & 0o7777, 0o2711);
    assert_eq!(sgid.gid(), 50);

    let capped = meta("app/capped");
    assert_eq!(
        xattr(&layer.join("app/capped"), "security.capability").unwrap(),
        NET_BIND_CAP
    );
    assert_eq!(
        xattr(&layer.join("app/capped"), "user.note").unwrap(),
        b"hello"
    );
    assert_eq!(
        (capped.mtime(), capped.mtime_nsec()),
        (1_600_000_000, 500_000_000)
    );

    let app = meta("app");
    assert!(app.is_dir());
    assert_eq!(app.mode() & 0o7777, 0o750);
    assert_eq!((app.uid(), app.gid()), (1000, 1001));
    assert_eq!(
        app.mtime(),
        1_500_000_000,
        "directory mtime set after its children"
    );
    assert_eq!(xattr(&layer.join("app"), "user.dir").unwrap(), b"d");
    assert_eq!(
        xattr(&layer.join("app"), "trusted.overlay.redirect"),
        None,
        "overlay xattrs from the layer are dropped"
    );

    let root = fs::symlink_metadata(layer).unwrap();
    assert_eq!(root.mode() & 0o7777, 0o755);
    assert_eq!(root.mtime(), 1_400_000_000);

    assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);

    let fifo = meta("app/fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o640);

    let symlink = meta("app/rel");
    assert!(symlink.file_type().is_symlink());
    assert_eq!(symlink.uid(), 1000);
    assert_eq!(symlink.mtime(), 1_234_567_890);
    assert_eq!(
        fs::read_link(layer.join("app/rel")).unwrap(),
        Path::new("suid")
    );
    assert_eq!(
        fs::read_link(layer.join("app/abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read_link(layer.join("app/up")).unwrap(),
        Path::new("../../../../etc/shadow")
    );

    assert_eq!(meta("app/hard").ino(), suid.ino());
    assert_eq!(meta("app/hard-abs").ino(), suid.ino());
    assert_eq!(meta("app/suid").nlink(), 3);

    assert_eq!(
        fs::read(layer.join("deep/a/b/c.txt")).unwrap(),
        b"implicit parents"
    );
    assert_eq!(meta("deep/a").mode() & 0o7777, 0o755);
    assert_eq!(
        fs::read(layer.join(format!("app/{}", "n".repeat(150)))).unwrap(),
        b"long"
    );

    for whiteout in ["old/gone", "top"] {
        let m = meta(whiteout);
        assert!(
            m.file_type().is_char_device(),
            "{whiteout} is a char device"
        );
        assert_eq!(m.rdev(), 0, "{whiteout} is device 0/0");
    }
    assert!(!layer.join("old/.wh.gone").exists());
    assert!(!layer.join(".wh.top").exists());

    assert_eq!(
        xattr(&layer.join("opq"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(!layer.join("opq/.wh..wh..opq").exists());
    assert_eq!(
        fs::read(layer.join("opq/kept")).unwrap(),
        b"new content",
        "opaque marker does not hide siblings"
    );
}

#[test]
fn round_trip_keeps_every_entry_kind_in_each_compression() {
    let tar = rich_layer();
    for (compression, media_type) in [
        (Compression::None, OCI_TAR),
        (Compression::Gzip, DOCKER_GZIP),
        (Compression::Gzip, OCI_GZIP),
        (Compression::Zstd, OCI_ZSTD),
    ] {
        let world = World::new(UnpackLimits::default());
        let layer = world.ensure(&tar, compression, media_type).unwrap();
        let diff_id = Digest::of_bytes(&tar);
        assert_eq!(layer, world.outer.join("layers").join(diff_id.hex()));
        check_rich_layer(&layer);
        assert_eq!(world.cache.path(&diff_id), Some(layer.clone()));
        assert_eq!(world.cache.list(), vec![diff_id.clone()]);
        assert!(world.cache.disk_usage(&diff_id).unwrap() > 0);
        // Idempotent: a second call finds the layer and leaves it as it is.
        let inode = fs::metadata(&layer).unwrap().ino();
        assert_eq!(world.ensure(&tar, compression, media_type).unwrap(), layer);
        assert_eq!(fs::metadata(&layer).unwrap().ino(), inode);
    }
}

#[test]
fn later_entries_replace_earlier_ones() {
    let world = World::new(UnpackLimits::default());
    let tar = tar_of(&[
        dir("x/"),
        file("x/inner", b"1"),
        file("x", b"x is a file now"),
        file("y", b"y"),
        dir("y/"),
        file("y/z", b"z"),
        file("w", b"whited out below"),
        file(".wh.w", b""),
        file("self", b"s"),
        link(EntryType::Link, "self", "self"),
    ]);
    let layer = world.ensure(&tar, Compression::None, OCI_TAR).unwrap();
    assert_eq!(fs::read(layer.join("x")).unwrap(), b"x is a file now");
    assert_eq!(fs::read(layer.join("y/z")).unwrap(), b"z");
    assert!(
        fs::symlink_metadata(layer.join("w"))
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert_eq!(fs::read(layer.join("self")).unwrap(), b"s");
    let names: Vec<_> = fs::read_dir(&layer)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".lull-replaced-")),
        "replaced directories are cleaned up: {names:?}"
    );
}

fn assert_nothing_left(world: &World, before: &BTreeSet<PathBuf>) {
    assert_eq!(
        &world.snapshot(),
        before,
        "nothing was left behind or written outside the layer"
    );
    assert!(world.cache.list().is_empty());
    assert_eq!(
        fs::read(world.outer.join("sentinel")).unwrap(),
        b"untouched"
    );
    for host in [
        "/lull-escape",
        "/lull-evil",
        "/etc/lull-evil",
        "/tmp/lull-escape",
    ] {
        assert!(fs::symlink_metadata(host).is_err(), "{host} must not exist");
    }
}

#[test]
fn wrong_diff_id_is_refused_and_leaves_nothing() {
    let world = World::new(UnpackLimits::default());
    let before = world.snapshot();
    let tar = tar_of(&[file("a", b"a")]);
    let wrong = Digest::of_bytes(b"something else");
    let blob = world.blob("blob", &compress(&tar, Compression::Gzip));
    let err = world.cache.ensure(&wrong, &blob, OCI_GZIP).unwrap_err();
    match err {
        LayerError::DiffIdMismatch { expected, actual } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, Digest::of_bytes(&tar));
        }
        other => panic!("expected a diff_id mismatch, got {other:?}"),
    }
    assert_nothing_left(&world, &before);
}

#[test]
fn bytes_after_the_end_marker_count_towards_the_diff_id() {
    let world = World::new(UnpackLimits::default());
    let mut tar = tar_of(&[file("a", b"a")]);
    let digest_without_padding = Digest::of_bytes(&tar);
    tar.extend_from_slice(&[0u8; 8192]);
    let blob = world.blob("blob", &tar);
    let err = world
        .cache
        .ensure(&digest_without_padding, &blob, OCI_TAR)
        .unwrap_err();
    assert!(matches!(err, LayerError::DiffIdMismatch { .. }), "{err:?}");
    assert!(world.ensure(&tar, Compression::None, OCI_TAR).is_ok());
}

#[test]
fn media_type_must_match_the_magic_bytes() {
    let world = World::new(UnpackLimits::default());
    let before = world.snapshot();
    let tar = tar_of(&[file("a", b"a")]);
    let blob = world.blob("blob", &compress(&tar, Compression::Zstd));
    let err = world
        .cache
        .ensure(&Digest::of_bytes(&tar), &blob, OCI_GZIP)
        .unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::CompressionMismatch {
                expected: Compression::Gzip,
                found: Compression::Zstd,
                ..
            }
        ),
        "{err:?}"
    );
    let err = world
        .cache
        .ensure(&Digest::of_bytes(&tar), &blob, "application/json")
        .unwrap_err();
    assert!(
        matches!(err, LayerError::UnsupportedMediaType(_)),
        "{err:?}"
    );
    assert_nothing_left(&world, &before);
}

/// A gzip stream of `header`, `zero_mib` MiB of zeros and the end-of-archive blocks, built from
/// repeated gzip members so the test never compresses 100 MiB.
fn gzip_bomb(zero_mib: usize) -> Vec<u8> {
    let mut header = raw_header(EntryType::Regular, b"bomb", b"", (zero_mib as u64) << 20);
    header.set_cksum();
    let mut bomb = compress(header.as_bytes(), Compression::Gzip);
    let mib = compress(&vec![0u8; 1 << 20], Compression::Gzip);
    for _ in 0..zero_mib {
        bomb.extend_from_slice(&mib);
    }
    bomb.extend_from_slice(&compress(&[0u8; 1024], Compression::Gzip));
    bomb
}

struct Hostile {
    name: &'static str,
    blob: Vec<u8>,
    media_type: &'static str,
    limits: UnpackLimits,
    /// The entry the error must name.
    entry: String,
    check: fn(&LayerError) -> bool,
}

fn hostile(
    name: &'static str,
    members: &[Member],
    entry: &str,
    check: fn(&LayerError) -> bool,
) -> Hostile {
    Hostile {
        name,
        blob: tar_of(members),
        media_type: OCI_TAR,
        limits: UnpackLimits::default(),
        entry: entry.to_owned(),
        check,
    }
}

fn hostile_corpus() -> Vec<Hostile> {
    let mut block = member(EntryType::Block, "dev/sda");
    block.device = (8, 0);
    let mut chr = member(EntryType::Char, "dev/null");
    chr.device = (1, 3);
    let mut zero_char = member(EntryType::Char, "dev/fake-whiteout");
    zero_char.device = (0, 0);
    let many: Vec<Member> = (0..20).map(|i| file(&format!("f{i}"), b"")).collect();
    let long_path = format!("{}/file", "d".repeat(100)).repeat(50);
    let mut big_pax = file("after-big-pax", b"");
    big_pax.pax = vec![("SCHILY.xattr.user.big".into(), vec![b'x'; 2 << 20])];
    let mut pax_sparse = file("GNUSparseFile.1/data", b"1\n0\n1\n");
    pax_sparse.pax = vec![
        ("GNU.sparse.major".into(), b"1".to_vec()),
        ("GNU.sparse.minor".into(), b"0".to_vec()),
        ("GNU.sparse.name".into(), b"data".to_vec()),
    ];
    vec![
        hostile(
            "PAX sparse file",
            &[pax_sparse],
            "GNUSparseFile.1/data",
            |e| matches!(e, LayerError::UnsupportedType { .. }),
        ),
        hostile(
            "dotdot",
            &[file("../lull-escape", b"x")],
            "../lull-escape",
            |e| matches!(e, LayerError::PathEscape { .. }),
        ),
        hostile(
            "absolute dotdot",
            &[file("/abs/../../lull-escape", b"x")],
            "/abs/../../lull-escape",
            |e| matches!(e, LayerError::PathEscape { .. }),
        ),
        hostile(
            "inner dotdot",
            &[dir("a/"), file("a/../../lull-escape", b"x")],
            "a/../../lull-escape",
            |e| matches!(e, LayerError::PathEscape { .. }),
        ),
        hostile(
            "symlinked dir then dotdot",
            &[
                link(EntryType::Symlink, "up", ".."),
                file("up/../lull-escape", b"x"),
            ],
            "up/../lull-escape",
            |e| matches!(e, LayerError::PathEscape { .. }),
        ),
        hostile(
            "hardlink to host file",
            &[link(EntryType::Link, "lull-evil", "/etc/passwd")],
            "lull-evil",
            |e| matches!(e, LayerError::HardlinkTarget { reason, .. } if reason.contains("does not exist")),
        ),
        hostile(
            "hardlink through symlink to host",
            &[
                link(EntryType::Symlink, "etc-link", "/etc"),
                link(EntryType::Link, "lull-evil", "etc-link/passwd"),
            ],
            "lull-evil",
            |e| matches!(e, LayerError::HardlinkTarget { .. }),
        ),
        hostile(
            "hardlink to outside",
            &[link(EntryType::Link, "lull-evil", "../outside")],
            "lull-evil",
            |e| matches!(e, LayerError::HardlinkTarget { reason, .. } if reason.contains("..")),
        ),
        hostile("block device", &[block], "dev/sda", |e| {
            matches!(e, LayerError::Device { kind: "block", .. })
        }),
        hostile("char device", &[chr], "dev/null", |e| {
            matches!(e, LayerError::Device { kind: "char", .. })
        }),
        hostile(
            "char device 0/0 outside a whiteout",
            &[zero_char],
            "dev/fake-whiteout",
            |e| matches!(e, LayerError::Device { .. }),
        ),
        Hostile {
            name: "gzip bomb",
            blob: gzip_bomb(100),
            media_type: OCI_GZIP,
            limits: UnpackLimits {
                max_uncompressed_bytes: 10 << 20,
                ..UnpackLimits::default()
            },
            entry: "bomb".into(),
            check: |e| matches!(e, LayerError::TooLarge { limit, .. } if *limit == 10 << 20),
        },
        Hostile {
            limits: UnpackLimits {
                max_entries: 10,
                ..UnpackLimits::default()
            },
            ..hostile("too many entries", &many, "f10", |e| {
                matches!(e, LayerError::TooManyEntries { limit: 10, .. })
            })
        },
        hostile(
            "overlong path",
            &[file(&long_path, b"x")],
            &long_path,
            |e| matches!(e, LayerError::PathTooLong { limit: 4096, .. }),
        ),
        hostile(
            "overlong component",
            &[file(&format!("d/{}", "c".repeat(300)), b"x")],
            &format!("d/{}", "c".repeat(300)),
            |e| {
                matches!(
                    e,
                    LayerError::ComponentTooLong {
                        len: 300,
                        limit: 255,
                        ..
                    }
                )
            },
        ),
        hostile(
            "whiteout with content",
            &[file("etc/.wh.passwd", b"not empty")],
            "etc/.wh.passwd",
            |e| matches!(e, LayerError::Whiteout { .. }),
        ),
        hostile(
            "whiteout of dotdot",
            &[file("etc/.wh..", b"")],
            "etc/.wh..",
            |e| matches!(e, LayerError::Whiteout { .. }),
        ),
        hostile(
            "whiteout as a directory",
            &[dir("etc/.wh.passwd/")],
            "etc/.wh.passwd/",
            |e| matches!(e, LayerError::Whiteout { .. }),
        ),
        hostile(
            "write through a dangling symlink",
            &[
                link(EntryType::Symlink, "dangling", "/lull-escape"),
                file("dangling/x", b"x"),
            ],
            "dangling/x",
            |e| matches!(e, LayerError::InvalidEntry { .. }),
        ),
        Hostile {
            limits: UnpackLimits {
                max_metadata_bytes: 1 << 20,
                ..UnpackLimits::default()
            },
            ..hostile(
                "oversized PAX header",
                &[file("first", b"1"), big_pax],
                "first",
                |e| matches!(e, LayerError::MetadataTooLarge { .. }),
            )
        },
    ]
}

#[test]
fn hostile_archives_are_refused_and_leave_nothing() {
    for case in hostile_corpus() {
        let world = World::new(case.limits);
        let before = world.snapshot();
        // The true digest of the uncompressed stream is irrelevant: refusal comes first.
        let diff_id = Digest::of_bytes(case.name.as_bytes());
        let blob = world.blob("blob", &case.blob);
        let err = match world.cache.ensure(&diff_id, &blob, case.media_type) {
            Ok(path) => panic!(
                "{}: unpacked into {} instead of being refused",
                case.name,
                path.display()
            ),
            Err(err) => err,
        };
        assert!(
            (case.check)(&err),
            "{}: unexpected error {err:?}",
            case.name
        );
        let shown = err.to_string();
        assert!(
            shown.contains(&case.entry),
            "{}: error {shown:?} does not name {:?}",
            case.name,
            case.entry
        );
        assert_nothing_left(&world, &before);
    }
}

#[test]
fn writes_through_symlinks_land_inside_the_layer() {
    let world = World::new(UnpackLimits::default());
    let before = world.snapshot();
    let tar = tar_of(&[
        link(EntryType::Symlink, "link", "/"),
        file("link/etc/lull-evil", b"contained"),
        link(EntryType::Symlink, "updir", "../.."),
        file("updir/lull-evil", b"contained too"),
        dir("tmp/"),
        link(EntryType::Symlink, "outer", "/tmp"),
        file("outer/lull-escape", b"contained as well"),
    ]);
    let layer = world.ensure(&tar, Compression::None, OCI_TAR).unwrap();
    assert_eq!(fs::read(layer.join("etc/lull-evil")).unwrap(), b"contained");
    assert_eq!(fs::read(layer.join("lull-evil")).unwrap(), b"contained too");
    assert_eq!(
        fs::read(layer.join("tmp/lull-escape")).unwrap(),
        b"contained as well"
    );
    assert_eq!(fs::read_link(layer.join("link")).unwrap(), Path::new("/"));
    // Outside the layer directory, only the layer directory itself appeared.
    let after = world.snapshot();
    let new: Vec<_> = after.difference(&before).collect();
    let layer_rel = layer.strip_prefix(&world.outer).unwrap();
    assert!(new.iter().all(|p| p.starts_with(layer_rel)), "{new:?}");
    for host in ["/lull-evil", "/etc/lull-evil", "/tmp/lull-escape"] {
        assert!(fs::symlink_metadata(host).is_err(), "{host} must not exist");
    }
}

#[test]
fn concurrent_ensure_unpacks_once() {
    let world = World::new(UnpackLimits::default());
    let members: Vec<Member> = (0..300)
        .map(|i| file(&format!("d{}/f{i}", i % 10), &[b'x'; 4096]))
        .collect();
    let tar = tar_of(&members);
    let diff_id = Digest::of_bytes(&tar);
    let blob = world.blob("blob", &compress(&tar, Compression::Zstd));
    // Two caches on one root stand for two processes: each flock has its own open file.
    let second = LayerCache::open(world.cache.root(), UnpackLimits::default()).unwrap();
    let caches = [&world.cache, &second];
    let barrier = Arc::new(Barrier::new(2));
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = caches
            .iter()
            .map(|cache| {
                let barrier = Arc::clone(&barrier);
                let (diff_id, blob) = (&diff_id, &blob);
                scope.spawn(move || {
                    barrier.wait();
                    cache.ensure_reporting(diff_id, blob, OCI_ZSTD).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0].path, results[1].path);
    let unpacks = results.iter().filter(|r| r.unpacked.is_some()).count();
    assert_eq!(unpacks, 1, "exactly one caller unpacks: {results:?}");
    assert_eq!(
        results.iter().find_map(|r| r.unpacked).unwrap().entries,
        300
    );
    assert_eq!(fs::read_dir(&results[0].path).unwrap().count(), 10);
    assert_eq!(world.cache.list(), vec![diff_id]);
}

#[test]
fn remove_copes_with_protected_entries() {
    let world = World::new(UnpackLimits::default());
    let mut locked = dir("ro/");
    locked.mode = 0o500;
    let tar = tar_of(&[
        locked,
        file("ro/f", b"f"),
        dir("ro/sub/"),
        file("ro/sub/g", b"g"),
        file(".wh.gone", b""),
        file("ro/.wh.x", b""),
    ]);
    let diff_id = Digest::of_bytes(&tar);
    let layer = world.ensure(&tar, Compression::None, OCI_TAR).unwrap();
    set_inode_flags(&layer.join("ro/f"), FS_IMMUTABLE_FL);
    set_inode_flags(&layer.join("ro/sub"), FS_APPEND_FL);
    set_inode_flags(&layer.join("ro"), FS_IMMUTABLE_FL);
    assert!(
        fs::remove_file(layer.join("ro/f")).is_err(),
        "the immutable bit is really set"
    );

    assert!(world.cache.remove(&diff_id).unwrap());
    assert!(!layer.exists());
    assert_eq!(world.cache.path(&diff_id), None);
    assert!(world.cache.list().is_empty());
    let leftovers: Vec<_> = fs::read_dir(world.cache.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".locks")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        !world.cache.remove(&diff_id).unwrap(),
        "removing twice reports absence"
    );
}

#[test]
fn open_removes_interrupted_work() {
    let world = World::new(UnpackLimits::default());
    let hex = Digest::of_bytes(b"interrupted").hex().to_owned();
    let root = world.cache.root().to_owned();
    let tmp = root.join(format!(".tmp-{hex}-1-abc"));
    fs::create_dir_all(tmp.join("d")).unwrap();
    fs::write(tmp.join("d/f"), b"f").unwrap();
    set_inode_flags(&tmp.join("d/f"), FS_IMMUTABLE_FL);
    fs::set_permissions(tmp.join("d"), fs::Permissions::from_mode(0o555)).unwrap();
    let rm = root.join(format!(".rm-{hex}-1-def"));
    fs::create_dir_all(&rm).unwrap();
    let foreign = root.join(".tmp-not-ours");
    fs::create_dir_all(&foreign).unwrap();

    LayerCache::open(&root, UnpackLimits::default()).unwrap();
    assert!(!tmp.exists());
    assert!(!rm.exists());
    assert!(
        foreign.exists(),
        "names the cache did not make are left alone"
    );
}
