//! Privileged tests of the nftables firewall. Each test works inside a network namespace of its
//! own (nft, like every child process, inherits the namespace of the thread that starts it), so
//! the host's ruleset and sysctls are never touched; a guard destroys the namespace, and with it
//! every table made in it, even when an assertion fails.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use lull_netns::NetNs;
use lull_netns::firewall::{
    Firewall, FirewallConfig, FirewallError, HostPort, MARKER, Proto, enable_forwarding,
    forward_conflicts, remove_table,
};
use lull_netns::ipam::Subnet;
use serde_json::Value;

/// A scratch network namespace for one test.
struct Scratch {
    dir: PathBuf,
    ns: Option<NetNs>,
    table: String,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let pid = std::process::id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("lull-fw-{tag}-{pid}-{nanos}"));
        let ns = NetNs::create(&dir, "fw").unwrap();
        Scratch {
            dir,
            ns: Some(ns),
            // Unique even though the namespace is private: a failing test that somehow ran on
            // the host would then not touch a real "lull" table.
            table: format!("lulltest{pid}x{nanos}"),
        }
    }

    /// Runs `f` in the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.as_ref().unwrap().run_in(f).unwrap()
    }

    fn config(&self) -> FirewallConfig {
        let mut config =
            FirewallConfig::new("lullbr0", Subnet::parse("10.77.0.0/24").unwrap(), "eth9");
        config.table = self.table.clone();
        config
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(ns) = self.ns.take() {
            let _ = ns.destroy();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs nft with `args` (in the calling thread's namespace); panics on failure.
fn nft(args: &[&str]) -> String {
    let output = Command::new("nft").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn nft_script(script: &str) {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f -:\n{script}");
}

fn table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The objects of kind `kind` ("chain", "set", "rule") in `nft -j list table inet <table>`.
fn listed(table: &str, kind: &str) -> Vec<Value> {
    let json: Value = serde_json::from_str(&nft(&["-j", "list", "table", "inet", table])).unwrap();
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get(kind).cloned())
        .collect()
}

fn pair(a: u8, b: u8) -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::new(10, 77, 0, a), Ipv4Addr::new(10, 77, 0, b))
}

#[test]
fn install_creates_the_marked_table_with_its_chains() {
    let scratch = Scratch::new("install");
    let config = scratch.config();
    let table = config.table.clone();
    scratch.run(move || {
        let _firewall = Firewall::install(config).unwrap();

        let mut hooks: Vec<(String, String, String, i64)> = listed(&table, "chain")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["type"].as_str().unwrap().to_string(),
                    c["hook"].as_str().unwrap().to_string(),
                    c["prio"].as_i64().unwrap(),
                )
            })
            .collect();
        hooks.sort();
        let expected = [
            ("forward", "filter", "forward", 0),
            ("input", "filter", "input", 0),
            ("output", "filter", "output", 0),
            ("postrouting", "nat", "postrouting", 100),
        ];
        let expected: Vec<(String, String, String, i64)> = expected
            .iter()
            .map(|(n, t, h, p)| (n.to_string(), t.to_string(), h.to_string(), *p))
            .collect();
        assert_eq!(hooks, expected);

        let sets = listed(&table, "set");
        assert_eq!(sets.len(), 1, "{sets:#?}");
        assert_eq!(sets[0]["name"], "peers");
        assert_eq!(sets[0]["comment"], MARKER);
        assert!(sets[0].get("elem").is_none(), "{sets:#?}");

        // The table comment is what an admin sees.
        let text = nft(&["list", "table", "inet", &table]);
        assert!(text.contains(&format!("comment \"{MARKER}\"")), "{text}");
        assert!(
            text.contains("iifname \"lullbr0\" oifname \"eth9\" accept"),
            "{text}"
        );
        assert!(
            text.contains("ip saddr 10.77.0.0/24 oifname \"eth9\" masquerade"),
            "{text}"
        );
    });
}

