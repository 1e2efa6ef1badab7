//! The client side of a connection: its frames, and each new request's routing up to the
//! point where it waits for an upstream stream.
use super::*;

impl Connection<'_> {
    pub(super) fn on_client_frame(&mut self, f: Frame) -> Result<(), ConnError> {
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
                match HeaderBlock::collect(&mut self.continuation, &f)? {
                    Some(block) => self.on_client_headers(block),
                    None => Ok(()),
                }
            }
            frame::CONTINUATION => match HeaderBlock::collect(&mut self.continuation, &f)? {
                Some(block) => self.on_client_headers(block),
                None => Ok(()),
            },
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

    pub(super) fn on_client_data(&mut self, f: Frame) -> Result<(), ConnError> {
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
        if f.payload.is_empty() && !end {
            // Nothing to forward: not queued (a flood of empty frames must not pile up).
            self.send_client_credit(f.stream);
            return Ok(());
        }
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

    pub(super) fn on_client_headers(&mut self, block: HeaderBlock) -> Result<(), ConnError> {
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
    pub(super) fn start_stream(&mut self, id: u32, mut parts: http::request::Parts, end: bool) {
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
            attempts: 1,
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
        stream.retry = retry::RetryState::for_request(
            rule,
            &parts,
            end,
            declared_length,
            backend,
            backend_port,
            &plan,
        );
        stream.head = Some(parts);
        // The route's timeouts bound the wait for the response head, as on the hyper path:
        // the request timeout from the request's start (a fault delay included), the
        // per-try one from when the request goes upstream.
        let (deadline, message) = retry::attempt_deadline(
            plan.deadline,
            plan.per_try,
            Instant::now() + delay.unwrap_or_default(),
        );
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
    pub(super) fn pick_target(
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
            .map_err(|o| Box::new(LocalAnswer::overflow(&o)))?;
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
        let authority = retry::endpoint_authority(&endpoint);
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
}

/// A request head from its decoded fields, checked as RFC 9113 §8.3 asks: pseudo-headers
/// first, each once, the required ones present, names lowercase, no connection-specific
/// fields, `te` only `trailers`.
pub(super) fn request_parts(fields: Vec<Field>) -> Result<http::request::Parts, &'static str> {
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
pub(super) fn is_connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    )
}
