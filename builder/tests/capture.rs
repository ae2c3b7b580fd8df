//! Golden, reproducibility and overlayfs round-trip tests of `capture_layer`.
//!
//! Tests that need root (mknod of whiteouts, `trusted.*` xattrs, chown, mounts) print why and
//! return when not run as root; CI runs them as root.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lull_builder::capture::{
    CaptureError, CaptureOptions, CapturedLayer, LAYER_MEDIA_TYPE, capture_layer,
};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};

macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "skipped: needs root (whiteout device nodes, trusted.* xattrs, chown, mounts)"
            );
            return;
        }
    };
}

/// One tar entry, as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    path: String,
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_layer(blob: &[u8]) -> Vec<Item> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(blob)
        .read_to_end(&mut tar)
        .unwrap();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut items = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().unwrap() {
            for record in pax {
                let record = record.unwrap();
                if let Some(name) = record.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push((name.to_owned(), record.value_bytes().to_vec()));
                }
            }
        }
        let header = entry.header().clone();
        assert!(header.username_bytes().is_none_or(|u| u.is_empty()));
        assert!(header.groupname_bytes().is_none_or(|g| g.is_empty()));
        let kind = match header.entry_type() {
            tar::EntryType::Regular => '-',
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Fifo => 'p',
            other => panic!("unexpected entry type {other:?}"),
        };
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        items.push(Item {
            path: entry.path().unwrap().to_string_lossy().into_owned(),
            kind,
            mode: header.mode().unwrap(),
            uid: header.uid().unwrap(),
            gid: header.gid().unwrap(),
            mtime: header.mtime().unwrap(),
            link,
            data,
            xattrs,
        });
    }
    items
}

fn capture(upper: &Path, lowers: &[PathBuf], options: &CaptureOptions) -> (CapturedLayer, Vec<u8>) {
    let mut blob = Vec::new();
    let layer = capture_layer(upper, lowers, options, &mut blob).unwrap();
    (layer, blob)
}

