//! The network's settings, with defaults that do not collide with what else commonly runs on a
//! host, and checks that name the field at fault.

use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::firewall::HostPort;
use crate::ipam::Subnet;
use crate::link::{MAX_IFNAME_LEN, check_ifname};
use crate::network::names::HASH_DIGITS;

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "lull0";
/// Default IPv4 subnet: clear of Docker's pools (172.17-31/16, 192.168/16), Podman's
/// (10.88/16 and up), Kubernetes' usual ones (10.42/16, 10.43/16, 10.96/12, 10.244/16),
/// Tailscale's 100.64/10, libvirt's 192.168.122/24 and the big clouds' default VPCs.
pub const DEFAULT_SUBNET: &str = "10.73.0.0/16";
/// Default nftables table (family inet).
pub const DEFAULT_TABLE: &str = "lull";
/// Default prefix of the host ends of instances' veth pairs.
pub const DEFAULT_VETH_PREFIX: &str = "lv";

#[derive(Debug, thiserror::Error)]
#[error("network setting {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

/// Where and how instances are networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The host bridge.
    pub bridge: String,
    /// Instances' IPv4 subnet; its first address is the bridge's.
    pub subnet: Subnet,
    /// Optional IPv6 subnet (a ULA /64 such as `fd00:6c75:6c6c::/64`); the bridge takes `::1`,
    /// instances get the address whose low 32 bits are their IPv4 address's.
    pub subnet6: Option<(Ipv6Addr, u8)>,
    /// nftables table (family inet) lull owns.
    pub table: String,
    /// Prefix of the host ends' names (at most 7 bytes).
    pub veth_prefix: String,
    /// Interface egress traffic leaves by; `None`: the one carrying the default route.
    pub uplink: Option<String>,
    /// MTU of instances' links; `None`: the uplink's.
    pub mtu: Option<u32>,
    /// Host ports instances may connect to (everything else on the host is closed to them).
    pub host_ports: Vec<HostPort>,
    /// Whether instances may reach link-local addresses (169.254.0.0/16: cloud metadata).
    pub allow_metadata: bool,
    /// Nameservers that take the place of the host's loopback ones (such as systemd-resolved's
    /// stub) in instances; when empty, systemd-resolved's own upstream list is used.
    pub dns: Vec<IpAddr>,
    /// The host's resolver settings (`/etc/resolv.conf`).
    pub host_resolv_conf: PathBuf,
    /// systemd-resolved's list of upstream servers (`/run/systemd/resolve/resolv.conf`).
    pub resolved_conf: PathBuf,
    /// Where namespaces are bind-mounted (`/run/lull/netns`).
    pub netns_dir: PathBuf,
    /// Per-instance resolv.conf and hosts files (`/run/lull/net`).
    pub files_dir: PathBuf,
    /// The address allocations (`<data dir>/network/ipam.json`).
    pub ipam_file: PathBuf,
}

