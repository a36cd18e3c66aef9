//! A client session: startup, authentication, admission, then transactions, each on whichever
//! server connection the scheduler grants.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::poll_read_buf;
use tracing::{debug, info, warn};

use sluice_policy::{
    ClientFacts, CompletionFacts, ConnectDecision, Hook, Outcome, TransactionDecision,
    TransactionFacts,
};
use sluice_pool::{clock, CheckoutError, Guard, KeyLimit, Ticket};
use sluice_wire::backend::{self, TransactionStatus};
use sluice_wire::frontend;
use sluice_wire::startup::StartupPacket;
use sluice_wire::{ErrorFields, Severity, SqlState};

use crate::alarms::{Alarm, IdleWait};
use crate::auth::{self, Outcome as AuthOutcome};
use crate::cancel::CancelTarget;
use crate::clients::{ClientInfo, ClientState, Counted};
use crate::io::{consume, ClientIo};
use crate::params::{ClientParams, ParamValue};
use crate::pools::PoolEntry;
use crate::prepared::ClientStatements;
use crate::readiness::ArmedRead;
use crate::relay::{ClientSide, Relay};
use crate::server::{ServerConn, ServerConnector};
use crate::shared::Shared;
use crate::stream::Stream;

mod login;
mod relay_loop;

use login::startup;
use relay_loop::run_simple;

/// Most bytes buffered toward one side before Sluice stops reading the other.
const HIGH_WATER: usize = 256 * 1024;

/// What ended a wait between transactions.
enum IdleEvent {
    Data,
    Closed,
    Ended,
    TimedOut,
}

/// How a session ended, for the disconnect log.
#[derive(Debug)]
pub enum End {
    /// The client said goodbye or closed the socket.
    Client,
    /// Refused during startup or login.
    Refused(String),
    /// A protocol error from the client.
    Protocol(String),
    /// The server connection failed.
    Server(String),
    /// A timeout.
    Timeout(&'static str),
    /// Shutdown or KILL_CLIENT.
    Terminated,
}

impl std::fmt::Display for End {
    // Written piece by piece: the disconnect line runs once per client, and a derived Debug
    // through core::fmt cost as much as the rest of the line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, detail) = match self {
            End::Client => ("client left", ""),
            End::Refused(m) => ("refused: ", m.as_str()),
            End::Protocol(m) => ("protocol error: ", m.as_str()),
            End::Server(m) => ("server error: ", m.as_str()),
            End::Timeout(t) => ("timeout: ", *t),
            End::Terminated => ("terminated", ""),
        };
        f.write_str(what)?;
        f.write_str(detail)
    }
}

/// The [`End::Timeout`] of a login that took longer than `client_login_timeout`.
const LOGIN_TIMEOUT: &str = "client_login_timeout";

/// Runs one client connection to the end.
pub async fn run(shared: Arc<Shared>, stream: Stream, peer: Option<SocketAddr>) {
    let mut io = ClientIo::new(stream);
    let start = Instant::now();
    // Off tokio's timer wheel (see crate::alarms). The config caps durations at 365 days.
    let alarm = shared
        .config()
        .sluice
        .client_login_timeout
        .map(|t| shared.alarms.arm(start + t));
    let hard_stop = shared.hard_stop.clone();
    // No tracing span per client: creating one (its fields formatted up front) cost a tenth
    // of a login, and entering it on every poll more than the relay itself. Session events
    // name the client, peer, user and database in their own fields instead.
    // Boxed: the login's state is large and only lives until login ends; moved around by
    // value (through the task's stages) it cost more than the allocation.
    let login = Box::pin(async {
        tokio::select! {
            biased;
            r = startup(&shared, &mut io, peer) => r,
            _ = hard_stop.cancelled() => Err(End::Terminated),
            () = Alarm::wait(alarm.as_deref()) => Err(End::Timeout(LOGIN_TIMEOUT)),
        }
    });
    let startup = login.await;
    drop(alarm);
    if let Err(End::Timeout(LOGIN_TIMEOUT)) = startup {
        io.send_error(&ErrorFields::fatal(
            SqlState::PROTOCOL_VIOLATION,
            "client_login_timeout: login not completed in time",
        ))
        .await;
    }
    let session = match startup {
        Ok(Some(Login::Client(s))) => s,
        Ok(Some(Login::Admin(a))) => {
            a.serve(io).await;
            return;
        }
        Ok(None) => return,
        Err(end) => {
            debug!(peer = %Peer(peer), reason = %end, "login failed");
            return;
        }
    };
    let log = shared.config().sluice.log_disconnections;
    let info = session.info.clone();
    let end = session.serve(io).await;
    if log {
        info!(client.id = info.id, user = info.user.as_str(), db = info.db.as_str(), duration_ms = start.elapsed().as_millis() as u64, reason = %end, "client disconnected");
    }
}

