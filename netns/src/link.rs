//! The host bridge and one veth pair per instance, over rtnetlink (no `ip` commands).
//!
//! Every operation opens its own netlink socket on a dedicated thread with a current-thread
//! tokio runtime, so it is safe to call from anywhere, including from inside an async runtime
//! (where it blocks the calling thread for the few hundred microseconds the requests take).
//! Work inside an instance's namespace runs on a thread that has entered it
//! ([`NetNs::run_in`]), so its netlink socket belongs to that namespace.
//!
//! An instance's veth pair is made in one request: the host end (named by the caller) is
//! attached to the bridge and brought up, and the peer is created directly inside the
//! namespace as `eth0` (`IFLA_NET_NS_FD` on the peer), so no temporary name ever appears on the
//! host and there is nothing to rename. The kernel creates both ends or neither.
//!
//! Links that lull did not make are never deleted or changed: a name taken by a link of the
//! wrong kind, or a bridge with a different address, is reported and refused.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::{NetNs, NetnsError};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// The most ports a Linux bridge takes (the kernel's `BR_MAX_PORTS` is 1024, and port number 0
/// is never given out): the most instances one host's network holds.
pub const MAX_BRIDGE_PORTS: usize = 1023;

/// The alias that marks a bridge as lull's: an existing bridge without it is never adopted.
pub const BRIDGE_ALIAS: &str = "lull bridge";

/// A random locally administered unicast MAC address for a new bridge.
fn bridge_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let random = File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut mac)
    });
    if random.is_err() {
        // Not fatal: the address only has to be stable and unlikely to clash on this host.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        mac.copy_from_slice(&(nanos as u64 ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Name of the instance's end of its veth pair, inside its namespace.
pub const INSTANCE_IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid prefix length /{prefix} for {gateway}: must be 1 to 30")]
    InvalidPrefix { gateway: Ipv4Addr, prefix: u8 },
    #[error("address {addr} is not a usable host address in {gateway}/{prefix}: {reason}")]
    InvalidAddress {
        addr: Ipv4Addr,
        gateway: Ipv4Addr,
        prefix: u8,
        reason: &'static str,
    },
    #[error("invalid IPv6 prefix length /{prefix} for {gateway}: must be 1 to 126")]
    InvalidPrefix6 { gateway: Ipv6Addr, prefix: u8 },
    #[error(
        "IPv6 address {addr} given but bridge {bridge} has no IPv6 subnet or uses it as gateway"
    )]
    InvalidAddress6 { addr: Ipv6Addr, bridge: String },
    #[error("invalid mtu {mtu} for {name}: must be 68 to 65535")]
    InvalidMtu { name: String, mtu: u32 },
    #[error("link {name} exists and is not lull's ({reason}); refusing to touch it")]
    Foreign { name: String, reason: String },
    #[error("link {name} already exists, or {netns} already has an {INSTANCE_IFNAME}")]
    Exists { name: String, netns: PathBuf },
    #[error("link {name} vanished while being set up")]
    Vanished { name: String },
    #[error("{op} for link {name}")]
    Netlink {
        op: &'static str,
        name: String,
        source: Box<rtnetlink::Error>,
    },
    #[error("{op} for link {name} in network namespace {netns}")]
    NetlinkInNamespace {
        op: &'static str,
        name: String,
        netns: PathBuf,
        source: Box<rtnetlink::Error>,
    },
    #[error("open a netlink socket for link {name}")]
    Socket { name: String, source: io::Error },
    #[error("network namespace for link {name}")]
    Namespace { name: String, source: NetnsError },
    #[error("open network namespace {path} for link {name}")]
    OpenNamespace {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the netlink thread for link {name} panicked")]
    ThreadPanicked { name: String },
}

/// The host bridge instances are attached to, holding the gateway address of their subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    name: String,
    index: u32,
    /// The bridge's own MAC address: the instances' permanent neighbour entry for the gateway.
    mac: [u8; 6],
    gateway: Ipv4Addr,
    prefix: u8,
    gateway6: Option<(Ipv6Addr, u8)>,
}

