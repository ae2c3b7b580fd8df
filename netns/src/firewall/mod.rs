//! The nftables firewall of the instance network: one table in family `inet` that isolates
//! instances from each other and from the host, and masquerades their egress.
//!
//! Instances sit behind isolated bridge ports with /32 addresses, so all their traffic, even to
//! each other, passes the host's IP layer. The table (see [`ruleset`] for the rules) decides:
//!
//! - forward: instance to instance only for (source, destination) pairs in the `peers` set
//!   (replies of an allowed connection pass as established); instance to the uplink yes, except
//!   the link-local metadata range unless allowed; instance to any other host network no; from
//!   outside into instances only replies.
//! - input: instances reach the host only for ICMP and the configured host ports.
//! - output: no ICMP redirects out of the bridge (the host routes peer traffic back out of the
//!   interface it came in on and would otherwise tell instances to talk directly).
//! - postrouting: the instance subnets are masqueraded out of the uplink.
//!
//! The table is written in nft's own language and applied with `nft -f -`, one file being one
//! atomic transaction; state is read back with `nft -j` (JSON). nft 1.0.6 ignores comments in
//! JSON input and leaves table comments out of its JSON output, so ownership is marked by the
//! comment [`MARKER`] on the table (what an admin sees in `nft list ruleset`) and on its `peers`
//! set (what every nft version prints in JSON). A table with neither is never changed or deleted.
//!
//! Everything runs in the calling thread's network namespace: the `nft` child process inherits
//! it, and `/proc/thread-self` and `/proc/sys/net` show it.

mod conflict;
mod legacy;
mod nft;
pub mod ruleset;
mod sysctl;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

pub use conflict::{Conflict, conflicts_in_ruleset, forward_conflicts};
pub use sysctl::{enable_forwarding, enable_forwarding_at};

use crate::ipam::Subnet;
use crate::link::{LinkError, check_ifname};

/// The comment that marks a table (and its `peers` set) as lull's.
pub const MARKER: &str = "managed by lull";

/// The default name of lull's table (in family `inet`).
pub const DEFAULT_TABLE: &str = "lull";

