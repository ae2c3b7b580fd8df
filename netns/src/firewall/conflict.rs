//! Other firewalls on the host that would drop the bridge's traffic.
//!
//! Every base chain on the forward hook gets its say, whatever its table: a packet that lull's
//! table accepts is still dropped if Docker's `ip filter FORWARD` (policy drop), ufw's or
//! firewalld's chain drops it. For every such chain outside lull's tables, two typical packets
//! are walked through the rules: a new connection from the bridge out of the uplink, and a
//! reply going back into the bridge. Matches on interface names and conntrack state are
//! evaluated; jumps and gotos are followed; any other match (addresses, ports, marks, ...) is
//! unknown, and a rule with unknown matches is taken to apply only when it also names the
//! bridge (or sits in a chain reached through a rule that does). That is the intended reading
//! of "the chain already has a rule accepting the bridge", and it never invents a drop: a
//! conditional drop is assumed not to hit. What remains reported is a chain whose policy or
//! unconditional drop/reject rule catches one of the two packets, with the commands that fix it
//! in the tool that owns the table (iptables for iptables-nft tables, and Docker's DOCKER-USER
//! chain when it exists, ufw, firewall-cmd, else nft).
//!
//! Rules of iptables-legacy live outside nftables; see [`super::legacy`] for what is covered.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde_json::Value;

use super::nft::{self, objects};
use super::ruleset::PEERS_SET;
use super::{FirewallConfig, FirewallError, MARKER, legacy};

/// How deep jumps are followed (the kernel allows 16 levels).
const MAX_JUMP_DEPTH: usize = 16;

/// A chain of another firewall that would drop traffic of lull's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// `ip`, `ip6` or `inet`.
    pub family: String,
    pub table: String,
    pub chain: String,
    /// What would be dropped, and by what.
    pub reason: String,
    /// Shell commands that let the traffic through, separated by `; `.
    pub fix: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "table {} {}, chain {}: {}; fix: {}",
            self.family, self.table, self.chain, self.reason, self.fix
        )
    }
}

/// Lists the ruleset of the calling thread's network namespace and reports the forward chains
/// of other tables that would drop the bridge's traffic, then the same for iptables-legacy.
pub fn forward_conflicts(config: &FirewallConfig) -> Result<Vec<Conflict>, FirewallError> {
    config.validate()?;
    let what = "list ruleset";
    let mut conflicts = match nft::list_json(what, &["list", "ruleset"])? {
        Some(listing) => conflicts_in_listing(&listing, config, what)?,
        None => Vec::new(),
    };
    conflicts.extend(legacy::forward_conflicts(config));
    for conflict in &conflicts {
        tracing::warn!(%conflict, "another firewall would drop instance traffic");
    }
    Ok(conflicts)
}

/// The conflicts in the output of `nft -j list ruleset`.
pub fn conflicts_in_ruleset(
    json: &str,
    config: &FirewallConfig,
) -> Result<Vec<Conflict>, FirewallError> {
    let what = "the ruleset";
    let listing: Value = serde_json::from_str(json).map_err(|source| FirewallError::ParseJson {
        what: what.to_string(),
        source,
    })?;
    conflicts_in_listing(&listing, config, what)
}

