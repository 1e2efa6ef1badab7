//! HTTP/1.1 message framing for the fast path: request and response heads parsed (httparse)
//! into what routing and relaying need, heads written again, and the end of a chunked body
//! found while its bytes pass through unchanged.
use std::io;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};

use crate::{
    metrics::HandoverReason,
    proxy::http::{MAX_HEADER_BYTES, strip_hop_by_hop},
    route::RouteRule,
};

/// Most header fields in a request or response head (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// A parsed request head, owned.
pub(super) struct RequestHead {
    pub parts: http::request::Parts,
    pub head_len: usize,
    pub body_len: u64,
    /// The client asked to close after this response.
    pub close: bool,
}

pub(super) enum Parsed {
    Partial,
    Request(Box<RequestHead>),
    /// Hyper's, for this reason.
    NotForUs(HandoverReason),
}

/// A response head as much as the fast path needs of it.
pub(super) struct ResponseHead {
    pub status: StatusCode,
    pub head_len: usize,
    pub framing: Framing,
    /// The upstream closes after it (or speaks HTTP/1.0).
    pub close: bool,
    /// It carries headers that describe one hop (they are not forwarded).
    pub hop_by_hop: bool,
    pub declared_length: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Ends when the upstream closes.
    UntilClose,
}

/// Parses a request head at the start of `buf` into what routing needs, or says why the
/// fast path leaves it to hyper.
pub(super) fn parse_request(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::NotForUs(HandoverReason::HeadSize),
        Err(httparse::Error::Version) => return Parsed::NotForUs(HandoverReason::Version),
        Err(_) => return Parsed::NotForUs(HandoverReason::Malformed),
    };
    // hyper answers 431 to a head this large.
    if head_len > MAX_HEADER_BYTES {
        return Parsed::NotForUs(HandoverReason::HeadSize);
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::NotForUs(HandoverReason::Version);
    };
    // Origin-form targets only (`CONNECT`'s authority-form, absolute-form and `*` go to
    // hyper).
    if !target.starts_with('/') || method == "CONNECT" {
        return Parsed::NotForUs(HandoverReason::Target);
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 2);
    let mut body_len = None;
    let mut close = false;
    let mut hosts = 0;
    for field in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::NotForUs(HandoverReason::Malformed);
        };
        let Ok(value) = HeaderValue::from_bytes(field.value) else {
            return Parsed::NotForUs(HandoverReason::Malformed);
        };
        if name == header::CONTENT_LENGTH {
            // One plain decimal length; anything else is hyper's to refuse.
            match (body_len, parse_length(field.value)) {
                (None, Some(n)) => body_len = Some(n),
                _ => return Parsed::NotForUs(HandoverReason::Body),
            }
        } else if name == header::TRANSFER_ENCODING || name == header::EXPECT {
            return Parsed::NotForUs(HandoverReason::Body);
        } else if name == header::UPGRADE {
            return Parsed::NotForUs(HandoverReason::Upgrade);
        } else if name == header::CONNECTION {
            for token in field.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::NotForUs(HandoverReason::Upgrade);
                }
            }
        } else if name == header::HOST {
            hosts += 1;
        }
        headers.append(name, value);
    }
    if hosts != 1 {
        return Parsed::NotForUs(HandoverReason::Malformed);
    }
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method.as_bytes()), target.parse::<Uri>())
    else {
        return Parsed::NotForUs(HandoverReason::Malformed);
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.headers = headers;
    Parsed::Request(Box::new(RequestHead {
        parts,
        head_len,
        body_len: body_len.unwrap_or(0),
        close,
    }))
}

/// A `Content-Length` value: decimal digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The request head as it goes upstream.
pub(super) fn serialize_request(out: &mut Vec<u8>, parts: &http::request::Parts) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_fields(out, &parts.headers);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// A response head at the start of `buf`, `None` while incomplete.
pub(super) fn parse_response(buf: &[u8]) -> io::Result<Option<ResponseHead>> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
    };
    let invalid = |what: &str| io::Error::other(format!("bad response head: {what}"));
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| invalid("status"))?;
    let mut close = resp.version != Some(1);
    let mut hop_by_hop = false;
    let mut length = None;
    let mut chunked = None;
    for field in resp.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(field.value).ok_or_else(|| invalid("content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting content-length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked is the last coding or the body runs to the close (RFC 9112 §6.3).
            let last = field.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            hop_by_hop = true;
            close |= field
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if ["keep-alive", "proxy-connection", "upgrade", "te", "trailer"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            hop_by_hop = true;
        }
    }
    let framing = match (chunked, length) {
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => Framing::UntilClose,
        (None, Some(n)) => Framing::Length(n),
        (None, None) if status.is_informational() => Framing::None,
        (None, None) => Framing::UntilClose,
    };
    Ok(Some(ResponseHead {
        status,
        head_len,
        framing,
        close,
        hop_by_hop,
        declared_length: length.unwrap_or(0),
    }))
}

