//! Field blocks (RFC 7541, RFC 9113 §8.2-8.3): requests decoded (HPACK decoding and its
//! dynamic table come from the `loona-hpack` crate; the checks of what may appear in a
//! request are ours), responses encoded.
//!
//! The encoder never adds to the dynamic table: every field is an index into the static
//! table or a literal "without indexing" (never indexed for values marked sensitive). It
//! costs a few bytes per response over indexing, and saves the encoder's table and the
//! work of keeping it in step with the client's SETTINGS_HEADER_TABLE_SIZE: its first block
//! sets the table's size to 0, and nothing is ever stored in it.

use bytes::{BufMut, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};

/// Fields that belong to one HTTP/1 connection, never to HTTP/2 (RFC 9113 §8.2.2).
pub(crate) const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// A request's head, decoded and checked.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The `content-length` the client gave, which its DATA must add up to.
    pub content_length: Option<u64>,
}

/// Why a field block is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Not valid HPACK: the connection's decoding state is lost (COMPRESSION_ERROR).
    Compression,
    /// A malformed request (a stream PROTOCOL_ERROR), with what is wrong.
    Malformed(&'static str),
    /// Larger than the limits: answered 431.
    TooLarge,
}

/// What the decoder gathers from one block.
#[derive(Default)]
struct Gathered {
    method: Option<Method>,
    scheme: Option<String>,
    authority: Option<String>,
    path: Option<String>,
    protocol: bool,
    headers: HeaderMap,
    regular_seen: bool,
    size: usize,
    count: usize,
    error: Option<Refused>,
}

/// Limits on a request's fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Names and values, plus 32 bytes each (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub list_size: usize,
    pub count: usize,
}

/// Decodes a request's field block (`trailers`: a block after its DATA, with no
/// pseudo-fields).
pub(crate) fn decode_request(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    limits: Limits,
) -> Result<RequestHead, Refused> {
    let g = gather(decoder, block, limits, false)?;
    let method = g.method.ok_or(Refused::Malformed("no :method"))?;
    if g.protocol {
        return Err(Refused::Malformed(
            ":protocol (extended CONNECT) is not supported",
        ));
    }
    let uri = if method == Method::CONNECT {
        if g.scheme.is_some() || g.path.is_some() {
            return Err(Refused::Malformed("CONNECT with :scheme or :path"));
        }
        let authority = g
            .authority
            .ok_or(Refused::Malformed("CONNECT without :authority"))?;
        Uri::builder()
            .authority(authority)
            .build()
            .map_err(|_| Refused::Malformed("invalid :authority"))?
    } else {
        let scheme = g.scheme.ok_or(Refused::Malformed("no :scheme"))?;
        let path = g.path.ok_or(Refused::Malformed("no :path"))?;
        if path.is_empty() {
            return Err(Refused::Malformed("empty :path"));
        }
        // A URI with a scheme needs an authority: without one, the path alone.
        let mut uri = Uri::builder();
        if let Some(authority) = g.authority {
            uri = uri.scheme(scheme.as_str()).authority(authority);
        }
        uri.path_and_query(path)
            .build()
            .map_err(|_| Refused::Malformed("invalid :scheme, :authority or :path"))?
    };
    let content_length = match g.headers.get(http::header::CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Refused::Malformed("invalid content-length"))?,
        ),
    };
    if g.headers
        .get_all(http::header::CONTENT_LENGTH)
        .iter()
        .count()
        > 1
    {
        return Err(Refused::Malformed("more than one content-length"));
    }
    Ok(RequestHead {
        method,
        uri,
        headers: g.headers,
        content_length,
    })
}

/// Decodes a trailer block.
pub(crate) fn decode_trailers(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    limits: Limits,
) -> Result<HeaderMap, Refused> {
    Ok(gather(decoder, block, limits, true)?.headers)
}

