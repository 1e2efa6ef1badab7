//! The HTTP/2 fast path: a frame-level forwarder for h2c connections to Service ports whose
//! backends speak HTTP/2 (gRPC included). One task per client connection reads its frames,
//! decodes each request's header block (HPACK), takes the request through the same steps as
//! the hyper path (route, redirect, request filters, fault injection, weighted backend, P2C
//! endpoint, circuit breaker, rate limit, local-delivery authorization, request id and
//! trace context, timeouts, retries, outlier records, metrics and access log), and opens a
//! stream for
//! it on an upstream HTTP/2 connection the same task owns. DATA, trailers and resets then
//! pass between the two streams frame by frame.
//!
//! Why: on the hyper path an HTTP/2 request is a hyper request twice (server and client),
//! each with its own h2 stream state, tasks and wakers; here it is a few map entries. See
//! ARCHITECTURE.md for the numbers.
//!
//! The protocol work hyper and h2 did is done here (RFC 9113): both directions' flow
//! control, credited back only as data is forwarded, so a slow reader slows its writer and
//! memory stays bounded by the windows; CONTINUATION; the peers' SETTINGS (window, frame
//! size, header table size, concurrent streams: streams over an upstream's limit wait or
//! open another connection); limits on header size (431), concurrent streams
//! (REFUSED_STREAM) and client resets (rapid reset: GOAWAY ENHANCE_YOUR_CALM); GOAWAY both
//! ways and on drain; resets both ways.
//!
//! Where things are: this file holds the state (the connection, its streams, its upstream
//! connections) and the loop that drives it; `downstream.rs` the client's frames and the
//! routing of a new request; `upstream.rs` upstream connections and their frames;
//! `stream.rs` data within the windows, the agent's own answers, the end of a stream and
//! the timers; `retry.rs` attempts after the first; `frame.rs` and `hpack.rs` the wire
//! formats.
//!
//! A connection is only given to this path when nothing it may carry needs more: routes to
//! backends declared HTTP/1 (which need a translation) stay on hyper (see [`serves`]). If
//! the routes change under an open connection so that a new request would need hyper, the
//! connection is sent a GOAWAY and the request refused with REFUSED_STREAM, which clients
//! retry on a new connection.
mod downstream;
mod frame;
mod hpack;
mod retry;
mod stream;
mod upstream;

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use self::{
    frame::{ConnError, Frame, PeerSettings, check_ping, check_rst, window_increment},
    hpack::{Decoded, Field},
};
use super::{
    AccessLog, Downstream, EndpointOutcome, FAILURE_LATENCY_PENALTY, HEADER_READ_TIMEOUT,
    LocalAnswer, MAX_HEADER_BYTES, RetryPlan,
    client::{BoxError, DESTINATION, Permitted, overflow_in},
    denied_here,
    fast_path::Handover,
    log_request, rate_limited, record_answer,
    runtime::{Endpoint, EndpointRuntime, ServiceRuntime},
    strip_hop_by_hop, trace,
};
use crate::{
    metrics::Http2Path,
    proxy::upstream::UpstreamIo,
    resilience::{Outstanding, Overflow, RequestPermit},
    route::{RouteDecision, RouteRule, RouteTable},
    service::{AppProtocol, Service, ServicePort},
};

/// Streams a client may have open at once (what hyper's server allows by default).
const MAX_CLIENT_STREAMS: u32 = 200;
/// The stream window advertised to both peers.
const STREAM_WINDOW: i64 = 1 << 20;
/// The connection window advertised to both peers: with the stream window, what bounds the
/// data held for a slow reader, per connection and direction.
const CONN_WINDOW: i64 = 4 << 20;
/// Largest header block (HEADERS and its CONTINUATIONs) before decoding.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Output held for a peer beyond which the other side is not read (backpressure for
/// frames that are not flow-controlled: PING and SETTINGS acks, headers).
const OUTPUT_HIGH_WATER: usize = 1 << 20;
/// Read size.
const READ_CHUNK: usize = 64 * 1024;
/// Client resets of streams still in flight: a burst this large, refilled at this rate
/// per second. Past it, the connection is closed (CVE-2023-44487, rapid reset).
const RESET_BURST: f64 = 200.0;
const RESET_RATE: f64 = 100.0;
/// How long an upstream connection may take to send its first SETTINGS; past it, it is
/// given up and the requests waiting for it fail (503 `UF`) or are retried.
const SETTINGS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection has had no stream before its buffers are given back.
const IDLE_RELEASE: Duration = Duration::from_secs(2);
/// How long a connection that ended with an error gets to take its GOAWAY.
const GOAWAY_LINGER: Duration = Duration::from_secs(1);