impl Bridge {
    /// Makes sure bridge `name` exists with address `gateway/prefix` and is up. A new bridge
    /// gets a fixed random MAC address and the alias [`BRIDGE_ALIAS`]; an existing bridge with
    /// that alias and no address or that address is adopted; a link of another kind, a bridge
    /// without the alias, or one with another address, is refused.
    pub fn ensure(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<Bridge, LinkError> {
        check_ifname(name)?;
        check_prefix(gateway, prefix)?;
        let (index, mac) =
            on_host_thread(name, |handle| ensure_bridge(handle, name, gateway, prefix))?;
        tracing::debug!(bridge = name, %gateway, prefix, index, "bridge ready");
        Ok(Bridge {
            name: name.to_string(),
            index,
            mac,
            gateway,
            prefix,
            gateway6: None,
        })
    }

    /// Makes sure the bridge also holds the IPv6 gateway `gateway6/prefix6` (without duplicate
    /// address detection, so it is usable at once). Another global IPv6 address on the bridge is
    /// refused.
    pub fn ensure_ipv6(&mut self, gateway6: Ipv6Addr, prefix6: u8) -> Result<(), LinkError> {
        if !(1..=126).contains(&prefix6) {
            return Err(LinkError::InvalidPrefix6 {
                gateway: gateway6,
                prefix: prefix6,
            });
        }
        let (name, index) = (self.name.as_str(), self.index);
        on_host_thread(name, |handle| async move {
            let present = ipv6_global_addresses(&handle, name, index).await?;
            if let Some((other, other_prefix)) =
                present.iter().find(|entry| **entry != (gateway6, prefix6))
            {
                return Err(LinkError::Foreign {
                    name: name.to_string(),
                    reason: format!("has address {other}/{other_prefix}, not {gateway6}/{prefix6}"),
                });
            }
            if present.is_empty() {
                add_address_nodad(&handle, index, IpAddr::V6(gateway6), prefix6)
                    .await
                    .map_err(|source| LinkError::Netlink {
                        op: "add IPv6 address",
                        name: name.to_string(),
                        source: Box::new(source),
                    })?;
            }
            Ok(())
        })?;
        self.gateway6 = Some((gateway6, prefix6));
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The bridge's MAC address (fixed when lull made it).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The IPv6 gateway and prefix length, if the bridge has an IPv6 subnet.
    pub fn gateway6(&self) -> Option<(Ipv6Addr, u8)> {
        self.gateway6
    }

    /// Deletes the bridge (its ports are detached, not deleted). Already gone is fine; a
    /// different link that has since taken the name is refused.
    pub fn remove(self) -> Result<(), LinkError> {
        let name = self.name.as_str();
        on_host_thread(name, |handle| async move {
            let Some(link) = link_by_name(&handle, name).await? else {
                return Ok(());
            };
            if link.header.index != self.index || link_kind(&link) != Some(&InfoKind::Bridge) {
                return Err(LinkError::Foreign {
                    name: name.to_string(),
                    reason: "not the bridge lull set up".to_string(),
                });
            }
            delete_link(&handle, name, self.index).await
        })?;
        tracing::debug!(bridge = name, "bridge removed");
        Ok(())
    }
}

/// One instance's veth pair, as [`wire_instance`] makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceLink<'a> {
    /// Name of the host end, attached to the bridge.
    pub host_ifname: &'a str,
    /// Alias set on the host end (`IFLA_IFALIAS`): what marks the link as lull's and names
    /// its instance, so a restart can tell its own links from anyone else's.
    pub alias: &'a str,
    /// The instance's IPv4 address, configured as a /32 on its `eth0`.
    pub addr: Ipv4Addr,
    /// The instance's IPv6 address (a /128), when the bridge has an IPv6 subnet.
    pub addr6: Option<Ipv6Addr>,
    /// MTU of both ends; the kernel's default when `None`.
    pub mtu: Option<u32>,
}

/// Gives the instance in `netns` an `eth0` joined by a veth pair to `bridge`.
///
/// The instance's address is a /32 (and its IPv6 one a /128) with an on-link default route via
/// the bridge's gateway, and the host end is an *isolated* bridge port: instances never reach
/// each other at layer 2, so everything they send crosses the host's IP layer and its firewall.
/// On any failure nothing is left behind.
pub fn wire_instance(
    bridge: &Bridge,
    netns: &NetNs,
    link: &InstanceLink<'_>,
) -> Result<(), LinkError> {
    let host_ifname = link.host_ifname;
    check_ifname(host_ifname)?;
    check_host_address(link.addr, bridge.gateway, bridge.prefix)?;
    let gateway6 = match (link.addr6, bridge.gateway6) {
        (None, _) => None,
        (Some(addr6), Some((gateway6, _))) if addr6 != gateway6 => Some(gateway6),
        (Some(addr6), _) => {
            return Err(LinkError::InvalidAddress6 {
                addr: addr6,
                bridge: bridge.name.clone(),
            });
        }
    };
    if let Some(mtu) = link.mtu
        && !(68..=65535).contains(&mtu)
    {
        return Err(LinkError::InvalidMtu {
            name: host_ifname.to_string(),
            mtu,
        });
    }
    let ns_file = File::open(netns.path()).map_err(|source| LinkError::OpenNamespace {
        name: host_ifname.to_string(),
        path: netns.path().to_path_buf(),
        source,
    })?;

    // Created down, marked and isolated, then up: the port never forwards a frame before it is
    // isolated, and a crash in between leaves a link that is down, not one talking freely.
    let host_index = on_host_thread(host_ifname, |handle| async move {
        let mac = instance_mac(link.addr);
        let index =
            create_veth(&handle, bridge, netns, &ns_file, host_ifname, mac, link.mtu).await?;
        let marked = async {
            mark_port(&handle, host_ifname, index, link.alias).await?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|source| LinkError::Netlink {
                    op: "set up",
                    name: host_ifname.to_string(),
                    source: Box::new(source),
                })?;
            for ip in [Some(IpAddr::V4(link.addr)), link.addr6.map(IpAddr::V6)]
                .into_iter()
                .flatten()
            {
                add_permanent_neighbour(&handle, bridge.index, ip, mac)
                    .await
                    .map_err(|source| LinkError::Netlink {
                        op: "add the instance's neighbour entry on the bridge",
                        name: bridge.name.clone(),
                        source: Box::new(source),
                    })?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = marked {
            delete_link(&handle, host_ifname, index).await?;
            return Err(err);
        }
        Ok(index)
    })?;

    let inside = Inside {
        addr: link.addr,
        gateway: bridge.gateway,
        gateway_mac: bridge.mac,
        v6: link.addr6.zip(gateway6),
    };
    let configured = netns
        .run_in(|| {
            run_netlink(host_ifname, |handle| {
                configure_inside(handle, netns, inside)
            })
        })
        .map_err(|source| LinkError::Namespace {
            name: host_ifname.to_string(),
            source,
        })
        .and_then(|result| result);
    if let Err(err) = configured {
        // Deleting the host end deletes its peer in the namespace too.
        let undone = on_host_thread(host_ifname, |handle| async move {
            delete_link(&handle, host_ifname, host_index).await
        });
        if let Err(undo_err) = undone {
            tracing::warn!(link = host_ifname, error = %undo_err, "could not undo a failed wiring");
        }
        return Err(err);
    }
    tracing::debug!(
        link = host_ifname,
        netns = %netns.path().display(),
        addr = %link.addr,
        bridge = bridge.name,
        "instance wired"
    );
    Ok(())
}

/// Deletes the host end `host_ifname` of an instance's veth pair, and with it the instance's
/// `eth0`. Already gone is fine; a link of that name that is not a veth is refused.
pub fn unwire_instance(host_ifname: &str) -> Result<(), LinkError> {
    check_ifname(host_ifname)?;
    on_host_thread(host_ifname, |handle| async move {
        let Some(link) = link_by_name(&handle, host_ifname).await? else {
            return Ok(());
        };
        if link_kind(&link) != Some(&InfoKind::Veth) {
            return Err(LinkError::Foreign {
                name: host_ifname.to_string(),
                reason: "not a veth".to_string(),
            });
        }
        delete_link(&handle, host_ifname, link.header.index).await
    })?;
    tracing::debug!(link = host_ifname, "instance unwired");
    Ok(())
}

/// Deletes bridge `name` if it is lull's (a bridge with [`BRIDGE_ALIAS`]); returns whether
/// there was one. Another link of that name is refused.
pub fn remove_bridge(name: &str) -> Result<bool, LinkError> {
    check_ifname(name)?;
    on_host_thread(name, |handle| async move {
        let Some(link) = link_by_name(&handle, name).await? else {
            return Ok(false);
        };
        let alias = to_host_link(&link).alias;
        if link_kind(&link) != Some(&InfoKind::Bridge) || alias.as_deref() != Some(BRIDGE_ALIAS) {
            return Err(LinkError::Foreign {
                name: name.to_string(),
                reason: "not the bridge lull set up".to_string(),
            });
        }
        delete_link(&handle, name, link.header.index).await?;
        Ok(true)
    })
}

/// A link on the host, as [`host_links`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub name: String,
    pub index: u32,
    /// `veth`, `bridge`, ...; `None` for links without a kind (physical devices, `lo`).
    pub kind: Option<String>,
    /// The alias (`IFLA_IFALIAS`), which marks lull's veth ends.
    pub alias: Option<String>,
    /// Index of the bridge (or other controller) the link is attached to.
    pub controller: Option<u32>,
    pub mtu: Option<u32>,
}

impl HostLink {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// The links in the calling thread's network namespace whose name starts with `prefix` (all of
/// them for `""`).
pub fn host_links(prefix: &str) -> Result<Vec<HostLink>, LinkError> {
    on_host_thread("(all)", |handle| async move {
        let mut stream = handle.link().get().execute();
        let mut links = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|source| LinkError::Netlink {
                op: "list links",
                name: "(all)".to_string(),
                source: Box::new(source),
            })?
        {
            let link = to_host_link(&msg);
            if link.name.starts_with(prefix) {
                links.push(link);
            }
        }
        Ok(links)
    })
}

/// Link `name`, if it exists.
pub fn host_link(name: &str) -> Result<Option<HostLink>, LinkError> {
    check_ifname(name)?;
    on_host_thread(name, |handle| async move {
        Ok(link_by_name(&handle, name)
            .await?
            .as_ref()
            .map(to_host_link))
    })
}

fn to_host_link(msg: &LinkMessage) -> HostLink {
    let mut link = HostLink {
        name: String::new(),
        index: msg.header.index,
        kind: link_kind(msg).map(|kind| kind.to_string()),
        alias: None,
        controller: None,
        mtu: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::IfAlias(alias) => link.alias = Some(alias.clone()),
            LinkAttribute::Controller(index) => link.controller = Some(*index),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            _ => {}
        }
    }
    link
}