/// The response head with the hop-by-hop fields dropped, the route's response filters
/// applied and, when the client's connection ends after it, `connection: close`.
pub(super) fn rebuild_response_head(
    out: &mut Vec<u8>,
    head: &[u8],
    rule: Option<&RouteRule>,
    close: bool,
) -> io::Result<()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    resp.parse(head)
        .map_err(|e| io::Error::other(format!("bad response head: {e}")))?;
    let code = resp.code.unwrap_or(502);
    let mut headers = HeaderMap::with_capacity(resp.headers.len() + 1);
    let mut chunked = None;
    for field in resp.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Err(io::Error::other("bad response header field"));
        };
        if name == header::TRANSFER_ENCODING {
            // It frames the body, which passes through as it came.
            chunked = Some(value);
            continue;
        }
        headers.append(name, value);
    }
    strip_hop_by_hop(&mut headers, false);
    if let Some(rule) = rule {
        rule.apply_response_filters(&mut headers);
    }
    if let Some(coding) = chunked {
        headers.insert(header::TRANSFER_ENCODING, coding);
    }
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_fields(out, &headers);
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// Finds where a chunked body (RFC 9112 §7.1) ends while its bytes pass through unchanged.
/// Strict: every line ends in CRLF, sizes are hex, trailer fields are bounded.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: ChunkState,
    /// Bytes of the size line or the trailer section so far.
    seen: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Hex digits of a chunk size.
    #[default]
    Size,
    SizeValue(u64),
    /// After `;`: an extension, up to the CR.
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
}

#[derive(Debug, thiserror::Error)]
#[error("malformed chunked body from the upstream: {0}")]
pub struct ChunkError(&'static str);

/// Longest chunk-size line and trailer section accepted.
pub const MAX_CHUNK_LINE: usize = 4096;
pub const MAX_TRAILERS: usize = 64 * 1024;

impl ChunkedEnd {
    /// Feeds the next bytes of the body: `Some(n)` when it ends after `bytes[..n]`.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                ChunkState::Data(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    if take == left {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left - take)
                    }
                    .into_continue(&mut self.seen)
                }
                state => {
                    i += 1;
                    self.seen += 1;
                    match (state, b) {
                        (ChunkState::Size, b) => ChunkState::SizeValue(hex(b)?),
                        (ChunkState::SizeValue(v), b'\r') => ChunkState::SizeLf(v),
                        (ChunkState::SizeValue(v), b';') => ChunkState::Extension(v),
                        (ChunkState::SizeValue(v), b) => {
                            // Sizes stay below 2^60.
                            if v >> 56 != 0 {
                                return Err(ChunkError("chunk size too large"));
                            }
                            ChunkState::SizeValue(v << 4 | hex(b)?)
                        }
                        (ChunkState::Extension(v), b'\r') => ChunkState::SizeLf(v),
                        (ChunkState::Extension(_), b'\n') => {
                            return Err(ChunkError("bare LF in a chunk extension"));
                        }
                        (ChunkState::Extension(v), _) => ChunkState::Extension(v),
                        (ChunkState::SizeLf(0), b'\n') => {
                            self.seen = 0;
                            ChunkState::TrailerStart
                        }
                        (ChunkState::SizeLf(v), b'\n') => {
                            self.seen = 0;
                            ChunkState::Data(v)
                        }
                        (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                        (ChunkState::DataLf, b'\n') => {
                            self.seen = 0;
                            ChunkState::Size
                        }
                        (ChunkState::TrailerStart, b'\r') => ChunkState::EndLf,
                        (ChunkState::EndLf, b'\n') => {
                            self.state = ChunkState::Size;
                            self.seen = 0;
                            return Ok(Some(i));
                        }
                        (ChunkState::TrailerLine, b'\r') => ChunkState::TrailerLf,
                        (ChunkState::TrailerStart | ChunkState::TrailerLine, b'\n') => {
                            return Err(ChunkError("bare LF in the trailers"));
                        }
                        (ChunkState::TrailerStart | ChunkState::TrailerLine, _) => {
                            ChunkState::TrailerLine
                        }
                        (ChunkState::TrailerLf, b'\n') => ChunkState::TrailerStart,
                        _ => return Err(ChunkError("unexpected byte")),
                    }
                }
            };
            let limit = match self.state {
                ChunkState::TrailerStart | ChunkState::TrailerLine | ChunkState::TrailerLf => {
                    MAX_TRAILERS
                }
                _ => MAX_CHUNK_LINE,
            };
            if self.seen > limit {
                return Err(ChunkError("chunk-size line or trailers too long"));
            }
        }
        Ok(None)
    }
}

