//! The relay loop: one transaction's bytes between client and server, with the IO the
//! relay state machine leaves out.

use tokio::io::AsyncWrite;

use super::*;

/// What ended one wait of the relay loop.
enum Event {
    /// Bytes moved (a write, or a read from the client): look at the buffers again.
    Progress,
    /// The server sent bytes.
    ServerData,
    ServerClosed,
    ServerWriteFailed,
    ClientClosed,
    IdleTimeout,
    Killed,
}

impl Session {
    /// Relays between client and server until the server connection is free.
    pub(super) async fn relay(
        &mut self,
        io: &mut ClientIo,
        guard: &mut ServerGuard,
        timeout_ms: Option<u32>,
    ) -> Result<Box<Relay>, End> {
        let Settings {
            max_packet_size: max,
            idle_transaction_timeout: idle_tx,
            ..
        } = *self.settings();
        let server: &mut ServerConn = guard;
        let mut relay = self.relay.take().unwrap_or_default();
        relay.reset();
        let mut to_server = std::mem::take(&mut self.to_server);
        to_server.clear();
        relay.close_orphans(server, &mut to_server);
        if !server.params_for.take_matches(&self.params) {
            if let Some(sql) = self.params.diff(&server.params, &mut server.applied) {
                relay.inject_query(&sql, &mut to_server);
            }
        }
        // A statement timeout the policy chose for this transaction: set on the server session
        // (pipelined with the first statement, its answers swallowed) and recorded as Sluice's
        // own setting, so the next transaction's parameter sync puts back what its client wants.
        let timed = timeout_ms.is_some();
        if let Some(ms) = timeout_ms {
            let value = ParamValue::Sql(format!("'{ms}ms'"));
            relay.inject_query(
                &format!("SET statement_timeout = {}", value.to_sql()),
                &mut to_server,
            );
            server.applied.insert("statement_timeout".into(), value);
        }
        // The current wait for the client inside the transaction, under idle_transaction_timeout.
        let mut idle_wait: Option<IdleWait> = None;
        // The transaction's first message was judged before checkout; later statements here.
        let mut first_message = true;
        // The client sent Terminate after messages still to be answered: the server finishes
        // them for nobody, as PostgreSQL would (a pipelined COMMIT commits).
        let mut client_left = false;
        // Whoever had this connection before registered its own waker.
        self.server_read.disarm();
        loop {
            // Forward every whole client message.
            loop {
                let header = match frontend::peek_header(&io.rbuf) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return Err(self.protocol_error(io, e.to_string()).await),
                };
                if header.len > max {
                    return Err(self
                        .protocol_error(
                            io,
                            format!("message of {} bytes exceeds max_packet_size", header.len),
                        )
                        .await);
                }
                if header.tag == b'X' {
                    if relay.started && !(relay.done(server) && to_server.is_empty()) {
                        io.rbuf.clear();
                        client_left = true;
                        break;
                    }
                    return Err(End::Client);
                }
                if io.rbuf.len() < header.total_len() {
                    io.rbuf.reserve(header.total_len() - io.rbuf.len());
                    break;
                }
                // A new transaction after this one finished goes through the scheduler again.
                if relay.started && relay.done(server) {
                    break;
                }
                // A DISCARD ALL or DEALLOCATE pipelined behind unanswered messages (a BEGIN)
                // waits for their answers: what Sluice answers depends on the status they leave.
                if header.tag == b'Q'
                    && relay.answers_coming()
                    && crate::relay::may_be_answered_here(&io.rbuf[5..header.total_len()])
                {
                    break;
                }
                let total = header.total_len();
                let status = server.status;
                let judged = std::mem::replace(&mut first_message, false);
                if matches!(header.tag, b'Q' | b'P')
                    && !judged
                    && self.shared.policy.wants(Hook::Query)
                {
                    if let Some(r) = self.judge_statement(&io.rbuf[..total], header.tag, status) {
                        relay.reject_statement(header.tag, r, &mut to_server);
                        consume(&mut io.rbuf, total);
                        continue;
                    }
                }
                server.quiet = false;
                let mut side = ClientSide {
                    statements: &mut self.statements,
                    params: &mut self.params,
                    registry: &self.shared.registry,
                };
                relay.client_message(
                    header,
                    &io.rbuf[..total],
                    &mut side,
                    server,
                    &mut to_server,
                    &mut io.wbuf,
                    status,
                );
                consume(&mut io.rbuf, total);
            }
            // Write what we can right away: most of the time the sockets take it all and the
            // loop waits only for the next answer, not for writability.
            if !to_server.is_empty() {
                match server.stream.try_write(&to_server) {
                    Ok(n) => consume(&mut to_server, n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(lost_while_sending(server, io).await),
                }
            }
            if client_left {
                io.wbuf.clear();
                // A COPY FROM STDIN would wait for data that will not come.
                if relay.copying_in() || (to_server.is_empty() && !relay.waiting_for_server()) {
                    // Everything it sent was answered. Left inside a transaction block, the
                    // session's abandon rolls it back.
                    return Err(End::Client);
                }
            }
            if !io.wbuf.is_empty() {
                match io.stream.try_write(&io.wbuf) {
                    Ok(n) => consume(&mut io.wbuf, n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(End::Client),
                }
            }
            if relay.started && relay.done(server) && to_server.is_empty() {
                // A policy's statement_timeout, or a DISCARD ALL answered here, left the server
                // session different from what the client's wishes say.
                if !timed && !relay.wishes_diverged() {
                    server.params_for.set(self.params.wishes());
                }
                if idle_wait.is_some() {
                    self.info.idle.disarm();
                }
                if !io.wbuf.is_empty() {
                    io.flush().await.map_err(|_| End::Client)?;
                }
                self.to_server = to_server;
                return Ok(relay);
            }
            let read_client = !client_left && to_server.len() < HIGH_WATER;
            let read_server = io.wbuf.len() < HIGH_WATER;
            // The idle-in-transaction clock runs while the client owes the next message, and
            // restarts at every event.
            if let Some(t) = idle_tx {
                if !relay.waiting_for_server() && server.status != TransactionStatus::Idle {
                    idle_wait = Some(IdleWait::start(&self.info, &self.shared.coarse_clock, t));
                } else if idle_wait.take().is_some() {
                    self.info.idle.disarm();
                }
            }
            // One hand-written poll over both sockets, the timer and the kill switch, in this
            // order of priority: the server's answers first, then writes, then the client.
            let event = std::future::poll_fn(|cx| {
                if read_server {
                    let read = self.server_read.poll(cx, |cx| {
                        poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.rbuf)
                    });
                    match read {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Event::ServerClosed),
                        Poll::Ready(Ok(_)) => return Poll::Ready(Event::ServerData),
                        Poll::Pending => {}
                    }
                }
                if !io.wbuf.is_empty() {
                    match Pin::new(&mut io.stream).poll_write(cx, &io.wbuf) {
                        Poll::Ready(Ok(n)) => {
                            consume(&mut io.wbuf, n);
                            return Poll::Ready(Event::Progress);
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Event::ClientClosed),
                        Poll::Pending => {}
                    }
                }
                if !to_server.is_empty() {
                    match Pin::new(&mut server.stream).poll_write(cx, &to_server) {
                        Poll::Ready(Ok(n)) => {
                            consume(&mut to_server, n);
                            return Poll::Ready(Event::Progress);
                        }
                        Poll::Ready(Err(_)) => return Poll::Ready(Event::ServerWriteFailed),
                        Poll::Pending => {}
                    }
                }
                if read_client {
                    match io.poll_fill(cx) {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Event::ClientClosed),
                        Poll::Ready(Ok(_)) => return Poll::Ready(Event::Progress),
                        Poll::Pending => {}
                    }
                }
                // The maintenance tick wakes the task through the kill switch.
                if idle_wait.is_some_and(|w| w.timed_out(&self.info)) {
                    return Poll::Ready(Event::IdleTimeout);
                }
                // The session's task watches the switch (see serve_inner).
                if self.info.kill.is_flipped() {
                    return Poll::Ready(Event::Killed);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Progress => {}
                Event::ServerData => {
                    let mut side = ClientSide {
                        statements: &mut self.statements,
                        params: &mut self.params,
                        registry: &self.shared.registry,
                    };
                    let out = relay.server_output(&mut side, server, &mut io.wbuf, max);
                    server.quiet = relay.quiescent();
                    if !relay.upstream.is_empty() {
                        to_server.extend_from_slice(&relay.upstream);
                        relay.upstream.clear();
                    }
                    if let Err(e) = out {
                        server.broken = true;
                        let f = ErrorFields::fatal(
                            SqlState::CONNECTION_FAILURE,
                            format!("server connection lost: {e}"),
                        );
                        io.send_error(&f).await;
                        return Err(End::Server(e));
                    }
                }
                Event::ServerClosed => {
                    server.broken = true;
                    let mut f = ErrorFields::fatal(
                        SqlState::CONNECTION_FAILURE,
                        "server connection lost: the server closed the connection unexpectedly",
                    );
                    if let Some(reason) = server.fatal.take() {
                        f = f.with_detail(format!("The server said: {reason}"));
                    }
                    io.send_error(&f).await;
                    return Err(End::Server(f.message));
                }
                Event::ServerWriteFailed => return Err(lost_while_sending(server, io).await),
                Event::ClientClosed => return Err(End::Client),
                Event::IdleTimeout => {
                    io.send_error(&ErrorFields::fatal(
                        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        "idle_transaction_timeout: terminating connection due to idle-in-transaction timeout",
                    ))
                    .await;
                    return Err(End::Timeout("idle_transaction_timeout"));
                }
                Event::Killed => return Err(End::Terminated),
            }
        }
    }