/// A client's address for the log: `host:port`, or `unix` for a unix socket.
pub(crate) struct Peer(pub(crate) Option<SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            // The common case without core::fmt's padding machinery (a login logs this).
            Some(SocketAddr::V4(a)) => {
                let [o1, o2, o3, o4] = a.ip().octets();
                let mut b = itoa::Buffer::new();
                for (n, sep) in [(o1, "."), (o2, "."), (o3, "."), (o4, ":")] {
                    f.write_str(b.format(n))?;
                    f.write_str(sep)?;
                }
                f.write_str(b.format(a.port()))
            }
            Some(addr) => addr.fmt(f),
            None => f.write_str("unix"),
        }
    }
}

/// What a successful login leads to.
enum Login {
    Client(Box<Session>),
    Admin(crate::admin::Admin),
}

/// A logged-in client.
pub struct Session {
    shared: Arc<Shared>,
    pool: Arc<PoolEntry>,
    /// Shared view for the admin console.
    pub info: Arc<ClientInfo>,
    cancel: Arc<CancelTarget>,
    params: ClientParams,
    statements: ClientStatements,
    ticket: Ticket,
    rate: Option<(String, sluice_policy::Rate)>,
    admitted: Admitted,
    class_name: String,
    _counted: Counted,
    /// Relay state and upstream buffer, kept between transactions to reuse their memory.
    relay: Option<Box<Relay>>,
    to_server: BytesMut,
    /// Reads of the attached server connection in the relay's waits.
    server_read: ArmedRead,
    /// The settings read on every transaction, resolved once per config generation.
    settings: Settings,
}

/// A session's view of the config: the settings its hot path reads, resolved for its user.
struct Settings {
    generation: u64,
    max_packet_size: u32,
    client_idle_timeout: Option<Duration>,
    idle_transaction_timeout: Option<Duration>,
}

impl Settings {
    fn resolve(shared: &Shared, user: &str) -> Self {
        let generation = shared.config_generation();
        let cfg = shared.config();
        let per_user = cfg.users.get(user);
        Settings {
            generation,
            max_packet_size: cfg.sluice.max_packet_size,
            client_idle_timeout: per_user
                .and_then(|u| u.client_idle_timeout)
                .unwrap_or(cfg.sluice.client_idle_timeout),
            idle_transaction_timeout: per_user
                .and_then(|u| u.idle_transaction_timeout)
                .unwrap_or(cfg.sluice.idle_transaction_timeout),
        }
    }
}

type ServerGuard = Guard<ServerConnector>;

/// A client the policy plugins admitted. `on-disconnect` runs when this is dropped, so it runs
/// exactly once whatever ends the client: a refusal after admission, a login timeout, a hard
/// stop, or the end of the session.
pub(super) struct Admitted {
    policy: Arc<dyn sluice_policy::Policy>,
    cookies: sluice_policy::Cookies,
}