/// Checks a name the way the kernel's `dev_valid_name` does, with readable reasons.
pub fn check_ifname(name: &str) -> Result<(), LinkError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("not a valid name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LinkError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_prefix(gateway: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
    if (1..=30).contains(&prefix) {
        Ok(())
    } else {
        Err(LinkError::InvalidPrefix { gateway, prefix })
    }
}

/// `addr` must be a host address of `gateway/prefix` other than the gateway itself.
fn check_host_address(addr: Ipv4Addr, gateway: Ipv4Addr, prefix: u8) -> Result<(), LinkError> {
    check_prefix(gateway, prefix)?;
    let mask = u32::MAX << (32 - u32::from(prefix));
    let network = u32::from(gateway) & mask;
    let broadcast = network | !mask;
    let a = u32::from(addr);
    let reason = if a & mask != network {
        Some("outside the subnet")
    } else if a == network {
        Some("the network address")
    } else if a == broadcast {
        Some("the broadcast address")
    } else if addr == gateway {
        Some("the gateway")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LinkError::InvalidAddress {
            addr,
            gateway,
            prefix,
            reason,
        }),
        None => Ok(()),
    }
}

/// Runs `f` with a fresh netlink handle on a new thread, which starts in the calling thread's
/// network namespace: the host's, unless called from inside [`NetNs::run_in`].
pub(crate) fn on_host_thread<T, F, Fut>(name: &str, f: F) -> Result<T, LinkError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, LinkError>>,
{
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name(format!("netlink-{name}"))
            .spawn_scoped(scope, || run_netlink(name, f))
            .map_err(|source| LinkError::Socket {
                name: name.to_string(),
                source,
            })?;
        worker.join().map_err(|_| LinkError::ThreadPanicked {
            name: name.to_string(),
        })?
    })
}