fn conflicts_in_listing(
    listing: &Value,
    config: &FirewallConfig,
    what: &str,
) -> Result<Vec<Conflict>, FirewallError> {
    let ruleset = Ruleset::parse(objects(listing, what)?);
    let mut conflicts = Vec::new();
    for (index, chain) in ruleset.chains.iter().enumerate() {
        if chain.hook.as_deref() != Some("forward") {
            continue;
        }
        let relevant_family = match chain.family.as_str() {
            "ip" | "inet" => true,
            // Instances only have IPv6 when there is an IPv6 subnet.
            "ip6" => config.subnet6.is_some(),
            // bridge, arp, netdev: not where routed traffic is judged.
            _ => false,
        };
        if !relevant_family || ruleset.is_lulls(&chain.family, &chain.table, config) {
            continue;
        }
        let out = Packet {
            iifname: &config.bridge,
            oifname: &config.uplink,
            established: false,
            bridge_is_iif: true,
        };
        let back = Packet {
            iifname: &config.uplink,
            oifname: &config.bridge,
            established: true,
            bridge_is_iif: false,
        };
        let policy_drops = chain.policy.as_deref() == Some("drop");
        let verdict = |packet: &Packet| match ruleset.walk(index, packet, false, 0) {
            Outcome::Accepted => None,
            Outcome::Dropped(by) => Some(by),
            Outcome::FellThrough if policy_drops => Some("policy drop".to_string()),
            Outcome::FellThrough => None,
        };
        let blocked_out = verdict(&out);
        let blocked_back = verdict(&back);
        let (why, what) = match (&blocked_out, &blocked_back) {
            (None, None) => continue,
            (Some(why), Some(_)) => (why, format!("traffic of bridge {}", config.bridge)),
            (Some(why), None) => (
                why,
                format!(
                    "traffic from bridge {} out of {}",
                    config.bridge, config.uplink
                ),
            ),
            (None, Some(why)) => (why, format!("replies into bridge {}", config.bridge)),
        };
        let fix = fix_commands(
            &ruleset,
            chain,
            &config.bridge,
            blocked_out.is_some(),
            blocked_back.is_some(),
        );
        conflicts.push(Conflict {
            family: chain.family.clone(),
            table: chain.table.clone(),
            chain: chain.name.clone(),
            reason: format!("{why} would drop {what}"),
            fix: fix.join("; "),
        });
    }
    Ok(conflicts)
}

/// The commands that make `chain` accept the bridge's new connections (`out`) and replies
/// (`back`), in the tool that manages the table.
fn fix_commands(
    ruleset: &Ruleset,
    chain: &Chain,
    bridge: &str,
    out: bool,
    back: bool,
) -> Vec<String> {
    let (family, table) = (chain.family.as_str(), chain.table.as_str());
    let has_chain = |name: &str| ruleset.find(family, table, name).is_some();
    let mut fix = Vec::new();
    if family == "inet" && table == "firewalld" {
        if out {
            fix.push(format!(
                "firewall-cmd --zone=trusted --add-interface={bridge}"
            ));
            fix.push(format!(
                "firewall-cmd --permanent --zone=trusted --add-interface={bridge}"
            ));
        }
        if back {
            // firewalld accepts established traffic first thing; if that is gone, fall back.
            fix.push(format!(
                "nft insert rule inet firewalld {} oifname \"{bridge}\" ct state established,related accept",
                chain.name
            ));
        }
        return fix;
    }
    // iptables-nft makes tables named after iptables' and upper-case base chains; iptables
    // must keep managing them (nft-native rules in them confuse it).
    let iptables = match family {
        "ip" => Some("iptables"),
        "ip6" => Some("ip6tables"),
        _ => None,
    }
    .filter(|_| table == "filter" && chain.name == "FORWARD");
    if let Some(iptables) = iptables {
        let ufw = has_chain("ufw-user-forward");
        // Docker leaves DOCKER-USER alone and jumps to it first.
        let target = if has_chain("DOCKER-USER") {
            "DOCKER-USER"
        } else {
            "FORWARD"
        };
        if out {
            fix.push(if ufw {
                format!("ufw route allow in on {bridge}")
            } else {
                format!("{iptables} -I {target} -i {bridge} -j ACCEPT")
            });
        }
        if back {
            fix.push(format!(
                "{iptables} -I {target} -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
            ));
        }
        return fix;
    }
    if out {
        fix.push(format!(
            "nft insert rule {family} {table} {} iifname \"{bridge}\" accept",
            chain.name
        ));
    }
    if back {
        fix.push(format!(
            "nft insert rule {family} {table} {} oifname \"{bridge}\" ct state established,related accept",
            chain.name
        ));
    }
    fix
}

struct Chain {
    family: String,
    table: String,
    name: String,
    hook: Option<String>,
    policy: Option<String>,
    rules: Vec<Vec<Value>>,
}

/// The chains and rules of a listing, in listing order.
struct Ruleset {
    chains: Vec<Chain>,
    index: HashMap<(String, String, String), usize>,
    /// `(family, table)` of tables carrying lull's marker.
    marked: HashSet<(String, String)>,
}

fn str_field(object: &Value, key: &str) -> Option<String> {
    object.get(key).and_then(Value::as_str).map(str::to_string)
}