type UpstreamConnection = Permitted<UpstreamIo>;
type Connecting =
    Pin<Box<dyn Future<Output = Result<UpstreamConnection, BoxError>> + Send + 'static>>;

/// Stream ids as hash keys: a multiply spreads the sequential ids over the table's bits
/// (SipHash, the default, guards against chosen keys at a cost every frame pays; a client
/// chooses its stream ids, but each map holds at most a few hundred entries).
#[derive(Default, Clone, Copy)]
struct StreamIdHasher(u64);

impl std::hash::Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type StreamMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<StreamIdHasher>>;

/// Whether this path serves a connection to `service:port`: every route attached to it
/// (or the port itself, without routes) sends to backends not declared HTTP/1.
pub(super) fn serves(routes: &RouteTable, d: &Downstream) -> bool {
    match routes.rules_for(&d.service.namespace, &d.service.name, d.port.port) {
        None => d.port.protocol != AppProtocol::Http,
        Some(mut rules) => rules.all(|rule| rule_fits(rule, d)),
    }
}

/// A rule this path can serve: backends that are not declared HTTP/1.
fn rule_fits(rule: &RouteRule, d: &Downstream) -> bool {
    let services = d.inputs.services.load();
    rule.backend_refs.iter().all(|b| {
        services
            .by_name(&b.namespace, &b.name)
            .and_then(|svc| svc.port(b.port))
            .is_none_or(|port| port.protocol != AppProtocol::Http)
    })
}

/// Serves the connection until it ends; gives it back when it does not start with the
/// HTTP/2 preface (an HTTP/1.1 client of an HTTP/2 port), for hyper to serve.
pub(super) async fn serve(mut client: TcpStream, d: &Downstream) -> Option<Handover> {
    let mut cin = BytesMut::with_capacity(READ_CHUNK);
    let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
    while cin.len() < frame::PREFACE.len() {
        let read = tokio::time::timeout_at(deadline, client.read_buf(&mut cin)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                if cin.is_empty() || frame::PREFACE.starts_with(&cin) {
                    return None;
                }
                break;
            }
            Ok(Ok(_)) => {}
        }
        let n = cin.len().min(frame::PREFACE.len());
        if cin[..n] != frame::PREFACE[..n] {
            break;
        }
    }
    if !cin.starts_with(frame::PREFACE) {
        return Some(Handover {
            client,
            buffered: cin.freeze(),
        });
    }
    cin.advance(frame::PREFACE.len());
    d.inputs.metrics.http2_connection(Http2Path::FastPath);
    let mut conn = Connection::new(d, client, cin);
    let result = std::future::poll_fn(|cx| conn.poll_run(cx)).await;
    match result {
        Ok(()) => {}
        Err(Ended::Protocol(e)) => {
            debug!(error = %e, "HTTP/2 client connection closed with GOAWAY");
            frame::goaway(&mut conn.cout, conn.last_client_stream, e.code);
            let linger = async {
                conn.client.write_all(&conn.cout).await?;
                conn.client.shutdown().await
            };
            let _ = tokio::time::timeout(GOAWAY_LINGER, linger).await;
        }
        Err(Ended::Io(e)) => debug!(error = %e, "HTTP/2 client connection ended"),
    }
    None
}

/// Why a connection ended early.
enum Ended {
    /// The client broke the protocol: it gets a GOAWAY with the code.
    Protocol(ConnError),
    Io(io::Error),
}

