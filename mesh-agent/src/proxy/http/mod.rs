//! The L7 proxy for Service traffic: HTTP/1.1, h2c and gRPC from an enrolled pod to a
//! Service VIP port that is declared (or sniffed) HTTP.
//!
//! A request's life, in order: request id and trace context → route (Gateway API HTTPRoute
//! with the Service as parent) → redirect / filters → fault injection → backend service
//! (weighted) → endpoint (power of two choices over least outstanding requests, ejected
//! endpoints skipped) → circuit breaker → rate limit → authorization for endpoints this
//! agent delivers to itself → upstream attempt with per-try timeout → retries (status or
//! connect failure, budgeted, exponential backoff with jitter) → response filters → one
//! access log line.
//!
//! HTTP/1.1 connections start on the fast path (`fast_path`), which forwards plain requests
//! with the same steps minus the ones that need a whole request, and hands the connection
//! to the hyper path below for anything more.
pub mod client;
pub mod detect;
pub mod fast_path;
pub mod h2_fast_path;
pub mod inbound;
pub mod runtime;
pub mod trace;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tracing::{debug, info};

use self::client::{Body, BoxError, PodClients};
use super::coalesce::CoalescingIo;
use super::{PodContext, ProxyInputs};
use crate::metrics::{Http2Path, Layer, Reporter, RequestHandles, RequestLabels};
use crate::{
    policy::{self, ConnectionAttrs, RequestAttrs},
    resilience::{Backoff, Overflow},
    route::RouteDecision,
    service::{AppProtocol, Service, ServicePort},
    state::Mesh,
};

/// Largest request body buffered so that the request can be retried; bigger (or streaming)
/// bodies are sent once.
const MAX_RETRY_BODY: usize = 64 * 1024;
/// How long a client may take to send a request head (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/1 request head; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The latency a failed attempt is recorded with for load balancing.
const FAILURE_LATENCY_PENALTY: Duration = Duration::from_secs(1);
/// Header carrying Envoy-style response flags on responses the agent generated or shaped.
pub const RESPONSE_FLAGS_HEADER: &str = "x-trellis-response-flags";

/// What one proxied connection's requests share.
struct Downstream {
    inputs: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    clients: Arc<PodClients>,
    service: Service,
    port: ServicePort,
    client_addr: SocketAddr,
    /// `ns/name:port` of the service, for access logs (built once per connection).
    service_label: String,
    /// The source pod's `ns/name` and SPIFFE identity as the access log writes them: built
    /// once per connection instead of formatted again for every request.
    src_pod_label: String,
    src_identity_label: String,
    /// Metric label sets this connection's requests used, by what varies between them: a
    /// request usually reuses one instead of building a dozen strings.
    label_cache: std::sync::Mutex<Vec<(LabelKey, Arc<ReportedLabels>)>>,
}

/// What distinguishes the metric labels of two requests on one downstream connection.
#[derive(Clone, PartialEq, Eq)]
struct LabelKey {
    upstream: Option<SocketAddr>,
    backend: Option<Arc<str>>,
    protocol: &'static str,
    status: u16,
    flags: &'static str,
}

/// A request's labels as the source reporter, and as the destination reporter when this
/// agent delivered it to a pod of its own node.
struct ReportedLabels {
    source: RequestHandles,
    destination: Option<RequestHandles>,
}

/// Label sets kept per downstream connection; more distinct ones are built each time.
const LABEL_CACHE_SIZE: usize = 8;

