//! Follows a chunked body's framing while its bytes are relayed unchanged, to know where the
//! body ends (the connection carries the next response after it) and how much data it held.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line's hex digits (`digits` read so far).
    Size {
        size: u64,
        digits: u8,
    },
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
}

#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub(crate) struct ChunkError(&'static str);

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size { size: 0, digits: 0 },
            data: 0,
        }
    }
}

impl Chunked {
    pub(crate) fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Reads `bytes`; returns how many of them belong to the body: all of them, or fewer
    /// when it ended inside them.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
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
                    None => match b {
                        b'\r' => State::SizeLf(size),
                        b';' | b' ' | b'\t' => State::Extension(size),
                        _ => return Err(ChunkError("bad character in chunk size")),
                    },
                },
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
                    let take = (n.min((bytes.len() - i) as u64)) as usize;
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
                    _ => State::TrailerLine,
                },
                State::TrailerLine => match b {
                    b'\r' => State::TrailerLf,
                    _ => State::TrailerLine,
                },
                State::TrailerLf if b == b'\n' => State::TrailerStart,
                State::FinalLf if b == b'\n' => {
                    self.state = State::Done;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_split_anywhere_ends_where_it_ends() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 0..input.len() {
            let mut c = Chunked::default();
            let first = c.scan(&input[..split]).unwrap();
            let second = c.scan(&input[split..]).unwrap();
            assert!(c.done(), "split at {split}");
            assert_eq!(first + second, body.len(), "split at {split}");
            assert_eq!(c.data, 31);
        }
        let mut empty = Chunked::default();
        assert_eq!(empty.scan(b"0\r\n\r\nrest").unwrap(), 5);
        assert!(empty.done());
        assert_eq!(empty.data, 0);
    }

    #[test]
    fn malformed_framing_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"2\r\nabX",
            b"11111111111111111\r\n",
            b"0\r\nX: 1\rY",
        ] {
            assert!(
                Chunked::default().scan(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut partial = Chunked::default();
        assert_eq!(partial.scan(b"3\r\nab").unwrap(), 5);
        assert!(!partial.done());
    }
}