impl Ruleset {
    fn parse(objects: &[Value]) -> Ruleset {
        let mut ruleset = Ruleset {
            chains: Vec::new(),
            index: HashMap::new(),
            marked: HashSet::new(),
        };
        for object in objects {
            if let Some(chain) = object.get("chain") {
                let (Some(family), Some(table), Some(name)) = (
                    str_field(chain, "family"),
                    str_field(chain, "table"),
                    str_field(chain, "name"),
                ) else {
                    continue;
                };
                ruleset.index.insert(
                    (family.clone(), table.clone(), name.clone()),
                    ruleset.chains.len(),
                );
                ruleset.chains.push(Chain {
                    family,
                    table,
                    name,
                    hook: str_field(chain, "hook"),
                    policy: str_field(chain, "policy"),
                    rules: Vec::new(),
                });
            } else if let Some(rule) = object.get("rule") {
                let (Some(family), Some(table), Some(name)) = (
                    str_field(rule, "family"),
                    str_field(rule, "table"),
                    str_field(rule, "chain"),
                ) else {
                    continue;
                };
                let expr = rule
                    .get("expr")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if let Some(&i) = ruleset.index.get(&(family, table, name)) {
                    ruleset.chains[i].rules.push(expr);
                }
            } else if let Some(table) = object.get("table") {
                if table.get("comment").and_then(Value::as_str) == Some(MARKER)
                    && let (Some(family), Some(name)) =
                        (str_field(table, "family"), str_field(table, "name"))
                {
                    ruleset.marked.insert((family, name));
                }
            } else if let Some(set) = object.get("set")
                && set.get("name").and_then(Value::as_str) == Some(PEERS_SET)
                && set.get("comment").and_then(Value::as_str) == Some(MARKER)
                && let (Some(family), Some(table)) =
                    (str_field(set, "family"), str_field(set, "table"))
            {
                ruleset.marked.insert((family, table));
            }
        }
        ruleset
    }

    fn find(&self, family: &str, table: &str, name: &str) -> Option<usize> {
        self.index
            .get(&(family.to_string(), table.to_string(), name.to_string()))
            .copied()
    }

    /// lull's configured table, or any other table carrying its marker (a table left under an
    /// old name is removed with `remove_table`, not reported as a conflict).
    fn is_lulls(&self, family: &str, table: &str, config: &FirewallConfig) -> bool {
        family == "inet"
            && (table == config.table
                || self
                    .marked
                    .contains(&(family.to_string(), table.to_string())))
    }

    /// Where `packet` ends up in chain `index`. `selected`: the chain was reached through a
    /// rule that names the bridge, so its rules with unknown matches are taken to apply.
    fn walk(&self, index: usize, packet: &Packet, selected: bool, depth: usize) -> Outcome {
        let chain = &self.chains[index];
        if depth > MAX_JUMP_DEPTH {
            return Outcome::FellThrough;
        }
        for expr in &chain.rules {
            let rule = Rule::evaluate(expr, packet);
            let applies = match rule.applies {
                Applies::Yes => true,
                Applies::No => false,
                Applies::Unknown => selected || rule.names_bridge,
            };
            if !applies {
                continue;
            }
            let selected_here = selected || rule.names_bridge;
            match &rule.verdict {
                Verdict::Accept => return Outcome::Accepted,
                Verdict::Drop(kind) if rule.applies == Applies::Yes => {
                    let place = if depth == 0 {
                        String::new()
                    } else {
                        format!(" in chain {}", chain.name)
                    };
                    return Outcome::Dropped(format!("an unconditional {kind} rule{place}"));
                }
                Verdict::Drop(_) => {}
                Verdict::Jump(target) | Verdict::Goto(target) => {
                    let Some(target_index) = self.find(&chain.family, &chain.table, target) else {
                        continue;
                    };
                    let outcome = self.walk(target_index, packet, selected_here, depth + 1);
                    let goto = matches!(rule.verdict, Verdict::Goto(_));
                    match outcome {
                        Outcome::FellThrough if !goto => {}
                        other => return other,
                    }
                }
                Verdict::Return if rule.applies == Applies::Yes => return Outcome::FellThrough,
                Verdict::Return | Verdict::Continue => {}
            }
        }
        Outcome::FellThrough
    }
}

/// A packet walked through the forward chains.
struct Packet<'a> {
    iifname: &'a str,
    oifname: &'a str,
    /// A reply (conntrack state established) rather than a new connection.
    established: bool,
    /// Whether the bridge is the input interface (else the output one).
    bridge_is_iif: bool,
}