/// Serves HTTP on a captured connection to `service:port` until the client closes it.
pub async fn serve_outbound(
    client: TcpStream,
    pod: Arc<PodContext>,
    inputs: Arc<ProxyInputs>,
    service: Service,
    port: ServicePort,
    protocol: AppProtocol,
    _original_dst: SocketAddr,
) {
    let client_addr = SocketAddr::new(
        pod.workload.ip,
        client.peer_addr().map(|a| a.port()).unwrap_or(0),
    );
    let clients = pod.http_clients(&inputs);
    let service_label = format!("{}/{}:{}", service.namespace, service.name, port.port);
    let src_pod_label = pod.workload.key.to_string();
    let src_identity_label = pod.workload.identity.to_string();
    let downstream = Arc::new(Downstream {
        inputs,
        pod,
        clients,
        service,
        port,
        client_addr,
        service_label,
        src_pod_label,
        src_identity_label,
        label_cache: Default::default(),
    });
    // HTTP/1.1 takes the fast path until a request needs more (see `fast_path`); h2c the
    // HTTP/2 fast path when the port's routes need nothing it lacks (see `h2_fast_path`).
    let h2_fast_path = matches!(protocol, AppProtocol::Http2 | AppProtocol::Grpc)
        && downstream.inputs.h2_fast_path
        && h2_fast_path::serves(&downstream.inputs.routes.load(), &downstream);
    let client = if protocol == AppProtocol::Http && downstream.inputs.http1_fast_path {
        match fast_path::serve(client, &downstream).await {
            Some(handover) => fast_path::Rewind::new(handover.buffered, handover.client),
            None => return,
        }
    } else if h2_fast_path {
        match h2_fast_path::serve(client, &downstream).await {
            Some(handover) => {
                downstream.inputs.metrics.http2_connection(Http2Path::Hyper);
                fast_path::Rewind::new(handover.buffered, handover.client)
            }
            None => return,
        }
    } else {
        if matches!(protocol, AppProtocol::Http2 | AppProtocol::Grpc) {
            downstream.inputs.metrics.http2_connection(Http2Path::Hyper);
        }
        fast_path::Rewind::new(Bytes::new(), client)
    };
    serve_with_hyper(client, downstream).await;
}

/// Serves the connection's requests with hyper (HTTP/1.1 with upgrades, or h2c).
async fn serve_with_hyper(client: fast_path::Rewind, downstream: Arc<Downstream>) {
    let inputs = downstream.inputs.clone();
    let saw_h2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let saw_h2 = saw_h2.clone();
        move |req| {
            let downstream = downstream.clone();
            let saw_h2 = saw_h2.clone();
            async move {
                let version = req.version();
                // Boxed: the request's state machine is a few KiB, and hyper moves the
                // service future into a spawned task per HTTP/2 stream; a box moves as a
                // pointer.
                let mut response = Box::pin(handle(req, downstream.clone())).await;
                close_if_draining(&downstream.inputs, version, &saw_h2, &mut response);
                Ok::<_, Infallible>(response)
            }
        }
    });
    let builder = server_builder();
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(CoalescingIo::new(client)), service);
    // Draining: GOAWAY on HTTP/2; HTTP/1 closes after its next response (see close_if_draining).
    let result = inputs
        .drain
        .run(conn, |conn| {
            if saw_h2.load(std::sync::atomic::Ordering::Relaxed) {
                conn.graceful_shutdown();
            }
        })
        .await;
    if let Err(e) = result {
        debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}

/// While draining, an HTTP/1 response closes its connection (see [`crate::drain`]); notes
/// HTTP/2 connections, which get a GOAWAY instead. (Closing an idle HTTP/1 connection would
/// race the client's next request.)
pub(crate) fn close_if_draining<B>(
    inputs: &ProxyInputs,
    version: http::Version,
    saw_h2: &std::sync::atomic::AtomicBool,
    response: &mut Response<B>,
) {
    if version == http::Version::HTTP_2 {
        saw_h2.store(true, std::sync::atomic::Ordering::Relaxed);
    } else if inputs.drain.is_draining() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
}

/// The HTTP/1.1 + h2c server side every L7 listener uses: a header read deadline against
/// slowloris clients and bounded header sizes.
pub(crate) fn server_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// An answer the agent gives itself on a fast path (HTTP/1.1 or HTTP/2), written by each in
/// its own framing: flagged like Envoy's response flags, or a redirect.
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

    /// 503 `UO`: a cap of the destination's circuit breaker was reached.
    fn overflow(overflow: &Overflow) -> Self {
        Self::new(
            overflow.status(),
            overflow.response_flag(),
            &format!("{overflow} (circuit breaker open)"),
        )
    }
}

/// A cap of the destination's circuit breaker was reached.
fn upstream_overflow(overflow: &Overflow) -> (StatusCode, &'static str, Response<Body>) {
    let (status, flag) = (overflow.status(), overflow.response_flag());
    let message = format!("{overflow} (circuit breaker open)");
    (status, flag, local_response(status, flag, &message))
}

