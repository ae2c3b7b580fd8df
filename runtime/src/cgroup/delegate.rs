//! Where instances' cgroups go: under the daemon's delegated systemd subtree on cgroup v2,
//! under a fixed parent otherwise.
//!
//! systemd's delegation rules (`Delegate=yes`) give a service its cgroup to manage, and the
//! kernel's "no internal processes" rule forbids a cgroup that enables controllers for its
//! children from holding processes itself. So the unit puts the daemon in a leaf
//! (`DelegateSubgroup=daemon`, systemd 254 and later) and lull creates its instances beside
//! it, under `<unit's cgroup>/instances` (libcontainer enables the controllers each level needs
//! as it creates an instance's cgroup: cpu, memory and pids among them).
//!
//! Elsewhere (cgroup v1 or hybrid hosts, the daemon run by hand, a systemd too old to place the
//! daemon in a leaf, an explicit `--cgroup-parent`) instances go under the fixed parent.
//! [`place`] decides from what it is given (the layout, this process's `/proc/self/cgroup`
//! and whether systemd runs it), so each case is a unit test.

use std::path::Path;

use super::CgroupLayout;

/// The leaf the unit puts the daemon in (`DelegateSubgroup=`).
pub const DAEMON_LEAF: &str = "daemon";
/// The child of the unit's cgroup instances are created under.
pub const INSTANCES_CHILD: &str = "instances";

/// Where instances go, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The instances' parent cgroup (absolute, as in `cgroupsPath`).
    pub parent: String,
    /// One line for the daemon's start log: the cgroup version and why this parent.
    pub why: String,
    /// Said as a warning (a delegated subtree was expected and could not be used).
    pub warn: bool,
}

/// Decides the instances' parent cgroup.
///
/// `explicit` is a parent the operator chose (`--cgroup-parent`, `LULL_CGROUP_PARENT`): it wins.
/// `default` is the fixed parent; `self_cgroup` the text of `/proc/self/cgroup`;
/// `under_systemd` whether systemd started this process as a service (`INVOCATION_ID`).
pub fn place(
    layout: &CgroupLayout,
    explicit: Option<&str>,
    default: &str,
    self_cgroup: &str,
    under_systemd: bool,
) -> Placement {
    let version = match layout {
        CgroupLayout::V2 { mount_point } => {
            format!("cgroup v2 (unified, {})", mount_point.display())
        }
        CgroupLayout::V1(_) => "cgroup v1 or hybrid (a hierarchy per controller)".to_owned(),
    };
    let fixed = |why: String, warn: bool| Placement {
        parent: default.to_owned(),
        why: format!("{version}: instances under {default}: {why}"),
        warn,
    };
    if let Some(parent) = explicit {
        return Placement {
            parent: parent.to_owned(),
            why: format!("{version}: instances under {parent}, as the settings say"),
            warn: false,
        };
    }
    if !matches!(layout, CgroupLayout::V2 { .. }) {
        return fixed(
            "systemd delegates only on cgroup v2, so lull keeps a parent of its own".to_owned(),
            false,
        );
    }
    if !under_systemd {
        return fixed("not run as a systemd service".to_owned(), false);
    }
    let Some(own) = unified_path(self_cgroup) else {
        return fixed(
            "/proc/self/cgroup names no unified cgroup for this process".to_owned(),
            true,
        );
    };
    let own = own.trim_end_matches('/');
    let Some((unit, leaf)) = own.rsplit_once('/') else {
        return fixed(
            format!("this process is in the root cgroup ({own:?})"),
            true,
        );
    };
    if leaf != DAEMON_LEAF || unit.is_empty() {
        return fixed(
            format!(
                "the daemon runs in {own}, not in a `{DAEMON_LEAF}` leaf of its unit's cgroup \
                 (DelegateSubgroup=, systemd 254 or later; `lull install` writes it there)"
            ),
            true,
        );
    }
    let parent = format!("{unit}/{INSTANCES_CHILD}");
    Placement {
        why: format!(
            "{version}: instances under {parent}, in the unit's delegated subtree (the daemon in {own})"
        ),
        parent,
        warn: false,
    }
}

/// The unified hierarchy's path in `/proc/<pid>/cgroup` text (its `0::PATH` line).
pub fn unified_path(self_cgroup: &str) -> Option<&str> {
    self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// [`place`] for this process: reads `/proc/self/cgroup` and `INVOCATION_ID`.
pub fn place_this_process(
    layout: &CgroupLayout,
    explicit: Option<&str>,
    default: &str,
) -> Placement {
    let self_cgroup = std::fs::read_to_string(Path::new("/proc/self/cgroup")).unwrap_or_default();
    let under_systemd = std::env::var_os("INVOCATION_ID").is_some();
    place(layout, explicit, default, &self_cgroup, under_systemd)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cgroup::V1Hierarchies;

    fn v2() -> CgroupLayout {
        CgroupLayout::V2 {
            mount_point: PathBuf::from("/sys/fs/cgroup"),
        }
    }

    #[test]
    fn a_delegated_daemon_leaf_puts_instances_beside_it() {
        let p = place(
            &v2(),
            None,
            "/lull",
            "0::/system.slice/lull.service/daemon\n",
            true,
        );
        assert_eq!(p.parent, "/system.slice/lull.service/instances");
        assert!(!p.warn);
        assert!(p.why.contains("cgroup v2"), "{}", p.why);
    }

    #[test]
    fn the_fixed_parent_elsewhere_with_the_reason() {
        let hybrid = CgroupLayout::V1(V1Hierarchies::default());
        let p = place(
            &hybrid,
            None,
            "/lull",
            "0::/system.slice/lull.service/daemon\n",
            true,
        );
        assert_eq!(p.parent, "/lull");
        assert!(p.why.contains("v1") && !p.warn, "{}", p.why);

        let p = place(
            &v2(),
            None,
            "/lull",
            "0::/user.slice/session-1.scope\n",
            false,
        );
        assert_eq!(p.parent, "/lull");
        assert!(p.why.contains("not run as a systemd service") && !p.warn);

        // systemd < 254: the daemon is in the unit's cgroup itself.
        let p = place(
            &v2(),
            None,
            "/lull",
            "0::/system.slice/lull.service\n",
            true,
        );
        assert_eq!(p.parent, "/lull");
        assert!(p.warn && p.why.contains("DelegateSubgroup"), "{}", p.why);

        let p = place(&v2(), None, "/lull", "", true);
        assert!(p.warn && p.parent == "/lull");
        let p = place(&v2(), None, "/lull", "0::/\n", true);
        assert!(p.warn && p.parent == "/lull");
        let p = place(&v2(), None, "/lull", "0::/daemon\n", true);
        assert!(p.warn && p.parent == "/lull", "{p:?}");
    }

    #[test]
    fn an_explicit_parent_wins() {
        let p = place(
            &v2(),
            Some("/mine"),
            "/lull",
            "0::/system.slice/lull.service/daemon\n",
            true,
        );
        assert_eq!(p.parent, "/mine");
        assert!(!p.warn);
    }

    #[test]
    fn the_unified_line_is_found_among_v1_lines() {
        let text = "12:cpu,cpuacct:/x\n1:name=systemd:/y\n0::/system.slice/lull.service/daemon\n";
        assert_eq!(
            unified_path(text),
            Some("/system.slice/lull.service/daemon")
        );
        assert_eq!(unified_path("3:memory:/a\n"), None);
    }
}
