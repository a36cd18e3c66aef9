//! The server side of the relay: answers from PostgreSQL, matched against the queue of
//! requests, with error skipping, undo, and the retry after a stale cached plan.

use super::*;

impl Relay {
    /// Processes server output in `server.rbuf`, appending what the client should see to
    /// `to_client`. Stops at an incomplete message. Large messages are streamed in pieces.
    pub fn server_output(
        &mut self,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_client: &mut BytesMut,
        max_len: u32,
    ) -> Result<ServerEvents, String> {
        // Messages are handled in place; the buffer is out of `server` meanwhile.
        let mut rbuf = std::mem::take(&mut server.rbuf);
        let out = self.server_messages(&mut rbuf, client, server, to_client, max_len);
        server.rbuf = rbuf;
        out
    }

    fn server_messages(
        &mut self,
        rbuf: &mut BytesMut,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_client: &mut BytesMut,
        max_len: u32,
    ) -> Result<ServerEvents, String> {
        let mut ev = ServerEvents::default();
        // Handled messages are consumed once, at the end: one advance per read, not per message.
        let mut pos = 0;
        let mut wanted = 0;
        let mut out = ToClient::new(to_client, rbuf);
        let result = loop {
            let rest = &out.src[pos..];
            if self.streaming > 0 {
                let n = self.streaming.min(rest.len());
                if n == 0 {
                    break Ok(ev);
                }
                if !self.streaming_swallow {
                    out.forward(pos, pos + n);
                }
                pos += n;
                self.streaming -= n;
                continue;
            }
            let header = match frontend::peek_header(rest) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(ev),
                Err(e) => break Err(e.to_string()),
            };
            let total = header.total_len();
            let bulk = matches!(header.tag, b'D' | b'd');
            if bulk && total > STREAM_THRESHOLD {
                // Stream it: forward what we have and the rest as it arrives.
                self.streaming = total;
                self.streaming_swallow = self.swallowing();
                continue;
            }
            if header.len > max_len {
                break Err(format!(
                    "server message of {} bytes exceeds max_packet_size",
                    header.len
                ));
            }
            if rest.len() < total {
                wanted = total;
                break Ok(ev);
            }
            self.server_message(header.tag, pos, total, client, server, &mut out, &mut ev);
            pos += total;
        };
        out.flush();
        crate::io::consume(rbuf, pos);
        if rbuf.len() < wanted {
            rbuf.reserve(wanted - rbuf.len());
        }
        result
    }

    fn swallowing(&self) -> bool {
        matches!(self.queue.front(), Some(Entry::Query { swallow: true, .. }))
    }

    /// Handles the message at `src[at..at + len]` of `out`.
    #[allow(clippy::too_many_arguments)]
    fn server_message(
        &mut self,
        tag: u8,
        at: usize,
        len: usize,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        out: &mut ToClient<'_>,
        ev: &mut ServerEvents,
    ) {
        let src = out.src;
        let body = &src[at + 5..at + len];
        let mut forward = !self.swallowing();
        match tag {
            b'1' => {
                if let Some(Entry::Parse { swallow, .. }) = self.queue.front() {
                    forward = !*swallow;
                    self.queue.pop_front();
                }
            }
            b'2' => {
                if let Some(Entry::Bind { at, .. }) = self.queue.front() {
                    // usize::MAX marks a Bind Sluice injected itself.
                    forward = *at != usize::MAX;
                    self.queue.pop_front();
                }
            }
            b'3' => {
                if let Some(Entry::Close { swallow, .. }) = self.queue.front() {
                    forward = !*swallow;
                    self.queue.pop_front();
                }
            }
            b't' => {
                if self.skip_param_description {
                    self.skip_param_description = false;
                    forward = false;
                }
                self.described = true;
            }
            b'T' | b'n' => {
                self.described = false;
                self.pop_if(|e| matches!(e, Entry::Describe { .. }));
            }
            b'C' | b'I' | b's' => {
                if tag == b'C' {
                    self.copy_in = false;
                    // How a transaction block ended decides the fate of SETs made inside it.
                    // The body is the command tag as a C string; compared as bytes, since
                    // every other tag (SELECT 1, UPDATE 3, ...) needs no decoding here.
                    match body {
                        b"COMMIT\0" => self.block_end = Some(true),
                        b"ROLLBACK\0" => self.block_end = Some(false),
                        _ => {}
                    }
                }
                if let Some(Entry::Execute { set, .. }) = self.queue.front_mut() {
                    self.executed = true;
                    if let Some(change) = set.take() {
                        self.executed_changes.push(change);
                    }
                }
                self.pop_if(|e| matches!(e, Entry::Execute { .. }));
            }
            b'G' => {
                self.copy_in = true;
                // COPY FROM STDIN through the extended protocol: the server ignores Sync while
                // in copy-in mode, so a Sync the client sent right after the Execute (libpq and
                // tokio-postgres do) gets no answer. Its entry goes; the Sync after CopyDone
                // gets the ReadyForQuery.
                if matches!(self.queue.front(), Some(Entry::Execute { .. })) {
                    while matches!(self.queue.get(1), Some(Entry::Sync)) {
                        self.queue.remove(1);
                    }
                }
            }
            b'E' => {
                ev.error = true;
                self.copy_in = false;
                // The failed implicit transaction or block takes its SETs with it.
                self.executed_changes.clear();
                if let Ok(f) = backend::decode_error_fields(body) {
                    if matches!(
                        f.severity,
                        sluice_wire::Severity::Fatal | sluice_wire::Severity::Panic
                    ) {
                        // The server is closing this connection; the client hears 08006 from
                        // Sluice, with the server's reason, instead of a FATAL meant for Sluice.
                        server.broken = true;
                        server.fatal = Some(f.message);
                        self.drain_synth(out, server.status);
                        return;
                    }
                }
                self.on_error(body, client, server, &mut forward);
            }
            b'Z' => {
                ev.ready = true;
                if let Ok(status) = backend::decode_ready_for_query(body) {
                    server.status = status;
                }
                self.copy_in = false;
                if server.status == TransactionStatus::Idle && !self.pending_changes.is_empty() {
                    let changes = std::mem::take(&mut self.pending_changes);
                    if self.block_end == Some(true) {
                        for change in changes {
                            apply_change(change, client.params, server);
                        }
                    }
                }
                if !self.executed_changes.is_empty() {
                    let changes = std::mem::take(&mut self.executed_changes);
                    match server.status {
                        TransactionStatus::Idle if self.block_end != Some(false) => {
                            for change in changes {
                                apply_change(change, client.params, server);
                            }
                        }
                        // Inside a transaction block: kept only if it commits.
                        TransactionStatus::InBlock => self.pending_changes.extend(changes),
                        _ => {}
                    }
                }
                if server.status == TransactionStatus::Idle {
                    self.rolled_back = self.block_end == Some(false);
                    self.block_end = None;
                }
                match self.queue.pop_front() {
                    Some(Entry::Query {
                        set,
                        failed,
                        swallow,
                    }) => {
                        if let (false, false, Some(change)) = (failed, swallow, set) {
                            if server.status == TransactionStatus::Idle {
                                apply_change(change, client.params, server);
                            } else {
                                // Inside a transaction block: kept only if it commits.
                                self.pending_changes.push(change);
                            }
                        }
                    }
                    Some(Entry::Sync) => {
                        if let Some(from) = self.retry_from.take() {
                            // Re-run the rest of the batch: the client never saw it fail.
                            forward = false;
                            ev.ready = false;
                            self.retries += 1;
                            self.replay(from, client, server, out.flush());
                        }
                    }
                    None => {}
                    Some(other) => {
                        // Out of step: keep the entry for its answer that has not come.
                        self.queue.push_front(other);
                    }
                }
            }
            b'S' => {
                if let Ok((name, value)) = backend::decode_parameter_status(body) {
                    let key = name.to_ascii_lowercase();
                    server.params.insert(key.clone(), value.to_string());
                    if forward && TRACKED_REPORTED.contains(&key.as_str()) {
                        client
                            .params
                            .set(name, ParamValue::Literal(value.to_string()));
                        server
                            .applied
                            .insert(key, ParamValue::Literal(value.to_string()));
                    }
                }
            }
            _ => {}
        }
        if forward {
            out.forward(at, at + len);
        }
        self.drain_synth(out, server.status);
    }

    fn pop_if(&mut self, f: impl Fn(&Entry) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
    }

    /// Sends the answers Sluice owes the client that are now at the head of the queue.
    /// Inline: it runs after every server message, and there is rarely anything to send.
    #[inline]
    /// Sends the answers Sluice gives itself that are next in line. `status` is the server's
    /// transaction status now: a ReadyForQuery answered here, queued behind the server's answers
    /// (a DEALLOCATE pipelined after BEGIN), reports it as the server would.
    fn drain_synth(&mut self, out: &mut ToClient<'_>, status: TransactionStatus) {
        if matches!(self.queue.front(), Some(Entry::Synth { .. })) {
            self.emit_synth(out, status);
        }
    }

    #[inline(never)]
    fn emit_synth(&mut self, out: &mut ToClient<'_>, status: TransactionStatus) {
        while let Some(Entry::Synth { .. }) = self.queue.front() {
            if let Some(Entry::Synth { msg, .. }) = self.queue.pop_front() {
                let msg = match msg {
                    Synth::Ready(_) => Synth::Ready(status),
                    other => other,
                };
                emit(&msg, out.flush());
            }
        }
    }

    fn on_error(
        &mut self,
        body: &[u8],
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        forward: &mut bool,
    ) {
        self.saw_error = true;
        let fields = backend::decode_error_fields(body).ok();
        let described = std::mem::take(&mut self.described);
        if let Some(f) = &fields {
            if f.code == SqlState::FEATURE_NOT_SUPPORTED
                && f.message
                    .starts_with("cached plan must not change result type")
            {
                self.invalidate_head(client, server);
                if let Some(at) = self.retry_point() {
                    // Safe to retry: hide the error, let the server skip to Sync, then replay.
                    self.retry_from = Some(at);
                    self.skip_param_description =
                        described && matches!(self.queue.front(), Some(Entry::Describe { .. }));
                    self.saw_error = false;
                    *forward = false;
                    while let Some(e) = self.queue.front() {
                        if matches!(e, Entry::Sync) {
                            break;
                        }
                        if let Some(e) = self.queue.pop_front() {
                            undo(e, client, server);
                        }
                    }
                    return;
                }
            }
        }
        match self.queue.front_mut() {
            Some(Entry::Query {
                failed, swallow, ..
            }) => {
                *failed = true;
                if *swallow {
                    // Sluice's own SET failed: the session state is unknown now.
                    server.broken = true;
                    *forward = false;
                }
            }
            Some(_) => {
                // Extended protocol: the server skips everything until Sync. The error itself
                // belongs to the client, even when an injected Parse caused it.
                *forward = true;
                while let Some(e) = self.queue.front() {
                    if matches!(e, Entry::Sync) {
                        break;
                    }
                    if let Some(e) = self.queue.pop_front() {
                        undo(e, client, server);
                    }
                }
                if self.queue.is_empty() {
                    // The batch's Sync has not come yet: the server ignores everything up to
                    // it, so the client's next messages until then must not be forwarded and
                    // expect answers.
                    self.skip_until_sync = true;
                }
            }
            None => {}
        }
    }

    /// Where a batch that failed with a stale cached plan can be replayed from, if that is
    /// safe: outside a transaction block, first attempt, nothing executed yet in the batch, the
    /// failing message is a Bind of a named statement, it is the last batch sent, and the client
    /// describes the result in this batch (so it learns the new row shape).
    fn retry_point(&self) -> Option<usize> {
        if self.retries > 0 || self.executed || self.batch_start != Some(TransactionStatus::Idle) {
            return None;
        }
        let syncs = self
            .queue
            .iter()
            .filter(|e| matches!(e, Entry::Sync))
            .count();
        if syncs != 1 || !self.batch.is_empty() {
            return None;
        }
        match self.queue.front() {
            // Describing a statement executes nothing: always safe to replay.
            Some(Entry::Describe { stmt: Some(_), at }) if *at != usize::MAX => Some(*at),
            Some(Entry::Bind { stmt: Some(_), at }) if *at != usize::MAX => {
                if *at > self.sent_batch.len() {
                    return None;
                }
                let describes = self
                    .sent_batch
                    .messages_from(*at)
                    .any(|m| m.first() == Some(&b'D'));
                describes.then_some(*at)
            }
            _ => None,
        }
    }

    fn replay(
        &mut self,
        from: usize,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_client: &mut BytesMut,
    ) {
        // Replaying refills the batch, so work from a copy (a rare path).
        let msgs = self.sent_batch.clone();
        if let Some(stale) = self.invalidated.take() {
            // The replay describes the result, so this client moves to the fresh statement.
            client.statements.refresh(&stale, client.registry);
        }
        let mut up = std::mem::take(&mut self.upstream);
        self.close_orphans(server, &mut up);
        for raw in msgs.messages_from(from) {
            let Ok(Some(header)) = frontend::peek_header(raw) else {
                continue;
            };
            let status = server.status;
            self.client_message(header, raw, client, server, &mut up, to_client, status);
        }
        self.upstream = up;
    }

    fn invalidate_head(&mut self, client: &mut ClientSide<'_>, server: &mut ServerConn) {
        let stmt = self.queue.iter().find_map(|e| match e {
            Entry::Bind { stmt: Some(s), .. }
            | Entry::Describe { stmt: Some(s), .. }
            | Entry::Execute { stmt: Some(s), .. } => Some(s.clone()),
            _ => None,
        });
        if let Some(s) = stmt {
            client.registry.invalidate(&s);
            server.statements.remove(s.id);
            server.statements.orphans.push(s.server_name.clone());
            self.invalidated = Some(s);
        }
    }
}

