//! HPACK (RFC 7541) for the forwarder: one decoder per direction a connection reads, one
//! encoder per direction it writes, as the protocol requires (the tables are per
//! connection and per direction, so every header block is decoded, even one that is then
//! refused, to keep them in step with the peer's).
use std::collections::{HashMap, VecDeque};

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

/// Encodes header blocks for one peer (RFC 7541 §6): a field found whole in the static or
/// the dynamic table is one index; others are literals, added to the dynamic table unless
/// their values are new on every request (request ids, trace context: they would only
/// push out entries worth keeping) or sensitive (credentials: never indexed, here or by
/// any later hop). Strings go without Huffman coding, as hyper's encoder sends them.
pub struct Encoder {
    /// Newest first.
    table: VecDeque<Field>,
    size: usize,
    max_size: usize,
    /// Entries ever inserted: entry `n` (0-based) is at position `inserted - 1 - n`.
    inserted: u64,
    /// Hash of (name, value) and of name -> the newest entry with it (checked on use).
    exact: HashMap<u64, u64>,
    names: HashMap<u64, u64>,
    /// Table sizes the peer set since the last block, to announce at the start of the
    /// next: the smallest, then the last (RFC 7541 §4.2).
    size_update: Option<(usize, usize)>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: TABLE_SIZE as usize,
            inserted: 0,
            exact: HashMap::new(),
            names: HashMap::new(),
            size_update: None,
        }
    }
}

/// How a literal field is written (RFC 7541 §6.2): its first byte and prefix bits.
#[derive(Clone, Copy)]
enum Literal {
    Indexed,
    NotIndexed,
    NeverIndexed,
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE: the table shrinks when it is below 4096
    /// (the encoder never uses more than 4096, which needs no announcement).
    pub fn peer_table_size(&mut self, size: u32) {
        let size = size.min(TABLE_SIZE) as usize;
        self.max_size = size;
        self.evict(size);
        let smallest = self.size_update.map_or(size, |(min, _)| min.min(size));
        self.size_update = Some((smallest, size));
    }

    /// Starts a header block in `out`.
    pub fn begin(&mut self, out: &mut Vec<u8>) {
        out.clear();
        if let Some((smallest, last)) = self.size_update.take() {
            if smallest < last {
                hpack_integer(out, 0x20, 5, smallest);
            }
            hpack_integer(out, 0x20, 5, last);
        }
    }

    pub fn field(&mut self, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let (static_name, static_exact) = static_index(name, value);
        if let Some(index) = static_exact {
            hpack_integer(out, 0x80, 7, index);
            return;
        }
        let hash = fnv(fnv(FNV_OFFSET, name), value) ^ (name.len() as u64).rotate_left(32);
        if let Some(position) = self.find(&self.exact, hash, |(n, v)| n == name && v == value) {
            hpack_integer(out, 0x80, 7, 62 + position);
            return;
        }
        let literal = match name {
            b"authorization" | b"proxy-authorization" | b"cookie" | b"set-cookie" => {
                Literal::NeverIndexed
            }
            b"x-request-id" | b"traceparent" | b"tracestate" | b"content-length" | b"date" => {
                Literal::NotIndexed
            }
            _ => Literal::Indexed,
        };
        let name_hash = fnv(FNV_OFFSET, name);
        let name_index = static_name.or_else(|| {
            self.find(&self.names, name_hash, |(n, _)| n == name)
                .map(|p| 62 + p)
        });
        let (first, prefix) = match literal {
            Literal::Indexed => (0x40, 6),
            Literal::NotIndexed => (0x00, 4),
            Literal::NeverIndexed => (0x10, 4),
        };
        match name_index {
            Some(index) => hpack_integer(out, first, prefix, index),
            None => {
                out.push(first);
                literal_string(out, name);
            }
        }
        literal_string(out, value);
        if matches!(literal, Literal::Indexed) {
            self.insert(name, value, hash, name_hash);
        }
    }

    /// The position of the entry `map` names for `hash`, if it is still there and is what
    /// `matches` wants.
    fn find(
        &self,
        map: &HashMap<u64, u64>,
        hash: u64,
        matches: impl Fn(&Field) -> bool,
    ) -> Option<usize> {
        let n = *map.get(&hash)?;
        let position = usize::try_from(self.inserted - 1 - n).ok()?;
        self.table.get(position).filter(|e| matches(e))?;
        Some(position)
    }

