//! The `lull.service` unit lull installs, rendered from its few variable parts.
//!
//! Each directive is there for a reason the comment beside it gives; the hardening systemd
//! offers that lull cannot take is listed in [`CANNOT_USE`], each with why.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What varies between installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSettings {
    /// The lull executable (`ExecStart`).
    pub executable: PathBuf,
    /// Its settings file (`lull daemon --config`).
    pub config: PathBuf,
    /// `WatchdogSec`: the daemon pings every half of it, while its state store answers.
    pub watchdog: Duration,
    /// `DelegateSubgroup=daemon` (systemd 254 and later): the daemon starts in a leaf of its
    /// delegated cgroup, so lull can enable controllers for its instances beside it, and a
    /// restarted daemon is placed there again. Older systemd would refuse to start a daemon in
    /// a cgroup that enables controllers, so without it instances stay under `/lull`.
    pub delegate_subgroup: bool,
}

impl UnitSettings {
    pub fn new(executable: impl Into<PathBuf>, config: impl Into<PathBuf>) -> UnitSettings {
        UnitSettings {
            executable: executable.into(),
            config: config.into(),
            watchdog: Duration::from_secs(30),
            delegate_subgroup: true,
        }
    }
}

/// Hardening options lull leaves off, and why: instances are the daemon's descendants, so
/// whatever limits the daemon's process limits every app, and the daemon itself configures the
/// kernel (namespaces, cgroups, nftables, mounts).
pub const CANNOT_USE: &[(&str, &str)] = &[
    (
        "ProtectSystem=strict / ProtectKernelTunables",
        "lull writes cgroupfs and /proc/sys (forwarding for the instance network)",
    ),
    (
        "ProtectControlGroups",
        "lull creates and writes its instances' cgroups in the delegated subtree",
    ),
    (
        "ProtectKernelModules",
        "nftables loads its modules on first use",
    ),
    (
        "PrivateDevices / DevicePolicy",
        "instances get device nodes (/dev/null, /dev/tty, a pty for `lull exec -t`)",
    ),
    (
        "PrivateTmp / PrivateNetwork / ProtectHostname",
        "the daemon's own namespaces would become every instance's parent namespaces",
    ),
    (
        "ProtectHome / ProtectKernelLogs / ReadOnlyPaths / TemporaryFileSystem",
        "they give the daemon a mount namespace of its own, and its mounts (instances' root \
         filesystems, network namespace files) must be in the host's, where a restarted daemon \
         finds them",
    ),
    (
        "ProtectClock / DeviceAllow",
        "a device policy on the unit's cgroup is inherited by every instance",
    ),
    ("SystemCallArchitectures", "images may hold 32-bit binaries"),
    (
        "RestrictNamespaces",
        "every instance is a set of new namespaces",
    ),
    (
        "SystemCallFilter / MemoryDenyWriteExecute / CapabilityBoundingSet / NoNewPrivileges",
        "inherited by the apps: JITs (node, the JVM) need W^X mappings, images setuid binaries, \
         and lull sets each instance's own capabilities and no_new_privs",
    ),
];

/// The unit file's text.
pub fn render(settings: &UnitSettings) -> String {
    let exec = quote(&settings.executable);
    let config = quote(&settings.config);
    let watchdog = settings.watchdog.as_secs().max(2);
    let delegation = if settings.delegate_subgroup {
        "# lull owns its cgroup subtree: the daemon runs in the leaf `daemon`, instances live\n\
         # under `instances` beside it.\n\
         Delegate=yes\n\
         DelegateSubgroup=daemon\n"
    } else {
        "# lull owns its cgroup subtree. systemd before 254 cannot start the daemon in a leaf of\n\
         # it, so instances go under /lull instead.\n\
         Delegate=yes\n"
    };
    format!(
        "\
# Installed by `lull install`; `lull uninstall` removes it. Local changes belong in a drop-in
# (systemctl edit lull), which a new `lull install` leaves alone.
[Unit]
Description=lull: apps from images and source, served over HTTP(S), idle CPU throttled
After=network-online.target nftables.service
Wants=network-online.target

[Service]
# READY=1 once the listeners, the admin socket and the adopted instances are up.
Type=notify
NotifyAccess=main
ExecStart={exec} daemon --config {config}
# A planned upgrade: the running daemon hands its sockets and instances to the binary now on
# disk, without a refused connection.
ExecReload=/bin/kill -USR2 $MAINPID
Restart=on-failure
RestartSec=1s
WatchdogSec={watchdog}s
# Adopting many instances after a restart takes a while.
TimeoutStartSec=5min
TimeoutStopSec=2min
{delegation}# Only the daemon is signalled on stop or restart: instances keep running and the next
# daemon adopts them.
KillMode=process
# The listening sockets stay open across a restart in systemd's fd store.
FileDescriptorStoreMax=128
LimitNOFILE=1048576
TasksMax=infinity
# /run/lull holds the admin socket and the instances' runtime state, which must outlive a
# restart of the daemon; /var/lib/lull the state store, images and certificates.
RuntimeDirectory=lull
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
StateDirectory=lull
StateDirectoryMode=0700
ConfigurationDirectory=lull
# Hardening that namespaces and cgroups allow (what they do not: `lull install --explain`).
# Both are inherited by the apps too: no realtime scheduling, no personality changes.
RestrictRealtime=yes
LockPersonality=yes
UMask=0022

[Install]
WantedBy=multi-user.target
"
    )
}

/// A path for a unit file's command line: quoted when it has a space (systemd's quoting).
fn quote(path: &Path) -> String {
    let text = path.display().to_string();
    if text.contains([' ', '"', '\\']) {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_says_what_lull_needs() {
        let unit = render(&UnitSettings::new(
            "/usr/local/bin/lull",
            "/etc/lull/lull.toml",
        ));
        for line in [
            "Type=notify",
            "ExecStart=/usr/local/bin/lull daemon --config /etc/lull/lull.toml",
            "WatchdogSec=30s",
            "Delegate=yes",
            "DelegateSubgroup=daemon",
            "KillMode=process",
            "RuntimeDirectory=lull",
            "RuntimeDirectoryPreserve=yes",
            "StateDirectory=lull",
            "LimitNOFILE=1048576",
            "FileDescriptorStoreMax=128",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        }
        for (option, _) in CANNOT_USE {
            for name in option.split(" / ") {
                let key = name.split('=').next().unwrap();
                assert!(
                    !unit.lines().any(|l| l.starts_with(&format!("{key}="))),
                    "{key} is set though lull cannot use it"
                );
            }
        }
        let old = render(&UnitSettings {
            delegate_subgroup: false,
            ..UnitSettings::new("/usr/local/bin/lull", "/etc/lull/lull.toml")
        });
        assert!(!old.contains("DelegateSubgroup="), "{old}");
        let spaced = render(&UnitSettings::new(
            "/opt/my apps/lull",
            "/etc/lull/lull.toml",
        ));
        assert!(
            spaced.contains("ExecStart=\"/opt/my apps/lull\" daemon"),
            "{spaced}"
        );
    }
}