fn gather(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
    limits: Limits,
    trailers: bool,
) -> Result<Gathered, Refused> {
    let mut g = Gathered::default();
    let decoded = decoder.decode_with_cb(block, |name, value| {
        if g.error.is_some() {
            return;
        }
        g.size += name.len() + value.len() + 32;
        // Counted as HTTP/1 counts headers: pseudo-fields are the request line there.
        if !name.starts_with(b":") {
            g.count += 1;
        }
        if g.size > limits.list_size || g.count > limits.count {
            g.error = Some(Refused::TooLarge);
            return;
        }
        if let Err(e) = field(&mut g, &name, &value, trailers) {
            g.error = Some(e);
        }
    });
    // The block is decoded to its end whatever it holds: the dynamic table stays in step.
    decoded.map_err(|_| Refused::Compression)?;
    match g.error.take() {
        Some(e) => Err(e),
        None => Ok(g),
    }
}

fn field(g: &mut Gathered, name: &[u8], value: &[u8], trailers: bool) -> Result<(), Refused> {
    if let Some(pseudo) = name.strip_prefix(b":") {
        if trailers {
            return Err(Refused::Malformed("a pseudo-field in trailers"));
        }
        if g.regular_seen {
            return Err(Refused::Malformed("a pseudo-field after a regular field"));
        }
        let text = || {
            std::str::from_utf8(value)
                .map(str::to_owned)
                .map_err(|_| Refused::Malformed("a pseudo-field that is not text"))
        };
        let duplicate = || Refused::Malformed("a pseudo-field given twice");
        match pseudo {
            b"method" => {
                if g.method.is_some() {
                    return Err(duplicate());
                }
                g.method = Some(
                    Method::from_bytes(value).map_err(|_| Refused::Malformed("invalid :method"))?,
                );
            }
            b"scheme" if g.scheme.is_none() => g.scheme = Some(text()?),
            b"authority" if g.authority.is_none() => g.authority = Some(text()?),
            b"path" if g.path.is_none() => g.path = Some(text()?),
            b"protocol" if !g.protocol => g.protocol = true,
            b"scheme" | b"authority" | b"path" | b"protocol" => return Err(duplicate()),
            _ => return Err(Refused::Malformed("an unknown pseudo-field")),
        }
        return Ok(());
    }
    g.regular_seen = true;
    if name.iter().any(u8::is_ascii_uppercase) {
        return Err(Refused::Malformed("an upper-case field name"));
    }
    let name =
        HeaderName::from_bytes(name).map_err(|_| Refused::Malformed("an invalid field name"))?;
    if CONNECTION_SPECIFIC.contains(&name.as_str()) {
        return Err(Refused::Malformed("a connection-specific field"));
    }
    if name == http::header::TE && value != b"trailers" {
        return Err(Refused::Malformed("te other than \"trailers\""));
    }
    let value =
        HeaderValue::from_bytes(value).map_err(|_| Refused::Malformed("an invalid field value"))?;
    g.headers.append(name, value);
    Ok(())
}

/// Encodes response field blocks for one connection.
#[derive(Default)]
pub(crate) struct Encoder {
    /// The size update to 0 went out (in the first block).
    sized: bool,
}

impl Encoder {
    /// A response head: `:status` and the fields, connection-specific ones left out.
    pub(crate) fn response(&mut self, status: StatusCode, headers: &HeaderMap, out: &mut BytesMut) {
        self.start(out);
        match status.as_u16() {
            200 => out.put_u8(0x80 | 8),
            204 => out.put_u8(0x80 | 9),
            206 => out.put_u8(0x80 | 10),
            304 => out.put_u8(0x80 | 11),
            400 => out.put_u8(0x80 | 12),
            404 => out.put_u8(0x80 | 13),
            500 => out.put_u8(0x80 | 14),
            _ => {
                integer(out, 0x00, 4, 8);
                string(out, status.as_str().as_bytes());
            }
        }
        self.fields(headers, out);
    }

    /// A trailer block.
    pub(crate) fn trailers(&mut self, headers: &HeaderMap, out: &mut BytesMut) {
        self.start(out);
        self.fields(headers, out);
    }

