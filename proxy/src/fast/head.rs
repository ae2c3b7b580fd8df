//! Message heads on the fast path: which client requests it takes, what the instance gets,
//! and the response head the client gets back.

use std::net::SocketAddr;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;

use crate::headers::{self, Origin};
use crate::tls::http01::ACME_CHALLENGE_PREFIX;

/// Most response headers read from an instance (hyper's client default).
const MAX_RESPONSE_HEADERS: usize = 100;
/// Most request headers parsed here; a client sending more goes to hyper, which applies the
/// configured limit.
const MAX_REQUEST_HEADERS: usize = 128;

/// A request head the fast path forwards, split off the client's buffer.
pub(crate) struct RequestHead {
    raw: Bytes,
    method: Range<usize>,
    path: Range<usize>,
    host: Range<usize>,
    /// The client's `X-Request-Id`, when usable.
    request_id: Option<Range<usize>>,
    /// Headers the instance gets as sent: (name, value).
    kept: Vec<(Range<usize>, Range<usize>)>,
    /// `X-Forwarded-For` values the client sent.
    forwarded_for: Vec<Range<usize>>,
    /// Headers in the request, and the bytes its head counts against a service's limits
    /// (as [`headers::head_size`] counts them).
    pub(crate) count: usize,
    pub(crate) size: usize,
}

/// What the client's buffer holds.
pub(crate) enum Parsed {
    /// Part of a head.
    Partial,
    /// A request the fast path forwards (split off the buffer).
    Fast(RequestHead),
    /// Anything else: hyper serves it, and the rest of the connection.
    Other,
}

/// Parses the request at the start of `buf`. The fast path takes an HTTP/1.1 request in
/// origin form with one `Host`, no body (no `Transfer-Encoding`, `Content-Length` absent or
/// 0), no `Upgrade`, `Expect`, `TE`, `Trailer`, `Keep-Alive` or `Proxy-*` header, a
/// `Connection` header that only says `keep-alive`, and (on plain HTTP) not an ACME
/// challenge. Heads longer than `max_bytes` are hyper's to refuse.
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    max_bytes: usize,
    max_headers: usize,
    tls: bool,
) -> Parsed {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut parsed);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= max_bytes => len,
        Ok(httparse::Status::Partial) if buf.len() <= max_bytes => return Parsed::Partial,
        _ => return Parsed::Other,
    };
    if req.headers.len() > max_headers {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    // Origin form only, as the `http` crate reads it (it refuses some bytes httparse lets
    // through, and drops a fragment); CONNECT is a tunnel, not an exchange.
    if !path.starts_with('/')
        || (!tls && path.starts_with(ACME_CHALLENGE_PREFIX))
        || method == "CONNECT"
        || http::uri::PathAndQuery::try_from(path).map_or(true, |p| p.as_str() != path)
    {
        return Parsed::Other;
    }
    let mut host = None;
    let mut request_id = None;
    let mut kept = Vec::with_capacity(req.headers.len());
    let mut forwarded_for = Vec::new();
    let mut size = method.len() + path.len();
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        size += name.len() + value.len() + 4;
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("host") {
            if host.is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_graphic) {
                return Parsed::Other;
            }
            host = Some(at(value));
            kept.push((at(name.as_bytes()), at(value)));
        } else if is("content-length") {
            if value != b"0" {
                return Parsed::Other;
            }
            kept.push((at(name.as_bytes()), at(value)));
        } else if is("connection") {
            let only_keep_alive = std::str::from_utf8(value).is_ok_and(|v| {
                v.split(',')
                    .all(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            });
            if !only_keep_alive {
                return Parsed::Other;
            }
        } else if is("transfer-encoding")
            || is("upgrade")
            || is("expect")
            || is("te")
            || is("trailer")
            || is("keep-alive")
            || (name.len() >= 6 && name[..6].eq_ignore_ascii_case("proxy-"))
        {
            return Parsed::Other;
        } else if is("x-forwarded-for") {
            // Values that are not visible ASCII are dropped, as the general path drops them.
            if headers::usable_request_id(value) {
                forwarded_for.push(at(value));
            }
        } else if is("x-forwarded-proto") || is("x-forwarded-host") || is("forwarded") {
            // Replaced with this hop's.
        } else if is("x-request-id") {
            // The first usable one is the request's id; the general path keeps them all.
            if request_id.is_none() && headers::usable_request_id(value) {
                request_id = Some(at(value));
            }
            kept.push((at(name.as_bytes()), at(value)));
        } else {
            kept.push((at(name.as_bytes()), at(value)));
        }
    }
    let Some(host) = host else {
        return Parsed::Other;
    };
    let count = req.headers.len();
    let method = at(method.as_bytes());
    let path = at(path.as_bytes());
    let raw = buf.split_to(len).freeze();
    Parsed::Fast(RequestHead {
        raw,
        method,
        path,
        host,
        request_id,
        kept,
        forwarded_for,
        count,
        size,
    })
}

