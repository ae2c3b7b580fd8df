//! Byte sizes as people write them: `64M`, `1.5G`, `512k`, `1048576`.

/// What is wrong with a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size {text:?}: unknown unit {unit:?} (use k, M, G or T)")]
    UnknownUnit { text: String, unit: char },
    #[error("size {text:?} is not a number with an optional k/M/G/T suffix")]
    NotANumber { text: String },
    #[error("size {text:?} must be positive")]
    NotPositive { text: String },
    #[error("size {text:?} is too large")]
    TooLarge { text: String },
}

/// Parses a byte size with an optional binary suffix (k, M, G, T; `i` and `B` accepted).
pub fn parse(text: &str) -> Result<u64, SizeError> {
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
        _ => {
            return Err(SizeError::UnknownUnit {
                text: text.to_string(),
                unit,
            });
        }
    };
    let value: f64 = number.parse().map_err(|_| SizeError::NotANumber {
        text: text.to_string(),
    })?;
    if !(value.is_finite() && value > 0.0) {
        return Err(SizeError::NotPositive {
            text: text.to_string(),
        });
    }
    let bytes = value * factor as f64;
    if bytes >= u64::MAX as f64 {
        return Err(SizeError::TooLarge {
            text: text.to_string(),
        });
    }
    Ok(bytes as u64)
}

/// `123.4M` style, rounded: for showing, not for reading back.
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

/// The exact form [`parse`] reads back to the same number: the largest unit that divides
/// `bytes` (`64M`, `1536k`, `1000`).
pub fn exact(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "k")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
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
        for bad in ["", "M", "-1M", "12X", "abc", "99999999999T"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(human(1536), "1.5k");
    }

    #[test]
    fn exact_reads_back() {
        for bytes in [1, 1000, 1024, 1536, 64 << 20, 3 << 29, 5 << 40] {
            assert_eq!(parse(&exact(bytes)).unwrap(), bytes, "{}", exact(bytes));
        }
        assert_eq!(exact(64 << 20), "64M");
        assert_eq!(exact(1536), "1536");
        assert_eq!(exact(3 << 29), "1536M");
    }
}
