//! Request ids and W3C trace context: every request the agent proxies carries an
//! `x-request-id` and a valid `traceparent`; ones the client sent are passed through.
use http::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID: &str = "x-request-id";
pub const TRACEPARENT: &str = "traceparent";

// Parsed once: a `&str` name is parsed and hashed again on every lookup.
const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static(REQUEST_ID);
const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static(TRACEPARENT);
const TRACESTATE_HEADER: HeaderName = HeaderName::from_static("tracestate");

/// Makes sure `headers` carry a request id and trace context; returns the request id.
///
/// Values the agent creates are marked sensitive. Unique to one request, they are useless
/// in an HTTP/2 HPACK table, and inserting each one there would evict the shared headers
/// that are worth indexing (HPACK then sends them "never indexed"; HTTP/1 ignores the mark).
pub fn ensure(headers: &mut HeaderMap, rng: &mut fastrand::Rng) -> String {
    let id = match headers
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(id) if !id.is_empty() && id.len() <= 128 => id.to_string(),
        _ => {
            let id = uuid_v4(rng);
            if let Ok(mut v) = HeaderValue::from_str(&id) {
                v.set_sensitive(true);
                headers.insert(REQUEST_ID_HEADER, v);
            }
            id
        }
    };
    let valid = headers
        .get(&TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_valid_traceparent);
    if !valid {
        // A missing or malformed traceparent starts a new, sampled trace (W3C: a vendor
        // that cannot parse it must restart the trace); tracestate then belongs to no one.
        headers.remove(&TRACESTATE_HEADER);
        // 00-<32 hex trace id>-<16 hex parent id>-01
        let mut value = [0u8; 55];
        value[..3].copy_from_slice(b"00-");
        hex_into(&nonzero_u128(rng).to_be_bytes(), &mut value[3..35]);
        value[35] = b'-';
        hex_into(&nonzero_u64(rng).to_be_bytes(), &mut value[36..52]);
        value[52..].copy_from_slice(b"-01");
        if let Ok(mut v) = HeaderValue::from_bytes(&value) {
            v.set_sensitive(true);
            headers.insert(TRACEPARENT_HEADER, v);
        }
    }
    id
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

fn nonzero_u128(rng: &mut fastrand::Rng) -> u128 {
    loop {
        let v = rng.u128(..);
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u64(rng: &mut fastrand::Rng) -> u64 {
    loop {
        let v = rng.u64(..);
        if v != 0 {
            return v;
        }
    }
}

/// A random (version 4) UUID, `8-4-4-4-12` lower-case hex.
fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let mut b = rng.u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut text = [b'-'; 36];
    hex_into(&b[0..4], &mut text[0..8]);
    hex_into(&b[4..6], &mut text[9..13]);
    hex_into(&b[6..8], &mut text[14..18]);
    hex_into(&b[8..10], &mut text[19..23]);
    hex_into(&b[10..16], &mut text[24..36]);
    text.iter().map(|&c| char::from(c)).collect()
}

/// `version-traceid-parentid-flags`, lower-case hex, ids not all zero, version not ff.
pub fn is_valid_traceparent(v: &str) -> bool {
    let mut split = v.split('-');
    let mut parts = [""; 4];
    for part in &mut parts {
        match split.next() {
            Some(p) => *part = p,
            None => return false,
        }
    }
    let more = split.next().is_some();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    let [version, trace, parent, flags] = parts;
    hex(version, 2)
        && version != "ff"
        && (version != "00" || !more)
        && hex(trace, 32)
        && trace.bytes().any(|c| c != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|c| c != b'0')
        && hex(flags, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_ids_when_missing_and_keeps_valid_ones() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut h = HeaderMap::new();
        let id = ensure(&mut h, &mut rng);
        assert_eq!(id.len(), 36);
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4", "version nibble");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        assert!(
            id.bytes()
                .all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        // Generated values stay out of HPACK tables.
        assert!(h.get(REQUEST_ID).is_some_and(HeaderValue::is_sensitive));
        assert!(h.get(TRACEPARENT).is_some_and(HeaderValue::is_sensitive));
        let tp = h
            .get(TRACEPARENT)
            .expect("traceparent")
            .to_str()
            .expect("ascii")
            .to_string();
        assert!(is_valid_traceparent(&tp), "{tp}");

        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc"));
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(given));
        h.insert("tracestate", HeaderValue::from_static("k=v"));
        assert_eq!(ensure(&mut h, &mut rng), "abc");
        assert_eq!(h.get(TRACEPARENT).expect("kept"), given);
        assert_eq!(h.get("tracestate").expect("kept"), "k=v");
    }

    #[test]
    fn malformed_traceparent_is_replaced() {
        let mut rng = fastrand::Rng::with_seed(1);
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            h.insert("tracestate", HeaderValue::from_static("k=v"));
            ensure(&mut h, &mut rng);
            let now = h.get(TRACEPARENT).expect("set").to_str().expect("ascii");
            assert_ne!(now, bad);
            assert!(is_valid_traceparent(now));
            assert!(h.get("tracestate").is_none());
        }
    }
}