pub(super) fn undo(e: Entry, client: &mut ClientSide<'_>, server: &mut ServerConn) {
    let name_undo = match e {
        Entry::Parse {
            server_stmt, undo, ..
        } => {
            if let Some(id) = server_stmt {
                server.statements.remove(id);
            }
            undo
        }
        Entry::Close {
            evicted: Some((id, name)),
            ..
        } => {
            server.statements.restore(id, name);
            None
        }
        Entry::Synth { undo, .. } => undo,
        _ => None,
    };
    if let Some(NameUndo { name, previous }) = name_undo {
        match previous {
            Some(p) => {
                client.statements.insert(name, p);
            }
            None => {
                client.statements.remove(&name);
            }
        }
    }
}

pub(super) fn apply_change(
    change: SessionChange,
    params: &mut ClientParams,
    server: &mut ServerConn,
) {
    match change {
        SessionChange::Set(name, value) => {
            let v = ParamValue::Sql(value);
            server.applied.insert(name.to_ascii_lowercase(), v.clone());
            params.set(&name, v);
        }
        SessionChange::Reset(name) => {
            params.reset(&name);
            server.applied.remove(&name.to_ascii_lowercase());
        }
        SessionChange::ResetAll => {
            params.reset_all();
            server.applied.clear();
        }
        SessionChange::Several(changes) => {
            for change in changes {
                apply_change(change, params, server);
            }
        }
    }
}