/// Longest table name accepted (nft allows more; lull's names are short).
pub const MAX_TABLE_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("invalid firewall {field} {value:?}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("the nft program was not found; install the nftables package")]
    NftMissing,
    #[error("run nft to {action}")]
    NftSpawn { action: String, source: io::Error },
    #[error("nft failed to {action} ({status}): {stderr}")]
    Nft {
        action: String,
        status: String,
        stderr: String,
    },
    #[error("parse nft's json output for {what}")]
    ParseJson {
        what: String,
        source: serde_json::Error,
    },
    #[error("unexpected nft json output for {what}: {reason}")]
    UnexpectedJson { what: String, reason: String },
    #[error(
        "nft table inet {table} exists but is not lull's (it lacks the comment \"{MARKER}\"); \
         it was left alone: configure another table name or remove that table yourself"
    )]
    Foreign { table: String },
    #[error("nft table inet {table} or its {} set is gone", ruleset::PEERS_SET)]
    Gone { table: String },
    #[error("read {path}")]
    ReadSysctl { path: PathBuf, source: io::Error },
    #[error("write {path}")]
    WriteSysctl { path: PathBuf, source: io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A port on the host that instances may connect to (through the gateway address, or any other
/// address of the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub proto: Proto,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

impl std::str::FromStr for HostPort {
    type Err = FirewallError;

    /// `PORT`, `PORT/tcp` or `PORT/udp`.
    fn from_str(text: &str) -> Result<HostPort, FirewallError> {
        let invalid = |reason: &str| FirewallError::InvalidConfig {
            field: "host port",
            value: text.to_string(),
            reason: reason.to_string(),
        };
        let (port, proto) = match text.split_once('/') {
            None => (text, Proto::Tcp),
            Some((port, "tcp")) => (port, Proto::Tcp),
            Some((port, "udp")) => (port, Proto::Udp),
            Some(_) => return Err(invalid("the protocol must be tcp or udp")),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("expected PORT, PORT/tcp or PORT/udp with PORT 1 to 65535"))?;
        if port == 0 {
            return Err(invalid("port 0 is not a port"));
        }
        Ok(HostPort { proto, port })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Name of the table in family `inet` ([`DEFAULT_TABLE`] by default).
    pub table: String,
    /// The bridge instances are attached to.
    pub bridge: String,
    /// The instances' IPv4 subnet.
    pub subnet: Subnet,
    /// The instances' IPv6 subnet (a ULA network and its prefix length), if they have one.
    pub subnet6: Option<(Ipv6Addr, u8)>,
    /// The interface egress leaves by.
    pub uplink: String,
    /// Host ports instances may open (none by default).
    pub host_ports: Vec<HostPort>,
    /// Whether instances may reach 169.254.0.0/16 (cloud metadata services; no by default).
    pub allow_metadata: bool,
}

impl FirewallConfig {
    /// A configuration with the default table name, no host ports and no metadata access.
    pub fn new(bridge: &str, subnet: Subnet, uplink: &str) -> FirewallConfig {
        FirewallConfig {
            table: DEFAULT_TABLE.to_string(),
            bridge: bridge.to_string(),
            subnet,
            subnet6: None,
            uplink: uplink.to_string(),
            host_ports: Vec::new(),
            allow_metadata: false,
        }
    }

    /// Checks every name that ends up in an nft command, so that none can break out of its
    /// place in the script.
    pub fn validate(&self) -> Result<(), FirewallError> {
        check_table_name(&self.table)?;
        check_nft_ifname("bridge", &self.bridge)?;
        check_nft_ifname("uplink", &self.uplink)?;
        if self.bridge == self.uplink {
            return Err(FirewallError::InvalidConfig {
                field: "uplink",
                value: self.uplink.clone(),
                reason: "is the bridge itself".to_string(),
            });
        }
        if let Some((network, prefix)) = self.subnet6 {
            let value = format!("{network}/{prefix}");
            if prefix == 0 || prefix > 128 {
                return Err(FirewallError::InvalidConfig {
                    field: "subnet6",
                    value,
                    reason: "prefix length must be 1 to 128".to_string(),
                });
            }
            let mask = u128::MAX << (128 - u32::from(prefix));
            if u128::from(network) & !mask != 0 {
                return Err(FirewallError::InvalidConfig {
                    field: "subnet6",
                    value,
                    reason: "host bits are set".to_string(),
                });
            }
        }
        if let Some(zero) = self.host_ports.iter().find(|p| p.port == 0) {
            return Err(FirewallError::InvalidConfig {
                field: "host_ports",
                value: format!("{}/{}", zero.proto, zero.port),
                reason: "port 0 cannot be opened".to_string(),
            });
        }
        Ok(())
    }
}

/// Table names: a letter, then letters, digits, `_` or `-` (nft refuses quoted table names, so
/// only what its lexer reads as one word is accepted).
pub fn check_table_name(name: &str) -> Result<(), FirewallError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_TABLE_NAME_LEN {
        Some("longer than 64 bytes")
    } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some("must start with a letter")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        Some("may hold only letters, digits, '_' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(FirewallError::InvalidConfig {
            field: "table",
            value: name.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// Interface names go into nft scripts in double quotes: besides the kernel's rules, refuse
/// what would end the string, escape, or turn it into a wildcard.
fn check_nft_ifname(field: &'static str, name: &str) -> Result<(), FirewallError> {
    let invalid = |reason: String| FirewallError::InvalidConfig {
        field,
        value: name.to_string(),
        reason,
    };
    check_ifname(name).map_err(|e| match e {
        LinkError::InvalidName { reason, .. } => invalid(reason.to_string()),
        other => invalid(other.to_string()),
    })?;
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '"' | '\\' | '*' | '\''))
    {
        return Err(invalid(format!("contains {c:?}")));
    }
    Ok(())
}

/// Whether a table exists and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TableOwner {
    Absent,
    Lull,
    Foreign,
}

/// lull's table, installed. Dropping the value leaves the table in place (instances keep their
/// rules while the daemon restarts); [`Firewall::remove`] deletes it.
#[derive(Debug)]
pub struct Firewall {
    config: FirewallConfig,
}

impl Firewall {
    /// Creates table `inet <table>` with its chains and the `peers` set in one atomic nft
    /// transaction. A table of that name carrying lull's marker (an earlier run's) is rewritten
    /// from `config` in the same transaction, keeping the pairs its `peers` set held (a caller
    /// that knows better, such as a reconcile, revokes the stale ones); one without the marker is
    /// left alone and reported as [`FirewallError::Foreign`].
    pub fn install(config: FirewallConfig) -> Result<Firewall, FirewallError> {
        config.validate()?;
        let owner = nft::table_owner(&config.table)?;
        let replace = match owner {
            TableOwner::Foreign => {
                return Err(FirewallError::Foreign {
                    table: config.table.clone(),
                });
            }
            TableOwner::Lull => true,
            TableOwner::Absent => false,
        };
        let mut script = ruleset::install_script(&config, replace);
        let kept = if replace {
            nft::peers(&config.table)?
        } else {
            Vec::new()
        };
        if !kept.is_empty() {
            script.push_str(&ruleset::add_peers_script(&config.table, &kept));
        }
        nft::run_script(&format!("install table inet {}", config.table), &script)?;
        tracing::info!(
            table = config.table,
            bridge = config.bridge,
            uplink = config.uplink,
            replaced = replace,
            kept_peers = kept.len(),
            "firewall installed"
        );
        Ok(Firewall { config })
    }

    /// lull's table as it is, without touching it: `None` when there is none.
    pub fn open(config: FirewallConfig) -> Result<Option<Firewall>, FirewallError> {
        config.validate()?;
        match nft::table_owner(&config.table)? {
            TableOwner::Absent => Ok(None),
            TableOwner::Foreign => Err(FirewallError::Foreign {
                table: config.table.clone(),
            }),
            TableOwner::Lull => Ok(Some(Firewall { config })),
        }
    }

    pub fn config(&self) -> &FirewallConfig {
        &self.config
    }

    /// Deletes the table, if it is still lull's. Already gone is fine.
    pub fn remove(self) -> Result<(), FirewallError> {
        remove_table(&self.config.table).map(|_| ())
    }

    /// Lets each `(source, destination)` pair open connections between two instances (one way:
    /// replies pass as established traffic). Pairs already allowed are fine.
    pub fn allow_peers(&self, pairs: &[(Ipv4Addr, Ipv4Addr)]) -> Result<(), FirewallError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let script = ruleset::add_peers_script(&self.config.table, pairs);
        nft::run_script(
            &format!("add peers to table inet {}", self.config.table),
            &script,
        )?;
        tracing::debug!(
            table = self.config.table,
            count = pairs.len(),
            "peers allowed"
        );
        Ok(())
    }

    /// Takes pairs out of the `peers` set; pairs not in it are fine. Connections already open
    /// between them go on until they end (their replies and packets are established traffic).
    pub fn revoke_peers(&self, pairs: &[(Ipv4Addr, Ipv4Addr)]) -> Result<(), FirewallError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let script = ruleset::remove_peers_script(&self.config.table, pairs);
        nft::run_script(
            &format!("remove peers from table inet {}", self.config.table),
            &script,
        )?;
        tracing::debug!(
            table = self.config.table,
            count = pairs.len(),
            "peers revoked"
        );
        Ok(())
    }

    /// The pairs in the `peers` set, sorted.
    pub fn peers(&self) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>, FirewallError> {
        nft::peers(&self.config.table)
    }
}

