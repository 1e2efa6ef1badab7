//! Protocol detection for service ports that do not declare one: peek (without consuming)
//! at the client's first bytes for an HTTP/1 request line or the HTTP/2 connection preface.
//! Anything else, including TLS from the app, stays L4. The wait is short and bounded so
//! server-first protocols are only delayed by [`SNIFF_TIMEOUT`].
use std::time::Duration;

use tokio::net::TcpStream;

use crate::service::AppProtocol;

/// How long to wait for the client's first bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// What the first bytes on `client` look like.
pub async fn sniff(client: &TcpStream) -> AppProtocol {
    let mut buf = [0u8; 24];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    loop {
        let Ok(ready) = tokio::time::timeout_at(deadline, client.readable()).await else {
            return AppProtocol::Tcp;
        };
        if ready.is_err() {
            return AppProtocol::Tcp;
        }
        let n = match client.peek(&mut buf).await {
            Ok(n) => n,
            Err(_) => return AppProtocol::Tcp,
        };
        match classify(&buf[..n]) {
            Some(p) => return p,
            None if n == 0 => return AppProtocol::Tcp,
            // Not enough bytes to tell yet: wait for more, within the deadline.
            None => {
                if tokio::time::Instant::now() >= deadline {
                    return AppProtocol::Tcp;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// `Some` once the prefix decides; `None` while it could still become either.
pub fn classify(prefix: &[u8]) -> Option<AppProtocol> {
    if prefix.is_empty() {
        return None;
    }
    if H2_PREFACE.starts_with(prefix) {
        return if prefix.len() >= H2_PREFACE.len() {
            Some(AppProtocol::Http2)
        } else {
            None
        };
    }
    if prefix.starts_with(H2_PREFACE) {
        return Some(AppProtocol::Http2);
    }
    let mut could_be_http1 = false;
    for method in METHODS {
        if prefix.starts_with(method) {
            return Some(AppProtocol::Http);
        }
        if method.starts_with(prefix) {
            could_be_http1 = true;
        }
    }
    if could_be_http1 {
        None
    } else {
        Some(AppProtocol::Tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_and_h2_and_leaves_the_rest_l4() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(AppProtocol::Http));
        assert_eq!(classify(b"POST /x"), Some(AppProtocol::Http));
        assert_eq!(classify(H2_PREFACE), Some(AppProtocol::Http2));
        // TLS ClientHello, SSH, binary.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(AppProtocol::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(AppProtocol::Tcp));
        assert_eq!(classify(b"GETX"), Some(AppProtocol::Tcp));
    }

    #[test]
    fn waits_while_the_prefix_is_ambiguous() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HT"), None);
    }
}
