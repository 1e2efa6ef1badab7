//! The HTTP/1.1 fast path: one task per downstream connection reads each request head
//! (httparse), takes it through the same steps as the hyper path (route, redirect, request
//! filters, fault injection, weighted backend, P2C endpoint, circuit breaker, rate limit,
//! local-delivery authorization, request id and trace context, timeouts, retries with
//! backoff and budget, outlier records, metrics and access log), writes it to an upstream
//! connection the same task owns, and passes the response through as it arrives.
//!
//! Why: a request on the hyper path crosses four tasks (server connection, service, client
//! dispatch, client connection); here it stays in one, which costs less CPU per request
//! and does not depend on how connections fall on the workers (see ARCHITECTURE.md).
//!
//! The first request that needs more hands the connection, with every byte read from it
//! and not yet forwarded, to the hyper path for the rest of its life ([`Handover`]): bodies
//! that are not one plain `Content-Length` (chunked, `Expect`), upgrades, HTTP/1.0, targets
//! that are not origin-form, heads that do not parse or exceed 64 KiB, backends that speak
//! HTTP/2, and route configuration errors. So malformed input (the request smuggling shapes
//! included) gets hyper's answers (400, 431) whichever path the connection started on.
use std::{io, time::Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use http::{Method, StatusCode, header};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout_at,
};
use tracing::debug;

use super::{
    AccessLog, Downstream, EndpointOutcome, FAILURE_LATENCY_PENALTY, HEADER_READ_TIMEOUT,
    LocalAnswer, MAX_HEADER_BYTES, MAX_RETRY_BODY, RetryPlan,
    client::{DESTINATION, Http1Connection, overflow_in},
    denied_here, log_request, rate_limited, record_answer, strip_hop_by_hop, trace,
};
use crate::{
    metrics::HandoverReason,
    resilience::Overflow,
    route::{Filter, RouteDecision, RouteRule},
    service::{AppProtocol, Service, ServicePort},
};

mod framing;
mod rewind;

use self::framing::{
    ChunkedEnd, Framing, Parsed, RequestHead, ResponseHead, parse_request, parse_response,
    rebuild_response_head, serialize_request, write_fields,
};
pub(super) use self::rewind::Rewind;

/// Largest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 256 * 1024;
/// Read size for bodies.
const READ_CHUNK: usize = 16 * 1024;

/// A connection the fast path gives to the hyper path, with the bytes it read from the
/// client and did not forward: they are served first.
pub(super) struct Handover {
    pub client: TcpStream,
    pub buffered: Bytes,
}

/// Serves the connection until it ends, or until a request needs the hyper path.
pub(super) async fn serve(client: TcpStream, d: &Downstream) -> Option<Handover> {
    let mut conn = Connection {
        d,
        client,
        from_client: BytesMut::with_capacity(READ_CHUNK),
        upstream: None,
        rng: fastrand::Rng::new(),
        out: Vec::with_capacity(4096),
        body_left: 0,
        replay_body: None,
    };
    let next = loop {
        match conn.next_request().await {
            Ok(Next::Request) => continue,
            Ok(Next::Close) => break None,
            Ok(Next::Handover(reason)) => break Some(reason),
            Err(e) => {
                debug!(error = %e, "HTTP/1.1 connection ended with an error");
                break None;
            }
        }
    };
    // The last upstream connection outlives this one when it finished cleanly.
    if let Some(up) = conn.upstream.take() {
        d.clients.idle_http1.put(up.endpoint, up.io);
    }
    next.map(|reason| {
        debug!(
            reason = reason.as_str(),
            "HTTP/1.1 connection handed to hyper"
        );
        d.inputs.metrics.http1_handover(reason);
        Handover {
            client: conn.client,
            buffered: conn.from_client.freeze(),
        }
    })
}

/// What to do after a request.
enum Next {
    Request,
    Close,
    Handover(HandoverReason),
}

