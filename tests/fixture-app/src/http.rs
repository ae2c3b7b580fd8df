//! A small HTTP/1.x request parser: request head, request bodies (Content-Length and chunked) and
//! query strings. Everything reads from a `BufRead`, so tests feed it byte slices.

use std::fmt;
use std::io::{self, BufRead, Read};

/// Longest request line or header line accepted.
const MAX_LINE: usize = 8 * 1024;
/// Most bytes a request head (request line plus headers) may take.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one request.
const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (neither Content-Length nor Transfer-Encoding).
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path part of the request target, without the query.
    pub path: String,
    /// The raw query string (after `?`), empty if there is none.
    pub query: String,
    pub version: Version,
    /// Header names are lowercased; values are trimmed.
    pub headers: Vec<(String, String)>,
    pub body: BodyKind,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
}

impl Request {
    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub enum ParseError {
    /// The peer closed the connection before sending a byte of a new request.
    Closed,
    /// Reading from the connection failed (including timeouts).
    Io(io::Error),
    /// The request is malformed; the text says what was wrong.
    Bad(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Closed => write!(f, "connection closed"),
            ParseError::Io(e) => write!(f, "read request: {e}"),
            ParseError::Bad(why) => write!(f, "bad request: {why}"),
        }
    }
}

fn bad(why: impl Into<String>) -> ParseError {
    ParseError::Bad(why.into())
}

/// Reads one line ending in LF (CR before it is stripped), at most `MAX_LINE` bytes.
/// Returns `None` on end of input before any byte.
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<Option<String>, ParseError> {
    let mut line = Vec::new();
    let limit = MAX_LINE.min(*budget) as u64 + 1;
    let n = r
        .take(limit)
        .read_until(b'\n', &mut line)
        .map_err(ParseError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n as u64 >= limit {
            return Err(bad("request head too large"));
        }
        return Err(ParseError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside the request head",
        )));
    }
    *budget = budget.saturating_sub(n);
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| bad("request head is not valid UTF-8"))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads a request head and works out how its body is framed and whether the connection stays
/// open afterwards. The body itself is left unread in `r`.
pub fn read_request(r: &mut impl BufRead) -> Result<Request, ParseError> {
    let mut budget = MAX_HEAD;
    // RFC 9112 2.2: ignore empty lines before the request line.
    let request_line = loop {
        match read_line(r, &mut budget)? {
            None => return Err(ParseError::Closed),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!("malformed request line {request_line:?}")));
    };
    if !is_token(method) {
        return Err(bad(format!("malformed method {method:?}")));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        other => return Err(bad(format!("unsupported version {other:?}"))),
    };
    if target.is_empty() {
        return Err(bad("empty request target"));
    }
    // Absolute-form targets (from proxies): keep only the path and query.
    let origin = if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    } else {
        target
    };
    let (path, query) = match origin.split_once('?') {
        Some((p, q)) => (p, q),
        None => (origin, ""),
    };

    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(r, &mut budget)? else {
            return Err(ParseError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the request head",
            )));
        };
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(bad("too many header fields"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("malformed header line {line:?}")));
        };
        if !is_token(name) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        headers.push((
            name.to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }

    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    for (name, value) in &headers {
        match name.as_str() {
            "content-length" => {
                for item in value.split(',') {
                    let item = item.trim();
                    if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad(format!("invalid content-length {value:?}")));
                    }
                    let n: u64 = item
                        .parse()
                        .map_err(|_| bad(format!("invalid content-length {value:?}")))?;
                    if content_length.is_some_and(|old| old != n) {
                        return Err(bad("conflicting content-length values"));
                    }
                    content_length = Some(n);
                }
            }
            "transfer-encoding" => {
                transfer_encoding = true;
                // Only the final coding decides the framing; it must be chunked.
                let last = value.rsplit(',').next().unwrap_or("").trim();
                chunked = last.eq_ignore_ascii_case("chunked");
            }
            "connection" => {
                for option in value.split(',') {
                    let option = option.trim();
                    if option.eq_ignore_ascii_case("close") {
                        connection_close = true;
                    } else if option.eq_ignore_ascii_case("keep-alive") {
                        connection_keep_alive = true;
                    }
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(bad(format!("unsupported expectation {value:?}")));
                }
            }
            _ => {}
        }
    }

    let mut keep_alive = match version {
        Version::Http11 => !connection_close,
        Version::Http10 => connection_keep_alive && !connection_close,
    };
    let body = if transfer_encoding {
        if version == Version::Http10 {
            return Err(bad("transfer-encoding in an HTTP/1.0 request"));
        }
        if !chunked {
            return Err(bad("transfer-encoding does not end in chunked"));
        }
        if content_length.is_some() {
            // Both framings: a smuggling attempt or a broken client. Serve it, then close.
            keep_alive = false;
        }
        BodyKind::Chunked
    } else {
        match content_length {
            None | Some(0) => BodyKind::Empty,
            Some(n) => BodyKind::Length(n),
        }
    };

    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        version,
        headers,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::Http11,
    })
}

