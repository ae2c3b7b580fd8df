//! Decodes an instance's chunked body as it arrives and encodes its data afresh for an
//! HTTP/1 client: the client gets clean framing (no chunk extensions, no trailers: the fast
//! path only takes requests without `TE: trailers`, and hyper's HTTP/1 server drops trailers
//! for the others too), and the proxy knows where the body ends (the connection carries the
//! next response after it). Unframed, for a response hyper's server sends (over HTTP/2
//! above all), the data goes as it is and the trailers are kept for it to send.
//!
//! Strict as hyper's decoder is: CRLF line ends only, hex sizes, optional whitespace before a
//! `;` extension.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line's hex digits (`digits` read so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size, before `;` or CR.
    SizeSpace(u64),
    /// In a chunk extension, up to CR.
    Extension(u64),
    /// After the size line's CR.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// A chunked body's framing, fed the body's bytes in order.
#[derive(Debug)]
pub(crate) struct Chunked {
    state: State,
    /// Chunk data bytes seen (the body's decoded length).
    pub(crate) data: u64,
    /// Whether the data goes out as chunks (to an HTTP/1 client) or as it is.
    reframe: bool,
    /// Unframed: the trailer section's lines, CRLFs included, as they came.
    trailers: Vec<u8>,
}

/// Largest trailer section kept (unframed); a larger one is an error.
const MAX_TRAILER_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub(crate) struct ChunkError(&'static str);

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size { size: 0, digits: 0 },
            data: 0,
            reframe: true,
            trailers: Vec::new(),
        }
    }
}

impl Chunked {
    /// A decoder that appends the body's data as it is, with no framing (for a response
    /// hyper's server frames, over HTTP/2 say), and keeps the trailers ([`Chunked::take_trailers`]).
    pub(crate) fn unframed() -> Chunked {
        Chunked {
            reframe: false,
            ..Chunked::default()
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `bytes`, appending their chunk data to `out` as chunks of the client's body
    /// (and the last chunk once the body ends), or as it is when [`Chunked::unframed`]. Returns how many of `bytes` belong to the
    /// body: all of them, or fewer when it ended inside them.
    pub(crate) fn decode(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 16 => State::Size {
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(ChunkError("chunk size too large")),
                    None if digits == 0 => return Err(ChunkError("chunk size missing")),
                    None => after_size(b, size)?,
                },
                State::SizeSpace(size) => after_size(b, size)?,
                State::Extension(size) => match b {
                    b'\r' => State::SizeLf(size),
                    b'\n' => return Err(ChunkError("bare LF after chunk size")),
                    _ => State::Extension(size),
                },
                State::SizeLf(size) => {
                    if b != b'\n' {
                        return Err(ChunkError("CR without LF after chunk size"));
                    }
                    match size {
                        0 => State::TrailerStart,
                        n => State::Data(n),
                    }
                }
                State::Data(n) => {
                    let take = n.min((bytes.len() - i) as u64) as usize;
                    if self.reframe {
                        encode(out, &bytes[i..i + take]);
                    } else {
                        out.extend_from_slice(&bytes[i..i + take]);
                    }
                    self.data += take as u64;
                    i += take;
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size { size: 0, digits: 0 },
                State::DataCr | State::DataLf => {
                    return Err(ChunkError("chunk data not followed by CRLF"));
                }
                State::TrailerStart => match b {
                    b'\r' => State::FinalLf,
                    b'\n' => return Err(ChunkError("bare LF in the trailers")),
                    _ => {
                        self.keep_trailer_byte(b)?;
                        State::TrailerLine
                    }
                },
                State::TrailerLine => match b {
                    b'\r' => {
                        self.keep_trailer_byte(b)?;
                        State::TrailerLf
                    }
                    b'\n' => return Err(ChunkError("bare LF in the trailers")),
                    _ => {
                        self.keep_trailer_byte(b)?;
                        State::TrailerLine
                    }
                },
                State::TrailerLf if b == b'\n' => {
                    self.keep_trailer_byte(b)?;
                    State::TrailerStart
                }
                State::FinalLf if b == b'\n' => {
                    self.state = State::Done;
                    if self.reframe {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return Ok(i + 1);
                }
                State::TrailerLf | State::FinalLf => {
                    return Err(ChunkError("trailer line not ended by CRLF"));
                }
                State::Done => return Ok(i),
            };
            i += 1;
        }
        Ok(i)
    }
}

impl Chunked {
    fn keep_trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.reframe {
            return Ok(());
        }
        if self.trailers.len() >= MAX_TRAILER_BYTES {
            return Err(ChunkError("trailers larger than 64 KiB"));
        }
        self.trailers.push(b);
        Ok(())
    }

    /// Unframed, once done: the trailer lines (`name: value` and CRLF each), if any.
    pub(crate) fn take_trailers(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.trailers)
    }
}

