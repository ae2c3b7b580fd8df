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
        assert_eq!(second.peers().unwrap(), vec![], "peers start empty");
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
        let before = read();
        let changed = enable_forwarding(true).unwrap();
        let after = read();
        let again = enable_forwarding(true).unwrap();
        let ipv6 = fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap();
        (before, changed, after, again, ipv6)
    });
    assert_eq!(
        before.trim(),
        "0",
        "a new namespace starts without forwarding"
    );
    assert!(changed);
    assert_eq!(after.trim(), "1");
    assert!(!again, "nothing left to change");
    assert_eq!(ipv6.trim(), "1");
    assert_eq!(read(), host_before, "the host's value changed");
}