/// One downstream connection's state between requests.
struct Connection<'a> {
    d: &'a Downstream,
    client: TcpStream,
    /// Read from the client, not yet forwarded.
    from_client: BytesMut,
    /// The connection the last request used, clean and ready for the next.
    upstream: Option<Upstream>,
    rng: fastrand::Rng,
    /// Where heads are serialized.
    out: Vec<u8>,
    /// Body bytes of the current request not yet forwarded (or skipped).
    body_left: u64,
    /// The current request's body, read whole so that a retry can send it again.
    replay_body: Option<Bytes>,
}

struct Upstream {
    endpoint: std::net::SocketAddr,
    io: Http1Connection,
    /// Read from the upstream, not yet forwarded.
    buf: BytesMut,
    /// It served a request before this one (so it may have been closed meanwhile).
    reused: bool,
}

/// Why an upstream exchange failed before a response head arrived.
enum ExchangeError {
    Connect(io::Error),
    Overflow(Overflow),
    /// The request could not be sent or no response head came back.
    Upstream(io::Error),
    /// The client broke off while sending its body: nobody to answer.
    Client(io::Error),
}

impl Connection<'_> {
    async fn next_request(&mut self) -> io::Result<Next> {
        let head = match self.read_request_head().await? {
            Some(Parsed::Request(head)) => *head,
            Some(Parsed::NotForUs(reason)) => return Ok(Next::Handover(reason)),
            Some(Parsed::Partial) | None => return Ok(Next::Close),
        };
        let d = self.d;
        let inputs = &d.inputs;
        let started = Instant::now();
        let RequestHead {
            mut parts,
            head_len,
            body_len,
            close: client_close,
        } = head;
        // The access log shows the request as the client sent it.
        let method = parts.method.clone();
        let uri = parts.uri.clone();
        let host = parts.headers.get(header::HOST).cloned();
        let request_id = trace::ensure(&mut parts.headers, &mut self.rng);

        let routes = inputs.routes.load();
        let services = inputs.services.load();
        let (rule, decision) =
            match routes.select(&d.service.namespace, &d.service.name, d.port.port, &parts) {
                RouteDecision::NoRoutes => (None, Decision::Forward(&d.service, &d.port)),
                RouteDecision::NoMatch => (
                    None,
                    Decision::Answer(LocalAnswer::new(
                        StatusCode::NOT_FOUND,
                        "NR",
                        "no route matched",
                    )),
                ),
                RouteDecision::Matched(rule, matched) => {
                    if let Some(redirect) = rule.redirect(&parts, &matched, d.port.port) {
                        (
                            Some(rule),
                            Decision::Answer(LocalAnswer::redirect(redirect)),
                        )
                    } else {
                        rule.apply_request_filters(&mut parts, &matched);
                        let Some((backend, port)) =
                            rule.pick_backend(&mut self.rng).and_then(|b| {
                                services
                                    .by_name(&b.namespace, &b.name)
                                    .and_then(|svc| svc.port(b.port).map(|p| (svc, p)))
                            })
                        else {
                            // The hyper path answers these configuration errors (500 NR).
                            return Ok(Next::Handover(HandoverReason::RouteConfig));
                        };
                        (Some(rule), Decision::Forward(backend, port))
                    }
                }
            };
        if let Decision::Forward(_, port) = &decision
            && matches!(port.protocol, AppProtocol::Http2 | AppProtocol::Grpc)
        {
            return Ok(Next::Handover(HandoverReason::Http2Backend));
        }
        // From here on the request is this path's.
        self.from_client.advance(head_len);
        self.body_left = body_len;
        let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
        let mut log = AccessLog {
            request_id: &request_id,
            method: method.as_str(),
            path: uri.path(),
            authority,
            route: rule.map(|r| r.label.clone()),
            backend: None,
            upstream: None,
            attempts: 0,
            protocol: "http",
            request_bytes: body_len,
        };
        let close_after = client_close || inputs.drain.is_draining();
        let answer = match decision {
            Decision::Answer(answer) => answer,
            Decision::Forward(backend, backend_port) => {
                let route = RoutedRequest {
                    rule,
                    backend,
                    backend_port,
                    endpoints: services.endpoints(backend),
                    started,
                    close_after,
                };
                match self.forward(&mut parts, &route, &mut log).await? {
                    Ok(next) => return Ok(next),
                    Err(answer) => answer,
                }
            }
        };
        // An answer of the agent's own. A body it did not forward must not be read as the
        // next request: small ones are skipped, larger ones close the connection.
        let skip = self.body_left.min(self.from_client.len() as u64);
        self.from_client.advance(skip as usize);
        let unread = self.body_left - skip;
        let close = close_after || unread > MAX_HEADER_BYTES as u64;
        if !close && unread > 0 {
            self.discard_client_body(unread).await?;
        }
        self.body_left = 0;
        log_request(d, &log, answer.status, answer.flags, started, 0);
        self.write_local(&answer, close).await?;
        Ok(if close { Next::Close } else { Next::Request })
    }

    /// Fault injection, endpoint, circuit breaker, rate limit, authorization, then the
    /// upstream exchange (within the route's timeouts) and the response. `Err` is an
    /// answer of the agent's own, not yet written.
    async fn forward(
        &mut self,
        parts: &mut http::request::Parts,
        route: &RoutedRequest<'_>,
        log: &mut AccessLog<'_>,
    ) -> io::Result<Result<Next, LocalAnswer>> {
        let d = self.d;
        let inputs = &d.inputs;
        let RoutedRequest {
            rule,
            backend,
            backend_port,
            endpoints,
            started,
            close_after: _,
        } = *route;
        if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
            let decision = fault.sample(&mut self.rng);
            if let Some(delay) = decision.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = decision.abort {
                return Ok(Err(LocalAnswer::new(status, "FI", "fault injected")));
            }
        }
        let runtime = inputs.l7.service(backend);
        let budget = &runtime.budget;
        log.backend = Some(runtime.host.clone());
        let no_upstream =
            || LocalAnswer::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream");
        if endpoints.is_empty() {
            return Ok(Err(no_upstream()));
        }
        let _request_permit = match runtime.circuit.try_request() {
            Ok(permit) => permit,
            Err(overflow) => return Ok(Err(LocalAnswer::overflow(&overflow))),
        };
        budget.deposit(Instant::now());
        // A request that may be sent again has its body (up to 64 KiB) read whole first;
        // a larger one streams and is sent once, as on the hyper path.
        self.replay_body = None;
        if rule.is_some_and(|r| r.retry.is_some()) && self.body_left <= MAX_RETRY_BODY as u64 {
            self.replay_body = Some(self.read_body_for_replay().await?);
        }
        let plan = RetryPlan::new(rule, started, self.replay_body.is_some());
        let request_timeout = || {
            LocalAnswer::new(
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                "upstream request timeout",
            )
        };
        strip_hop_by_hop(&mut parts.headers, false);
        // Set by every attempt that does not answer (built only then: not per request).
        let mut last_failure = None;
        let mesh = inputs.mesh.load();
        for attempt in 0..plan.max_attempts {
            log.attempts = attempt + 1;
            let Some(endpoint) = runtime.pick(endpoints, backend_port.target_port, &mut self.rng)
            else {
                return Ok(Err(no_upstream()));
            };
            log.upstream = Some(endpoint.addr);
            if attempt == 0 && rule.is_some_and(|r| rate_limited(inputs, r, endpoint.addr)) {
                return Ok(Err(LocalAnswer::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RL",
                    "local rate limit",
                )));
            }
            if denied_here(&mesh, d, endpoint.addr, parts) {
                return Ok(Err(LocalAnswer::new(
                    StatusCode::FORBIDDEN,
                    "RBAC",
                    "RBAC: access denied",
                )));
            }
            // The route's timeouts bound the wait for the response head, as on the hyper
            // path.
            let limit = plan.attempt_timeout();
            let outstanding = endpoint.stats.stats.start();
            let attempt_started = Instant::now();
            let exchange = DESTINATION.scope(runtime.clone(), self.exchange(endpoint.addr, parts));
            let exchange = match limit {
                None => Ok(exchange.await),
                Some(limit) => tokio::time::timeout(limit, exchange).await,
            };
            let (failure, again) = match exchange {
                Err(_elapsed) => {
                    drop(outstanding);
                    if plan.expired() {
                        return Ok(Err(request_timeout()));
                    }
                    let failure = LocalAnswer::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream per-try timeout",
                    );
                    let again = plan.retry_after(attempt, plan.retries_timeout(), budget);
                    (failure, again)
                }
                Ok(Ok((up, response))) => {
                    record_answer(
                        &runtime,
                        &endpoint,
                        outstanding,
                        attempt_started,
                        response.status,
                        endpoints.len(),
                    );
                    let status = response.status;
                    if !plan.retry_after(attempt, plan.retries_status(status), budget) {
                        let next = self
                            .finish_response(up, &response, parts, route, log)
                            .await?;
                        return Ok(Ok(next));
                    }
                    // The answer is dropped unread, and its connection with it.
                    drop(up);
                    let failure =
                        LocalAnswer::new(status, "URX", &format!("upstream answered {status}"));
                    (failure, true)
                }
                Ok(Err(ExchangeError::Overflow(overflow))) => {
                    drop(outstanding);
                    return Ok(Err(LocalAnswer::overflow(&overflow)));
                }
                Ok(Err(ExchangeError::Client(e))) => return Err(e),
                Ok(Err(ExchangeError::Connect(e))) => {
                    outstanding.finish(FAILURE_LATENCY_PENALTY);
                    runtime.record(&endpoint, EndpointOutcome::ConnectFailure, endpoints.len());
                    let failure = LocalAnswer::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UF",
                        &format!("upstream connect error: {e}"),
                    );
                    let again = plan.retry_after(attempt, plan.retries_connect_failure(), budget);
                    (failure, again)
                }
                Ok(Err(ExchangeError::Upstream(e))) => {
                    outstanding.finish(FAILURE_LATENCY_PENALTY);
                    runtime.record(&endpoint, EndpointOutcome::Http5xx, endpoints.len());
                    // A reset before any response is retried like a connect failure.
                    let failure = LocalAnswer::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UR",
                        &format!("upstream error: {e}"),
                    );
                    let again = plan.retry_after(attempt, plan.retries_connect_failure(), budget);
                    (failure, again)
                }
            };
            last_failure = Some(failure);
            if !again {
                break;
            }
            let Some(delay) = plan.pause(attempt, &mut self.rng) else {
                return Ok(Err(request_timeout()));
            };
            tokio::time::sleep(delay).await;
        }
        Ok(Err(last_failure.unwrap_or_else(no_upstream)))
    }

    /// Relays the response that ends the request, logs it, and keeps its upstream
    /// connection for the next request when it ended cleanly.
    async fn finish_response(
        &mut self,
        mut up: Upstream,
        response: &ResponseHead,
        parts: &http::request::Parts,
        route: &RoutedRequest<'_>,
        log: &AccessLog<'_>,
    ) -> io::Result<Next> {
        let no_body = parts.method == Method::HEAD
            || response.status == StatusCode::NO_CONTENT
            || response.status == StatusCode::NOT_MODIFIED;
        let framing = if no_body {
            Framing::None
        } else {
            response.framing
        };
        let close_downstream = route.close_after || framing == Framing::UntilClose;
        let relayed = self
            .relay_response(&mut up, response, framing, route.rule, close_downstream)
            .await;
        log_request(
            self.d,
            log,
            response.status,
            "-",
            route.started,
            response.declared_length,
        );
        relayed?;
        if !response.close && framing != Framing::UntilClose && up.buf.is_empty() {
            up.reused = true;
            if let Some(previous) = self.upstream.replace(up) {
                self.d
                    .clients
                    .idle_http1
                    .put(previous.endpoint, previous.io);
            }
        }
        Ok(if close_downstream {
            Next::Close
        } else {
            Next::Request
        })
    }

    /// Reads the rest of the request body (at most [`MAX_RETRY_BODY`]) so that it can be
    /// sent more than once.
    async fn read_body_for_replay(&mut self) -> io::Result<Bytes> {
        let len = usize::try_from(self.body_left).map_err(io::Error::other)?;
        while self.from_client.len() < len {
            self.from_client.reserve(len - self.from_client.len());
            if self.client.read_buf(&mut self.from_client).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        self.body_left = 0;
        Ok(self.from_client.split_to(len).freeze())
    }

    /// Reads until the buffer holds a whole request head; `None` when the client closed
    /// between requests or took longer than [`HEADER_READ_TIMEOUT`] to send one. As with
    /// hyper's header read timeout, the clock starts when the connection begins waiting
    /// for a head, so it is both the slowloris guard and the keep-alive idle timeout.
    async fn read_request_head(&mut self) -> io::Result<Option<Parsed>> {
        let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
        loop {
            if !self.from_client.is_empty() {
                match parse_request(&self.from_client) {
                    Parsed::Partial if self.from_client.len() > MAX_HEADER_BYTES => {
                        return Ok(Some(Parsed::NotForUs(HandoverReason::HeadSize)));
                    }
                    Parsed::Partial => {}
                    parsed => return Ok(Some(parsed)),
                }
            }
            self.from_client.reserve(READ_CHUNK);
            let read = timeout_at(deadline, self.client.read_buf(&mut self.from_client)).await;
            match read {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    debug!("no complete request head in time; closing");
                    return Ok(None);
                }
            }
        }
    }

    /// Sends the request on a clean upstream connection and reads the response head. A
    /// reused connection the server closed meanwhile is replaced once, for requests that
    /// are safe to send again.
    async fn exchange(
        &mut self,
        endpoint: std::net::SocketAddr,
        parts: &http::request::Parts,
    ) -> Result<(Upstream, ResponseHead), ExchangeError> {
        serialize_request(&mut self.out, parts);
        let resendable = self.body_left == 0 && parts.method.is_idempotent();
        let mut reuse = true;
        loop {
            let mut up = match self.upstream.take() {
                Some(up) if reuse && up.endpoint == endpoint => up,
                previous => {
                    if let Some(previous) = previous {
                        self.d
                            .clients
                            .idle_http1
                            .put(previous.endpoint, previous.io);
                    }
                    self.connect(endpoint, reuse).await?
                }
            };
            match self.send_and_read_head(&mut up).await {
                Ok(head) => return Ok((up, head)),
                Err(ExchangeError::Upstream(e)) if up.reused && resendable && reuse => {
                    debug!(error = %e, "reused upstream connection failed; trying a new one");
                    reuse = false;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An idle connection to `endpoint` (when `reuse`), or a new one.
    async fn connect(
        &mut self,
        endpoint: std::net::SocketAddr,
        reuse: bool,
    ) -> Result<Upstream, ExchangeError> {
        let clients = &self.d.clients;
        if reuse && let Some(io) = clients.idle_http1.take(endpoint) {
            return Ok(Upstream {
                endpoint,
                io,
                buf: BytesMut::new(),
                reused: true,
            });
        }
        match clients.connector.open(endpoint).await {
            Ok(io) => Ok(Upstream {
                endpoint,
                io,
                buf: BytesMut::new(),
                reused: false,
            }),
            Err(e) => match overflow_in(e.as_ref()) {
                Some(overflow) => Err(ExchangeError::Overflow(*overflow)),
                None => Err(ExchangeError::Connect(io::Error::other(e))),
            },
        }
    }

    /// Writes the serialized head and the body, then reads the response head (passing
    /// informational 1xx heads on to the client).
    async fn send_and_read_head(
        &mut self,
        up: &mut Upstream,
    ) -> Result<ResponseHead, ExchangeError> {
        // The head and what the client already sent of the body, in one write.
        let buffered = self.body_left.min(self.from_client.len() as u64) as usize;
        let sent = if let Some(body) = self.replay_body.as_ref().filter(|b| !b.is_empty()) {
            let mut first = Vec::with_capacity(self.out.len() + body.len());
            first.extend_from_slice(&self.out);
            first.extend_from_slice(body);
            up.io.write_all(&first).await
        } else if buffered == 0 {
            up.io.write_all(&self.out).await
        } else {
            let mut first = Vec::with_capacity(self.out.len() + buffered);
            first.extend_from_slice(&self.out);
            first.extend_from_slice(&self.from_client[..buffered]);
            up.io.write_all(&first).await
        };
        sent.map_err(ExchangeError::Upstream)?;
        self.from_client.advance(buffered);
        self.body_left -= buffered as u64;
        while self.body_left > 0 {
            self.from_client.reserve(READ_CHUNK);
            let read = self
                .client
                .read_buf(&mut self.from_client)
                .await
                .map_err(ExchangeError::Client)?;
            if read == 0 {
                return Err(ExchangeError::Client(io::ErrorKind::UnexpectedEof.into()));
            }
            let take = self.body_left.min(self.from_client.len() as u64) as usize;
            up.io
                .write_all(&self.from_client[..take])
                .await
                .map_err(ExchangeError::Upstream)?;
            self.from_client.advance(take);
            self.body_left -= take as u64;
        }
        // An HBONE tunnel may hold what was written until it is flushed.
        up.io.flush().await.map_err(ExchangeError::Upstream)?;
        loop {
            let head = read_response_head(up)
                .await
                .map_err(ExchangeError::Upstream)?;
            if !head.status.is_informational() {
                return Ok(head);
            }
            if head.status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(ExchangeError::Upstream(io::Error::other(
                    "101 to a request that asked for no upgrade",
                )));
            }
            // 103 Early Hints and the like go to the client as they are.
            self.client
                .write_all(&up.buf[..head.head_len])
                .await
                .map_err(ExchangeError::Client)?;
            up.buf.advance(head.head_len);
        }
    }

    /// Writes the response head (as received, or rebuilt when something in it changes) and
    /// passes the body through.
    async fn relay_response(
        &mut self,
        up: &mut Upstream,
        response: &ResponseHead,
        framing: Framing,
        rule: Option<&RouteRule>,
        close_downstream: bool,
    ) -> io::Result<()> {
        let response_filters = rule.is_some_and(|r| {
            r.filters
                .iter()
                .any(|f| matches!(f, Filter::ResponseHeaderModifier(_)))
        });
        self.out.clear();
        if response_filters || response.hop_by_hop || close_downstream {
            rebuild_response_head(
                &mut self.out,
                &up.buf[..response.head_len],
                rule,
                close_downstream,
            )?;
        } else {
            self.out.extend_from_slice(&up.buf[..response.head_len]);
        }
        up.buf.advance(response.head_len);
        match framing {
            Framing::None => self.client.write_all(&self.out).await,
            Framing::Length(n) => {
                let first = n.min(up.buf.len() as u64) as usize;
                self.out.extend_from_slice(&up.buf[..first]);
                up.buf.advance(first);
                self.client.write_all(&self.out).await?;
                copy_length(&mut up.io, &mut up.buf, &mut self.client, n - first as u64).await
            }
            Framing::Chunked => {
                self.client.write_all(&self.out).await?;
                copy_chunked(&mut up.io, &mut up.buf, &mut self.client).await
            }
            Framing::UntilClose => {
                self.out.extend_from_slice(&up.buf);
                up.buf.clear();
                self.client.write_all(&self.out).await?;
                tokio::io::copy(&mut up.io, &mut self.client).await?;
                Ok(())
            }
        }
    }

    /// Reads and drops `n` body bytes the client is still sending.
    async fn discard_client_body(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            self.from_client.clear();
            self.from_client.reserve(READ_CHUNK);
            let read = self.client.read_buf(&mut self.from_client).await?;
            if read == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = n.min(read as u64) as usize;
            self.from_client.advance(take);
            n -= take as u64;
        }
        Ok(())
    }

    async fn write_local(&mut self, answer: &LocalAnswer, close: bool) -> io::Result<()> {
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out
            .extend_from_slice(answer.status.as_str().as_bytes());
        self.out.push(b' ');
        self.out
            .extend_from_slice(answer.status.canonical_reason().unwrap_or("").as_bytes());
        self.out.extend_from_slice(b"\r\n");
        write_fields(&mut self.out, &answer.headers);
        self.out
            .extend_from_slice(format!("content-length: {}\r\n", answer.body.len()).as_bytes());
        if close {
            self.out.extend_from_slice(b"connection: close\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(answer.body.as_bytes());
        self.client.write_all(&self.out).await
    }
}

/// Where a request goes after routing.
enum Decision<'r> {
    Forward(&'r Service, &'r ServicePort),
    Answer(LocalAnswer),
}

/// A routed request's destination and what its forwarding needs to know.
#[derive(Clone, Copy)]
struct RoutedRequest<'r> {
    rule: Option<&'r RouteRule>,
    backend: &'r Service,
    backend_port: &'r ServicePort,
    endpoints: &'r [std::net::IpAddr],
    started: Instant,
    /// The client's connection closes after this response.
    close_after: bool,
}

/// Reads until the upstream's buffer holds a whole response head.
async fn read_response_head(up: &mut Upstream) -> io::Result<ResponseHead> {
    loop {
        if !up.buf.is_empty() {
            match parse_response(&up.buf)? {
                Some(head) => return Ok(head),
                None if up.buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(io::Error::other("response head too large"));
                }
                None => {}
            }
        }
        up.buf.reserve(READ_CHUNK);
        if up.io.read_buf(&mut up.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed before a complete response head",
            ));
        }
    }
}