/// A request body: reads exactly the body's bytes from the connection and then reports the end.
pub enum Body<'a, R: BufRead> {
    Empty,
    Length(io::Take<&'a mut R>),
    Chunked(ChunkedReader<&'a mut R>),
}

impl<'a, R: BufRead> Body<'a, R> {
    pub fn new(kind: BodyKind, r: &'a mut R) -> Self {
        match kind {
            BodyKind::Empty => Body::Empty,
            BodyKind::Length(n) => Body::Length(r.take(n)),
            BodyKind::Chunked => Body::Chunked(ChunkedReader::new(r)),
        }
    }

    /// Reads and discards what is left of the body, so the next request can be read.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }
}

impl<R: BufRead> Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Empty => Ok(0),
            Body::Length(take) => {
                let want = take.limit();
                let n = take.read(buf)?;
                if n == 0 && want > 0 && !buf.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside the request body",
                    ));
                }
                Ok(n)
            }
            Body::Chunked(c) => c.read(buf),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// The last chunk and the trailers have been read.
    Done,
}

/// Decodes a chunked request body (RFC 9112 7.1), returning data as soon as it arrives.
pub struct ChunkedReader<R> {
    inner: R,
    state: ChunkState,
}

impl<R: BufRead> ChunkedReader<R> {
    pub fn new(inner: R) -> Self {
        ChunkedReader {
            inner,
            state: ChunkState::Size,
        }
    }

    fn invalid(why: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why.to_string())
    }

    fn line(&mut self) -> io::Result<String> {
        let mut budget = MAX_LINE;
        match read_line(&mut self.inner, &mut budget) {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunked body",
            )),
            Err(ParseError::Io(e)) => Err(e),
            Err(e) => Err(Self::invalid(&e.to_string())),
        }
    }
}

/// Parses a chunk-size line: hex digits, optionally followed by `;extensions`.
pub fn parse_chunk_size(line: &str) -> Option<u64> {
    let size = line.split(';').next()?.trim_matches([' ', '\t']);
    if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(size, 16).ok()
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                ChunkState::Done => return Ok(0),
                ChunkState::Size => {
                    let line = self.line()?;
                    let size = parse_chunk_size(&line)
                        .ok_or_else(|| Self::invalid("malformed chunk size line"))?;
                    if size == 0 {
                        // Trailer fields until an empty line; they are ignored.
                        loop {
                            if self.line()?.is_empty() {
                                break;
                            }
                        }
                        self.state = ChunkState::Done;
                    } else {
                        self.state = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside a chunk",
                        ));
                    }
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(n);
                }
                ChunkState::DataEnd => {
                    if !self.line()?.is_empty() {
                        return Err(Self::invalid("chunk data not followed by CRLF"));
                    }
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

/// Splits a query string into decoded `(name, value)` pairs.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for part in query.split('&') {
        if part.is_empty() {
            continue;
        }
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((percent_decode(name)?, percent_decode(value)?));
    }
    Ok(pairs)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("invalid percent-encoding in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("query component {s:?} is not valid UTF-8"))
}

