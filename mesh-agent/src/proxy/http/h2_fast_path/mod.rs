//! The HTTP/2 fast path: a frame-level forwarder for h2c connections to Service ports whose
//! backends speak HTTP/2 (gRPC included). One task per client connection reads its frames,
//! decodes each request's header block (HPACK), takes the request through the same steps as
//! the hyper path (route, redirect, request filters, fault injection, weighted backend, P2C
//! endpoint, circuit breaker, rate limit, local-delivery authorization, request id and
//! trace context, timeouts, outlier records, metrics and access log), and opens a stream for
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
//! A connection is only given to this path when nothing it may carry needs more: routes
//! with retries (which need the request kept to send again) and backends declared HTTP/1
//! stay on hyper (see [`serves`]). If the routes change under an open connection so that a
//! new request would need hyper, the connection is sent a GOAWAY and the request refused
//! with REFUSED_STREAM, which clients retry on a new connection.
mod frame;
mod hpack;

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
    frame::{ConnError, Frame, PeerSettings},
    hpack::{Decoded, Field},
};
use super::{
    AccessLog, Downstream, EndpointOutcome, FAILURE_LATENCY_PENALTY, HEADER_READ_TIMEOUT,
    MAX_HEADER_BYTES, RESPONSE_FLAGS_HEADER, RetryPlan,
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
/// (or the port itself, without routes) sends to HTTP/2 backends, and none retries.
pub(super) fn serves(routes: &RouteTable, d: &Downstream) -> bool {
    match routes.rules_for(&d.service.namespace, &d.service.name, d.port.port) {
        None => d.port.protocol != AppProtocol::Http,
        Some(mut rules) => rules.all(|rule| rule_fits(rule, d)),
    }
}

/// A rule this path can serve: no retries, and backends that are not declared HTTP/1.
fn rule_fits(rule: &RouteRule, d: &Downstream) -> bool {
    if rule.retry.is_some() {
        return false;
    }
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

/// An upstream connection being opened, and the endpoint it is for.
struct Opening {
    endpoint: SocketAddr,
    /// The destination whose outlier detector hears about a failed connect.
    runtime: Arc<ServiceRuntime>,
    endpoint_runtime: Arc<EndpointRuntime>,
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

    // ---------------------------------------------------------------------------------
    // Frames from the client.
    // ---------------------------------------------------------------------------------

    fn on_client_frame(&mut self, f: Frame) -> Result<(), ConnError> {
        if let Some(pending) = &self.continuation
            && (f.kind != frame::CONTINUATION || f.stream != pending.stream)
        {
            return Err(ConnError::new(
                frame::PROTOCOL_ERROR,
                "header block interrupted",
            ));
        }
        match f.kind {
            frame::DATA => self.on_client_data(f),
            frame::HEADERS => {
                if f.stream.is_multiple_of(2) {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "HEADERS on a server stream id",
                    ));
                }
                let block = HeaderBlock {
                    stream: f.stream,
                    flags: f.flags,
                    block: BytesMut::from(&f.payload[..]),
                };
                if f.flags & frame::END_HEADERS == 0 {
                    self.continuation = Some(block);
                    return Ok(());
                }
                self.on_client_headers(block)
            }
            frame::CONTINUATION => {
                let Some(mut pending) = self.continuation.take() else {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "CONTINUATION without HEADERS",
                    ));
                };
                if pending.block.len() + f.payload.len() > MAX_HEADER_BLOCK {
                    return Err(ConnError::new(
                        frame::ENHANCE_YOUR_CALM,
                        "header block too large",
                    ));
                }
                pending.block.extend_from_slice(&f.payload);
                if f.flags & frame::END_HEADERS == 0 {
                    self.continuation = Some(pending);
                    return Ok(());
                }
                self.on_client_headers(pending)
            }
            frame::PRIORITY => {
                if f.stream == 0 {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "PRIORITY on stream 0",
                    ));
                }
                Ok(())
            }
            frame::RST_STREAM => {
                check_rst(&f)?;
                if f.stream > self.last_client_stream {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "RST_STREAM on an idle stream",
                    ));
                }
                if let Some(stream) = self.streams.get(&f.stream) {
                    if !stream.response_done {
                        self.charge_reset()?;
                    }
                    self.close_stream(f.stream, CloseHow::ClientReset);
                }
                Ok(())
            }
            frame::SETTINGS => {
                if f.stream != 0 {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "SETTINGS on a stream",
                    ));
                }
                if f.flags & frame::ACK != 0 {
                    if !f.payload.is_empty() {
                        return Err(ConnError::new(
                            frame::FRAME_SIZE_ERROR,
                            "SETTINGS ack with a payload",
                        ));
                    }
                    return Ok(());
                }
                let before = self.peer;
                frame::apply_settings(&mut self.peer, &f.payload)?;
                if self.peer.header_table_size != before.header_table_size {
                    self.enc.peer_table_size(self.peer.header_table_size);
                }
                let delta = self.peer.initial_window - before.initial_window;
                frame::settings_ack(&mut self.cout);
                if delta != 0 {
                    let ids: Vec<u32> = self.streams.keys().copied().collect();
                    for id in ids {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.client_send_window += delta;
                            if s.client_send_window > frame::MAX_WINDOW {
                                return Err(ConnError::new(
                                    frame::FLOW_CONTROL_ERROR,
                                    "stream window overflow",
                                ));
                            }
                        }
                        self.pump_to_client(id);
                    }
                }
                Ok(())
            }
            frame::PUSH_PROMISE => Err(ConnError::new(
                frame::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            frame::PING => {
                check_ping(&f)?;
                if f.flags & frame::ACK == 0 {
                    frame::ping_ack(&mut self.cout, &f.payload);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if f.stream != 0 {
                    return Err(ConnError::new(frame::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                self.client_goaway = true;
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let increment = window_increment(&f)?;
                if f.stream == 0 {
                    if increment == 0 {
                        return Err(ConnError::new(frame::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
                    }
                    self.send_window += increment;
                    if self.send_window > frame::MAX_WINDOW {
                        return Err(ConnError::new(
                            frame::FLOW_CONTROL_ERROR,
                            "connection window overflow",
                        ));
                    }
                    let ids: Vec<u32> = self
                        .streams
                        .iter()
                        .filter(|(_, s)| !s.to_client.is_empty())
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        self.pump_to_client(id);
                    }
                    return Ok(());
                }
                let Some(stream) = self.streams.get_mut(&f.stream) else {
                    return Ok(());
                };
                if increment == 0 {
                    self.close_stream(f.stream, CloseHow::ResetClient(frame::PROTOCOL_ERROR));
                    return Ok(());
                }
                stream.client_send_window += increment;
                if stream.client_send_window > frame::MAX_WINDOW {
                    self.close_stream(f.stream, CloseHow::ResetClient(frame::FLOW_CONTROL_ERROR));
                    return Ok(());
                }
                self.pump_to_client(f.stream);
                Ok(())
            }
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn on_client_data(&mut self, f: Frame) -> Result<(), ConnError> {
        if f.stream == 0 {
            return Err(ConnError::new(frame::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let flow = f.flow_len as i64;
        self.recv_window -= flow;
        if self.recv_window < 0 {
            return Err(ConnError::new(
                frame::FLOW_CONTROL_ERROR,
                "client overran the connection window",
            ));
        }
        let end = f.flags & frame::END_STREAM != 0;
        let Some(stream) = self.streams.get_mut(&f.stream) else {
            if f.stream > self.last_client_stream {
                return Err(ConnError::new(
                    frame::PROTOCOL_ERROR,
                    "DATA on an idle stream",
                ));
            }
            // A stream already closed here (its reset may still be on the way): the
            // connection window is credited, the data dropped.
            self.credit_client(flow);
            return Ok(());
        };
        if stream.client_done {
            self.credit_client(flow);
            self.close_stream(f.stream, CloseHow::ResetClient(frame::STREAM_CLOSED));
            return Ok(());
        }
        stream.recv_window -= flow;
        if stream.recv_window < 0 {
            self.credit_client(flow);
            self.close_stream(f.stream, CloseHow::ResetClient(frame::FLOW_CONTROL_ERROR));
            return Ok(());
        }
        stream.received += f.payload.len() as u64;
        let length_error = match stream.declared_length {
            Some(declared) => stream.received > declared || (end && stream.received != declared),
            None => false,
        };
        if length_error {
            self.credit_client(flow);
            self.close_stream(f.stream, CloseHow::ResetClient(frame::PROTOCOL_ERROR));
            return Ok(());
        }
        // Padding is credited at once; data when it is forwarded.
        let padding = flow - f.payload.len() as i64;
        stream.credit += padding;
        self.credit += padding;
        if end {
            stream.client_done = true;
        }
        if stream.phase == Phase::Closed {
            // Answered already: the body goes nowhere.
            let len = f.payload.len() as i64;
            stream.credit += len;
            self.credit += len;
        } else {
            stream.to_upstream.push_back(Piece::Data(f.payload, end));
        }
        self.pump_to_upstream(f.stream);
        self.send_client_credit(f.stream);
        Ok(())
    }

    fn on_client_headers(&mut self, block: HeaderBlock) -> Result<(), ConnError> {
        let HeaderBlock {
            stream: id,
            flags,
            block,
        } = block;
        let decoded = self.dec.decode(&block, MAX_HEADER_BYTES)?;
        let end = flags & frame::END_STREAM != 0;
        if let Some(stream) = self.streams.get_mut(&id) {
            // Trailers: the last frame of the request.
            let fields = match decoded {
                Decoded::Fields(fields) if end && !stream.client_done => fields,
                _ => {
                    self.close_stream(id, CloseHow::ResetClient(frame::PROTOCOL_ERROR));
                    return Ok(());
                }
            };
            if fields.iter().any(|(n, _)| n.starts_with(b":")) {
                self.close_stream(id, CloseHow::ResetClient(frame::PROTOCOL_ERROR));
                return Ok(());
            }
            stream.client_done = true;
            if stream.declared_length.is_some_and(|d| d != stream.received) {
                self.close_stream(id, CloseHow::ResetClient(frame::PROTOCOL_ERROR));
                return Ok(());
            }
            if stream.phase != Phase::Closed {
                stream.to_upstream.push_back(Piece::Trailers(fields));
                self.pump_to_upstream(id);
            }
            return Ok(());
        }
        if id <= self.last_client_stream {
            // Stream ids only grow: a request on a lower one is a connection error. Trailers
            // of a stream closed here (its reset may still be on the way) are dropped; the
            // block was decoded to keep HPACK in step.
            let is_request = matches!(&decoded, Decoded::Fields(f) if f.iter().any(|(n, _)| n.starts_with(b":")));
            if is_request || !end {
                return Err(ConnError::new(
                    frame::PROTOCOL_ERROR,
                    "HEADERS on a stream id already used",
                ));
            }
            return Ok(());
        }
        self.last_client_stream = id;
        if self.goaway_sent
            || self.client_goaway
            || self.streams.len() >= MAX_CLIENT_STREAMS as usize
        {
            frame::rst_stream(&mut self.cout, id, frame::REFUSED_STREAM);
            return Ok(());
        }
        let fields = match decoded {
            Decoded::Fields(fields) => fields,
            Decoded::TooLarge => {
                let log = StreamLog::unparsed(Instant::now());
                let stream = Stream::new(log, end, None, self.peer.initial_window);
                self.streams.insert(id, stream);
                self.answer(
                    id,
                    LocalAnswer::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        "-",
                        "request headers too large",
                    ),
                );
                return Ok(());
            }
        };
        let parts = match request_parts(fields) {
            Ok(parts) => parts,
            Err(reason) => {
                debug!(stream = id, reason, "malformed HTTP/2 request");
                frame::rst_stream(&mut self.cout, id, frame::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        self.start_stream(id, parts, end);
        Ok(())
    }

    /// Routes a new request: answers it here, or sets where it goes and queues it for an
    /// upstream stream.
    fn start_stream(&mut self, id: u32, mut parts: http::request::Parts, end: bool) {
        let d = self.d;
        let inputs = &d.inputs;
        let started = Instant::now();
        let request_id = trace::ensure(&mut parts.headers, &mut self.rng);
        let declared_length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let is_grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let log = StreamLog {
            started,
            request_id,
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            authority: parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            route: None,
            backend: None,
            upstream: None,
            protocol: if is_grpc { "grpc" } else { "http" },
            request_bytes: declared_length.unwrap_or(0),
            status: StatusCode::OK,
            flags: "-",
            response_bytes: 0,
        };
        let stream = Stream::new(log, end, declared_length, self.peer.initial_window);
        self.streams.insert(id, stream);
        if parts.method == Method::CONNECT {
            self.answer(
                id,
                LocalAnswer::new(StatusCode::NOT_IMPLEMENTED, "-", "CONNECT is not proxied"),
            );
            return;
        }
        let routes = inputs.routes.load();
        let services = inputs.services.load();
        let (rule, backend, backend_port) =
            match routes.select(&d.service.namespace, &d.service.name, d.port.port, &parts) {
                RouteDecision::NoRoutes => (None, &d.service, &d.port),
                RouteDecision::NoMatch => {
                    self.answer(
                        id,
                        LocalAnswer::new(StatusCode::NOT_FOUND, "NR", "no route matched"),
                    );
                    return;
                }
                RouteDecision::Matched(rule, matched) => {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.log.route = Some(rule.label.clone());
                    }
                    if !rule_fits(rule, d) {
                        // The routes changed under this connection: its requests now need
                        // the hyper path. Refused (unprocessed), the client retries on a new
                        // connection, which goes there.
                        self.streams.remove(&id);
                        frame::rst_stream(&mut self.cout, id, frame::REFUSED_STREAM);
                        self.send_goaway();
                        return;
                    }
                    if let Some(redirect) = rule.redirect(&parts, &matched, d.port.port) {
                        self.answer(id, LocalAnswer::redirect(redirect));
                        return;
                    }
                    rule.apply_request_filters(&mut parts, &matched);
                    let picked = rule.pick_backend(&mut self.rng).and_then(|b| {
                        services
                            .by_name(&b.namespace, &b.name)
                            .and_then(|svc| svc.port(b.port).map(|p| (svc, p)))
                    });
                    let Some((backend, port)) = picked else {
                        self.answer(
                            id,
                            LocalAnswer::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "NR",
                                "no backend for the route",
                            ),
                        );
                        return;
                    };
                    (Some(rule), backend, port)
                }
            };
        let mut delay = None;
        if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
            let decision = fault.sample(&mut self.rng);
            match (decision.abort, decision.delay) {
                (Some(status), None) => {
                    self.answer(id, LocalAnswer::new(status, "FI", "fault injected"));
                    return;
                }
                // Delayed, then aborted, as on the hyper path.
                (Some(status), Some(delay)) => {
                    if let Some(stream) = self.streams.get_mut(&id) {
                        stream.phase = Phase::Delayed(Instant::now() + delay);
                        stream.abort_after_delay = Some(status);
                        self.timed += 1;
                        self.timer_at = None;
                    }
                    return;
                }
                (None, d) => delay = d,
            }
        }
        if let Err(answer) =
            self.pick_target(id, &mut parts, rule, backend, backend_port, &services)
        {
            self.answer(id, *answer);
            return;
        }
        strip_hop_by_hop(&mut parts.headers, false);
        parts.headers.remove(header::HOST);
        let plan = RetryPlan::new(rule, started, false);
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.head = Some(parts);
        // The route's timeouts bound the wait for the response head, as on the hyper path:
        // the request timeout from the request's start (a fault delay included), the
        // per-try one from when the request goes upstream.
        let try_deadline = plan
            .per_try
            .map(|t| Instant::now() + delay.unwrap_or_default() + t);
        let (deadline, message) = match (plan.deadline, try_deadline) {
            (Some(request), Some(attempt)) if attempt < request => {
                (Some(attempt), "upstream per-try timeout")
            }
            (Some(request), _) => (Some(request), "upstream request timeout"),
            (None, attempt) => (attempt, "upstream per-try timeout"),
        };
        if deadline.is_some() {
            stream.deadline = deadline;
            stream.timeout_message = message;
            self.timed += 1;
        }
        match delay {
            Some(delay) => {
                stream.phase = Phase::Delayed(Instant::now() + delay);
                self.timed += 1;
                self.timer_at = None;
            }
            None => {
                stream.phase = Phase::Queued;
                self.queued.push_back(id);
            }
        }
        if stream.deadline.is_some() {
            self.timer_at = None;
        }
    }

    /// The endpoint, circuit breaker permit, rate limit and authorization of a routed
    /// request; `Err` is the agent's answer instead.
    fn pick_target(
        &mut self,
        id: u32,
        parts: &mut http::request::Parts,
        rule: Option<&RouteRule>,
        backend: &Service,
        backend_port: &ServicePort,
        services: &crate::service::ServiceIndex,
    ) -> Result<(), Box<LocalAnswer>> {
        let inputs = &self.d.inputs;
        let runtime = inputs.l7.service(backend);
        let no_upstream =
            || LocalAnswer::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream");
        if let Some(s) = self.streams.get_mut(&id) {
            s.log.backend = Some(runtime.host.clone());
        }
        let endpoints = services.endpoints(backend);
        if endpoints.is_empty() {
            return Err(Box::new(no_upstream()));
        }
        let permit = runtime
            .circuit
            .try_request()
            .map_err(|o| Box::new(overflow_answer(&o)))?;
        runtime.budget.deposit(Instant::now());
        let endpoint = runtime
            .pick(endpoints, backend_port.target_port, &mut self.rng)
            .ok_or_else(|| Box::new(no_upstream()))?;
        if let Some(s) = self.streams.get_mut(&id) {
            s.log.upstream = Some(endpoint.addr);
        }
        if rule.is_some_and(|r| rate_limited(inputs, r, endpoint.addr)) {
            return Err(Box::new(LocalAnswer::new(
                StatusCode::TOO_MANY_REQUESTS,
                "RL",
                "local rate limit",
            )));
        }
        let mesh = inputs.mesh.load();
        if denied_here(&mesh, self.d, endpoint.addr, parts) {
            return Err(Box::new(LocalAnswer::new(
                StatusCode::FORBIDDEN,
                "RBAC",
                "RBAC: access denied",
            )));
        }
        let authority = endpoint
            .stats
            .authority
            .as_ref()
            .map(|a| Bytes::copy_from_slice(a.as_str().as_bytes()))
            .unwrap_or_else(|| Bytes::from(endpoint.addr.to_string()));
        let response_rule = rule
            .filter(|r| {
                r.filters
                    .iter()
                    .any(|f| matches!(f, crate::route::Filter::ResponseHeaderModifier(_)))
            })
            .map(|r| Box::new(r.clone()));
        let outstanding = endpoint.stats.stats.start();
        if let Some(s) = self.streams.get_mut(&id) {
            s.target = Some(Target {
                runtime,
                endpoint: endpoint.addr,
                endpoint_runtime: endpoint.stats.clone(),
                pool_size: endpoints.len(),
                authority,
                response_rule,
                outstanding: Some(outstanding),
                attempt_started: Instant::now(),
                _permit: permit,
            });
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Upstream connections and streams.
    // ---------------------------------------------------------------------------------

    /// Opens upstream streams for queued requests where a connection has room, and opens
    /// connections where none has.
    fn dispatch_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let mut waiting = VecDeque::with_capacity(self.queued.len());
        while let Some(id) = self.queued.pop_front() {
            let Some(stream) = self.streams.get(&id) else {
                continue;
            };
            if stream.phase != Phase::Queued {
                continue;
            }
            let Some(target) = &stream.target else {
                continue;
            };
            let endpoint = target.endpoint;
            let room = self.upstreams.iter().position(|u| {
                u.endpoint == endpoint
                    && u.ready
                    && !u.closing
                    && u.failed.is_none()
                    && (u.streams.len() as u64) < u64::from(u.peer.max_concurrent_streams)
            });
            if let Some(i) = room {
                self.open_upstream_stream(i, id);
                continue;
            }
            // A connection that is not ready yet, or one being opened, takes it soon.
            let coming = self.opening.iter().any(|o| o.endpoint == endpoint)
                || self
                    .upstreams
                    .iter()
                    .any(|u| u.endpoint == endpoint && !u.ready && u.failed.is_none());
            if !coming {
                let runtime = target.runtime.clone();
                let endpoint_runtime = target.endpoint_runtime.clone();
                let connector = &self.d.clients.connector;
                let future = DESTINATION.sync_scope(runtime.clone(), || connector.open(endpoint));
                self.opening.push(Opening {
                    endpoint,
                    runtime,
                    endpoint_runtime,
                    future: Box::pin(future),
                });
            }
            waiting.push_back(id);
        }
        self.queued = waiting;
    }

    /// A connect finished: the connection starts (its streams open once its SETTINGS
    /// come), or the requests waiting for it get the agent's answer.
    fn opened(&mut self, opening: Opening, result: Result<UpstreamConnection, BoxError>) {
        match result {
            Ok(io) => {
                let mut out = BytesMut::with_capacity(READ_CHUNK);
                out.extend_from_slice(frame::PREFACE);
                frame::settings(
                    &mut out,
                    &[
                        (frame::SETTINGS_ENABLE_PUSH, 0),
                        (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW as u32),
                        (
                            frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                            (4 * MAX_HEADER_BYTES) as u32,
                        ),
                    ],
                );
                frame::window_update(&mut out, 0, (CONN_WINDOW - frame::DEFAULT_WINDOW) as u32);
                self.next_upstream_id += 1;
                self.upstreams.push(UpConn {
                    id: self.next_upstream_id,
                    endpoint: opening.endpoint,
                    io,
                    inp: BytesMut::with_capacity(READ_CHUNK),
                    out,
                    enc: hpack::Encoder::default(),
                    dec: hpack::Decoder::default(),
                    peer: PeerSettings::default(),
                    ready: false,
                    send_window: frame::DEFAULT_WINDOW,
                    recv_window: CONN_WINDOW,
                    credit: 0,
                    next_stream: 1,
                    streams: StreamMap::default(),
                    closing: false,
                    failed: None,
                    continuation: None,
                });
            }
            Err(e) => {
                let overflow = overflow_in(e.as_ref()).copied();
                if overflow.is_none() {
                    let endpoint = Endpoint {
                        addr: opening.endpoint,
                        stats: opening.endpoint_runtime.clone(),
                    };
                    let pool_size = self
                        .queued
                        .iter()
                        .filter_map(|id| self.streams.get(id)?.target.as_ref())
                        .find(|t| t.endpoint == opening.endpoint)
                        .map_or(1, |t| t.pool_size);
                    opening
                        .runtime
                        .record(&endpoint, EndpointOutcome::ConnectFailure, pool_size);
                }
                let waiting: Vec<u32> = self
                    .queued
                    .iter()
                    .copied()
                    .filter(|id| {
                        self.streams.get(id).is_some_and(|s| {
                            s.phase == Phase::Queued
                                && s.target
                                    .as_ref()
                                    .is_some_and(|t| t.endpoint == opening.endpoint)
                        })
                    })
                    .collect();
                for id in waiting {
                    if let Some(t) = self.streams.get_mut(&id).and_then(|s| s.target.as_mut())
                        && let Some(o) = t.outstanding.take()
                    {
                        o.finish(FAILURE_LATENCY_PENALTY);
                    }
                    let answer = match &overflow {
                        Some(overflow) => overflow_answer(overflow),
                        None => LocalAnswer::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "UF",
                            &format!("upstream connect error: {e}"),
                        ),
                    };
                    self.answer(id, answer);
                }
            }
        }
    }

    /// Sends a queued request's head on upstream connection `i`, then what it has of its
    /// body.
    fn open_upstream_stream(&mut self, i: usize, id: u32) {
        let up = &mut self.upstreams[i];
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let (Some(parts), Some(target)) = (stream.head.take(), stream.target.as_mut()) else {
            return;
        };
        let up_id = up.next_stream;
        up.next_stream += 2;
        if up.next_stream > 0x7fff_ffff - 2 {
            up.closing = true;
        }
        up.enc.begin(&mut self.block);
        up.enc.field(
            b":method",
            parts.method.as_str().as_bytes(),
            &mut self.block,
        );
        up.enc.field(b":scheme", b"http", &mut self.block);
        up.enc
            .field(b":authority", &target.authority, &mut self.block);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        up.enc.field(b":path", path.as_bytes(), &mut self.block);
        for (name, value) in &parts.headers {
            up.enc
                .field(name.as_str().as_bytes(), value.as_bytes(), &mut self.block);
        }
        // END_STREAM rides on the head when the request has no body.
        let bodiless = matches!(
            stream.to_upstream.front(),
            Some(Piece::Data(b, true)) if b.is_empty()
        ) || (stream.client_done && stream.to_upstream.is_empty());
        if bodiless {
            stream.to_upstream.clear();
            stream.upstream_done = true;
        }
        frame::headers(&mut up.out, up_id, &self.block, bodiless);
        target.attempt_started = Instant::now();
        stream.upstream = Some((up.id, up_id));
        stream.upstream_send_window = up.peer.initial_window;
        stream.upstream_recv_window = STREAM_WINDOW;
        stream.phase = Phase::Open;
        up.streams.insert(up_id, id);
        self.pump_to_upstream(id);
    }

    fn on_upstream_frame(&mut self, i: usize, f: Frame) -> Result<(), ConnError> {
        let up = &mut self.upstreams[i];
        if let Some(pending) = &up.continuation
            && (f.kind != frame::CONTINUATION || f.stream != pending.stream)
        {
            return Err(ConnError::new(
                frame::PROTOCOL_ERROR,
                "upstream header block interrupted",
            ));
        }
        match f.kind {
            frame::DATA => {
                let flow = f.flow_len as i64;
                up.recv_window -= flow;
                if up.recv_window < 0 {
                    return Err(ConnError::new(
                        frame::FLOW_CONTROL_ERROR,
                        "upstream overran the window",
                    ));
                }
                let Some(&id) = up.streams.get(&f.stream) else {
                    up.credit += flow;
                    self.send_upstream_credit(i);
                    return Ok(());
                };
                let end = f.flags & frame::END_STREAM != 0;
                let Some(stream) = self.streams.get_mut(&id) else {
                    return Ok(());
                };
                stream.upstream_recv_window -= flow;
                if stream.upstream_recv_window < 0 || !stream.responded {
                    up.credit += flow;
                    self.fail_upstream_stream(i, f.stream, "upstream sent DATA out of turn");
                    return Ok(());
                }
                let padding = flow - f.payload.len() as i64;
                stream.upstream_credit += padding;
                up.credit += padding;
                stream.log.response_bytes += f.payload.len() as u64;
                stream.to_client.push_back(Piece::Data(f.payload, end));
                if end {
                    stream.response_done = true;
                    up.streams.remove(&f.stream);
                }
                self.pump_to_client(id);
                Ok(())
            }
            frame::HEADERS => {
                if f.stream == 0 {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "upstream HEADERS on stream 0",
                    ));
                }
                let block = HeaderBlock {
                    stream: f.stream,
                    flags: f.flags,
                    block: BytesMut::from(&f.payload[..]),
                };
                if f.flags & frame::END_HEADERS == 0 {
                    up.continuation = Some(block);
                    return Ok(());
                }
                self.on_upstream_headers(i, block)
            }
            frame::CONTINUATION => {
                let Some(mut pending) = up.continuation.take() else {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "upstream CONTINUATION without HEADERS",
                    ));
                };
                if pending.block.len() + f.payload.len() > MAX_HEADER_BLOCK {
                    return Err(ConnError::new(
                        frame::ENHANCE_YOUR_CALM,
                        "upstream header block too large",
                    ));
                }
                pending.block.extend_from_slice(&f.payload);
                if f.flags & frame::END_HEADERS == 0 {
                    up.continuation = Some(pending);
                    return Ok(());
                }
                self.on_upstream_headers(i, pending)
            }
            frame::RST_STREAM => {
                check_rst(&f)?;
                let code =
                    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
                let Some(id) = up.streams.remove(&f.stream) else {
                    return Ok(());
                };
                if let Some(stream) = self.streams.get_mut(&id) {
                    stream.upstream_done = true;
                    stream.upstream = None;
                }
                self.upstream_stream_ended(id, code);
                Ok(())
            }
            frame::SETTINGS => {
                if f.stream != 0 {
                    return Err(ConnError::new(
                        frame::PROTOCOL_ERROR,
                        "upstream SETTINGS on a stream",
                    ));
                }
                if f.flags & frame::ACK != 0 {
                    return Ok(());
                }
                let before = up.peer;
                frame::apply_settings(&mut up.peer, &f.payload)?;
                if up.peer.header_table_size != before.header_table_size {
                    up.enc.peer_table_size(up.peer.header_table_size);
                }
                frame::settings_ack(&mut up.out);
                up.ready = true;
                let delta = up.peer.initial_window - before.initial_window;
                if delta != 0 {
                    let ids: Vec<u32> = up.streams.values().copied().collect();
                    for id in ids {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.upstream_send_window += delta;
                        }
                        self.pump_to_upstream(id);
                    }
                }
                Ok(())
            }
            frame::PING => {
                check_ping(&f)?;
                if f.flags & frame::ACK == 0 {
                    frame::ping_ack(&mut up.out, &f.payload);
                }
                Ok(())
            }
            frame::GOAWAY => {
                if f.payload.len() < 8 {
                    return Err(ConnError::new(frame::FRAME_SIZE_ERROR, "short GOAWAY"));
                }
                let last =
                    u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]])
                        & 0x7fff_ffff;
                up.closing = true;
                // Streams above `last` were not processed: they may go again elsewhere.
                let unprocessed: Vec<(u32, u32)> = up
                    .streams
                    .iter()
                    .filter(|(up_id, _)| **up_id > last)
                    .map(|(u, c)| (*u, *c))
                    .collect();
                for (up_id, id) in unprocessed {
                    self.upstreams[i].streams.remove(&up_id);
                    if let Some(stream) = self.streams.get_mut(&id) {
                        stream.upstream = None;
                    }
                    self.upstream_stream_ended(id, frame::REFUSED_STREAM);
                }
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                let increment = window_increment(&f)?;
                if f.stream == 0 {
                    up.send_window += increment;
                    if increment == 0 || up.send_window > frame::MAX_WINDOW {
                        return Err(ConnError::new(
                            frame::FLOW_CONTROL_ERROR,
                            "bad upstream WINDOW_UPDATE",
                        ));
                    }
                    let ids: Vec<u32> = up.streams.values().copied().collect();
                    for id in ids {
                        self.pump_to_upstream(id);
                    }
                    return Ok(());
                }
                let Some(&id) = up.streams.get(&f.stream) else {
                    return Ok(());
                };
                if let Some(s) = self.streams.get_mut(&id) {
                    s.upstream_send_window += increment;
                    if increment == 0 || s.upstream_send_window > frame::MAX_WINDOW {
                        self.fail_upstream_stream(i, f.stream, "bad upstream stream WINDOW_UPDATE");
                        return Ok(());
                    }
                }
                self.pump_to_upstream(id);
                Ok(())
            }
            frame::PUSH_PROMISE => Err(ConnError::new(
                frame::PROTOCOL_ERROR,
                "PUSH_PROMISE though push is off",
            )),
            _ => Ok(()),
        }
    }

    fn on_upstream_headers(&mut self, i: usize, block: HeaderBlock) -> Result<(), ConnError> {
        let HeaderBlock {
            stream: up_id,
            flags,
            block,
        } = block;
        let up = &mut self.upstreams[i];
        let decoded = up.dec.decode(&block, 4 * MAX_HEADER_BYTES)?;
        let end = flags & frame::END_STREAM != 0;
        let Some(&id) = up.streams.get(&up_id) else {
            return Ok(());
        };
        let Decoded::Fields(fields) = decoded else {
            self.fail_upstream_stream(i, up_id, "upstream response headers too large");
            return Ok(());
        };
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if stream.responded {
            // Trailers.
            if !end || fields.iter().any(|(n, _)| n.starts_with(b":")) {
                self.fail_upstream_stream(i, up_id, "malformed upstream trailers");
                return Ok(());
            }
            stream.to_client.push_back(Piece::Trailers(fields));
            stream.response_done = true;
            self.upstreams[i].streams.remove(&up_id);
            self.pump_to_client(id);
            return Ok(());
        }
        let status = fields
            .iter()
            .find(|(n, _)| n.as_slice() == b":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u16>().ok())
            .and_then(|v| StatusCode::from_u16(v).ok());
        let Some(status) = status else {
            self.fail_upstream_stream(i, up_id, "upstream response without a :status");
            return Ok(());
        };
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS || end {
                self.fail_upstream_stream(i, up_id, "bad informational response");
                return Ok(());
            }
            self.enc.begin(&mut self.block);
            for (n, v) in &fields {
                self.enc.field(n, v, &mut self.block);
            }
            frame::headers(&mut self.cout, id, &self.block, false);
            return Ok(());
        }
        stream.responded = true;
        stream.log.status = status;
        if stream.deadline.take().is_some() {
            self.timed = self.timed.saturating_sub(1);
            self.timer_at = None;
        }
        let Some(target) = stream.target.as_mut() else {
            return Ok(());
        };
        if let Some(outstanding) = target.outstanding.take() {
            let endpoint = Endpoint {
                addr: target.endpoint,
                stats: target.endpoint_runtime.clone(),
            };
            record_answer(
                &target.runtime,
                &endpoint,
                outstanding,
                target.attempt_started,
                status,
                target.pool_size,
            );
        }
        self.enc.begin(&mut self.block);
        match &target.response_rule {
            None => {
                for (n, v) in &fields {
                    if !is_connection_specific(n) {
                        self.enc.field(n, v, &mut self.block);
                    }
                }
            }
            Some(rule) => {
                let mut headers = HeaderMap::with_capacity(fields.len());
                for (n, v) in &fields {
                    if n.starts_with(b":") {
                        continue;
                    }
                    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v))
                    {
                        headers.append(n, v);
                    }
                }
                rule.apply_response_filters(&mut headers);
                strip_hop_by_hop(&mut headers, false);
                self.enc
                    .field(b":status", status.as_str().as_bytes(), &mut self.block);
                for (n, v) in &headers {
                    self.enc
                        .field(n.as_str().as_bytes(), v.as_bytes(), &mut self.block);
                }
            }
        }
        frame::headers(&mut self.cout, id, &self.block, end);
        if end {
            stream.response_done = true;
            self.upstreams[i].streams.remove(&up_id);
            if let Some(s) = self.streams.get_mut(&id) {
                s.upstream = None;
            }
            self.close_stream(id, CloseHow::Finished);
        }
        Ok(())
    }

    /// An upstream stream ended without a response end: reset by the upstream, refused,
    /// or its connection went away.
    fn upstream_stream_ended(&mut self, id: u32, code: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.upstream = None;
        if stream.responded {
            if stream.response_done {
                // The response ended; the reset only stops the request body.
                stream.upstream_done = true;
                stream.to_upstream.clear();
                return;
            }
            self.close_stream(
                id,
                CloseHow::ResetClient(if code == frame::NO_ERROR {
                    frame::INTERNAL_ERROR
                } else {
                    code
                }),
            );
            return;
        }
        if let Some(target) = stream.target.as_mut()
            && let Some(o) = target.outstanding.take()
        {
            o.finish(FAILURE_LATENCY_PENALTY);
            let endpoint = Endpoint {
                addr: target.endpoint,
                stats: target.endpoint_runtime.clone(),
            };
            target
                .runtime
                .record(&endpoint, EndpointOutcome::Http5xx, target.pool_size);
        }
        stream.upstream_done = true;
        self.answer(
            id,
            LocalAnswer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UR",
                &format!("upstream reset the stream (HTTP/2 error {code:#x})"),
            ),
        );
    }

    /// An upstream stream broke the protocol: it is reset, and the client stream ended.
    fn fail_upstream_stream(&mut self, i: usize, up_id: u32, reason: &str) {
        debug!(reason, "resetting an upstream HTTP/2 stream");
        let up = &mut self.upstreams[i];
        frame::rst_stream(&mut up.out, up_id, frame::PROTOCOL_ERROR);
        if let Some(id) = up.streams.remove(&up_id) {
            if let Some(s) = self.streams.get_mut(&id) {
                s.upstream_done = true;
            }
            self.upstream_stream_ended(id, frame::PROTOCOL_ERROR);
        }
    }

    /// Removes upstream connections that failed (their streams end) or that are closing
    /// with nothing left on them.
    fn drop_failed_upstreams(&mut self) {
        let mut i = 0;
        while i < self.upstreams.len() {
            let up = &self.upstreams[i];
            let done =
                up.failed.is_some() || (up.closing && up.streams.is_empty() && up.out.is_empty());
            if !done {
                i += 1;
                continue;
            }
            let up = self.upstreams.swap_remove(i);
            if let Some(reason) = &up.failed {
                debug!(endpoint = %up.endpoint, reason, "upstream HTTP/2 connection failed");
            }
            for (_, id) in up.streams {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.upstream = None;
                    s.upstream_done = true;
                }
                self.upstream_stream_ended(id, frame::INTERNAL_ERROR);
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Moving data within the windows.
    // ---------------------------------------------------------------------------------

    /// Sends what a stream has for upstream, as far as the windows allow, and credits the
    /// client for what went.
    fn pump_to_upstream(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let Some((conn, up_id)) = stream.upstream else {
            return;
        };
        let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn) else {
            return;
        };
        while let Some(piece) = stream.to_upstream.front_mut() {
            match piece {
                Piece::Data(bytes, end) => {
                    let end = *end;
                    let room = up
                        .send_window
                        .min(stream.upstream_send_window)
                        .min(up.peer.max_frame as i64);
                    if bytes.is_empty() {
                        if end {
                            frame::data(&mut up.out, up_id, &[], true);
                            stream.upstream_done = true;
                        }
                        stream.to_upstream.pop_front();
                        continue;
                    }
                    if room <= 0 {
                        break;
                    }
                    let n = (room as usize).min(bytes.len());
                    let chunk = bytes.split_to(n);
                    let last = bytes.is_empty();
                    frame::data(&mut up.out, up_id, &chunk, end && last);
                    up.send_window -= n as i64;
                    stream.upstream_send_window -= n as i64;
                    stream.credit += n as i64;
                    self.credit += n as i64;
                    if last {
                        if end {
                            stream.upstream_done = true;
                        }
                        stream.to_upstream.pop_front();
                    }
                }
                Piece::Trailers(fields) => {
                    up.enc.begin(&mut self.block);
                    for (n, v) in fields.iter() {
                        if !is_connection_specific(n) {
                            up.enc.field(n, v, &mut self.block);
                        }
                    }
                    frame::headers(&mut up.out, up_id, &self.block, true);
                    stream.upstream_done = true;
                    stream.to_upstream.pop_front();
                }
            }
        }
        self.send_client_credit(id);
    }

    /// Sends what a stream has for the client, as far as the windows allow, and credits
    /// the upstream for what went; closes the stream when its response is all out.
    fn pump_to_client(&mut self, id: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let mut forwarded = 0i64;
        let mut finished = false;
        while let Some(piece) = stream.to_client.front_mut() {
            match piece {
                Piece::Data(bytes, end) => {
                    let end = *end;
                    if bytes.is_empty() {
                        frame::data(&mut self.cout, id, &[], end);
                        stream.to_client.pop_front();
                        finished |= end;
                        continue;
                    }
                    let room = self
                        .send_window
                        .min(stream.client_send_window)
                        .min(self.peer.max_frame as i64);
                    if room <= 0 {
                        break;
                    }
                    let n = (room as usize).min(bytes.len());
                    let chunk = bytes.split_to(n);
                    let last = bytes.is_empty();
                    frame::data(&mut self.cout, id, &chunk, end && last);
                    self.send_window -= n as i64;
                    stream.client_send_window -= n as i64;
                    forwarded += n as i64;
                    if last {
                        stream.to_client.pop_front();
                        finished |= end;
                    }
                }
                Piece::Trailers(fields) => {
                    self.enc.begin(&mut self.block);
                    for (n, v) in fields.iter() {
                        if !is_connection_specific(n) {
                            self.enc.field(n, v, &mut self.block);
                        }
                    }
                    frame::headers(&mut self.cout, id, &self.block, true);
                    stream.to_client.pop_front();
                    finished = true;
                }
            }
        }
        if forwarded > 0
            && let Some((conn, up_id)) = stream.upstream
            && let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn)
        {
            // The stream's window only while the upstream may still send on it.
            if !stream.response_done {
                stream.upstream_credit += forwarded;
                if stream.upstream_credit >= STREAM_WINDOW / 4 {
                    frame::window_update(&mut up.out, up_id, stream.upstream_credit as u32);
                    stream.upstream_recv_window += stream.upstream_credit;
                    stream.upstream_credit = 0;
                }
            }
            up.credit += forwarded;
            if up.credit >= CONN_WINDOW / 4 {
                frame::window_update(&mut up.out, 0, up.credit as u32);
                up.recv_window += up.credit;
                up.credit = 0;
            }
        }
        if finished {
            self.close_stream(id, CloseHow::Finished);
        }
    }

    /// Credits the client what was forwarded: the connection window once a quarter of
    /// it is used (each WINDOW_UPDATE is a frame to read), the stream's likewise.
    fn send_client_credit(&mut self, id: u32) {
        if self.credit >= CONN_WINDOW / 4 {
            frame::window_update(&mut self.cout, 0, self.credit as u32);
            self.recv_window += self.credit;
            self.credit = 0;
        }
        if let Some(s) = self.streams.get_mut(&id)
            && !s.client_done
            && s.credit >= STREAM_WINDOW / 4
        {
            frame::window_update(&mut self.cout, id, s.credit as u32);
            s.recv_window += s.credit;
            s.credit = 0;
        }
    }

    fn credit_client(&mut self, n: i64) {
        self.credit += n;
        if self.credit >= CONN_WINDOW / 4 {
            frame::window_update(&mut self.cout, 0, self.credit as u32);
            self.recv_window += self.credit;
            self.credit = 0;
        }
    }

    fn send_upstream_credit(&mut self, i: usize) {
        let up = &mut self.upstreams[i];
        if up.credit >= CONN_WINDOW / 4 {
            frame::window_update(&mut up.out, 0, up.credit as u32);
            up.recv_window += up.credit;
            up.credit = 0;
        }
    }

    // ---------------------------------------------------------------------------------
    // Ending streams.
    // ---------------------------------------------------------------------------------

    /// The agent answers a request itself: a head and a small body, within the client's
    /// window; the upstream stream, if any, is cancelled.
    fn answer(&mut self, id: u32, answer: LocalAnswer) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.responded {
            // A head went out already: all that is left is to end the stream.
            self.close_stream(id, CloseHow::ResetClient(frame::INTERNAL_ERROR));
            return;
        }
        stream.log.status = answer.status;
        stream.log.flags = answer.flags;
        stream.responded = true;
        stream.to_upstream.clear();
        stream.head = None;
        if stream.deadline.take().is_some() {
            self.timed = self.timed.saturating_sub(1);
            self.timer_at = None;
        }
        if let Phase::Delayed(_) = stream.phase {
            self.timed = self.timed.saturating_sub(1);
            self.timer_at = None;
        }
        stream.phase = Phase::Closed;
        if let Some((conn, up_id)) = stream.upstream.take()
            && let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn)
            && (up.streams.remove(&up_id).is_some() || !stream.upstream_done)
        {
            frame::rst_stream(&mut up.out, up_id, frame::CANCEL);
        }
        stream.upstream_done = true;
        self.enc.begin(&mut self.block);
        self.enc.field(
            b":status",
            answer.status.as_str().as_bytes(),
            &mut self.block,
        );
        for (n, v) in &answer.headers {
            self.enc
                .field(n.as_str().as_bytes(), v.as_bytes(), &mut self.block);
        }
        let length = answer.body.len().to_string();
        self.enc
            .field(b"content-length", length.as_bytes(), &mut self.block);
        let bodiless = answer.body.is_empty();
        frame::headers(&mut self.cout, id, &self.block, bodiless);
        stream.response_done = true;
        stream.log.response_bytes = answer.body.len() as u64;
        if bodiless {
            self.close_stream(id, CloseHow::Finished);
        } else {
            stream
                .to_client
                .push_back(Piece::Data(Bytes::from(answer.body), true));
            self.pump_to_client(id);
        }
    }

    /// Removes a stream: its response went out whole, or it was reset.
    fn close_stream(&mut self, id: u32, how: CloseHow) {
        let Some(mut stream) = self.streams.remove(&id) else {
            return;
        };
        let timers = usize::from(stream.deadline.is_some())
            + usize::from(matches!(stream.phase, Phase::Delayed(_)));
        if timers > 0 {
            self.timed = self.timed.saturating_sub(timers);
            self.timer_at = None;
        }
        // The upstream stream, if still open, is cancelled.
        if let Some((conn, up_id)) = stream.upstream.take()
            && let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn)
        {
            if !stream.upstream_done || up.streams.contains_key(&up_id) {
                frame::rst_stream(&mut up.out, up_id, frame::CANCEL);
            }
            up.streams.remove(&up_id);
            // Response data not passed on was never credited to the upstream connection.
            let held: i64 = stream
                .to_client
                .iter()
                .map(|p| match p {
                    Piece::Data(b, _) => b.len() as i64,
                    Piece::Trailers(_) => 0,
                })
                .sum();
            up.credit += held;
            if up.credit >= CONN_WINDOW / 4 {
                frame::window_update(&mut up.out, 0, up.credit as u32);
                up.recv_window += up.credit;
                up.credit = 0;
            }
        }
        match how {
            CloseHow::Finished => {
                // The client may still be sending a body nobody will read.
                if !stream.client_done {
                    frame::rst_stream(&mut self.cout, id, frame::NO_ERROR);
                }
            }
            CloseHow::ResetClient(code) => frame::rst_stream(&mut self.cout, id, code),
            CloseHow::ClientReset => {}
        }
        // What the stream held from the client no longer counts against the connection.
        let held: i64 = stream
            .to_upstream
            .iter()
            .map(|p| match p {
                Piece::Data(b, _) => b.len() as i64,
                Piece::Trailers(_) => 0,
            })
            .sum();
        self.credit_client(held);
        if let Some(target) = stream.target.as_mut()
            && let Some(o) = target.outstanding.take()
        {
            // Cancelled before an answer: no outcome to record.
            drop(o);
        }
        if stream.responded && !matches!(how, CloseHow::ClientReset) {
            self.log(&stream, matches!(how, CloseHow::Finished));
        }
    }

    fn log(&self, stream: &Stream, complete: bool) {
        let l = &stream.log;
        let access = AccessLog {
            request_id: &l.request_id,
            method: l.method.as_str(),
            path: &l.path,
            authority: &l.authority,
            route: l.route.clone(),
            backend: l.backend.clone(),
            upstream: l.upstream,
            attempts: u32::from(stream.target.is_some() && l.flags == "-"),
            protocol: l.protocol,
            request_bytes: l.request_bytes,
        };
        let flags = if complete { l.flags } else { "UR" };
        log_request(
            self.d,
            &access,
            l.status,
            flags,
            l.started,
            l.response_bytes,
        );
    }

    /// Refuses new streams from here on: a GOAWAY naming the last stream taken.
    fn send_goaway(&mut self) {
        if !self.goaway_sent {
            frame::goaway(&mut self.cout, self.last_client_stream, frame::NO_ERROR);
            self.goaway_sent = true;
        }
    }

    /// Takes one reset from the client's allowance; past it, the connection is closed.
    fn charge_reset(&mut self) -> Result<(), ConnError> {
        let now = Instant::now();
        let refill = now.duration_since(self.reset_refilled).as_secs_f64() * RESET_RATE;
        self.reset_tokens = (self.reset_tokens + refill).min(RESET_BURST);
        self.reset_refilled = now;
        if self.reset_tokens < 1.0 {
            return Err(ConnError::new(
                frame::ENHANCE_YOUR_CALM,
                "too many stream resets",
            ));
        }
        self.reset_tokens -= 1.0;
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Timers: fault delays and the route's timeouts.
    // ---------------------------------------------------------------------------------

    /// Handles the delays and deadlines that are due; true when one was.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> bool {
        if self.timed == 0 {
            return false;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for (&id, s) in &self.streams {
            for at in [
                s.deadline,
                if let Phase::Delayed(at) = s.phase {
                    Some(at)
                } else {
                    None
                },
            ]
            .into_iter()
            .flatten()
            {
                if at <= now {
                    due.push(id);
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        let fired = !due.is_empty();
        for id in due {
            let Some(stream) = self.streams.get_mut(&id) else {
                continue;
            };
            if let Phase::Delayed(at) = stream.phase
                && at <= now
            {
                stream.phase = Phase::Queued;
                self.timed = self.timed.saturating_sub(1);
                if let Some(status) = stream.abort_after_delay {
                    self.answer(id, LocalAnswer::new(status, "FI", "fault injected"));
                    continue;
                }
                self.queued.push_back(id);
            }
            if stream.deadline.is_some_and(|dl| dl <= now) && !stream.responded {
                let message = stream.timeout_message;
                if let Some(target) = stream.target.as_mut() {
                    drop(target.outstanding.take());
                }
                self.answer(
                    id,
                    LocalAnswer::new(StatusCode::GATEWAY_TIMEOUT, "UT", message),
                );
            }
        }
        if let Some(next) = next {
            if self.timer_at != Some(next) {
                self.timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(next));
                self.timer_at = Some(next);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                return true;
            }
        }
        fired
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

impl Stream {
    fn new(log: StreamLog, end: bool, declared_length: Option<u64>, send_window: i64) -> Self {
        Self {
            client_done: end,
            recv_window: STREAM_WINDOW,
            credit: 0,
            declared_length,
            received: 0,
            to_upstream: if end {
                VecDeque::from([Piece::Data(Bytes::new(), true)])
            } else {
                VecDeque::new()
            },
            head: None,
            phase: Phase::Queued,
            upstream: None,
            upstream_send_window: 0,
            upstream_recv_window: 0,
            upstream_credit: 0,
            upstream_done: false,
            responded: false,
            to_client: VecDeque::new(),
            client_send_window: send_window,
            response_done: false,
            target: None,
            deadline: None,
            timeout_message: "upstream request timeout",
            abort_after_delay: None,
            log,
        }
    }
}

impl StreamLog {
    fn unparsed(started: Instant) -> Self {
        Self {
            started,
            request_id: String::new(),
            method: Method::GET,
            path: String::new(),
            authority: String::new(),
            route: None,
            backend: None,
            upstream: None,
            protocol: "http",
            request_bytes: 0,
            status: StatusCode::OK,
            flags: "-",
            response_bytes: 0,
        }
    }
}

/// A request head from its decoded fields, checked as RFC 9113 §8.3 asks: pseudo-headers
/// first, each once, the required ones present, names lowercase, no connection-specific
/// fields, `te` only `trailers`.
fn request_parts(fields: Vec<Field>) -> Result<http::request::Parts, &'static str> {
    let (mut method, mut scheme, mut authority, mut path) = (None, None, None, None);
    let mut headers = HeaderMap::with_capacity(fields.len());
    let mut regular = false;
    for (name, value) in fields {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular {
                return Err("pseudo-header after a regular field");
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                _ => return Err("unknown pseudo-header"),
            };
            if slot.replace(value).is_some() {
                return Err("repeated pseudo-header");
            }
            continue;
        }
        regular = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            return Err("uppercase field name");
        }
        if is_connection_specific(&name) {
            return Err("connection-specific field");
        }
        if name == b"te" && !value.eq_ignore_ascii_case(b"trailers") {
            return Err("te other than trailers");
        }
        let name = HeaderName::from_bytes(&name).map_err(|_| "invalid field name")?;
        let value = HeaderValue::from_maybe_shared(Bytes::from(value))
            .map_err(|_| "invalid field value")?;
        headers.append(name, value);
    }
    let method = Method::from_bytes(method.as_deref().ok_or("no :method")?)
        .map_err(|_| "invalid :method")?;
    if method == Method::CONNECT {
        let mut parts = http::Request::new(()).into_parts().0;
        parts.method = method;
        parts.headers = headers;
        parts.version = http::Version::HTTP_2;
        return Ok(parts);
    }
    let scheme = scheme.ok_or("no :scheme")?;
    let path = path.filter(|p| !p.is_empty()).ok_or("no :path")?;
    let authority = match authority {
        Some(a) => a,
        None => headers
            .get(header::HOST)
            .map(|h| h.as_bytes().to_vec())
            .unwrap_or_default(),
    };
    let mut uri = Vec::with_capacity(scheme.len() + 3 + authority.len() + path.len());
    uri.extend_from_slice(&scheme);
    uri.extend_from_slice(b"://");
    uri.extend_from_slice(&authority);
    uri.extend_from_slice(&path);
    let uri = if authority.is_empty() {
        Uri::from_maybe_shared(Bytes::from(path)).map_err(|_| "invalid :path")?
    } else {
        Uri::from_maybe_shared(Bytes::from(uri)).map_err(|_| "invalid :authority or :path")?
    };
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.headers = headers;
    parts.version = http::Version::HTTP_2;
    Ok(parts)
}

/// Fields HTTP/2 forbids (RFC 9113 §8.2.2).
fn is_connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    )
}