/// Runs `f` with a netlink handle opened in the calling thread's network namespace, on a
/// current-thread runtime. Must not be called from inside an async runtime.
fn run_netlink<T, F, Fut>(name: &str, f: F) -> Result<T, LinkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, LinkError>>,
{
    let socket_error = |source| LinkError::Socket {
        name: name.to_string(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(socket_error)?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(socket_error)?;
        let connection = tokio::spawn(connection);
        let result = f(handle).await;
        connection.abort();
        result
    })
}

fn is_errno(err: &rtnetlink::Error, errno: i32) -> bool {
    matches!(err, rtnetlink::Error::NetlinkError(msg) if msg.raw_code() == -errno)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, LinkError> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(err) if is_errno(&err, libc::ENODEV) => Ok(None),
        Err(source) => Err(LinkError::Netlink {
            op: "look up",
            name: name.to_string(),
            source: Box::new(source),
        }),
    }
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

/// The addresses (with prefix lengths) on link `index`: IPv4 ones, and IPv6 ones of global
/// scope (not the link-local address every link gets).
async fn link_addresses(
    handle: &Handle,
    name: &str,
    index: u32,
) -> Result<Vec<(IpAddr, u8)>, LinkError> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut found = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|source| LinkError::Netlink {
            op: "list addresses",
            name: name.to_string(),
            source: Box::new(source),
        })?
    {
        if msg.header.index != index {
            continue;
        }
        for attr in &msg.attributes {
            let ip = match attr {
                AddressAttribute::Local(ip @ IpAddr::V4(_))
                | AddressAttribute::Address(ip @ IpAddr::V4(_)) => *ip,
                AddressAttribute::Address(ip @ IpAddr::V6(_))
                    if msg.header.scope == AddressScope::Universe =>
                {
                    *ip
                }
                _ => continue,
            };
            let entry = (ip, msg.header.prefix_len);
            if !found.contains(&entry) {
                found.push(entry);
            }
        }
    }
    Ok(found)
}

