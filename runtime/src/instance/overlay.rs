//! The instance's root filesystem: an overlay of the image's unpacked layers (shared, read-only)
//! under a per-instance upper and work dir.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// The mount data the kernel accepts is one page.
const MAX_MOUNT_DATA: usize = 4095;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(
        "overlay for {target}: {layers} layers make {len} bytes of mount options, over the kernel's {MAX_MOUNT_DATA}"
    )]
    TooManyLayers {
        target: PathBuf,
        layers: usize,
        len: usize,
    },
    #[error("overlay layer name {0:?} is not a plain directory name")]
    BadLayerName(String),
    #[error(
        "overlay dir {0} contains ':', ',' or a backslash, which overlayfs options cannot carry (choose a data dir without them)"
    )]
    BadDir(PathBuf),
    #[error("mount overlay at {target}: {source}")]
    Mount { target: PathBuf, source: nix::Error },
    #[error("unmount {target}: {source}")]
    Unmount { target: PathBuf, source: nix::Error },
    #[error("chdir to layers dir {dir}: {source}")]
    Chdir { dir: PathBuf, source: nix::Error },
}

/// Mount options with lowerdirs relative to the layers dir (topmost first), which keeps them
/// short: the caller must `chdir` there before mounting (a single-threaded process).
pub fn mount_options(
    layers_lowest_first: &[String],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<String, OverlayError> {
    for name in layers_lowest_first {
        if name.is_empty() || name.contains(['/', ':', ',', '\\']) || name == ".." || name == "." {
            return Err(OverlayError::BadLayerName(name.clone()));
        }
    }
    for dir in [upper, work] {
        if dir.to_string_lossy().contains([':', ',', '\\']) {
            return Err(OverlayError::BadDir(dir.to_owned()));
        }
    }
    let lower: Vec<&str> = layers_lowest_first
        .iter()
        .rev()
        .map(String::as_str)
        .collect();
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    if data.len() > MAX_MOUNT_DATA {
        return Err(OverlayError::TooManyLayers {
            target: target.to_owned(),
            layers: lower.len(),
            len: data.len(),
        });
    }
    Ok(data)
}

/// Mounts the overlay. Changes the process's working directory: call only from a
/// single-threaded process (the instance shim).
pub fn mount_overlay(
    layers_dir: &Path,
    layers_lowest_first: &[String],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), OverlayError> {
    let data = mount_options(layers_lowest_first, upper, work, target)?;
    nix::unistd::chdir(layers_dir).map_err(|source| OverlayError::Chdir {
        dir: layers_dir.to_owned(),
        source,
    })?;
    let result = nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|source| OverlayError::Mount {
        target: target.to_owned(),
        source,
    });
    let _ = nix::unistd::chdir("/");
    result
}

/// Unmounts (lazily) if mounted; not mounted is fine.
pub fn unmount(target: &Path) -> Result<(), OverlayError> {
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(source) => Err(OverlayError::Unmount {
            target: target.to_owned(),
            source,
        }),
    }
}

/// True if `path` is a mount point listed in `/proc/self/mountinfo`.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topmost_layer_comes_first() {
        let layers = vec!["aaa".to_owned(), "bbb".to_owned(), "ccc".to_owned()];
        let data = mount_options(
            &layers,
            Path::new("/i/upper"),
            Path::new("/i/work"),
            Path::new("/i/rootfs"),
        )
        .unwrap();
        assert_eq!(
            data,
            "lowerdir=ccc:bbb:aaa,upperdir=/i/upper,workdir=/i/work"
        );
    }

    #[test]
    fn refuses_what_the_kernel_would_misparse_or_reject() {
        let odd_upper = mount_options(
            &["a".to_owned()],
            Path::new("/data,x/upper"),
            Path::new("/w"),
            Path::new("/t"),
        );
        assert!(matches!(odd_upper, Err(OverlayError::BadDir(_))));
        let bad = vec!["a:b".to_owned()];
        assert!(matches!(
            mount_options(&bad, Path::new("/u"), Path::new("/w"), Path::new("/t")),
            Err(OverlayError::BadLayerName(_))
        ));
        let many: Vec<String> = (0..70).map(|i| format!("{i:064}")).collect();
        assert!(matches!(
            mount_options(&many, Path::new("/u"), Path::new("/w"), Path::new("/t")),
            Err(OverlayError::TooManyLayers { layers: 70, .. })
        ));
    }
}