fn write(path: &Path, data: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkdir(path: &Path, mode: u32) {
    fs::create_dir_all(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn whiteout(path: &Path) {
    nix::sys::stat::mknod(path, SFlag::S_IFCHR, Mode::empty(), libc::makedev(0, 0)).unwrap();
}

fn set_mtime(path: &Path, seconds: i64) {
    let time = TimeSpec::new(seconds, 0);
    nix::sys::stat::utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink).unwrap();
}

/// (path, kind, mode, link target) of every entry, in order.
fn shape(items: &[Item]) -> Vec<(String, char, u32, Option<String>)> {
    items
        .iter()
        .map(|i| (i.path.clone(), i.kind, i.mode, i.link.clone()))
        .collect()
}

fn e(path: &str, kind: char, mode: u32, link: Option<&str>) -> (String, char, u32, Option<String>) {
    (path.to_owned(), kind, mode, link.map(str::to_owned))
}

#[test]
fn golden_upper_converts_to_oci_entries() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    let upper = tmp.path().join("upper");
    write(&lower.join("etc/keep"), "keep", 0o644);
    write(&lower.join("etc/old"), "old", 0o644);
    write(&lower.join("var/cache/x/y"), "y", 0o644);
    write(&lower.join("opt/app/a.txt"), "a", 0o644);
    write(&lower.join("opt/app/b.txt"), "b", 0o644);

    mkdir(&upper, 0o755);
    write(&upper.join("bin/su"), "su", 0o4755);
    fs::set_permissions(upper.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&upper.join("cache/blob"), "cached", 0o644);
    write(&upper.join("etc/keep"), "changed", 0o644);
    write(&upper.join("etc/new"), "new", 0o644);
    set_mtime(&upper.join("etc/new"), 500);
    whiteout(&upper.join("etc/old"));
    whiteout(&upper.join("etc/ghost"));
    fs::set_permissions(upper.join("etc"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&upper.join("hl/a"), "same", 0o644);
    fs::hard_link(upper.join("hl/a"), upper.join("hl/b")).unwrap();
    fs::set_permissions(upper.join("hl"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("etc/new", upper.join("link")).unwrap();
    write(&upper.join("opt/app/new.txt"), "fresh", 0o644);
    mkdir(&upper.join("opt"), 0o755);
    mkdir(&upper.join("opt/app"), 0o755);
    xattr::set(upper.join("opt/app"), "trusted.overlay.opaque", b"y").unwrap();
    write(&upper.join("owned"), "mine", 0o640);
    nix::unistd::chown(
        &upper.join("owned"),
        Some(nix::unistd::Uid::from_raw(1234)),
        Some(nix::unistd::Gid::from_raw(5678)),
    )
    .unwrap();
    nix::unistd::mkfifo(&upper.join("pipe"), Mode::from_bits_truncate(0o644)).unwrap();
    fs::set_permissions(upper.join("pipe"), fs::Permissions::from_mode(0o644)).unwrap();
    write(&upper.join("run/secrets/ca.pem"), "secret", 0o600);
    mkdir(&upper.join("run"), 0o755);
    mkdir(&upper.join("secret"), 0o700);
    drop(std::os::unix::net::UnixListener::bind(upper.join("sock")).unwrap());
    write(&upper.join("tagged"), "t", 0o644);
    xattr::set(upper.join("tagged"), "user.lull.test", b"v").unwrap();
    xattr::set(upper.join("tagged"), "trusted.overlay.origin", b"internal").unwrap();
    mkdir(&upper.join("var"), 0o755);
    whiteout(&upper.join("var/cache"));

    let options = CaptureOptions {
        exclude: vec![PathBuf::from("cache"), PathBuf::from("/run/secrets")],
        mtime: 1000,
    };
    let (layer, blob) = capture(&upper, std::slice::from_ref(&lower), &options);
    let items = read_layer(&blob);
    assert_eq!(
        shape(&items),
        vec![
            e("bin", 'd', 0o755, None),
            e("bin/su", '-', 0o4755, None),
            e("etc", 'd', 0o755, None),
            e("etc/keep", '-', 0o644, None),
            e("etc/new", '-', 0o644, None),
            e("etc/.wh.old", '-', 0, None),
            e("hl", 'd', 0o755, None),
            e("hl/a", '-', 0o644, None),
            e("hl/b", 'h', 0o644, Some("hl/a")),
            e("link", 'l', 0o777, Some("etc/new")),
            e("opt", 'd', 0o755, None),
            e("opt/app", 'd', 0o755, None),
            e("opt/app/.wh..wh..opq", '-', 0, None),
            e("opt/app/new.txt", '-', 0o644, None),
            e("owned", '-', 0o640, None),
            e("pipe", 'p', 0o644, None),
            e("run", 'd', 0o755, None),
            e("secret", 'd', 0o700, None),
            e("tagged", '-', 0o644, None),
            e("var", 'd', 0o755, None),
            e("var/.wh.cache", '-', 0, None),
        ]
    );
    assert_eq!(layer.entries, items.len() as u64);
    let by_path: BTreeMap<&str, &Item> = items.iter().map(|i| (i.path.as_str(), i)).collect();
    assert_eq!(by_path["etc/keep"].data, b"changed");
    assert_eq!(by_path["hl/a"].data, b"same");
    assert!(by_path["hl/b"].data.is_empty());
    assert_eq!((by_path["owned"].uid, by_path["owned"].gid), (1234, 5678));
    assert_eq!(
        by_path["tagged"].xattrs,
        vec![("user.lull.test".to_owned(), b"v".to_vec())]
    );
    assert!(by_path["opt/app"].xattrs.is_empty(), "overlay xattrs leak");
    assert_eq!(by_path["etc/new"].mtime, 500, "older mtimes are kept");
    for item in &items {
        assert!(item.mtime <= 1000, "{} has mtime {}", item.path, item.mtime);
        if item.path != "etc/new" {
            assert_eq!(item.mtime, 1000, "{}", item.path);
        }
    }
}

#[test]
fn whiteouts_follow_the_lower_stack() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let bottom = tmp.path().join("bottom");
    let middle = tmp.path().join("middle");
    let upper = tmp.path().join("upper");
    write(&bottom.join("a/gone-below"), "x", 0o644);
    write(&bottom.join("a/shown"), "x", 0o644);
    write(&bottom.join("b/hidden-by-opaque"), "x", 0o644);
    mkdir(&middle.join("a"), 0o755);
    whiteout(&middle.join("a/gone-below"));
    mkdir(&middle.join("b"), 0o755);
    xattr::set(middle.join("b"), "trusted.overlay.opaque", b"y").unwrap();
    mkdir(&upper.join("a"), 0o755);
    mkdir(&upper.join("b"), 0o755);
    whiteout(&upper.join("a/gone-below"));
    whiteout(&upper.join("a/shown"));
    whiteout(&upper.join("b/hidden-by-opaque"));
    let (_, blob) = capture(&upper, &[bottom, middle], &CaptureOptions::default());
    let paths: Vec<String> = read_layer(&blob).into_iter().map(|i| i.path).collect();
    assert_eq!(paths, ["a", "a/.wh.shown", "b"]);
}

#[test]
fn device_nodes_are_refused_naming_the_path() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    mkdir(&upper.join("dev"), 0o755);
    nix::sys::stat::mknod(
        &upper.join("dev/null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        libc::makedev(1, 3),
    )
    .unwrap();
    let err = capture_layer(&upper, &[], &CaptureOptions::default(), Vec::new()).unwrap_err();
    assert!(
        matches!(&err, CaptureError::Device { path, kind: "char", major: 1, minor: 3 } if path == &upper.join("dev/null")),
        "{err:?}"
    );
    assert!(err.to_string().contains("dev/null"), "{err}");
}

#[test]
fn redirect_and_metacopy_uppers_are_refused() {
    require_root!();
    for xattr in ["trusted.overlay.redirect", "trusted.overlay.metacopy"] {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        write(&upper.join("moved/file"), "x", 0o644);
        xattr::set(upper.join("moved"), xattr, b"/orig").unwrap();
        let err = capture_layer(&upper, &[], &CaptureOptions::default(), Vec::new()).unwrap_err();
        assert!(
            matches!(&err, CaptureError::OverlayFeature { path, xattr: x } if path == &upper.join("moved") && x == xattr),
            "{err:?}"
        );
        assert!(err.to_string().contains("moved"), "{err}");
    }
}

/// What needs no root: files, modes, links, user xattrs, exclusion, fifo, socket.
fn unprivileged_upper(root: &Path) {
    mkdir(root, 0o755);
    write(&root.join("app/main.py"), "print()", 0o755);
    write(&root.join("app/data.bin"), "data", 0o600);
    fs::hard_link(root.join("app/data.bin"), root.join("app/data-copy.bin")).unwrap();
    mkdir(&root.join("app"), 0o750);
    std::os::unix::fs::symlink("/usr/bin/python3", root.join("python")).unwrap();
    mkdir(&root.join("private"), 0o700);
    write(&root.join("tmp/cache/pip/x"), "cache", 0o644);
    mkdir(&root.join("tmp"), 0o1777);
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(root.join("socket")).unwrap());
}

#[test]
fn unprivileged_upper_keeps_modes_links_and_exclusions() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    unprivileged_upper(&upper);
    let user_xattr = xattr::set(upper.join("app/main.py"), "user.lull", b"1").is_ok();
    let options = CaptureOptions {
        exclude: vec![PathBuf::from("tmp/cache")],
        mtime: 1_700_000_000,
    };
    let (layer, blob) = capture(&upper, &[], &options);
    let items = read_layer(&blob);
    assert_eq!(
        shape(&items),
        vec![
            e("app", 'd', 0o750, None),
            e("app/data-copy.bin", '-', 0o600, None),
            e("app/data.bin", 'h', 0o600, Some("app/data-copy.bin")),
            e("app/main.py", '-', 0o755, None),
            e("fifo", 'p', 0o600, None),
            e("private", 'd', 0o700, None),
            e("python", 'l', 0o777, Some("/usr/bin/python3")),
            e("tmp", 'd', 0o1777, None),
        ]
    );
    let uid = u64::from(nix::unistd::geteuid().as_raw());
    assert!(items.iter().all(|i| i.uid == uid));
    assert_eq!(items[1].data, b"data");
    if user_xattr {
        assert_eq!(
            items[3].xattrs,
            vec![("user.lull".to_owned(), b"1".to_vec())]
        );
    }
    // The digests describe the bytes written.
    assert_eq!(layer.size, blob.len() as u64);
    assert_eq!(
        layer.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&blob)))
    );
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        layer.diff_id,
        format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
    );
    // gzip header: no mtime, no file name (FLG has no FNAME bit), OS unknown.
    assert_eq!(&blob[..4], &[0x1f, 0x8b, 8, 0]);
    assert_eq!(&blob[4..8], &[0, 0, 0, 0]);
    assert_eq!(blob[9], 255);
    assert_eq!(
        LAYER_MEDIA_TYPE,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
}