enum Outcome {
    Accepted,
    /// Dropped or rejected; says by what.
    Dropped(String),
    /// Reached the end of the chain, or `return`.
    FellThrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applies {
    Yes,
    No,
    Unknown,
}

enum Verdict {
    Accept,
    /// "drop" or "reject".
    Drop(&'static str),
    Jump(String),
    Goto(String),
    Return,
    /// No verdict (counter, log, ...): evaluation goes on with the next rule.
    Continue,
}

struct Rule {
    applies: Applies,
    /// Whether an interface match that holds names the bridge on its side of the packet.
    names_bridge: bool,
    verdict: Verdict,
}

impl Rule {
    fn evaluate(expr: &[Value], packet: &Packet) -> Rule {
        let mut applies = Applies::Yes;
        let mut names_bridge = false;
        let mut verdict = Verdict::Continue;
        for statement in expr {
            let Some((key, body)) = statement.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            match key.as_str() {
                "match" => match evaluate_match(body, packet) {
                    Some(MatchResult { holds: false, .. }) => applies = Applies::No,
                    Some(MatchResult {
                        holds: true,
                        selects_bridge,
                    }) => names_bridge |= selects_bridge,
                    None => {
                        if applies == Applies::Yes {
                            applies = Applies::Unknown;
                        }
                    }
                },
                "accept" => verdict = Verdict::Accept,
                "drop" => verdict = Verdict::Drop("drop"),
                "reject" => verdict = Verdict::Drop("reject"),
                "jump" | "goto" => {
                    if let Some(target) = body.get("target").and_then(Value::as_str) {
                        verdict = if key == "jump" {
                            Verdict::Jump(target.to_string())
                        } else {
                            Verdict::Goto(target.to_string())
                        };
                    }
                }
                "return" => verdict = Verdict::Return,
                // iptables-nft's `-m conntrack --ctstate ...` / `-m state --state ...` list as
                // an opaque xt match. In forward chains these are, in practice, the
                // RELATED,ESTABLISHED accepts (Docker's, ufw's): taken to hold for replies and
                // not for new connections.
                "xt" if is_xt_state_match(body) && !packet.established => applies = Applies::No,
                "xt" if is_xt_state_match(body) => {}
                // Conditions that are not `match` statements.
                "limit" | "quota" | "xt" if applies == Applies::Yes => applies = Applies::Unknown,
                // counter, log, meta/ct set, ...: no bearing on the verdict.
                _ => {}
            }
        }
        Rule {
            applies,
            names_bridge: names_bridge && applies != Applies::No,
            verdict,
        }
    }
}

fn is_xt_state_match(body: &Value) -> bool {
    body.get("type").and_then(Value::as_str) == Some("match")
        && matches!(
            body.get("name").and_then(Value::as_str),
            Some("conntrack" | "state")
        )
}

struct MatchResult {
    holds: bool,
    /// The match is `iifname`/`oifname` on the bridge's side with `==`/`in`.
    selects_bridge: bool,
}

/// Evaluates a `match` on interface names or conntrack state; `None` for anything else.
fn evaluate_match(body: &Value, packet: &Packet) -> Option<MatchResult> {
    let op = body.get("op").and_then(Value::as_str)?;
    let negate = match op {
        "==" | "in" => false,
        "!=" => true,
        _ => return None,
    };
    let left = body.get("left")?;
    let right = body.get("right")?;
    let values = string_values(right)?;
    if let Some(key) = left
        .get("meta")
        .and_then(|m| m.get("key"))
        .and_then(Value::as_str)
    {
        let (name, bridge_side) = match key {
            "iifname" => (packet.iifname, packet.bridge_is_iif),
            "oifname" => (packet.oifname, !packet.bridge_is_iif),
            _ => return None,
        };
        let found = values.iter().any(|pattern| ifname_matches(pattern, name));
        return Some(MatchResult {
            holds: found != negate,
            selects_bridge: bridge_side && !negate && found,
        });
    }
    if left
        .get("ct")
        .and_then(|c| c.get("key"))
        .and_then(Value::as_str)
        == Some("state")
    {
        let state = if packet.established {
            "established"
        } else {
            "new"
        };
        let found = values.contains(&state);
        return Some(MatchResult {
            holds: found != negate,
            selects_bridge: false,
        });
    }
    None
}

/// The strings on the right of a match: one, a list, or an anonymous set.
fn string_values(right: &Value) -> Option<Vec<&str>> {
    match right {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(items) => items.iter().map(Value::as_str).collect(),
        Value::Object(o) => o
            .get("set")
            .and_then(Value::as_array)?
            .iter()
            .map(Value::as_str)
            .collect(),
        _ => None,
    }
}

/// nft prints wildcard interface names with a trailing `*`.
fn ifname_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !pattern.ends_with("\\*") => name.starts_with(prefix),
        _ => pattern == name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Subnet;