    fn start(&mut self, out: &mut BytesMut) {
        if !self.sized {
            // Dynamic table size update to 0.
            out.put_u8(0x20);
            self.sized = true;
        }
    }

    fn fields(&mut self, headers: &HeaderMap, out: &mut BytesMut) {
        for (name, value) in headers {
            let name = name.as_str();
            if CONNECTION_SPECIFIC.contains(&name) {
                continue;
            }
            // Literal without indexing (0000), or never indexed (0001) for a sensitive value.
            let first = if value.is_sensitive() { 0x10 } else { 0x00 };
            match static_name(name) {
                Some(index) => integer(out, first, 4, index),
                None => {
                    out.put_u8(first);
                    string(out, name.as_bytes());
                }
            }
            string(out, value.as_bytes());
        }
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1) after the bits in `first`.
fn integer(out: &mut BytesMut, first: u8, n: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.put_u8(rest as u8);
}

/// A string literal, not Huffman-coded.
fn string(out: &mut BytesMut, bytes: &[u8]) {
    integer(out, 0x00, 7, bytes.len());
    out.put_slice(bytes);
}

/// The static table's index of a response field's name (RFC 7541 Appendix A).
fn static_name(name: &str) -> Option<usize> {
    Some(match name {
        "accept-ranges" => 18,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "date" => 33,
        "etag" => 34,
        "expires" => 36,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "proxy-authenticate" => 48,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        list_size: 16 * 1024,
        count: 100,
    };

    fn decoded(block: &[u8]) -> Vec<(String, String)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn responses_decode_to_what_was_encoded_with_every_static_name() {
        let mut headers = HeaderMap::new();
        for name in [
            "accept-ranges",
            "access-control-allow-origin",
            "age",
            "allow",
            "cache-control",
            "content-disposition",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expires",
            "last-modified",
            "link",
            "location",
            "proxy-authenticate",
            "refresh",
            "retry-after",
            "server",
            "set-cookie",
            "strict-transport-security",
            "vary",
            "via",
            "www-authenticate",
            "x-custom",
        ] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static("v"));
        }
        let long = "x".repeat(300);
        headers.append("x-long", HeaderValue::from_str(&long).unwrap());
        headers.append("connection", HeaderValue::from_static("close"));
        let mut secret = HeaderValue::from_static("s");
        secret.set_sensitive(true);
        headers.append("authorization-echo", secret);
        let mut encoder = Encoder::default();
        for status in [200, 204, 206, 304, 400, 404, 500, 201, 503, 299] {
            let mut out = BytesMut::new();
            encoder.response(StatusCode::from_u16(status).unwrap(), &headers, &mut out);
            let mut decoder = loona_hpack::Decoder::new();
            let fields: Vec<_> = decoder
                .decode(&out)
                .unwrap()
                .into_iter()
                .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                .collect();
            let mut expected = vec![(":status".to_owned(), status.to_string())];
            for (n, v) in &headers {
                if n != "connection" {
                    expected.push((n.to_string(), v.to_str().unwrap().to_owned()));
                }
            }
            assert_eq!(fields, expected, "status {status}");
        }
    }

    #[test]
    fn the_first_block_empties_the_table_once() {
        let mut encoder = Encoder::default();
        let mut first = BytesMut::new();
        encoder.response(StatusCode::OK, &HeaderMap::new(), &mut first);
        assert_eq!(&first[..], &[0x20, 0x88]);
        let mut second = BytesMut::new();
        encoder.response(StatusCode::OK, &HeaderMap::new(), &mut second);
        assert_eq!(&second[..], &[0x88]);
        assert_eq!(decoded(&first), vec![(":status".into(), "200".into())]);
    }

