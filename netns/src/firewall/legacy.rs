//! iptables-legacy: rules in the kernel's old x_tables, which `nft` does not list.
//!
//! Covered cheaply: if `/proc/thread-self/net/ip_tables_names` (or `ip6_tables_names`) lists
//! `filter`, `iptables-legacy -S` (or `ip6tables-legacy -S`) is read, and a FORWARD policy
//! DROP is reported unless some rule accepts the bridge. Unlike the nftables check this does not
//! follow jumps: any `-i <bridge> ... -j ACCEPT` rule in any chain counts, and so does any
//! RELATED,ESTABLISHED accept for replies. A final unconditional DROP rule (rather than the
//! policy) is not covered.

use std::fs;
use std::process::{Command, Stdio};

use super::{Conflict, FirewallConfig};

/// Forward conflicts in iptables-legacy's filter tables. Best effort: a table that cannot be
/// read is logged and skipped.
pub(super) fn forward_conflicts(config: &FirewallConfig) -> Vec<Conflict> {
    let mut conflicts = Vec::new();
    let families = [
        ("ip", "ip_tables_names", "iptables-legacy"),
        ("ip6", "ip6_tables_names", "ip6tables-legacy"),
    ];
    for (family, names, program) in families {
        if family == "ip6" && config.subnet6.is_none() {
            continue;
        }
        // /proc/net would show the namespace of the process's main thread, not this thread's.
        let path = format!("/proc/thread-self/net/{names}");
        let Ok(names) = fs::read_to_string(&path) else {
            continue;
        };
        if !names.lines().any(|line| line.trim() == "filter") {
            continue;
        }
        let output = Command::new(program)
            .args(["-w", "-t", "filter", "-S"])
            .stdin(Stdio::null())
            .output();
        match output {
            Ok(output) if output.status.success() => {
                let rules = String::from_utf8_lossy(&output.stdout);
                conflicts.extend(conflict_in_rules(&rules, family, program, &config.bridge));
            }
            Ok(output) => tracing::warn!(
                program,
                stderr = %String::from_utf8_lossy(&output.stderr).trim(),
                "cannot check the iptables-legacy filter table for a FORWARD drop policy"
            ),
            Err(error) => tracing::warn!(
                program,
                %error,
                "cannot check the iptables-legacy filter table for a FORWARD drop policy"
            ),
        }
    }
    conflicts
}

/// Judges the output of `iptables-legacy -t filter -S`.
pub(super) fn conflict_in_rules(
    rules: &str,
    family: &str,
    program: &str,
    bridge: &str,
) -> Option<Conflict> {
    let lines: Vec<Vec<&str>> = rules
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let drops = lines.iter().any(|w| w[..] == ["-P", "FORWARD", "DROP"]);
    if !drops {
        return None;
    }
    let accepts = |w: &Vec<&str>| w.first() == Some(&"-A") && w.ends_with(&["-j", "ACCEPT"]);
    let has_pair = |w: &Vec<&str>, flag: &str| w.windows(2).any(|p| p[0] == flag && p[1] == bridge);
    let has_interface = |w: &Vec<&str>| w.iter().any(|x| matches!(*x, "-i" | "-o" | "!"));
    let established = |w: &Vec<&str>| {
        w.iter().any(|x| {
            let states: Vec<&str> = x.split(',').collect();
            states.contains(&"ESTABLISHED")
        })
    };
    let out_ok = lines.iter().any(|w| accepts(w) && has_pair(w, "-i"));
    let back_ok = lines
        .iter()
        .any(|w| accepts(w) && (has_pair(w, "-o") || (established(w) && !has_interface(w))));
    let what = match (out_ok, back_ok) {
        (true, true) => return None,
        (false, false) => format!("traffic of bridge {bridge}"),
        (false, true) => format!("traffic from bridge {bridge} out of its uplink"),
        (true, false) => format!("replies into bridge {bridge}"),
    };
    let target = if lines.iter().any(|w| w[..] == ["-N", "DOCKER-USER"]) {
        "DOCKER-USER"
    } else {
        "FORWARD"
    };
    let mut fix = Vec::new();
    if !out_ok {
        fix.push(format!("{program} -I {target} -i {bridge} -j ACCEPT"));
    }
    if !back_ok {
        fix.push(format!(
            "{program} -I {target} -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ));
    }
    Some(Conflict {
        family: family.to_string(),
        table: "filter".to_string(),
        chain: "FORWARD".to_string(),
        reason: format!("{program} policy DROP would drop {what}"),
        fix: fix.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = "-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i docker0 ! -o docker0 -j ACCEPT
-A DOCKER-USER -j RETURN
";

    #[test]
    fn drop_policy_is_reported_with_docker_user_fix() {
        let c = conflict_in_rules(DOCKER, "ip", "iptables-legacy", "lull0").unwrap();
        assert_eq!(
            (c.family.as_str(), c.table.as_str(), c.chain.as_str()),
            ("ip", "filter", "FORWARD")
        );
        assert_eq!(
            c.reason,
            "iptables-legacy policy DROP would drop traffic of bridge lull0"
        );
        assert_eq!(
            c.fix,
            "iptables-legacy -I DOCKER-USER -i lull0 -j ACCEPT; \
             iptables-legacy -I DOCKER-USER -o lull0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
    }

    #[test]
    fn accept_policy_or_rules_for_the_bridge_are_fine() {
        assert!(
            conflict_in_rules("-P FORWARD ACCEPT\n", "ip", "iptables-legacy", "lull0").is_none()
        );
        let allowed = format!(
            "{DOCKER}-A DOCKER-USER -i lull0 -j ACCEPT\n\
             -A DOCKER-USER -o lull0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        );
        assert!(conflict_in_rules(&allowed, "ip", "iptables-legacy", "lull0").is_none());
        // A generic established accept covers replies; new connections still need a rule.
        let half =
            "-P FORWARD DROP\n-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
        let c = conflict_in_rules(half, "ip6", "ip6tables-legacy", "lull0").unwrap();
        assert_eq!(c.fix, "ip6tables-legacy -I FORWARD -i lull0 -j ACCEPT");
        // Another bridge's rules do not count.
        let other = "-P FORWARD DROP\n-A FORWARD -i lull01 -j ACCEPT\n";
        assert!(conflict_in_rules(other, "ip", "iptables-legacy", "lull0").is_some());
    }
}
