//! The transaction relay: a state machine with no IO that carries one client's messages to its
//! server connection and the server's answers back, while a transaction runs.
//!
//! It keeps a queue with one entry per request that expects an answer, in the order the server
//! will answer. That queue is what lets Sluice:
//! - know when the server connection is free again (queue empty, ReadyForQuery 'I', no batch
//!   left open);
//! - rename prepared statements, prepare them lazily on a connection that lacks them, and answer
//!   ParseComplete/CloseComplete itself, in the right place in the stream;
//! - swallow the answers to messages it injected itself (Parse, Close, SET);
//! - after an error, drop the entries the server will skip until the next Sync, and undo what
//!   they would have changed.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use sluice_wire::backend::{self, TransactionStatus};
use sluice_wire::frontend::{self, FrontendMessage, Header};
use sluice_wire::sql::{self, SessionCommand};
use sluice_wire::{ErrorFields, SqlState};

use crate::params::{ClientParams, ParamValue, TRACKED_REPORTED};
use crate::prepared::{ClientStatements, Registry, Statement};
use crate::server::ServerConn;

/// Messages larger than this are streamed through in pieces instead of buffered whole.
pub const STREAM_THRESHOLD: usize = 64 * 1024;

/// What Sluice answers in place of the server.
#[derive(Debug, Clone)]
enum Synth {
    ParseComplete,
    CloseComplete,
    CommandComplete(&'static str),
    Ready(TransactionStatus),
    Error(Box<ErrorFields>),
}

/// Undo information for an optimistic change to the client's statement names.
#[derive(Debug)]
struct NameUndo {
    name: Bytes,
    previous: Option<Arc<Statement>>,
}

#[derive(Debug)]
enum Entry {
    /// A simple query or function call; its answers run until ReadyForQuery.
    Query {
        swallow: bool,
        set: Option<SessionChange>,
        failed: bool,
    },
    Parse {
        swallow: bool,
        /// Statement prepared on the server by this Parse: forgotten if it fails.
        server_stmt: Option<u64>,
        undo: Option<NameUndo>,
    },
    Bind {
        stmt: Option<Arc<Statement>>,
        /// Index of this Bind in its batch, for a retry.
        at: usize,
    },
    Describe {
        stmt: Option<Arc<Statement>>,
        /// Index of a statement Describe in its batch, for a retry (`usize::MAX` otherwise).
        at: usize,
    },
    Execute {
        stmt: Option<Arc<Statement>>,
    },
    Close {
        swallow: bool,
        /// An eviction Sluice injected: if skipped, the statement is still there.
        evicted: Option<(u64, Bytes)>,
    },
    Synth {
        msg: Synth,
        undo: Option<NameUndo>,
    },
    Sync,
}

/// A session-level SET/RESET seen in a simple query, applied when the query succeeds.
#[derive(Debug, Clone)]
pub enum SessionChange {
    /// `SET name = value`.
    Set(String, String),
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
}

/// The client-side state the relay reads and updates.
pub struct ClientSide<'a> {
    /// The client's prepared statement names.
    pub statements: &'a mut ClientStatements,
    /// The client's session parameters.
    pub params: &'a mut ClientParams,
    /// The shared statement registry.
    pub registry: &'a Registry,
}

/// What happened while processing server output, for the session to act on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServerEvents {
    /// A ReadyForQuery arrived.
    pub ready: bool,
    /// An ErrorResponse was relayed.
    pub error: bool,
}