impl Admitted {
    pub(super) fn new(
        policy: Arc<dyn sluice_policy::Policy>,
        cookies: sluice_policy::Cookies,
    ) -> Self {
        Admitted { policy, cookies }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.policy.wants(Hook::Disconnect) {
            self.policy.on_disconnect(&self.cookies);
        }
    }
}

/// A session leaves the registries however it ends, including dropped mid-login.
impl Drop for Session {
    fn drop(&mut self) {
        self.shared.cancels.unregister(self.cancel.pid);
        self.shared.clients.unregister(self.info.id);
    }
}

impl Session {
    /// The current settings, re-resolved after a reload.
    fn settings(&mut self) -> &Settings {
        if self.settings.generation != self.shared.config_generation() {
            self.settings = Settings::resolve(&self.shared, &self.info.user);
        }
        &self.settings
    }

    /// A free server connection at once, if the pool has one for this client and no rate
    /// limit applies: the common case, without the waiting machinery.
    fn checkout_now(&self) -> Option<ServerGuard> {
        if self.rate.is_some() {
            return None;
        }
        let g = self.pool.pool.try_checkout(&self.ticket)?.check()?;
        self.info.set_state(ClientState::Active);
        self.info.server_pid.store(g.pid, Ordering::Relaxed);
        Some(g)
    }

    /// Waits for a server connection: the scheduler decides when. Callers try
    /// [`Self::checkout_now`] first. Sends a NOTICE after
    /// `query_wait_notify`, gives up on a cancel request or a client that goes away.
    async fn checkout(
        &mut self,
        io: &mut ClientIo,
        login: bool,
    ) -> Result<ServerGuard, ErrorFields> {
        if let Some((key, rate)) = &self.rate {
            // Token bucket: wait for a token, but never longer than the wait budget.
            let wait = self.shared.rates.reserve(key, rate.per_sec, rate.burst);
            let budget = self
                .shared
                .config()
                .query_wait_timeout(&self.info.db, &self.info.user)
                .unwrap_or(Duration::MAX);
            if wait > budget {
                self.shared.rates.refund(key);
                return Err(ErrorFields::error(
                    SqlState::TOO_MANY_CONNECTIONS,
                    format!(
                        "transaction rate limit of {}/s for \"{key}\" exceeded",
                        rate.per_sec
                    ),
                ));
            }
            if !wait.is_zero() {
                // Waiting for a token is waiting too (SHOW CLIENTS, cl_waiting).
                self.info.set_state(ClientState::Waiting);
                sluice_pool::timer::sleep(wait).await;
            }
        }
        self.info.set_state(ClientState::Waiting);
        // No NOTICE before AuthenticationOk: drivers would take it for a broken login.
        let notify = if login {
            None
        } else {
            self.shared.config().sluice.query_wait_notify
        };
        let pool = &self.pool.pool;
        let class = &self.class_name;
        let notice = || {
            let f = ErrorFields::notice(format!(
                "waiting for a server connection in pool \"{}\" (class \"{class}\")",
                pool.name()
            ));
            backend::encode_notice(&mut io.wbuf, &f);
            // Without waiting: a client that does not read gets it with the next answer.
            if let Ok(n) = io.stream.try_write(&io.wbuf) {
                consume(&mut io.wbuf, n);
            }
        };
        let cancelled = self.cancel.cancelled_while_waiting();
        let info = self.info.clone();
        let result = tokio::select! {
            biased;
            // KILL_CLIENT ends a waiting client at once, before its statement reaches a server.
            () = info.kill.flipped() => {
                self.info.set_state(ClientState::Idle);
                return Err(ErrorFields::fatal(SqlState::ADMIN_SHUTDOWN, "terminating connection due to administrator command"));
            }
            r = pool.checkout_notify(self.ticket.clone(), notify, notice) => r,
            () = cancelled => {
                self.info.set_state(ClientState::Idle);
                return Err(ErrorFields::error(SqlState::QUERY_CANCELED, "canceling statement due to user request"));
            }
        };
        match result {
            Ok(g) => {
                self.info.set_state(ClientState::Active);
                self.info.server_pid.store(g.pid, Ordering::Relaxed);
                Ok(g)
            }
            Err(e) => {
                self.info.set_state(ClientState::Idle);
                self.shared.stats.checkout_errors.add(1);
                let f = match e {
                    CheckoutError::Shed { pool, class, waited } => ErrorFields::error(
                        SqlState::TOO_MANY_CONNECTIONS,
                        format!("no server connection available: class \"{class}\" waited {} ms in pool \"{pool}\" (max_wait)", waited.as_millis()),
                    ),
                    CheckoutError::Timeout { pool, waited } => ErrorFields::error(
                        SqlState::TOO_MANY_CONNECTIONS,
                        format!("query_wait_timeout: no server connection available in pool \"{pool}\" after {} ms", waited.as_millis()),
                    ),
                    CheckoutError::Connect(e) => e.to_client(),
                    CheckoutError::Closed(pool) => ErrorFields::error(SqlState::CANNOT_CONNECT_NOW, format!("pool \"{pool}\" is closed")),
                };
                if self.shared.config().sluice.log_pooler_errors {
                    warn!(
                        client.id = self.info.id,
                        user = self.info.user.as_str(),
                        db = self.info.db.as_str(),
                        code = f.code.as_str(),
                        "no server connection: {}",
                        f.message
                    );
                }
                Err(f)
            }
        }
    }

