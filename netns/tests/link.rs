//! Privileged tests of the bridge and instance veth pairs: real links, real namespaces, traffic
//! only to addresses inside the test's own subnet. Every name carries the pid; a guard removes
//! links, the bridge and the namespaces even when an assertion fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lull_netns::NetNs;
use lull_netns::link::{
    Bridge, InstanceLink, LinkError, forget_instance_neighbours, instance_mac, unwire_instance,
    wire_instance,
};

/// Names and a free /24 for one test, and cleanup of whatever it made.
struct Fixture {
    tag: String,
    dir: PathBuf,
    gateway: Ipv4Addr,
    bridge: Option<Bridge>,
    bridge_name: String,
    veths: Vec<String>,
    namespaces: Vec<NetNs>,
}

impl Fixture {
    /// `slot` keeps tests of one run apart (names and subnets).
    fn new(slot: u32) -> Fixture {
        let pid = std::process::id();
        let tag = format!("lt{}{slot}", pid % 10000);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("lull-link-{tag}-{nanos}"));
        let gateway = free_subnet_gateway(pid.wrapping_mul(7).wrapping_add(slot * 61));
        Fixture {
            bridge_name: format!("{tag}b"),
            tag,
            dir,
            gateway,
            bridge: None,
            veths: Vec::new(),
            namespaces: Vec::new(),
        }
    }

    fn bridge(&mut self) -> Bridge {
        let bridge = Bridge::ensure(&self.bridge_name, self.gateway, 24).unwrap();
        self.bridge = Some(bridge.clone());
        bridge
    }

    fn netns(&mut self, name: &str) -> usize {
        self.namespaces
            .push(NetNs::create(&self.dir, name).unwrap());
        self.namespaces.len() - 1
    }

    /// A veth name for this test, remembered for cleanup.
    fn veth(&mut self, n: u32) -> String {
        let name = format!("{}-{n}", self.tag);
        assert!(name.len() <= 15, "{name}");
        self.veths.push(name.clone());
        name
    }

    fn host(&self, last: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.gateway.octets();
        Ipv4Addr::new(a, b, c, last)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for veth in &self.veths {
            let _ = unwire_instance(veth);
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = bridge.remove();
        }
        for ns in self.namespaces.drain(..) {
            let _ = ns.destroy();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The gateway (.1) of a 10.251.x.0/24 that no host route overlaps, starting the search at
/// `seed`.
fn free_subnet_gateway(seed: u32) -> Ipv4Addr {
    let routes = fs::read_to_string("/proc/net/route").unwrap();
    let taken: Vec<(u32, u32)> = routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            // /proc/net/route prints addresses in host (little-endian) byte order.
            Some((u32::from_be(dest.to_le()), u32::from_be(mask.to_le())))
        })
        .filter(|(_, mask)| *mask != 0)
        .collect();
    for i in 0..250 {
        let x = ((seed + i) % 250) as u8;
        let net = u32::from(Ipv4Addr::new(10, 251, x, 0));
        let clash = taken.iter().any(|(dest, mask)| {
            let common = mask & 0xffff_ff00;
            net & common == dest & common
        });
        if !clash {
            return Ipv4Addr::new(10, 251, x, 1);
        }
    }
    panic!("no free /24 in 10.251.0.0/16");
}

/// The spec of a test's veth pair: the host end `name`, marked with a test alias.
fn link(name: &str, addr: Ipv4Addr, mtu: Option<u32>) -> InstanceLink<'_> {
    InstanceLink {
        host_ifname: name,
        alias: "lull:test",
        addr,
        addr6: None,
        mtu,
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn links_with_prefix(prefix: &str) -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The IPv4 addresses of `eth0` in the calling thread's namespace.
fn eth0_addresses() -> Vec<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter(|ifa| ifa.interface_name == "eth0")
        .filter_map(|ifa| ifa.address?.as_sockaddr_in().map(|sin| sin.ip()))
        .collect()
}

/// The flags and MAC address of `ip`'s entry on `dev` in an ARP table (`/proc/net/arp`).
fn arp_entry(table: &str, ip: Ipv4Addr, dev: &str) -> Option<(String, String)> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.first() == Some(&ip.to_string().as_str()) && f.get(5) == Some(&dev))
            .then(|| (f[2].to_string(), f[3].to_string()))
    })
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn ping_pong(listener: &TcpListener, addr: SocketAddr, connect: impl FnOnce() -> TcpStream) {
    let mut client = connect();
    let (mut server, peer) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping", "from {peer} to {addr}");
}

