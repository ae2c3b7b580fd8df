//! The forwarding sysctls routing between the bridge and the uplink needs.
//!
//! `/proc/sys/net` shows the network namespace of the thread that opens a file, so these
//! change the calling thread's namespace.

use std::fs;
use std::path::Path;

use super::FirewallError;

const IPV4_FORWARD: &str = "net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "net/ipv6/conf/all/forwarding";

/// Turns on `net.ipv4.ip_forward`, and `net.ipv6.conf.all.forwarding` if `ipv6`. Returns
/// whether anything changed, so the caller can log that it did.
///
/// IPv6 forwarding on `all` makes every interface a router: interfaces with `accept_ra` at 1
/// (the default) stop taking router advertisements, so a host that gets its own IPv6 address by
/// SLAAC needs `accept_ra = 2` on its uplink first.
pub fn enable_forwarding(ipv6: bool) -> Result<bool, FirewallError> {
    enable_forwarding_at(Path::new("/proc/sys"), ipv6)
}

/// [`enable_forwarding`] under another `/proc/sys` (tests point it at a directory of files).
pub fn enable_forwarding_at(proc_sys: &Path, ipv6: bool) -> Result<bool, FirewallError> {
    let mut changed = set_to_one(&proc_sys.join(IPV4_FORWARD))?;
    if ipv6 {
        changed |= set_to_one(&proc_sys.join(IPV6_FORWARD))?;
    }
    Ok(changed)
}

fn set_to_one(path: &Path) -> Result<bool, FirewallError> {
    let current = fs::read_to_string(path).map_err(|source| FirewallError::ReadSysctl {
        path: path.to_path_buf(),
        source,
    })?;
    if current.trim() == "1" {
        return Ok(false);
    }
    fs::write(path, b"1\n").map_err(|source| FirewallError::WriteSysctl {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::info!(sysctl = %path.display(), was = current.trim(), "turned on forwarding");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc_sys(ipv4: &str, ipv6: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        fs::create_dir_all(dir.path().join("net/ipv6/conf/all")).unwrap();
        fs::write(dir.path().join(IPV4_FORWARD), ipv4).unwrap();
        fs::write(dir.path().join(IPV6_FORWARD), ipv6).unwrap();
        dir
    }

    fn read(dir: &tempfile::TempDir, file: &str) -> String {
        fs::read_to_string(dir.path().join(file)).unwrap()
    }

    #[test]
    fn turns_on_what_is_off_and_says_so() {
        let dir = fake_proc_sys("0\n", "0\n");
        assert!(enable_forwarding_at(dir.path(), false).unwrap());
        assert_eq!(read(&dir, IPV4_FORWARD), "1\n");
        assert_eq!(read(&dir, IPV6_FORWARD), "0\n", "ipv6 was not asked for");
        assert!(enable_forwarding_at(dir.path(), true).unwrap());
        assert_eq!(read(&dir, IPV6_FORWARD), "1\n");
        assert!(!enable_forwarding_at(dir.path(), true).unwrap());
    }

    #[test]
    fn already_on_is_left_alone() {
        let dir = fake_proc_sys("1\n", "1\n");
        assert!(!enable_forwarding_at(dir.path(), true).unwrap());
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = enable_forwarding_at(dir.path(), false).unwrap_err();
        assert!(matches!(err, FirewallError::ReadSysctl { .. }), "{err}");
        assert!(err.to_string().contains("net/ipv4/ip_forward"), "{err}");
    }
}
