//! HPACK (RFC 7541) for the forwarder: one decoder per direction a connection reads, one
//! encoder per direction it writes, as the protocol requires (the tables are per
//! connection and per direction, so every header block is decoded, even one that is then
//! refused, to keep them in step with the peer's).
use std::collections::VecDeque;

use super::frame::{COMPRESSION_ERROR, ConnError, ENHANCE_YOUR_CALM, hpack_integer};

/// One header field as decoded.
pub type Field = (Vec<u8>, Vec<u8>);

/// The dynamic table size both sides start with, and the most the forwarder uses.
const TABLE_SIZE: u32 = 4096;

/// What a header block decoded to.
pub enum Decoded {
    Fields(Vec<Field>),
    /// The decoded list is over the limit the caller gave: the request gets 431.
    TooLarge,
}

/// The static table (RFC 7541 Appendix A), index 1 first.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Decodes header blocks (RFC 7541 §6) against one peer's dynamic table. Written here
/// rather than taken from a crate: the decoders at hand either panic on truncated input
/// or build their Huffman tables per string; Huffman codes themselves are decoded by
/// `httlib-huffman`.
#[derive(Default)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<Field>,
    /// The table's size by RFC 7541 §4.1 (name, value and 32 per entry).
    size: usize,
    /// The size the peer last set (at most [`TABLE_SIZE`]); 4096 until it sets one.
    max_size: Option<usize>,
}

fn malformed(reason: &'static str) -> ConnError {
    ConnError::new(COMPRESSION_ERROR, reason)
}