#[test]
fn capturing_twice_gives_the_same_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let upper = tmp.path().join("upper");
    unprivileged_upper(&upper);
    let options = CaptureOptions {
        exclude: vec![],
        mtime: 1_600_000_000,
    };
    let (first, first_blob) = capture(&upper, &[], &options);
    // A later touch is clamped away.
    set_mtime(&upper.join("app/main.py"), 1_800_000_000);
    let (second, second_blob) = capture(&upper, &[], &options);
    assert_eq!(first, second);
    assert_eq!(first_blob, second_blob);
    // The same content built elsewhere (other inode numbers, other creation order) too.
    let other = tmp.path().join("other");
    unprivileged_upper(&other);
    let (third, _) = capture(&other, &[], &options);
    assert_eq!(first.diff_id, third.diff_id);
    assert_eq!(first.digest, third.digest);
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Mounted {
    fn overlay(target: &Path, options: &str, readonly: bool) -> Mounted {
        fs::create_dir_all(target).unwrap();
        let flags = if readonly {
            nix::mount::MsFlags::MS_RDONLY
        } else {
            nix::mount::MsFlags::empty()
        };
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(options),
        )
        .unwrap_or_else(|e| panic!("mount overlay {options} on {}: {e}", target.display()));
        Mounted(target.to_owned())
    }

    fn unmount(self) {
        nix::mount::umount(&self.0).unwrap();
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for entry in fs::read_dir(root.join(dir)).unwrap() {
            let entry = entry.unwrap();
            let relative = dir.join(entry.file_name());
            let full = root.join(&relative);
            let meta = fs::symlink_metadata(&full).unwrap();
            let file_type = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if file_type.is_dir() {
                "dir"
            } else if file_type.is_file() {
                "file"
            } else if file_type.is_symlink() {
                "symlink"
            } else if file_type.is_fifo() {
                "fifo"
            } else {
                "other"
            };
            let mut xattrs: Vec<(String, Vec<u8>)> = if file_type.is_symlink() {
                Vec::new()
            } else {
                xattr::list(&full)
                    .unwrap()
                    .filter_map(|n| n.into_string().ok())
                    .filter(|n| n.starts_with("user."))
                    .map(|n| {
                        let v = xattr::get(&full, &n).unwrap().unwrap_or_default();
                        (n, v)
                    })
                    .collect()
            };
            xattrs.sort();
            out.insert(
                relative.clone(),
                Node {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    content: file_type.is_file().then(|| fs::read(&full).unwrap()),
                    link: file_type
                        .is_symlink()
                        .then(|| fs::read_link(&full).unwrap()),
                    xattrs,
                },
            );
            if file_type.is_dir() {
                walk(root, &relative, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

#[test]
fn overlay_round_trip_through_the_runtime_unpacker() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let path = tmp.path().join(name);
        fs::create_dir_all(&path).unwrap();
        path
    };
    let (lower, upper, work, merged) = (dir("L"), dir("U"), dir("W"), dir("M"));
    write(&lower.join("etc/config"), "a=1", 0o644);
    write(&lower.join("etc/remove-me"), "bye", 0o644);
    write(&lower.join("etc/rename-from"), "moving", 0o644);
    write(&lower.join("var/cache/deep/file"), "cached", 0o644);
    write(&lower.join("var/cache/top"), "cached", 0o644);
    write(&lower.join("var/log/keep"), "log", 0o644);
    write(&lower.join("opt/tool/old-a"), "old", 0o644);
    write(&lower.join("opt/tool/sub/old-b"), "old", 0o644);
    write(&lower.join("bin/prog"), "#!/bin/sh\n", 0o755);
    write(&lower.join("app/readme"), "hello", 0o644);

    let options = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off,index=off",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mount = Mounted::overlay(&merged, &options, false);
    let m = |p: &str| merged.join(p);
    write(&m("app/new.txt"), "new", 0o644);
    write(&m("etc/config"), "a=2", 0o644);
    fs::remove_file(m("etc/remove-me")).unwrap();
    fs::rename(m("etc/rename-from"), m("etc/rename-to")).unwrap();
    fs::remove_dir_all(m("var/cache")).unwrap();
    fs::remove_dir_all(m("opt/tool")).unwrap();
    write(&m("opt/tool/new-file"), "replaced", 0o644);
    std::os::unix::fs::symlink("new.txt", m("app/current")).unwrap();
    fs::hard_link(m("app/new.txt"), m("app/new-link")).unwrap();
    fs::set_permissions(m("etc/config"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(m("bin/prog"), fs::Permissions::from_mode(0o4755)).unwrap();
    nix::unistd::chown(
        &m("app/readme"),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    let user_xattrs = xattr::set(m("app/new.txt"), "user.lull", b"1").is_ok();
    nix::unistd::mkfifo(&m("app/pipe"), Mode::from_bits_truncate(0o600)).unwrap();
    fs::set_permissions(m("app"), fs::Permissions::from_mode(0o700)).unwrap();
    mkdir(&m("newdir"), 0o755);
    mount.unmount();

    let (layer, blob) = capture(
        &upper,
        std::slice::from_ref(&lower),
        &CaptureOptions {
            exclude: vec![],
            mtime: 1_700_000_000,
        },
    );
    let shape: Vec<(String, char)> = read_layer(&blob)
        .into_iter()
        .map(|i| (i.path, i.kind))
        .collect();
    for expected in [
        ("etc/.wh.remove-me", '-'),
        ("etc/.wh.rename-from", '-'),
        ("var/.wh.cache", '-'),
        ("opt/tool/.wh..wh..opq", '-'),
        ("app/new.txt", 'h'), // "new-link" sorts first: - < .
    ] {
        let expected = (expected.0.to_owned(), expected.1);
        assert!(
            shape.contains(&expected),
            "{expected:?} missing from {shape:#?}"
        );
    }

    let blob_path = tmp.path().join("layer.tar.gz");
    fs::write(&blob_path, &blob).unwrap();
    let unpacked = dir("L2");
    lull_runtime::layers::unpack_layer(
        &blob_path,
        LAYER_MEDIA_TYPE,
        &layer.diff_id.parse().unwrap(),
        &unpacked,
        &lull_runtime::layers::UnpackLimits::default(),
    )
    .unwrap();
    let a = fs::metadata(unpacked.join("app/new.txt")).unwrap();
    let b = fs::metadata(unpacked.join("app/new-link")).unwrap();
    assert_eq!(a.ino(), b.ino(), "the hardlink pair is one inode again");

    let original = dir("original");
    let rebuilt = dir("rebuilt");
    let _original = Mounted::overlay(
        &original,
        &format!("lowerdir={}:{}", upper.display(), lower.display()),
        true,
    );
    let _rebuilt = Mounted::overlay(
        &rebuilt,
        &format!("lowerdir={}:{}", unpacked.display(), lower.display()),
        true,
    );
    let want = snapshot(&original);
    let got = snapshot(&rebuilt);
    assert!(want.contains_key(Path::new("opt/tool/new-file")));
    assert!(!want.contains_key(Path::new("opt/tool/old-a")));
    assert!(!want.contains_key(Path::new("var/cache")));
    assert_eq!(want[Path::new("bin/prog")].mode, 0o4755);
    assert_eq!(want[Path::new("app")].mode, 0o700);
    if user_xattrs {
        assert_eq!(want[Path::new("app/new.txt")].xattrs.len(), 1);
    }
    for (path, node) in &want {
        assert_eq!(got.get(path), Some(node), "{} differs", path.display());
    }
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        extra.is_empty(),
        "unexpected paths after the round trip: {extra:?}"
    );
}