/// The client's output buffer while one read's server messages are handled. Forwarded messages
/// that follow each other in the read buffer are copied in one piece (a result set's rows go
/// out in a single copy); anything Sluice writes itself first flushes that run, so the order
/// of the stream is kept.
struct ToClient<'a> {
    buf: &'a mut BytesMut,
    src: &'a [u8],
    /// The run of `src` to copy, not yet in `buf`.
    run: std::ops::Range<usize>,
}

impl<'a> ToClient<'a> {
    fn new(buf: &'a mut BytesMut, src: &'a [u8]) -> Self {
        ToClient {
            buf,
            src,
            run: 0..0,
        }
    }

    /// Forwards `src[start..end]`.
    fn forward(&mut self, start: usize, end: usize) {
        if self.run.end != start || self.run.is_empty() {
            self.flush();
            self.run.start = start;
        }
        self.run.end = end;
    }

    /// Copies the pending run and returns the buffer, for writing after it.
    fn flush(&mut self) -> &mut BytesMut {
        if !self.run.is_empty() {
            self.buf.extend_from_slice(&self.src[self.run.clone()]);
            self.run = 0..0;
        }
        self.buf
    }
}

pub(super) fn emit(msg: &Synth, to_client: &mut BytesMut) {
    match msg {
        Synth::ParseComplete => backend::encode_parse_complete(to_client),
        Synth::CloseComplete => backend::encode_close_complete(to_client),
        Synth::CommandComplete(tag) => backend::encode_command_complete(to_client, tag),
        Synth::Ready(status) => backend::encode_ready_for_query(to_client, *status),
    }
}
