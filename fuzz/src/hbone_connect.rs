//! The HBONE CONNECT request -> target check (`inbound_hbone::connect_target`), on requests
//! built from text:
//!
//! ```text
//! CONNECT 10.1.0.2:8080
//! baggage: k=v
//! 400*x-pad: 0123456789
//! ```
//!
//! The first line is the method and the request target (what hyper hands over as the method
//! and URI of an HTTP/2 stream), the rest are header fields; `N*` before a name repeats the
//! field N times (up to 5000), so that inputs can cross the 16 KiB header block limit. Lines
//! the `http` crate refuses are skipped. Beyond "never panics", a target is only ever returned
//! for a CONNECT whose authority is exactly that `ip:port`, within the size limit, and each
//! refusal is the documented one.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use mesh_agent::proxy::inbound_hbone::{ConnectError, MAX_HEADER_BLOCK, connect_target};

/// Runs one input; see the module documentation.
pub fn check(data: &[u8]) {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(first) = lines.next() else { return };
    let (method, target) = match first.iter().position(|&b| b == b' ') {
        Some(space) => (&first[..space], &first[space + 1..]),
        None => (first, &b""[..]),
    };
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (mut name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        let mut repeat = 1;
        if let Some(star) = name.iter().position(|&b| b == b'*')
            && let Some(n) = std::str::from_utf8(&name[..star])
                .ok()
                .and_then(|n| n.parse::<usize>().ok())
        {
            repeat = n.min(5000);
            name = &name[star + 1..];
        }
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        for _ in 0..repeat {
            headers.append(name.clone(), value.clone());
        }
    }

    let block: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    let result = connect_target(&method, &uri, &headers);
    assert_eq!(
        result,
        connect_target(&method, &uri, &headers),
        "not deterministic"
    );
    match result {
        Ok(addr) => {
            assert_eq!(method, Method::CONNECT);
            assert!(block <= MAX_HEADER_BLOCK);
            let authority = uri.authority().expect("a target without an authority");
            assert_eq!(authority.as_str().parse::<SocketAddr>().ok(), Some(addr));
            // What is dialled is what was asked for, printed and read back the same.
            assert_eq!(addr.to_string().parse::<SocketAddr>().ok(), Some(addr));
            assert_eq!(authority.port_u16(), Some(addr.port()));
        }
        Err(ConnectError::HeaderBlockTooLarge) => assert!(block > MAX_HEADER_BLOCK),
        Err(ConnectError::NotConnect) => {
            assert!(block <= MAX_HEADER_BLOCK);
            assert_ne!(method, Method::CONNECT);
        }
        Err(ConnectError::BadAuthority) => {
            assert!(block <= MAX_HEADER_BLOCK);
            assert_eq!(method, Method::CONNECT);
            assert!(
                uri.authority()
                    .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
                    .is_none()
            );
        }
    }
}
