//! The upstream side: connections to endpoints (opened, ready once their SETTINGS come,
//! failed), streams opened on them, and their frames.
use super::{downstream::is_connection_specific, *};

impl UpConn {
    /// Adds `n` to what the upstream's connection window is owed, and credits it once a
    /// quarter of the window is (each WINDOW_UPDATE is a frame to read).
    pub(super) fn credit(&mut self, n: i64) {
        self.credit += n;
        if self.credit >= CONN_WINDOW / 4 {
            frame::window_update(&mut self.out, 0, self.credit as u32);
            self.recv_window += self.credit;
            self.credit = 0;
        }
    }
}

impl Connection<'_> {
    /// Opens upstream streams for queued requests where a connection has room, and opens
    /// connections where none has.
    pub(super) fn dispatch_queued(&mut self) {
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
            // A connection that is not ready yet, or one being opened, takes it soon; so
            // does one whose server allows no streams for now (another would allow none
            // either).
            let coming = self.opening.iter().any(|o| o.endpoint == endpoint)
                || self.upstreams.iter().any(|u| {
                    u.endpoint == endpoint
                        && u.failed.is_none()
                        && !u.closing
                        && (!u.ready || u.peer.max_concurrent_streams == 0)
                });
            if !coming {
                let connector = &self.d.clients.connector;
                let future =
                    DESTINATION.sync_scope(target.runtime.clone(), || connector.open(endpoint));
                self.opening.push(Opening {
                    endpoint,
                    future: Box::pin(future),
                });
            }
            waiting.push_back(id);
        }
        self.queued = waiting;
    }

    /// A connect finished: the connection starts (its streams open once its SETTINGS
    /// come), or the requests waiting for it get the agent's answer.
    pub(super) fn opened(
        &mut self,
        opening: Opening,
        result: Result<UpstreamConnection, BoxError>,
    ) {
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
                    opened_at: Instant::now(),
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
                self.fail_waiting(
                    opening.endpoint,
                    overflow,
                    &format!("upstream connect error: {e}"),
                );
            }
        }
    }

    /// The requests waiting for a connection to `endpoint` that could not be opened (or
    /// failed before it was ready): retried, or answered 503 (`UO` for a circuit
    /// breaker's cap, else `UF`). A failure other than the cap counts once against the
    /// endpoint for outlier detection.
    pub(super) fn fail_waiting(
        &mut self,
        endpoint: SocketAddr,
        overflow: Option<Overflow>,
        detail: &str,
    ) {
        let mut waiting: Vec<u32> = self
            .queued
            .iter()
            .copied()
            .filter(|id| {
                self.streams.get(id).is_some_and(|s| {
                    s.phase == Phase::Queued
                        && s.target.as_ref().is_some_and(|t| t.endpoint == endpoint)
                })
            })
            .collect();
        waiting.sort_unstable();
        waiting.dedup();
        if overflow.is_none()
            && let Some(target) = waiting
                .first()
                .and_then(|id| self.streams.get(id)?.target.as_ref())
        {
            let failed = Endpoint {
                addr: endpoint,
                stats: target.endpoint_runtime.clone(),
            };
            target
                .runtime
                .record(&failed, EndpointOutcome::ConnectFailure, target.pool_size);
        }
        for id in waiting {
            if let Some(t) = self.streams.get_mut(&id).and_then(|s| s.target.as_mut())
                && let Some(o) = t.outstanding.take()
            {
                o.finish(FAILURE_LATENCY_PENALTY);
            }
            if overflow.is_none() && self.retry(id, retry::Failure::Reset) {
                continue;
            }
            let answer = match &overflow {
                Some(overflow) => LocalAnswer::overflow(overflow),
                None => LocalAnswer::new(StatusCode::SERVICE_UNAVAILABLE, "UF", detail),
            };
            self.answer(id, answer);
        }
    }

    /// Sends a queued request's head on upstream connection `i`, then what it has of its
    /// body.
    pub(super) fn open_upstream_stream(&mut self, i: usize, id: u32) {
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
        stream.data_conn = Some(up.id);
        stream.upstream_send_window = up.peer.initial_window;
        stream.upstream_recv_window = STREAM_WINDOW;
        stream.upstream_credit = 0;
        stream.phase = Phase::Open;
        up.streams.insert(up_id, id);
        self.pump_to_upstream(id);
    }

    pub(super) fn on_upstream_frame(&mut self, i: usize, f: Frame) -> Result<(), ConnError> {
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
                    up.credit(flow);
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
                if f.payload.is_empty() && !end {
                    // Nothing to pass on: not queued (empty frames must not pile up).
                    up.credit(0);
                    return Ok(());
                }
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
                match HeaderBlock::collect(&mut up.continuation, &f)? {
                    Some(block) => self.on_upstream_headers(i, block),
                    None => Ok(()),
                }
            }
            frame::CONTINUATION => match HeaderBlock::collect(&mut up.continuation, &f)? {
                Some(block) => self.on_upstream_headers(i, block),
                None => Ok(()),
            },
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
                    // Every stream we may still send on, its response ended or not.
                    let conn = up.id;
                    let ids: Vec<u32> = self
                        .streams
                        .iter()
                        .filter(|(_, s)| s.upstream.is_some_and(|(c, _)| c == conn))
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.upstream_send_window += delta;
                            if s.upstream_send_window > frame::MAX_WINDOW {
                                return Err(ConnError::new(
                                    frame::FLOW_CONTROL_ERROR,
                                    "upstream SETTINGS overflow a stream window",
                                ));
                            }
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

    pub(super) fn on_upstream_headers(
        &mut self,
        i: usize,
        block: HeaderBlock,
    ) -> Result<(), ConnError> {
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
        if let Some(target) = stream.target.as_mut()
            && let Some(outstanding) = target.outstanding.take()
        {
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
        if stream.retry.is_some() {
            if end {
                // The upstream closed its side: nothing to cancel there.
                self.upstreams[i].streams.remove(&up_id);
            }
            if self.retry(id, retry::Failure::Status(status)) {
                return Ok(());
            }
        }
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        stream.responded = true;
        stream.log.status = status;
        if stream.deadline.take().is_some() {
            self.timed = self.timed.saturating_sub(1);
            self.timer_at = None;
        }
        let Some(target) = stream.target.as_ref() else {
            return Ok(());
        };
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
            // The response is whole. The upstream stream stays named on ours so that
            // closing it cancels a request body still on its way there.
            stream.response_done = true;
            self.upstreams[i].streams.remove(&up_id);
            self.close_stream(id, CloseHow::Finished);
        }
        Ok(())
    }

    /// An upstream stream ended without a response end: reset by the upstream, refused,
    /// or its connection went away.
    pub(super) fn upstream_stream_ended(&mut self, id: u32, code: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        stream.upstream = None;
        if stream.responded {
            if stream.response_done {
                // The response ended; the reset only stops the request body.
                stream.upstream_done = true;
                let owed = stream.take_request_queue();
                self.credit_client(owed);
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
        if self.retry(id, retry::Failure::Reset) {
            return;
        }
        if let Some(stream) = self.streams.get_mut(&id) {
            stream.upstream_done = true;
        }
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
    pub(super) fn fail_upstream_stream(&mut self, i: usize, up_id: u32, reason: &str) {
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
    pub(super) fn drop_failed_upstreams(&mut self) {
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
            if !up.ready {
                // It went before its SETTINGS came: the requests waiting for it fail as
                // if it had never opened (else they would wait for ever).
                let detail = up.failed.as_deref().unwrap_or("closed before its SETTINGS");
                let detail = format!("upstream connection failed: {detail}");
                self.fail_waiting(up.endpoint, None, &detail);
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
}