impl RequestHead {
    /// The head as the client sent it.
    pub(crate) fn raw(&self) -> &[u8] {
        &self.raw
    }

    fn str(&self, r: &Range<usize>) -> &str {
        // Method, path and host were checked to be ASCII by the parser (or above).
        std::str::from_utf8(&self.raw[r.clone()]).unwrap_or_default()
    }

    pub(crate) fn method(&self) -> &str {
        self.str(&self.method)
    }

    pub(crate) fn path(&self) -> &str {
        self.str(&self.path)
    }

    /// The Host the client asked for, as it sent it.
    pub(crate) fn host(&self) -> &str {
        self.str(&self.host)
    }

    pub(crate) fn client_request_id(&self) -> Option<&[u8]> {
        self.request_id.as_ref().map(|r| &self.raw[r.clone()])
    }

    /// Whether the request may go again on a fresh connection when a reused one was
    /// dropped unanswered (the general path's list).
    pub(crate) fn replayable(&self) -> bool {
        crate::forward::REPLAYABLE.contains(&self.method())
    }

    /// Whether the request may go to another instance after a connection failure there
    /// (the general path's list).
    pub(crate) fn retry_safe(&self) -> bool {
        crate::forward::RETRY_SAFE.contains(&self.method())
    }

    /// The head the instance gets: the client's, with this hop's forwarding headers, and
    /// `new_id` as `X-Request-Id` when the client sent none.
    pub(crate) fn upstream_head(
        &self,
        client: SocketAddr,
        proto: &'static str,
        new_id: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw.len() + 256);
        out.extend_from_slice(&self.raw[self.method.clone()]);
        out.push(b' ');
        out.extend_from_slice(&self.raw[self.path.clone()]);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &self.kept {
            line(&mut out, &self.raw[name.clone()], &self.raw[value.clone()]);
        }
        let host = self.host();
        let xff = headers::forwarded_for(self.forwarded_for.iter().map(|r| self.str(r)), client);
        line(&mut out, b"x-forwarded-for", xff.as_bytes());
        line(&mut out, b"x-forwarded-proto", proto.as_bytes());
        line(&mut out, b"x-forwarded-host", host.as_bytes());
        let forwarded = headers::forwarded(&Origin {
            client,
            proto,
            host,
        });
        line(&mut out, b"forwarded", forwarded.as_bytes());
        if let Some(id) = new_id {
            line(&mut out, b"x-request-id", id);
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Whether a header named `name` only concerns one hop (and the `Proxy-*` ones): never passed on.
pub(super) fn hop_by_hop(name: &str) -> bool {
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    is("connection")
        || is("keep-alive")
        || is("te")
        || is("transfer-encoding")
        || is("upgrade")
        || (name.len() >= 6 && name[..6].eq_ignore_ascii_case("proxy-"))
}

/// Appends a `name: value` line.
pub(super) fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    Length(u64),
    /// Chunked on both sides: relayed as it comes, chunk boundaries tracked.
    Chunked,
    /// Until the instance closes: the client gets it chunked.
    UntilClose,
}

/// A final response head from an instance, rewritten for the client.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    /// What the client gets, in the form asked for.
    pub(crate) rendered: Rendered,
    pub(crate) framing: Framing,
    /// The instance keeps the connection open after this response.
    pub(crate) reusable: bool,
    /// A `text/event-stream` (SSE) response.
    pub(crate) event_stream: bool,
}

/// What an instance's buffer holds.
#[derive(Debug)]
pub(crate) enum ParsedResponse {
    Partial,
    /// A 1xx response of this many bytes, dropped (as hyper does).
    Informational(usize),
    /// The final head, of this many bytes.
    Final(usize, ResponseHead),
    Invalid(String),
}

