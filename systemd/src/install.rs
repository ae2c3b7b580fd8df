//! `lull install` and `lull uninstall`: the unit, a settings skeleton and the `lull` group, then
//! systemctl. Idempotent: a second install changes nothing that is already right (and restarts
//! the daemon only when its unit changed). Every effect on the machine goes through [`System`],
//! so the logic is tested against a fake.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::unit::{UnitSettings, render};

/// Where things go.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    pub unit_path: PathBuf,
    pub unit: UnitSettings,
    /// The executable the unit runs, and the one to copy there when it differs.
    pub installed_executable: PathBuf,
    pub running_executable: PathBuf,
    pub group: String,
    /// Removed by `uninstall --purge`: the state (`/var/lib/lull`) and settings (`/etc/lull`).
    pub purge_dirs: Vec<PathBuf>,
}

impl InstallPlan {
    /// The standard places: `/etc/systemd/system/lull.service`, `/usr/local/bin/lull`,
    /// `/etc/lull/lull.toml`, group `lull`.
    pub fn standard(running_executable: PathBuf) -> InstallPlan {
        let installed = PathBuf::from("/usr/local/bin/lull");
        InstallPlan {
            unit_path: PathBuf::from("/etc/systemd/system/lull.service"),
            unit: UnitSettings::new(&installed, "/etc/lull/lull.toml"),
            installed_executable: installed,
            running_executable,
            group: "lull".to_owned(),
            purge_dirs: vec![PathBuf::from("/var/lib/lull"), PathBuf::from("/etc/lull")],
        }
    }
}

/// The first systemd with `DelegateSubgroup=`.
pub const DELEGATE_SUBGROUP_SINCE: u32 = 254;