/// A response the agent generates itself, flagged like Envoy's response flags.
fn local_response(status: StatusCode, flags: &str, message: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(flags) {
        response.headers_mut().insert(RESPONSE_FLAGS_HEADER, v);
    }
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

// Constant names: a `&str` name is parsed again on every lookup.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop (`Connection` may name more).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::TRAILER,
    header::UPGRADE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names instead of a lookup each.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in listed {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name.as_str());
    }
    for name in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRANSFER_ENCODING,
        header::TRAILER,
    ] {
        headers.remove(name);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows, and gRPC needs it end to end.
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

struct AccessLog<'a> {
    request_id: &'a str,
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    /// The matched rule's label.
    route: Option<Arc<str>>,
    /// The backend service, `name.ns.svc.cluster.local`.
    backend: Option<Arc<str>>,
    upstream: Option<SocketAddr>,
    attempts: u32,
    protocol: &'static str,
    request_bytes: u64,
}

fn log_request(
    d: &Downstream,
    log: &AccessLog<'_>,
    status: StatusCode,
    flags: &'static str,
    started: Instant,
    response_bytes: u64,
) {
    if !d.inputs.telemetry {
        return;
    }
    let duration = started.elapsed();
    record_request(d, log, status, flags, duration, response_bytes);
    info!(
        target: "access",
        direction = "outbound",
        request_id = log.request_id,
        method = log.method,
        path = log.path,
        authority = log.authority,
        status = status.as_u16(),
        response_flags = flags,
        src.pod = d.src_pod_label.as_str(),
        src.identity = d.src_identity_label.as_str(),
        dst.service = d.service_label.as_str(),
        route = log.route.as_deref().unwrap_or(""),
        backend = log.backend.as_deref().unwrap_or(""),
        upstream = %OptionalAddr(log.upstream),
        attempts = log.attempts,
        duration_ms = duration.as_millis() as u64,
        "http request"
    );
}

/// An address, or nothing, written without allocating.
struct OptionalAddr(Option<SocketAddr>);

impl std::fmt::Display for OptionalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => Ok(()),
        }
    }
}

/// Istio's request metrics for one outbound request: as the source, and also as the
/// destination when this agent delivered it to a pod of its own node.
fn record_request(
    d: &Downstream,
    log: &AccessLog<'_>,
    status: StatusCode,
    flags: &'static str,
    duration: Duration,
    response_bytes: u64,
) {
    let status = status.as_u16();
    let matches = |k: &LabelKey| {
        k.upstream == log.upstream
            && k.backend == log.backend
            && k.protocol == log.protocol
            && k.status == status
            && k.flags == flags
    };
    let cached = {
        let cache = d.label_cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .iter()
            .find(|(k, _)| matches(k))
            .map(|(_, l)| l.clone())
    };
    let labels = match cached {
        Some(labels) => labels,
        None => {
            let labels = Arc::new(build_request_labels(d, log, status, flags));
            let mut cache = d.label_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() < LABEL_CACHE_SIZE {
                let key = LabelKey {
                    upstream: log.upstream,
                    backend: log.backend.clone(),
                    protocol: log.protocol,
                    status,
                    flags,
                };
                cache.push((key, labels.clone()));
            }
            labels
        }
    };
    labels
        .source
        .record(duration, log.request_bytes, response_bytes);
    if let Some(destination) = &labels.destination {
        destination.record(duration, log.request_bytes, response_bytes);
    }
}

/// Istio's request labels (source reporter) and whether this agent delivered the request
/// to a pod of its own node.
fn build_request_labels(
    d: &Downstream,
    log: &AccessLog<'_>,
    status: u16,
    flags: &str,
) -> ReportedLabels {
    let mesh = d.inputs.mesh.load();
    let dst = log.upstream.and_then(|a| mesh.pod_by_ip(a.ip()));
    let secure = dst.is_some_and(|w| w.enrolled && !w.is_on(&mesh.node));
    let delivered_here = dst.is_some_and(|w| w.enrolled && w.is_on(&mesh.node));
    let unknown = || "unknown".to_string();
    let labels = RequestLabels {
        reporter: Reporter::Source,
        source_workload: super::workload_name(&d.pod.workload),
        source_workload_namespace: d.pod.workload.key.namespace.clone(),
        source_principal: d.pod.workload.identity.to_string(),
        destination_workload: dst.map(super::workload_name).unwrap_or_else(unknown),
        destination_workload_namespace: dst
            .map(|w| w.key.namespace.clone())
            .unwrap_or_else(unknown),
        destination_principal: dst
            .filter(|w| w.enrolled)
            .map(|w| w.identity.to_string())
            .unwrap_or_else(unknown),
        destination_service: log.backend.as_deref().map_or_else(unknown, str::to_string),
        request_protocol: log.protocol.to_string(),
        response_code: status.to_string(),
        response_flags: flags.to_string(),
        connection_security_policy: if secure { "mutual_tls" } else { "none" }.to_string(),
    };
    let metrics = &d.inputs.metrics;
    let destination = delivered_here.then(|| {
        metrics.request_handles(&RequestLabels {
            reporter: Reporter::Destination,
            ..labels.clone()
        })
    });
    ReportedLabels {
        source: metrics.request_handles(&labels),
        destination,
    }
}

