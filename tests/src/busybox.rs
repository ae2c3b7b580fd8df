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

/// An instance manager over a scratch dir holding the busybox layer, with its own cgroup parent.
/// Fields drop in order: the manager (and its zygote), then the cgroup guard (which kills any
/// instance a failed test left running), then the scratch dir (unmounted and removed).
pub struct BusyboxHost {
    pub manager: lull_runtime::instance::InstanceManager,
    pub cgroups: crate::scratch::CgroupParentGuard,
    pub scratch: crate::scratch::ScratchDir,
    pub layer: String,
}

impl BusyboxHost {
    /// `zygote` is the test zygote binary (`env!("CARGO_BIN_EXE_lull-test-zygote")`).
    pub fn new(prefix: &str, zygote: &str) -> BusyboxHost {
        let scratch = crate::scratch::ScratchDir::new(prefix).unwrap();
        let cgroups = crate::scratch::CgroupParentGuard::new("lull-test");
        let layers = scratch.path().join("layers");
        let layer = busybox_layer(&layers);
        let manager =
            lull_runtime::instance::InstanceManager::new(lull_runtime::instance::InstancesConfig {
                instances_dir: scratch.path().join("instances"),
                layers_dir: layers,
                state_root: scratch.path().join("state"),
                cgroup_parent: cgroups.parent.clone(),
                zygote_program: zygote.into(),
                zygote_args: vec![],
            })
            .unwrap();
        BusyboxHost {
            manager,
            cgroups,
            scratch,
            layer,
        }
    }

    /// A request running `sh -c script` on the busybox layer, with default limits.
    pub fn script(&self, id: &str, script: &str) -> lull_runtime::instance::InstanceRequest {
        lull_runtime::instance::InstanceRequest {
            id: id.to_owned(),
            layers: vec![self.layer.clone()],
            image: lull_runtime::instance::ImageProcess {
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
            overrides: Default::default(),
            resources: Default::default(),
            netns: None,
            files: Vec::new(),
            log_limits: Default::default(),
        }
    }
}