    /// Serves transactions until the client leaves.
    async fn serve(mut self, mut io: ClientIo) -> End {
        let end = self.serve_inner(&mut io).await;
        if let End::Terminated = end {
            io.send_error(&ErrorFields::fatal(
                SqlState::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            ))
            .await;
        }
        end
    }

    async fn serve_inner(&mut self, io: &mut ClientIo) -> End {
        // KILL_CLIENT and the graceful shutdown both come through the client's own switch:
        // one flag pair and one waker, not a CancellationToken (a lock on every check).
        let info = self.info.clone();
        // Once for the session: the relay and the wait below then check the switch's flags.
        std::future::poll_fn(|cx| {
            info.kill.watch(cx.waker());
            Poll::Ready(())
        })
        .await;
        loop {
            // Handle what needs no server connection; stop at the first message that does.
            let max = self.settings().max_packet_size;
            loop {
                let header = match frontend::peek_header(&io.rbuf) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return self.protocol_error(io, e.to_string()).await,
                };
                if header.len > max {
                    return self
                        .protocol_error(
                            io,
                            format!("message of {} bytes exceeds max_packet_size", header.len),
                        )
                        .await;
                }
                match header.tag {
                    b'X' => return End::Client,
                    b'S' if io.rbuf.len() >= 5 => {
                        consume(&mut io.rbuf, 5);
                        backend::encode_ready_for_query(&mut io.wbuf, TransactionStatus::Idle);
                    }
                    b'H' if io.rbuf.len() >= 5 => consume(&mut io.rbuf, 5),
                    b'p' => {
                        return self
                            .protocol_error(io, "unexpected password message".into())
                            .await
                    }
                    _ => break,
                }
            }
            if !io.wbuf.is_empty() && io.flush().await.is_err() {
                return End::Client;
            }
            if info.kill.idle_should_end() {
                return End::Terminated;
            }
            let whole = matches!(frontend::peek_header(&io.rbuf), Ok(Some(h)) if io.rbuf.len() >= h.total_len());
            if whole {
                match self.transaction(io).await {
                    Ok(()) => continue,
                    Err(end) => return end,
                }
            }
            // Wait for the next message, a graceful shutdown, or client_idle_timeout (checked
            // by the maintenance tick, which wakes the task through the kill switch).
            let idle = self
                .settings()
                .client_idle_timeout
                .map(|t| IdleWait::start(&info, &self.shared.coarse_clock, t));
            let event = std::future::poll_fn(|cx| {
                match io.poll_fill(cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(IdleEvent::Closed),
                    Poll::Ready(Ok(_)) => return Poll::Ready(IdleEvent::Data),
                    Poll::Pending => {}
                }
                if info.kill.idle_should_end() {
                    return Poll::Ready(IdleEvent::Ended);
                }
                if idle.is_some_and(|w| w.timed_out(&info)) {
                    return Poll::Ready(IdleEvent::TimedOut);
                }
                Poll::Pending
            })
            .await;
            if idle.is_some() {
                info.idle.disarm();
            }
            match event {
                IdleEvent::Data => {}
                IdleEvent::Closed => return End::Client,
                IdleEvent::Ended => return End::Terminated,
                IdleEvent::TimedOut => {
                    io.send_error(&ErrorFields::fatal(
                        SqlState::IDLE_SESSION_TIMEOUT,
                        "client_idle_timeout: closing idle client connection",
                    ))
                    .await;
                    return End::Timeout("client_idle_timeout");
                }
            }
        }
    }

    async fn protocol_error(&self, io: &mut ClientIo, msg: String) -> End {
        io.send_error(&ErrorFields::fatal(
            SqlState::PROTOCOL_VIOLATION,
            msg.clone(),
        ))
        .await;
        End::Protocol(msg)
    }

    /// The statement a client message carries, for the policy: a Query's text, the statement a
    /// Parse prepares or the one a Bind runs, capped at `max_query_len` bytes on a character
    /// boundary. Empty for other messages, and for a Bind of a name the client never prepared.
    fn statement_text(&self, raw: &[u8], tag: u8) -> String {
        let cap = self.shared.config().policy.max_query_len as usize;
        let body = raw.get(5..).unwrap_or_default();
        // A C string's bytes, and what follows its terminator.
        let split_cstr = |b: &[u8]| -> (usize, usize) {
            b.iter()
                .position(|c| *c == 0)
                .map_or((b.len(), b.len()), |p| (p, p + 1))
        };
        let bound;
        let text = match tag {
            b'Q' => body,
            // Parse: statement name, then the query.
            b'P' => &body[split_cstr(body).1..],
            // Bind: portal name, then statement name.
            b'B' => {
                let rest = &body[split_cstr(body).1..];
                bound = self.statements.resolve(&rest[..split_cstr(rest).0]);
                bound.as_ref().map_or(&[][..], |s| &s.query[..])
            }
            _ => &[][..],
        };
        let end = split_cstr(text).0.min(cap);
        let mut s = String::from_utf8_lossy(&text[..end]).into_owned();
        while s.len() > cap {
            s.pop();
        }
        s
    }

    /// Reports a refusal before any server is involved, consuming the batch it applies to.
    async fn refuse_batch(&mut self, io: &mut ClientIo, f: ErrorFields) -> Result<(), End> {
        // Consume up to and including the end of the batch: one Query, or up to Sync.
        loop {
            let h = match frontend::peek_header(&io.rbuf) {
                Ok(Some(h)) if io.rbuf.len() >= h.total_len() => h,
                Ok(_) => {
                    if io.fill().await.is_err() {
                        return Err(End::Client);
                    }
                    continue;
                }
                Err(e) => return Err(self.protocol_error(io, e.to_string()).await),
            };
            consume(&mut io.rbuf, h.total_len());
            match h.tag {
                b'Q' | b'S' | b'F' => break,
                b'X' => return Err(End::Client),
                _ => {}
            }
        }
        backend::encode_error(&mut io.wbuf, &f);
        backend::encode_ready_for_query(&mut io.wbuf, TransactionStatus::Idle);
        io.flush().await.map_err(|_| End::Client)
    }

    /// Runs one transaction: policy, checkout, relay until the server connection is free.
    async fn transaction(&mut self, io: &mut ClientIo) -> Result<(), End> {
        let mut priority = None;
        let mut timeout_ms = None;
        if self.shared.policy.wants(Hook::Transaction) || self.shared.policy.wants(Hook::Query) {
            // The first message, whole or not yet: a long one is judged by its first bytes.
            let query = match frontend::peek_header(&io.rbuf) {
                Ok(Some(h)) => {
                    let seen = h.total_len().min(io.rbuf.len());
                    self.statement_text(&io.rbuf[..seen], h.tag)
                }
                _ => String::new(),
            };
            let kind = sluice_policy::statement_kind(&query);
            let (size, active, idle, waiting) = self.pool.pool.load();
            let facts = TransactionFacts {
                cookies: &self.admitted.cookies,
                class: &self.class_name,
                kind,
                in_transaction: false,
                query: &query,
                pool: sluice_policy::PoolSnapshot {
                    size,
                    active,
                    idle,
                    waiting,
                },
            };
            for hook in [Hook::Transaction, Hook::Query] {
                if !self.shared.policy.wants(hook) {
                    continue;
                }
                let d = if hook == Hook::Transaction {
                    self.shared.policy.on_transaction(&facts)
                } else {
                    self.shared.policy.on_query(&facts)
                };
                match d {
                    TransactionDecision::Proceed(p) => {
                        if p.priority.is_some() {
                            priority = p.priority;
                        }
                        if p.timeout_ms.is_some() {
                            timeout_ms = p.timeout_ms;
                        }
                    }
                    TransactionDecision::Reject(r) => {
                        self.shared.stats.rejected.add(1);
                        let code = SqlState::parse(r.sqlstate.as_str())
                            .unwrap_or(SqlState::INSUFFICIENT_PRIVILEGE);
                        return self
                            .refuse_batch(io, ErrorFields::error(code, r.message))
                            .await;
                    }
                }
            }
            // The wait and the transaction are timed from after the plugins' calls.
            clock::expire();
        }
        // A policy's priority applies to this transaction only. A free connection is taken
        // without building the waiting future.
        let saved = priority.map(|pr| self.ticket.priority.replace(pr));
        let checkout = match self.checkout_now() {
            Some(g) => Ok(g),
            None => self.checkout(io, false).await,
        };
        if let Some(p) = saved {
            self.ticket.priority = p;
        }
        let mut guard = match checkout {
            Ok(g) => g,
            // Killed while waiting: the session ends (serve sends the 57P01).
            Err(_) if self.info.kill.is_flipped() => return Err(End::Terminated),
            Err(f) => return self.refuse_batch(io, f).await,
        };
        let waited = guard.waited;
        let started = clock::now();
        self.cancel.attach(guard.cancel_target());
        let result = self.relay(io, &mut guard, timeout_ms).await;
        self.cancel.detach();
        self.info.server_pid.store(0, Ordering::Relaxed);
        self.info.set_state(ClientState::Idle);
        self.shared.stats.transactions.add(1);
        let outcome = match &result {
            Ok(r) if r.saw_error => Outcome::Failed,
            Ok(r) if r.rolled_back => Outcome::RolledBack,
            Ok(_) => Outcome::Committed,
            Err(_) => Outcome::Aborted,
        };
        if let Ok(r) = &result {
            self.shared.stats.queries.add(r.queries);
        }
        let took = clock::now().saturating_duration_since(started);
        if self.shared.policy.wants(Hook::Complete) {
            self.shared.policy.on_complete(&CompletionFacts {
                cookies: &self.admitted.cookies,
                class: &self.class_name,
                duration_us: took.as_micros() as u64,
                wait_us: waited.as_micros() as u64,
                outcome,
            });
            clock::expire();
        }
        self.shared.stats.record_tx(took, waited);
        match result {
            Ok(relay) => {
                self.relay = Some(relay);
                self.release(guard);
                Ok(())
            }
            Err(end) => {
                self.abandon(guard);
                Err(end)
            }
        }
    }

    fn release(&self, mut guard: ServerGuard) {
        if guard.cancels.idle() && !guard.dirty {
            drop(guard);
            return;
        }
        // A cancel still in flight against this backend (or lost), or session state the client
        // left: the connection goes back only after the cancel landed and the session was reset.
        let wait = self.shared.config().sluice.cancel_wait_timeout;
        let shared = self.shared.clone();
        self.shared.tracker.spawn(async move {
            if !guard.cancels.idle() {
                let _ = sluice_pool::timer::timeout(wait, guard.cancels.wait()).await;
                // A cancel still in flight, or one that may land later: the connection is
                // closed when the guard drops, so resetting it would be wasted.
                guard.broken |= !guard.cancels.idle();
            }
            if guard.dirty && !guard.broken {
                reset_session(&mut guard, &shared).await;
            }
            drop(guard);
        });
    }

    /// The client went away mid-transaction: roll back and reuse the server connection if it
    /// is in a clean state to do so; otherwise close it. Never reuse it dirty.
    fn abandon(&self, mut guard: ServerGuard) {
        self.shared.stats.abandoned.add(1);
        if !guard.quiet && !guard.broken {
            // A query is still running for nobody: cancel it and close the connection, so
            // its answers can never reach another client.
            guard.broken = true;
            let target = guard.cancel_target();
            let timeout = self.shared.config().sluice.cancel_wait_timeout;
            self.shared.tracker.spawn(async move {
                let _ = sluice_pool::timer::timeout(timeout, crate::cancel::forward(&target)).await;
            });
        }
        let clean_point = guard.rbuf.is_empty() && !guard.broken && guard.quiet;
        if !clean_point {
            guard.broken = true;
        }
        if guard.broken || (guard.status == TransactionStatus::Idle && !guard.dirty) {
            drop(guard);
            return;
        }
        let shared = self.shared.clone();
        self.shared.tracker.spawn(async move {
            if guard.status != TransactionStatus::Idle && !housekeep(&mut guard, "ROLLBACK").await {
                guard.broken = true;
            }
            if guard.dirty && !guard.broken {
                reset_session(&mut guard, &shared).await;
            }
            drop(guard);
        });
    }
}

