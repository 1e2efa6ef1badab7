//! Retries on the HTTP/2 fast path, decided by the same [`RetryPlan`] as the other paths:
//! a request that can be sent again (no body, or a `content-length` body of at most
//! 64 KiB) keeps its head and what it sent of its body; an attempt that fails with a
//! status the route retries, a reset or connect failure (when the route retries those), or
//! a per-try timeout is cancelled upstream and, while attempts and the retry budget last,
//! sent again after its backoff, to an endpoint picked again. A retried answer never
//! reaches the client.
use super::*;
use crate::{resilience::Backoff, route::Retry};

/// What a stream keeps to be sent again.
pub(super) struct RetryState {
    policy: Retry,
    /// Attempts made before the current one.
    pub(super) attempt: u32,
    /// The head as sent upstream (filters applied, hop-by-hop fields gone).
    head: http::request::Parts,
    /// What went upstream of the request after its head, to send again first.
    pub(super) sent: Vec<Piece>,
    /// Body bytes at the front of the stream's queue that are sent again (the client was
    /// credited for them the first time).
    pub(super) replayed: i64,
    /// The backend service, to pick an endpoint of again.
    backend: (String, String),
    target_port: u16,
    request_deadline: Option<Instant>,
    per_try: Option<Duration>,
    /// The next attempt waits for its backoff (the stream is `Delayed`).
    pub(super) pending: bool,
}

/// How an attempt failed.
#[derive(Clone, Copy)]
pub(super) enum Failure {
    Status(StatusCode),
    /// Reset before any response, refused, or the connection failed or could not open.
    Reset,
    /// The per-try timeout passed.
    Timeout,
}

impl RetryState {
    /// The state of a request routed by `rule`, if it may be sent more than once.
    pub(super) fn for_request(
        rule: Option<&RouteRule>,
        parts: &http::request::Parts,
        bodiless: bool,
        declared_length: Option<u64>,
        backend: &Service,
        backend_port: &ServicePort,
        plan: &RetryPlan<'_>,
    ) -> Option<Box<Self>> {
        let policy = rule?.retry.as_ref()?;
        let replayable =
            bodiless || declared_length.is_some_and(|n| n <= super::super::MAX_RETRY_BODY as u64);
        replayable.then(|| {
            Box::new(Self {
                policy: policy.clone(),
                attempt: 0,
                head: parts.clone(),
                sent: Vec::new(),
                replayed: 0,
                backend: (backend.namespace.clone(), backend.name.clone()),
                target_port: backend_port.target_port,
                request_deadline: plan.deadline,
                per_try: plan.per_try,
                pending: false,
            })
        })
    }

    fn plan(&self) -> RetryPlan<'_> {
        RetryPlan {
            retry: Some(&self.policy),
            max_attempts: 1 + self.policy.attempts,
            backoff: Some(Backoff::new(
                self.policy.backoff,
                self.policy.backoff.saturating_mul(10),
            )),
            deadline: self.request_deadline,
            per_try: self.per_try,
        }
    }

    /// Whether the request's own deadline (not the attempt's) has passed.
    pub(super) fn request_expired(&self, now: Instant) -> bool {
        self.request_deadline.is_some_and(|d| d <= now)
    }
}

/// When an attempt that starts at `start` must have its response head: the per-try
/// timeout from then, cut to the request's deadline; and what its 504 says.
pub(super) fn attempt_deadline(
    request_deadline: Option<Instant>,
    per_try: Option<Duration>,
    start: Instant,
) -> (Option<Instant>, &'static str) {
    let attempt = per_try.map(|t| start + t);
    match (request_deadline, attempt) {
        (Some(request), Some(attempt)) if attempt < request => {
            (Some(attempt), "upstream per-try timeout")
        }
        (Some(request), _) => (Some(request), "upstream request timeout"),
        (None, attempt) => (attempt, "upstream per-try timeout"),
    }
}