/// A body size the headers declare (0 when unknown or streamed).
fn declared_length(headers: &HeaderMap) -> u64 {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn handle(mut req: Request<Incoming>, d: Arc<Downstream>) -> Response<Body> {
    let started = Instant::now();
    // Request smuggling shapes never reach this point: hyper refuses differing
    // Content-Lengths and a Transfer-Encoding not ending in chunked (400), and for
    // Content-Length with Transfer-Encoding it drops the length and closes the connection
    // after the response (RFC 9112 §6.3), so nothing hidden in the body is served.
    let mut rng = fastrand::Rng::new();
    let request_id = trace::ensure(req.headers_mut(), &mut rng);
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let mut log = AccessLog {
        request_id: &request_id,
        method: &method,
        path: &path,
        authority: &authority,
        route: None,
        backend: None,
        upstream: None,
        attempts: 0,
        protocol: if is_grpc { "grpc" } else { "http" },
        request_bytes: declared_length(req.headers()),
    };
    let (status, flags, response) = route_and_forward(req, &d, &mut log, &mut rng, started).await;
    log_request(
        &d,
        &log,
        status,
        flags,
        started,
        declared_length(response.headers()),
    );
    response
}

/// Routes a request and forwards it; returns the status and response flags for the log.
async fn route_and_forward(
    req: Request<Incoming>,
    d: &Downstream,
    log: &mut AccessLog<'_>,
    rng: &mut fastrand::Rng,
    started: Instant,
) -> (StatusCode, &'static str, Response<Body>) {
    let inputs = &d.inputs;
    let routes = inputs.routes.load();
    let services = inputs.services.load();
    let mesh = inputs.mesh.load();
    let is_upgrade =
        req.headers().contains_key(header::UPGRADE) && req.version() == Version::HTTP_11;
    let (mut parts, body) = req.into_parts();
    let downstream_upgrade = if is_upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };

    let decision = routes.select(&d.service.namespace, &d.service.name, d.port.port, &parts);
    let rule = match decision {
        RouteDecision::NoRoutes => None,
        RouteDecision::NoMatch => {
            return (
                StatusCode::NOT_FOUND,
                "NR",
                local_response(StatusCode::NOT_FOUND, "NR", "no route matched"),
            );
        }
        RouteDecision::Matched(rule, matched) => {
            log.route = Some(rule.label.clone());
            if let Some(redirect) = rule.redirect(&parts, &matched, d.port.port) {
                let (rparts, ()) = redirect.into_parts();
                let status = rparts.status;
                return (status, "-", Response::from_parts(rparts, empty()));
            }
            rule.apply_request_filters(&mut parts, &matched);
            Some(rule)
        }
    };

    // Fault injection.
    if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
        let decision = fault.sample(rng);
        if let Some(delay) = decision.delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = decision.abort {
            return (status, "FI", local_response(status, "FI", "fault injected"));
        }
    }

    // Backend service.
    let (backend, backend_port) = match rule {
        Some(rule) => match rule.pick_backend(rng) {
            Some(b) => match services.by_name(&b.namespace, &b.name) {
                Some(svc) => match svc.port(b.port) {
                    Some(p) => (svc, p),
                    None => {
                        return (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "NR",
                            local_response(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "NR",
                                "backend port missing",
                            ),
                        );
                    }
                },
                None => {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "NR",
                        local_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "NR",
                            "backend service missing",
                        ),
                    );
                }
            },
            // Every backend has weight 0: Gateway API says 500.
            None => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "NR",
                    local_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "NR",
                        "no backend with weight",
                    ),
                );
            }
        },
        None => (&d.service, &d.port),
    };
    let runtime = inputs.l7.service(backend);
    log.backend = Some(runtime.host.clone());
    let endpoints = services.endpoints(backend);
    if endpoints.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            local_response(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
        );
    }
    let _request_permit = match runtime.circuit.try_request() {
        Ok(p) => p,
        Err(overflow) => return upstream_overflow(&overflow),
    };

    // The body: buffered when small enough to be retried, streamed otherwise.
    let retry = rule.and_then(|r| r.retry.as_ref());
    let replayable = retry.is_some() && body_fits(&parts.headers, &parts);
    let (buffered, mut streaming_body): (Option<Bytes>, Option<Body>) = if replayable {
        match http_body_util::Limited::new(body, MAX_RETRY_BODY)
            .collect()
            .await
        {
            Ok(collected) => (Some(collected.to_bytes()), None),
            Err(_) => {
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "-",
                    local_response(StatusCode::PAYLOAD_TOO_LARGE, "-", "request body too large"),
                );
            }
        }
    } else {
        (
            None,
            Some(body.map_err(|e| Box::new(e) as BoxError).boxed()),
        )
    };

    let plan = RetryPlan::new(rule, started, replayable);
    runtime.budget.deposit(Instant::now());
    let upstream_http2 = matches!(
        backend_port.protocol,
        AppProtocol::Http2 | AppProtocol::Grpc
    ) || (backend_port.protocol != AppProtocol::Http
        && parts.version == Version::HTTP_2);
    strip_hop_by_hop(&mut parts.headers, is_upgrade);

    // Set by every attempt that does not answer (built only then: not per request).
    let mut last_failure: Option<(StatusCode, &'static str, String)> = None;
    for attempt in 0..plan.max_attempts {
        log.attempts = attempt + 1;
        let Some(endpoint) = runtime.pick(endpoints, backend_port.target_port, rng) else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                local_response(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
            );
        };
        log.upstream = Some(endpoint.addr);
        if attempt == 0 && rule.is_some_and(|r| rate_limited(inputs, r, endpoint.addr)) {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "RL",
                local_response(StatusCode::TOO_MANY_REQUESTS, "RL", "local rate limit"),
            );
        }
        if denied_here(&mesh, d, endpoint.addr, &parts) {
            return (
                StatusCode::FORBIDDEN,
                "RBAC",
                local_response(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied"),
            );
        }

        let body = match (&buffered, streaming_body.take()) {
            (Some(bytes), _) => full(bytes.clone()),
            (None, Some(body)) => body,
            // A streamed body goes once: its plan has one attempt, so this is not reached.
            (None, None) => break,
        };
        // The last attempt takes the request head; earlier ones copy it for the next.
        let attempt_parts = if attempt + 1 == plan.max_attempts {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        } else {
            parts.clone()
        };
        let uri = endpoint
            .stats
            .authority
            .as_ref()
            .and_then(|authority| upstream_uri(&attempt_parts.uri, authority));
        let mut upstream_req = Request::from_parts(attempt_parts, body);
        match uri {
            Some(uri) => *upstream_req.uri_mut() = uri,
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    "-",
                    local_response(StatusCode::BAD_REQUEST, "-", "bad request target"),
                );
            }
        }
        *upstream_req.version_mut() = if upstream_http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        if upstream_http2 {
            upstream_req.headers_mut().remove(header::HOST);
        }
        let client = if upstream_http2 {
            &d.clients.http2
        } else {
            &d.clients.http1
        };

        let outstanding = endpoint.stats.stats.start();
        let attempt_started = Instant::now();
        let sent = client::DESTINATION.scope(runtime.clone(), client.request(upstream_req));
        let result = match plan.attempt_timeout() {
            Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| TimedOut),
            None => Ok(sent.await),
        };
        let (outcome, again) = match result {
            Ok(Ok(mut response)) => {
                let status = response.status();
                record_answer(
                    &runtime,
                    &endpoint,
                    outstanding,
                    attempt_started,
                    status,
                    endpoints.len(),
                );
                if !plan.retry_after(attempt, plan.retries_status(status), &runtime.budget) {
                    if let Some(rule) = rule {
                        rule.apply_response_filters(response.headers_mut());
                    }
                    strip_hop_by_hop(
                        response.headers_mut(),
                        is_upgrade && status == StatusCode::SWITCHING_PROTOCOLS,
                    );
                    if let (Some(down), true) = (
                        downstream_upgrade,
                        status == StatusCode::SWITCHING_PROTOCOLS,
                    ) {
                        bridge_upgrade(down, &mut response);
                    }
                    let (rp, rb) = response.into_parts();
                    return (
                        status,
                        "-",
                        Response::from_parts(rp, rb.map_err(|e| Box::new(e) as BoxError).boxed()),
                    );
                }
                ((status, "URX", format!("upstream answered {status}")), true)
            }
            Ok(Err(e)) if is_request_body_error(&e) => {
                drop(outstanding);
                let mut response =
                    local_response(StatusCode::BAD_REQUEST, "DPE", "malformed request body");
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return (StatusCode::BAD_REQUEST, "DPE", response);
            }
            Ok(Err(e)) => {
                // A connection cap of the destination's circuit breaker, not a failing
                // endpoint.
                if let Some(overflow) = client::overflow_in(&e) {
                    drop(outstanding);
                    return upstream_overflow(overflow);
                }
                outstanding.finish(FAILURE_LATENCY_PENALTY);
                let connect_failure = e.is_connect();
                runtime.record(
                    &endpoint,
                    if connect_failure {
                        EndpointOutcome::ConnectFailure
                    } else {
                        EndpointOutcome::Http5xx
                    },
                    endpoints.len(),
                );
                // A reset before any response is retried like a connect failure.
                let again =
                    plan.retry_after(attempt, plan.retries_connect_failure(), &runtime.budget);
                let detail = format!("upstream error: {e}");
                (
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        if connect_failure { "UF" } else { "UR" },
                        detail,
                    ),
                    again,
                )
            }
            Err(TimedOut) => {
                drop(outstanding);
                if plan.expired() {
                    return (
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        local_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "UT",
                            "upstream request timeout",
                        ),
                    );
                }
                (
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream per-try timeout".to_string(),
                    ),
                    plan.retry_after(attempt, plan.retries_timeout(), &runtime.budget),
                )
            }
        };
        last_failure = Some(outcome);
        if !again {
            break;
        }
        let Some(pause) = plan.pause(attempt, rng) else {
            return (
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                local_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                ),
            );
        };
        tokio::time::sleep(pause).await;
    }
    let (status, flags, detail) = last_failure.unwrap_or((
        StatusCode::SERVICE_UNAVAILABLE,
        "UF",
        String::from("upstream connect failure"),
    ));
    (status, flags, local_response(status, flags, &detail))
}