/// The relay state of one attached server connection.
#[derive(Debug, Default)]
pub struct Relay {
    queue: VecDeque<Entry>,
    /// Extended-protocol messages were sent since the last Sync.
    unsynced: bool,
    /// A Sluice-side error was reported: drop client messages until Sync, as the server would.
    skip_until_sync: bool,
    /// The statement of the last Bind, for the Execute that follows.
    last_bind: Option<Arc<Statement>>,
    /// Bytes of a large message still to stream to the client.
    streaming: usize,
    /// Whether those bytes are swallowed.
    streaming_swallow: bool,
    /// The client is sending COPY data.
    copy_in: bool,
    /// A statement in this transaction failed.
    pub saw_error: bool,
    /// Messages forwarded to the server in this transaction (for stats).
    pub queries: u64,
    /// A client message was handled: the transaction has begun.
    pub started: bool,
    /// Raw client messages of the extended-protocol batch being sent (since the last Sync).
    batch: Vec<Bytes>,
    /// The batch's messages once its Sync went out, kept for a retry after DDL.
    sent_batch: Vec<Bytes>,
    /// Server status when the current batch began.
    batch_start: Option<TransactionStatus>,
    /// An Execute of the current batch has already answered (a retry would repeat it).
    executed: bool,
    /// Replay `sent_batch[i..]` when the batch's ReadyForQuery arrives (cached-plan retry).
    retry_from: Option<usize>,
    /// Messages Sluice must send upstream on its own (a retry), drained by the session.
    pub upstream: BytesMut,
    /// Retries done in this transaction.
    pub retries: u32,
    /// A statement refused by policy inside this batch: the server raises it at the Sync.
    raise_at_sync: Option<ErrorFields>,
    /// The head Describe already sent its ParameterDescription to the client.
    described: bool,
    /// Swallow the next ParameterDescription: the client has it from the failed attempt.
    skip_param_description: bool,
    /// The statement this batch found stale (remapped for the client on retry).
    invalidated: Option<Arc<Statement>>,
}

impl Relay {
    /// Clears the state for a new transaction, keeping allocated memory.
    pub fn reset(&mut self) {
        self.queue.clear();
        self.batch.clear();
        self.sent_batch.clear();
        self.upstream.clear();
        self.unsynced = false;
        self.skip_until_sync = false;
        self.last_bind = None;
        self.streaming = 0;
        self.streaming_swallow = false;
        self.copy_in = false;
        self.saw_error = false;
        self.queries = 0;
        self.started = false;
        self.batch_start = None;
        self.executed = false;
        self.retry_from = None;
        self.retries = 0;
        self.raise_at_sync = None;
        self.described = false;
        self.skip_param_description = false;
        self.invalidated = None;
    }

    /// Whether the server connection can be released: nothing outstanding, idle, no open batch.
    pub fn done(&self, server: &ServerConn) -> bool {
        self.queue.is_empty()
            && !self.unsynced
            && !self.skip_until_sync
            && !self.copy_in
            && self.streaming == 0
            && server.status == TransactionStatus::Idle
    }

    /// Whether nothing is in flight: no answer expected, no batch or COPY open. The server may
    /// still be inside a transaction block.
    pub fn quiescent(&self) -> bool {
        self.queue.is_empty()
            && !self.unsynced
            && !self.skip_until_sync
            && !self.copy_in
            && self.streaming == 0
    }

    /// Whether answers are still expected from the server.
    pub fn waiting_for_server(&self) -> bool {
        !self.queue.is_empty() || self.streaming > 0
    }

    /// Queues Sluice's own SET/RESET query, whose answers the client never sees.
    pub fn inject_query(&mut self, sql: &str, to_server: &mut BytesMut) {
        frontend::encode_query(to_server, sql);
        self.queue.push_back(Entry::Query {
            swallow: true,
            set: None,
            failed: false,
        });
    }

    /// Closes statements the server invalidated, before the client's messages.
    pub fn close_orphans(&mut self, server: &mut ServerConn, to_server: &mut BytesMut) {
        if server.statements.orphans.is_empty() {
            return;
        }
        for name in std::mem::take(&mut server.statements.orphans) {
            frontend::encode_close(to_server, b'S', &name);
            self.queue.push_back(Entry::Close {
                swallow: true,
                evicted: None,
            });
        }
        frontend::encode_sync(to_server);
        self.queue.push_back(Entry::Query {
            swallow: true,
            set: None,
            failed: false,
        });
    }