    fn config() -> FirewallConfig {
        FirewallConfig::new("lull0", Subnet::parse("10.88.0.0/24").unwrap(), "eth0")
    }

    fn conflicts(fixture: &str) -> Vec<Conflict> {
        conflicts_in_ruleset(fixture, &config()).unwrap()
    }

    #[test]
    fn docker_drop_policy_is_reported_with_docker_user_fix() {
        let found = conflicts(include_str!("testdata/docker.json"));
        assert_eq!(found.len(), 1, "{found:#?}");
        let c = &found[0];
        assert_eq!(
            (c.family.as_str(), c.table.as_str(), c.chain.as_str()),
            ("ip", "filter", "FORWARD")
        );
        assert_eq!(c.reason, "policy drop would drop traffic of bridge lull0");
        assert_eq!(
            c.fix,
            "iptables -I DOCKER-USER -i lull0 -j ACCEPT; \
             iptables -I DOCKER-USER -o lull0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        );
        assert_eq!(
            c.to_string(),
            format!(
                "table ip filter, chain FORWARD: policy drop would drop traffic of bridge lull0; fix: {}",
                c.fix
            )
        );
    }

    #[test]
    fn docker_user_rules_for_the_bridge_resolve_it() {
        assert_eq!(
            conflicts(include_str!("testdata/docker_allowing_bridge.json")),
            vec![]
        );
    }

    #[test]
    fn ufw_is_reported_for_new_connections_only() {
        // ufw-before-forward accepts established traffic, so replies pass already.
        let found = conflicts(include_str!("testdata/ufw.json"));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].chain, "FORWARD");
        assert_eq!(
            found[0].reason,
            "policy drop would drop traffic from bridge lull0 out of eth0"
        );
        assert_eq!(found[0].fix, "ufw route allow in on lull0");
    }

    #[test]
    fn ufw_route_rule_for_the_bridge_resolves_it() {
        assert_eq!(
            conflicts(include_str!("testdata/ufw_routed_bridge.json")),
            vec![]
        );
    }

    #[test]
    fn firewalld_final_reject_is_reported() {
        let found = conflicts(include_str!("testdata/firewalld.json"));
        assert_eq!(found.len(), 1, "{found:#?}");
        let c = &found[0];
        assert_eq!(
            (c.family.as_str(), c.table.as_str(), c.chain.as_str()),
            ("inet", "firewalld", "filter_FORWARD")
        );
        assert_eq!(
            c.reason,
            "an unconditional reject rule would drop traffic from bridge lull0 out of eth0"
        );
        assert!(
            c.fix
                .starts_with("firewall-cmd --zone=trusted --add-interface=lull0; "),
            "{}",
            c.fix
        );
    }

    #[test]
    fn firewalld_with_the_bridge_in_the_trusted_zone_is_fine() {
        assert_eq!(
            conflicts(include_str!("testdata/firewalld_trusted.json")),
            vec![]
        );
    }