/// Whether the rule's local rate limit (per endpoint) refuses one more request now.
fn rate_limited(
    inputs: &ProxyInputs,
    rule: &crate::route::RouteRule,
    endpoint: SocketAddr,
) -> bool {
    rule.rate_limit.as_ref().is_some_and(|limit| {
        !inputs.l7.rate_limit(
            &rule.label,
            &endpoint,
            f64::from(limit.requests_per_second),
            limit.burst,
            Instant::now(),
        )
    })
}

/// Endpoints this agent delivers to itself are authorized here, per request: whether the
/// destination's policies deny this one (logged and counted).
fn denied_here(
    mesh: &Mesh,
    d: &Downstream,
    endpoint: SocketAddr,
    parts: &http::request::Parts,
) -> bool {
    mesh.pod_by_ip(endpoint.ip())
        .filter(|w| w.enrolled && w.is_on(&mesh.node))
        .is_some_and(|dst_pod| !authorize_request(mesh, d, dst_pod, endpoint.port(), parts))
}

/// A request's attempts: how many, how far apart, and within which deadline. Both the
/// hyper path and the fast path run their attempt loops by it, so that a retry is decided
/// (and paid for from the budget) in one place.
struct RetryPlan<'r> {
    retry: Option<&'r crate::route::Retry>,
    /// 1 unless the request can be sent again (its body is in memory).
    max_attempts: u32,
    backoff: Option<Backoff>,
    /// The route's request timeout, from the request's start.
    deadline: Option<Instant>,
    /// The per-try timeout (the retry's, else the route's backendRequest).
    per_try: Option<Duration>,
}