impl Connection<'_> {
    /// Whether stream `id`'s failed attempt is followed by another. If so, the attempt is
    /// cancelled upstream and the next one waits for its backoff; if the backoff would end
    /// past the request's deadline, the request is answered 504 here. The caller has
    /// recorded the attempt's outcome.
    pub(super) fn retry(&mut self, id: u32, failure: Failure) -> bool {
        let Some(stream) = self.streams.get_mut(&id) else {
            return false;
        };
        // Only an attempt in flight (or waiting for its connection) can fail.
        if !matches!(stream.phase, Phase::Open | Phase::Queued) {
            return false;
        }
        let (Some(state), Some(target)) = (stream.retry.as_mut(), stream.target.as_ref()) else {
            return false;
        };
        let plan = state.plan();
        let retriable = match failure {
            Failure::Status(status) => plan.retries_status(status),
            Failure::Reset => plan.retries_connect_failure(),
            Failure::Timeout => plan.retries_timeout(),
        };
        if !plan.retry_after(state.attempt, retriable, &target.runtime.budget) {
            return false;
        }
        let pause = plan.pause(state.attempt, &mut self.rng);
        state.attempt += 1;
        // The failed attempt's upstream stream is cancelled; its late frames are dropped.
        if let Some((conn, up_id)) = stream.upstream.take()
            && let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn)
            && (up.streams.remove(&up_id).is_some() || !stream.upstream_done)
        {
            frame::rst_stream(&mut up.out, up_id, frame::CANCEL);
        }
        let Some(pause) = pause else {
            self.answer(
                id,
                LocalAnswer::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                ),
            );
            return true;
        };
        // The request again: what was sent, then what still waits to go.
        stream.upstream_done = false;
        // Bytes of an earlier replay not sent yet are still at the queue's front.
        state.replayed += super::stream::queued_bytes(&state.sent);
        let mut again: VecDeque<Piece> = state.sent.drain(..).collect();
        again.extend(stream.to_upstream.drain(..));
        stream.to_upstream = again;
        let now = Instant::now();
        if stream.deadline.take().is_some() {
            self.timed = self.timed.saturating_sub(1);
        }
        let (deadline, message) =
            attempt_deadline(state.request_deadline, state.per_try, now + pause);
        if deadline.is_some() {
            stream.deadline = deadline;
            stream.timeout_message = message;
            self.timed += 1;
        }
        state.pending = true;
        stream.phase = Phase::Delayed(now + pause);
        self.timed += 1;
        self.timer_at = None;
        true
    }

    /// After a retry's backoff: an endpoint picked again (and authorized, for one this
    /// agent delivers to), and the stream queued for it.
    pub(super) fn next_attempt(&mut self, id: u32) {
        let d = self.d;
        let services = d.inputs.services.load();
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        let (Some(state), Some(target)) = (stream.retry.as_mut(), stream.target.as_mut()) else {
            return;
        };
        state.pending = false;
        let endpoints = services
            .by_name(&state.backend.0, &state.backend.1)
            .map(|svc| services.endpoints(svc))
            .unwrap_or_default();
        let Some(endpoint) = target
            .runtime
            .pick(endpoints, state.target_port, &mut self.rng)
        else {
            self.answer(
                id,
                LocalAnswer::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream"),
            );
            return;
        };
        let mesh = d.inputs.mesh.load();
        if denied_here(&mesh, d, endpoint.addr, &state.head) {
            self.answer(
                id,
                LocalAnswer::new(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied"),
            );
            return;
        }
        target.authority = endpoint_authority(&endpoint);
        target.endpoint = endpoint.addr;
        target.pool_size = endpoints.len();
        target.outstanding = Some(endpoint.stats.stats.start());
        target.endpoint_runtime = endpoint.stats;
        stream.log.upstream = Some(endpoint.addr);
        stream.log.attempts = state.attempt + 1;
        stream.head = Some(state.head.clone());
        stream.phase = Phase::Queued;
        self.queued.push_back(id);
    }
}

/// `ip:port` of an endpoint, as the upstream `:authority`.
pub(super) fn endpoint_authority(endpoint: &Endpoint) -> Bytes {
    endpoint
        .stats
        .authority
        .as_ref()
        .map(|a| Bytes::copy_from_slice(a.as_str().as_bytes()))
        .unwrap_or_else(|| Bytes::from(endpoint.addr.to_string()))
}
