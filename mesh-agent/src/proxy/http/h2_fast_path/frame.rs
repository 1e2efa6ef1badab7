//! HTTP/2 framing (RFC 9113 §4, §6): frame headers, the frames the forwarder writes, and
//! SETTINGS. Payloads are passed through as `Bytes`; nothing here allocates per frame
//! beyond what the output buffer grows by.
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const STREAM_CLOSED: u32 = 0x5;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest frame payload either side may send before the peer raises it; the
/// forwarder never raises it, so every frame it reads or writes fits this.
pub const DEFAULT_MAX_FRAME: usize = 16_384;
/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The window every stream starts with until SETTINGS say otherwise.
pub const DEFAULT_WINDOW: i64 = 65_535;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// A connection error: the connection ends with a GOAWAY carrying `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnError {
    pub code: u32,
    pub reason: &'static str,
}

impl ConnError {
    pub fn new(code: u32, reason: &'static str) -> Self {
        Self { code, reason }
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP/2 error {:#x}: {}", self.code, self.reason)
    }
}

impl std::error::Error for ConnError {}

/// One frame read off the wire. For DATA and HEADERS, padding (and HEADERS' priority
/// fields) are stripped from `payload`; `flow_len` is what the frame counts against flow
/// control (the whole payload, padding included).
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Bytes,
    pub flow_len: usize,
}

/// Takes the next whole frame off `buf`; `Ok(None)` until one is complete.
pub fn next_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ConnError> {
    if buf.len() < 9 {
        return Ok(None);
    }
    let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    if len > DEFAULT_MAX_FRAME {
        return Err(ConnError::new(
            FRAME_SIZE_ERROR,
            "frame larger than SETTINGS_MAX_FRAME_SIZE",
        ));
    }
    if buf.len() < 9 + len {
        return Ok(None);
    }
    let kind = buf[3];
    let flags = buf[4];
    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
    buf.advance(9);
    let mut payload = buf.split_to(len).freeze();
    if (kind == DATA || kind == HEADERS) && flags & PADDED != 0 {
        let Some(&pad) = payload.first() else {
            return Err(ConnError::new(
                PROTOCOL_ERROR,
                "padded frame without a pad length",
            ));
        };
        let pad = usize::from(pad);
        if pad + 1 > payload.len() {
            return Err(ConnError::new(
                PROTOCOL_ERROR,
                "padding longer than the frame",
            ));
        }
        payload.truncate(payload.len() - pad);
        payload.advance(1);
    }
    if kind == HEADERS && flags & PRIORITY_FLAG != 0 {
        if payload.len() < 5 {
            return Err(ConnError::new(
                FRAME_SIZE_ERROR,
                "HEADERS too short for its priority",
            ));
        }
        payload.advance(5);
    }
    Ok(Some(Frame {
        kind,
        flags,
        stream,
        payload,
        flow_len: len,
    }))
}

/// Writes a frame header.
pub fn head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.reserve(9 + len);
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

pub fn data(out: &mut BytesMut, stream: u32, payload: &[u8], end: bool) {
    head(
        out,
        payload.len(),
        DATA,
        if end { END_STREAM } else { 0 },
        stream,
    );
    out.extend_from_slice(payload);
}