impl<'r> RetryPlan<'r> {
    fn new(rule: Option<&'r crate::route::RouteRule>, started: Instant, replayable: bool) -> Self {
        let retry = rule.and_then(|r| r.retry.as_ref());
        Self {
            retry,
            max_attempts: match retry {
                Some(retry) if replayable => 1 + retry.attempts,
                _ => 1,
            },
            backoff: retry.map(|r| Backoff::new(r.backoff, r.backoff.saturating_mul(10))),
            deadline: rule.and_then(|r| r.timeouts.request).map(|t| started + t),
            per_try: retry
                .and_then(|r| r.per_try_timeout)
                .or_else(|| rule.and_then(|r| r.timeouts.backend_request)),
        }
    }

    /// How long one attempt may wait for its response head: the per-try timeout, cut to
    /// what is left of the whole request's deadline.
    fn attempt_timeout(&self) -> Option<Duration> {
        let left = self
            .deadline
            .map(|dl| dl.saturating_duration_since(Instant::now()));
        match (self.per_try, left) {
            (Some(t), Some(left)) => Some(t.min(left)),
            (t, left) => t.or(left),
        }
    }

    /// Whether the request's whole deadline has passed.
    fn expired(&self) -> bool {
        self.deadline.is_some_and(|dl| Instant::now() >= dl)
    }

