//! The OCI runtime spec (`config.json`) of one instance, from its launch configuration.
//!
//! Defaults follow runc's: the default mounts, masked and read-only paths of `oci-spec`, own
//! pid/ipc/uts/mount/cgroup/network namespaces, Docker's default capability set (not all
//! capabilities), `no_new_privileges`, and a seccomp filter ([`super::seccomp`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxDeviceCgroupBuilder, LinuxNamespace, LinuxNamespaceType,
    Mount, PosixRlimitBuilder, PosixRlimitType, Spec, User,
};

use super::LaunchConfig;
use super::user::ResolvedUser;

/// Docker's default capability set: what images expect, far from "all capabilities".
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Open files allowed per process inside an instance (containerd's default), lowered to what
/// the daemon itself may grant (raising a hard limit needs CAP_SYS_RESOURCE, which some hosts
/// withhold even from root).
pub const NOFILE_LIMIT: u64 = 1_048_576;

/// [`NOFILE_LIMIT`] capped by this process's hard limit.
pub fn nofile_limit() -> u64 {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => hard.min(NOFILE_LIMIT),
        Err(_) => 1024,
    }
}

/// Builds the spec. `rootfs` is relative to the bundle (the instance dir).
pub fn build_spec(cfg: &LaunchConfig, user: &ResolvedUser) -> Spec {
    let mut spec = Spec::default();
    spec.set_version("1.2.0".to_owned());
    spec.set_hostname(Some(cfg.hostname.clone()));

    let mut root = oci_spec::runtime::Root::default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(false));
    spec.set_root(Some(root));

    let mut process = oci_spec::runtime::Process::default();
    process.set_args(Some(cfg.process.args.clone()));
    let mut env = cfg.process.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(&cfg.process.cwd));
    process.set_no_new_privileges(Some(true));

    let mut oci_user = User::default();
    oci_user.set_uid(user.uid);
    oci_user.set_gid(user.gid);
    if !user.additional_gids.is_empty() {
        oci_user.set_additional_gids(Some(user.additional_gids.clone()));
    }
    process.set_user(oci_user);

    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(caps.clone()));
    capabilities.set_effective(Some(caps.clone()));
    capabilities.set_permitted(Some(caps));
    capabilities.set_inheritable(Some(HashSet::new()));
    capabilities.set_ambient(Some(HashSet::new()));
    process.set_capabilities(Some(capabilities));

    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(nofile_limit())
        .hard(nofile_limit())
        .build()
        .expect("all rlimit fields are set");
    process.set_rlimits(Some(vec![nofile]));
    spec.set_process(Some(process));

    let mut linux = oci_spec::runtime::Linux::default();
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|typ| {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(typ);
        if typ == LinuxNamespaceType::Network {
            ns.set_path(cfg.netns.clone());
        }
        ns
    })
    .collect();
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(&cfg.cgroups_path)));
    let mut resources = cfg.resources.clone();
    // Deny every device first, as runc does; libcontainer then allows its default set (null,
    // zero, full, random, urandom, tty, ptmx, pts). Without it a v1 devices group inherits its
    // parent's `a *:* rwm`, and a root app with CAP_MKNOD could open the host's disks.
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .expect("a device rule with allow and access set is complete");
    let mut devices = vec![deny_all];
    devices.extend(resources.devices().clone().unwrap_or_default());
    resources.set_devices(Some(devices));
    linux.set_resources(Some(resources));
    linux.set_seccomp(Some(super::seccomp::profile()));
    spec.set_linux(Some(linux));
    if !cfg.cgroup_binds.is_empty() {
        spec.set_mounts(Some(v1_cgroup_mounts(
            spec.mounts().clone().unwrap_or_default(),
            cfg,
        )));
    }
    if !cfg.files.is_empty() {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for file in &cfg.files {
            let mut m = Mount::default();
            m.set_destination(file.destination.clone());
            m.set_typ(Some("bind".to_owned()));
            m.set_source(Some(file.source.clone()));
            m.set_options(Some(bind_options(file.read_only)));
            mounts.push(m);
        }
        spec.set_mounts(Some(mounts));
    }
    spec
}

