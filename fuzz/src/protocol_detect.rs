//! Protocol sniffing (`detect::classify`) on arbitrary first bytes. Beyond "never panics":
//! - the answer for the bytes `sniff` peeks (at most 24) is final once given: more bytes never
//!   change it (the agent acts on the first answer);
//! - 24 bytes always decide, so `sniff` never waits for bytes it cannot peek;
//! - HTTP/2 only for the exact preface, HTTP/1 only after a method and a space.

use mesh_agent::{proxy::http::detect::classify, service::AppProtocol};

/// What `sniff` peeks at most.
const PEEK: usize = 24;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Runs one input; see the module documentation.
pub fn check(data: &[u8]) {
    let full = classify(data);
    let mut decided: Option<AppProtocol> = None;
    for end in 0..=data.len().min(PEEK + 8) {
        let answer = classify(&data[..end]);
        if let Some(first) = decided {
            assert_eq!(
                answer,
                Some(first),
                "answer changed at {end} bytes: {data:?}"
            );
        } else {
            decided = answer;
        }
        if end >= PEEK {
            assert!(answer.is_some(), "{end} bytes left undecided: {data:?}");
        }
    }
    if let Some(first) = decided {
        assert_eq!(
            full,
            Some(first),
            "longer input changed the answer: {data:?}"
        );
    }
    match full {
        Some(AppProtocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(AppProtocol::Http) => {
            let space = data.iter().position(|&b| b == b' ');
            assert!(
                space.is_some_and(|s| s > 0 && data[..s].iter().all(u8::is_ascii_uppercase)),
                "HTTP/1 without a method: {data:?}"
            );
        }
        Some(AppProtocol::Tcp) => {}
        Some(other) => panic!("classify answered {other:?}"),
        None => assert!(data.len() < PEEK),
    }
}