impl From<ConnError> for Ended {
    fn from(e: ConnError) -> Self {
        Self::Protocol(e)
    }
}

/// One request stream of the client connection and the upstream stream it went to.
struct Stream {
    // The request, from the client.
    /// END_STREAM received from the client.
    client_done: bool,
    /// What the client may still send on this stream before we credit it more.
    recv_window: i64,
    /// Forwarded bytes not yet credited back to the client.
    credit: i64,
    declared_length: Option<u64>,
    received: u64,
    /// What goes upstream once the stream is open there and its windows allow.
    to_upstream: VecDeque<Piece>,
    /// Request head, until it is sent upstream.
    head: Option<http::request::Parts>,
    // The upstream side.
    phase: Phase,
    /// The upstream connection (`UpConn::id`) and stream id, once opened there.
    upstream: Option<(u64, u32)>,
    /// Our send window on the upstream stream.
    upstream_send_window: i64,
    /// What the upstream may still send on its stream before we credit it more.
    upstream_recv_window: i64,
    upstream_credit: i64,
    /// END_STREAM (or a reset) sent upstream.
    upstream_done: bool,
    // The response, to the client.
    /// A final response head went to the client.
    responded: bool,
    to_client: VecDeque<Piece>,
    client_send_window: i64,
    /// Response END_STREAM received (from upstream or a local answer).
    response_done: bool,
    // Routing, resilience and telemetry.
    target: Option<Target>,
    /// The response head must come by then (the route's timeouts).
    deadline: Option<Instant>,
    timeout_message: &'static str,
    /// A fault abort that follows the fault delay.
    abort_after_delay: Option<StatusCode>,
    /// What a request that may be retried keeps to be sent again.
    retry: Option<Box<retry::RetryState>>,
    /// The upstream connection (`UpConn::id`) the response comes from: what the stream
    /// holds of it is credited back there, even after the upstream stream is gone.
    data_conn: Option<u64>,
    log: StreamLog,
}

/// Where a routed stream goes.
struct Target {
    runtime: Arc<ServiceRuntime>,
    endpoint: SocketAddr,
    endpoint_runtime: Arc<EndpointRuntime>,
    pool_size: usize,
    authority: Bytes,
    /// The rule, when it has response filters (rare: kept only then).
    response_rule: Option<Box<RouteRule>>,
    outstanding: Option<Outstanding>,
    attempt_started: Instant,
    _permit: RequestPermit,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// A fault delay runs until then.
    Delayed(Instant),
    /// Waiting for an upstream connection, or a free stream slot on one.
    Queued,
    /// Open upstream.
    Open,
    /// Answered by the agent or finished upstream; nothing more goes upstream.
    Closed,
}

/// A piece of a message waiting for its window.
#[derive(Clone)]
enum Piece {
    Data(Bytes, bool),
    Trailers(Vec<Field>),
}

/// What the access log line and the metrics of a stream need.
struct StreamLog {
    started: Instant,
    request_id: String,
    method: Method,
    path: String,
    authority: String,
    route: Option<Arc<str>>,
    backend: Option<Arc<str>>,
    upstream: Option<SocketAddr>,
    protocol: &'static str,
    request_bytes: u64,
    status: StatusCode,
    flags: &'static str,
    response_bytes: u64,
    attempts: u32,
}

/// One upstream HTTP/2 connection, owned by the client connection's task.
struct UpConn {
    id: u64,
    endpoint: SocketAddr,
    io: UpstreamConnection,
    inp: BytesMut,
    out: BytesMut,
    enc: hpack::Encoder,
    dec: hpack::Decoder,
    peer: PeerSettings,
    /// The server's first SETTINGS arrived: its stream limit is known.
    ready: bool,
    /// When the connection opened: its SETTINGS must come within [`SETTINGS_TIMEOUT`].
    opened_at: Instant,
    send_window: i64,
    recv_window: i64,
    credit: i64,
    next_stream: u32,
    /// Upstream stream id -> client stream id.
    streams: StreamMap<u32>,
    /// No new streams (GOAWAY either way, or stream ids ran out).
    closing: bool,
    /// Dead: to be removed, its streams failed.
    failed: Option<String>,
    continuation: Option<HeaderBlock>,
}

