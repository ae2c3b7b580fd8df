//! Names lull gives an instance's links: the host end of the veth pair is the configured prefix
//! and eight hex digits of a hash of the instance id (interface names are limited to 15 bytes,
//! instance ids are not), and its alias spells out the bridge and the instance in full, which is
//! what proves a link is lull's.

/// Hex digits of the hash in a veth name.
pub const HASH_DIGITS: usize = 8;

/// The host end's name for `instance`; `attempt` > 0 gives alternatives for the rare clash of
/// two ids' hashes.
pub fn veth_name(prefix: &str, instance: &str, attempt: u32) -> String {
    let key = match attempt {
        0 => instance.to_string(),
        n => format!("{instance}#{n}"),
    };
    // FNV-1a: stable across releases and platforms, which a restart relies on.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}{:08x}", (hash >> 32) as u32 ^ hash as u32)
}

const ALIAS_TAG: &str = "lull";

/// The alias of `instance`'s host end on `bridge`.
pub fn link_alias(bridge: &str, instance: &str) -> String {
    format!("{ALIAS_TAG}:{bridge}:{instance}")
}

/// The instance named by a link alias made by [`link_alias`] for `bridge`.
pub fn instance_of_alias<'a>(bridge: &str, alias: &'a str) -> Option<&'a str> {
    alias
        .strip_prefix(ALIAS_TAG)?
        .strip_prefix(':')?
        .strip_prefix(bridge)?
        .strip_prefix(':')
        .filter(|instance| !instance.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_and_differ() {
        let a = veth_name("lv", "web-1", 0);
        assert_eq!(a.len(), 2 + HASH_DIGITS);
        assert!(a.starts_with("lv"));
        assert_eq!(a, veth_name("lv", "web-1", 0), "stable");
        assert_ne!(a, veth_name("lv", "web-2", 0));
        assert_ne!(a, veth_name("lv", "web-1", 1));
        let long = "x".repeat(200);
        assert_eq!(veth_name("lull-t", &long, 0).len(), 6 + HASH_DIGITS);
    }

    #[test]
    fn aliases_round_trip_for_their_bridge_only() {
        let alias = link_alias("lull0", "web-1");
        assert_eq!(instance_of_alias("lull0", &alias), Some("web-1"));
        assert_eq!(instance_of_alias("lull1", &alias), None);
        assert_eq!(instance_of_alias("lull", &alias), None);
        assert_eq!(instance_of_alias("lull0", "lull:lull0:"), None);
        assert_eq!(instance_of_alias("lull0", "docker:lull0:x"), None);
    }
}