    fn push_synth(&mut self, msg: Synth, undo: Option<NameUndo>, to_client: &mut BytesMut) {
        if self.queue.is_empty() {
            emit(&msg, to_client);
        } else {
            self.queue.push_back(Entry::Synth { msg, undo });
        }
    }

    /// Handles one whole client message (`raw` holds exactly its bytes).
    #[allow(clippy::too_many_arguments)]
    pub fn client_message(
        &mut self,
        header: Header,
        raw: Bytes,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
        server_status: TransactionStatus,
    ) {
        let tag = header.tag;
        self.started = true;
        if self.skip_until_sync && tag != b'S' {
            return;
        }
        if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S') {
            if self.batch.is_empty() {
                self.batch_start = Some(server_status);
                self.executed = false;
            }
            self.batch.push(raw.clone());
        }
        match tag {
            b'S' => {
                self.skip_until_sync = false;
                self.unsynced = false;
                self.last_bind = None;
                if let Some(err) = self.raise_at_sync.take() {
                    // Let the server raise the refusal, so its transaction fails as it would
                    // have had the statement failed there.
                    let sql = raise_sql(&err);
                    frontend::encode_parse(to_server, b"", sql.as_bytes(), &[]);
                    frontend::encode_bind_renamed(to_server, b"", b"", &[0, 0, 0, 0, 0, 0]);
                    FrontendMessage::Execute {
                        portal: Bytes::new(),
                        max_rows: 0,
                    }
                    .encode(to_server);
                    self.queue.push_back(Entry::Parse {
                        swallow: true,
                        server_stmt: None,
                        undo: None,
                    });
                    self.queue.push_back(Entry::Bind {
                        stmt: None,
                        at: usize::MAX,
                    });
                    self.queue.push_back(Entry::Execute { stmt: None });
                }
                to_server.extend_from_slice(&raw);
                self.queue.push_back(Entry::Sync);
                // Keep both vectors' memory: the finished batch becomes the sent one.
                std::mem::swap(&mut self.sent_batch, &mut self.batch);
                self.batch.clear();
            }
            b'Q' => {
                self.queries += 1;
                let body = &raw[5..];
                let text =
                    std::str::from_utf8(body.strip_suffix(&[0]).unwrap_or(body)).unwrap_or("");
                let special = may_be_session_command(text);
                if special && self.local_query(text, client, to_client, server_status) {
                    return;
                }
                let set = if special { session_change(text) } else { None };
                if let Some(k) = special.then(|| sql::first_keyword(text)).flatten() {
                    if (k.eq_ignore_ascii_case("discard") || k.eq_ignore_ascii_case("deallocate"))
                        && set.is_none()
                    {
                        // Forwarded as-is (inside a transaction or several statements): the
                        // server's statements and settings are no longer known.
                        server.broken = true;
                    }
                }
                to_server.extend_from_slice(&raw);
                self.queue.push_back(Entry::Query {
                    swallow: false,
                    set,
                    failed: false,
                });
            }
            b'F' => {
                to_server.extend_from_slice(&raw);
                self.queue.push_back(Entry::Query {
                    swallow: false,
                    set: None,
                    failed: false,
                });
            }
            b'P' | b'B' | b'D' | b'C' => {
                self.unsynced = true;
                if let Some(entry) = self.unnamed_passthrough(tag, &raw) {
                    // Unnamed statement or portal: nothing to rename, forward the bytes as is.
                    to_server.extend_from_slice(&raw);
                    self.queue.push_back(entry);
                    return;
                }
                let mut buf = BytesMut::from(&raw[..]);
                match FrontendMessage::decode(&mut buf, u32::MAX) {
                    Ok(Some(msg)) => self.extended(msg, client, server, to_server, to_client),
                    _ => {
                        let err = ErrorFields::error(
                            SqlState::PROTOCOL_VIOLATION,
                            format!("invalid message format ('{}')", tag as char),
                        );
                        self.fail_batch(err, to_client);
                    }
                }
            }
            b'E' => {
                self.unsynced = true;
                self.queries += 1;
                to_server.extend_from_slice(&raw);
                self.queue.push_back(Entry::Execute {
                    stmt: self.last_bind.clone(),
                });
            }
            b'H' => {
                to_server.extend_from_slice(&raw);
            }
            b'd' => {
                to_server.extend_from_slice(&raw);
            }
            b'c' | b'f' => {
                self.copy_in = false;
                to_server.extend_from_slice(&raw);
            }
            _ => {
                to_server.extend_from_slice(&raw);
            }
        }
    }

    /// The queue entry for a Parse/Bind/Describe/Close that names no prepared statement, which
    /// Sluice forwards untouched; `None` when the message needs decoding.
    fn unnamed_passthrough(&mut self, tag: u8, raw: &[u8]) -> Option<Entry> {
        let body = raw.get(5..)?;
        match tag {
            b'P' if body.first() == Some(&0) => Some(Entry::Parse {
                swallow: false,
                server_stmt: None,
                undo: None,
            }),
            b'B' => {
                let portal_end = body.iter().position(|b| *b == 0)?;
                if body.get(portal_end + 1) != Some(&0) {
                    return None;
                }
                self.last_bind = None;
                let at = self.batch.len().saturating_sub(1);
                Some(Entry::Bind { stmt: None, at })
            }
            b'D' if body.first() == Some(&b'P') || body.get(1) == Some(&0) => {
                let stmt = if body.first() == Some(&b'P') {
                    self.last_bind.clone()
                } else {
                    None
                };
                Some(Entry::Describe {
                    stmt,
                    at: usize::MAX,
                })
            }
            b'C' if body.first() == Some(&b'P') => Some(Entry::Close {
                swallow: false,
                evicted: None,
            }),
            _ => None,
        }
    }

    /// Refuses a statement (Query or Parse) inside a transaction on a policy's word. The server
    /// itself raises the error (a `DO` block), so the transaction fails exactly as PostgreSQL
    /// would fail it; for a Parse, the rest of the batch is skipped up to its Sync.
    pub fn reject_statement(&mut self, tag: u8, err: ErrorFields, to_server: &mut BytesMut) {
        self.started = true;
        if tag == b'Q' {
            frontend::encode_query(to_server, &raise_sql(&err));
            self.queue.push_back(Entry::Query {
                swallow: false,
                set: None,
                failed: false,
            });
        } else {
            self.unsynced = true;
            self.skip_until_sync = true;
            self.raise_at_sync = Some(err);
        }
    }

    /// Answers DEALLOCATE / DISCARD ALL locally when they only concern this client's view.
    fn local_query(
        &mut self,
        text: &str,
        client: &mut ClientSide<'_>,
        to_client: &mut BytesMut,
        status: TransactionStatus,
    ) -> bool {
        let Some(cmd) = sql::session_command(text) else {
            return false;
        };
        let tag = match cmd {
            SessionCommand::Deallocate(name) => {
                if client.statements.remove(name.as_bytes()).is_none() {
                    return false;
                }
                "DEALLOCATE"
            }
            SessionCommand::DeallocateAll => {
                client.statements.clear();
                "DEALLOCATE ALL"
            }
            SessionCommand::DiscardAll if status == TransactionStatus::Idle => {
                client.statements.clear();
                client.params.reset_all();
                "DISCARD ALL"
            }
            _ => return false,
        };
        self.push_synth(Synth::CommandComplete(tag), None, to_client);
        self.push_synth(Synth::Ready(status), None, to_client);
        true
    }

    fn fail_batch(&mut self, err: ErrorFields, to_client: &mut BytesMut) {
        self.push_synth(Synth::Error(Box::new(err)), None, to_client);
        self.skip_until_sync = true;
    }

    /// Makes sure `stmt` exists on the server, injecting a Parse (and an eviction Close).
    fn ensure_prepared(
        &mut self,
        stmt: &Arc<Statement>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
    ) {
        if server.statements.touch(stmt.id) {
            return;
        }
        frontend::encode_parse(to_server, &stmt.server_name, &stmt.query, &stmt.param_types);
        self.queue.push_back(Entry::Parse {
            swallow: true,
            server_stmt: Some(stmt.id),
            undo: None,
        });
        self.record_prepared(stmt, server, to_server);
    }

    fn record_prepared(
        &mut self,
        stmt: &Arc<Statement>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
    ) {
        if let Some((id, name)) = server.statements.insert(stmt.id, stmt.server_name.clone()) {
            frontend::encode_close(to_server, b'S', &name);
            self.queue.push_back(Entry::Close {
                swallow: true,
                evicted: Some((id, name)),
            });
        }
    }

    fn extended(
        &mut self,
        msg: FrontendMessage,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) {
        match msg {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => {
                if name.is_empty() {
                    frontend::encode_parse(to_server, b"", &query, &param_types);
                    self.queue.push_back(Entry::Parse {
                        swallow: false,
                        server_stmt: None,
                        undo: None,
                    });
                    return;
                }
                if client.statements.contains(&name) {
                    let err = ErrorFields::error(
                        SqlState::DUPLICATE_PREPARED_STATEMENT,
                        format!(
                            "prepared statement \"{}\" already exists",
                            String::from_utf8_lossy(&name)
                        ),
                    );
                    self.fail_batch(err, to_client);
                    return;
                }
                let stmt = client.registry.get(&query, &param_types);
                let previous = client.statements.insert(name.clone(), stmt.clone());
                let undo = Some(NameUndo { name, previous });
                if server.statements.touch(stmt.id) {
                    self.push_synth(Synth::ParseComplete, undo, to_client);
                } else {
                    frontend::encode_parse(
                        to_server,
                        &stmt.server_name,
                        &stmt.query,
                        &stmt.param_types,
                    );
                    self.queue.push_back(Entry::Parse {
                        swallow: false,
                        server_stmt: Some(stmt.id),
                        undo,
                    });
                    self.record_prepared(&stmt, server, to_server);
                }
            }
            FrontendMessage::Bind {
                portal,
                statement,
                rest,
            } => {
                if statement.is_empty() {
                    frontend::encode_bind_renamed(to_server, &portal, b"", &rest);
                    self.last_bind = None;
                    let at = self.batch.len().saturating_sub(1);
                    self.queue.push_back(Entry::Bind { stmt: None, at });
                    return;
                }
                let Some(stmt) = client.statements.resolve(&statement) else {
                    self.unknown_statement(&statement, to_client);
                    return;
                };
                if stmt.is_stale() {
                    self.stale_statement(to_client);
                    return;
                }
                self.ensure_prepared(&stmt, server, to_server);
                frontend::encode_bind_renamed(to_server, &portal, &stmt.server_name, &rest);
                self.last_bind = Some(stmt.clone());
                let at = self.batch.len().saturating_sub(1);
                self.queue.push_back(Entry::Bind {
                    stmt: Some(stmt),
                    at,
                });
            }
            FrontendMessage::Describe { kind, name } => {
                if kind == b'S' && !name.is_empty() {
                    let Some(stmt) = client.statements.resolve(&name) else {
                        self.unknown_statement(&name, to_client);
                        return;
                    };
                    if stmt.is_stale() {
                        self.stale_statement(to_client);
                        return;
                    }
                    self.ensure_prepared(&stmt, server, to_server);
                    frontend::encode_describe(to_server, b'S', &stmt.server_name);
                    let at = self.batch.len().saturating_sub(1);
                    self.queue.push_back(Entry::Describe {
                        stmt: Some(stmt),
                        at,
                    });
                } else {
                    frontend::encode_describe(to_server, kind, &name);
                    self.queue.push_back(Entry::Describe {
                        stmt: if kind == b'P' {
                            self.last_bind.clone()
                        } else {
                            None
                        },
                        at: usize::MAX,
                    });
                }
            }
            FrontendMessage::Close { kind, name } => {
                if kind == b'S' && !name.is_empty() {
                    // Only this client's view changes; the shared statement stays on the server.
                    let previous = client.statements.remove(&name);
                    let undo = previous.map(|p| NameUndo {
                        name,
                        previous: Some(p),
                    });
                    self.push_synth(Synth::CloseComplete, undo, to_client);
                } else {
                    frontend::encode_close(to_server, kind, &name);
                    self.queue.push_back(Entry::Close {
                        swallow: false,
                        evicted: None,
                    });
                }
            }
            other => other.encode(to_server),
        }
    }

    /// The client's statement was prepared before DDL changed its result: PostgreSQL's error,
    /// until the client prepares it again.
    fn stale_statement(&mut self, to_client: &mut BytesMut) {
        let err = ErrorFields::error(
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        )
        .with_hint("prepare the statement again");
        self.fail_batch(err, to_client);
    }

    fn unknown_statement(&mut self, name: &[u8], to_client: &mut BytesMut) {
        let err = ErrorFields::error(
            SqlState::INVALID_SQL_STATEMENT_NAME,
            format!(
                "prepared statement \"{}\" does not exist",
                String::from_utf8_lossy(name)
            ),
        );
        self.fail_batch(err, to_client);
    }

    /// Processes server output in `server.rbuf`, appending what the client should see to
    /// `to_client`. Stops at an incomplete message. Large messages are streamed in pieces.
    pub fn server_output(
        &mut self,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_client: &mut BytesMut,
        max_len: u32,
    ) -> Result<ServerEvents, String> {
        let mut ev = ServerEvents::default();
        loop {
            if self.streaming > 0 {
                let n = self.streaming.min(server.rbuf.len());
                if n == 0 {
                    return Ok(ev);
                }
                let chunk = server.rbuf.split_to(n);
                if !self.streaming_swallow {
                    to_client.extend_from_slice(&chunk);
                }
                self.streaming -= n;
                continue;
            }
            let header = match frontend::peek_header(&server.rbuf) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(ev),
                Err(e) => return Err(e.to_string()),
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
                return Err(format!(
                    "server message of {} bytes exceeds max_packet_size",
                    header.len
                ));
            }
            if server.rbuf.len() < total {
                server.rbuf.reserve(total - server.rbuf.len());
                return Ok(ev);
            }
            let raw = server.rbuf.split_to(total).freeze();
            self.server_message(header.tag, raw, client, server, to_client, &mut ev);
        }
    }

    fn swallowing(&self) -> bool {
        matches!(self.queue.front(), Some(Entry::Query { swallow: true, .. }))
    }

    fn server_message(
        &mut self,
        tag: u8,
        raw: Bytes,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_client: &mut BytesMut,
        ev: &mut ServerEvents,
    ) {
        let body = &raw[5..];
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
                }
                if matches!(self.queue.front(), Some(Entry::Execute { .. })) {
                    self.executed = true;
                }
                self.pop_if(|e| matches!(e, Entry::Execute { .. }));
            }
            b'G' => self.copy_in = true,
            b'E' => {
                ev.error = true;
                self.copy_in = false;
                if let Ok(f) = backend::decode_error_fields(body) {
                    if matches!(
                        f.severity,
                        sluice_wire::Severity::Fatal | sluice_wire::Severity::Panic
                    ) {
                        // The server is closing this connection; the client hears 08006 from
                        // Sluice, with the server's reason, instead of a FATAL meant for Sluice.
                        server.broken = true;
                        server.fatal = Some(f.message);
                        self.drain_synth(to_client);
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
                match self.queue.pop_front() {
                    Some(Entry::Query {
                        set,
                        failed,
                        swallow,
                    }) => {
                        if let (false, false, Some(change)) = (failed, swallow, set) {
                            apply_change(change, client.params, server);
                        }
                    }
                    Some(Entry::Sync) => {
                        if let Some(from) = self.retry_from.take() {
                            // Re-run the rest of the batch: the client never saw it fail.
                            forward = false;
                            ev.ready = false;
                            self.retries += 1;
                            self.replay(from, client, server, to_client);
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
            to_client.extend_from_slice(&raw);
        }
        self.drain_synth(to_client);
    }

    fn pop_if(&mut self, f: impl Fn(&Entry) -> bool) {
        if self.queue.front().is_some_and(f) {
            self.queue.pop_front();
        }
    }

    fn drain_synth(&mut self, to_client: &mut BytesMut) {
        while let Some(Entry::Synth { .. }) = self.queue.front() {
            if let Some(Entry::Synth { msg, .. }) = self.queue.pop_front() {
                emit(&msg, to_client);
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
                let rest = self.sent_batch.get(*at..)?;
                let describes = rest.iter().any(|m| m.first() == Some(&b'D'));
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
        let msgs: Vec<Bytes> = self
            .sent_batch
            .get(from..)
            .map(<[Bytes]>::to_vec)
            .unwrap_or_default();
        if let Some(stale) = self.invalidated.take() {
            // The replay describes the result, so this client moves to the fresh statement.
            client.statements.refresh(&stale, client.registry);
        }
        let mut up = std::mem::take(&mut self.upstream);
        self.close_orphans(server, &mut up);
        for raw in msgs {
            let Ok(Some(header)) = frontend::peek_header(&raw) else {
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
            | Entry::Execute { stmt: Some(s) } => Some(s.clone()),
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

fn undo(e: Entry, client: &mut ClientSide<'_>, server: &mut ServerConn) {
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

/// A statement that makes the server raise `err` with its SQLSTATE and message.
fn raise_sql(err: &ErrorFields) -> String {
    format!(
        "DO $sluice$ BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {}; END $sluice$",
        err.code.as_str(),
        crate::params::quote_literal(&err.message)
    )
}

/// A cheap filter before lexing: only DEALLOCATE, DISCARD, SET and RESET (or a leading comment)
/// can be session commands.
fn may_be_session_command(text: &str) -> bool {
    matches!(
        text.trim_start().as_bytes().first(),
        Some(b'd' | b'D' | b's' | b'S' | b'r' | b'R' | b'-' | b'/')
    )
}

fn session_change(text: &str) -> Option<SessionChange> {
    match sql::session_command(text)? {
        SessionCommand::Set {
            name,
            value,
            local: false,
        } => Some(SessionChange::Set(name, value)),
        SessionCommand::Reset { name } => Some(SessionChange::Reset(name)),
        SessionCommand::ResetAll => Some(SessionChange::ResetAll),
        _ => None,
    }
}

fn apply_change(change: SessionChange, params: &mut ClientParams, server: &mut ServerConn) {
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
    }
}

fn emit(msg: &Synth, to_client: &mut BytesMut) {
    match msg {
        Synth::ParseComplete => backend::encode_parse_complete(to_client),
        Synth::CloseComplete => backend::encode_close_complete(to_client),
        Synth::CommandComplete(tag) => backend::encode_command_complete(to_client, tag),
        Synth::Ready(status) => backend::encode_ready_for_query(to_client, *status),
        Synth::Error(f) => backend::encode_error(to_client, f),
    }
}

/// Writes a ReadyForQuery into a buffer (used by idle-state local answers).
pub fn ready(to_client: &mut BytesMut, status: TransactionStatus) {
    backend::encode_ready_for_query(to_client, status);
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