impl NetworkConfig {
    /// The defaults, for a data dir (kept across reboots) and a run dir (cleared at boot).
    pub fn new(data_dir: &Path, run_dir: &Path) -> NetworkConfig {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet: Subnet::parse(DEFAULT_SUBNET).expect("the default subnet parses"),
            subnet6: None,
            table: DEFAULT_TABLE.to_string(),
            veth_prefix: DEFAULT_VETH_PREFIX.to_string(),
            uplink: None,
            mtu: None,
            host_ports: Vec::new(),
            allow_metadata: false,
            dns: Vec::new(),
            host_resolv_conf: PathBuf::from("/etc/resolv.conf"),
            resolved_conf: PathBuf::from("/run/systemd/resolve/resolv.conf"),
            netns_dir: run_dir.join("netns"),
            files_dir: run_dir.join("net"),
            ipam_file: data_dir.join("network").join("ipam.json"),
        }
    }

    /// Checks every setting; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: String| Err(ConfigError { field, reason });
        if let Err(e) = check_ifname(&self.bridge) {
            return err("bridge", e.to_string());
        }
        if let Some(uplink) = &self.uplink {
            if let Err(e) = check_ifname(uplink) {
                return err("uplink", e.to_string());
            }
            if uplink == &self.bridge {
                return err("uplink", "must not be the bridge itself".to_string());
            }
        }
        let max_prefix = MAX_IFNAME_LEN - HASH_DIGITS;
        if self.veth_prefix.is_empty() || self.veth_prefix.len() > max_prefix {
            return err(
                "veth_prefix",
                format!("{:?} must be 1 to {max_prefix} bytes", self.veth_prefix),
            );
        }
        if !self
            .veth_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return err(
                "veth_prefix",
                format!(
                    "{:?} may hold only letters, digits, '-' and '_'",
                    self.veth_prefix
                ),
            );
        }
        if self.bridge.starts_with(&self.veth_prefix) {
            return err(
                "veth_prefix",
                format!(
                    "{:?} is a prefix of the bridge's name {:?}",
                    self.veth_prefix, self.bridge
                ),
            );
        }
        if self.table.is_empty()
            || self.table.len() > 64
            || !self
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return err(
                "table",
                format!(
                    "{:?} must be 1 to 64 letters, digits, '-' or '_'",
                    self.table
                ),
            );
        }
        if let Some((net, prefix)) = self.subnet6 {
            let unique_local = (net.segments()[0] & 0xfe00) == 0xfc00;
            if !(64..=96).contains(&prefix) {
                return err(
                    "subnet6",
                    format!("{net}/{prefix}: the prefix length must be 64 to 96"),
                );
            }
            if !unique_local {
                return err(
                    "subnet6",
                    format!("{net}/{prefix} is not a unique local address (fc00::/7)"),
                );
            }
            let mask = u128::MAX << (128 - u32::from(prefix));
            if u128::from(net) & !mask != 0 {
                return err("subnet6", format!("{net}/{prefix} has host bits set"));
            }
        }
        if let Some(mtu) = self.mtu
            && !(1280..=65535).contains(&mtu)
        {
            return err("mtu", format!("{mtu} must be 1280 to 65535"));
        }
        for port in &self.host_ports {
            if port.port == 0 {
                return err("host_ports", "port 0 is not a port".to_string());
            }
        }
        Ok(())
    }

    /// The bridge's IPv6 address and the subnet's prefix length.
    pub fn gateway6(&self) -> Option<(Ipv6Addr, u8)> {
        self.subnet6
            .map(|(net, prefix)| (Ipv6Addr::from(u128::from(net) | 1), prefix))
    }

    /// An instance's IPv6 address: the subnet with the IPv4 address in its low 32 bits.
    pub fn addr6_for(&self, addr: std::net::Ipv4Addr) -> Option<Ipv6Addr> {
        self.subnet6
            .map(|(net, _)| Ipv6Addr::from(u128::from(net) | u128::from(u32::from(addr))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetworkConfig {
        NetworkConfig::new(Path::new("/var/lib/lull"), Path::new("/run/lull"))
    }

    #[test]
    fn defaults_are_valid_and_placed() {
        let c = config();
        c.validate().unwrap();
        assert_eq!(c.netns_dir, Path::new("/run/lull/netns"));
        assert_eq!(c.ipam_file, Path::new("/var/lib/lull/network/ipam.json"));
        assert_eq!(c.subnet.to_string(), DEFAULT_SUBNET);
    }

    #[test]
    fn bad_settings_name_their_field() {
        type Change = Box<dyn Fn(&mut NetworkConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "bridge",
                Box::new(|c| c.bridge = "a-very-long-bridge-name".into()),
            ),
            ("uplink", Box::new(|c| c.uplink = Some("lull0".into()))),
            (
                "veth_prefix",
                Box::new(|c| c.veth_prefix = "toolong1".into()),
            ),
            ("veth_prefix", Box::new(|c| c.veth_prefix = "a/b".into())),
            ("veth_prefix", Box::new(|c| c.veth_prefix = "lu".into())),
            ("table", Box::new(|c| c.table = "bad table".into())),
            (
                "subnet6",
                Box::new(|c| c.subnet6 = Some(("2001:db8::".parse().unwrap(), 64))),
            ),
            (
                "subnet6",
                Box::new(|c| c.subnet6 = Some(("fd00::1".parse().unwrap(), 64))),
            ),
            (
                "subnet6",
                Box::new(|c| c.subnet6 = Some(("fd00::".parse().unwrap(), 48))),
            ),
            ("mtu", Box::new(|c| c.mtu = Some(500))),
        ];
        for (field, change) in cases {
            let mut c = config();
            change(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn ipv6_addresses_follow_ipv4_ones() {
        let mut c = config();
        c.subnet6 = Some(("fd00:6c75:6c6c::".parse().unwrap(), 64));
        c.validate().unwrap();
        assert_eq!(
            c.gateway6(),
            Some(("fd00:6c75:6c6c::1".parse().unwrap(), 64))
        );
        assert_eq!(
            c.addr6_for("10.73.0.5".parse().unwrap()),
            Some("fd00:6c75:6c6c::a49:5".parse().unwrap())
        );
    }
}