/// Copies `n` more body bytes from `from` (after what `buf` holds) to `to`.
async fn copy_length<R, W>(
    from: &mut R,
    buf: &mut BytesMut,
    to: &mut W,
    mut n: u64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while n > 0 {
        if buf.is_empty() {
            buf.reserve(READ_CHUNK);
            if from.read_buf(buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed mid-body",
                ));
            }
        }
        let take = n.min(buf.len() as u64) as usize;
        to.write_all(&buf[..take]).await?;
        buf.advance(take);
        n -= take as u64;
    }
    Ok(())
}

/// Copies a chunked body, trailers included, as it is, stopping where it ends.
async fn copy_chunked<R, W>(from: &mut R, buf: &mut BytesMut, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunks = ChunkedEnd::default();
    loop {
        if buf.is_empty() {
            buf.reserve(READ_CHUNK);
            if from.read_buf(buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed mid-body",
                ));
            }
        }
        match chunks.feed(buf).map_err(io::Error::other)? {
            Some(end) => {
                to.write_all(&buf[..end]).await?;
                buf.advance(end);
                return Ok(());
            }
            None => {
                to.write_all(buf).await?;
                buf.clear();
            }
        }
    }
}

/// What the fast path makes of bytes from the network, for the fuzz targets (`fuzz/`).
pub mod inspect {
    pub use super::framing::{ChunkError, ChunkedEnd, MAX_CHUNK_LINE, MAX_TRAILERS};

