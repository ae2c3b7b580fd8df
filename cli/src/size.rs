//! Sizes as people write them: `64M`, `1.5G`, `512k`, `1048576`.

use anyhow::{Result, bail};

/// Parses a byte size with an optional binary suffix (k, M, G, T; `i` and `B` accepted).
pub fn parse(text: &str) -> Result<u64> {
    let t = text.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (number, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
        _ => (t, ' '),
    };
    let factor: u64 = match unit {
        ' ' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        't' => 1 << 40,
        _ => bail!("size {text:?}: unknown unit {unit:?} (use k, M, G or T)"),
    };
    let value: f64 = number.parse().map_err(|_| {
        anyhow::anyhow!("size {text:?} is not a number with an optional k/M/G/T suffix")
    })?;
    if !(value.is_finite() && value > 0.0) {
        bail!("size {text:?} must be positive");
    }
    Ok((value * factor as f64) as u64)
}

/// `123.4M` style.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "k", "M", "G", "T"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        for (text, want) in [
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("1.5G", 3 << 29),
            ("512k", 512 << 10),
            ("4096", 4096),
        ] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        for bad in ["", "M", "-1M", "12X", "abc"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(human(1536), "1.5k");
    }
}