    /// Runs `on-query` for a statement inside a running transaction; `Some` to refuse it.
    pub(super) fn judge_statement(
        &self,
        raw: &[u8],
        tag: u8,
        status: TransactionStatus,
    ) -> Option<ErrorFields> {
        let query = self.statement_text(raw, tag);
        let (size, active, idle, waiting) = self.pool.pool.load();
        let facts = TransactionFacts {
            cookies: &self.admitted.cookies,
            class: &self.class_name,
            kind: sluice_policy::statement_kind(&query),
            in_transaction: status != TransactionStatus::Idle,
            query: &query,
            pool: sluice_policy::PoolSnapshot {
                size,
                active,
                idle,
                waiting,
            },
        };
        let decision = self.shared.policy.on_query(&facts);
        clock::expire();
        match decision {
            TransactionDecision::Proceed(_) => None,
            TransactionDecision::Reject(r) => {
                self.shared.stats.rejected.add(1);
                let code = SqlState::parse(r.sqlstate.as_str())
                    .unwrap_or(SqlState::INSUFFICIENT_PRIVILEGE);
                Some(ErrorFields::error(code, r.message))
            }
        }
    }
}

/// The server connection broke while Sluice was sending to it: the client hears 08006.
async fn lost_while_sending(server: &mut ServerConn, io: &mut ClientIo) -> End {
    server.broken = true;
    let f = ErrorFields::fatal(
        SqlState::CONNECTION_FAILURE,
        "server connection lost while sending",
    );
    io.send_error(&f).await;
    End::Server(f.message)
}