/// Takes every pair that names `addr` (either way) out of the `peers` set of lull's table
/// `inet <table>`, so whoever gets the address next does not inherit its access. No table: 0.
pub fn revoke_address(table: &str, addr: Ipv4Addr) -> Result<usize, FirewallError> {
    check_table_name(table)?;
    match nft::table_owner(table)? {
        TableOwner::Absent => Ok(0),
        TableOwner::Foreign => Err(FirewallError::Foreign {
            table: table.to_string(),
        }),
        TableOwner::Lull => {
            let pairs: Vec<_> = nft::peers(table)?
                .into_iter()
                .filter(|(src, dst)| *src == addr || *dst == addr)
                .collect();
            if !pairs.is_empty() {
                nft::run_script(
                    &format!("remove peers from table inet {table}"),
                    &ruleset::remove_peers_script(table, &pairs),
                )?;
            }
            Ok(pairs.len())
        }
    }
}

/// Deletes lull's table `inet <name>` (say, after the configured name changed). Returns
/// whether there was one; a table of that name without lull's marker is refused.
pub fn remove_table(name: &str) -> Result<bool, FirewallError> {
    check_table_name(name)?;
    match nft::table_owner(name)? {
        TableOwner::Absent => Ok(false),
        TableOwner::Foreign => Err(FirewallError::Foreign {
            table: name.to_string(),
        }),
        TableOwner::Lull => {
            nft::run_script(
                &format!("delete table inet {name}"),
                &ruleset::delete_table_script(name),
            )?;
            tracing::info!(table = name, "firewall removed");
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FirewallConfig {
        FirewallConfig::new("lull0", Subnet::parse("10.88.0.0/24").unwrap(), "eth0")
    }

    #[test]
    fn validate_accepts_the_defaults() {
        config().validate().unwrap();
        let mut c = config();
        c.subnet6 = Some(("fd00:88::".parse().unwrap(), 64));
        c.host_ports = vec![HostPort {
            proto: Proto::Udp,
            port: 53,
        }];
        c.validate().unwrap();
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Change = Box<dyn Fn(&mut FirewallConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|c| c.table = "".into()), "table"),
            (Box::new(|c| c.table = "1lull".into()), "table"),
            (Box::new(|c| c.table = "lull x".into()), "table"),
            (Box::new(|c| c.table = "lull;flush".into()), "table"),
            (Box::new(|c| c.table = "x".repeat(65)), "table"),
            (Box::new(|c| c.bridge = "lu\"ll".into()), "bridge"),
            (Box::new(|c| c.bridge = "lull*".into()), "bridge"),
            (Box::new(|c| c.bridge = "a/b".into()), "bridge"),
            (Box::new(|c| c.bridge = "".into()), "bridge"),
            (Box::new(|c| c.uplink = "lull0".into()), "uplink"),
            (Box::new(|c| c.uplink = "x".repeat(16)), "uplink"),
            (
                Box::new(|c| c.subnet6 = Some(("fd00::1".parse().unwrap(), 64))),
                "subnet6",
            ),
            (
                Box::new(|c| c.subnet6 = Some(("fd00::".parse().unwrap(), 129))),
                "subnet6",
            ),
            (
                Box::new(|c| {
                    c.host_ports = vec![HostPort {
                        proto: Proto::Tcp,
                        port: 0,
                    }]
                }),
                "host_ports",
            ),
        ];
        for (change, field) in cases {
            let mut c = config();
            change(&mut c);
            match c.validate() {
                Err(FirewallError::InvalidConfig { field: f, .. }) => {
                    assert_eq!(f, field, "{c:?}")
                }
                other => panic!("{c:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn foreign_error_names_the_table_and_the_marker() {
        let text = FirewallError::Foreign {
            table: "lull".into(),
        }
        .to_string();
        assert!(text.contains("inet lull"), "{text}");
        assert!(text.contains(MARKER), "{text}");
    }
}