    #[test]
    fn requests_are_decoded_and_checked() {
        let mut d = loona_hpack::Decoder::new();
        let head = decode_request(
            &mut d,
            &block(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "app.example"),
                (":path", "/a?b=1"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("te", "trailers"),
            ]),
            LIMITS,
        )
        .unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.to_string(), "https://app.example/a?b=1");
        assert_eq!(head.headers.get_all("cookie").iter().count(), 2);
        assert_eq!(head.content_length, None);

        let malformed: &[(&[(&str, &str)], &str)] = &[
            (&[(":scheme", "http"), (":path", "/")], "no :method"),
            (&[(":method", "GET"), (":path", "/")], "no :scheme"),
            (&[(":method", "GET"), (":scheme", "http")], "no :path"),
            (
                &[(":method", "GET"), (":scheme", "http"), (":path", "")],
                "empty :path",
            ),
            (
                &[
                    (":method", "GET"),
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                ],
                "a pseudo-field given twice",
            ),
            (
                &[
                    (":method", "GET"),
                    ("a", "b"),
                    (":scheme", "http"),
                    (":path", "/"),
                ],
                "a pseudo-field after a regular field",
            ),
            (
                &[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":foo", "x"),
                ],
                "an unknown pseudo-field",
            ),
            (
                &[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    ("Upper", "x"),
                ],
                "an upper-case field name",
            ),
            (
                &[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    ("connection", "x"),
                ],
                "a connection-specific field",
            ),
            (
                &[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    ("te", "gzip"),
                ],
                "te other than \"trailers\"",
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/"),
                    ("content-length", "x"),
                ],
                "invalid content-length",
            ),
        ];
        for (fields, why) in malformed {
            let mut d = loona_hpack::Decoder::new();
            assert_eq!(
                decode_request(&mut d, &block(fields), LIMITS).unwrap_err(),
                Refused::Malformed(why),
                "{fields:?}"
            );
        }
        let mut d = loona_hpack::Decoder::new();
        assert_eq!(
            decode_request(&mut d, &[0xff, 0xff, 0xff], LIMITS).unwrap_err(),
            Refused::Compression
        );
    }

    #[test]
    fn limits_answer_431_and_keep_the_table_in_step() {
        let mut d = loona_hpack::Decoder::new();
        let mut encoder = loona_hpack::Encoder::new();
        let big = "v".repeat(200);
        let fields = [
            (&b":method"[..], &b"GET"[..]),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b"x-big", big.as_bytes()),
        ];
        let first = encoder.encode(fields.iter().copied());
        let small = Limits {
            list_size: 256,
            count: 100,
        };
        assert_eq!(
            decode_request(&mut d, &first, small).unwrap_err(),
            Refused::TooLarge
        );
        // The same fields again, now from the dynamic table: still decoded right.
        let second = encoder.encode(fields.iter().copied());
        let head = decode_request(&mut d, &second, LIMITS).unwrap();
        assert_eq!(head.headers["x-big"], big.as_str());
        let few = Limits {
            list_size: 16 * 1024,
            count: 1,
        };
        // Three pseudo-fields and one header: within a count of 1.
        assert!(decode_request(&mut d, &second, few).is_ok());
        let few = Limits {
            list_size: 16 * 1024,
            count: 0,
        };
        assert_eq!(
            decode_request(&mut d, &second, few).unwrap_err(),
            Refused::TooLarge
        );
    }

    #[test]
    fn trailers_take_no_pseudo_fields() {
        let mut d = loona_hpack::Decoder::new();
        let t = decode_trailers(&mut d, &block(&[("grpc-status", "0")]), LIMITS).unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(
            decode_trailers(&mut d, &block(&[(":status", "200")]), LIMITS).unwrap_err(),
            Refused::Malformed("a pseudo-field in trailers")
        );
    }

    #[test]
    fn integers_use_continuation_bytes() {
        let mut out = BytesMut::new();
        integer(&mut out, 0, 5, 1337);
        assert_eq!(&out[..], &[31, 154, 10]);
        let mut out = BytesMut::new();
        integer(&mut out, 0x80, 7, 126);
        assert_eq!(&out[..], &[0x80 | 126]);
    }
}