    #[test]
    fn own_tables_input_hooks_bridge_family_and_accepting_chains_are_ignored() {
        // others.json: lull's own table (forward policy drop), an input policy drop, a bridge
        // family forward drop, an ip6 chain accepting the bridge, and `table ip partial`
        // whose chain accepts the bridge in an anonymous set but drops the replies.
        let mut c = config();
        c.subnet6 = Some(("fd00:88::".parse().unwrap(), 64));
        let found = conflicts_in_ruleset(include_str!("testdata/others.json"), &c).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
        let p = &found[0];
        assert_eq!(
            (p.family.as_str(), p.table.as_str(), p.chain.as_str()),
            ("ip", "partial", "forward_chk")
        );
        assert_eq!(p.reason, "policy drop would drop replies into bridge lull0");
        assert_eq!(
            p.fix,
            "nft insert rule ip partial forward_chk oifname \"lull0\" ct state established,related accept"
        );

        // lull's table is skipped by name even without a marker, and marked tables under
        // another name are skipped as well.
        let mut renamed = c.clone();
        renamed.table = "lull2".into();
        let found = conflicts_in_ruleset(include_str!("testdata/others.json"), &renamed).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    #[test]
    fn unmarked_table_named_otherwise_is_reported() {
        // The same drop-everything chain, in a table that is neither lull's name nor marked.
        let json = r#"{"nftables": [
            {"table": {"family": "inet", "name": "mine", "handle": 1}},
            {"chain": {"family": "inet", "table": "mine", "name": "fw", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "mine", "chain": "fw", "handle": 2, "expr": [{"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}
        ]}"#;
        let found = conflicts(json);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(
            found[0].reason,
            "an unconditional drop rule would drop traffic of bridge lull0"
        );
        assert_eq!(
            found[0].fix,
            "nft insert rule inet mine fw iifname \"lull0\" accept; \
             nft insert rule inet mine fw oifname \"lull0\" ct state established,related accept"
        );
    }

    #[test]
    fn ip6_chains_matter_only_with_an_ipv6_subnet() {
        let json = r#"{"nftables": [
            {"table": {"family": "ip6", "name": "filter", "handle": 1}},
            {"chain": {"family": "ip6", "table": "filter", "name": "FORWARD", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}
        ]}"#;
        assert_eq!(conflicts(json), vec![]);
        let mut c = config();
        c.subnet6 = Some(("fd00:88::".parse().unwrap(), 64));
        let found = conflicts_in_ruleset(json, &c).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(
            found[0]
                .fix
                .starts_with("ip6tables -I FORWARD -i lull0 -j ACCEPT"),
            "{}",
            found[0].fix
        );
    }

    #[test]
    fn wildcards_negations_and_unknown_matches() {
        // `iifname "lull*" accept` covers lull0; `iifname != "lull0" accept` does not, and
        // an accept on an unknown match alone (a port) is not taken for the bridge.
        let chain = |rules: &str| {
            format!(
                r#"{{"nftables": [
                {{"table": {{"family": "ip", "name": "t", "handle": 1}}}},
                {{"chain": {{"family": "ip", "table": "t", "name": "c", "handle": 1, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}}},
                {rules}]}}"#
            )
        };
        let rule = |expr: &str| {
            format!(
                r#"{{"rule": {{"family": "ip", "table": "t", "chain": "c", "handle": 9, "expr": {expr}}}}}"#
            )
        };
        let iif = |op: &str, name: &str| {
            format!(
                r#"{{"match": {{"op": "{op}", "left": {{"meta": {{"key": "iifname"}}}}, "right": "{name}"}}}}"#
            )
        };
        let est = r#"{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}"#;
        let dport = r#"{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 443}}"#;
        let accept = r#"{"accept": null}"#;

        let wildcard = chain(
            &[
                rule(&format!("[{}, {accept}]", iif("==", "lull*"))),
                rule(&format!("[{est}, {accept}]")),
            ]
            .join(","),
        );
        assert_eq!(conflicts(&wildcard), vec![]);

        let negated = chain(
            &[
                rule(&format!("[{}, {accept}]", iif("!=", "lull0"))),
                rule(&format!("[{est}, {accept}]")),
            ]
            .join(","),
        );
        assert_eq!(conflicts(&negated).len(), 1);

        let port_only = chain(
            &[
                rule(&format!("[{dport}, {accept}]")),
                rule(&format!("[{est}, {accept}]")),
            ]
            .join(","),
        );
        assert_eq!(conflicts(&port_only).len(), 1);

        // With the bridge named, the unknown match is taken to hold (lenient).
        let bridge_and_port = chain(
            &[
                rule(&format!("[{}, {dport}, {accept}]", iif("==", "lull0"))),
                rule(&format!("[{est}, {accept}]")),
            ]
            .join(","),
        );
        assert_eq!(conflicts(&bridge_and_port), vec![]);
    }

    #[test]
    fn garbage_is_an_error_not_a_clean_bill() {
        assert!(matches!(
            conflicts_in_ruleset("not json", &config()),
            Err(FirewallError::ParseJson { .. })
        ));
        assert!(matches!(
            conflicts_in_ruleset(r#"{"rules": []}"#, &config()),
            Err(FirewallError::UnexpectedJson { .. })
        ));
    }
}
