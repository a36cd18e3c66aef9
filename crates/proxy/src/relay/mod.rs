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
        /// The session SET this Execute runs, applied for the client once it commits.
        set: Option<SessionChange>,
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

/// A session-level SET/RESET a client ran as a statement of its own (simple query or extended
/// protocol), applied for the client when it commits.
#[derive(Debug, Clone)]
pub enum SessionChange {
    /// `SET name = value`.
    Set(String, String),
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// The SETs and RESETs of one multi-statement simple query, in order: they commit or roll
    /// back together with its implicit transaction (or the block it runs in).
    Several(Vec<SessionChange>),
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
    /// The last transaction to end here ended with ROLLBACK (or ABORT).
    pub rolled_back: bool,
    /// Messages forwarded to the server in this transaction (for stats).
    pub queries: u64,
    /// A client message was handled: the transaction has begun.
    pub started: bool,
    /// Raw client messages of the extended-protocol batch being sent (since the last Sync).
    batch: Batch,
    /// The batch's messages once its Sync went out, kept for a retry after DDL.
    sent_batch: Batch,
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
    /// Session-level SET/RESET made inside the open transaction block.
    pending_changes: Vec<SessionChange>,
    /// How the last transaction block ended: COMMIT (true) or ROLLBACK (false).
    block_end: Option<bool>,
    /// The client's wishes changed without the server (a DISCARD ALL answered by Sluice).
    wishes_diverged: bool,
    /// This client's last unnamed Parse, scanned: drivers send the same text again and again,
    /// so the scan runs once per distinct text. Kept across transactions.
    last_unnamed: Option<UnnamedText>,
    /// The session SET of the statement behind the last Bind, for the Executes that follow.
    bound_change: Option<SessionChange>,
    /// Session SETs run through the extended protocol since the last Sync, applied for the
    /// client at the Sync's ReadyForQuery as a simple query's would be.
    executed_changes: Vec<SessionChange>,
}

/// An unnamed statement's text and what running it does to the session.
#[derive(Debug)]
struct UnnamedText {
    text: Bytes,
    /// It leaves session state Sluice does not track: the session is reset afterwards.
    leaves_state: bool,
    /// It is one session SET that Sluice tracks for the client.
    change: Option<SessionChange>,
}

/// Whole client messages kept back to back in one buffer: copying a batch's few hundred bytes
/// costs less than reference-counting each message.
#[derive(Debug, Default, Clone)]
struct Batch {
    bytes: Vec<u8>,
    /// Where each message ends in `bytes`.
    ends: Vec<usize>,
}

impl Batch {
    fn push(&mut self, raw: &[u8]) {
        self.bytes.extend_from_slice(raw);
        self.ends.push(self.bytes.len());
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// The messages from index `from` on (none when `from` is past the end).
    fn messages_from(&self, from: usize) -> impl Iterator<Item = &[u8]> {
        (from..self.ends.len()).map(|i| {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            &self.bytes[start..self.ends[i]]
        })
    }
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
        self.bound_change = None;
        self.executed_changes.clear();
        self.streaming = 0;
        self.streaming_swallow = false;
        self.copy_in = false;
        self.saw_error = false;
        self.rolled_back = false;
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
        self.pending_changes.clear();
        self.block_end = None;
        self.wishes_diverged = false;
    }

    /// Scans an unnamed statement's text (see `last_unnamed`); true if it leaves session state
    /// that Sluice does not track.
    fn unnamed_leaves_state(&mut self, query: &[u8]) -> bool {
        match &self.last_unnamed {
            Some(u) if u.text[..] == *query => u.leaves_state,
            _ => {
                let (leaves_state, change) = scan_statement(query);
                self.last_unnamed = Some(UnnamedText {
                    text: Bytes::copy_from_slice(query),
                    leaves_state,
                    change,
                });
                leaves_state
            }
        }
    }