impl ChunkState {
    /// A data state resets the line counter.
    fn into_continue(self, seen: &mut usize) -> Self {
        *seen = 0;
        self
    }
}

fn hex(b: u8) -> Result<u64, ChunkError> {
    match b {
        b'0'..=b'9' => Ok(u64::from(b - b'0')),
        b'a'..=b'f' => Ok(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Ok(u64::from(b - b'A' + 10)),
        _ => Err(ChunkError("chunk size is not hex")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Parsed {
        parse_request(raw.as_bytes())
    }

    fn ends_at(body: &str) -> Result<Option<usize>, ChunkError> {
        ChunkedEnd::default().feed(body.as_bytes())
    }

    #[test]
    fn a_plain_request_is_parsed_into_parts() {
        let raw = "POST /a?b=c HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nConnection: keep-alive, close\r\n\r\nabc";
        let Parsed::Request(head) = request(raw) else {
            panic!("not parsed");
        };
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri.path(), "/a");
        assert_eq!(head.parts.uri.query(), Some("b=c"));
        assert_eq!(head.parts.headers[header::HOST], "svc");
        assert_eq!(head.head_len, raw.len() - 3);
        assert_eq!(head.body_len, 3);
        assert!(head.close);
        assert!(matches!(
            request("GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
    }

    #[test]
    fn requests_the_fast_path_does_not_serve_go_to_hyper() {
        use HandoverReason::*;
        let many_fields = format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
            "a: b\r\n".repeat(100)
        );
        let huge_field = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        for (raw, reason) in [
            // The smuggling shapes and bodies that are not one plain length.
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                Body,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
                Body,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
                Body,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\n",
                Body,
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
                Body,
            ),
            // Upgrades, other versions and target forms, missing or doubled Host.
            (
                "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                Upgrade,
            ),
            ("GET / HTTP/1.0\r\nHost: x\r\n\r\n", Version),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Version),
            ("GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n", Target),
            ("CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", Target),
            ("GET / HTTP/1.1\r\n\r\n", Malformed),
            ("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", Malformed),
            // Malformed or too large: hyper gives the 400 or 431.
            ("GET / HTTP/1.1\r\nHo st: x\r\n\r\n", Malformed),
            (many_fields.as_str(), HeadSize),
            (huge_field.as_str(), HeadSize),
        ] {
            match request(raw) {
                Parsed::NotForUs(why) => assert_eq!(why, reason, "{raw:?}"),
                _ => panic!("served: {raw:?}"),
            }
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |raw: &str| {
            parse_response(raw.as_bytes())
                .ok()
                .flatten()
                .map(|h| (h.framing, h.close, h.hop_by_hop))
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            Some((Framing::Length(5), false, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n"
            ),
            Some((Framing::Chunked, false, false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Some((Framing::UntilClose, false, false))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"),
            Some((Framing::UntilClose, true, true))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Some((Framing::Length(0), true, false))
        );
        assert_eq!(
            framing("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"),
            Some((Framing::None, false, false))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"), None);
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n")
                .is_err()
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n").is_err());
    }

    #[test]
    fn a_rebuilt_response_head_drops_hop_by_hop_fields_and_keeps_chunked_framing() {
        let mut out = Vec::new();
        let head = b"HTTP/1.1 200 OK\r\nConnection: close, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n";
        rebuild_response_head(&mut out, head, None, true).expect("rebuilt");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("x-kept: yes\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(!text.contains("x-hop"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn the_end_of_a_chunked_body_is_found_with_trailers_and_extensions() {
        let body = "5;ext=1\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n";
        assert_eq!(
            ends_at(&format!("{body}NEXT")).ok().flatten(),
            Some(body.len())
        );
        assert_eq!(
            ends_at("A\r\n0123456789\r\n0\r\n\r\n").ok().flatten(),
            Some(20)
        );
        // Byte by byte, the same end.
        let mut chunks = ChunkedEnd::default();
        let ends: Vec<_> = body
            .bytes()
            .map(|b| chunks.feed(&[b]).expect("valid"))
            .collect();
        assert_eq!(ends.iter().filter(|e| e.is_some()).count(), 1);
        assert_eq!(ends.last(), Some(&Some(1)));
        // Not finished yet.
        assert_eq!(ends_at("5\r\nhel").ok().flatten(), None);
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for body in [
            "zz\r\nabc\r\n0\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhelloX\r\n0\r\n\r\n",
            "0\r\ntrailer\n\r\n",
            "fffffffffffffffffff\r\n",
        ] {
            assert!(ends_at(body).is_err(), "{body:?}");
        }
        let long = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE + 1));
        assert!(ends_at(&long).is_err());
    }
}