/// A header block as HEADERS and as many CONTINUATION frames as it needs.
pub fn headers(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool) {
    let mut chunks = block.chunks(DEFAULT_MAX_FRAME).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if chunks.peek().is_none() {
        flags |= END_HEADERS;
    }
    head(out, first.len(), HEADERS, flags, stream);
    out.extend_from_slice(first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        head(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

pub fn rst_stream(out: &mut BytesMut, stream: u32, code: u32) {
    head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

pub fn goaway(out: &mut BytesMut, last_stream: u32, code: u32) {
    head(out, 8, GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(code);
}

pub fn settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    head(out, 6 * values.len(), SETTINGS, 0, 0);
    for &(id, value) in values {
        out.put_u16(id);
        out.put_u32(value);
    }
}

pub fn settings_ack(out: &mut BytesMut) {
    head(out, 0, SETTINGS, ACK, 0);
}

pub fn ping_ack(out: &mut BytesMut, payload: &[u8]) {
    head(out, 8, PING, ACK, 0);
    out.extend_from_slice(payload);
}

/// What a peer's SETTINGS tell the side that sends to it.
#[derive(Debug, Clone, Copy)]
pub struct PeerSettings {
    pub header_table_size: u32,
    pub max_concurrent_streams: u32,
    pub initial_window: i64,
    pub max_frame: usize,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            header_table_size: 4096,
            max_concurrent_streams: u32::MAX,
            initial_window: DEFAULT_WINDOW,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

/// Applies a SETTINGS frame's values (RFC 9113 §6.5.2), checking their ranges.
pub fn apply_settings(settings: &mut PeerSettings, payload: &[u8]) -> Result<(), ConnError> {
    if !payload.len().is_multiple_of(6) {
        return Err(ConnError::new(
            FRAME_SIZE_ERROR,
            "SETTINGS length not a multiple of 6",
        ));
    }
    for entry in payload.chunks_exact(6) {
        let id = u16::from_be_bytes([entry[0], entry[1]]);
        let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
        match id {
            SETTINGS_HEADER_TABLE_SIZE => settings.header_table_size = value,
            SETTINGS_ENABLE_PUSH if value > 1 => {
                return Err(ConnError::new(
                    PROTOCOL_ERROR,
                    "SETTINGS_ENABLE_PUSH not 0 or 1",
                ));
            }
            SETTINGS_MAX_CONCURRENT_STREAMS => settings.max_concurrent_streams = value,
            SETTINGS_INITIAL_WINDOW_SIZE => {
                if i64::from(value) > MAX_WINDOW {
                    return Err(ConnError::new(
                        FLOW_CONTROL_ERROR,
                        "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                    ));
                }
                settings.initial_window = i64::from(value);
            }
            SETTINGS_MAX_FRAME_SIZE => {
                if !(16_384..=16_777_215).contains(&value) {
                    return Err(ConnError::new(
                        PROTOCOL_ERROR,
                        "SETTINGS_MAX_FRAME_SIZE out of range",
                    ));
                }
                settings.max_frame = value as usize;
            }
            // SETTINGS_MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored.
            _ => {}
        }
    }
    Ok(())
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `first` (RFC 7541 §5.1).
pub fn hpack_integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

pub fn check_rst(f: &Frame) -> Result<(), ConnError> {
    if f.stream == 0 {
        return Err(ConnError::new(PROTOCOL_ERROR, "RST_STREAM on stream 0"));
    }
    if f.payload.len() != 4 {
        return Err(ConnError::new(FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"));
    }
    Ok(())
}

pub fn check_ping(f: &Frame) -> Result<(), ConnError> {
    if f.stream != 0 {
        return Err(ConnError::new(PROTOCOL_ERROR, "PING on a stream"));
    }
    if f.payload.len() != 8 {
        return Err(ConnError::new(FRAME_SIZE_ERROR, "PING not 8 bytes"));
    }
    Ok(())
}

pub fn window_increment(f: &Frame) -> Result<i64, ConnError> {
    if f.payload.len() != 4 {
        return Err(ConnError::new(
            FRAME_SIZE_ERROR,
            "WINDOW_UPDATE not 4 bytes",
        ));
    }
    let raw = u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
    Ok(i64::from(raw & 0x7fff_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_whole_and_padding_is_stripped() {
        let mut buf = BytesMut::new();
        head(&mut buf, 6, DATA, PADDED | END_STREAM, 3);
        buf.extend_from_slice(&[2, b'h', b'i', b'!', 0, 0]);
        let mut partial = BytesMut::from(&buf[..10]);
        assert!(next_frame(&mut partial).expect("valid").is_none());
        let frame = next_frame(&mut buf).expect("valid").expect("whole");
        assert_eq!((frame.kind, frame.stream, frame.flow_len), (DATA, 3, 6));
        assert_eq!(&frame.payload[..], b"hi!");
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frames_and_bad_padding_are_connection_errors() {
        let mut buf = BytesMut::new();
        head(&mut buf, DEFAULT_MAX_FRAME + 1, DATA, 0, 1);
        assert_eq!(
            next_frame(&mut buf).err().map(|e| e.code),
            Some(FRAME_SIZE_ERROR)
        );
        let mut buf = BytesMut::new();
        head(&mut buf, 2, DATA, PADDED, 1);
        buf.extend_from_slice(&[5, 0]);
        assert_eq!(
            next_frame(&mut buf).err().map(|e| e.code),
            Some(PROTOCOL_ERROR)
        );
    }

    #[test]
    fn a_large_header_block_is_split_into_continuations() {
        let block = vec![7u8; DEFAULT_MAX_FRAME * 2 + 10];
        let mut out = BytesMut::new();
        headers(&mut out, 5, &block, true);
        let first = next_frame(&mut out).expect("valid").expect("whole");
        assert_eq!((first.kind, first.flags), (HEADERS, END_STREAM));
        let second = next_frame(&mut out).expect("valid").expect("whole");
        assert_eq!((second.kind, second.flags), (CONTINUATION, 0));
        let third = next_frame(&mut out).expect("valid").expect("whole");
        assert_eq!(
            (third.kind, third.flags, third.payload.len()),
            (CONTINUATION, END_HEADERS, 10)
        );
    }

    #[test]
    fn settings_are_range_checked() {
        let mut s = PeerSettings::default();
        let mut payload = Vec::new();
        payload.extend_from_slice(&SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes());
        payload.extend_from_slice(&(1u32 << 31).to_be_bytes());
        assert_eq!(
            apply_settings(&mut s, &payload).map_err(|e| e.code),
            Err(FLOW_CONTROL_ERROR)
        );
        let mut payload = Vec::new();
        payload.extend_from_slice(&SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes());
        payload.extend_from_slice(&10u32.to_be_bytes());
        apply_settings(&mut s, &payload).expect("valid");
        assert_eq!(s.max_concurrent_streams, 10);
    }

    #[test]
    fn hpack_integers_use_the_prefix_then_continuation_bytes() {
        let mut out = Vec::new();
        hpack_integer(&mut out, 0x20, 5, 10);
        assert_eq!(out, [0x2a]);
        out.clear();
        hpack_integer(&mut out, 0x20, 5, 1337);
        assert_eq!(out, [0x3f, 0x9a, 0x0a]);
    }
}
