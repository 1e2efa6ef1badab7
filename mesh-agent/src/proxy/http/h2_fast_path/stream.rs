//! A stream's life after routing: data moved within both sides' windows and credited
//! back, answers of the agent's own, the end of a stream (logged), and the timers of fault
//! delays and timeouts.
use super::{downstream::is_connection_specific, *};

impl Connection<'_> {
    /// Sends what a stream has for upstream, as far as the windows allow, and credits the
    /// client for what went.
    pub(super) fn pump_to_upstream(&mut self, id: u32) {
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
                            if let Some(retry) = stream.retry.as_mut() {
                                retry.sent.push(Piece::Data(Bytes::new(), true));
                            }
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
                    // Bytes sent again for a retry were credited to the client already.
                    let mut fresh = n as i64;
                    if let Some(retry) = stream.retry.as_mut() {
                        let replayed = fresh.min(retry.replayed);
                        retry.replayed -= replayed;
                        fresh -= replayed;
                        retry.sent.push(Piece::Data(chunk, end && last));
                    }
                    stream.credit += fresh;
                    self.credit += fresh;
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
                    if let Some(piece) = stream.to_upstream.pop_front()
                        && let Some(retry) = stream.retry.as_mut()
                    {
                        retry.sent.push(piece);
                    }
                }
            }
        }
        self.send_client_credit(id);
    }

    /// Sends what a stream has for the client, as far as the windows allow, and credits
    /// the upstream for what went; closes the stream when its response is all out.
    pub(super) fn pump_to_client(&mut self, id: u32) {
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
            && let Some(conn) = stream.data_conn
            && let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn)
        {
            // The stream's window only while the upstream may still send on it.
            if !stream.response_done
                && let Some((_, up_id)) = stream.upstream
            {
                stream.upstream_credit += forwarded;
                if stream.upstream_credit >= STREAM_WINDOW / 4 {
                    frame::window_update(&mut up.out, up_id, stream.upstream_credit as u32);
                    stream.upstream_recv_window += stream.upstream_credit;
                    stream.upstream_credit = 0;
                }
            }
            up.credit(forwarded);
        }
        if finished {
            self.close_stream(id, CloseHow::Finished);
        }
    }

    /// Credits the client what was forwarded: the connection window once a quarter of
    /// it is used (each WINDOW_UPDATE is a frame to read), the stream's likewise.
    pub(super) fn send_client_credit(&mut self, id: u32) {
        self.credit_client(0);
        if let Some(s) = self.streams.get_mut(&id)
            && !s.client_done
            && s.credit >= STREAM_WINDOW / 4
        {
            frame::window_update(&mut self.cout, id, s.credit as u32);
            s.recv_window += s.credit;
            s.credit = 0;
        }
    }

    /// Adds `n` to what the client's connection window is owed, and credits it once a
    /// quarter of the window is.
    pub(super) fn credit_client(&mut self, n: i64) {
        self.credit += n;
        if self.credit >= CONN_WINDOW / 4 {
            frame::window_update(&mut self.cout, 0, self.credit as u32);
            self.recv_window += self.credit;
            self.credit = 0;
        }
    }

    // ---------------------------------------------------------------------------------
    // Ending streams.
    // ---------------------------------------------------------------------------------

    /// The agent answers a request itself: a head and a small body, within the client's
    /// window; the upstream stream, if any, is cancelled.
    pub(super) fn answer(&mut self, id: u32, answer: LocalAnswer) {
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
        let owed = stream.take_request_queue();
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
        self.credit_client(owed);
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
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
    pub(super) fn close_stream(&mut self, id: u32, how: CloseHow) {
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
        }
        // Response data not passed on was never credited to its upstream connection (the
        // upstream stream may be gone: reset, or its response ended).
        if let Some(conn) = stream.data_conn
            && let Some(up) = self.upstreams.iter_mut().find(|u| u.id == conn)
        {
            up.credit(queued_bytes(&stream.to_client));
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
        let owed = stream.take_request_queue();
        self.credit_client(owed);
        if let Some(target) = stream.target.as_mut()
            && let Some(o) = target.outstanding.take()
        {
            // Cancelled before an answer: no outcome to record.
            drop(o);
        }
        if stream.responded && !matches!(how, CloseHow::ClientReset) {
            self.log(&stream, matches!(how, CloseHow::Finished));
        }
        if self.streams.is_empty() {
            self.last_active = Instant::now();
            if self.idle_release_at.is_none() {
                self.idle_release_at = Some(self.last_active + IDLE_RELEASE);
                self.timer_at = None;
            }
        }
    }

    pub(super) fn log(&self, stream: &Stream, complete: bool) {
        let l = &stream.log;
        let access = AccessLog {
            request_id: &l.request_id,
            method: l.method.as_str(),
            path: &l.path,
            authority: &l.authority,
            route: l.route.clone(),
            backend: l.backend.clone(),
            upstream: l.upstream,
            attempts: if stream.target.is_some() {
                l.attempts
            } else {
                0
            },
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
    pub(super) fn send_goaway(&mut self) {
        if !self.goaway_sent {
            frame::goaway(&mut self.cout, self.last_client_stream, frame::NO_ERROR);
            self.goaway_sent = true;
        }
    }

    /// Takes one reset from the client's allowance; past it, the connection is closed.
    pub(super) fn charge_reset(&mut self) -> Result<(), ConnError> {
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
    pub(super) fn poll_timers(&mut self, cx: &mut Context<'_>) -> bool {
        let handshakes = self
            .upstreams
            .iter()
            .any(|u| !u.ready && u.failed.is_none());
        if self.timed == 0 && !handshakes && self.idle_release_at.is_none() {
            return false;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        let mut fired = false;
        // The idle release is checked at most every IDLE_RELEASE: a busy connection whose
        // streams come and go does not move the timer on every stream.
        if let Some(at) = self.idle_release_at {
            let idle_until = self.last_active + IDLE_RELEASE;
            if at > now {
                next = Some(at);
            } else if self.streams.is_empty() && idle_until <= now {
                self.idle_release_at = None;
                self.release_idle_buffers();
            } else {
                let at = if self.streams.is_empty() {
                    idle_until
                } else {
                    now + IDLE_RELEASE
                };
                self.idle_release_at = Some(at);
                next = Some(at);
            }
        }
        // Upstream connections still waiting for their first SETTINGS.
        for up in self
            .upstreams
            .iter_mut()
            .filter(|u| !u.ready && u.failed.is_none())
        {
            let at = up.opened_at + SETTINGS_TIMEOUT;
            if at <= now {
                up.failed = Some(format!("no SETTINGS within {SETTINGS_TIMEOUT:?}"));
                fired = true;
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        // Streams' deadlines and delays: scanned only when some stream has one.
        for (&id, s) in self
            .streams
            .iter()
            .take(if self.timed > 0 { usize::MAX } else { 0 })
        {
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
        fired |= !due.is_empty();
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
                if stream.retry.as_ref().is_some_and(|r| r.pending) {
                    self.next_attempt(id);
                    continue;
                }
                self.queued.push_back(id);
                continue;
            }
            if stream.deadline.is_some_and(|dl| dl <= now) && !stream.responded {
                let message = stream.timeout_message;
                if let Some(target) = stream.target.as_mut() {
                    drop(target.outstanding.take());
                }
                // A per-try timeout may be retried; the request's own deadline may not.
                let per_try = !stream
                    .retry
                    .as_ref()
                    .is_some_and(|r| r.request_expired(now));
                if per_try && self.retry(id, retry::Failure::Timeout) {
                    continue;
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

/// Body bytes in a queue of pieces.
pub(super) fn queued_bytes<'a>(pieces: impl IntoIterator<Item = &'a Piece>) -> i64 {
    pieces
        .into_iter()
        .map(|p| match p {
            Piece::Data(b, _) => b.len() as i64,
            Piece::Trailers(_) => 0,
        })
        .sum()
}

impl Stream {
    /// Drops what waits to go upstream; returns what of it the client is still owed
    /// credit for (bytes queued to be sent again for a retry were credited the first time).
    pub(super) fn take_request_queue(&mut self) -> i64 {
        let held = queued_bytes(&self.to_upstream);
        self.to_upstream.clear();
        let replayed = self
            .retry
            .as_mut()
            .map_or(0, |r| std::mem::take(&mut r.replayed));
        (held - replayed).max(0)
    }

    pub(super) fn new(
        log: StreamLog,
        end: bool,
        declared_length: Option<u64>,
        send_window: i64,
    ) -> Self {
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
            retry: None,
            data_conn: None,
            log,
        }
    }
}

impl StreamLog {
    pub(super) fn unparsed(started: Instant) -> Self {
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
            attempts: 1,
        }
    }
}
