//! The nft scripts lull applies: its table, peer set changes, deletion. Pure functions from a
//! validated [`FirewallConfig`] to text in nft's own language; `nft -f -` applies a script as one
//! transaction.
//!
//! Interface names are matched by name (`iifname`), not index, so the rules keep working when
//! the bridge or the uplink is recreated.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::{FirewallConfig, MARKER, Proto};

/// Name of the set of `(source . destination)` IPv4 pairs allowed between instances.
pub const PEERS_SET: &str = "peers";

/// The link-local range where cloud metadata services live.
pub const METADATA_RANGE: &str = "169.254.0.0/16";

/// The script that creates lull's table. With `replace`, an existing table of that name is
/// deleted first in the same transaction (the caller has checked that it is lull's); without,
/// the table is created with `create`, which fails rather than merge into a table that
/// appeared in the meantime.
pub fn install_script(config: &FirewallConfig, replace: bool) -> String {
    let table = &config.table;
    let bridge = &config.bridge;
    let uplink = &config.uplink;
    let mut s = String::new();
    if replace {
        // `table` first, so that the delete cannot fail should the table have just vanished.
        let _ = writeln!(s, "table inet {table}");
        let _ = writeln!(s, "delete table inet {table}");
    } else {
        let _ = writeln!(s, "create table inet {table}");
    }
    let _ = writeln!(s, "table inet {table} {{");
    let _ = writeln!(s, "\tcomment \"{MARKER}\"");

    let _ = writeln!(s, "\tset {PEERS_SET} {{");
    let _ = writeln!(s, "\t\ttype ipv4_addr . ipv4_addr");
    let _ = writeln!(s, "\t\tcomment \"{MARKER}\"");
    let _ = writeln!(s, "\t}}");

    // Forward: only traffic touching the bridge is judged; the rest is none of lull's business.
    let mut forward = vec![
        // Only the subnet's own addresses leave the bridge: an app with CAP_NET_RAW cannot
        // send packets with another network's source address out of the uplink.
        format!("iifname \"{bridge}\" ip saddr != {} drop", config.subnet),
        match config.subnet6 {
            Some((network, prefix)) => {
                format!("iifname \"{bridge}\" ip6 saddr != {network}/{prefix} drop")
            }
            // Without an IPv6 subnet instances have only link-local addresses: nothing of
            // theirs is forwarded.
            None => format!("iifname \"{bridge}\" meta nfproto ipv6 drop"),
        },
        // Between instances (ports are isolated, so this traffic is routed by the host).
        format!("iifname \"{bridge}\" oifname \"{bridge}\" ct state established,related accept"),
        format!(
            "iifname \"{bridge}\" oifname \"{bridge}\" ip saddr . ip daddr @{PEERS_SET} accept"
        ),
        format!("iifname \"{bridge}\" oifname \"{bridge}\" drop"),
    ];
    if !config.allow_metadata {
        forward.push(format!(
            "iifname \"{bridge}\" ip daddr {METADATA_RANGE} drop"
        ));
    }
    forward.extend([
        format!("iifname \"{bridge}\" oifname \"{uplink}\" accept"),
        // Other host networks (other bridges, VPNs, the LAN behind a second NIC).
        format!("iifname \"{bridge}\" drop"),
        // Into instances: replies only. The host's own proxy reaches them through output.
        format!("oifname \"{bridge}\" ct state established,related accept"),
        format!("oifname \"{bridge}\" drop"),
    ]);
    base_chain(&mut s, "forward", "filter", "forward", "filter", &forward);

    let mut input = vec![
        format!("iifname \"{bridge}\" ct state established,related accept"),
        // Ping of the gateway, and NDP, without which IPv6 does not work at all.
        // Numbers, not names: nft resolves `ipv6-icmp` through /etc/protocols, which a
        // minimal host (no netbase package) lacks.
        format!("iifname \"{bridge}\" meta l4proto {{ 1, 58 }} accept"),
    ];
    for proto in [Proto::Tcp, Proto::Udp] {
        let mut ports: Vec<u16> = config
            .host_ports
            .iter()
            .filter(|p| p.proto == proto)
            .map(|p| p.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if !ports.is_empty() {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            input.push(format!(
                "iifname \"{bridge}\" {proto} dport {{ {} }} accept",
                list.join(", ")
            ));
        }
    }
    // The daemon's admin and metrics listeners, sshd, anything else on the host.
    input.push(format!("iifname \"{bridge}\" drop"));
    base_chain(&mut s, "input", "filter", "input", "filter", &input);

    let output = [
        format!("oifname \"{bridge}\" icmp type redirect drop"),
        format!("oifname \"{bridge}\" icmpv6 type nd-redirect drop"),
    ];
    base_chain(&mut s, "output", "filter", "output", "filter", &output);

    let mut postrouting = vec![format!(
        "ip saddr {} oifname \"{uplink}\" masquerade",
        config.subnet
    )];
    if let Some((network, prefix)) = config.subnet6 {
        postrouting.push(format!(
            "ip6 saddr {network}/{prefix} oifname \"{uplink}\" masquerade"
        ));
    }
    base_chain(
        &mut s,
        "postrouting",
        "nat",
        "postrouting",
        "srcnat",
        &postrouting,
    );

    let _ = writeln!(s, "}}");
    s
}

/// One base chain with policy accept (lull's chains only judge traffic of the bridge).
fn base_chain(
    s: &mut String,
    name: &str,
    kind: &str,
    hook: &str,
    priority: &str,
    rules: &[String],
) {
    let _ = writeln!(s, "\tchain {name} {{");
    let _ = writeln!(
        s,
        "\t\ttype {kind} hook {hook} priority {priority}; policy accept;"
    );
    for rule in rules {
        let _ = writeln!(s, "\t\t{rule}");
    }
    let _ = writeln!(s, "\t}}");
}

fn elements(pairs: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    let list: Vec<String> = pairs.iter().map(|(a, b)| format!("{a} . {b}")).collect();
    format!("{{ {} }}", list.join(", "))
}

pub fn add_peers_script(table: &str, pairs: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    format!("add element inet {table} {PEERS_SET} {}\n", elements(pairs))
}

/// Deleting an element that is not in the set is an error in nft; adding the pairs first in
/// the same transaction makes the removal idempotent.
pub fn remove_peers_script(table: &str, pairs: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    let elements = elements(pairs);
    format!(
        "add element inet {table} {PEERS_SET} {elements}\n\
         delete element inet {table} {PEERS_SET} {elements}\n"
    )
}

pub fn delete_table_script(table: &str) -> String {
    format!("delete table inet {table}\n")
}

#[cfg(test)]
mod tests {
    use super::super::HostPort;
    use super::*;
    use crate::ipam::Subnet;

    fn config() -> FirewallConfig {
        FirewallConfig::new("lull0", Subnet::parse("10.88.0.0/24").unwrap(), "eth0")
    }

    /// The rule lines of chain `name` in a script.
    fn chain<'a>(script: &'a str, name: &str) -> Vec<&'a str> {
        let start = format!("\tchain {name} {{");
        let mut lines = script.lines().skip_while(|l| *l != start);
        assert!(lines.next().is_some(), "no chain {name} in\n{script}");
        lines.take_while(|l| *l != "\t}").map(str::trim).collect()
    }

    fn position(rules: &[&str], rule: &str) -> usize {
        rules
            .iter()
            .position(|r| *r == rule)
            .unwrap_or_else(|| panic!("no rule {rule:?} in {rules:#?}"))
    }

    #[test]
    fn fresh_install_creates_and_marks_the_table() {
        let script = install_script(&config(), false);
        assert!(
            script.starts_with("create table inet lull\ntable inet lull {\n"),
            "{script}"
        );
        assert!(!script.contains("delete"), "{script}");
        assert_eq!(
            script.matches("comment \"managed by lull\"").count(),
            2,
            "{script}"
        );
        assert!(
            script.contains("set peers {\n\t\ttype ipv4_addr . ipv4_addr\n"),
            "{script}"
        );
    }

    #[test]
    fn replace_deletes_the_old_table_first() {
        let script = install_script(&config(), true);
        assert!(
            script.starts_with("table inet lull\ndelete table inet lull\ntable inet lull {\n"),
            "{script}"
        );
        assert!(!script.contains("create"), "{script}");
    }

    #[test]
    fn forward_isolates_instances_and_other_networks() {
        let script = install_script(&config(), false);
        let rules = chain(&script, "forward");
        assert_eq!(
            rules[0],
            "type filter hook forward priority filter; policy accept;"
        );
        let established = position(
            &rules,
            "iifname \"lull0\" oifname \"lull0\" ct state established,related accept",
        );
        let peers = position(
            &rules,
            "iifname \"lull0\" oifname \"lull0\" ip saddr . ip daddr @peers accept",
        );
        let between = position(&rules, "iifname \"lull0\" oifname \"lull0\" drop");
        let metadata = position(&rules, "iifname \"lull0\" ip daddr 169.254.0.0/16 drop");
        let uplink = position(&rules, "iifname \"lull0\" oifname \"eth0\" accept");
        let others = position(&rules, "iifname \"lull0\" drop");
        let replies = position(
            &rules,
            "oifname \"lull0\" ct state established,related accept",
        );
        let inbound = position(&rules, "oifname \"lull0\" drop");
        // Order matters: first match wins.
        assert!(established < peers && peers < between, "{rules:#?}");
        assert!(
            between < uplink && metadata < uplink && uplink < others,
            "{rules:#?}"
        );
        assert!(replies < inbound, "{rules:#?}");
    }

    #[test]
    fn metadata_drop_only_when_not_allowed() {
        let mut c = config();
        c.allow_metadata = true;
        let script = install_script(&c, false);
        assert!(!script.contains("169.254"), "{script}");
    }

    #[test]
    fn input_admits_icmp_and_host_ports_only() {
        let mut c = config();
        c.host_ports = vec![
            HostPort {
                proto: Proto::Tcp,
                port: 8125,
            },
            HostPort {
                proto: Proto::Udp,
                port: 53,
            },
            HostPort {
                proto: Proto::Tcp,
                port: 53,
            },
            HostPort {
                proto: Proto::Tcp,
                port: 8125,
            },
        ];
        let script = install_script(&c, false);
        let rules = chain(&script, "input");
        assert_eq!(
            rules[0],
            "type filter hook input priority filter; policy accept;"
        );
        assert_eq!(
            &rules[1..],
            [
                "iifname \"lull0\" ct state established,related accept",
                "iifname \"lull0\" meta l4proto { 1, 58 } accept",
                "iifname \"lull0\" tcp dport { 53, 8125 } accept",
                "iifname \"lull0\" udp dport { 53 } accept",
                "iifname \"lull0\" drop",
            ]
        );
    }

    #[test]
    fn no_host_ports_no_port_rules() {
        let script = install_script(&config(), false);
        assert!(!script.contains("dport"), "{script}");
    }

    #[test]
    fn output_drops_redirects_to_the_bridge() {
        let script = install_script(&config(), false);
        let rules = chain(&script, "output");
        assert_eq!(
            &rules[1..],
            [
                "oifname \"lull0\" icmp type redirect drop",
                "oifname \"lull0\" icmpv6 type nd-redirect drop",
            ]
        );
    }

    #[test]
    fn postrouting_masquerades_the_subnets_out_of_the_uplink() {
        let mut c = config();
        let script = install_script(&c, false);
        let rules = chain(&script, "postrouting");
        assert_eq!(
            rules,
            [
                "type nat hook postrouting priority srcnat; policy accept;",
                "ip saddr 10.88.0.0/24 oifname \"eth0\" masquerade",
            ]
        );
        c.subnet6 = Some(("fd00:88::".parse().unwrap(), 64));
        let script = install_script(&c, false);
        let rules = chain(&script, "postrouting");
        assert_eq!(
            rules[2],
            "ip6 saddr fd00:88::/64 oifname \"eth0\" masquerade"
        );
    }

    #[test]
    fn peer_scripts() {
        let pairs = [
            (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)),
            (Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 2)),
        ];
        assert_eq!(
            add_peers_script("t", &pairs),
            "add element inet t peers { 10.0.0.2 . 10.0.0.3, 10.0.0.3 . 10.0.0.2 }\n"
        );
        let remove = remove_peers_script("t", &pairs[..1]);
        assert_eq!(
            remove,
            "add element inet t peers { 10.0.0.2 . 10.0.0.3 }\n\
             delete element inet t peers { 10.0.0.2 . 10.0.0.3 }\n"
        );
        assert_eq!(delete_table_script("t"), "delete table inet t\n");
    }
}