async fn ipv4_addresses(
    handle: &Handle,
    name: &str,
    index: u32,
) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
    Ok(link_addresses(handle, name, index)
        .await?
        .into_iter()
        .filter_map(|(ip, prefix)| match ip {
            IpAddr::V4(v4) => Some((v4, prefix)),
            IpAddr::V6(_) => None,
        })
        .collect())
}

async fn delete_link(handle: &Handle, name: &str, index: u32) -> Result<(), LinkError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(err) if is_errno(&err, libc::ENODEV) => Ok(()),
        Err(source) => Err(LinkError::Netlink {
            op: "delete",
            name: name.to_string(),
            source: Box::new(source),
        }),
    }
}

async fn ensure_bridge(
    handle: Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<(u32, [u8; 6]), LinkError> {
    let netlink = |op| {
        move |source| LinkError::Netlink {
            op,
            name: name.to_string(),
            source: Box::new(source),
        }
    };
    let (index, mac, created) = match link_by_name(&handle, name).await? {
        Some(link) => {
            if link_kind(&link) != Some(&InfoKind::Bridge) {
                return Err(LinkError::Foreign {
                    name: name.to_string(),
                    reason: "not a bridge".to_string(),
                });
            }
            let alias = to_host_link(&link).alias;
            if alias.as_deref() != Some(BRIDGE_ALIAS) {
                return Err(LinkError::Foreign {
                    name: name.to_string(),
                    reason: format!(
                        "a bridge lull did not make (its alias is {alias:?}, not {BRIDGE_ALIAS:?})"
                    ),
                });
            }
            let mac = link_mac(&link).ok_or_else(|| LinkError::Foreign {
                name: name.to_string(),
                reason: "has no MAC address".to_string(),
            })?;
            (link.header.index, mac, false)
        }
        None => {
            // A fixed address: a bridge without one takes the lowest of its ports' addresses,
            // so it would change as instances come and go, and the instances' permanent
            // neighbour entries for the gateway would point at the old one.
            let mac = bridge_mac();
            let message = LinkBridge::new(name).address(mac.to_vec()).build();
            match handle.link().add(message).execute().await {
                Ok(()) => {}
                // Made by someone else in the meantime: refuse rather than adopt blindly.
                Err(err) if is_errno(&err, libc::EEXIST) => {
                    return Err(LinkError::Foreign {
                        name: name.to_string(),
                        reason: "created concurrently by someone else".to_string(),
                    });
                }
                Err(source) => return Err(netlink("create bridge")(source)),
            }
            let link = link_by_name(&handle, name)
                .await?
                .ok_or_else(|| LinkError::Vanished {
                    name: name.to_string(),
                })?;
            let index = link.header.index;
            let marked = handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .alias(BRIDGE_ALIAS)
                        .build(),
                )
                .execute()
                .await;
            if let Err(source) = marked {
                delete_link(&handle, name, index).await?;
                return Err(netlink("set alias")(source));
            }
            (index, mac, true)
        }
    };
    let configured = async {
        let addresses = ipv4_addresses(&handle, name, index).await?;
        if let Some((other, other_prefix)) =
            addresses.iter().find(|entry| **entry != (gateway, prefix))
        {
            return Err(LinkError::Foreign {
                name: name.to_string(),
                reason: format!("has address {other}/{other_prefix}, not {gateway}/{prefix}"),
            });
        }
        if addresses.is_empty() {
            handle
                .address()
                .add(index, IpAddr::V4(gateway), prefix)
                .execute()
                .await
                .map_err(netlink("add address"))?;
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink("set up"))?;
        Ok((index, mac))
    }
    .await;
    if configured.is_err() && created {
        delete_link(&handle, name, index).await?;
    }
    configured
}

