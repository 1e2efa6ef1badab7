//! The HTTP/1.1 fast path's parsers (`proxy::http::fast_path::inspect`) on arbitrary bytes,
//! read as a request head, as a response head and as a chunked body. Beyond "never panics":
//! - a head is decided only once complete: every shorter prefix reads as incomplete, and the
//!   head alone gets the same answer as the head with whatever follows it (the fast path
//!   acts on the first complete head it sees);
//! - a request the fast path forwards is origin-form, not `CONNECT`, has exactly one `Host`,
//!   no `Transfer-Encoding`, `Upgrade` or `Expect`, and at most one `Content-Length`, whose
//!   value is the body length it forwards (the request smuggling shapes go to hyper);
//! - where a chunked body ends does not depend on how its bytes are split into reads, and
//!   agrees with a plain reading of RFC 9112 §7.1 (strict CRLF, sizes below 2^60): a
//!   disagreement would let an upstream desynchronise the client's connection.

use mesh_agent::proxy::http::fast_path::inspect::{self, ChunkedEnd, MAX_CHUNK_LINE};

/// Longest input whose every prefix is parsed again (quadratic).
const PREFIX_CHECK_LIMIT: usize = 4096;

/// Runs one input; see the module documentation.
pub fn check(data: &[u8]) {
    check_request(data);
    check_response(data);
    check_chunked(data);
}

fn check_request(data: &[u8]) {
    let verdict = inspect::request(data);
    let inspect::Request::Forward {
        head_len,
        body_len,
        close,
        ref method,
        ref target,
        ref fields,
    } = verdict
    else {
        return;
    };
    assert!(head_len <= data.len());
    assert!(target.starts_with('/'), "target {target:?}");
    assert_ne!(method, "CONNECT");
    let named = |name: &'static str| fields.iter().filter(move |(n, _)| n == name);
    assert_eq!(named("host").count(), 1, "{fields:?}");
    for banned in ["transfer-encoding", "upgrade", "expect"] {
        assert_eq!(named(banned).count(), 0, "{banned} forwarded: {fields:?}");
    }
    let lengths: Vec<_> = named("content-length").collect();
    match lengths.as_slice() {
        [] => assert_eq!(body_len, 0),
        // Decimal digits only (leading zeros allowed, as in RFC 9110's `1*DIGIT`).
        [(_, value)] => assert_eq!(
            std::str::from_utf8(value)
                .ok()
                .map(str::trim)
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok()),
            Some(body_len),
            "{fields:?}"
        ),
        more => panic!("{} content-lengths forwarded", more.len()),
    }
    let asks_close = named("connection").any(|(_, v)| {
        v.split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    });
    assert_eq!(close, asks_close);
    assert_eq!(inspect::request(&data[..head_len]), verdict);
    if data.len() <= PREFIX_CHECK_LIMIT {
        for end in 0..head_len {
            assert_eq!(
                inspect::request(&data[..end]),
                inspect::Request::Partial,
                "decided at {end} of {head_len} bytes"
            );
        }
    }
}

fn check_response(data: &[u8]) {
    let Ok(Some((head_len, status, framing, close))) = inspect::response(data) else {
        return;
    };
    assert!(head_len <= data.len());
    assert!((100..=999).contains(&status));
    assert_eq!(
        inspect::response(&data[..head_len]),
        Ok(Some((head_len, status, framing, close)))
    );
    if data.len() <= PREFIX_CHECK_LIMIT {
        for end in 0..head_len {
            assert_eq!(
                inspect::response(&data[..end]),
                Ok(None),
                "decided at {end} of {head_len} bytes"
            );
        }
    }
}

/// Where the chunked body in `data` ends when fed in pieces of the given sizes (cycled).
fn end_in_pieces(data: &[u8], sizes: impl Iterator<Item = usize>) -> Result<Option<usize>, ()> {
    let mut chunks = ChunkedEnd::default();
    let mut at = 0;
    for size in sizes {
        if at >= data.len() {
            return Ok(None);
        }
        let piece = &data[at..(at + size.max(1)).min(data.len())];
        match chunks.feed(piece) {
            Ok(Some(end)) => return Ok(Some(at + end)),
            Ok(None) => at += piece.len(),
            Err(_) => return Err(()),
        }
    }
    Ok(None)
}

fn check_chunked(data: &[u8]) {
    let whole = end_in_pieces(data, std::iter::once(data.len()));
    let bytewise = end_in_pieces(data, std::iter::repeat(1));
    // Piece sizes taken from the input itself, 1 to 8 bytes.
    let varied = end_in_pieces(
        data,
        data.iter()
            .map(|b| usize::from(b % 8) + 1)
            .chain(std::iter::repeat(1)),
    );
    assert_eq!(whole, bytewise, "split into bytes");
    assert_eq!(whole, varied, "split into varied pieces");
    // Below the line and trailer limits, a plain reading must agree.
    if data.len() <= MAX_CHUNK_LINE {
        assert_eq!(whole, reference_end(data), "against the plain reading");
    }
}

/// RFC 9112 §7.1 read plainly: `Ok(None)` when the body has not ended within `data`.
fn reference_end(data: &[u8]) -> Result<Option<usize>, ()> {
    let mut i = 0;
    // Expects `byte` at `i`: Ok(false) when the data ran out first.
    let expect = |i: usize, byte: u8| -> Result<bool, ()> {
        match data.get(i) {
            None => Ok(false),
            Some(b) if *b == byte => Ok(true),
            Some(_) => Err(()),
        }
    };
    loop {
        let mut size: u64 = 0;
        let mut digits = 0;
        while let Some(d) = data.get(i).and_then(|b| (*b as char).to_digit(16)) {
            if size >> 56 != 0 {
                return Err(());
            }
            size = size << 4 | u64::from(d);
            digits += 1;
            i += 1;
        }
        match data.get(i) {
            None => return Ok(None),
            Some(_) if digits == 0 => return Err(()),
            Some(b';') => {
                while let Some(b) = data.get(i) {
                    match b {
                        b'\r' => break,
                        b'\n' => return Err(()),
                        _ => i += 1,
                    }
                }
            }
            Some(b'\r') => {}
            Some(_) => return Err(()),
        }
        for byte in [b'\r', b'\n'] {
            if !expect(i, byte)? {
                return Ok(None);
            }
            i += 1;
        }
        if size == 0 {
            // Trailer lines, then the empty line.
            loop {
                match data.get(i) {
                    None => return Ok(None),
                    Some(b'\r') => {
                        return if expect(i + 1, b'\n')? {
                            Ok(Some(i + 2))
                        } else {
                            Ok(None)
                        };
                    }
                    Some(b'\n') => return Err(()),
                    Some(_) => {}
                }
                while let Some(b) = data.get(i) {
                    match b {
                        b'\r' => break,
                        b'\n' => return Err(()),
                        _ => i += 1,
                    }
                }
                for byte in [b'\r', b'\n'] {
                    if !expect(i, byte)? {
                        return Ok(None);
                    }
                    i += 1;
                }
            }
        }
        let Some(after) = usize::try_from(size).ok().and_then(|s| i.checked_add(s)) else {
            return Ok(None);
        };
        if after > data.len() {
            return Ok(None);
        }
        i = after;
        for byte in [b'\r', b'\n'] {
            if !expect(i, byte)? {
                return Ok(None);
            }
            i += 1;
        }
    }
}