/// After a chunk size's digits: whitespace, an extension, or the line's end.
fn after_size(b: u8, size: u64) -> Result<State, ChunkError> {
    match b {
        b'\r' => Ok(State::SizeLf(size)),
        b';' => Ok(State::Extension(size)),
        b' ' | b'\t' => Ok(State::SizeSpace(size)),
        _ => Err(ChunkError("bad character in chunk size")),
    }
}

/// Appends `data` as one chunk (nothing for no data: an empty chunk would end the body).
pub(crate) fn encode(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write as _;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a whole client-side chunked body.
    fn plain(encoded: &[u8]) -> Vec<u8> {
        let mut c = Chunked::default();
        let mut body = Vec::new();
        let mut rest = encoded;
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                assert_eq!(rest, b"\r\n", "no trailers, nothing after");
                c.state = State::Done;
                assert!(c.done());
                return body;
            }
            body.extend_from_slice(&rest[..size]);
            assert_eq!(&rest[size..size + 2], b"\r\n");
            rest = &rest[size + 2..];
        }
    }

    #[test]
    fn a_body_split_anywhere_ends_where_it_ends_and_is_framed_afresh() {
        let body =
            b"5\r\nhello\r\n1a ;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..input.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            let first = c.decode(&input[..split], &mut out).unwrap();
            let second = c.decode(&input[split..], &mut out).unwrap();
            assert!(c.done(), "split at {split}");
            assert_eq!(first + second, body.len(), "split at {split}");
            assert_eq!(c.data, 31);
            assert_eq!(
                plain(&out),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "split at {split}"
            );
        }
        let mut empty = Chunked::default();
        let mut out = Vec::new();
        assert_eq!(empty.decode(b"0\r\n\r\nrest", &mut out).unwrap(), 5);
        assert!(empty.done());
        assert_eq!((empty.data, &out[..]), (0, &b"0\r\n\r\n"[..]));
    }

    #[test]
    fn unframed_the_data_comes_out_as_it_is() {
        let body = b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\nnext";
        for split in 0..body.len() {
            let mut c = Chunked::unframed();
            let mut out = Vec::new();
            let first = c.decode(&body[..split], &mut out).unwrap();
            let second = c.decode(&body[split..], &mut out).unwrap();
            assert!(c.done(), "split at {split}");
            assert_eq!(first + second, body.len() - 4, "split at {split}");
            assert_eq!(out, b"helloabc", "split at {split}");
            assert!(c.take_trailers().is_empty());
        }
        let body = b"1\r\nx\r\n0\r\nX-Sum: 1\r\nX-Other: a b\r\n\r\n";
        for split in 0..body.len() {
            let mut c = Chunked::unframed();
            let mut out = Vec::new();
            c.decode(&body[..split], &mut out).unwrap();
            c.decode(&body[split..], &mut out).unwrap();
            assert!(c.done());
            assert_eq!(c.take_trailers(), b"X-Sum: 1\r\nX-Other: a b\r\n");
        }
        let mut framed = Chunked::default();
        framed.decode(body, &mut Vec::new()).unwrap();
        assert!(framed.take_trailers().is_empty(), "only kept unframed");
        let mut big = b"0\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_TRAILER_BYTES + 1));
        assert!(Chunked::unframed().decode(&big, &mut Vec::new()).is_err());
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5 x\r\n",
            b"2\r\nabX",
            b"11111111111111111\r\n",
            b"0\r\nX: 1\rY",
            b"0\r\nX\n\r\n",
            b"0\r\n\n",
            b"3;a\nabc",
        ] {
            let mut out = Vec::new();
            assert!(
                Chunked::default().decode(bad, &mut out).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut partial = Chunked::default();
        let mut out = Vec::new();
        assert_eq!(partial.decode(b"3\r\nab", &mut out).unwrap(), 5);
        assert!(!partial.done());
        assert_eq!(out, b"2\r\nab\r\n");
    }
}