/// A link's MAC address (`IFLA_ADDRESS`), if it has a six-byte one.
fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => bytes.as_slice().try_into().ok(),
        _ => None,
    })
}

/// The MAC address of the instance whose IPv4 address is `addr`: `02:6c` (locally
/// administered, `l`) then the address's four bytes. Derived, not random, so the host's
/// permanent neighbour entry for an address is right for whichever instance holds it, and one
/// left behind by a crash is harmless.
pub fn instance_mac(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x6c, a, b, c, d]
}

/// Creates the veth pair in one request and returns the host end's index.
async fn create_veth(
    handle: &Handle,
    bridge: &Bridge,
    netns: &NetNs,
    ns_file: &File,
    host_ifname: &str,
    peer_mac: [u8; 6],
    mtu: Option<u32>,
) -> Result<u32, LinkError> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(INSTANCE_IFNAME)
        .address(peer_mac.to_vec())
        .append_extra_attribute(LinkAttribute::NetNsFd(ns_file.as_raw_fd()));
    let mut host = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_ifname)
        .controller(bridge.index);
    if let Some(mtu) = mtu {
        peer = peer.mtu(mtu);
        host = host.mtu(mtu);
    }
    let message = host
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    match handle.link().add(message).execute().await {
        Ok(()) => {}
        Err(err) if is_errno(&err, libc::EEXIST) => {
            return Err(LinkError::Exists {
                name: host_ifname.to_string(),
                netns: netns.path().to_path_buf(),
            });
        }
        Err(source) => {
            return Err(LinkError::Netlink {
                op: "create veth pair",
                name: host_ifname.to_string(),
                source: Box::new(source),
            });
        }
    }
    let link = link_by_name(handle, host_ifname)
        .await?
        .ok_or_else(|| LinkError::Vanished {
            name: host_ifname.to_string(),
        })?;
    Ok(link.header.index)
}

