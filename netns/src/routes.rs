//! The host's IPv4 routes, read over rtnetlink: which interface carries the default route (the
//! uplink egress traffic leaves by), and whether a subnet overlaps a route already there.

use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};

use crate::ipam::Subnet;
use crate::link::{LinkError, on_host_thread};

/// One IPv4 route of any table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    /// Index of the output interface; `None` for routes without one (blackhole, multipath).
    pub oif: Option<u32>,
    pub table: u32,
    /// Unicast (a reachable network) or local (an address of the host itself).
    pub local: bool,
    /// The route's metric (lower wins).
    pub priority: u32,
}

impl HostRoute {
    /// Whether the route's destination shares any address with `subnet`. Default routes
    /// (prefix 0) overlap nothing: they are where everything else goes.
    pub fn overlaps(&self, subnet: &Subnet) -> bool {
        if self.prefix == 0 {
            return false;
        }
        let shorter = self.prefix.min(subnet.prefix());
        let mask = u32::MAX << (32 - u32::from(shorter));
        u32::from(self.destination) & mask == u32::from(subnet.network()) & mask
    }
}

impl std::fmt::Display for HostRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.destination, self.prefix)?;
        if self.local {
            write!(f, " (a local address)")?;
        }
        write!(f, " in table {}", self.table)
    }
}

/// The unicast and local IPv4 routes of every table, in the calling thread's namespace.
pub fn ipv4_routes() -> Result<Vec<HostRoute>, LinkError> {
    on_host_thread("routes", |handle| async move {
        let mut stream = handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut routes = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(|source| LinkError::Netlink {
                op: "list routes",
                name: "(routes)".to_string(),
                source: Box::new(source),
            })?
        {
            let local = match msg.header.kind {
                RouteType::Unicast => false,
                RouteType::Local => true,
                _ => continue,
            };
            let mut route = HostRoute {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix: msg.header.destination_prefix_length,
                oif: None,
                table: u32::from(msg.header.table),
                local,
                priority: 0,
            };
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(dst)) => {
                        route.destination = *dst
                    }
                    RouteAttribute::Oif(oif) => route.oif = Some(*oif),
                    RouteAttribute::Table(table) => route.table = *table,
                    RouteAttribute::Priority(priority) => route.priority = *priority,
                    // A multipath route: its first hop's interface.
                    RouteAttribute::MultiPath(hops) if route.oif.is_none() => {
                        route.oif = hops.first().map(|hop| hop.interface_index)
                    }
                    _ => {}
                }
            }
            routes.push(route);
        }
        Ok(routes)
    })
}

/// The interface index of the main table's IPv4 default route with the lowest metric, if any.
pub fn default_route_oif() -> Result<Option<u32>, LinkError> {
    Ok(ipv4_routes()?
        .into_iter()
        .filter(|r| r.prefix == 0 && !r.local && r.table == MAIN_TABLE && r.oif.is_some())
        .min_by_key(|r| r.priority)
        .and_then(|r| r.oif))
}

/// `RT_TABLE_MAIN`.
pub const MAIN_TABLE: u32 = 254;

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: [u8; 4], prefix: u8) -> HostRoute {
        HostRoute {
            destination: Ipv4Addr::from(dst),
            prefix,
            oif: Some(2),
            table: MAIN_TABLE,
            local: false,
            priority: 0,
        }
    }

    #[test]
    fn overlap_is_checked_both_ways() {
        let subnet = Subnet::parse("10.73.0.0/16").unwrap();
        assert!(route([10, 73, 4, 0], 24).overlaps(&subnet));
        assert!(route([10, 0, 0, 0], 8).overlaps(&subnet));
        assert!(route([10, 73, 0, 9], 32).overlaps(&subnet));
        assert!(!route([10, 74, 0, 0], 16).overlaps(&subnet));
        assert!(!route([192, 168, 1, 0], 24).overlaps(&subnet));
        assert!(!route([0, 0, 0, 0], 0).overlaps(&subnet));
    }
}