/// A header block being collected from HEADERS and CONTINUATION frames.
struct HeaderBlock {
    stream: u32,
    flags: u8,
    block: BytesMut,
}

impl HeaderBlock {
    /// Adds a HEADERS or CONTINUATION frame to the block being collected in `pending`;
    /// the whole block once its END_HEADERS came. (A frame of another kind or stream in
    /// between is refused by the caller, before it gets here.)
    fn collect(pending: &mut Option<Self>, f: &Frame) -> Result<Option<Self>, ConnError> {
        let block = match pending.take() {
            None if f.kind == frame::HEADERS => Self {
                stream: f.stream,
                flags: f.flags,
                block: BytesMut::from(&f.payload[..]),
            },
            Some(mut block) if f.kind == frame::CONTINUATION => {
                if block.block.len() + f.payload.len() > MAX_HEADER_BLOCK {
                    return Err(ConnError::new(
                        frame::ENHANCE_YOUR_CALM,
                        "header block too large",
                    ));
                }
                block.block.extend_from_slice(&f.payload);
                block
            }
            _ => {
                return Err(ConnError::new(
                    frame::PROTOCOL_ERROR,
                    "CONTINUATION without HEADERS",
                ));
            }
        };
        if f.flags & frame::END_HEADERS == 0 {
            *pending = Some(block);
            return Ok(None);
        }
        // `flags` stay the HEADERS frame's: END_STREAM rides there, not on CONTINUATIONs.
        Ok(Some(block))
    }
}

/// An upstream connection being opened, and the endpoint it is for.
struct Opening {
    endpoint: SocketAddr,
    future: Connecting,
}

struct Connection<'a> {
    d: &'a Downstream,
    client: TcpStream,
    cin: BytesMut,
    cout: BytesMut,
    client_eof: bool,
    dec: hpack::Decoder,
    enc: hpack::Encoder,
    peer: PeerSettings,
    send_window: i64,
    recv_window: i64,
    credit: i64,
    last_client_stream: u32,
    continuation: Option<HeaderBlock>,
    streams: StreamMap<Stream>,
    /// Streams waiting for an upstream connection or slot, oldest first.
    queued: VecDeque<u32>,
    upstreams: Vec<UpConn>,
    opening: Vec<Opening>,
    next_upstream_id: u64,
    /// A GOAWAY went to the client (draining, or the routes now need hyper).
    goaway_sent: bool,
    /// The client sent a GOAWAY: no new streams come.
    client_goaway: bool,
    drain: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    /// Streams with a deadline or a fault delay (the timer scans only when some have).
    timed: usize,
    /// When to check whether the connection has been without streams for
    /// [`IDLE_RELEASE`] (then its buffers are given back).
    idle_release_at: Option<Instant>,
    /// When its last stream ended.
    last_active: Instant,
    reset_tokens: f64,
    reset_refilled: Instant,
    rng: fastrand::Rng,
    block: Vec<u8>,
}

