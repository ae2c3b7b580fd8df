//! Running the `nft` program: scripts in, JSON listings out.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::ruleset::PEERS_SET;
use super::{FirewallError, MARKER, TableOwner};

const NFT: &str = "nft";

/// What nft prints when the listed object does not exist.
const NO_SUCH_OBJECT: &str = "No such file or directory";

fn spawn_error(action: &str, source: io::Error) -> FirewallError {
    if source.kind() == io::ErrorKind::NotFound {
        FirewallError::NftMissing
    } else {
        FirewallError::NftSpawn {
            action: action.to_string(),
            source,
        }
    }
}

fn failure(action: &str, output: &Output) -> FirewallError {
    FirewallError::Nft {
        action: action.to_string(),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    }
}

/// Applies `script` with `nft -f -`: one transaction, all or nothing.
pub(super) fn run_script(action: &str, script: &str) -> Result<(), FirewallError> {
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(action, e))?;
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(script.as_bytes()),
        None => Ok(()),
    };
    // Wait even when writing failed (nft may have exited early; its stderr says why).
    let output = child
        .wait_with_output()
        .map_err(|e| spawn_error(action, e))?;
    if !output.status.success() {
        return Err(failure(action, &output));
    }
    written.map_err(|e| spawn_error(action, e))?;
    tracing::trace!(action, script, "nft script applied");
    Ok(())
}

/// Runs `nft -j <args>` and parses its output; `None` when nft says the object does not exist.
pub(super) fn list_json(action: &str, args: &[&str]) -> Result<Option<Value>, FirewallError> {
    let output = Command::new(NFT)
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(action, e))?;
    if !output.status.success() {
        if String::from_utf8_lossy(&output.stderr).contains(NO_SUCH_OBJECT) {
            return Ok(None);
        }
        return Err(failure(action, &output));
    }
    let value =
        serde_json::from_slice(&output.stdout).map_err(|source| FirewallError::ParseJson {
            what: action.to_string(),
            source,
        })?;
    Ok(Some(value))
}

/// The `nftables` array of an `nft -j` listing.
pub(super) fn objects<'a>(listing: &'a Value, what: &str) -> Result<&'a [Value], FirewallError> {
    listing
        .get("nftables")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| FirewallError::UnexpectedJson {
            what: what.to_string(),
            reason: "no \"nftables\" array".to_string(),
        })
}

pub(super) fn table_owner(table: &str) -> Result<TableOwner, FirewallError> {
    let action = format!("list table inet {table}");
    match list_json(&action, &["list", "table", "inet", table])? {
        None => Ok(TableOwner::Absent),
        Some(listing) => owner_in_listing(&listing, table, &action),
    }
}

/// Whether the listing of table `inet <table>` carries lull's marker: a table comment (which
/// newer nft versions print) or a comment on its `peers` set (which nft 1.0.6 prints too).
pub(super) fn owner_in_listing(
    listing: &Value,
    table: &str,
    what: &str,
) -> Result<TableOwner, FirewallError> {
    let mut found = false;
    let mut marked = false;
    for object in objects(listing, what)? {
        if let Some(t) = object.get("table") {
            if t.get("family").and_then(Value::as_str) == Some("inet")
                && t.get("name").and_then(Value::as_str) == Some(table)
            {
                found = true;
                marked |= t.get("comment").and_then(Value::as_str) == Some(MARKER);
            }
        } else if let Some(set) = object.get("set") {
            marked |= set.get("family").and_then(Value::as_str) == Some("inet")
                && set.get("table").and_then(Value::as_str) == Some(table)
                && set.get("name").and_then(Value::as_str) == Some(PEERS_SET)
                && set.get("comment").and_then(Value::as_str) == Some(MARKER);
        }
    }
    Ok(match (found, marked) {
        (false, _) => TableOwner::Absent,
        (true, true) => TableOwner::Lull,
        (true, false) => TableOwner::Foreign,
    })
}

pub(super) fn peers(table: &str) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>, FirewallError> {
    let action = format!("list set inet {table} {PEERS_SET}");
    let listing =
        list_json(&action, &["list", "set", "inet", table, PEERS_SET])?.ok_or_else(|| {
            FirewallError::Gone {
                table: table.to_string(),
            }
        })?;
    peers_in_listing(&listing, &action)
}