/// Marks the host end as lull's (its alias) and makes it an isolated bridge port, in one request.
async fn mark_port(
    handle: &Handle,
    host_ifname: &str,
    index: u32,
    alias: &str,
) -> Result<(), LinkError> {
    // RTM_NEWLINK on the existing link: RTM_SETLINK would ignore the bridge port settings.
    let message = LinkBridgePort::new(index)
        .isolated(true)
        .alias(alias)
        .build();
    handle
        .link()
        .set_port(message)
        .execute()
        .await
        .map_err(|source| LinkError::Netlink {
            op: "set alias and isolate bridge port",
            name: host_ifname.to_string(),
            source: Box::new(source),
        })
}

/// What goes on the instance's `eth0`.
#[derive(Debug, Clone, Copy)]
struct Inside {
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    /// The bridge's MAC address, the gateways' permanent neighbour entry.
    gateway_mac: [u8; 6],
    /// The instance's IPv6 address and the bridge's IPv6 gateway.
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
}

/// Inside the namespace: `eth0` up, its /32 (and /128), and on-link default routes via the
/// gateways.
async fn configure_inside(handle: Handle, netns: &NetNs, inside: Inside) -> Result<(), LinkError> {
    let netlink = |op| {
        move |source| LinkError::NetlinkInNamespace {
            op,
            name: INSTANCE_IFNAME.to_string(),
            netns: netns.path().to_path_buf(),
            source: Box::new(source),
        }
    };
    let index = link_by_name(&handle, INSTANCE_IFNAME)
        .await?
        .ok_or_else(|| LinkError::Vanished {
            name: INSTANCE_IFNAME.to_string(),
        })?
        .header
        .index;
    // Created down: the kernel refuses (ENOTCONN) IFF_UP on a peer made in another namespace.
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink("set up"))?;
    handle
        .address()
        .add(index, IpAddr::V4(inside.addr), 32)
        .execute()
        .await
        .map_err(netlink("add address"))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(inside.gateway)
        .output_interface(index)
        .onlink()
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(netlink("add default route"))?;
    add_permanent_neighbour(
        &handle,
        index,
        IpAddr::V4(inside.gateway),
        inside.gateway_mac,
    )
    .await
    .map_err(netlink("add the gateway's neighbour entry"))?;
    if let Some((addr6, gateway6)) = inside.v6 {
        add_permanent_neighbour(&handle, index, IpAddr::V6(gateway6), inside.gateway_mac)
            .await
            .map_err(netlink("add the IPv6 gateway's neighbour entry"))?;
        add_address_nodad(&handle, index, IpAddr::V6(addr6), 128)
            .await
            .map_err(netlink("add IPv6 address"))?;
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gateway6)
            .output_interface(index)
            .onlink()
            .build();
        handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(netlink("add IPv6 default route"))?;
    }
    Ok(())
}