impl Decoder {
    /// Decodes a whole header block. Fields past `limit` bytes (RFC 9113's size: name,
    /// value and 32 per field) are decoded but not kept; a block that expands to more than
    /// four times the limit (a decompression bomb of repeated table references) is a
    /// connection error.
    pub fn decode(&mut self, block: &[u8], limit: usize) -> Result<Decoded, ConnError> {
        let mut fields = Vec::with_capacity(16);
        let mut size = 0usize;
        let mut at = 0;
        while at < block.len() {
            let first = block[at];
            let field = if first & 0x80 != 0 {
                let index = integer(block, &mut at, 7)?;
                let (name, value) = self.entry(index)?;
                (name.to_vec(), value.to_vec())
            } else if first & 0xe0 == 0x20 {
                let new_size = integer(block, &mut at, 5)?;
                if new_size > TABLE_SIZE as usize {
                    return Err(malformed(
                        "table size update above SETTINGS_HEADER_TABLE_SIZE",
                    ));
                }
                self.max_size = Some(new_size);
                self.evict(new_size);
                continue;
            } else {
                let indexing = first & 0x40 != 0;
                let prefix = if indexing { 6 } else { 4 };
                let index = integer(block, &mut at, prefix)?;
                let name = if index == 0 {
                    string(block, &mut at)?
                } else {
                    self.entry(index)?.0.to_vec()
                };
                let value = string(block, &mut at)?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                (name, value)
            };
            size += field.0.len() + field.1.len() + 32;
            if size > limit.saturating_mul(4) {
                return Err(ConnError::new(
                    ENHANCE_YOUR_CALM,
                    "header block expands past four times the header list limit",
                ));
            }
            if size <= limit {
                fields.push(field);
            }
        }
        Ok(if size > limit {
            Decoded::TooLarge
        } else {
            Decoded::Fields(fields)
        })
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), ConnError> {
        match index {
            0 => Err(malformed("header table index 0")),
            1..=61 => Ok(STATIC_TABLE[index - 1]),
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or_else(|| malformed("header table index past the table")),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let max = self.max_size.unwrap_or(TABLE_SIZE as usize);
        let entry = name.len() + value.len() + 32;
        if entry > max {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(max - entry);
        self.size += entry;
        self.table.push_front((name, value));
    }

    /// Drops the oldest entries until the table takes at most `room` bytes.
    fn evict(&mut self, room: usize) {
        while self.size > room {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1) at `block[*at]`, at most 2^28.
fn integer(block: &[u8], at: &mut usize, n: u32) -> Result<usize, ConnError> {
    let max = (1usize << n) - 1;
    let first = *block
        .get(*at)
        .ok_or_else(|| malformed("truncated integer"))?;
    *at += 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let byte = *block
            .get(*at)
            .ok_or_else(|| malformed("truncated integer"))?;
        *at += 1;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        if shift > 21 {
            return Err(malformed("integer too large"));
        }
    }
}

/// A string literal (RFC 7541 §5.2) at `block[*at]`, Huffman-decoded if it says so.
fn string(block: &[u8], at: &mut usize) -> Result<Vec<u8>, ConnError> {
    let huffman = block.get(*at).is_some_and(|b| b & 0x80 != 0);
    let len = integer(block, at, 7)?;
    let end = at
        .checked_add(len)
        .filter(|end| *end <= block.len())
        .ok_or_else(|| malformed("string longer than the block"))?;
    let raw = &block[*at..end];
    *at = end;
    if !huffman {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FiveBits)
        .map_err(|_| malformed("bad Huffman code"))?;
    Ok(out)
}

pub struct Encoder {
    inner: loona_hpack::Encoder<'static>,
    /// A smaller table the peer asked for, to be announced at the start of the next block.
    size_update: Option<usize>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            inner: loona_hpack::Encoder::new(),
            size_update: None,
        }
    }
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE: the table shrinks when it is below 4096
    /// (the encoder never uses more than 4096, which needs no announcement).
    pub fn peer_table_size(&mut self, size: u32) {
        let size = size.min(TABLE_SIZE) as usize;
        self.inner.set_max_table_size(size);
        self.size_update = Some(size);
    }

    /// Starts a header block in `out`.
    pub fn begin(&mut self, out: &mut Vec<u8>) {
        out.clear();
        if let Some(size) = self.size_update.take() {
            hpack_integer(out, 0x20, 5, size);
        }
    }

    pub fn field(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        let _ = self.inner.encode_header_into((name, value), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(enc: &mut Encoder, dec: &mut Decoder, fields: &[(&[u8], &[u8])]) -> Vec<Field> {
        let mut block = Vec::new();
        enc.begin(&mut block);
        for (n, v) in fields {
            enc.field(n, v, &mut block);
        }
        match dec.decode(&block, 65_536).expect("decodes") {
            Decoded::Fields(f) => f,
            Decoded::TooLarge => panic!("too large"),
        }
    }

    #[test]
    fn blocks_round_trip_and_the_tables_stay_in_step() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let fields: [(&[u8], &[u8]); 3] = [
            (b":method", b"GET"),
            (b"x-custom", b"one"),
            (b"x-custom", b"two"),
        ];
        for _ in 0..3 {
            let got = round_trip(&mut enc, &mut dec, &fields);
            let want: Vec<Field> = fields
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            assert_eq!(got, want);
        }
        enc.peer_table_size(0);
        let got = round_trip(&mut enc, &mut dec, &fields);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn rfc_7541_huffman_example_decodes() {
        // RFC 7541 C.4.1: the first request, with Huffman coding.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let mut dec = Decoder::default();
        let Ok(Decoded::Fields(fields)) = dec.decode(&block, 65_536) else {
            panic!("does not decode");
        };
        let want: [(&[u8], &[u8]); 4] = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
        ];
        let want: Vec<Field> = want.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        assert_eq!(fields, want);
        // The authority went into the dynamic table: index 62 now names it.
        let Ok(Decoded::Fields(again)) = dec.decode(&[0xbe], 65_536) else {
            panic!("index 62 missing");
        };
        assert_eq!(again, vec![want[3].clone()]);
        // Truncated input is an error, never a panic.
        for end in 0..block.len() {
            let _ = Decoder::default().decode(&block[..end], 65_536);
        }
        assert!(Decoder::default().decode(&[0x41], 65_536).is_err());
    }

    #[test]
    fn a_block_over_the_limit_is_too_large_and_a_bomb_is_refused() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let value = vec![b'a'; 1000];
        let mut block = Vec::new();
        enc.begin(&mut block);
        enc.field(b"x-big", &value, &mut block);
        assert!(matches!(dec.decode(&block, 500), Ok(Decoded::TooLarge)));
        // The entry is now in the table: index 62, repeated, expands 1 byte to ~1 kB.
        let bomb = vec![0x80 | 62; 300];
        assert!(matches!(dec.decode(&bomb, 10_000), Err(e) if e.code == ENHANCE_YOUR_CALM));
    }
}
