//! IPv4 address management for instances on the bridge.
//!
//! A [`Subnet`] is the bridge's network: its first host address is the gateway (the bridge's own
//! address), and the addresses after it up to the one before broadcast go to instances. [`Ipam`]
//! hands those out, one per owner (an instance id), and persists the mapping as JSON in a state
//! file, written to a temporary file, fsynced and renamed over the old one, then the directory
//! fsynced: an allocation that `allocate` returned survives a crash.
//!
//! Allocation is next-fit: it starts after the address handed out last and wraps around, so a
//! just-released address is reused only once every other one has been used since. That keeps
//! stale ARP entries and conntrack state of a dead instance from reaching a new one.
//!
//! `Ipam` itself does no locking: its user serializes changes (`HostNetwork` holds an
//! exclusive `flock` on `<state file>.lock` around every change, across processes).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The smallest prefix length accepted (the largest subnet).
pub const MIN_PREFIX: u8 = 8;
/// The largest prefix length accepted: a /29 leaves five addresses for instances.
pub const MAX_PREFIX: u8 = 29;

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid subnet {input:?}: {reason}")]
    InvalidSubnet { input: String, reason: String },
    #[error("invalid owner {owner:?}: {reason}")]
    InvalidOwner { owner: String, reason: &'static str },
    #[error(
        "subnet {subnet} is exhausted: all {in_use} addresses for instances are in use \
         (the network, gateway and broadcast addresses are reserved)"
    )]
    Exhausted { subnet: Subnet, in_use: usize },
    #[error(
        "ipam state file {path} records subnet {stored} but subnet {configured} is configured; \
         stop the instances using {stored} or move the state file away before changing the subnet"
    )]
    SubnetMismatch {
        path: PathBuf,
        stored: Subnet,
        configured: Subnet,
    },
    #[error("read ipam state file {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("parse ipam state file {path} (left in place; fix or move it away)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("ipam state file {path} is invalid (left in place; fix or move it away): {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("write ipam state file {path}")]
    Write { path: PathBuf, source: io::Error },
}

/// An IPv4 network in CIDR form, with no host bits set and a prefix from /8 to /29.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/n`, refusing host bits and prefixes outside /8../29.
    pub fn parse(input: &str) -> Result<Subnet, IpamError> {
        let invalid = |reason: String| IpamError::InvalidSubnet {
            input: input.to_string(),
            reason,
        };
        let (addr, prefix) = input.split_once('/').ok_or_else(|| {
            invalid("expected an address and a prefix length, as in 10.0.0.0/24".into())
        })?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| invalid(format!("{addr:?} is not an IPv4 address")))?;
        let prefix: u8 = match prefix.parse() {
            Ok(p) if prefix.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(invalid(format!("{prefix:?} is not a prefix length"))),
        };
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(invalid(format!(
                "prefix /{prefix} out of range (allowed /{MIN_PREFIX} to /{MAX_PREFIX})"
            )));
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if network != addr {
            return Err(invalid(format!(
                "host bits set (did you mean {network}/{prefix}?)"
            )));
        }
        Ok(Subnet { network, prefix })
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// The first host address: the bridge's own address and the instances' default route.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether the two networks share any address (one contains the other's network address).
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// Whether `addr` may be handed to an instance: inside the subnet and not the network,
    /// gateway or broadcast address.
    pub fn is_instance_address(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.contains(addr) && a >= self.first_instance() && a <= self.last_instance()
    }

    /// The addresses that go to instances, in order: everything but the network, gateway and
    /// broadcast addresses.
    pub fn instance_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        (self.first_instance()..=self.last_instance()).map(Ipv4Addr::from)
    }

    /// How many addresses go to instances (`2^(32 - prefix) - 3`).
    pub fn instance_address_count(&self) -> usize {
        (self.last_instance() - self.first_instance() + 1) as usize
    }

    fn first_instance(&self) -> u32 {
        u32::from(self.network) + 2
    }

    fn last_instance(&self) -> u32 {
        u32::from(self.broadcast()) - 1
    }
}

fn mask(prefix: u8) -> u32 {
    // Prefixes are at least MIN_PREFIX, so the shift is below 32.
    u32::MAX << (32 - u32::from(prefix))
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Subnet, IpamError> {
        Subnet::parse(s)
    }
}

