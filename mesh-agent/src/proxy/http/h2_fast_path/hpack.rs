//! HPACK (RFC 7541) for the forwarder: one decoder per direction a connection reads, one
//! encoder per direction it writes, as the protocol requires (the tables are per
//! connection and per direction, so every header block is decoded, even one that is then
//! refused, to keep them in step with the peer's).
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

pub struct Decoder {
    inner: httlib_hpack::Decoder<'static>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            inner: httlib_hpack::Decoder::with_dynamic_size(TABLE_SIZE),
        }
    }
}

impl Decoder {
    /// Decodes a whole header block. Fields past `limit` bytes (RFC 9113's size: name,
    /// value and 32 per field) are decoded but not kept; a block that expands to more than
    /// four times the limit (a decompression bomb of repeated table references) is a
    /// connection error.
    pub fn decode(&mut self, block: &[u8], limit: usize) -> Result<Decoded, ConnError> {
        let mut buf = block.to_vec();
        let mut fields = Vec::with_capacity(16);
        let mut size = 0usize;
        let mut one = Vec::with_capacity(1);
        while !buf.is_empty() {
            one.clear();
            self.inner
                .decode_exact(&mut buf, &mut one)
                .map_err(|_| ConnError::new(COMPRESSION_ERROR, "undecodable header block"))?;
            for (name, value, _flags) in one.drain(..) {
                size += name.len() + value.len() + 32;
                if size > limit.saturating_mul(4) {
                    return Err(ConnError::new(
                        ENHANCE_YOUR_CALM,
                        "header block expands past four times the header list limit",
                    ));
                }
                if size <= limit {
                    fields.push((name, value));
                }
            }
        }
        Ok(if size > limit {
            Decoded::TooLarge
        } else {
            Decoded::Fields(fields)
        })
    }
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
