//! Request ids and W3C trace context: every request the agent proxies carries an
//! `x-request-id` and a valid `traceparent`; ones the client sent are passed through.
use http::{HeaderMap, HeaderValue};

pub const REQUEST_ID: &str = "x-request-id";
pub const TRACEPARENT: &str = "traceparent";

/// Makes sure `headers` carry a request id and trace context; returns the request id.
pub fn ensure(headers: &mut HeaderMap, rng: &mut fastrand::Rng) -> String {
    let id = match headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() && id.len() <= 128 => id.to_string(),
        _ => {
            let id = uuid_v4(rng);
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID, v);
            }
            id
        }
    };
    let valid = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_valid_traceparent);
    if !valid {
        // A missing or malformed traceparent starts a new, sampled trace (W3C: a vendor
        // that cannot parse it must restart the trace); tracestate then belongs to no one.
        headers.remove("tracestate");
        let value = format!("00-{:032x}-{:016x}-01", nonzero_u128(rng), nonzero_u64(rng));
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(TRACEPARENT, v);
        }
    }
    id
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

fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let mut b = rng.u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        h(0..4),
        h(4..6),
        h(6..8),
        h(8..10),
        h(10..16)
    )
}

/// `version-traceid-parentid-flags`, lower-case hex, ids not all zero, version not ff.
pub fn is_valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    if parts.len() < 4 {
        return false;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    };
    let (version, trace, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
    hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.len() == 4)
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