#[test]
fn install_again_replaces_our_table() {
    let scratch = Scratch::new("replace");
    let config = scratch.config();
    let table = config.table.clone();
    scratch.run(move || {
        let first = Firewall::install(config.clone()).unwrap();
        first.allow_peers(&[pair(2, 3)]).unwrap();
        drop(first); // as a crashed daemon would leave it

        let mut changed = config;
        changed.host_ports = vec![HostPort {
            proto: Proto::Tcp,
            port: 8125,
        }];
        let second = Firewall::install(changed).unwrap();
        let text = nft(&["list", "table", "inet", &table]);
        assert!(text.contains("tcp dport 8125 accept"), "{text}");
        assert_eq!(text.matches("chain forward {").count(), 1, "{text}");
        assert_eq!(
            second.peers().unwrap(),
            vec![pair(2, 3)],
            "the peer pairs survive the rewrite"
        );
    });
}

#[test]
fn foreign_table_is_refused_and_left_intact() {
    let scratch = Scratch::new("foreign");
    let config = scratch.config();
    let table = config.table.clone();
    scratch.run(move || {
        nft(&["add", "table", "inet", &table]);
        nft(&["add", "chain", "inet", &table, "theirs"]);

        let err = Firewall::install(config).unwrap_err();
        assert!(matches!(err, FirewallError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains(&table), "{err}");
        let err = remove_table(&table).unwrap_err();
        assert!(matches!(err, FirewallError::Foreign { .. }), "{err}");

        let chains: Vec<String> = listed(&table, "chain")
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(chains, ["theirs"]);
        assert!(listed(&table, "set").is_empty());
    });
}

#[test]
fn remove_deletes_only_our_table() {
    let scratch = Scratch::new("remove");
    let config = scratch.config();
    let table = config.table.clone();
    scratch.run(move || {
        let other = format!("{table}other");
        nft(&["add", "table", "inet", &other]);
        let firewall = Firewall::install(config.clone()).unwrap();
        assert!(table_exists(&table));
        firewall.remove().unwrap();
        assert!(!table_exists(&table));
        assert!(table_exists(&other), "a foreign table went too");

        // Gone already is fine.
        assert!(!remove_table(&table).unwrap());
        let again = Firewall::install(config).unwrap();
        assert!(remove_table(&table).unwrap());
        assert!(!table_exists(&table));
        again.remove().unwrap();
    });
}

#[test]
fn peers_round_trip() {
    let scratch = Scratch::new("peers");
    let config = scratch.config();
    scratch.run(move || {
        let firewall = Firewall::install(config).unwrap();
        assert_eq!(firewall.peers().unwrap(), vec![]);
        firewall
            .allow_peers(&[pair(3, 2), pair(2, 3), pair(2, 4)])
            .unwrap();
        // Allowing what is allowed already is fine.
        firewall.allow_peers(&[pair(2, 3)]).unwrap();
        assert_eq!(
            firewall.peers().unwrap(),
            vec![pair(2, 3), pair(2, 4), pair(3, 2)]
        );
        // Revoking what is not there is fine too.
        firewall.revoke_peers(&[pair(2, 3), pair(9, 9)]).unwrap();
        assert_eq!(firewall.peers().unwrap(), vec![pair(2, 4), pair(3, 2)]);
        firewall.revoke_peers(&[]).unwrap();
        firewall.allow_peers(&[]).unwrap();
        assert_eq!(firewall.peers().unwrap().len(), 2);
    });
}

#[test]
fn nft_errors_carry_its_stderr() {
    let scratch = Scratch::new("errors");
    let config = scratch.config();
    let table = config.table.clone();
    scratch.run(move || {
        let firewall = Firewall::install(config).unwrap();
        nft(&["delete", "table", "inet", &table]);
        let err = firewall.allow_peers(&[pair(2, 3)]).unwrap_err();
        match &err {
            FirewallError::Nft { stderr, .. } => {
                assert!(stderr.contains("No such file or directory"), "{err}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
        assert!(matches!(firewall.peers(), Err(FirewallError::Gone { .. })));
    });
}

#[test]
fn forward_conflicts_reports_a_foreign_drop_policy() {
    let scratch = Scratch::new("conflict");
    let config = scratch.config();
    scratch.run(move || {
        let _firewall = Firewall::install(config.clone()).unwrap();
        assert_eq!(forward_conflicts(&config).unwrap(), vec![]);

        nft_script(
            "table ip strict {\n\
             \tchain fwd_chain {\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t\tiifname \"lullbr0\" accept\n\
             \t}\n\
             }\n",
        );
        let conflicts = forward_conflicts(&config).unwrap();
        assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
        let c = &conflicts[0];
        assert_eq!(
            (c.family.as_str(), c.table.as_str(), c.chain.as_str()),
            ("ip", "strict", "fwd_chain")
        );
        assert_eq!(
            c.reason,
            "policy drop would drop replies into bridge lullbr0"
        );

        // Applying the suggested fix resolves it.
        let fix = c.fix.strip_prefix("nft ").unwrap().replace('"', "");
        let args: Vec<&str> = fix.split_whitespace().collect();
        nft(&args);
        assert_eq!(forward_conflicts(&config).unwrap(), vec![]);
    });
}

#[test]
fn iptables_legacy_drop_policy_is_reported() {
    let scratch = Scratch::new("legacy");
    let config = scratch.config();
    scratch.run(move || {
        let status = Command::new("iptables-legacy")
            .args(["-P", "FORWARD", "DROP"])
            .status()
            .unwrap();
        assert!(status.success());
        let conflicts = forward_conflicts(&config).unwrap();
        assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
        assert!(
            conflicts[0]
                .reason
                .starts_with("iptables-legacy policy DROP"),
            "{conflicts:#?}"
        );
        for rule in [
            "-I FORWARD -i lullbr0 -j ACCEPT",
            "-I FORWARD -o lullbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ] {
            let args: Vec<&str> = rule.split_whitespace().collect();
            assert!(
                Command::new("iptables-legacy")
                    .args(&args)
                    .status()
                    .unwrap()
                    .success()
            );
        }
        assert_eq!(forward_conflicts(&config).unwrap(), vec![]);
    });
}

#[test]
fn enable_forwarding_is_per_namespace() {
    let scratch = Scratch::new("sysctl");
    let read = || fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let host_before = read();
    let (before, changed, after, again, ipv6) = scratch.run(|| {
        // A new namespace copies the host's current IPv4 setting: start from "off".
        fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();
        let before = read();
        let changed = enable_forwarding(true).unwrap();
        let after = read();
        let again = enable_forwarding(true).unwrap();
        let ipv6 = fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap();
        (before, changed, after, again, ipv6)
    });
    assert_eq!(before.trim(), "0", "switched off in the scratch namespace");
    assert!(changed);
    assert_eq!(after.trim(), "1");
    assert!(!again, "nothing left to change");
    assert_eq!(ipv6.trim(), "1");
    assert_eq!(read(), host_before, "the host's value changed");
}

/// A "host" namespace holding the bridge, and instance namespaces wired to it.
struct Network {
    dir: PathBuf,
    namespaces: Vec<NetNs>,
}

impl Drop for Network {
    fn drop(&mut self) {
        // Destroying a namespace deletes the veth ends in it, and so the pairs.
        for ns in self.namespaces.drain(..) {
            let _ = ns.destroy();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn connects(from: &NetNs, to: std::net::SocketAddr) -> bool {
    from.run_in(|| {
        std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_millis(400)).is_ok()
    })
    .unwrap()
}

#[test]
fn traffic_between_instances_needs_a_peer_pair() {
    use lull_netns::link::{Bridge, InstanceLink, wire_instance};
    use std::io::Read;
    use std::net::{SocketAddr, TcpListener};

    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut net = Network {
        dir: std::env::temp_dir().join(format!("lull-fw-traffic-{pid}-{nanos}")),
        namespaces: Vec::new(),
    };
    for name in ["host", "a", "b"] {
        net.namespaces.push(NetNs::create(&net.dir, name).unwrap());
    }
    let [host, a, b] = &net.namespaces[..] else {
        unreachable!()
    };
    let gateway = Ipv4Addr::new(10, 77, 0, 1);
    let addr_a = Ipv4Addr::new(10, 77, 0, 2);
    let addr_b = Ipv4Addr::new(10, 77, 0, 3);
    let mut config = FirewallConfig::new("lullbr0", Subnet::parse("10.77.0.0/24").unwrap(), "eth9");
    config.table = format!("lulltest{pid}");

    // The host side: bridge, isolated ports, forwarding, the firewall.
    let (firewall, host_listener) = host
        .run_in(|| {
            let bridge = Bridge::ensure("lullbr0", gateway, 24).unwrap();
            for (ns, port, addr) in [(a, "lullva", addr_a), (b, "lullvb", addr_b)] {
                let link = InstanceLink {
                    host_ifname: port,
                    alias: "lull:test",
                    addr,
                    addr6: None,
                    mtu: None,
                };
                wire_instance(&bridge, ns, &link).unwrap();
            }
            enable_forwarding(false).unwrap();
            let firewall = Firewall::install(config.clone()).unwrap();
            let listener = TcpListener::bind(SocketAddr::from((gateway, 0))).unwrap();
            (firewall, listener)
        })
        .unwrap();
    let listener_b = b
        .run_in(|| TcpListener::bind(SocketAddr::from((addr_b, 0))).unwrap())
        .unwrap();
    let listener_a = a
        .run_in(|| TcpListener::bind(SocketAddr::from((addr_a, 0))).unwrap())
        .unwrap();
    let to_b = listener_b.local_addr().unwrap();
    let to_a = listener_a.local_addr().unwrap();
    let to_host = host_listener.local_addr().unwrap();

    // A TCP port on the host that is not opened is dropped (input chain). The end of the test
    // shows the same port reachable once opened, so this is the firewall, not the wiring.
    assert!(
        !connects(a, to_host),
        "a reached a host port that was not opened"
    );

    // Different services (no pair): dropped both ways. Reaching b once the pair is allowed
    // below shows that the routing itself works.
    assert!(!connects(a, to_b), "a reached b without a peer pair");
    assert!(!connects(b, to_a), "b reached a without a peer pair");

    // a may open connections to b; b still may not open any to a.
    host.run_in(|| firewall.allow_peers(&[(addr_a, addr_b)]).unwrap())
        .unwrap();
    let sent = a
        .run_in(|| {
            let mut stream =
                std::net::TcpStream::connect_timeout(&to_b, std::time::Duration::from_secs(2))?;
            stream.write_all(b"hello")
        })
        .unwrap();
    sent.expect("a could not reach b after allow_peers");
    let (mut conn, peer) = listener_b.accept().unwrap();
    assert_eq!(
        peer.ip(),
        addr_a,
        "b sees a's own address (no NAT between instances)"
    );
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    assert!(!connects(b, to_a), "the pair is one way");

    // Revoked: new connections are dropped again.
    host.run_in(|| firewall.revoke_peers(&[(addr_a, addr_b)]).unwrap())
        .unwrap();
    assert!(!connects(a, to_b), "a reached b after revoke_peers");

    // A host port that is opened is reachable.
    let mut open = config.clone();
    open.host_ports = vec![HostPort {
        proto: Proto::Tcp,
        port: to_host.port(),
    }];
    host.run_in(|| Firewall::install(open).unwrap()).unwrap();
    assert!(
        connects(a, to_host),
        "a could not reach an opened host port"
    );

    drop((conn, listener_a, listener_b, host_listener));
}