fn check_rst(f: &Frame) -> Result<(), ConnError> {
    if f.stream == 0 {
        return Err(ConnError::new(
            frame::PROTOCOL_ERROR,
            "RST_STREAM on stream 0",
        ));
    }
    if f.payload.len() != 4 {
        return Err(ConnError::new(
            frame::FRAME_SIZE_ERROR,
            "RST_STREAM not 4 bytes",
        ));
    }
    Ok(())
}

fn check_ping(f: &Frame) -> Result<(), ConnError> {
    if f.stream != 0 {
        return Err(ConnError::new(frame::PROTOCOL_ERROR, "PING on a stream"));
    }
    if f.payload.len() != 8 {
        return Err(ConnError::new(frame::FRAME_SIZE_ERROR, "PING not 8 bytes"));
    }
    Ok(())
}

fn window_increment(f: &Frame) -> Result<i64, ConnError> {
    if f.payload.len() != 4 {
        return Err(ConnError::new(
            frame::FRAME_SIZE_ERROR,
            "WINDOW_UPDATE not 4 bytes",
        ));
    }
    let raw = u32::from_be_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
    Ok(i64::from(raw & 0x7fff_ffff))
}

/// An answer the agent gives itself, flagged like Envoy's response flags, or a redirect.
struct LocalAnswer {
    status: StatusCode,
    flags: &'static str,
    headers: HeaderMap,
    body: String,
}

impl LocalAnswer {
    fn new(status: StatusCode, flags: &'static str, message: &str) -> Self {
        let mut headers = HeaderMap::with_capacity(2);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(RESPONSE_FLAGS_HEADER, HeaderValue::from_static(flags));
        Self {
            status,
            flags,
            headers,
            body: format!("{message}\n"),
        }
    }

    fn redirect(redirect: http::Response<()>) -> Self {
        let (parts, ()) = redirect.into_parts();
        Self {
            status: parts.status,
            flags: "-",
            headers: parts.headers,
            body: String::new(),
        }
    }
}

/// 503 `UO`: a cap of the destination's circuit breaker was reached.
fn overflow_answer(overflow: &Overflow) -> LocalAnswer {
    LocalAnswer::new(
        overflow.status(),
        overflow.response_flag(),
        &format!("{overflow} (circuit breaker open)"),
    )
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
        let parts = super::request_parts(fields)?;
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
