//! Renewal and retry timing: pure functions of the certificate's dates and the clock.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, TimeDelta, Utc};

/// When a certificate valid `not_before..not_after` is renewed: once a third of its lifetime
/// remains (day 60 of Let's Encrypt's 90).
pub fn renew_at(not_before: DateTime<Utc>, not_after: DateTime<Utc>) -> DateTime<Utc> {
    not_after - lifetime(not_before, not_after) / 3
}

/// When a certificate not renewed yet is reported as expiring (an event, once): once a sixth
/// of its lifetime remains, halfway through the renewal window, while it still serves.
pub fn warn_at(not_before: DateTime<Utc>, not_after: DateTime<Utc>) -> DateTime<Utc> {
    not_after - lifetime(not_before, not_after) / 6
}

fn lifetime(not_before: DateTime<Utc>, not_after: DateTime<Utc>) -> TimeDelta {
    (not_after - not_before).max(TimeDelta::zero())
}

/// The wait after the `failures`-th failure in a row (1-based): `initial` doubled each time,
/// capped at `max`, then scaled by `jitter` in `0.0..1.0` to between half and all of it, so
/// that many hosts (or names) failing together do not retry together.
pub fn retry_after(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let full = initial
        .checked_mul(1u32 << doublings)
        .unwrap_or(max)
        .min(max);
    full.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// The wait a CA's `Retry-After` value asks for, counted from `now`: delay-seconds, or an
/// HTTP-date (RFC 9110, section 10.2.3), zero when that date is past; None when the value is
/// neither.
pub fn ca_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long time".
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// A jitter value in `0.0..1.0` from the OS's randomness.
pub fn jitter() -> f64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn renewal_starts_with_a_third_left_and_the_warning_with_a_sixth() {
        let (from, to) = (at("2026-01-01T00:00:00Z"), at("2026-04-01T00:00:00Z")); // 90 days
        assert_eq!(renew_at(from, to), at("2026-03-02T00:00:00Z"));
        assert_eq!(warn_at(from, to), at("2026-03-17T00:00:00Z"));
        // A short-lived certificate (pebble's test validity): 30 s → renew with 10 s left.
        let (from, to) = (at("2026-01-01T00:00:00Z"), at("2026-01-01T00:00:30Z"));
        assert_eq!(renew_at(from, to), at("2026-01-01T00:00:20Z"));
        // Backwards dates do not renew before expiry is even known.
        assert_eq!(renew_at(to, from), from);
    }

    #[test]
    fn retries_double_up_to_the_cap_and_jitter_takes_off_at_most_half() {
        let (initial, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(retry_after(1, initial, max, 1.0), Duration::from_secs(60));
        assert_eq!(retry_after(2, initial, max, 1.0), Duration::from_secs(120));
        assert_eq!(retry_after(3, initial, max, 0.0), Duration::from_secs(120));
        assert_eq!(retry_after(10, initial, max, 1.0), max);
        assert_eq!(retry_after(u32::MAX, initial, max, 1.0), max);
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn the_cas_retry_after_is_read_as_seconds_or_a_date() {
        // Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example.
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let wait = |value| ca_retry_after(value, now);
        assert_eq!(wait("3600"), Some(Duration::from_secs(3600)));
        assert_eq!(wait(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(wait("0"), Some(Duration::ZERO));
        assert_eq!(
            wait("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
        // An HTTP-date: the time from now to it, in each of the three forms RFC 9110 allows.
        assert_eq!(
            wait("Sun, 06 Nov 1994 09:49:37 GMT"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            wait("Sunday, 06-Nov-94 09:49:37 GMT"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            wait("Sun Nov  6 09:49:37 1994"),
            Some(Duration::from_secs(3600))
        );
        // A date past asks for no wait.
        assert_eq!(wait("Sat, 05 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        // Anything else is no answer.
        for garbage in [
            "",
            "  ",
            "-5",
            "1.5",
            "soon",
            "3600s",
            "Sun, 06 Nov 1994",
            "0x10",
        ] {
            assert_eq!(wait(garbage), None, "{garbage:?}");
        }
    }
}