#[test]
fn the_host_reaches_two_instances_on_isolated_ports() {
    let mut fx = Fixture::new(1);
    let bridge = fx.bridge();
    assert!(link_exists(&fx.bridge_name));
    // Ensuring again adopts the same bridge.
    assert_eq!(
        Bridge::ensure(&fx.bridge_name, fx.gateway, 24).unwrap(),
        bridge
    );

    let a = fx.netns("a");
    let b = fx.netns("b");
    let (veth_a, veth_b) = (fx.veth(0), fx.veth(1));
    let (addr_a, addr_b) = (fx.host(10), fx.host(11));
    wire_instance(
        &bridge,
        &fx.namespaces[a],
        &link(&veth_a, addr_a, Some(1400)),
    )
    .unwrap();
    wire_instance(&bridge, &fx.namespaces[b], &link(&veth_b, addr_b, None)).unwrap();

    // Host ends attached to the bridge; no eth0 appeared on the host.
    for veth in [&veth_a, &veth_b] {
        let master = fs::read_link(format!("/sys/class/net/{veth}/master")).unwrap();
        assert_eq!(master.file_name().unwrap(), fx.bridge_name.as_str());
    }
    let mtu = fs::read_to_string(format!("/sys/class/net/{veth_a}/mtu")).unwrap();
    assert_eq!(mtu.trim(), "1400");
    assert_eq!(
        fx.namespaces[a].run_in(eth0_addresses).unwrap(),
        vec![addr_a]
    );
    assert_eq!(
        fx.namespaces[b].run_in(eth0_addresses).unwrap(),
        vec![addr_b]
    );

    let listener = fx.namespaces[a]
        .run_in(|| TcpListener::bind((addr_a, 0)))
        .unwrap()
        .unwrap();
    let target = listener.local_addr().unwrap();
    // From the host, through the bridge.
    ping_pong(&listener, target, || {
        TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap()
    });
    // The host ends are isolated bridge ports, marked with their alias: instances never meet
    // at layer 2 (what they may say to each other is the firewall's business, at layer 3).
    for veth in [&veth_a, &veth_b] {
        let isolated = fs::read_to_string(format!("/sys/class/net/{veth}/brport/isolated"));
        assert_eq!(isolated.unwrap().trim(), "1", "{veth}");
        let alias = fs::read_to_string(format!("/sys/class/net/{veth}/ifalias")).unwrap();
        assert_eq!(alias.trim(), "lull:test", "{veth}");
    }
    // The gateway (the bridge's address on the host) is reachable from the instance.
    let gw_listener = TcpListener::bind((fx.gateway, 0)).unwrap();
    let gw_target = gw_listener.local_addr().unwrap();
    ping_pong(&gw_listener, gw_target, || {
        fx.namespaces[b]
            .run_in(|| TcpStream::connect_timeout(&gw_target, Duration::from_secs(5)))
            .unwrap()
            .unwrap()
    });
    // And the instance's default route points out of eth0.
    let has_default = fx.namespaces[b]
        .run_in(|| fs::read_to_string("/proc/thread-self/net/route"))
        .unwrap()
        .unwrap()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"eth0") && f.get(1) == Some(&"00000000")
        });
    assert!(has_default, "no default route via eth0 in the instance");

    // Permanent neighbour entries on both sides (flags 0x6: complete and permanent), so no ARP
    // is needed and the kernel's neighbour garbage collection never drops them: the host's for
    // each instance on the bridge, each instance's for the gateway, at the bridge's MAC.
    let host_arp = fs::read_to_string("/proc/thread-self/net/arp").unwrap();
    for addr in [addr_a, addr_b] {
        assert_eq!(
            arp_entry(&host_arp, addr, &fx.bridge_name),
            Some(("0x6".to_string(), mac_text(instance_mac(addr)))),
            "{host_arp}"
        );
    }
    let inside_arp = fx.namespaces[b]
        .run_in(|| fs::read_to_string("/proc/thread-self/net/arp"))
        .unwrap()
        .unwrap();
    assert_eq!(
        arp_entry(&inside_arp, fx.gateway, "eth0"),
        Some(("0x6".to_string(), mac_text(bridge.mac()))),
        "{inside_arp}"
    );
    forget_instance_neighbours(&fx.bridge_name, &[addr_b.into()]).unwrap();
    forget_instance_neighbours(&fx.bridge_name, &[addr_b.into()]).unwrap();
    let host_arp = fs::read_to_string("/proc/thread-self/net/arp").unwrap();
    assert_eq!(arp_entry(&host_arp, addr_b, &fx.bridge_name), None);

    unwire_instance(&veth_a).unwrap();
    unwire_instance(&veth_a).unwrap();
    assert!(!link_exists(&veth_a));
    assert!(fx.namespaces[a].run_in(eth0_addresses).unwrap().is_empty());
}