/// The options of a host file or directory bound into the instance: never a way to run a
/// program or reach a device; `ro` makes the mount read-only (MS_RDONLY), so writes fail with
/// EROFS whatever the file's mode.
fn bind_options(read_only: bool) -> Vec<String> {
    let mut options: Vec<String> = ["rbind", "rprivate", "nosuid", "noexec", "nodev"]
        .map(str::to_owned)
        .to_vec();
    if read_only {
        options.push("ro".to_owned());
    }
    options
}

/// libcontainer 0.7 mounts cgroup v1 hierarchies read-write whatever the spec says, which would
/// let a root app raise its own limits (and undo the CPU gate). On v1 hosts lull mounts a small
/// tmpfs at `/sys/fs/cgroup` instead, with a read-only bind of the instance's own group for each
/// hierarchy, so apps still read their limits where they expect them.
fn v1_cgroup_mounts(mut mounts: Vec<Mount>, cfg: &LaunchConfig) -> Vec<Mount> {
    mounts.retain(|m| m.destination() != Path::new("/sys/fs/cgroup"));
    let mut tmpfs = Mount::default();
    tmpfs.set_destination(PathBuf::from("/sys/fs/cgroup"));
    tmpfs.set_typ(Some("tmpfs".to_owned()));
    tmpfs.set_source(Some(PathBuf::from("tmpfs")));
    tmpfs.set_options(Some(
        ["nosuid", "noexec", "nodev", "mode=755", "size=64k"]
            .map(str::to_owned)
            .to_vec(),
    ));
    mounts.push(tmpfs);
    for bind in &cfg.cgroup_binds {
        let mut m = Mount::default();
        m.set_destination(bind.destination.clone());
        m.set_typ(Some("bind".to_owned()));
        m.set_source(Some(bind.source.clone()));
        m.set_options(Some(
            ["rbind", "ro", "nosuid", "noexec", "nodev"]
                .map(str::to_owned)
                .to_vec(),
        ));
        mounts.push(m);
    }
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::test_support::sample_launch_config;

    #[test]
    fn spec_isolates_and_drops_privileges() {
        let cfg = sample_launch_config();
        let user = ResolvedUser {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![50],
            home: "/home/app".into(),
        };
        let spec = build_spec(&cfg, &user);
        let json = serde_json::to_value(&spec).unwrap();

        assert_eq!(json["hostname"], cfg.hostname);
        assert_eq!(json["root"]["path"], "rootfs");
        assert_eq!(json["process"]["args"], serde_json::json!(cfg.process.args));
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(
            json["process"]["user"]["additionalGids"],
            serde_json::json!([50])
        );
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert!(
            json["process"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == "HOME=/home/app")
        );
        let bounding = json["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert_eq!(bounding.len(), 14);
        assert!(!bounding.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert!(
            json["process"]["capabilities"]["inheritable"]
                .as_array()
                .unwrap()
                .is_empty()
        );

        let ns: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for want in ["pid", "ipc", "uts", "mount", "cgroup", "network"] {
            assert!(ns.contains(&want), "namespace {want} missing from {ns:?}");
        }
        let net = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .unwrap();
        assert_eq!(net["path"], "/run/lull/netns/test");
        let hosts = json["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/etc/hosts")
            .expect("the hosts file is bind-mounted");
        assert_eq!(hosts["source"], "/run/lull/net/web-1/hosts");
        assert_eq!(hosts["type"], "bind");
        assert_eq!(json["linux"]["cgroupsPath"], cfg.cgroups_path);
        assert!(
            json["linux"]["maskedPaths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "/proc/kcore")
        );
        assert!(
            json["linux"]["readonlyPaths"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == "/proc/sys")
        );
    }
}

#[cfg(test)]
mod bind_tests {
    use super::*;
    use crate::instance::FileBind;
    use crate::instance::test_support::sample_launch_config;

    #[test]
    fn read_only_binds_carry_ro_and_others_do_not() {
        let mut cfg = sample_launch_config();
        cfg.files.push(FileBind {
            read_only: true,
            ..FileBind::new("/var/lib/lull/volumes/web/conf", "/etc/app")
        });
        cfg.files
            .push(FileBind::new("/var/lib/lull/volumes/web/data", "/data"));
        let user = ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        };
        let json = serde_json::to_value(build_spec(&cfg, &user)).unwrap();
        let options = |dest: &str| -> Vec<String> {
            let mount = json["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == dest)
                .unwrap_or_else(|| panic!("no mount at {dest}"));
            assert_eq!(mount["type"], "bind", "{dest}");
            serde_json::from_value(mount["options"].clone()).unwrap()
        };
        let conf = options("/etc/app");
        assert!(conf.contains(&"ro".to_owned()), "{conf:?}");
        for must in ["rbind", "nosuid", "nodev", "noexec"] {
            assert!(conf.contains(&must.to_owned()), "{must} missing: {conf:?}");
        }
        let data = options("/data");
        assert!(!data.contains(&"ro".to_owned()), "{data:?}");
        assert!(!options("/etc/hosts").contains(&"ro".to_owned()));
    }
}

#[cfg(test)]
mod cgroup_mount_tests {
    use super::*;
    use crate::instance::config::{CgroupBind, FileBind};
    use crate::instance::test_support::sample_launch_config;

    #[test]
    fn v1_hosts_get_read_only_binds_of_the_instance_group() {
        let mut cfg = sample_launch_config();
        let user = ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        };
        let default = serde_json::to_value(build_spec(&cfg, &user)).unwrap();
        let cgroup_mount = default["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys/fs/cgroup")
            .unwrap();
        assert_eq!(
            cgroup_mount["type"], "cgroup",
            "v2 keeps the spec's cgroup mount"
        );

        cfg.cgroup_binds = vec![
            CgroupBind {
                source: "/sys/fs/cgroup/cpu/lull/web-1".into(),
                destination: "/sys/fs/cgroup/cpu".into(),
            },
            CgroupBind {
                source: "/sys/fs/cgroup/memory/lull/web-1".into(),
                destination: "/sys/fs/cgroup/memory".into(),
            },
        ];
        let json = serde_json::to_value(build_spec(&cfg, &user)).unwrap();
        let mounts: Vec<&serde_json::Value> = json["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                m["destination"]
                    .as_str()
                    .unwrap()
                    .starts_with("/sys/fs/cgroup")
            })
            .collect();
        assert_eq!(mounts.len(), 3, "{mounts:?}");
        assert_eq!(mounts[0]["type"], "tmpfs");
        for (m, ctrl) in mounts[1..].iter().zip(["cpu", "memory"]) {
            assert_eq!(m["type"], "bind");
            assert_eq!(m["destination"], format!("/sys/fs/cgroup/{ctrl}"));
            assert_eq!(m["source"], format!("/sys/fs/cgroup/{ctrl}/lull/web-1"));
            assert!(m["options"].as_array().unwrap().iter().any(|o| o == "ro"));
        }
    }

    #[test]
    fn v2_hosts_bind_the_limit_groups_cpu_max_over_the_cgroup_mount() {
        let mut cfg = sample_launch_config();
        let user = ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        };
        cfg.files.push(FileBind {
            read_only: true,
            ..FileBind::new(
                "/sys/fs/cgroup/lull/web-1/cpu.max",
                "/sys/fs/cgroup/cpu.max",
            )
        });
        let json = serde_json::to_value(build_spec(&cfg, &user)).unwrap();
        let mounts = json["mounts"].as_array().unwrap();
        let at = |destination: &str| {
            mounts
                .iter()
                .position(|m| m["destination"] == destination)
                .unwrap_or_else(|| panic!("no mount at {destination}: {mounts:?}"))
        };
        let (cgroup, view) = (at("/sys/fs/cgroup"), at("/sys/fs/cgroup/cpu.max"));
        assert_eq!(mounts[cgroup]["type"], "cgroup");
        assert!(cgroup < view, "mounted over the cgroup mount, so after it");
        let view = &mounts[view];
        assert_eq!(view["type"], "bind");
        assert_eq!(view["source"], "/sys/fs/cgroup/lull/web-1/cpu.max");
        assert!(
            view["options"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o == "ro")
        );
    }
}