/// A response head for the client, in a [`Form`].
#[derive(Debug)]
pub(crate) enum Rendered {
    /// Status line and headers, blank line included.
    Http1(Vec<u8>),
    /// The headers, and the app's reason phrase when it is not the status code's usual one.
    Fields(http::HeaderMap, Option<hyper::ext::ReasonPhrase>),
}

impl Rendered {
    /// The HTTP/1 bytes ([`Form::Http1`]; empty for the other form).
    pub(crate) fn into_http1(self) -> Vec<u8> {
        match self {
            Rendered::Http1(head) => head,
            Rendered::Fields(..) => Vec::new(),
        }
    }
}

/// How the client's response head is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// HTTP/1.1 bytes, written to the client as they are (the fast path).
    Http1,
    /// A header map for hyper's server to send (a request hyper read, over HTTP/2 above
    /// all): no `Date`, HSTS, `Connection` or framing header is added (hyper's server adds
    /// `Date` and frames the body; `forward::handle` adds HSTS).
    Fields,
}

/// What the response head to the client gets besides the instance's own headers.
pub(crate) struct ResponseExtras<'a> {
    pub(crate) form: Form,
    /// The request was a HEAD: no body follows whatever the headers say.
    pub(crate) head_request: bool,
    /// `Strict-Transport-Security` to add unless the app sent its own.
    pub(crate) hsts: Option<&'a HeaderValue>,
    /// The `Date` to add unless the app sent its own.
    pub(crate) date: &'a [u8],
}