    /// Whether an answer with `status` is retried.
    fn retries_status(&self, status: StatusCode) -> bool {
        self.retry
            .is_some_and(|r| r.retries_status(status.as_u16()))
    }

    /// Whether a connect failure or a reset before any answer is retried.
    fn retries_connect_failure(&self) -> bool {
        self.retry.is_some_and(|r| r.retry_on_connect_failure)
    }

    /// Whether a per-try timeout is retried.
    fn retries_timeout(&self) -> bool {
        self.retry.is_some()
    }

    /// Whether failed attempt `attempt`, `retriable` for its cause, is followed by another:
    /// attempts are left and the budget pays for one more (taken here, once per retry).
    fn retry_after(
        &self,
        attempt: u32,
        retriable: bool,
        budget: &crate::resilience::RetryBudget,
    ) -> bool {
        retriable && attempt + 1 < self.max_attempts && budget.try_withdraw(Instant::now())
    }

    /// The pause before the attempt after `attempt`; `None` when it would end past the
    /// deadline (the request has then timed out).
    fn pause(&self, attempt: u32, rng: &mut fastrand::Rng) -> Option<Duration> {
        let pause = self
            .backoff
            .as_ref()
            .map(|b| b.delay(attempt, rng))
            .unwrap_or_default();
        match self.deadline {
            Some(dl) if Instant::now() + pause >= dl => None,
            _ => Some(pause),
        }
    }
}

/// Records an upstream's answer for balancing and outlier detection. A failing endpoint
/// must not look fast to least-request balancing: a 5xx counts as a slow answer.
fn record_answer(
    runtime: &runtime::ServiceRuntime,
    endpoint: &runtime::Endpoint,
    outstanding: crate::resilience::Outstanding,
    attempt_started: Instant,
    status: StatusCode,
    pool_size: usize,
) {
    let is_5xx = status.is_server_error();
    outstanding.finish(if is_5xx {
        FAILURE_LATENCY_PENALTY
    } else {
        attempt_started.elapsed()
    });
    runtime.record(
        endpoint,
        if is_5xx {
            EndpointOutcome::Http5xx
        } else {
            EndpointOutcome::Success
        },
        pool_size,
    );
}

/// Whether the client's own request body broke (bad chunking, early close) rather than the
/// upstream: that is the client's error (400), not the upstream's (503).
fn is_request_body_error(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_user() || h.is_parse() || h.is_incomplete_message())
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether a request body can be buffered for retries: no body, or a declared length under
/// the limit.
fn body_fits(headers: &HeaderMap, parts: &http::request::Parts) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    match headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(n) => n <= MAX_RETRY_BODY,
        // HTTP/2 without content-length may stream (gRPC): only GET-like methods are safe.
        None => {
            parts.version != Version::HTTP_2
                || matches!(
                    parts.method,
                    http::Method::GET
                        | http::Method::HEAD
                        | http::Method::OPTIONS
                        | http::Method::DELETE
                )
        }
    }
}