/// The `(source, destination)` elements of the listed `peers` set, sorted.
pub(super) fn peers_in_listing(
    listing: &Value,
    what: &str,
) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>, FirewallError> {
    let unexpected = |reason: String| FirewallError::UnexpectedJson {
        what: what.to_string(),
        reason,
    };
    let set = objects(listing, what)?
        .iter()
        .find_map(|o| o.get("set"))
        .ok_or_else(|| unexpected("no set in the listing".to_string()))?;
    let Some(elements) = set.get("elem") else {
        return Ok(Vec::new());
    };
    let elements = elements
        .as_array()
        .ok_or_else(|| unexpected("\"elem\" is not an array".to_string()))?;
    let mut pairs = Vec::with_capacity(elements.len());
    for element in elements {
        // Plain elements are `{"concat": [a, b]}`; with per-element data (counters, timeouts)
        // nft wraps them as `{"elem": {"val": {"concat": ...}, ...}}`.
        let value = element
            .get("elem")
            .and_then(|e| e.get("val"))
            .unwrap_or(element);
        let pair = value
            .get("concat")
            .and_then(Value::as_array)
            .and_then(|parts| match parts.as_slice() {
                [a, b] => Some((
                    a.as_str()?.parse::<Ipv4Addr>().ok()?,
                    b.as_str()?.parse::<Ipv4Addr>().ok()?,
                )),
                _ => None,
            })
            .ok_or_else(|| unexpected(format!("element {element} is not an address pair")))?;
        pairs.push(pair);
    }
    pairs.sort_unstable();
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    const META: &str = r#"{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}"#;

    #[test]
    fn a_missing_program_says_what_to_install() {
        let err = spawn_error("x", io::Error::from(io::ErrorKind::NotFound));
        assert!(matches!(err, FirewallError::NftMissing));
        assert!(
            err.to_string().contains("install the nftables package"),
            "{err}"
        );
        let err = spawn_error(
            "list ruleset",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(err.to_string().contains("list ruleset"), "{err}");
    }

    #[test]
    fn owner_from_set_comment_or_table_comment() {
        let marked_set = parse(&format!(
            r#"{{"nftables": [{META}, {{"table": {{"family": "inet", "name": "lull", "handle": 1}}}},
            {{"set": {{"family": "inet", "name": "peers", "table": "lull", "type": ["ipv4_addr", "ipv4_addr"], "handle": 2, "comment": "managed by lull"}}}}]}}"#
        ));
        assert_eq!(
            owner_in_listing(&marked_set, "lull", "t").unwrap(),
            TableOwner::Lull
        );

        let marked_table = parse(&format!(
            r#"{{"nftables": [{META}, {{"table": {{"family": "inet", "name": "lull", "handle": 1, "comment": "managed by lull"}}}}]}}"#
        ));
        assert_eq!(
            owner_in_listing(&marked_table, "lull", "t").unwrap(),
            TableOwner::Lull
        );

        // A set of that name without the comment, or the comment elsewhere, is not the marker.
        let unmarked = parse(&format!(
            r#"{{"nftables": [{META}, {{"table": {{"family": "inet", "name": "lull", "handle": 1, "comment": "mine"}}}},
            {{"set": {{"family": "inet", "name": "peers", "table": "lull", "type": ["ipv4_addr", "ipv4_addr"], "handle": 2}}}},
            {{"set": {{"family": "inet", "name": "other", "table": "lull", "type": "ipv4_addr", "handle": 3, "comment": "managed by lull"}}}}]}}"#
        ));
        assert_eq!(
            owner_in_listing(&unmarked, "lull", "t").unwrap(),
            TableOwner::Foreign
        );

        let empty = parse(&format!(r#"{{"nftables": [{META}]}}"#));
        assert_eq!(
            owner_in_listing(&empty, "lull", "t").unwrap(),
            TableOwner::Absent
        );

        let broken = parse(r#"{"tables": []}"#);
        assert!(matches!(
            owner_in_listing(&broken, "lull", "t"),
            Err(FirewallError::UnexpectedJson { .. })
        ));
    }

    #[test]
    fn peers_from_plain_and_wrapped_elements() {
        let listing = parse(&format!(
            r#"{{"nftables": [{META}, {{"set": {{"family": "inet", "name": "peers", "table": "lull",
            "type": ["ipv4_addr", "ipv4_addr"], "handle": 2,
            "elem": [{{"concat": ["10.0.0.3", "10.0.0.2"]}},
                     {{"elem": {{"val": {{"concat": ["10.0.0.2", "10.0.0.3"]}}, "counter": {{"packets": 0, "bytes": 0}}}}}}]}}}}]}}"#
        ));
        assert_eq!(
            peers_in_listing(&listing, "t").unwrap(),
            vec![
                (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)),
                (Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 2)),
            ]
        );
        let empty = parse(&format!(
            r#"{{"nftables": [{META}, {{"set": {{"family": "inet", "name": "peers", "table": "lull", "type": ["ipv4_addr", "ipv4_addr"], "handle": 2}}}}]}}"#
        ));
        assert!(peers_in_listing(&empty, "t").unwrap().is_empty());
        let bad = parse(&format!(
            r#"{{"nftables": [{META}, {{"set": {{"family": "inet", "name": "peers", "table": "lull", "handle": 2, "elem": ["10.0.0.2"]}}}}]}}"#
        ));
        let err = peers_in_listing(&bad, "list set inet lull peers").unwrap_err();
        assert!(
            err.to_string().contains("list set inet lull peers"),
            "{err}"
        );
    }
}