/// The version in `systemctl --version` output (`systemd 257 (257.9-1)`).
pub fn parse_systemd_version(output: &str) -> Option<u32> {
    output
        .lines()
        .next()?
        .strip_prefix("systemd ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The unit `install` writes on this machine: `plan`'s, with `DelegateSubgroup=` when this
/// systemd has it.
pub fn unit_text(system: &dyn System, plan: &InstallPlan) -> String {
    render(&UnitSettings {
        delegate_subgroup: system
            .systemd_version()
            .is_some_and(|v| v >= DELEGATE_SUBGROUP_SINCE),
        ..plan.unit.clone()
    })
}

/// The machine, as install sees it.
pub trait System {
    fn has_systemd(&self) -> bool;
    /// systemd's version (`systemctl --version`'s first number), if it can be read.
    fn systemd_version(&self) -> Option<u32>;
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Writes `bytes` to `path` with `mode`, creating parent directories.
    fn write(&self, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()>;
    /// Whether it existed.
    fn remove(&self, path: &Path) -> io::Result<bool>;
    fn remove_tree(&self, path: &Path) -> io::Result<bool>;
    fn group_exists(&self, name: &str) -> bool;
    fn add_group(&self, name: &str) -> Result<(), String>;
    fn remove_group(&self, name: &str) -> Result<(), String>;
    fn systemctl(&self, args: &[&str]) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "systemd is not running here (no /run/systemd/system): run `lull daemon` under your \
         service manager instead"
    )]
    NoSystemd,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Command(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The settings file a first install writes: every key commented, with its default.
pub const CONFIG_SKELETON: &str = "\
# lull's settings. Every key is optional; the values shown are the defaults.
# `lull daemon --check --config /etc/lull/lull.toml` checks this file.

# base_domain = \"apps.example.com\"   # services also answer on <name>.<base_domain>

# [listeners]
# http = \":80\"
# https = \":443\"

# [acme]                             # automatic certificates (agreeing to the CA's terms)
# enabled = false
# email = \"ops@example.com\"
# public_addresses = [\"203.0.113.7\"]
";

/// Installs (or brings up to date) and starts the service; returns what was done, a line
/// each.
pub fn install(system: &dyn System, plan: &InstallPlan) -> Result<Vec<String>, InstallError> {
    if !system.has_systemd() {
        return Err(InstallError::NoSystemd);
    }
    let mut done = Vec::new();
    if plan.running_executable != plan.installed_executable {
        let binary = std::fs::read(&plan.running_executable)
            .map_err(io_err("read", &plan.running_executable))?;
        let current = system
            .read(&plan.installed_executable)
            .map_err(io_err("read", &plan.installed_executable))?;
        if current.as_deref() != Some(binary.as_slice()) {
            // Written beside it and renamed by `write`: a running daemon keeps its old text.
            system
                .write(&plan.installed_executable, &binary, 0o755)
                .map_err(io_err("write", &plan.installed_executable))?;
            done.push(format!("installed {}", plan.installed_executable.display()));
        }
    }
    if !system.group_exists(&plan.group) {
        system
            .add_group(&plan.group)
            .map_err(InstallError::Command)?;
        done.push(format!(
            "created group {} (its members may use the admin socket)",
            plan.group
        ));
    }
    let config = &plan.unit.config;
    if system
        .read(config)
        .map_err(io_err("read", config))?
        .is_none()
    {
        system
            .write(config, CONFIG_SKELETON.as_bytes(), 0o644)
            .map_err(io_err("write", config))?;
        done.push(format!("wrote {} (all defaults)", config.display()));
    }
    let unit = unit_text(system, plan);
    let unit_changed = system
        .read(&plan.unit_path)
        .map_err(io_err("read", &plan.unit_path))?
        .as_deref()
        != Some(unit.as_bytes());
    if unit_changed {
        system
            .write(&plan.unit_path, unit.as_bytes(), 0o644)
            .map_err(io_err("write", &plan.unit_path))?;
        system
            .systemctl(&["daemon-reload"])
            .map_err(InstallError::Command)?;
        done.push(format!("wrote {}", plan.unit_path.display()));
    }
    system
        .systemctl(&["enable", "--now", "lull.service"])
        .map_err(InstallError::Command)?;
    if unit_changed || done.iter().any(|d| d.starts_with("installed")) {
        // A running daemon picks up a new unit or binary; instances are adopted, not
        // restarted (KillMode=process, sockets in the fd store).
        system
            .systemctl(&["try-restart", "lull.service"])
            .map_err(InstallError::Command)?;
    }
    done.push("lull.service enabled and running".to_owned());
    Ok(done)
}

/// Stops and removes the service; with `purge`, its state, settings and group too.
///
/// `cleanup` runs once the daemon has stopped (and before `--purge` removes the state it
/// reads): it removes what the daemon left running on purpose for the next daemon to adopt,
/// the instances and their network, and says what it did.
pub fn uninstall(
    system: &dyn System,
    plan: &InstallPlan,
    purge: bool,
    cleanup: &mut dyn FnMut() -> Result<Vec<String>, String>,
) -> Result<Vec<String>, InstallError> {
    if !system.has_systemd() {
        return Err(InstallError::NoSystemd);
    }
    let mut done = Vec::new();
    if system
        .read(&plan.unit_path)
        .map_err(io_err("read", &plan.unit_path))?
        .is_some()
    {
        system
            .systemctl(&["disable", "--now", "lull.service"])
            .map_err(InstallError::Command)?;
        done.extend(cleanup().map_err(InstallError::Command)?);
        system
            .remove(&plan.unit_path)
            .map_err(io_err("remove", &plan.unit_path))?;
        system
            .systemctl(&["daemon-reload"])
            .map_err(InstallError::Command)?;
        done.push(format!(
            "stopped lull.service and removed {}",
            plan.unit_path.display()
        ));
    }
    if purge {
        for dir in &plan.purge_dirs {
            if system.remove_tree(dir).map_err(io_err("remove", dir))? {
                done.push(format!("removed {}", dir.display()));
            }
        }
        if system
            .remove(&plan.installed_executable)
            .map_err(io_err("remove", &plan.installed_executable))?
        {
            done.push(format!("removed {}", plan.installed_executable.display()));
        }
        if system.group_exists(&plan.group) {
            system
                .remove_group(&plan.group)
                .map_err(InstallError::Command)?;
            done.push(format!("removed group {}", plan.group));
        }
    } else {
        done.push(format!(
            "kept the state and settings ({}): `lull uninstall --purge` removes them",
            plan.purge_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(done)
}

/// The real machine: files, `groupadd`/`groupdel`, `systemctl`.
pub struct RealSystem;

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl System for RealSystem {
    fn has_systemd(&self) -> bool {
        Path::new("/run/systemd/system").is_dir()
    }

    fn systemd_version(&self) -> Option<u32> {
        let output = Command::new("systemctl").arg("--version").output().ok()?;
        parse_systemd_version(&String::from_utf8_lossy(&output.stdout))
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension(format!("lull-new{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    fn remove(&self, path: &Path) -> io::Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn remove_tree(&self, path: &Path) -> io::Result<bool> {
        match std::fs::remove_dir_all(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn group_exists(&self, name: &str) -> bool {
        std::fs::read_to_string("/etc/group").is_ok_and(|groups| {
            groups
                .lines()
                .any(|line| line.split(':').next() == Some(name))
        })
    }

    fn add_group(&self, name: &str) -> Result<(), String> {
        run("groupadd", &["--system", name])
    }

    fn remove_group(&self, name: &str) -> Result<(), String> {
        run("groupdel", &[name])
    }

    fn systemctl(&self, args: &[&str]) -> Result<(), String> {
        run("systemctl", args)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Default)]
    struct Fake {
        files: RefCell<BTreeMap<PathBuf, (Vec<u8>, u32)>>,
        groups: RefCell<Vec<String>>,
        calls: RefCell<Vec<String>>,
    }

    impl System for Fake {
        fn has_systemd(&self) -> bool {
            true
        }
        fn systemd_version(&self) -> Option<u32> {
            Some(257)
        }
        fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
            Ok(self.files.borrow().get(path).map(|(b, _)| b.clone()))
        }
        fn write(&self, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
            self.files
                .borrow_mut()
                .insert(path.to_owned(), (bytes.to_vec(), mode));
            Ok(())
        }
        fn remove(&self, path: &Path) -> io::Result<bool> {
            Ok(self.files.borrow_mut().remove(path).is_some())
        }
        fn remove_tree(&self, path: &Path) -> io::Result<bool> {
            let mut files = self.files.borrow_mut();
            let before = files.len();
            files.retain(|p, _| !p.starts_with(path));
            Ok(files.len() != before)
        }
        fn group_exists(&self, name: &str) -> bool {
            self.groups.borrow().iter().any(|g| g == name)
        }
        fn add_group(&self, name: &str) -> Result<(), String> {
            self.groups.borrow_mut().push(name.to_owned());
            self.calls.borrow_mut().push(format!("groupadd {name}"));
            Ok(())
        }
        fn remove_group(&self, name: &str) -> Result<(), String> {
            self.groups.borrow_mut().retain(|g| g != name);
            self.calls.borrow_mut().push(format!("groupdel {name}"));
            Ok(())
        }
        fn systemctl(&self, args: &[&str]) -> Result<(), String> {
            self.calls
                .borrow_mut()
                .push(format!("systemctl {}", args.join(" ")));
            Ok(())
        }
    }

    fn plan() -> InstallPlan {
        let mut plan = InstallPlan::standard(PathBuf::from("/usr/local/bin/lull"));
        plan.purge_dirs = vec![PathBuf::from("/var/lib/lull"), PathBuf::from("/etc/lull")];
        plan
    }

    #[test]
    fn systemd_versions_are_read_from_systemctl() {
        assert_eq!(
            parse_systemd_version("systemd 257 (257.9-1~deb13u1)\n+PAM +AUDIT\n"),
            Some(257)
        );
        assert_eq!(
            parse_systemd_version("systemd 252 (252.39-1~deb12u1)"),
            Some(252)
        );
        assert_eq!(parse_systemd_version("not systemd"), None);
        assert_eq!(parse_systemd_version(""), None);
    }

    #[test]
    fn install_is_idempotent_and_uninstall_keeps_data_unless_purged() {
        let sys = Fake::default();
        let plan = plan();
        let first = install(&sys, &plan).unwrap();
        assert_eq!(first.len(), 4, "{first:?}");
        assert_eq!(
            sys.calls.borrow().clone(),
            [
                "groupadd lull",
                "systemctl daemon-reload",
                "systemctl enable --now lull.service",
                "systemctl try-restart lull.service",
            ]
        );
        let unit = sys.files.borrow()[Path::new("/etc/systemd/system/lull.service")].clone();
        assert_eq!(unit.1, 0o644);
        let text = String::from_utf8(unit.0).unwrap();
        assert!(text.contains("Delegate=yes") && text.contains("DelegateSubgroup=daemon"));
        // The operator edits the settings: a second install keeps them and restarts nothing.
        sys.write(
            Path::new("/etc/lull/lull.toml"),
            b"base_domain = \"a.test\"\n",
            0o644,
        )
        .unwrap();
        sys.calls.borrow_mut().clear();
        let second = install(&sys, &plan).unwrap();
        assert_eq!(second, ["lull.service enabled and running"]);
        assert_eq!(
            sys.calls.borrow().clone(),
            ["systemctl enable --now lull.service"]
        );
        assert_eq!(
            sys.files.borrow()[Path::new("/etc/lull/lull.toml")].0,
            b"base_domain = \"a.test\"\n"
        );

        sys.write(Path::new("/var/lib/lull/state.db"), b"x", 0o600)
            .unwrap();
        // The cleanup runs after the daemon stopped, while the state is still there.
        let mut cleaned = Vec::new();
        let kept = uninstall(&sys, &plan, false, &mut || {
            cleaned.push(sys.calls.borrow().last().cloned().unwrap_or_default());
            Ok(vec!["removed 2 instances".to_owned()])
        })
        .unwrap();
        assert_eq!(cleaned, ["systemctl disable --now lull.service"]);
        assert!(kept.contains(&"removed 2 instances".to_owned()), "{kept:?}");
        assert!(kept.last().unwrap().contains("--purge"), "{kept:?}");
        assert!(
            sys.files
                .borrow()
                .contains_key(Path::new("/var/lib/lull/state.db"))
        );
        assert!(
            !sys.files
                .borrow()
                .contains_key(Path::new("/etc/systemd/system/lull.service"))
        );
        // Installed again, then uninstalled with --purge: a failing cleanup stops it before
        // the state goes, and says why.
        install(&sys, &plan).unwrap();
        let err = uninstall(
            &sys,
            &plan,
            true,
            &mut || Err("instance a: busy".to_owned()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("instance a: busy"), "{err}");
        assert!(
            sys.files
                .borrow()
                .contains_key(Path::new("/var/lib/lull/state.db"))
        );
        let purged = uninstall(&sys, &plan, true, &mut || Ok(Vec::new())).unwrap();
        assert!(sys.files.borrow().is_empty(), "{purged:?}");
        assert!(!sys.group_exists("lull"));
    }
}