    /// Whether the client's wishes changed in this transaction without the server session
    /// following: the next transaction must sync against what was applied.
    pub fn wishes_diverged(&self) -> bool {
        self.wishes_diverged
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

    /// Whether answers are on their way that need nothing more from the client: everything
    /// sent was a Query or ended with a Sync, and no COPY FROM STDIN is open. Waiting for them
    /// cannot deadlock.
    pub fn answers_coming(&self) -> bool {
        self.waiting_for_server() && !self.unsynced && !self.skip_until_sync && !self.copy_in
    }

    /// Whether the server is in COPY FROM STDIN, waiting for the client's data.
    pub fn copying_in(&self) -> bool {
        self.copy_in
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
        raw: &[u8],
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
            self.batch.push(raw);
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
                    self.queue.push_back(Entry::Execute {
                        stmt: None,
                        set: None,
                    });
                }
                to_server.extend_from_slice(raw);
                // In copy-in mode the server ignores a Sync (see the CopyInResponse handling).
                if !self.copy_in {
                    self.queue.push_back(Entry::Sync);
                }
                // Keep both vectors' memory: the finished batch becomes the sent one.
                std::mem::swap(&mut self.sent_batch, &mut self.batch);
                self.batch.clear();
            }
            b'Q' => {
                self.queries += 1;
                let body = &raw[5..];
                let body = body.strip_suffix(&[0]).unwrap_or(body);
                let first = sql::first_word(body);
                // Only queries that may change session state are decoded and looked at.
                let text = may_be_session_command(first)
                    .then(|| std::str::from_utf8(body).ok())
                    .flatten();
                let special = text.is_some();
                let text = text.unwrap_or_default();
                if special && self.local_query(text, client, to_client, server_status) {
                    return;
                }
                let mut set = if special { session_change(text) } else { None };
                // State the client leaves on the session that Sluice does not replay is reset
                // when the connection comes back, before anyone else gets it.
                if set.is_none() && sql::leaves_session_state_after(body, first) {
                    set = std::str::from_utf8(body).ok().and_then(several_changes);
                    server.dirty |= set.is_none();
                }
                if let Some(k) = special.then(|| sql::first_keyword(text)).flatten() {
                    if (k.eq_ignore_ascii_case("discard") || k.eq_ignore_ascii_case("deallocate"))
                        && set.is_none()
                    {
                        // Forwarded as-is (inside a transaction or several statements): the
                        // server's statements and settings are no longer known.
                        server.broken = true;
                    }
                }
                to_server.extend_from_slice(raw);
                self.queue.push_back(Entry::Query {
                    swallow: false,
                    set,
                    failed: false,
                });
            }
            b'F' => {
                to_server.extend_from_slice(raw);
                self.queue.push_back(Entry::Query {
                    swallow: false,
                    set: None,
                    failed: false,
                });
            }
            b'P' | b'B' | b'D' | b'C' => {
                self.unsynced = true;
                if let Some(entry) = self.unnamed_passthrough(tag, raw) {
                    if tag == b'P' && self.unnamed_leaves_state(unnamed_parse_query(raw)) {
                        server.dirty = true;
                    }
                    // Unnamed statement or portal: nothing to rename, forward the bytes as is.
                    to_server.extend_from_slice(raw);
                    self.queue.push_back(entry);
                    return;
                }
                let mut buf = BytesMut::from(raw);
                match FrontendMessage::decode(&mut buf, u32::MAX) {
                    Ok(Some(msg)) => self.extended(msg, client, server, to_server, to_client),
                    _ => {
                        let err = ErrorFields::error(
                            SqlState::PROTOCOL_VIOLATION,
                            format!("invalid message format ('{}')", tag as char),
                        );
                        self.fail_batch(err);
                    }
                }
            }
            b'E' => {
                self.unsynced = true;
                self.queries += 1;
                to_server.extend_from_slice(raw);
                self.queue.push_back(Entry::Execute {
                    stmt: self.last_bind.clone(),
                    set: self.bound_change.clone(),
                });
            }
            b'H' => {
                to_server.extend_from_slice(raw);
            }
            b'd' => {
                to_server.extend_from_slice(raw);
            }
            b'c' | b'f' => {
                self.copy_in = false;
                to_server.extend_from_slice(raw);
            }
            _ => {
                to_server.extend_from_slice(raw);
            }
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
                self.wishes_diverged = true;
                "DISCARD ALL"
            }
            _ => return false,
        };
        self.push_synth(Synth::CommandComplete(tag), None, to_client);
        self.push_synth(Synth::Ready(status), None, to_client);
        true
    }

    /// Fails the rest of the batch with `err`, an error Sluice found (an unknown or stale
    /// statement, a malformed message): the client's messages up to its Sync are skipped, and
    /// the server raises `err` at the Sync. So the batch's implicit transaction, or the client's
    /// transaction block, fails as PostgreSQL would fail it, instead of committing what ran
    /// before the error.
    fn fail_batch(&mut self, err: ErrorFields) {
        self.unsynced = true;
        self.skip_until_sync = true;
        self.raise_at_sync.get_or_insert(err);
    }
}