/// Parses an instance's response head at the start of `buf` and rewrites it for the client:
/// hop-by-hop headers out (`Connection` and the headers it names, `Keep-Alive`, `Proxy-*`,
/// `TE`, `Transfer-Encoding`, `Upgrade`); in [`Form::Http1`], `Date` in when missing (as hyper
/// adds it) and HSTS when asked.
pub(crate) fn parse_response(buf: &[u8], extras: &ResponseExtras<'_>) -> ParsedResponse {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut parsed);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return ParsedResponse::Partial,
        Err(e) => return ParsedResponse::Invalid(format!("response head: {e}")),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return ParsedResponse::Invalid("response head: no status".into());
    };
    if code == 101 {
        return ParsedResponse::Invalid("101 Switching Protocols without an upgrade".into());
    }
    if (100..200).contains(&code) {
        return ParsedResponse::Informational(len);
    }
    // What `Connection` says: close, keep-alive, and the headers it names.
    // `close` wins over `keep-alive`, wherever each is said; HTTP/1.0 closes unless told.
    let mut said_close = false;
    let mut said_keep_alive = false;
    let mut named: Vec<&str> = Vec::new();
    let mut chunked = false;
    let mut encoded = false;
    let mut length: Option<u64> = None;
    let mut has_date = false;
    let mut has_hsts = false;
    let mut event_stream = false;
    let mut has_type = false;
    for h in resp.headers.iter() {
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        if is("connection") {
            let Ok(v) = std::str::from_utf8(h.value) else {
                return ParsedResponse::Invalid("response head: Connection is not text".into());
            };
            for t in v.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    said_close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    said_keep_alive = true;
                } else if !t.is_empty()
                    && !t.eq_ignore_ascii_case("trailer")
                    && !t.eq_ignore_ascii_case("content-length")
                {
                    // (A length the app names stays: it frames the body the client gets.)
                    named.push(t);
                }
            }
        } else if is("transfer-encoding") {
            encoded = true;
            let last = String::from_utf8_lossy(h.value)
                .rsplit(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            chunked = last == "chunked";
        } else if is("content-length") {
            // Digits only, as hyper reads it; a list of equal values is one value.
            for part in h.value.split(|&b| b == b',') {
                let digits = part.trim_ascii();
                let n = (!digits.is_empty()
                    && digits.len() <= 19
                    && digits.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(digits).ok()?.parse::<u64>().ok())
                .flatten();
                let Some(n) = n else {
                    return ParsedResponse::Invalid(format!(
                        "response head: Content-Length {:?}",
                        String::from_utf8_lossy(h.value)
                    ));
                };
                if length.is_some_and(|l| l != n) {
                    return ParsedResponse::Invalid("response head: two Content-Lengths".into());
                }
                length = Some(n);
            }
        } else if is("date") {
            has_date = true;
        } else if is("strict-transport-security") {
            has_hsts = true;
        } else if is("content-type") && !has_type {
            // The first, as the general path reads it.
            has_type = true;
            event_stream = h.value.starts_with(b"text/event-stream");
        }
    }
    let close = said_close || (version == 0 && !said_keep_alive);
    if encoded && version == 0 {
        return ParsedResponse::Invalid("response head: HTTP/1.0 with Transfer-Encoding".into());
    }
    let framing = if extras.head_request || code == 204 || code == 304 {
        Framing::Empty
    } else if encoded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let reusable = !close && framing != Framing::UntilClose;
    let kept = resp.headers.iter().filter(|h| {
        let is = |n: &str| h.name.eq_ignore_ascii_case(n);
        let hop_by_hop = hop_by_hop(h.name)
            || named.iter().any(|n| is(n))
            // A length that a transfer coding overrides is not passed on.
            || (encoded && is("content-length"));
        !hop_by_hop
    });
    if extras.form == Form::Fields {
        let mut fields = http::HeaderMap::with_capacity(resp.headers.len());
        for h in kept {
            let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) else {
                return ParsedResponse::Invalid(format!("response head: header {:?}", h.name));
            };
            fields.append(name, value);
        }
        let Ok(status) = http::StatusCode::from_u16(code) else {
            return ParsedResponse::Invalid(format!("response head: status {code}"));
        };
        let reason = resp
            .reason
            .filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason())
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes().to_vec()).ok());
        return ParsedResponse::Final(
            len,
            ResponseHead {
                status: code,
                rendered: Rendered::Fields(fields, reason),
                framing,
                reusable,
                event_stream,
            },
        );
    }
    let mut head = Vec::with_capacity(len + 64);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(code.to_string().as_bytes());
    head.push(b' ');
    match resp.reason.filter(|r| !r.is_empty()) {
        Some(reason) => head.extend_from_slice(reason.as_bytes()),
        None => head.extend_from_slice(
            http::StatusCode::from_u16(code)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .as_bytes(),
        ),
    }
    head.extend_from_slice(b"\r\n");
    for h in kept {
        line(&mut head, h.name.as_bytes(), h.value);
    }
    if matches!(framing, Framing::Chunked | Framing::UntilClose) {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_date {
        line(&mut head, b"date", extras.date);
    }
    if let (Some(hsts), false) = (extras.hsts, has_hsts) {
        line(&mut head, b"strict-transport-security", hsts.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    ParsedResponse::Final(
        len,
        ResponseHead {
            status: code,
            rendered: Rendered::Http1(head),
            framing,
            reusable,
            event_stream,
        },
    )
}

/// Tells the client, in an HTTP/1 response head made by [`parse_response`], that its
/// connection closes after this response.
pub(crate) fn add_close(head: &mut Vec<u8>) {
    debug_assert!(head.ends_with(b"\r\n\r\n"));
    head.truncate(head.len() - 2);
    head.extend_from_slice(b"connection: close\r\n\r\n");
}

/// A short plain-text answer from the proxy itself (as `forward::plain` makes them).
pub(crate) fn plain(
    status: http::StatusCode,
    text: &str,
    retry_after: Option<u64>,
    date: &[u8],
    hsts: Option<&HeaderValue>,
    close: bool,
) -> Vec<u8> {
    let body = format!("{text}\n");
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    line(&mut out, b"content-type", b"text/plain; charset=utf-8");
    if let Some(secs) = retry_after {
        line(&mut out, b"retry-after", secs.to_string().as_bytes());
    }
    line(
        &mut out,
        b"content-length",
        body.len().to_string().as_bytes(),
    );
    line(&mut out, b"date", date);
    if let Some(hsts) = hsts {
        line(&mut out, b"strict-transport-security", hsts.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

/// `Date` values, formatted once per second per thread.
pub(crate) fn http_date() -> Bytes {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, Bytes)> = const { RefCell::new((u64::MAX, Bytes::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            *cache = (secs, Bytes::from(httpdate::fmt_http_date(now)));
        }
        cache.1.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Parsed {
        parse_request(&mut BytesMut::from(text), 64 * 1024, 100, false)
    }

    fn fast(text: &str) -> RequestHead {
        match parse(text) {
            Parsed::Fast(h) => h,
            Parsed::Partial => panic!("partial: {text:?}"),
            Parsed::Other => panic!("not taken: {text:?}"),
        }
    }

    const CLIENT: &str = "192.0.2.7:5555";

    #[test]
    fn a_plain_get_is_forwarded_with_this_hops_headers() {
        let h = fast(
            "GET /a?b=1 HTTP/1.1\r\nHost: App.Example:8080\r\nUser-Agent: t\r\n\
             Connection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\n\
             Forwarded: for=evil\r\nX-Forwarded-Host: evil\r\n\r\n",
        );
        assert_eq!(
            (h.method(), h.path(), h.host()),
            ("GET", "/a?b=1", "App.Example:8080")
        );
        assert!(h.client_request_id().is_none());
        let up = h.upstream_head(CLIENT.parse().unwrap(), "http", Some(b"abc"));
        assert_eq!(
            String::from_utf8(up).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: App.Example:8080\r\nUser-Agent: t\r\n\
             x-forwarded-for: 10.0.0.1, 192.0.2.7\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: App.Example:8080\r\n\
             forwarded: for=192.0.2.7;proto=http;host=App.Example:8080\r\n\
             x-request-id: abc\r\n\r\n"
        );
    }

    #[test]
    fn the_clients_request_id_is_kept() {
        let h = fast("GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: r-1\r\n\r\n");
        assert_eq!(h.client_request_id(), Some(&b"r-1"[..]));
        let up =
            String::from_utf8(h.upstream_head(CLIENT.parse().unwrap(), "https", None)).unwrap();
        assert!(up.contains("X-Request-Id: r-1\r\n"), "{up}");
        assert!(up.contains("x-forwarded-proto: https\r\n"), "{up}");
        assert!(!up.contains("x-request-id:"), "{up}");
    }

    #[test]
    fn requests_hyper_serves_instead() {
        for text in [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nHost a\r\n\r\n",
            "GET /a<b> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(parse(text), Parsed::Other), "{text:?}");
        }
        // Over TLS the challenge path is an ordinary path.
        let mut buf =
            BytesMut::from("GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(matches!(
            parse_request(&mut buf, 1024, 100, true),
            Parsed::Fast(_)
        ));
        // A head longer than allowed is hyper's to refuse.
        let mut long = BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\nX: ");
        long.extend_from_slice(&[b'x'; 100]);
        assert!(matches!(
            parse_request(&mut long, 64, 100, false),
            Parsed::Other
        ));
        // So is a complete one, and one with more headers than allowed.
        let mut complete = BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\nX: 0123456789\r\n\r\n");
        assert!(matches!(
            parse_request(&mut complete, 32, 100, false),
            Parsed::Other
        ));
        let mut many = BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n");
        assert!(matches!(
            parse_request(&mut many, 1024, 2, false),
            Parsed::Other
        ));
    }

    #[test]
    fn a_partial_head_waits_and_pipelined_requests_stay_in_the_buffer() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: a\r\n"),
            Parsed::Partial
        ));
        let mut buf = BytesMut::from(
            "GET /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        let Parsed::Fast(first) = parse_request(&mut buf, 1024, 100, false) else {
            panic!()
        };
        assert_eq!(first.path(), "/1");
        assert_eq!(first.count, 2);
        assert_eq!(first.size, 3 + 2 + (4 + 1 + 4) + (14 + 1 + 4));
        assert_eq!(&buf[..], b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    fn respond(text: &str, extras: &ResponseExtras<'_>) -> (usize, ResponseHead) {
        match parse_response(text.as_bytes(), extras) {
            ParsedResponse::Final(len, head) => (len, head),
            other => panic!("{other:?}"),
        }
    }

    const EXTRAS: ResponseExtras<'static> = ResponseExtras {
        form: Form::Http1,
        head_request: false,
        hsts: None,
        date: b"Thu, 26 Nov 2026 10:00:00 GMT",
    };

    #[test]
    fn hop_by_hop_response_headers_are_stripped_and_date_added() {
        let text = "HTTP/1.1 200 Fine\r\nServer: app\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: s\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok";
        let (len, h) = respond(text, &EXTRAS);
        assert_eq!(len, text.len() - 2);
        assert_eq!(
            String::from_utf8(h.rendered.into_http1()).unwrap(),
            "HTTP/1.1 200 Fine\r\nServer: app\r\nContent-Length: 2\r\n\
             date: Thu, 26 Nov 2026 10:00:00 GMT\r\n\r\n"
        );
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.reusable);
    }

    #[test]
    fn as_fields_the_same_headers_go_and_nothing_is_added() {
        let as_fields = ResponseExtras {
            form: Form::Fields,
            ..EXTRAS
        };
        let text = "HTTP/1.1 200 Fine\r\nServer: app\r\nConnection: keep-alive, X-Secret\r\n\
             X-Secret: s\r\nSet-Cookie: a\r\nSet-Cookie: b\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (len, h) = respond(text, &as_fields);
        assert_eq!(len, text.len());
        assert_eq!(h.framing, Framing::Chunked);
        let Rendered::Fields(fields, reason) = h.rendered else {
            panic!("{:?}", h.rendered);
        };
        let names: Vec<_> = fields.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["server", "set-cookie"]);
        assert_eq!(fields.get_all("set-cookie").iter().count(), 2);
        assert_eq!(reason.as_ref().map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nX: \xff\x7f\r\n\r\n", &as_fields),
            ParsedResponse::Invalid(_)
        ));
    }

    #[test]
    fn framing_follows_the_rules() {
        let chunked = respond(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            &EXTRAS,
        )
        .1;
        assert_eq!(chunked.framing, Framing::Chunked);
        let head = String::from_utf8(chunked.rendered.into_http1()).unwrap();
        assert!(
            head.contains("transfer-encoding: chunked\r\n") && !head.contains("Content-Length")
        );
        let close = respond(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
            &EXTRAS,
        )
        .1;
        assert_eq!(close.framing, Framing::UntilClose);
        assert!(!close.reusable && close.event_stream);
        let http10 = respond("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &EXTRAS).1;
        assert!(!http10.reusable);
        let kept = "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n";
        assert!(respond(kept, &EXTRAS).1.reusable);
        // Close wins, whichever comes first.
        for both in ["close, keep-alive", "keep-alive, close"] {
            for version in ["1.0", "1.1"] {
                let text = format!(
                    "HTTP/{version} 200 OK\r\nConnection: {both}\r\nContent-Length: 1\r\n\r\n"
                );
                assert!(!respond(&text, &EXTRAS).1.reusable, "{text}");
            }
        }
        let closing = respond(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            &EXTRAS,
        )
        .1;
        assert!(!closing.reusable);
        assert!(
            !String::from_utf8(closing.rendered.into_http1())
                .unwrap()
                .contains("close")
        );
        let no_content = respond("HTTP/1.1 204 No Content\r\n\r\n", &EXTRAS).1;
        assert_eq!(no_content.framing, Framing::Empty);
        let head_request = ResponseExtras {
            head_request: true,
            ..EXTRAS
        };
        let to_head = respond(
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            &head_request,
        )
        .1;
        assert_eq!(to_head.framing, Framing::Empty);
        assert!(
            String::from_utf8(to_head.rendered.into_http1())
                .unwrap()
                .contains("Content-Length: 100")
        );
    }

    #[test]
    fn informational_and_broken_responses() {
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200",
                &EXTRAS
            ),
            ParsedResponse::Informational(40)
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n", &EXTRAS),
            ParsedResponse::Partial
        ));
        for bad in [
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "SSH-2.0\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_response(bad.as_bytes(), &EXTRAS),
                    ParsedResponse::Invalid(_)
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn hsts_and_close_are_added_when_asked() {
        let hsts = HeaderValue::from_static("max-age=60");
        let extras = ResponseExtras {
            hsts: Some(&hsts),
            ..EXTRAS
        };
        let mut head = respond("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &extras)
            .1
            .rendered
            .into_http1();
        add_close(&mut head);
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.contains("strict-transport-security: max-age=60\r\n"),
            "{head}"
        );
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        let own = respond(
            "HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=1\r\nContent-Length: 0\r\n\r\n",
            &extras,
        )
        .1;
        let head = String::from_utf8(own.rendered.into_http1()).unwrap();
        assert!(!head.contains("max-age=60"), "{head}");
    }

    #[test]
    fn plain_answers_carry_retry_after() {
        let out = plain(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "503 service unavailable: the service is paused",
            Some(2),
            b"D",
            None,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("retry-after: 2\r\n") && text.contains("content-length: 47\r\n"));
        assert!(text.ends_with("\r\n\r\n503 service unavailable: the service is paused\n"));
    }
}
