//! An HTTP backend for the L7 proxy's end-to-end tests: tells each client what it received.
//!
//! `http-backend PORT --name NAME [--fail-first N] [--fail-rate PERCENT] [--fail-status CODE]`
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) on 0.0.0.0:PORT and prints `listening` on stdout
//! once ready. Every response carries `x-backend: NAME`.
//!
//! - any path: `200` with a JSON body `{"name", "method", "path", "query", "version",
//!   "peer", "authority", "headers": {lower-case name: value}, "body_bytes"}` (repeated
//!   headers are joined with `, `; `query` is `""` when there is none);
//! - `/status/NNN`: status NNN, same body;
//! - `/delay/MS`: waits MS milliseconds (at most 30000), then `200`;
//! - `/ws`: an HTTP/1.1 WebSocket handshake (`101` with `Sec-WebSocket-Accept`), then echoes
//!   the raw byte stream back (frames are not parsed) until the client closes;
//! - `/count`: the number of requests served so far, as plain decimal text without a newline
//!   (requests to `/count` are neither counted nor failed);
//! - any path, with a request header `x-echo-body` (any value): `200` whose body is the
//!   request body, streamed back as it arrives (so both directions' flow control is in
//!   play at once); what the JSON body would say, less `body_bytes`, goes in the response
//!   header `x-request` instead.
//!
//! Fault injection, applied to every counted request before the path is looked at:
//! `--fail-first N` fails requests 1..=N (a process-wide counter); `--fail-rate P` fails each
//! request with probability P% (0-100, decimals allowed). Failures get `--fail-status`
//! (default 503) with the usual JSON body.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Either, Full};
use hyper::{
    Request, Response, StatusCode, Version,
    body::Incoming,
    header::{self, HeaderValue},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::AsyncWriteExt as _;

const USAGE: &str = "usage: http-backend PORT --name NAME [--fail-first N] [--fail-rate PERCENT] [--fail-status CODE]";
const MAX_DELAY_MS: u64 = 30_000;
/// Request bodies are read (and counted) up to this size; the rest is discarded.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// A request with this header gets its body back (see the module doc).
const ECHO_BODY_HEADER: &str = "x-echo-body";

/// A response body: made here, or the request's own body echoed back.
type Body = Either<Full<Bytes>, Incoming>;

struct Config {
    port: u16,
    name: String,
    fail_first: u64,
    fail_rate: f64,
    fail_status: StatusCode,
}

struct State {
    config: Config,
    /// Counted requests so far (everything but `/count`).
    served: AtomicU64,
    rng: Mutex<u64>,
}

fn parse_args() -> Result<Config, String> {
    let mut args = std::env::args().skip(1);
    let mut port = None;
    let mut name = None;
    let mut fail_first = 0;
    let mut fail_rate = 0.0;
    let mut fail_status = StatusCode::SERVICE_UNAVAILABLE;
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--name" => name = Some(value("--name")?),
            "--fail-first" => {
                fail_first = value("--fail-first")?
                    .parse()
                    .map_err(|_| "--fail-first needs a whole number".to_string())?
            }
            "--fail-rate" => {
                fail_rate = value("--fail-rate")?
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=100.0).contains(r))
                    .ok_or_else(|| "--fail-rate needs a percentage in 0..=100".to_string())?
            }
            "--fail-status" => {
                fail_status = value("--fail-status")?
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| "--fail-status needs an HTTP status (100-599)".to_string())?
            }
            "-h" | "--help" => return Err(String::new()),
            p if port.is_none() && !p.starts_with('-') => {
                port = Some(p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?)
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(Config {
        port: port.ok_or("PORT is missing")?,
        name: name.ok_or("--name is missing")?,
        fail_first,
        fail_rate,
        fail_status,
    })
}