    fn insert(&mut self, name: &[u8], value: &[u8], hash: u64, name_hash: u64) {
        let entry = name.len() + value.len() + 32;
        if entry > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4), as the peer's
            // decoder does.
            self.evict(0);
            return;
        }
        self.evict(self.max_size - entry);
        self.table.push_front((name.to_vec(), value.to_vec()));
        self.size += entry;
        self.exact.insert(hash, self.inserted);
        self.names.insert(name_hash, self.inserted);
        self.inserted += 1;
    }

    /// Drops the oldest entries until the table takes at most `room` bytes; the lookup
    /// maps forget them.
    fn evict(&mut self, room: usize) {
        while self.size > room {
            let Some((n, v)) = self.table.pop_back() else {
                self.size = 0;
                break;
            };
            self.size -= n.len() + v.len() + 32;
            let gone = self.inserted - 1 - self.table.len() as u64;
            self.exact.retain(|_, e| *e != gone);
            self.names.retain(|_, e| *e != gone);
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, continuing from `hash`.
fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A string literal without Huffman coding.
fn literal_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// The static table's index for `name` (its first entry), and for `name: value` when the
/// table has that exact field.
fn static_index(name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
    let exact = match (name, value) {
        (b":method", b"GET") => Some(2),
        (b":method", b"POST") => Some(3),
        (b":path", b"/") => Some(4),
        (b":path", b"/index.html") => Some(5),
        (b":scheme", b"http") => Some(6),
        (b":scheme", b"https") => Some(7),
        (b":status", b"200") => Some(8),
        (b":status", b"204") => Some(9),
        (b":status", b"206") => Some(10),
        (b":status", b"304") => Some(11),
        (b":status", b"400") => Some(12),
        (b":status", b"404") => Some(13),
        (b":status", b"500") => Some(14),
        (b"accept-encoding", b"gzip, deflate") => Some(16),
        _ => None,
    };
    if exact.is_some() {
        return (exact, exact);
    }
    let name_index = match name {
        b":authority" => Some(1),
        b":method" => Some(2),
        b":path" => Some(4),
        b":scheme" => Some(6),
        b":status" => Some(8),
        b"accept-charset" => Some(15),
        b"accept-encoding" => Some(16),
        b"accept-language" => Some(17),
        b"accept-ranges" => Some(18),
        b"accept" => Some(19),
        b"access-control-allow-origin" => Some(20),
        b"age" => Some(21),
        b"allow" => Some(22),
        b"authorization" => Some(23),
        b"cache-control" => Some(24),
        b"content-disposition" => Some(25),
        b"content-encoding" => Some(26),
        b"content-language" => Some(27),
        b"content-length" => Some(28),
        b"content-location" => Some(29),
        b"content-range" => Some(30),
        b"content-type" => Some(31),
        b"cookie" => Some(32),
        b"date" => Some(33),
        b"etag" => Some(34),
        b"expect" => Some(35),
        b"expires" => Some(36),
        b"from" => Some(37),
        b"host" => Some(38),
        b"if-match" => Some(39),
        b"if-modified-since" => Some(40),
        b"if-none-match" => Some(41),
        b"if-range" => Some(42),
        b"if-unmodified-since" => Some(43),
        b"last-modified" => Some(44),
        b"link" => Some(45),
        b"location" => Some(46),
        b"max-forwards" => Some(47),
        b"proxy-authenticate" => Some(48),
        b"proxy-authorization" => Some(49),
        b"range" => Some(50),
        b"referer" => Some(51),
        b"refresh" => Some(52),
        b"retry-after" => Some(53),
        b"server" => Some(54),
        b"set-cookie" => Some(55),
        b"strict-transport-security" => Some(56),
        b"transfer-encoding" => Some(57),
        b"user-agent" => Some(58),
        b"vary" => Some(59),
        b"via" => Some(60),
        b"www-authenticate" => Some(61),
        _ => None,
    };
    (name_index, None)
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
    fn the_tables_stay_in_step_through_evictions_and_a_smaller_table() {
        let (mut enc, mut dec) = (Encoder::default(), Decoder::default());
        let mut rng = fastrand::Rng::with_seed(7);
        let names: [&[u8]; 8] = [
            b":path",
            b":authority",
            b"x-custom",
            b"user-agent",
            b"x-request-id",
            b"cookie",
            b"content-type",
            b"x-long",
        ];
        for round in 0..400 {
            if round == 200 {
                enc.peer_table_size(512);
            }
            let fields: Vec<Field> = (0..rng.usize(1..12))
                .map(|_| {
                    let name = names[rng.usize(..names.len())].to_vec();
                    let len = if name == b"x-long" {
                        rng.usize(100..900)
                    } else {
                        rng.usize(0..40)
                    };
                    let value = (0..len).map(|_| rng.alphanumeric() as u8).collect();
                    (name, value)
                })
                .collect();
            let pairs: Vec<(&[u8], &[u8])> = fields
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .collect();
            assert_eq!(
                round_trip(&mut enc, &mut dec, &pairs),
                fields,
                "round {round}"
            );
        }
        // A peer that shrinks the table to 0 and grows it again before the next block
        // hears both: the smallest size, then the last (RFC 7541 §4.2).
        enc.peer_table_size(0);
        enc.peer_table_size(4096);
        let mut block = Vec::new();
        enc.begin(&mut block);
        assert_eq!(block, [0x20, 0x3f, 0xe1, 0x1f]);
        enc.field(b"x-after", b"resize", &mut block);
        let Ok(Decoded::Fields(after)) = dec.decode(&block, 65_536) else {
            panic!("the resized block does not decode");
        };
        assert_eq!(after, vec![(b"x-after".to_vec(), b"resize".to_vec())]);
        // A field seen before is one byte; a credential is never indexed (0x10).
        let mut block = Vec::new();
        enc.begin(&mut block);
        enc.field(b"x-again", b"value", &mut block);
        enc.begin(&mut block);
        enc.field(b"x-again", b"value", &mut block);
        assert_eq!(block.len(), 1);
        enc.begin(&mut block);
        enc.field(b"authorization", b"secret", &mut block);
        assert_eq!(block[0] & 0xf0, 0x10);
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
