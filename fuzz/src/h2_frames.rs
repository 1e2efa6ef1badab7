//! The HTTP/2 fast path's framing and HPACK (`proxy::http::h2_fast_path::inspect`) on
//! arbitrary bytes, read as a frame sequence and as a header block. Beyond "never panics":
//! - frames are read whole and in order: each one's flow length fits the limit, the bytes
//!   consumed are exactly the frames' headers and payloads, and what is left over is an
//!   incomplete frame (after an error, which ends the connection, at most that);
//! - a header block decodes within its limit or is reported over it, and whatever fields it
//!   decodes to come back unchanged through the forwarder's encoder and a fresh decoder
//!   (what the forwarder re-encodes for the other peer means the same);
//! - a request head accepted from decoded fields carries none of the fields HTTP/2 forbids
//!   (connection-specific ones, `te` other than `trailers`) and no pseudo-header as a field.

use mesh_agent::proxy::http::h2_fast_path::inspect;

const LIMIT: usize = 16 * 1024;

/// Runs one input; see the module documentation.
pub fn check(data: &[u8]) {
    check_frames(data);
    check_block(data);
}

fn check_frames(data: &[u8]) {
    let (frames, left, error) = inspect::frames(data);
    let consumed: usize = frames.iter().map(|f| 9 + f.4).sum();
    match error {
        None => assert_eq!(consumed + left, data.len()),
        // The frame that failed was taken off the buffer: the connection ends there.
        Some(_) => assert!(consumed + left <= data.len()),
    }
    for (kind, _flags, stream, payload, flow_len) in &frames {
        assert!(*flow_len <= inspect::DEFAULT_MAX_FRAME);
        assert!(payload.len() <= *flow_len, "{kind} on {stream}");
        assert!(*stream <= 0x7fff_ffff);
    }
    if error.is_none() && left >= 9 {
        let len = (usize::from(data[consumed]) << 16)
            | (usize::from(data[consumed + 1]) << 8)
            | usize::from(data[consumed + 2]);
        assert!(left < 9 + len, "a whole frame was left unread");
    }
}

fn check_block(data: &[u8]) {
    let Ok(Some(fields)) = inspect::decode(data, LIMIT) else {
        return;
    };
    let size: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
    assert!(size <= LIMIT);
    let again = inspect::decode(&inspect::encode(&fields), LIMIT);
    assert_eq!(
        again,
        Ok(Some(fields.clone())),
        "re-encoding changed the fields"
    );
    if let Ok((method, _uri, headers)) = inspect::request(fields) {
        assert!(!method.is_empty());
        for (name, value) in &headers {
            assert!(
                !name.starts_with(':'),
                "pseudo-header {name} kept as a field"
            );
            assert!(
                !matches!(
                    name.as_str(),
                    "connection"
                        | "keep-alive"
                        | "proxy-connection"
                        | "transfer-encoding"
                        | "upgrade"
                ),
                "{name} accepted"
            );
            if name == "te" {
                assert!(value.eq_ignore_ascii_case(b"trailers"));
            }
        }
    }
}