    /// What the fast path does with a request head at the start of a buffer.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Request {
        /// Not complete yet: read more.
        Partial,
        /// Forwarded by the fast path.
        Forward {
            head_len: usize,
            body_len: u64,
            close: bool,
            method: String,
            target: String,
            /// The fields, as they go to routing.
            fields: Vec<(String, Vec<u8>)>,
        },
        /// Given to hyper with the connection.
        Hyper,
    }

    pub fn request(buf: &[u8]) -> Request {
        match super::parse_request(buf) {
            super::Parsed::Partial => Request::Partial,
            super::Parsed::NotForUs(_) => Request::Hyper,
            super::Parsed::Request(head) => Request::Forward {
                head_len: head.head_len,
                body_len: head.body_len,
                close: head.close,
                method: head.parts.method.to_string(),
                target: head.parts.uri.to_string(),
                fields: head
                    .parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect(),
            },
        }
    }

    /// How a response body is delimited.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Framing {
        None,
        Length(u64),
        Chunked,
        UntilClose,
    }

    /// A response head at the start of a buffer: `Ok(None)` while incomplete, else its
    /// length, status, framing and whether the upstream connection ends after it.
    pub fn response(buf: &[u8]) -> Result<Option<(usize, u16, Framing, bool)>, String> {
        let head = super::parse_response(buf).map_err(|e| e.to_string())?;
        Ok(head.map(|h| {
            let framing = match h.framing {
                super::Framing::None => Framing::None,
                super::Framing::Length(n) => Framing::Length(n),
                super::Framing::Chunked => Framing::Chunked,
                super::Framing::UntilClose => Framing::UntilClose,
            };
            (h.head_len, h.status.as_u16(), framing, h.close)
        }))
    }
}