/// A statement that makes the server raise `err` with its SQLSTATE and message.
fn raise_sql(err: &ErrorFields) -> String {
    let quote = crate::params::quote_literal;
    let mut options = format!(
        "ERRCODE = '{}', MESSAGE = {}",
        err.code.as_str(),
        quote(&err.message)
    );
    if let Some(d) = &err.detail {
        options.push_str(&format!(", DETAIL = {}", quote(d)));
    }
    if let Some(h) = &err.hint {
        options.push_str(&format!(", HINT = {}", quote(h)));
    }
    format!("DO $sluice$ BEGIN RAISE EXCEPTION USING {options}; END $sluice$")
}

/// The query text of a Parse message for the unnamed statement (`raw` is the whole message).
fn unnamed_parse_query(raw: &[u8]) -> &[u8] {
    let query = raw.get(6..).unwrap_or_default();
    let end = query.iter().position(|&b| b == 0).unwrap_or(query.len());
    &query[..end]
}

/// A cheap filter before lexing, on a text's [`sql::first_word`]: only DEALLOCATE, DISCARD, SET
/// and RESET (or a leading comment) can be session commands.
fn may_be_session_command(first_word: Option<&[u8]>) -> bool {
    first_word.is_none_or(|w| {
        [&b"set"[..], b"reset", b"deallocate", b"discard"]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
    })
}

/// Whether a simple query's text may be a `DISCARD ALL` or `DEALLOCATE` that Sluice answers
/// itself. Its answer depends on the transaction status (in a block, DISCARD ALL is an error),
/// so the relay holds one that was pipelined behind unanswered messages until they are answered.
pub fn may_be_answered_here(text: &[u8]) -> bool {
    let is_local = |w: &[u8]| {
        [&b"deallocate"[..], b"discard"]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
    };
    match sql::first_word(text) {
        Some(w) => is_local(w),
        // A comment first: the lexer finds the first word after it.
        None => std::str::from_utf8(text)
            .ok()
            .and_then(sql::first_keyword)
            .is_some_and(|w| is_local(w.as_bytes())),
    }
}

/// What running a statement's text does to the session: whether it leaves state that Sluice
/// does not track (the session is reset afterwards), and the session SET Sluice tracks for the
/// client instead, if it is one.
pub(crate) fn scan_statement(text: &[u8]) -> (bool, Option<SessionChange>) {
    let first = sql::first_word(text);
    let change = may_be_session_command(first)
        .then(|| std::str::from_utf8(text).ok().and_then(session_change))
        .flatten();
    let leaves_state = change.is_none() && sql::leaves_session_state_after(text, first);
    (leaves_state, change)
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

/// First keywords that rule out tracking the SETs of a multi-statement query: transaction
/// control (whether a SET survives depends on how the string's own blocks end) and commands
/// that change what Sluice knows of the server session.
const UNTRACKABLE_WITH_SETS: [&str; 11] = [
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "prepare",
    "discard",
    "deallocate",
];

/// The session changes of a multi-statement simple query whose statements are each a session
/// SET or RESET that Sluice tracks, or leave nothing behind: `SET search_path = app; SELECT ...`.
/// `None` if any statement leaves untracked state or is in [`UNTRACKABLE_WITH_SETS`]; then the
/// session is reset after it instead.
fn several_changes(text: &str) -> Option<SessionChange> {
    let mut changes = Vec::new();
    for stmt in sql::statements(text)? {
        if let Some(change) = session_change(stmt) {
            changes.push(change);
            continue;
        }
        let first = sql::first_keyword(stmt).unwrap_or_default();
        if UNTRACKABLE_WITH_SETS
            .iter()
            .any(|k| first.eq_ignore_ascii_case(k))
            || sql::leaves_session_state(stmt.as_bytes())
        {
            return None;
        }
    }
    (!changes.is_empty()).then_some(SessionChange::Several(changes))
}

/// Writes a ReadyForQuery into a buffer (used by idle-state local answers).
pub fn ready(to_client: &mut BytesMut, status: TransactionStatus) {
    backend::encode_ready_for_query(to_client, status);
}

mod server;
mod statements;

use server::emit;

#[cfg(test)]
mod tests;