/// The state file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    subnet: String,
    /// The address handed out last; the next search starts after it.
    #[serde(default)]
    last_allocated: Option<Ipv4Addr>,
    allocations: BTreeMap<Ipv4Addr, String>,
}

/// Address allocations for one subnet, persisted in a state file.
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    subnet: Subnet,
    last_allocated: Option<Ipv4Addr>,
    allocations: BTreeMap<Ipv4Addr, String>,
    by_owner: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    /// Loads the allocations in `state_file`, or starts empty when it does not exist (it is
    /// written on the first change). A file that cannot be parsed or does not make sense is an
    /// error and is left untouched.
    pub fn open(state_file: &Path, subnet: Subnet) -> Result<Ipam, IpamError> {
        let path = state_file.to_path_buf();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Ipam {
                    path,
                    subnet,
                    last_allocated: None,
                    allocations: BTreeMap::new(),
                    by_owner: BTreeMap::new(),
                });
            }
            Err(source) => return Err(IpamError::Read { path, source }),
        };
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| IpamError::Parse {
                path: path.clone(),
                source,
            })?;
        let invalid = |reason: String| IpamError::Invalid {
            path: path.clone(),
            reason,
        };
        if state.version != STATE_VERSION {
            return Err(invalid(format!(
                "unsupported version {} (expected {STATE_VERSION})",
                state.version
            )));
        }
        let stored = Subnet::parse(&state.subnet).map_err(|e| invalid(e.to_string()))?;
        if stored != subnet {
            return Err(IpamError::SubnetMismatch {
                path,
                stored,
                configured: subnet,
            });
        }
        if let Some(last) = state.last_allocated
            && !subnet.contains(last)
        {
            return Err(invalid(format!(
                "last_allocated {last} is outside subnet {subnet}"
            )));
        }
        let mut by_owner = BTreeMap::new();
        for (addr, owner) in &state.allocations {
            if !subnet.is_instance_address(*addr) {
                return Err(invalid(format!(
                    "address {addr} of {owner:?} is not an instance address of subnet {subnet}"
                )));
            }
            check_owner(owner).map_err(|e| invalid(e.to_string()))?;
            if let Some(other) = by_owner.insert(owner.clone(), *addr) {
                return Err(invalid(format!(
                    "owner {owner:?} holds both {other} and {addr}"
                )));
            }
        }
        Ok(Ipam {
            path,
            subnet,
            last_allocated: state.last_allocated,
            allocations: state.allocations,
            by_owner,
        })
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    pub fn state_file(&self) -> &Path {
        &self.path
    }

    /// The address of `owner`, allocating one if it has none. Calling it again for the same
    /// owner returns the same address. The allocation is on disk when this returns.
    pub fn allocate(&mut self, owner: &str) -> Result<Ipv4Addr, IpamError> {
        check_owner(owner)?;
        if let Some(addr) = self.by_owner.get(owner) {
            return Ok(*addr);
        }
        let addr = self.next_free().ok_or(IpamError::Exhausted {
            subnet: self.subnet,
            in_use: self.allocations.len(),
        })?;
        let mut allocations = self.allocations.clone();
        allocations.insert(addr, owner.to_string());
        self.persist(Some(addr), &allocations)?;
        self.allocations = allocations;
        self.last_allocated = Some(addr);
        self.by_owner.insert(owner.to_string(), addr);
        tracing::debug!(owner, %addr, subnet = %self.subnet, "allocated address");
        Ok(addr)
    }

    /// Frees the address of `owner` and returns it; `None` (and nothing written) if it had none.
    pub fn release(&mut self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some(addr) = self.by_owner.get(owner).copied() else {
            return Ok(None);
        };
        let mut allocations = self.allocations.clone();
        allocations.remove(&addr);
        self.persist(self.last_allocated, &allocations)?;
        self.allocations = allocations;
        self.by_owner.remove(owner);
        tracing::debug!(owner, %addr, subnet = %self.subnet, "released address");
        Ok(Some(addr))
    }

    pub fn owner_of(&self, addr: Ipv4Addr) -> Option<&str> {
        self.allocations.get(&addr).map(String::as_str)
    }

    pub fn address_of(&self, owner: &str) -> Option<Ipv4Addr> {
        self.by_owner.get(owner).copied()
    }

    /// All allocations, by address.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> + '_ {
        self.allocations.iter().map(|(a, o)| (*a, o.as_str()))
    }

    /// Releases the addresses whose owner is not in `live_owners` (left over by a crash) and
    /// returns them. Written once, and only if something was released.
    pub fn reconcile(
        &mut self,
        live_owners: &HashSet<String>,
    ) -> Result<Vec<(Ipv4Addr, String)>, IpamError> {
        let (keep, stale): (BTreeMap<_, _>, BTreeMap<_, _>) = self
            .allocations
            .iter()
            .map(|(a, o)| (*a, o.clone()))
            .partition(|(_, owner)| live_owners.contains(owner));
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        self.persist(self.last_allocated, &keep)?;
        for (addr, owner) in &stale {
            self.by_owner.remove(owner);
            tracing::info!(owner = %owner, %addr, "released the address of a vanished owner");
        }
        self.allocations = keep;
        Ok(stale.into_iter().collect())
    }

    /// Next-fit: the first free instance address after the last one handed out, wrapping around.
    fn next_free(&self) -> Option<Ipv4Addr> {
        if self.allocations.len() >= self.subnet.instance_address_count() {
            return None;
        }
        let first = self.subnet.first_instance();
        let last = self.subnet.last_instance();
        let start = match self.last_allocated.map(u32::from) {
            Some(a) if a >= first && a < last => a + 1,
            _ => first,
        };
        (start..=last)
            .chain(first..start)
            .map(Ipv4Addr::from)
            .find(|a| !self.allocations.contains_key(a))
    }

    fn persist(
        &self,
        last_allocated: Option<Ipv4Addr>,
        allocations: &BTreeMap<Ipv4Addr, String>,
    ) -> Result<(), IpamError> {
        let state = StateFile {
            version: STATE_VERSION,
            subnet: self.subnet.to_string(),
            last_allocated,
            allocations: allocations.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&state).map_err(|e| IpamError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');
        write_atomic(&self.path, &json).map_err(|source| IpamError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

fn check_owner(owner: &str) -> Result<(), IpamError> {
    let reason = if owner.is_empty() {
        Some("empty")
    } else if owner.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(IpamError::InvalidOwner {
            owner: owner.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Writes `bytes` to a temporary file next to `path`, fsyncs it, renames it over `path` and
/// fsyncs the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        Subnet::parse(s).unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_table() {
        let good = [
            ("10.88.0.0/16", "10.88.0.1", "10.88.255.255", 65533),
            ("172.30.0.0/24", "172.30.0.1", "172.30.0.255", 253),
            ("10.0.0.0/8", "10.0.0.1", "10.255.255.255", 16_777_213),
            ("192.168.5.8/29", "192.168.5.9", "192.168.5.15", 5),
        ];
        for (input, gateway, broadcast, count) in good {
            let s = net(input);
            assert_eq!(s.to_string(), input);
            assert_eq!(s.gateway(), ip(gateway), "{input}");
            assert_eq!(s.broadcast(), ip(broadcast), "{input}");
            assert_eq!(s.instance_address_count(), count, "{input}");
            assert_eq!(input.parse::<Subnet>().unwrap(), s);
        }
        let bad = [
            ("10.88.0.1/16", "host bits set (did you mean 10.88.0.0/16?)"),
            (
                "10.88.0.0/30",
                "prefix /30 out of range (allowed /8 to /29)",
            ),
            ("10.0.0.0/7", "prefix /7 out of range"),
            ("0.0.0.0/0", "prefix /0 out of range"),
            ("10.88.0.0/33", "prefix /33 out of range"),
            ("10.88.0.0", "expected an address and a prefix length"),
            ("10.88.0/16", "\"10.88.0\" is not an IPv4 address"),
            ("fd00::/64", "is not an IPv4 address"),
            ("10.88.0.0/", "\"\" is not a prefix length"),
            ("10.88.0.0/+16", "\"+16\" is not a prefix length"),
            ("10.88.0.0/abc", "is not a prefix length"),
            ("", "expected an address"),
        ];
        for (input, reason) in bad {
            let err = Subnet::parse(input).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid subnet {input:?}: ")),
                "{input}: {err}"
            );
            assert!(err.contains(reason), "{input}: {err}");
        }
    }

    #[test]
    fn instance_addresses_skip_network_gateway_and_broadcast() {
        let s = net("10.1.2.0/29");
        let all: Vec<_> = s.instance_addresses().collect();
        let want: Vec<_> = (2..=6).map(|h| Ipv4Addr::new(10, 1, 2, h)).collect();
        assert_eq!(all, want);
        assert!(!s.is_instance_address(ip("10.1.2.0")));
        assert!(!s.is_instance_address(ip("10.1.2.1")));
        assert!(!s.is_instance_address(ip("10.1.2.7")));
        assert!(!s.is_instance_address(ip("10.1.2.8")));
        assert!(s.is_instance_address(ip("10.1.2.6")));
    }

    #[test]
    fn overlaps() {
        let cases = [
            ("10.0.0.0/8", "10.88.0.0/16", true),
            ("10.88.0.0/16", "10.0.0.0/8", true),
            ("10.88.0.0/16", "10.88.0.0/16", true),
            ("10.88.0.0/16", "10.89.0.0/16", false),
            ("192.168.0.0/24", "192.168.0.248/29", true),
            ("192.168.0.0/25", "192.168.0.128/25", false),
            ("172.16.0.0/12", "172.32.0.0/16", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(net(a).overlaps(&net(b)), want, "{a} vs {b}");
        }
    }

    fn open(dir: &tempfile::TempDir, subnet: &str) -> Ipam {
        Ipam::open(&dir.path().join("ipam.json"), net(subnet)).unwrap()
    }

    #[test]
    fn allocates_in_order_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.9.0.0/24");
        assert_eq!(ipam.allocate("a").unwrap(), ip("10.9.0.2"));
        assert_eq!(ipam.allocate("b").unwrap(), ip("10.9.0.3"));
        assert_eq!(ipam.allocate("a").unwrap(), ip("10.9.0.2"));
        assert_eq!(ipam.allocations().count(), 2);
        assert_eq!(ipam.owner_of(ip("10.9.0.3")), Some("b"));
        assert_eq!(ipam.owner_of(ip("10.9.0.4")), None);
        assert_eq!(ipam.address_of("a"), Some(ip("10.9.0.2")));
        assert!(matches!(
            ipam.allocate(""),
            Err(IpamError::InvalidOwner { .. })
        ));
    }

    #[test]
    fn released_addresses_rotate_to_the_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.9.0.0/29");
        assert_eq!(ipam.allocate("a").unwrap(), ip("10.9.0.2"));
        assert_eq!(ipam.allocate("b").unwrap(), ip("10.9.0.3"));
        assert_eq!(ipam.release("a").unwrap(), Some(ip("10.9.0.2")));
        assert_eq!(ipam.release("a").unwrap(), None);
        // .2 is free but was just released: the cursor moves on.
        assert_eq!(ipam.allocate("c").unwrap(), ip("10.9.0.4"));
        assert_eq!(ipam.release("c").unwrap(), Some(ip("10.9.0.4")));
        assert_eq!(ipam.allocate("d").unwrap(), ip("10.9.0.5"));
        assert_eq!(ipam.allocate("e").unwrap(), ip("10.9.0.6"));
        // Wraps around to the lowest free address.
        assert_eq!(ipam.allocate("f").unwrap(), ip("10.9.0.2"));
        assert_eq!(ipam.allocate("g").unwrap(), ip("10.9.0.4"));
        // The cursor survives a reopen.
        ipam.release("d").unwrap();
        ipam.release("b").unwrap();
        let mut ipam = open(&dir, "10.9.0.0/29");
        assert_eq!(ipam.allocate("h").unwrap(), ip("10.9.0.5"));
        assert_eq!(ipam.allocate("i").unwrap(), ip("10.9.0.3"));
    }

    #[test]
    fn exhaustion_on_a_slash_29() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.9.0.8/29");
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("i{i}")).unwrap())
            .collect();
        assert_eq!(
            got,
            net("10.9.0.8/29").instance_addresses().collect::<Vec<_>>()
        );
        let err = ipam.allocate("one-too-many").unwrap_err();
        assert!(
            matches!(err, IpamError::Exhausted { in_use: 5, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "subnet 10.9.0.8/29 is exhausted: all 5 addresses for instances are in use \
             (the network, gateway and broadcast addresses are reserved)"
        );
        // Existing owners still get their address; a release makes room.
        assert_eq!(ipam.allocate("i0").unwrap(), ip("10.9.0.10"));
        ipam.release("i3").unwrap();
        assert_eq!(ipam.allocate("one-too-many").unwrap(), ip("10.9.0.13"));
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut ipam = open(&dir, "10.7.0.0/16");
        assert!(!path.exists(), "opening alone must not write");
        ipam.allocate("x").unwrap();
        ipam.allocate("y").unwrap();
        ipam.release("x").unwrap();
        drop(ipam);
        let ipam = open(&dir, "10.7.0.0/16");
        let all: Vec<_> = ipam.allocations().collect();
        assert_eq!(all, vec![(ip("10.7.0.3"), "y")]);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"10.7.0.3\": \"y\""), "{text}");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("ipam.json")]);
    }

    #[test]
    fn corrupt_state_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let cases = [
            (
                "{\"version\": 1, \"subnet\": \"10.7.0.0/16\", \"allocati",
                "parse ipam state file",
            ),
            ("", "parse ipam state file"),
            (
                r#"{"version": 1, "subnet": "10.7.0.0/16", "allocations": {"10.8.0.2": "a"}}"#,
                "address 10.8.0.2 of \"a\" is not an instance address of subnet 10.7.0.0/16",
            ),
            (
                r#"{"version": 1, "subnet": "10.7.0.0/16", "allocations": {"10.7.0.1": "a"}}"#,
                "address 10.7.0.1",
            ),
            (
                r#"{"version": 1, "subnet": "10.7.0.0/16",
                    "allocations": {"10.7.0.2": "a", "10.7.0.3": "a"}}"#,
                "owner \"a\" holds both 10.7.0.2 and 10.7.0.3",
            ),
            (
                r#"{"version": 9, "subnet": "10.7.0.0/16", "allocations": {}}"#,
                "unsupported version 9",
            ),
            (
                r#"{"version": 1, "subnet": "10.7.0.1/16", "allocations": {}}"#,
                "host bits set",
            ),
            (
                r#"{"version": 1, "subnet": "10.7.0.0/16", "allocations": {}, "x": 1}"#,
                "parse ipam state file",
            ),
        ];
        for (content, want) in cases {
            fs::write(&path, content).unwrap();
            let err = Ipam::open(&path, net("10.7.0.0/16")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(want), "{content}: {msg}");
            assert!(msg.contains("left in place"), "{msg}");
            assert_eq!(fs::read_to_string(&path).unwrap(), content);
        }
    }

    #[test]
    fn subnet_mismatch_names_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        open(&dir, "10.7.0.0/16").allocate("a").unwrap();
        let before = fs::read(&path).unwrap();
        let err = Ipam::open(&path, net("10.7.0.0/24")).unwrap_err();
        assert!(matches!(err, IpamError::SubnetMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("records subnet 10.7.0.0/16"), "{msg}");
        assert!(
            msg.contains("but subnet 10.7.0.0/24 is configured"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn reconcile_releases_vanished_owners() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = open(&dir, "10.7.0.0/24");
        for owner in ["a", "b", "c", "d"] {
            ipam.allocate(owner).unwrap();
        }
        let live: HashSet<String> = ["b", "d", "not-allocated"]
            .into_iter()
            .map(String::from)
            .collect();
        let released = ipam.reconcile(&live).unwrap();
        assert_eq!(
            released,
            vec![
                (ip("10.7.0.2"), "a".to_string()),
                (ip("10.7.0.4"), "c".to_string())
            ]
        );
        assert_eq!(ipam.address_of("a"), None);
        assert_eq!(ipam.owner_of(ip("10.7.0.3")), Some("b"));
        assert!(ipam.reconcile(&live).unwrap().is_empty());
        let reopened = open(&dir, "10.7.0.0/24");
        let all: Vec<_> = reopened.allocations().collect();
        assert_eq!(all, vec![(ip("10.7.0.3"), "b"), (ip("10.7.0.5"), "d")]);
        // A vanished owner that comes back gets a fresh address after the cursor.
        let mut ipam = reopened;
        assert_eq!(ipam.allocate("a").unwrap(), ip("10.7.0.6"));
    }

    #[test]
    fn failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir/ipam.json");
        let mut ipam = Ipam::open(&path, net("10.7.0.0/24")).unwrap();
        let err = ipam.allocate("a").unwrap_err();
        assert!(matches!(err, IpamError::Write { .. }), "{err:?}");
        assert!(err.to_string().contains("missing-dir/ipam.json"), "{err}");
        assert_eq!(ipam.address_of("a"), None);
        assert_eq!(ipam.allocations().count(), 0);
    }
}
