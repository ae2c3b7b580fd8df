//! Sizes as people write them: `64M`, `1.5G`, `512k`, `1048576` (the parser lives in the
//! runtime, shared with the daemon).

use anyhow::Result;

/// Parses a byte size with an optional binary suffix (k, M, G, T; `i` and `B` accepted).
pub fn parse(text: &str) -> Result<u64> {
    Ok(lull_runtime::size::parse(text)?)
}

/// `123.4M` style.
pub fn human(bytes: u64) -> String {
    lull_runtime::size::human(bytes)
}
