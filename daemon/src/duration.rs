//! Durations as operators write them, the one form used across the daemon's settings: `250ms`,
//! `30s`, `10m`, `1h30m`, `7d`, or `0`.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration {text:?} is empty")]
    Empty { text: String },
    #[error("duration {text:?} has a number without a unit (use ms, s, m, h or d)")]
    MissingUnit { text: String },
    #[error("duration {text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")]
    UnknownUnit { text: String, unit: String },
    #[error("duration {text:?} is not a sequence of NUMBER UNIT pairs such as 1m30s")]
    Malformed { text: String },
    #[error("duration {text:?} is too long")]
    TooLong { text: String },
}

/// Parses `250ms`, `30s`, `10m`, `2h`, `7d`, sums like `1h30m`, and a bare `0`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(DurationError::Empty {
            text: text.to_string(),
        });
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::Malformed {
                text: text.to_string(),
            });
        }
        let number: u64 = rest[..digits].parse().map_err(|_| DurationError::TooLong {
            text: text.to_string(),
        })?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return Err(DurationError::MissingUnit {
                text: text.to_string(),
            });
        }
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(DurationError::UnknownUnit {
                    text: text.to_string(),
                    unit: unit.to_string(),
                });
            }
        };
        let part = number
            .checked_mul(millis_per_unit)
            .ok_or_else(|| DurationError::TooLong {
                text: text.to_string(),
            })?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(|| DurationError::TooLong {
                text: text.to_string(),
            })?;
    }
    Ok(total)
}

/// The shortest form [`parse`] reads back to the same duration (whole milliseconds):
/// `10m`, `1h30m`, `1s500ms`, `0`.
pub fn format(duration: Duration) -> String {
    let mut millis = duration.as_millis();
    if millis == 0 {
        return "0".to_string();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if millis >= size {
            out.push_str(&format!("{}{unit}", millis / size));
            millis %= size;
        }
    }
    out
}

/// Serde support for `Duration` fields written as duration strings.
pub mod serde_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        for (text, millis) in [
            ("250ms", 250),
            ("30s", 30_000),
            ("10m", 600_000),
            ("2h", 7_200_000),
            ("7d", 604_800_000),
            ("1h30m", 5_400_000),
            ("1s500ms", 1_500),
            ("0", 0),
            ("0s", 0),
            (" 5s ", 5_000),
        ] {
            assert_eq!(
                parse(text).unwrap(),
                Duration::from_millis(millis),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for (text, want) in [
            ("", "is empty"),
            ("10", "without a unit"),
            ("10x", "unknown unit \"x\""),
            ("1.5s", "without a unit"),
            ("s", "NUMBER UNIT"),
            ("-1s", "NUMBER UNIT"),
            ("99999999999999999999s", "too long"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn format_reads_back() {
        for millis in [0, 1, 250, 1_000, 1_500, 60_000, 5_400_000, 90_061_001] {
            let d = Duration::from_millis(millis);
            assert_eq!(parse(&format(d)).unwrap(), d, "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(600)), "10m");
        assert_eq!(format(Duration::from_millis(5_400_000)), "1h30m");
    }
}