impl<'a> Connection<'a> {
    fn new(d: &'a Downstream, client: TcpStream, cin: BytesMut) -> Self {
        let mut cout = BytesMut::with_capacity(READ_CHUNK);
        frame::settings(
            &mut cout,
            &[
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CLIENT_STREAMS),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    MAX_HEADER_BYTES as u32,
                ),
            ],
        );
        frame::window_update(&mut cout, 0, (CONN_WINDOW - frame::DEFAULT_WINDOW) as u32);
        Self {
            d,
            client,
            cin,
            cout,
            client_eof: false,
            dec: hpack::Decoder::default(),
            enc: hpack::Encoder::default(),
            peer: PeerSettings::default(),
            send_window: frame::DEFAULT_WINDOW,
            recv_window: CONN_WINDOW,
            credit: 0,
            last_client_stream: 0,
            continuation: None,
            streams: StreamMap::default(),
            queued: VecDeque::new(),
            upstreams: Vec::new(),
            opening: Vec::new(),
            next_upstream_id: 0,
            goaway_sent: false,
            client_goaway: false,
            drain: Box::pin(d.inputs.drain.started()),
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            timer_at: None,
            timed: 0,
            idle_release_at: Some(Instant::now() + IDLE_RELEASE),
            last_active: Instant::now(),
            reset_tokens: RESET_BURST,
            reset_refilled: Instant::now(),
            rng: fastrand::Rng::new(),
            block: Vec::with_capacity(1024),
        }
    }

    /// Runs the connection: reads what the sockets have, handles the frames, writes what
    /// is due; `Pending` once nothing moves.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ended>> {
        loop {
            let mut progress = false;
            if !self.goaway_sent && self.drain.as_mut().poll(cx).is_ready() {
                self.send_goaway();
                progress = true;
            }
            // The client, unless its answers or the upstreams' input back up.
            let backed_up = self.cout.len() > OUTPUT_HIGH_WATER
                || self
                    .upstreams
                    .iter()
                    .any(|u| u.out.len() > OUTPUT_HIGH_WATER);
            if !self.client_eof && !backed_up {
                match poll_read(&mut self.client, cx, &mut self.cin) {
                    Poll::Ready(Ok(0)) => {
                        self.client_eof = true;
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Ended::Io(e))),
                    Poll::Pending => {}
                }
            }
            while let Some(f) = frame::next_frame(&mut self.cin)? {
                self.on_client_frame(f)?;
            }
            if self.client_eof {
                // Whatever is in flight has nobody to go to.
                return Poll::Ready(Ok(()));
            }
            // The upstreams.
            for i in 0..self.upstreams.len() {
                if self.upstreams[i].failed.is_some() {
                    continue;
                }
                let backed_up = self.cout.len() > OUTPUT_HIGH_WATER
                    || self.upstreams[i].out.len() > OUTPUT_HIGH_WATER;
                if !backed_up {
                    let up = &mut self.upstreams[i];
                    match poll_read(&mut up.io, cx, &mut up.inp) {
                        Poll::Ready(Ok(0)) => {
                            up.failed = Some("upstream closed the connection".into());
                            progress = true;
                        }
                        Poll::Ready(Ok(_)) => progress = true,
                        Poll::Ready(Err(e)) => {
                            up.failed = Some(format!("upstream read: {e}"));
                            progress = true;
                        }
                        Poll::Pending => {}
                    }
                }
                loop {
                    let next = frame::next_frame(&mut self.upstreams[i].inp);
                    match next {
                        Ok(Some(f)) => {
                            if let Err(e) = self.on_upstream_frame(i, f) {
                                let up = &mut self.upstreams[i];
                                frame::goaway(&mut up.out, 0, e.code);
                                up.failed = Some(e.to_string());
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            self.upstreams[i].failed = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            // Connections being opened.
            let mut i = 0;
            while i < self.opening.len() {
                match self.opening[i].future.as_mut().poll(cx) {
                    Poll::Ready(result) => {
                        let opening = self.opening.swap_remove(i);
                        self.opened(opening, result);
                        progress = true;
                    }
                    Poll::Pending => i += 1,
                }
            }
            if self.poll_timers(cx) {
                progress = true;
            }
            self.drop_failed_upstreams();
            self.dispatch_queued();
            // Writes.
            match poll_write_all(&mut self.client, cx, &mut self.cout) {
                Poll::Ready(Ok(true)) => progress = true,
                Poll::Ready(Ok(false)) | Poll::Pending => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Ended::Io(e))),
            }
            for up in &mut self.upstreams {
                match poll_write_all(&mut up.io, cx, &mut up.out) {
                    Poll::Ready(Ok(true)) => progress = true,
                    Poll::Ready(Ok(false)) | Poll::Pending => {}
                    Poll::Ready(Err(e)) => {
                        up.failed = Some(format!("upstream write: {e}"));
                        progress = true;
                    }
                }
            }
            let finished = (self.goaway_sent || self.client_goaway) && self.streams.is_empty();
            if finished && self.cout.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Gives back the read and write buffers of a connection that has had nothing in
    /// flight for [`IDLE_RELEASE`] (they grow to 64 KiB while busy): an idle gRPC
    /// connection then holds no buffer memory, and one between two quick requests keeps
    /// its buffers.
    pub(super) fn release_idle_buffers(&mut self) {
        fn release(buf: &mut BytesMut) {
            if buf.is_empty() && buf.capacity() > 0 {
                *buf = BytesMut::new();
            }
        }
        if self.streams.is_empty() {
            release(&mut self.cin);
            release(&mut self.cout);
        }
        for up in self.upstreams.iter_mut().filter(|u| u.streams.is_empty()) {
            release(&mut up.inp);
            release(&mut up.out);
        }
    }
}

/// How a stream ends.
enum CloseHow {
    /// Its response went out whole.
    Finished,
    /// The client reset it.
    ClientReset,
    /// It is reset toward the client with this code.
    ResetClient(u32),
}

/// Reads what the socket has into `buf`.
fn poll_read<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    buf.reserve(READ_CHUNK);
    let spare = buf.spare_capacity_mut();
    let mut read = ReadBuf::uninit(spare);
    match Pin::new(io).poll_read(cx, &mut read) {
        Poll::Ready(Ok(())) => {
            let n = read.filled().len();
            // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Writes as much of `buf` as the socket takes, then flushes; `Ok(true)` when something
/// was written.
fn poll_write_all<T: AsyncWrite + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<bool>> {
    let mut wrote = false;
    while !buf.is_empty() {
        match Pin::new(&mut *io).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                wrote = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => break,
        }
    }
    if wrote {
        match Pin::new(&mut *io).poll_flush(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) | Poll::Pending => {}
        }
    }
    Poll::Ready(Ok(wrote))
}

/// What the HTTP/2 fast path makes of bytes from the network, for the fuzz targets (`fuzz/`).
pub mod inspect {
    use bytes::BytesMut;

    pub use super::frame::DEFAULT_MAX_FRAME;

    /// A frame as read: type, flags, stream id, payload (padding stripped), flow length.
    pub type Frame = (u8, u8, u32, Vec<u8>, usize);

    /// Reads `data` as a sequence of frames: the whole frames, what is left over, and the
    /// connection error code that stopped the reading, if any.
    pub fn frames(data: &[u8]) -> (Vec<Frame>, usize, Option<u32>) {
        let mut buf = BytesMut::from(data);
        let mut frames = Vec::new();
        loop {
            match super::frame::next_frame(&mut buf) {
                Ok(Some(f)) => {
                    frames.push((f.kind, f.flags, f.stream, f.payload.to_vec(), f.flow_len))
                }
                Ok(None) => return (frames, buf.len(), None),
                Err(e) => return (frames, buf.len(), Some(e.code)),
            }
        }
    }

    /// A header block decoded by a fresh decoder with `limit`: `Err` is a connection
    /// error code, `Ok(None)` a block over the limit.
    #[allow(clippy::type_complexity)]
    pub fn decode(block: &[u8], limit: usize) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, u32> {
        let mut decoder = super::hpack::Decoder::default();
        match decoder.decode(block, limit) {
            Ok(super::Decoded::Fields(fields)) => Ok(Some(fields)),
            Ok(super::Decoded::TooLarge) => Ok(None),
            Err(e) => Err(e.code),
        }
    }

    /// Encodes fields with a fresh encoder, as the forwarder encodes them for a peer.
    pub fn encode(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut encoder = super::hpack::Encoder::default();
        let mut block = Vec::new();
        encoder.begin(&mut block);
        for (n, v) in fields {
            encoder.field(n, v, &mut block);
        }
        block
    }

    /// A request head accepted from decoded fields: method, URI and regular fields, or
    /// why it is malformed.
    #[allow(clippy::type_complexity)]
    pub fn request(
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(String, String, Vec<(String, Vec<u8>)>), &'static str> {
        let parts = super::downstream::request_parts(fields)?;
        Ok((
            parts.method.to_string(),
            parts.uri.to_string(),
            parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
        ))
    }
}