/// Reads the unsigned integer parameter `name` from a query string, which must be present and
/// at most `max`. The error text names the parameter.
pub fn query_u64(query: &str, name: &str, max: u64) -> Result<u64, String> {
    let pairs = parse_query(query)?;
    let Some((_, value)) = pairs.iter().rev().find(|(n, _)| n == name) else {
        return Err(format!("missing parameter {name}"));
    };
    let n: u64 = value.parse().map_err(|_| {
        format!("invalid parameter {name}: {value:?} is not a non-negative integer")
    })?;
    if n > max {
        return Err(format!(
            "invalid parameter {name}: {n} is above the maximum {max}"
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Request, ParseError> {
        read_request(&mut raw.as_bytes())
    }

    fn body_of(raw: &str) -> io::Result<(Request, Vec<u8>, Vec<u8>)> {
        let mut input = raw.as_bytes();
        let req = read_request(&mut input).map_err(|e| io::Error::other(e.to_string()))?;
        let mut body = Vec::new();
        Body::new(req.body, &mut input).read_to_end(&mut body)?;
        Ok((req, body, input.to_vec()))
    }

    #[test]
    fn parses_a_simple_get() {
        let req = parse("GET /sleep?ms=5 HTTP/1.1\r\nHost: x\r\nX-Thing:  a b \r\n\r\n").unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/sleep");
        assert_eq!(req.query, "ms=5");
        assert_eq!(req.version, Version::Http11);
        assert_eq!(req.header("x-thing"), Some("a b"));
        assert_eq!(req.header("HOST"), Some("x"));
        assert_eq!(req.body, BodyKind::Empty);
        assert!(req.keep_alive);
        assert!(!req.expect_continue);
    }

    #[test]
    fn accepts_bare_lf_and_leading_empty_lines() {
        let req = parse("\r\n\nGET / HTTP/1.1\nHost: x\n\n").unwrap();
        assert_eq!(req.path, "/");
        assert_eq!(req.query, "");
    }

    #[test]
    fn absolute_form_keeps_path_and_query() {
        let req = parse("GET http://example.test:80/env?a=1 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(req.path, "/env");
        assert_eq!(req.query, "a=1");
        let req = parse("GET http://example.test HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(req.path, "/");
    }

    #[test]
    fn keep_alive_rules_per_version() {
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(
            !parse("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(parse("GET / HTTP/1.1\r\n\r\n").unwrap().keep_alive);
    }

    #[test]
    fn clean_close_is_reported_as_closed() {
        assert!(matches!(parse(""), Err(ParseError::Closed)));
        assert!(matches!(parse("\r\n"), Err(ParseError::Closed)));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: x\r\n"),
            Err(ParseError::Io(_))
        ));
    }

    #[test]
    fn rejects_malformed_heads() {
        for raw in [
            "GET /\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: magic\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(ParseError::Bad(_))),
                "accepted {raw:?}"
            );
        }
    }

    #[test]
    fn rejects_oversized_heads() {
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE));
        assert!(matches!(parse(&long), Err(ParseError::Bad(_))));
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("X-{i}: y\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(parse(&many), Err(ParseError::Bad(_))));
    }

    #[test]
    fn content_length_body_and_pipelining() {
        let (req, body, rest) =
            body_of("POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n")
                .unwrap();
        assert_eq!(req.body, BodyKind::Length(5));
        assert_eq!(body, b"hello");
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
        // A repeated identical value is allowed.
        let req = parse("POST / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n").unwrap();
        assert_eq!(req.body, BodyKind::Length(7));
    }

    #[test]
    fn truncated_content_length_body_is_an_error() {
        let err = body_of("POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let (req, body, rest) = body_of(
            "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nNEXT",
        )
        .unwrap();
        assert_eq!(req.body, BodyKind::Chunked);
        assert_eq!(body, b"hello0123456789");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn chunked_with_content_length_closes_afterwards() {
        let req =
            parse("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap();
        assert_eq!(req.body, BodyKind::Chunked);
        assert!(!req.keep_alive);
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for raw in [
            "zz\r\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "5\r\nhel",
            "\r\n",
            "11111111111111111\r\n",
        ] {
            let mut input = raw.as_bytes();
            let mut out = Vec::new();
            assert!(
                ChunkedReader::new(&mut input)
                    .read_to_end(&mut out)
                    .is_err(),
                "accepted {raw:?}"
            );
        }
    }

    #[test]
    fn chunk_size_parsing() {
        assert_eq!(parse_chunk_size("0"), Some(0));
        assert_eq!(parse_chunk_size("1a"), Some(26));
        assert_eq!(parse_chunk_size("FF ; ext=1"), Some(255));
        assert_eq!(parse_chunk_size(""), None);
        assert_eq!(parse_chunk_size("-1"), None);
        assert_eq!(parse_chunk_size("0x10"), None);
    }

    #[test]
    fn expect_continue_only_for_http11() {
        assert!(
            parse("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
                .unwrap()
                .expect_continue
        );
        assert!(
            !parse("POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .unwrap()
                .expect_continue
        );
    }

    #[test]
    fn query_parsing() {
        assert_eq!(
            parse_query("a=1&b=x%20y+z&&flag&c=%41").unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y z".into()),
                ("flag".into(), "".into()),
                ("c".into(), "A".into()),
            ]
        );
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%4").is_err());
        assert!(parse_query("a=%ff").is_err());
    }

    #[test]
    fn query_u64_names_the_parameter() {
        assert_eq!(query_u64("ms=250", "ms", 1000), Ok(250));
        assert_eq!(query_u64("ms=1&ms=2", "ms", 1000), Ok(2));
        assert_eq!(query_u64("x=1&ms=0", "ms", 1000), Ok(0));
        for (query, needle) in [
            ("", "missing parameter ms"),
            ("ms=", "invalid parameter ms"),
            ("ms=abc", "invalid parameter ms"),
            ("ms=-5", "invalid parameter ms"),
            ("ms=1.5", "invalid parameter ms"),
            ("ms=1001", "invalid parameter ms"),
        ] {
            let err = query_u64(query, "ms", 1000).unwrap_err();
            assert!(err.contains(needle), "{query:?} gave {err:?}");
        }
    }
}