/// Adds (or replaces) a permanent neighbour entry: `ip` is at `mac` on link `index`.
///
/// Every instance has two, made when it is wired: the host's entry for the instance on the
/// bridge and the instance's entry for the gateway. So neither side ever resolves the other
/// (no ARP or neighbour discovery on the first packet of a cold start), and the entries sit
/// outside the kernel's neighbour garbage collection: its table is shared by every namespace,
/// and dynamic entries past `gc_thresh3` (1024 by default, two per instance) are refused,
/// which cut hosts off from their instances past about 500 of them.
async fn add_permanent_neighbour(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    mac: [u8; 6],
) -> Result<(), rtnetlink::Error> {
    handle
        .neighbours()
        .add(index, ip)
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
}

/// Removes the host's permanent neighbour entries for an instance's addresses from bridge
/// `bridge`. Entries (or a bridge) already gone are fine; a wrong entry left behind would be
/// harmless anyway, since an address's MAC is derived from it ([`instance_mac`]).
pub fn forget_instance_neighbours(bridge: &str, addrs: &[IpAddr]) -> Result<(), LinkError> {
    check_ifname(bridge)?;
    on_host_thread(bridge, |handle| async move {
        let Some(link) = link_by_name(&handle, bridge).await? else {
            return Ok(());
        };
        for ip in addrs {
            let mut message = NeighbourMessage::default();
            message.header.family = match ip {
                IpAddr::V4(_) => AddressFamily::Inet,
                IpAddr::V6(_) => AddressFamily::Inet6,
            };
            message.header.ifindex = link.header.index;
            message
                .attributes
                .push(NeighbourAttribute::Destination(match ip {
                    IpAddr::V4(v4) => NeighbourAddress::Inet(*v4),
                    IpAddr::V6(v6) => NeighbourAddress::Inet6(*v6),
                }));
            match handle.neighbours().del(message).execute().await {
                Ok(()) => {}
                Err(err) if is_errno(&err, libc::ENOENT) => {}
                Err(source) => {
                    return Err(LinkError::Netlink {
                        op: "delete an instance's neighbour entry",
                        name: bridge.to_string(),
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(())
    })
}

/// Adds an address without duplicate address detection (IPv6 addresses would otherwise stay
/// tentative, unusable, for a second or more).
async fn add_address_nodad(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), rtnetlink::Error> {
    let mut request = handle.address().add(index, addr, prefix);
    request
        .message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    request.execute().await
}

/// The global IPv6 addresses (with prefix lengths) on link `index`.
async fn ipv6_global_addresses(
    handle: &Handle,
    name: &str,
    index: u32,
) -> Result<Vec<(Ipv6Addr, u8)>, LinkError> {
    Ok(link_addresses(handle, name, index)
        .await?
        .into_iter()
        .filter_map(|(ip, prefix)| match ip {
            IpAddr::V6(v6) => Some((v6, prefix)),
            IpAddr::V4(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for good in ["eth0", "lull0", "a", "abcdefghijklmno"] {
            check_ifname(good).unwrap();
        }
        for bad in ["", "abcdefghijklmnop", ".", "..", "a/b", "a:b", "a b"] {
            let err = check_ifname(bad).unwrap_err();
            assert!(
                matches!(err, LinkError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn host_addresses_are_checked() {
        let gw = Ipv4Addr::new(10, 1, 2, 1);
        check_host_address(Ipv4Addr::new(10, 1, 2, 2), gw, 24).unwrap();
        check_host_address(Ipv4Addr::new(10, 1, 2, 254), gw, 24).unwrap();
        for (addr, reason) in [
            (Ipv4Addr::new(10, 1, 3, 2), "outside"),
            (Ipv4Addr::new(10, 1, 2, 0), "network"),
            (Ipv4Addr::new(10, 1, 2, 255), "broadcast"),
            (gw, "gateway"),
        ] {
            let err = check_host_address(addr, gw, 24).unwrap_err().to_string();
            assert!(
                err.contains(reason) && err.contains(&addr.to_string()),
                "{err}"
            );
        }
        assert!(matches!(
            check_host_address(Ipv4Addr::new(10, 1, 2, 2), gw, 31),
            Err(LinkError::InvalidPrefix { .. })
        ));
    }
}
