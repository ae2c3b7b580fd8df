//! `pack_source` ignore rules and determinism, `unpack_source` against hostile archives.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lull_builder::source::{
    SOURCE_MTIME, SourceError, SourceLimits, SourceStats, pack_source, unpack_source,
};

fn write(path: &Path, data: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn pack(dir: &Path) -> (Vec<u8>, SourceStats) {
    let mut out = Vec::new();
    let stats = pack_source(dir, &mut out).unwrap();
    (out, stats)
}

fn names(tar: &[u8]) -> Vec<String> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn sample(dir: &Path) {
    write(&dir.join(".gitignore"), "*.log\nbuild/\n!keep.log\n");
    write(&dir.join(".lullignore"), "secrets.env\n/docs\n");
    write(&dir.join(".git/HEAD"), "ref: refs/heads/main\n");
    write(&dir.join(".git/info/exclude"), "local-only\n");
    write(&dir.join("local-only"), "x");
    write(&dir.join("app.py"), "print('hi')\n");
    fs::set_permissions(dir.join("app.py"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&dir.join("debug.log"), "noise");
    write(&dir.join("keep.log"), "kept by negation");
    write(&dir.join("build/out.o"), "obj");
    write(&dir.join("docs/index.md"), "docs");
    write(&dir.join("secrets.env"), "TOKEN=1");
    write(&dir.join("src/.gitignore"), "generated.py\n");
    write(&dir.join("src/generated.py"), "gen");
    write(&dir.join("src/lib.py"), "lib");
    write(
        &dir.join("src/nested/docs/kept.md"),
        "anchored /docs does not match here",
    );
    write(&dir.join(".env.example"), "hidden files are kept");
    std::os::unix::fs::symlink("src/lib.py", dir.join("lib-link")).unwrap();
}

#[test]
fn pack_honours_ignore_files_and_leaves_out_git() {
    let tmp = tempfile::tempdir().unwrap();
    sample(tmp.path());
    let (tar, stats) = pack(tmp.path());
    assert_eq!(
        names(&tar),
        [
            ".env.example",
            ".gitignore",
            ".lullignore",
            "app.py",
            "keep.log",
            "lib-link",
            "src",
            "src/.gitignore",
            "src/lib.py",
            "src/nested",
            "src/nested/docs",
            "src/nested/docs/kept.md",
        ]
    );
    assert_eq!(
        stats.ignored_top_level,
        [
            ".git",
            "build",
            "debug.log",
            "docs",
            "local-only",
            "secrets.env"
        ]
        .map(PathBuf::from)
    );
    assert_eq!(stats.files, 8);
    assert_eq!(stats.dirs, 3);
    assert_eq!(stats.symlinks, 1);

    let mut archive = tar::Archive::new(&tar[..]);
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let header = entry.header();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            (header.uid().unwrap(), header.gid().unwrap()),
            (0, 0),
            "{path}"
        );
        assert_eq!(header.mtime().unwrap(), SOURCE_MTIME, "{path}");
        assert!(header.username_bytes().is_none_or(|u| u.is_empty()));
        match path.as_str() {
            "app.py" => assert_eq!(header.mode().unwrap(), 0o755),
            "lib-link" => {
                assert_eq!(header.entry_type(), tar::EntryType::Symlink);
                assert_eq!(entry.link_name().unwrap().unwrap(), Path::new("src/lib.py"));
            }
            _ => {}
        }
    }
}

#[test]
fn pack_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    sample(&a);
    let (first, _) = pack(&a);
    let (again, _) = pack(&a);
    assert_eq!(first, again);
    // The same tree made again later (other mtimes, inodes, creation order) packs the same.
    std::thread::sleep(std::time::Duration::from_millis(20));
    sample(&b);
    let (other, _) = pack(&b);
    assert_eq!(first, other);
}

