//! Just enough DER to read a certificate's validity period, which rustls-webpki checks but
//! does not expose: `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
//! OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE, validity SEQUENCE {
//! notBefore Time, notAfter Time }, ... }, ... }` (RFC 5280 4.1). The certificate has been
//! parsed by webpki before this runs; anything unexpected here is `None`.

use chrono::{DateTime, NaiveDate, Utc};

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// `(notBefore, notAfter)` of a DER certificate.
pub(crate) fn validity(cert: &[u8]) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (mut tbs, _) = expect(certificate, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tbs = tlv(tbs)?.2;
    }
    let (_, tbs) = expect(tbs, INTEGER)?;
    let (_, tbs) = expect(tbs, SEQUENCE)?; // signature algorithm
    let (_, tbs) = expect(tbs, SEQUENCE)?; // issuer
    let (validity, _) = expect(tbs, SEQUENCE)?;
    let (tag, not_before, rest) = tlv(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = tlv(rest)?;
    let not_after = time(tag, not_after)?;
    Some((not_before, not_after))
}

/// `(content, rest)` of the element at the start of `input`, which must have tag `tag`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, content, rest) = tlv(input)?;
    (found == tag).then_some((content, rest))
}

/// `(tag, content, rest)` of the element at the start of `input` (single-byte tags, definite
/// lengths of up to four bytes).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || input.len() < count {
            return None;
        }
        let (bytes, rest) = input.split_at(count);
        input = rest;
        bytes
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b))
    };
    if input.len() < len {
        return None;
    }
    let (content, rest) = input.split_at(len);
    Some((tag, content, rest))
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049, RFC 5280 4.1.2.5.1) or GeneralizedTime
/// `YYYYMMDDHHMMSSZ`.
fn time(tag: u8, content: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(content).ok()?;
    let text = text.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 12) => {
            let yy: i32 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest[i..i + 2].parse::<u32>().ok();
    let date = NaiveDate::from_ymd_opt(year, field(0)?, field(2)?)?;
    let at = date.and_hms_opt(field(4)?, field(6)?, field(8)?)?;
    Some(at.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = time(UTC_TIME, b"491231235959Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2049-12-31T23:59:59+00:00");
        let t = time(UTC_TIME, b"500101000000Z").unwrap();
        assert_eq!(t.to_rfc3339(), "1950-01-01T00:00:00+00:00");
        let t = time(GENERALIZED_TIME, b"20500101000000Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2050-01-01T00:00:00+00:00");
        assert!(time(UTC_TIME, b"20500101000000Z").is_none());
        assert!(time(GENERALIZED_TIME, b"20501301000000Z").is_none());
        assert!(time(UTC_TIME, b"4912312359590").is_none());
    }

    #[test]
    fn truncated_input_is_none() {
        assert!(tlv(&[0x30, 0x82, 0x01]).is_none());
        assert!(tlv(&[0x30, 0x05, 0x01]).is_none());
        assert!(validity(&[]).is_none());
    }
}
