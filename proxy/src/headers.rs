//! Header rewriting between client and instance: hop-by-hop headers out, forwarding headers
//! in, a request id when the client sent none.
//!
//! `Trailer` is kept although older specs list it as hop-by-hop: RFC 9110 makes it end-to-end,
//! and hyper only encodes HTTP/1.1 trailers that a `Trailer` header announces, so dropping it
//! would drop the trailers themselves.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The request id header the proxy adds when the client sent none.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Whether the request asks for a protocol upgrade (a WebSocket handshake).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether `name` is one of the hop-by-hop headers [`strip_hop_by_hop`] removes by name.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name.as_str().starts_with("proxy-")
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-*`, `TE` (except the `trailers` token), `Transfer-Encoding` and `Upgrade`. With
/// `upgrading`, `Upgrade` stays and `Connection` is set back to `upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Most messages carry none of them: one pass over the names, nothing allocated.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names the `Connection` header lists, besides those removed below anyway.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("close")
                && !t.eq_ignore_ascii_case("keep-alive")
                && !t.eq_ignore_ascii_case("upgrade")
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        if name == header::TRAILER {
            continue;
        }
        headers.remove(&name);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(header::TE);
    headers.remove(header::TRANSFER_ENCODING);
    if headers.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy_named: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for name in proxy_named {
            headers.remove(name);
        }
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// What the proxy knows about where a request came from.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub client: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The Host the client asked for, as it sent it.
    pub host: &'a str,
}

/// Appends the client to `X-Forwarded-For`, sets `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `Forwarded` (RFC 7239, this hop only).
pub fn add_forwarding(headers: &mut HeaderMap, origin: &Origin<'_>) {
    let earlier = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let xff = forwarded_for(earlier, origin.client);
    set_owned(headers, &X_FORWARDED_FOR, xff);
    let proto = match origin.proto {
        "https" => HeaderValue::from_static("https"),
        "http" => HeaderValue::from_static("http"),
        other => match HeaderValue::from_str(other) {
            Ok(v) => v,
            Err(_) => HeaderValue::from_static("http"),
        },
    };
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    set(headers, &X_FORWARDED_HOST, origin.host);
    set_owned(headers, &header::FORWARDED, forwarded(origin));
}

/// `X-Forwarded-For`'s new value: the values the client sent (`earlier`, empty ones
/// dropped), then the client's address.
pub(crate) fn forwarded_for<'a>(
    earlier: impl Iterator<Item = &'a str>,
    client: SocketAddr,
) -> String {
    use std::fmt::Write as _;
    let mut xff = String::with_capacity(48);
    for v in earlier.map(str::trim).filter(|v| !v.is_empty()) {
        xff.push_str(v);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{}", client.ip().to_canonical());
    xff
}

/// `Forwarded` (RFC 7239) for this hop: `for`, `proto` and `host`.
pub(crate) fn forwarded(origin: &Origin<'_>) -> String {
    use std::fmt::Write as _;
    let mut forwarded = String::with_capacity(64);
    match origin.client.ip().to_canonical() {
        IpAddr::V4(v4) => {
            let _ = write!(forwarded, "for={v4}");
        }
        IpAddr::V6(v6) => {
            let _ = write!(forwarded, "for=\"[{v6}]\"");
        }
    }
    forwarded.push_str(";proto=");
    forwarded.push_str(origin.proto);
    let host = origin.host;
    if !host.is_empty() {
        forwarded.push_str(";host=");
        if host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            forwarded.push_str(host);
        } else {
            forwarded.push('"');
            forwarded.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
            forwarded.push('"');
        }
    }
    forwarded
}

/// Like [`set`], moving the string into the header value (no copy).
fn set_owned(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// The request's id: the client's `X-Request-Id` if it sent a usable one, else a new random
/// 128-bit hex id, which is also added to the headers.
pub fn ensure_request_id(headers: &mut HeaderMap) -> String {
    let value = ensure_request_id_value(headers);
    value.to_str().unwrap_or_default().to_owned()
}

/// [`ensure_request_id`] without making a string: the header's value (a cheap clone).
pub fn ensure_request_id_value(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&REQUEST_ID)
        && usable_request_id(id.as_bytes())
    {
        return id.clone();
    }
    let id = new_request_id_bytes();
    // 32 lowercase hex digits are always a valid header value.
    let value = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&id))
        .unwrap_or_else(|_| HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID.clone(), value.clone());
    value
}

/// A random 128-bit id in 32 lowercase hex digits.
pub fn new_request_id() -> String {
    String::from_utf8_lossy(&new_request_id_bytes()).into_owned()
}

/// Whether a client's `X-Request-Id` value is kept as the request's id.
pub(crate) fn usable_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

pub(crate) fn new_request_id_bytes() -> [u8; 32] {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    // 128 bits: a random per-process key (one getrandom call) and a counter mixed with it
    // through a bijection, so ids never repeat within a process, differ between processes,
    // and cost no system call.
    static KEY: OnceLock<[u64; 2]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(|| {
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // The kernel's random source is always there on Linux; if it ever is not, the
            // start time still keeps ids of two processes apart.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            bytes[..8].copy_from_slice(&nanos.to_be_bytes());
            bytes[8..].copy_from_slice(&u64::from(std::process::id()).to_be_bytes());
        }
        let (a, b) = bytes.split_at(8);
        [
            u64::from_be_bytes(a.try_into().unwrap_or_default()),
            u64::from_be_bytes(b.try_into().unwrap_or_default()),
        ]
    });
    // Each thread takes a block of 1024 counter values at a time: the shared counter is
    // touched once per 1024 ids instead of bouncing between cores on every request.
    thread_local! {
        static NEXT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    let n = NEXT.with(|next| {
        let (mut n, mut end) = next.get();
        if n == end {
            n = COUNTER.fetch_add(1024, Ordering::Relaxed);
            end = n + 1024;
        }
        next.set((n + 1, end));
        n
    });
    let high = mix(n ^ key[0]);
    let low = mix(n.wrapping_add(key[1]));
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (w, word) in [high, low].into_iter().enumerate() {
        for i in 0..16 {
            id[w * 16 + i] = HEX[((word >> ((15 - i) * 4)) & 0xf) as usize];
        }
    }
    id
}

/// SplitMix64's finalizer: a bijection on u64 that scatters neighbouring inputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Counts a request head against limits: (number of headers, bytes of names and values plus
/// the request line).
pub fn head_size(method: &str, uri: &str, headers: &HeaderMap) -> (usize, usize) {
    let bytes = method.len()
        + uri.len()
        + headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    (headers.len(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip, trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("server", "app"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be gone: {h:?}");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["trailer"], "x-checksum");
        assert_eq!(h["server"], "app");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn upgrades_keep_upgrade_and_te_without_trailers_goes() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn forwarding_headers_append_and_set() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=evil"),
        ]);
        let origin = Origin {
            client: "[::ffff:192.0.2.1]:5000".parse().unwrap(),
            proto: "http",
            host: "App.example:8080",
        };
        add_forwarding(&mut h, &origin);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "App.example:8080");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;proto=http;host=App.example:8080"
        );
        let v6 = Origin {
            client: "[2001:db8::1]:1".parse().unwrap(),
            proto: "https",
            host: "a",
        };
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, &v6);
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https;host=a");
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(h["x-request-id"], id.as_str());
        assert_ne!(new_request_id(), new_request_id());
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 10_000, "no id repeats");
        assert!(ids.iter().all(|i| {
            i.len() == 32
                && i.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
    }
}