#[test]
fn pack_then_unpack_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    sample(&src);
    let (tar, packed) = pack(&src);
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let unpacked = unpack_source(&tar[..], &dest, &SourceLimits::default()).unwrap();
    assert_eq!(
        (
            unpacked.files,
            unpacked.dirs,
            unpacked.symlinks,
            unpacked.bytes
        ),
        (packed.files, packed.dirs, packed.symlinks, packed.bytes)
    );
    assert_eq!(fs::read_to_string(dest.join("src/lib.py")).unwrap(), "lib");
    assert_eq!(
        fs::metadata(dest.join("app.py")).unwrap().mode() & 0o777,
        0o755
    );
    assert_eq!(
        fs::read_link(dest.join("lib-link")).unwrap(),
        Path::new("src/lib.py")
    );
    assert_eq!(
        fs::metadata(dest.join("app.py")).unwrap().mtime(),
        SOURCE_MTIME as i64
    );
    assert!(!dest.join(".git").exists());
}

/// Builds an archive entry by entry, writing names straight into the header so that the tar
/// crate's own checks on `..` and absolute paths do not stop the hostile ones.
struct Hostile(tar::Builder<Vec<u8>>);

impl Hostile {
    fn new() -> Self {
        Hostile(tar::Builder::new(Vec::new()))
    }

    fn entry(mut self, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Self {
        let mut header = tar::Header::new_old();
        let raw = header.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_cksum();
        self.0.append(&header, data).unwrap();
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name, tar::EntryType::Regular, "", data)
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn unpack_err(archive: &[u8], limits: &SourceLimits) -> (SourceError, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = unpack_source(archive, &dest, limits).unwrap_err();
    (err, dest, tmp)
}

#[test]
fn hostile_archives_are_refused_naming_the_entry() {
    use tar::EntryType::*;
    let limits = SourceLimits::default();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dot-dot",
            Hostile::new().file("../escape", b"x").finish(),
            "../escape",
        ),
        (
            "nested dot-dot",
            Hostile::new().file("a/../../escape", b"x").finish(),
            "a/../../escape",
        ),
        (
            "absolute",
            Hostile::new().file("/etc/evil", b"x").finish(),
            "/etc/evil",
        ),
        (
            "symlink then write through it",
            Hostile::new()
                .entry("out", Symlink, "/tmp", b"")
                .file("out/evil", b"x")
                .finish(),
            "out/evil",
        ),
        (
            "relative symlink then write through it",
            Hostile::new()
                .entry("up", Symlink, "..", b"")
                .file("up/evil", b"x")
                .finish(),
            "up/evil",
        ),
        (
            "hardlink out",
            Hostile::new()
                .entry("passwd", Link, "/etc/passwd", b"")
                .finish(),
            "passwd",
        ),
        (
            "hardlink up",
            Hostile::new()
                .entry("passwd", Link, "../../etc/passwd", b"")
                .finish(),
            "passwd",
        ),
        (
            "hardlink through symlink",
            Hostile::new()
                .entry("etc", Symlink, "/etc", b"")
                .entry("passwd", Link, "etc/passwd", b"")
                .finish(),
            "passwd",
        ),
        (
            "char device",
            Hostile::new().entry("null", Char, "", b"").finish(),
            "null",
        ),
        (
            "block device",
            Hostile::new().entry("sda", Block, "", b"").finish(),
            "sda",
        ),
    ];
    for (what, archive, entry) in cases {
        let (err, dest, tmp) = unpack_err(&archive, &limits);
        assert_eq!(err.entry(), Some(entry), "{what}: {err:?}");
        assert!(err.to_string().contains(entry), "{what}: {err}");
        assert!(!tmp.path().join("escape").exists(), "{what}");
        assert!(!Path::new("/tmp/evil").exists(), "{what}");
        assert!(!dest.join("passwd").exists(), "{what}");
    }
}