/// Sends one simple query and reads to ReadyForQuery. Returns the ParameterStatus values seen,
/// or the server's error.
pub(super) async fn run_simple(
    server: &mut ServerConn,
    query: &[u8],
) -> Result<Vec<(String, String)>, ErrorFields> {
    let io_err = |e: std::io::Error| {
        ErrorFields::error(
            SqlState::CONNECTION_FAILURE,
            format!("server connection lost: {e}"),
        )
    };
    // Broken until the answer is read whole: if this future is dropped half-way (a login
    // timeout, a hard stop), the connection must not go back to the pool mid-query.
    let was_broken = std::mem::replace(&mut server.broken, true);
    server.stream.write_all(query).await.map_err(io_err)?;
    let mut reported = Vec::new();
    let mut error = None;
    loop {
        match frontend::split_message(&mut server.rbuf, 1 << 20) {
            Ok(Some((h, body))) => match h.tag {
                b'S' => {
                    if let Ok((k, v)) = backend::decode_parameter_status(&body) {
                        server.params.insert(k.to_ascii_lowercase(), v.to_string());
                        reported.push((k.to_string(), v.to_string()));
                    }
                }
                b'E' => error = backend::decode_error_fields(&body).ok(),
                b'Z' => {
                    if let Ok(s) = backend::decode_ready_for_query(&body) {
                        server.status = s;
                    }
                    server.broken = was_broken;
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(reported),
                    };
                }
                _ => {}
            },
            Ok(None) => {
                let n = server
                    .stream
                    .read_buf(&mut server.rbuf)
                    .await
                    .map_err(io_err)?;
                if n == 0 {
                    server.broken = true;
                    return Err(ErrorFields::error(
                        SqlState::CONNECTION_FAILURE,
                        "server closed the connection",
                    ));
                }
            }
            Err(e) => {
                server.broken = true;
                return Err(ErrorFields::error(
                    SqlState::CONNECTION_FAILURE,
                    e.to_string(),
                ));
            }
        }
    }
}
