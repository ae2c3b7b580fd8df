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
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::{NetNs, NetnsError};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

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
    #[error("invalid mtu {mtu} for {name}: must be 68 to 65535")]
    InvalidMtu { name: String, mtu: u32 },
    #[error(
        "gateway {gateway}/{prefix} given for {name} does not match bridge {bridge} \
         ({bridge_gateway}/{bridge_prefix})"
    )]
    GatewayMismatch {
        name: String,
        gateway: Ipv4Addr,
        prefix: u8,
        bridge: String,
        bridge_gateway: Ipv4Addr,
        bridge_prefix: u8,
    },
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
    gateway: Ipv4Addr,
    prefix: u8,
}

impl Bridge {
    /// Makes sure bridge `name` exists with address `gateway/prefix` and is up. An existing
    /// bridge with no address or that address is adopted; a link of another kind, or a bridge
    /// with another address, is refused.
    pub fn ensure(name: &str, gateway: Ipv4Addr, prefix: u8) -> Result<Bridge, LinkError> {
        check_ifname(name)?;
        check_prefix(gateway, prefix)?;
        let index = on_host_thread(name, |handle| ensure_bridge(handle, name, gateway, prefix))?;
        tracing::debug!(bridge = name, %gateway, prefix, index, "bridge ready");
        Ok(Bridge {
            name: name.to_string(),
            index,
            gateway,
            prefix,
        })
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

    pub fn prefix(&self) -> u8 {
        self.prefix
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

/// Gives the instance in `netns` an `eth0` with `addr/prefix` and a default route via
/// `gateway`, joined by a veth pair whose host end `host_ifname` is attached to `bridge`.
/// `mtu`, if given, is set on both ends. On any failure nothing is left behind.
pub fn wire_instance(
    bridge: &Bridge,
    netns: &NetNs,
    host_ifname: &str,
    addr: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<(), LinkError> {
    check_ifname(host_ifname)?;
    if gateway != bridge.gateway || prefix != bridge.prefix {
        return Err(LinkError::GatewayMismatch {
            name: host_ifname.to_string(),
            gateway,
            prefix,
            bridge: bridge.name.clone(),
            bridge_gateway: bridge.gateway,
            bridge_prefix: bridge.prefix,
        });
    }
    check_host_address(addr, gateway, prefix)?;
    if let Some(mtu) = mtu
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

    let host_index = on_host_thread(host_ifname, |handle| {
        create_veth(handle, bridge, netns, &ns_file, host_ifname, mtu)
    })?;
    drop(ns_file);

    let configured = netns
        .run_in(|| {
            run_netlink(host_ifname, |handle| {
                configure_inside(handle, netns, addr, prefix, gateway)
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
        %addr,
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
fn on_host_thread<T, F, Fut>(name: &str, f: F) -> Result<T, LinkError>
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

/// The IPv4 addresses (with prefix lengths) on link `index`.
async fn ipv4_addresses(
    handle: &Handle,
    name: &str,
    index: u32,
) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut found = Vec::new();
    loop {
        let msg = stream
            .try_next()
            .await
            .map_err(|source| LinkError::Netlink {
                op: "list addresses",
                name: name.to_string(),
                source: Box::new(source),
            })?;
        let Some(msg) = msg else { break };
        if msg.header.index != index {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip))
            | AddressAttribute::Address(IpAddr::V4(ip)) = attr
            {
                let entry = (*ip, msg.header.prefix_len);
                if !found.contains(&entry) {
                    found.push(entry);
                }
            }
        }
    }
    Ok(found)
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
) -> Result<u32, LinkError> {
    let netlink = |op| {
        move |source| LinkError::Netlink {
            op,
            name: name.to_string(),
            source: Box::new(source),
        }
    };
    let (index, created) = match link_by_name(&handle, name).await? {
        Some(link) => {
            if link_kind(&link) != Some(&InfoKind::Bridge) {
                return Err(LinkError::Foreign {
                    name: name.to_string(),
                    reason: "not a bridge".to_string(),
                });
            }
            (link.header.index, false)
        }
        None => {
            match handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
            {
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
            (link.header.index, true)
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
        Ok(index)
    }
    .await;
    if configured.is_err() && created {
        delete_link(&handle, name, index).await?;
    }
    configured
}

/// Creates the veth pair in one request and returns the host end's index.
async fn create_veth(
    handle: Handle,
    bridge: &Bridge,
    netns: &NetNs,
    ns_file: &File,
    host_ifname: &str,
    mtu: Option<u32>,
) -> Result<u32, LinkError> {
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(INSTANCE_IFNAME)
        .append_extra_attribute(LinkAttribute::NetNsFd(ns_file.as_raw_fd()));
    let mut host = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_ifname)
        .controller(bridge.index)
        .up();
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
    let link = link_by_name(&handle, host_ifname)
        .await?
        .ok_or_else(|| LinkError::Vanished {
            name: host_ifname.to_string(),
        })?;
    Ok(link.header.index)
}

/// Inside the namespace: `eth0` up, its address, and the default route via the gateway.
async fn configure_inside(
    handle: Handle,
    netns: &NetNs,
    addr: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
) -> Result<(), LinkError> {
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
        .add(index, IpAddr::V4(addr), prefix)
        .execute()
        .await
        .map_err(netlink("add address"))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(netlink("add default route"))?;
    Ok(())
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