/// Runs one of Sluice's own queries on a server connection nobody holds (ROLLBACK, DISCARD ALL),
/// bounded in time: true if it succeeded and left the session idle.
async fn housekeep(server: &mut ServerConn, sql: &str) -> bool {
    let mut out = BytesMut::new();
    frontend::encode_query(&mut out, sql);
    let done = sluice_pool::timer::timeout(Duration::from_secs(5), run_simple(server, &out)).await;
    matches!(done, Ok(Ok(_))) && server.status == TransactionStatus::Idle
}

/// Resets a server session a client left state on (`ServerConn::dirty`) with `DISCARD ALL`,
/// so the next client finds it as new; the connection is closed instead if that fails.
async fn reset_session(server: &mut ServerConn, shared: &Shared) {
    if housekeep(server, "DISCARD ALL").await {
        server.forget_session_state();
        shared.stats.server_resets.add(1);
        debug!(server.pid = server.pid, "server session reset");
    } else {
        server.broken = true;
    }
}

#[cfg(test)]
mod tests {
    use super::Peer;

    #[test]
    fn peers_are_logged_as_host_and_port() {
        let show = |p: Option<&str>| Peer(p.map(|a| a.parse().unwrap())).to_string();
        assert_eq!(show(Some("127.0.0.1:5432")), "127.0.0.1:5432");
        assert_eq!(show(Some("10.200.3.0:65535")), "10.200.3.0:65535");
        assert_eq!(show(Some("[::1]:6432")), "[::1]:6432");
        assert_eq!(show(None), "unix");
    }
}
