//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte head, each type's payload checks, and the
//! frames the server writes. Parsing borrows from the read buffer; nothing here allocates
//! but the output buffer's growth.

use bytes::{BufMut, BytesMut};

/// The frame head's length.
pub(crate) const HEAD_LEN: usize = 9;
/// The client's first bytes on an HTTP/2 connection.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_MAX_FRAME_SIZE's default and least value.
pub(crate) const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest window (2^31 - 1).
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;
/// Every window's size until SETTINGS say otherwise.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;

pub(crate) mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

pub(crate) mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

pub(crate) mod setting {
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Code {
    NoError = 0x0,
    Protocol = 0x1,
    Internal = 0x2,
    FlowControl = 0x3,
    StreamClosed = 0x5,
    FrameSize = 0x6,
    RefusedStream = 0x7,
    Compression = 0x9,
    EnhanceYourCalm = 0xb,
}

/// What is wrong with what the client sent, and how far the damage goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Error {
    /// The connection cannot go on: GOAWAY with this code, then close.
    Connection(Code, &'static str),
    /// Only this stream is reset (RST_STREAM); the connection goes on.
    Stream(u32, Code, &'static str),
}

/// A frame's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The head at the start of `buf`, if 9 bytes are there.
    pub(crate) fn parse(buf: &[u8]) -> Option<Head> {
        let b: &[u8; HEAD_LEN] = buf.get(..HEAD_LEN)?.try_into().ok()?;
        Some(Head {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            // The reserved bit is ignored on receipt.
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        })
    }

    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// The payload of a PADDED frame (DATA, HEADERS) without its padding.
pub(crate) fn unpad(head: &Head, payload: &[u8]) -> Result<(usize, usize), Error> {
    if !head.has(flag::PADDED) {
        return Ok((0, payload.len()));
    }
    let Some(&pad) = payload.first() else {
        return Err(Error::Connection(
            Code::FrameSize,
            "padded frame without a pad length",
        ));
    };
    let pad = usize::from(pad);
    if pad >= payload.len() {
        return Err(Error::Connection(
            Code::Protocol,
            "padding as long as the frame's payload",
        ));
    }
    Ok((1, payload.len() - pad))
}

/// A HEADERS payload's field block, past padding and priority: `(start, end)` in `payload`,
/// and the stream it depends on if a priority is given.
pub(crate) fn headers_block(
    head: &Head,
    payload: &[u8],
) -> Result<(usize, usize, Option<u32>), Error> {
    let (mut start, end) = unpad(head, payload)?;
    let mut depends = None;
    if head.has(flag::PRIORITY) {
        if end < start + 5 {
            return Err(Error::Connection(
                Code::FrameSize,
                "HEADERS too short for its priority",
            ));
        }
        let d = &payload[start..start + 4];
        depends = Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff);
        start += 5;
    }
    Ok((start, end, depends))
}

/// The settings in a SETTINGS payload, checked (RFC 9113 §6.5.2).
pub(crate) fn settings(payload: &[u8]) -> Result<Vec<(u16, u32)>, Error> {
    if !payload.len().is_multiple_of(6) {
        return Err(Error::Connection(
            Code::FrameSize,
            "SETTINGS length not a multiple of 6",
        ));
    }
    let mut out = Vec::with_capacity(payload.len() / 6);
    for s in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([s[0], s[1]]);
        let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        match id {
            setting::ENABLE_PUSH if value > 1 => {
                return Err(Error::Connection(
                    Code::Protocol,
                    "SETTINGS_ENABLE_PUSH not 0 or 1",
                ));
            }
            setting::INITIAL_WINDOW_SIZE if i64::from(value) > MAX_WINDOW => {
                return Err(Error::Connection(
                    Code::FlowControl,
                    "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                ));
            }
            setting::MAX_FRAME_SIZE if !(DEFAULT_MAX_FRAME..=16_777_215).contains(&value) => {
                return Err(Error::Connection(
                    Code::Protocol,
                    "SETTINGS_MAX_FRAME_SIZE outside 16384..16777215",
                ));
            }
            _ => {}
        }
        out.push((id, value));
    }
    Ok(out)
}

/// Writes a frame head.
pub(crate) fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    out.reserve(HEAD_LEN + len);
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream & 0x7fff_ffff);
}

pub(crate) fn put_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, kind::SETTINGS, 0, 0);
    for &(id, value) in settings {
        out.put_u16(id);
        out.put_u32(value);
    }
}

pub(crate) fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, kind::SETTINGS, flag::ACK, 0);
}

pub(crate) fn put_ping(out: &mut BytesMut, payload: &[u8; 8]) {
    put_head(out, 8, kind::PING, 0, 0);
    out.put_slice(payload);
}

pub(crate) fn put_ping_ack(out: &mut BytesMut, payload: &[u8; 8]) {
    put_head(out, 8, kind::PING, flag::ACK, 0);
    out.put_slice(payload);
}

pub(crate) fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.put_u32(increment & 0x7fff_ffff);
}

pub(crate) fn put_rst(out: &mut BytesMut, stream: u32, code: Code) {
    put_head(out, 4, kind::RST_STREAM, 0, stream);
    out.put_u32(code as u32);
}