/// Evaluates the destination's policies for one request (L4 and L7 rules).
fn authorize_request(
    mesh: &Mesh,
    d: &Downstream,
    dst: &crate::state::Workload,
    port: u16,
    parts: &http::request::Parts,
) -> bool {
    let conn = ConnectionAttrs {
        src_identity: Some(&d.pod.workload.identity),
        src_ip: d.client_addr.ip(),
        dst_port: port,
    };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let attrs = RequestAttrs {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        host,
        headers: &parts.headers,
    };
    let decision = policy::evaluate_request(&mesh.policies, dst, &conn, &attrs);
    d.inputs
        .metrics
        .policy_decision(decision.is_allowed(), Layer::L7);
    match decision {
        policy::Decision::Allow { .. } => true,
        policy::Decision::Deny { policy, reason } => {
            tracing::warn!(
                src.identity = %d.pod.workload.identity,
                dst.pod = %dst.key,
                method = %parts.method,
                path = parts.uri.path(),
                policy = %policy.as_deref().unwrap_or(""),
                reason = %reason,
                "request denied"
            );
            false
        }
    }
}

/// Joins the client's and the upstream's upgraded connections (WebSocket and friends).
fn bridge_upgrade(downstream: hyper::upgrade::OnUpgrade, response: &mut Response<Incoming>) {
    let upstream = hyper::upgrade::on(response);
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let mut down = TokioIo::new(down);
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
}

/// The request's path and query sent to the endpoint at `authority` (`ip:port`):
/// `http://ip:port/path?query`, the form the pooled client keys its connections by.
fn upstream_uri(uri: &Uri, authority: &http::uri::Authority) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

/// An attempt ran out of time.
struct TimedOut;

/// How an attempt went, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointOutcome {
    Success,
    Http5xx,
    ConnectFailure,
}

/// L4 load balancing for non-HTTP service ports: the endpoint address for a new connection.
pub fn pick_l4_endpoint(
    inputs: &ProxyInputs,
    services: &crate::service::ServiceIndex,
    service: &Service,
    port: &ServicePort,
) -> Option<SocketAddr> {
    let endpoints = services.endpoints(service);
    let runtime = inputs.l7.service(service);
    let mut rng = fastrand::Rng::new();
    runtime
        .pick(endpoints, port.target_port, &mut rng)
        .map(|e| e.addr)
}

impl PodContext {
    /// This pod's upstream HTTP clients of the calling worker, created on first use.
    pub fn http_clients(self: &Arc<Self>, inputs: &Arc<ProxyInputs>) -> Arc<PodClients> {
        let worker = crate::workers::current().min(self.http_clients.len() - 1);
        self.http_clients[worker]
            .get_or_init(|| Arc::new(PodClients::new(inputs, self)))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{resilience::RetryBudget, route::Retry};

    fn plan(retry: &Retry, max_attempts: u32, deadline: Option<Instant>) -> RetryPlan<'_> {
        RetryPlan {
            retry: Some(retry),
            max_attempts,
            backoff: Some(Backoff::new(retry.backoff, retry.backoff * 10)),
            deadline,
            per_try: None,
        }
    }

    fn retry() -> Retry {
        Retry {
            attempts: 3,
            codes: vec![503],
            backoff: Duration::from_millis(10),
            per_try_timeout: None,
            retry_on_connect_failure: true,
        }
    }

    #[test]
    fn a_retry_takes_one_retry_from_the_budget() {
        let retry = retry();
        let plan = plan(&retry, 4, None);
        // No share of requests, a reserve of 2 retries in the window.
        let budget = RetryBudget::new(0.0, 2, Duration::from_secs(1));
        assert!(plan.retries_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!plan.retries_status(StatusCode::BAD_GATEWAY));
        assert!(plan.retry_after(0, true, &budget));
        assert!(plan.retry_after(1, true, &budget));
        assert!(!plan.retry_after(2, true, &budget), "the budget held two");
        // Neither a cause that is not retried nor the last attempt takes from it.
        let budget = RetryBudget::new(0.0, 1, Duration::from_secs(1));
        assert!(!plan.retry_after(0, false, &budget));
        assert!(!plan.retry_after(3, true, &budget));
        assert!(plan.retry_after(0, true, &budget));
    }

    #[test]
    fn the_deadline_cuts_attempts_and_pauses() {
        let retry = retry();
        let bounded = plan(&retry, 4, Some(Instant::now() + Duration::from_millis(1)));
        assert!(
            bounded
                .attempt_timeout()
                .is_some_and(|t| t <= Duration::from_millis(1))
        );
        let mut rng = fastrand::Rng::with_seed(7);
        // A 10 ms backoff ends past a 1 ms deadline.
        assert_eq!(bounded.pause(0, &mut rng), None);
        let open = plan(&retry, 4, None);
        assert!(open.pause(0, &mut rng).is_some());
        assert_eq!(open.attempt_timeout(), None);
    }
}