#[test]
fn hostile_archive_error_kinds() {
    let limits = SourceLimits::default();
    let kind = |archive: Vec<u8>| unpack_err(&archive, &limits).0;
    assert!(matches!(
        kind(Hostile::new().file("../x", b"").finish()),
        SourceError::PathEscape { .. }
    ));
    assert!(matches!(
        kind(Hostile::new().file("/x", b"").finish()),
        SourceError::AbsolutePath { .. }
    ));
    assert!(matches!(
        kind(
            Hostile::new()
                .entry("l", tar::EntryType::Symlink, "/tmp", b"")
                .file("l/x", b"")
                .finish()
        ),
        SourceError::ThroughSymlink { .. }
    ));
    assert!(matches!(
        kind(
            Hostile::new()
                .entry("h", tar::EntryType::Link, "/etc/passwd", b"")
                .finish()
        ),
        SourceError::HardlinkTarget { .. }
    ));
    assert!(matches!(
        kind(
            Hostile::new()
                .entry("d", tar::EntryType::Char, "", b"")
                .finish()
        ),
        SourceError::Device { kind: "char", .. }
    ));
}

#[test]
fn limits_cut_off_big_archives() {
    let mut many = Hostile::new();
    for i in 0..11 {
        many = many.file(&format!("f{i}"), b"x");
    }
    let limits = SourceLimits {
        max_entries: 10,
        ..SourceLimits::default()
    };
    let (err, _, _) = unpack_err(&many.finish(), &limits);
    assert!(
        matches!(&err, SourceError::TooManyEntries { limit: 10, entry } if entry == "f10"),
        "{err:?}"
    );

    let big = Hostile::new()
        .file("small", b"x")
        .file("big", &vec![7u8; 64 * 1024])
        .finish();
    let limits = SourceLimits {
        max_bytes: 16 * 1024,
        ..SourceLimits::default()
    };
    let (err, _, _) = unpack_err(&big, &limits);
    assert!(
        matches!(&err, SourceError::TooLarge { limit, entry } if *limit == 16 * 1024 && entry == "big"),
        "{err:?}"
    );

    let long = Hostile::new().file(&"a".repeat(90), b"x").finish();
    let limits = SourceLimits {
        max_path_len: 64,
        ..SourceLimits::default()
    };
    let (err, _, _) = unpack_err(&long, &limits);
    assert!(
        matches!(
            &err,
            SourceError::PathTooLong {
                len: 90,
                limit: 64,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn gzip_tarballs_with_a_top_level_directory_are_stripped_when_asked() {
    let tarball = Hostile::new()
        .entry("owner-repo-abc123/", tar::EntryType::Directory, "", b"")
        .file("owner-repo-abc123/app.py", b"print()")
        .file("owner-repo-abc123/src/lib.py", b"lib")
        .entry(
            "owner-repo-abc123/src/lib2.py",
            tar::EntryType::Link,
            "owner-repo-abc123/src/lib.py",
            b"",
        )
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tarball).unwrap();
    let gz = gz.finish().unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let limits = SourceLimits {
        strip_components: true,
        ..SourceLimits::default()
    };
    let stats = unpack_source(&gz[..], &dest, &limits).unwrap();
    assert_eq!(stats.files, 3);
    assert_eq!(fs::read_to_string(dest.join("app.py")).unwrap(), "print()");
    assert_eq!(
        fs::metadata(dest.join("src/lib.py")).unwrap().ino(),
        fs::metadata(dest.join("src/lib2.py")).unwrap().ino()
    );

    // Without stripping the top directory stays.
    let kept = tmp.path().join("kept");
    fs::create_dir(&kept).unwrap();
    unpack_source(&gz[..], &kept, &SourceLimits::default()).unwrap();
    assert!(kept.join("owner-repo-abc123/app.py").is_file());

    // An entry outside the common directory is refused when stripping.
    let mixed = Hostile::new()
        .file("top/a", b"")
        .file("other/b", b"")
        .finish();
    let (err, _, _) = unpack_err(&mixed, &limits);
    assert!(
        matches!(&err, SourceError::OutsideTopLevel { entry, top } if entry == "other/b" && top == "top"),
        "{err:?}"
    );
}