#[test]
fn failures_leave_no_link_and_foreign_links_are_refused() {
    let mut fx = Fixture::new(2);
    let bridge = fx.bridge();
    let ns = fx.netns("f");
    let veth = fx.veth(0);

    let outside = Ipv4Addr::new(192, 0, 2, 5);
    let err = wire_instance(&bridge, &fx.namespaces[ns], &link(&veth, outside, None)).unwrap_err();
    assert!(matches!(err, LinkError::InvalidAddress { .. }), "{err}");
    assert!(err.to_string().contains("192.0.2.5"), "{err}");
    assert!(!link_exists(&veth));

    let long = format!("{}-toolongname", fx.tag);
    let err =
        wire_instance(&bridge, &fx.namespaces[ns], &link(&long, fx.host(5), None)).unwrap_err();
    assert!(matches!(err, LinkError::InvalidName { .. }), "{err}");
    assert!(err.to_string().contains(&long), "{err}");
    assert!(!link_exists(&long));

    let err = wire_instance(
        &bridge,
        &fx.namespaces[ns],
        &link(&veth, fx.host(5), Some(20)),
    )
    .unwrap_err();
    assert!(matches!(err, LinkError::InvalidMtu { .. }), "{err}");
    assert!(!link_exists(&veth));

    // A namespace that already has an eth0: the second pair is refused as a whole, and the
    // first (not this call's to delete) stays.
    wire_instance(&bridge, &fx.namespaces[ns], &link(&veth, fx.host(5), None)).unwrap();
    let second = fx.veth(1);
    let err = wire_instance(
        &bridge,
        &fx.namespaces[ns],
        &link(&second, fx.host(6), None),
    )
    .unwrap_err();
    assert!(matches!(err, LinkError::Exists { .. }), "{err}");
    assert!(!link_exists(&second));
    assert!(link_exists(&veth));

    // A bridge name taken by a veth, or the bridge with another address: refused, untouched.
    let err = Bridge::ensure(&veth, fx.gateway, 24).unwrap_err();
    assert!(matches!(err, LinkError::Foreign { .. }), "{err}");
    assert!(link_exists(&veth));
    let other = Ipv4Addr::new(10, 251, fx.gateway.octets()[2], 129);
    let err = Bridge::ensure(&fx.bridge_name, other, 25).unwrap_err();
    assert!(matches!(err, LinkError::Foreign { .. }), "{err}");
    assert!(err.to_string().contains(&fx.bridge_name), "{err}");
    // unwire refuses what is not a veth.
    let err = unwire_instance(&fx.bridge_name).unwrap_err();
    assert!(matches!(err, LinkError::Foreign { .. }), "{err}");
    assert!(link_exists(&fx.bridge_name));

    let bridge_name = fx.bridge_name.clone();
    unwire_instance(&veth).unwrap();
    fx.bridge.take().unwrap().remove().unwrap();
    assert!(!link_exists(&bridge_name));
    assert!(links_with_prefix(&fx.tag).is_empty());
}

/// Adds a default route via `lo` in the calling thread's namespace, so that a later default
/// route via eth0 is refused (EEXIST) after the veth pair already exists.
fn add_default_route_via_lo() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().unwrap();
        tokio::spawn(connection);
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(lo)
            .build();
        handle.route().add(route).execute().await.unwrap();
    });
}

#[test]
fn a_failure_inside_the_namespace_undoes_the_veth_pair() {
    let mut fx = Fixture::new(4);
    let bridge = fx.bridge();
    let ns = fx.netns("u");
    fx.namespaces[ns].run_in(add_default_route_via_lo).unwrap();
    let veth = fx.veth(0);
    let err =
        wire_instance(&bridge, &fx.namespaces[ns], &link(&veth, fx.host(7), None)).unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::NetlinkInNamespace {
                op: "add default route",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&fx.namespaces[ns].path().display().to_string()),
        "{err}"
    );
    assert!(!link_exists(&veth), "host end {veth} left behind");
    let eth0_gone = fx.namespaces[ns]
        .run_in(|| nix::net::if_::if_nametoindex("eth0").is_err())
        .unwrap();
    assert!(eth0_gone, "eth0 left behind in the namespace");
    let ports = fs::read_dir(format!("/sys/class/net/{}/brif", fx.bridge_name))
        .unwrap()
        .count();
    assert_eq!(ports, 0);
}

#[test]
fn fifty_wire_unwire_cycles_leave_no_links() {
    let mut fx = Fixture::new(3);
    let bridge = fx.bridge();
    let ns = fx.netns("c");
    let veth = fx.veth(0);
    for i in 0..50u8 {
        wire_instance(
            &bridge,
            &fx.namespaces[ns],
            &link(&veth, fx.host(20 + i), None),
        )
        .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        assert!(link_exists(&veth), "cycle {i}");
        unwire_instance(&veth).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
    }
    assert!(!link_exists(&veth));
    assert!(fx.namespaces[ns].run_in(eth0_addresses).unwrap().is_empty());
    let ports = fs::read_dir(format!("/sys/class/net/{}/brif", fx.bridge_name))
        .unwrap()
        .count();
    assert_eq!(ports, 0);
    assert_eq!(links_with_prefix(&fx.tag), vec![fx.bridge_name.clone()]);
}