pub(crate) fn put_goaway(out: &mut BytesMut, last_stream: u32, code: Code, debug: &str) {
    put_head(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.put_u32(last_stream & 0x7fff_ffff);
    out.put_u32(code as u32);
    out.put_slice(debug.as_bytes());
}

pub(crate) fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end: bool) {
    put_head(
        out,
        data.len(),
        kind::DATA,
        if end { flag::END_STREAM } else { 0 },
        stream,
    );
    out.put_slice(data);
}

/// A field block as HEADERS and, past `max_frame` bytes, CONTINUATION frames.
pub(crate) fn put_headers(
    out: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let end_stream = if end { flag::END_STREAM } else { 0 };
    let Some(first) = chunks.next() else {
        put_head(
            out,
            0,
            kind::HEADERS,
            flag::END_HEADERS | end_stream,
            stream,
        );
        return;
    };
    let last = chunks.peek().is_none();
    let flags = end_stream | if last { flag::END_HEADERS } else { 0 };
    put_head(out, first.len(), kind::HEADERS, flags, stream);
    out.put_slice(first);
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        put_head(
            out,
            chunk.len(),
            kind::CONTINUATION,
            if last { flag::END_HEADERS } else { 0 },
            stream,
        );
        out.put_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_round_trip_and_the_reserved_bit_is_ignored() {
        let mut out = BytesMut::new();
        put_head(&mut out, 0x01_02_03, kind::HEADERS, flag::END_HEADERS, 7);
        let head = Head::parse(&out).unwrap();
        assert_eq!(
            head,
            Head {
                len: 0x01_02_03,
                kind: kind::HEADERS,
                flags: flag::END_HEADERS,
                stream: 7
            }
        );
        let mut raw = out.to_vec();
        raw[5] |= 0x80;
        assert_eq!(Head::parse(&raw).unwrap().stream, 7);
        assert_eq!(Head::parse(&raw[..8]), None);
    }

    #[test]
    fn padding_is_checked() {
        let head = Head {
            len: 4,
            kind: kind::DATA,
            flags: flag::PADDED,
            stream: 1,
        };
        assert_eq!(unpad(&head, &[2, b'a', 0, 0]).unwrap(), (1, 2));
        assert_eq!(unpad(&head, &[3, 0, 0, 0]).unwrap(), (1, 1));
        assert!(matches!(
            unpad(&head, &[4, b'a', 0, 0]),
            Err(Error::Connection(Code::Protocol, _))
        ));
        assert!(matches!(
            unpad(&head, &[]),
            Err(Error::Connection(Code::FrameSize, _))
        ));
        let plain = Head { flags: 0, ..head };
        assert_eq!(unpad(&plain, b"abcd").unwrap(), (0, 4));
    }

    #[test]
    fn headers_priority_is_skipped() {
        let head = Head {
            len: 7,
            kind: kind::HEADERS,
            flags: flag::PRIORITY,
            stream: 3,
        };
        let payload = [0, 0, 0, 1, 16, 0x82, 0x84];
        assert_eq!(headers_block(&head, &payload).unwrap(), (5, 7, Some(1)));
        let short = Head { len: 3, ..head };
        assert!(headers_block(&short, &payload[..3]).is_err());
    }

    #[test]
    fn settings_are_checked() {
        let ok = [0, 4, 0, 1, 0, 0, 0, 5, 0, 0, 64, 0];
        assert_eq!(settings(&ok).unwrap(), vec![(4, 65_536), (5, 16_384)]);
        assert!(matches!(
            settings(&ok[..5]),
            Err(Error::Connection(Code::FrameSize, _))
        ));
        let push = [0, 2, 0, 0, 0, 2];
        assert!(matches!(
            settings(&push),
            Err(Error::Connection(Code::Protocol, _))
        ));
        let window = [0, 4, 0x80, 0, 0, 0];
        assert!(matches!(
            settings(&window),
            Err(Error::Connection(Code::FlowControl, _))
        ));
        let frame = [0, 5, 0, 0, 0x3f, 0xff];
        assert!(matches!(
            settings(&frame),
            Err(Error::Connection(Code::Protocol, _))
        ));
        // Unknown settings are ignored.
        assert_eq!(settings(&[0, 99, 0, 0, 0, 1]).unwrap(), vec![(99, 1)]);
    }

    #[test]
    fn a_long_field_block_continues() {
        let mut out = BytesMut::new();
        put_headers(&mut out, 5, &[7u8; 40], true, 16);
        let h1 = Head::parse(&out).unwrap();
        assert_eq!(
            (h1.len, h1.kind, h1.flags),
            (16, kind::HEADERS, flag::END_STREAM)
        );
        let h2 = Head::parse(&out[25..]).unwrap();
        assert_eq!((h2.len, h2.kind, h2.flags), (16, kind::CONTINUATION, 0));
        let h3 = Head::parse(&out[50..]).unwrap();
        assert_eq!(
            (h3.len, h3.kind, h3.flags),
            (8, kind::CONTINUATION, flag::END_HEADERS)
        );
        assert_eq!(out.len(), 3 * HEAD_LEN + 40);
    }
}
