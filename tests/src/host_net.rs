//! A "host" for network tests: a network namespace standing in for the machine (its bridge,
//! nftables table, forwarding and routes all live there), with an "uplink" namespace beside it
//! (198.18.0.0/30, the benchmarking range) holding the outside world's server. Nothing touches
//! the real host's network, and two runs never meet.

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lull_netns::NetNs;
use lull_netns::ipam::Subnet;
use lull_netns::link::{Bridge, InstanceLink, host_links, wire_instance};
use lull_netns::network::{HostNetwork, NetworkConfig};

use crate::scratch::ScratchDir;

/// The uplink's side of the /30: the host's address on it, and the server's.
pub const UPLINK_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const UPLINK_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const UPLINK_BRIDGE: &str = "uplink0";
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const REFUSED_WITHIN: Duration = Duration::from_millis(400);

/// A network namespace standing in for the host, with an uplink namespace beside it; both
/// vanish with the scratch dir (every mount under it is detached on drop).
pub struct Host {
    pub scratch: ScratchDir,
    pub ns: NetNs,
    pub uplink: NetNs,
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

impl Host {
    pub fn new() -> Host {
        crate::e2e::require_root();
        let scratch = ScratchDir::new("lull-net").unwrap();
        let ns = NetNs::create(&scratch.path().join("hosts"), "host").unwrap();
        let uplink = NetNs::create(&scratch.path().join("hosts"), "uplink").unwrap();
        let host = Host {
            scratch,
            ns,
            uplink,
        };
        host.run(|| {
            let bridge = Bridge::ensure(UPLINK_BRIDGE, UPLINK_HOST, 30).unwrap();
            wire_instance(
                &bridge,
                &host.uplink,
                &InstanceLink {
                    host_ifname: "uplink-v",
                    alias: "test uplink",
                    addr: UPLINK_SERVER,
                    addr6: None,
                    mtu: Some(1450),
                },
            )
            .unwrap();
        });
        host
    }

    /// Runs `f` on a thread inside the host namespace (threads and processes it starts stay
    /// there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run_in(f).unwrap()
    }

    /// A network config for this host: per-test names and dirs, the uplink, a /24.
    pub fn config(&self) -> NetworkConfig {
        test_config(self.scratch.path())
    }

    pub fn start(&self, config: NetworkConfig) -> HostNetwork {
        self.run(|| HostNetwork::start(config))
            .unwrap_or_else(|e| panic!("start: {e}"))
            .0
    }

    /// Runs a shell command (test setup only: `ip`, `nft`) inside the host namespace.
    pub fn sh(&self, script: &str) {
        sh_in(&self.ns, script);
    }

    /// Links of the host namespace whose name starts with `prefix`.
    pub fn links(&self, prefix: &str) -> Vec<String> {
        self.run(|| host_links(prefix))
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect()
    }
}

/// Runs a shell command (test setup only: `ip`, `nft`) inside `ns`.
pub fn sh_in(ns: &NetNs, script: &str) {
    let out = ns
        .run_in(|| Command::new("sh").arg("-ec").arg(script).output())
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The network settings of a test "host" whose files live under `dir`: per-test names, the
/// uplink, a /24, and a host resolv.conf as systemd-resolved leaves it (only its stub).
pub fn test_config(dir: &Path) -> NetworkConfig {
    let mut config = NetworkConfig::new(&dir.join("data"), &dir.join("run"));
    config.bridge = "lulltest0".into();
    config.table = "lulltest".into();
    config.veth_prefix = "ltv".into();
    config.subnet = Subnet::parse("10.73.0.0/24").unwrap();
    config.uplink = Some(UPLINK_BRIDGE.into());
    config.dns = vec!["192.0.2.53".parse().unwrap()];
    let resolv = dir.join("host-resolv.conf");
    fs::write(
        &resolv,
        "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example\n",
    )
    .unwrap();
    config.host_resolv_conf = resolv;
    config.resolved_conf = dir.join("no-resolved.conf");
    config
}