#[tokio::main]
async fn main() {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("http-backend: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(("0.0.0.0", config.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("http-backend: cannot listen on port {}: {e}", config.port);
            std::process::exit(1);
        }
    };
    let state = Arc::new(State {
        served: AtomicU64::new(0),
        rng: Mutex::new(seed()),
        config,
    });
    println!("listening");
    {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("http-backend: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            builder.http2().timer(TokioTimer::new());
            // Errors here are resets and aborted requests, which fault tests cause on purpose.
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/count" {
        let n = state.served.load(Ordering::SeqCst);
        return respond(state, StatusCode::OK, "text/plain", n.to_string()).map(Either::Left);
    }
    let seq = state.served.fetch_add(1, Ordering::SeqCst) + 1;
    let fail = seq <= state.config.fail_first
        || (state.config.fail_rate > 0.0 && state.roll_percent() < state.config.fail_rate);

    // A failing `/ws` or echo gets the failure status like any other path.
    if !fail && path == "/ws" {
        return websocket(state, req).map(Either::Left);
    }
    if !fail && req.headers().contains_key(ECHO_BODY_HEADER) {
        return echo_body(state, peer, req);
    }

    let (parts, body) = req.into_parts();
    let body_bytes = read_body_len(body).await;
    let mut info = request_info(state, peer, &parts);
    info["body_bytes"] = body_bytes.into();
    let status = if fail {
        state.config.fail_status
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(s) => s,
            None => {
                info["error"] = format!("bad status {code:?}").into();
                StatusCode::BAD_REQUEST
            }
        }
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
                StatusCode::OK
            }
            Err(_) => {
                info["error"] = format!("bad delay {ms:?}").into();
                StatusCode::BAD_REQUEST
            }
        }
    } else {
        StatusCode::OK
    };
    let mut text = info.to_string();
    text.push('\n');
    respond(state, status, "application/json", text).map(Either::Left)
}

/// What the JSON body says about a request, less `body_bytes`.
fn request_info(
    state: &State,
    peer: SocketAddr,
    parts: &hyper::http::request::Parts,
) -> serde_json::Value {
    serde_json::json!({
        "name": state.config.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "version": version_str(parts.version),
        "peer": peer.to_string(),
        "authority": parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| header_str(&parts.headers, header::HOST)),
        "headers": headers_json(&parts.headers),
    })
}

/// Answers `200` with the request's body as the response body, passed through as it is
/// read (hyper credits the client's flow control as the echo is written), and the request
/// described in the `x-request` header.
fn echo_body(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let info = request_info(state, peer, &parts).to_string();
    let mut resp = respond(
        state,
        StatusCode::OK,
        "application/octet-stream",
        String::new(),
    )
    .map(|_| Either::Right(body));
    // JSON escapes control characters; the rest is valid in a header value.
    if let Ok(v) = HeaderValue::from_str(&info) {
        resp.headers_mut().insert("x-request", v);
    }
    resp
}

/// Answers a WebSocket handshake with `101` and echoes the upgraded byte stream.
fn websocket(state: &State, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let upgrade_ok = req.version() == Version::HTTP_11
        && header_has_token(headers, header::UPGRADE, "websocket")
        && header_has_token(headers, header::CONNECTION, "upgrade");
    let key = header_str(headers, header::SEC_WEBSOCKET_KEY);
    let (Some(key), true) = (key, upgrade_ok) else {
        return respond(
            state,
            StatusCode::BAD_REQUEST,
            "text/plain",
            "expected an HTTP/1.1 WebSocket handshake (Upgrade: websocket, Connection: Upgrade, Sec-WebSocket-Key)\n".into(),
        );
    };
    let accept = websocket_accept(key.trim());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
        let _ = writer.shutdown().await;
    });
    let mut resp = respond(state, StatusCode::SWITCHING_PROTOCOLS, "", String::new());
    let h = resp.headers_mut();
    h.remove(header::CONTENT_TYPE);
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

fn respond(
    state: &State,
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if !content_type.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if let Ok(v) = HeaderValue::from_str(&state.config.name) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

/// Reads the request body, keeping only its length; stops counting past MAX_BODY_BYTES.
async fn read_body_len(mut body: Incoming) -> usize {
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            len = len.saturating_add(data.len());
            if len > MAX_BODY_BYTES {
                break;
            }
        }
    }
    len
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

fn headers_json(headers: &hyper::HeaderMap) -> serde_json::Value {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    serde_json::json!(map)
}

fn header_str(headers: &hyper::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Whether a comma-separated header contains `token` (case-insensitively).
fn header_has_token(headers: &hyper::HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

impl State {
    /// A uniform number in [0, 100).
    fn roll_percent(&self) -> f64 {
        let mut s = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        // xorshift64*
        let mut x = *s;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *s = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r >> 11) as f64 / (1u64 << 53) as f64 * 100.0
    }
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let s = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    if s == 0 { 0x9E37_79B9_7F4A_7C15 } else { s }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2).
fn websocket_accept(key: &str) -> String {
    base64(&sha1(format!("{key}{WS_GUID}").as_bytes()))
}

/// SHA-1 (FIPS 180-4); only used for the WebSocket handshake.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (hv, v) in h.iter_mut().zip([a, b, c, d, e]) {
            *hv = hv.wrapping_add(v);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, v) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_known_answers() {
        let hex = |d: [u8; 20]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        assert_eq!(
            hex(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex(sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
    }

    #[test]
    fn base64_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn rfc6455_accept() {
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
