//! A layer made by hand from Debian's busybox-static, for runtime tests that do not exercise the
//! image store.

use std::path::Path;

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "hostname", "ls", "sleep", "usleep", "id", "ps", "true", "seq", "grep",
    "dd", "head",
];

/// Creates `<layers>/busybox` holding busybox, its applets and a passwd with an unprivileged
/// user; returns the layer's dir name.
pub fn busybox_layer(layers: &Path) -> String {
    let name = "busybox".to_owned();
    let root = layers.join(&name);
    for dir in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static is installed (.ci/run installs it)");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    name
}
