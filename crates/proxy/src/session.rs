//! A client session: startup, authentication, admission, then transactions, each on whichever
//! server connection the scheduler grants.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use sluice_policy::{
    ClientFacts, CompletionFacts, ConnectDecision, Hook, Outcome, TransactionDecision,
    TransactionFacts,
};
use sluice_pool::{CheckoutError, Guard, KeyLimit, Ticket};
use sluice_wire::backend::{self, TransactionStatus};
use sluice_wire::frontend;
use sluice_wire::startup::StartupPacket;
use sluice_wire::{ErrorFields, Severity, SqlState};

use crate::auth::{self, Outcome as AuthOutcome};
use crate::cancel::CancelTarget;
use crate::clients::{ClientInfo, ClientState, Counted};
use crate::io::ClientIo;
use crate::params::ClientParams;
use crate::pools::PoolEntry;
use crate::prepared::ClientStatements;
use crate::relay::{ClientSide, Relay};
use crate::server::{ServerConn, ServerConnector};
use crate::shared::Shared;
use crate::stream::Stream;

/// Most bytes buffered toward one side before Sluice stops reading the other.
const HIGH_WATER: usize = 256 * 1024;

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

/// Runs one client connection to the end.
pub async fn run(shared: Arc<Shared>, stream: Stream, peer: Option<SocketAddr>) {
    let mut io = ClientIo::new(stream);
    let start = Instant::now();
    let login_timeout = shared.config().sluice.client_login_timeout;
    let hard_stop = shared.hard_stop.clone();
    let login = async {
        tokio::select! {
            r = startup(&shared, &mut io, peer) => r,
            _ = hard_stop.cancelled() => Err(End::Terminated),
        }
    };
    let startup = match login_timeout {
        Some(t) => match tokio::time::timeout(t, login).await {
            Ok(r) => r,
            Err(_) => {
                io.send_error(&ErrorFields::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    "client_login_timeout: login not completed in time",
                ))
                .await;
                Err(End::Timeout("client_login_timeout"))
            }
        },
        None => login.await,
    };
    let session = match startup {
        Ok(Some(Login::Client(s))) => s,
        Ok(Some(Login::Admin(a))) => {
            a.serve(io).await;
            return;
        }
        Ok(None) => return,
        Err(end) => {
            debug!(peer = ?peer, reason = ?end, "login failed");
            return;
        }
    };
    let log = shared.config().sluice.log_disconnections;
    let (id, user, db) = (
        session.info.id,
        session.info.user.clone(),
        session.info.db.clone(),
    );
    let end = session.serve(io).await;
    if log {
        info!(client.id = id, user = %user, db = %db, duration_ms = start.elapsed().as_millis() as u64, reason = ?end, "client disconnected");
    }
}

/// Reads the startup packet and logs the client in. `Ok(None)` for cancel requests and other
/// connections that end without a session.
async fn startup(
    shared: &Arc<Shared>,
    io: &mut ClientIo,
    peer: Option<SocketAddr>,
) -> Result<Option<Login>, End> {
    let packet = loop {
        match StartupPacket::decode(&mut io.rbuf) {
            Ok(Some(StartupPacket::SslRequest)) | Ok(Some(StartupPacket::GssEncRequest)) => {
                io.wbuf.extend_from_slice(b"N");
                io.flush().await.map_err(|e| End::Protocol(e.to_string()))?;
            }
            Ok(Some(StartupPacket::Cancel { pid, secret })) => {
                let timeout = shared.config().sluice.cancel_wait_timeout;
                let shared = shared.clone();
                shared.cancels.cancel(pid, &secret, timeout).await;
                return Ok(None);
            }
            Ok(Some(p @ StartupPacket::Startup { .. })) => break p,
            Ok(None) => match io.fill().await {
                Ok(()) => {}
                Err(_) => return Err(End::Client),
            },
            Err(e) => {
                let code = e.sqlstate();
                let msg = match e {
                    sluice_wire::WireError::InvalidStartupLength(_) => {
                        "invalid length of startup packet".to_string()
                    }
                    sluice_wire::WireError::UnsupportedProtocol { major, minor } => {
                        format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")
                    }
                    sluice_wire::WireError::DirectTls => {
                        // A TLS ClientHello: there is no TLS to speak, just close.
                        return Err(End::Protocol("direct TLS is not supported".into()));
                    }
                    other => format!("invalid startup packet layout: {other}"),
                };
                io.send_error(&ErrorFields::fatal(code, msg.clone())).await;
                return Err(End::Protocol(msg));
            }
        }
    };
    let StartupPacket::Startup {
        version,
        params,
        unrecognized_protocol_options,
    } = packet
    else {
        return Err(End::Protocol("unexpected packet".into()));
    };
    if version.minor > 0 || !unrecognized_protocol_options.is_empty() {
        sluice_wire::startup::encode_negotiate_protocol_version(
            &mut io.wbuf,
            0,
            &unrecognized_protocol_options,
        );
    }
    let get = |k: &str| {
        params
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    let user = get("user").unwrap_or_default();
    let db = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let app = get("application_name").unwrap_or_default();
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off" && r != "no") {
        let f = ErrorFields::fatal(
            SqlState::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by Sluice in transaction mode",
        );
        io.send_error(&f).await;
        return Err(End::Refused(f.message));
    }
    let cfg = shared.config();
    // Authenticate.
    let known = cfg.users.contains_key(&user);
    let method = if known {
        cfg.auth_type(&user)
    } else {
        cfg.sluice.auth_type
    };
    let secret = cfg.users.get(&user).and_then(|u| u.password.as_ref());
    let outcome = auth::authenticate(io, &user, known, method, secret, &shared.mock_key)
        .await
        .map_err(|e| End::Protocol(e.to_string()))?;
    let keys = match outcome {
        AuthOutcome::Ok(keys) => keys,
        AuthOutcome::Refused(f) => {
            if cfg.sluice.log_pooler_errors {
                warn!(peer = ?peer, user = %user, db = %db, code = f.code.as_str(), "login refused: {}", f.message);
            }
            io.send_error(&f).await;
            return Err(End::Refused(f.message));
        }
    };
    let admin_db = db == "sluice" || db == "pgbouncer";
    if admin_db {
        let allowed =
            cfg.sluice.admin_users.contains(&user) || cfg.sluice.stats_users.contains(&user);
        if !allowed {
            let f = ErrorFields::fatal(
                SqlState::INSUFFICIENT_PRIVILEGE,
                format!("not allowed to connect to the admin console as \"{user}\""),
            );
            io.send_error(&f).await;
            return Err(End::Refused(f.message));
        }
        backend::encode_auth_ok(&mut io.wbuf);
        let admin = crate::admin::Admin::new(
            shared.clone(),
            user.clone(),
            cfg.sluice.admin_users.contains(&user),
        );
        return Ok(Some(Login::Admin(admin)));
    }
    if !cfg.databases.contains_key(&db) {
        let f = ErrorFields::fatal(
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{db}\" does not exist"),
        );
        io.send_error(&f).await;
        return Err(End::Refused(f.message));
    }
    let Some(pool) = shared.pools.get(&cfg, &db, &user) else {
        let f = ErrorFields::fatal(
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{db}\" does not exist"),
        );
        io.send_error(&f).await;
        return Err(End::Refused(f.message));
    };
    if let Some(k) = keys {
        // Pass-through: the server connections of this role can now log in with the
        // client's own SCRAM key, as PgBouncer does.
        pool.pool.connector().spec().keys.learn(k);
    }
    // Admission by policy.
    let facts = ClientFacts {
        user: &user,
        database: &db,
        application_name: &app,
        addr: peer.map(|p| p.ip()),
        port: peer.map_or(0, |p| p.port()),
        tls: false,
        params: &params,
    };
    let decision = shared.policy.on_connect(&facts);
    let admission = match decision {
        ConnectDecision::Admit(a) => a,
        ConnectDecision::Reject(r) => {
            let code =
                SqlState::parse(r.sqlstate.as_str()).unwrap_or(SqlState::INSUFFICIENT_PRIVILEGE);
            let f = ErrorFields::fatal(code, r.message);
            io.send_error(&f).await;
            return Err(End::Refused(f.message));
        }
    };
    // Client connection limits.
    let class_name = admission
        .class
        .clone()
        .or_else(|| cfg.users.get(&user).and_then(|u| u.class.clone()))
        .unwrap_or_else(|| cfg.scheduler.default_class.clone());
    let counted = match shared.clients.admit(
        &cfg,
        &user,
        &db,
        &app,
        peer,
        admission.limit_key.as_deref(),
        admission.key_max_clients,
    ) {
        Ok(c) => c,
        Err(msg) => {
            let f = ErrorFields::fatal(SqlState::TOO_MANY_CONNECTIONS, msg);
            io.send_error(&f).await;
            return Err(End::Refused(f.message));
        }
    };
    let mut client_params = match ClientParams::from_startup(&params) {
        Ok(p) => p,
        Err(msg) => {
            let f = ErrorFields::fatal(SqlState::INVALID_PARAMETER_VALUE, msg);
            io.send_error(&f).await;
            return Err(End::Refused(f.message));
        }
    };
    let class = pool.pool.class_index(&class_name).unwrap_or(0);
    let priority = admission
        .priority
        .unwrap_or_else(|| pool.pool.class_priority(class));
    let key = admission.limit_key.as_ref().and_then(|k| {
        admission.key_max_active.map(|m| KeyLimit {
            key: Arc::from(k.as_str()),
            max_active: m,
        })
    });
    let cancel = shared.cancels.register();
    let span = tracing::Span::current();
    span.record("user", user.as_str());
    span.record("db", db.as_str());
    let info = shared.clients.register(ClientInfo::new(
        &user,
        &db,
        &app,
        peer,
        cancel.pid,
        &class_name,
        shared.hard_stop.child_token(),
    ));
    span.record("client.id", info.id);
    let mut session = Session {
        shared: shared.clone(),
        pool,
        info,
        cancel,
        params: ClientParams::default(),
        statements: ClientStatements::default(),
        ticket: Ticket {
            class,
            priority,
            key,
        },
        rate: admission
            .key_rate
            .map(|r| (admission.limit_key.clone().unwrap_or_default(), r)),
        cookies: admission.cookies,
        class_name,
        _counted: counted,
        relay: Relay::default(),
        to_server: BytesMut::with_capacity(4096),
    };
    // Learn the server's parameters and validate the client's own on a real connection.
    if let Err(f) = session.prepare_params(io, &mut client_params).await {
        io.send_error(&f).await;
        session.close();
        return Err(End::Refused(f.message));
    }
    session.params = client_params;
    backend::encode_auth_ok(&mut io.wbuf);
    session.welcome(&mut io.wbuf);
    if cfg.sluice.log_connections {
        info!(client.id = session.info.id, peer = ?peer, user = %session.info.user, db = %session.info.db, app = %session.info.app, class = %session.class_name, "client connected");
    }
    if io.flush().await.is_err() {
        session.close();
        return Err(End::Client);
    }
    Ok(Some(Login::Client(Box::new(session))))
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
    cookies: Vec<u64>,
    class_name: String,
    _counted: Counted,
    /// Relay state and upstream buffer, kept between transactions to reuse their memory.
    relay: Relay,
    to_server: BytesMut,
}

type ServerGuard = Guard<ServerConnector>;

impl Session {
    fn close(&self) {
        self.shared.cancels.unregister(self.cancel.pid);
        self.shared.clients.unregister(self.info.id);
        if self.shared.policy.wants(Hook::Disconnect) {
            self.shared.policy.on_disconnect(&self.cookies);
        }
    }

    fn welcome(&self, out: &mut BytesMut) {
        let welcome = self.pool.welcome.read().clone().unwrap_or_default();
        for (k, v) in &welcome {
            let mine = self.params.get(k);
            let value = if k == "application_name" {
                mine.unwrap_or("")
            } else {
                mine.unwrap_or(v)
            };
            backend::encode_parameter_status(out, k, value);
        }
        backend::encode_backend_key_data(out, self.cancel.pid, &self.cancel.secret());
        backend::encode_ready_for_query(out, TransactionStatus::Idle);
    }

    /// At login: makes sure the pool knows the server's parameters, and checks startup
    /// parameters the server has not accepted before, as PostgreSQL would at connect time.
    async fn prepare_params(
        &mut self,
        io: &mut ClientIo,
        params: &mut ClientParams,
    ) -> Result<(), ErrorFields> {
        let known = self.pool.welcome.read().is_some();
        let mut pending = Vec::new();
        {
            let validated = self.pool.validated.lock();
            for (key, name, value) in params.desired() {
                if key == "application_name" {
                    continue;
                }
                let raw = match value {
                    crate::params::ParamValue::Literal(v) => v.clone(),
                    crate::params::ParamValue::Sql(v) => v.clone(),
                };
                match validated.get(&(key.to_string(), raw.clone())) {
                    Some(Some(norm)) => pending.push((name.to_string(), raw, Some(norm.clone()))),
                    Some(None) => {}
                    None => pending.push((name.to_string(), raw, None)),
                }
            }
        }
        for (name, _, norm) in &pending {
            if let Some(n) = norm {
                params.normalise(name, n);
            }
        }
        let unchecked: Vec<(String, String)> = pending
            .into_iter()
            .filter(|(_, _, n)| n.is_none())
            .map(|(name, raw, _)| (name, raw))
            .collect();
        if known && unchecked.is_empty() {
            return Ok(());
        }
        let mut guard = self.checkout(io, true).await?;
        if !known {
            let mut welcome: Vec<(String, String)> = guard
                .params
                .iter()
                .map(|(k, v)| (canonical(k).to_string(), v.clone()))
                .collect();
            welcome.sort();
            *self.pool.welcome.write() = Some(welcome);
        }
        if unchecked.is_empty() {
            return Ok(());
        }
        let mut sql = String::new();
        for (name, raw) in &unchecked {
            if !crate::params::valid_name(name) {
                return Err(ErrorFields::fatal(
                    SqlState::new(b"42704"),
                    format!("unrecognized configuration parameter \"{name}\""),
                ));
            }
            sql.push_str(&format!(
                "SET {name} = {};",
                crate::params::quote_literal(raw)
            ));
        }
        let server: &mut ServerConn = &mut guard;
        let mut out = BytesMut::new();
        frontend::encode_query(&mut out, &sql);
        let reported = run_simple(server, &out).await.map_err(|e| {
            let mut e = e;
            e.severity = Severity::Fatal;
            e
        })?;
        // Put the session back as it was; the client's values are applied per transaction.
        let mut out = BytesMut::new();
        let resets: String = unchecked
            .iter()
            .map(|(n, _)| format!("RESET {n};"))
            .collect();
        frontend::encode_query(&mut out, &resets);
        if run_simple(server, &out).await.is_err() {
            server.broken = true;
        }
        let mut validated = self.pool.validated.lock();
        for (name, raw) in unchecked {
            let key = name.to_ascii_lowercase();
            let norm = reported
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&name))
                .map(|(_, v)| v.clone());
            if let Some(n) = &norm {
                params.normalise(&name, n);
            }
            validated.insert((key, raw), norm);
        }
        Ok(())
    }

    /// Waits for a server connection: the scheduler decides when. Sends a NOTICE after
    /// `query_wait_notify`, gives up on a cancel request or a client that goes away.
    async fn checkout(
        &mut self,
        io: &mut ClientIo,
        login: bool,
    ) -> Result<ServerGuard, ErrorFields> {
        let cfg = self.shared.config();
        if let Some((key, rate)) = &self.rate {
            // Token bucket: wait for a token, but never longer than the wait budget.
            let wait = self.shared.rates.reserve(key, rate.per_sec, rate.burst);
            let budget = cfg
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
                tokio::time::sleep(wait).await;
            }
        }
        if self.rate.is_none() {
            if let Some(g) = self
                .pool
                .pool
                .try_checkout(&self.ticket)
                .and_then(|g| g.check())
            {
                self.info.set_state(ClientState::Active);
                self.info.server_pid.store(g.pid, Ordering::Relaxed);
                return Ok(g);
            }
        }
        self.info.set_state(ClientState::Waiting);
        let fut = self.pool.pool.checkout(self.ticket.clone());
        tokio::pin!(fut);
        // No NOTICE before AuthenticationOk: drivers would take it for a broken login.
        let mut notify = if login {
            None
        } else {
            cfg.sluice.query_wait_notify
        };
        let started = Instant::now();
        let result = loop {
            let notice = async {
                match notify {
                    Some(d) => tokio::time::sleep(d.saturating_sub(started.elapsed())).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut fut => break r,
                _ = notice => {
                    notify = None;
                    let f = ErrorFields::notice(format!(
                        "waiting for a server connection in pool \"{}\" (class \"{}\")", self.pool.pool.name(), self.class_name));
                    backend::encode_notice(&mut io.wbuf, &f);
                    let _ = io.flush().await;
                }
                _ = self.cancel.while_waiting.notified() => {
                    self.info.set_state(ClientState::Idle);
                    return Err(ErrorFields::error(SqlState::QUERY_CANCELED, "canceling statement due to user request"));
                }
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
                self.shared
                    .stats
                    .checkout_errors
                    .fetch_add(1, Ordering::Relaxed);
                Err(match e {
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
                })
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
        self.close();
        end
    }

    async fn serve_inner(&mut self, io: &mut ClientIo) -> End {
        let shutdown = self.shared.shutdown.clone();
        let kill = self.info.kill.clone();
        loop {
            // Handle what needs no server connection; stop at the first message that does.
            let max = self.shared.config().sluice.max_packet_size;
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
                        io.rbuf.advance(5);
                        backend::encode_ready_for_query(&mut io.wbuf, TransactionStatus::Idle);
                    }
                    b'H' if io.rbuf.len() >= 5 => io.rbuf.advance(5),
                    b'p' => {
                        return self
                            .protocol_error(io, "unexpected password message".into())
                            .await
                    }
                    _ => break,
                }
            }
            if io.flush().await.is_err() {
                return End::Client;
            }
            if shutdown.is_cancelled() {
                return End::Terminated;
            }
            let whole = matches!(frontend::peek_header(&io.rbuf), Ok(Some(h)) if io.rbuf.len() >= h.total_len());
            if whole {
                match self.transaction(io).await {
                    Ok(()) => continue,
                    Err(end) => return end,
                }
            }
            let idle_timeout = {
                let cfg = self.shared.config();
                cfg.users
                    .get(&self.info.user)
                    .and_then(|u| u.client_idle_timeout)
                    .unwrap_or(cfg.sluice.client_idle_timeout)
            };
            let idle = async {
                match idle_timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = io.fill() => match r {
                    Ok(()) => {}
                    Err(_) => return End::Client,
                },
                _ = shutdown.cancelled() => return End::Terminated,
                _ = kill.cancelled() => return End::Terminated,
                _ = idle => {
                    io.send_error(&ErrorFields::fatal(SqlState::IDLE_SESSION_TIMEOUT, "client_idle_timeout: closing idle client connection")).await;
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

    /// The first statement of a new transaction, for policies.
    fn first_statement(&self, io: &ClientIo) -> String {
        let Ok(Some(h)) = frontend::peek_header(&io.rbuf) else {
            return String::new();
        };
        let cap = self.shared.config().policy.max_query_len as usize;
        let total = h.total_len().min(io.rbuf.len());
        let body = &io.rbuf[5.min(total)..total];
        let text = match h.tag {
            b'Q' => body,
            b'P' => {
                // Parse: name\0 query\0 ...
                let name_end = body
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(body.len(), |p| p + 1);
                &body[name_end.min(body.len())..]
            }
            _ => &[][..],
        };
        let end = text
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(text.len())
            .min(cap);
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
            io.rbuf.advance(h.total_len());
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
        let shared = self.shared.clone();
        let policy = &shared.policy;
        let mut ticket = self.ticket.clone();
        let mut timeout_ms = None;
        if policy.wants(Hook::Transaction) || policy.wants(Hook::Query) {
            let query = self.first_statement(io);
            let kind = sluice_policy::statement_kind(&query);
            let (size, active, idle, waiting) = self.pool.pool.load();
            let facts = TransactionFacts {
                cookies: &self.cookies,
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
                if !policy.wants(hook) {
                    continue;
                }
                let d = if hook == Hook::Transaction {
                    policy.on_transaction(&facts)
                } else {
                    policy.on_query(&facts)
                };
                match d {
                    TransactionDecision::Proceed(p) => {
                        if let Some(pr) = p.priority {
                            ticket.priority = pr;
                        }
                        if p.timeout_ms.is_some() {
                            timeout_ms = p.timeout_ms;
                        }
                    }
                    TransactionDecision::Reject(r) => {
                        self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        let code = SqlState::parse(r.sqlstate.as_str())
                            .unwrap_or(SqlState::INSUFFICIENT_PRIVILEGE);
                        return self
                            .refuse_batch(io, ErrorFields::error(code, r.message))
                            .await;
                    }
                }
            }
        }
        let saved = std::mem::replace(&mut self.ticket, ticket);
        let checkout = self.checkout(io, false).await;
        self.ticket = saved;
        let mut guard = match checkout {
            Ok(g) => g,
            Err(f) => return self.refuse_batch(io, f).await,
        };
        let waited = guard.waited;
        let started = Instant::now();
        self.cancel.attach(guard.cancel_target());
        let result = self.relay(io, &mut guard, timeout_ms).await;
        self.cancel.detach();
        self.info.server_pid.store(0, Ordering::Relaxed);
        self.info.set_state(ClientState::Idle);
        self.shared
            .stats
            .transactions
            .fetch_add(1, Ordering::Relaxed);
        let outcome = match &result {
            Ok(r) if r.saw_error => Outcome::Failed,
            Ok(_) => Outcome::Committed,
            Err(_) => Outcome::Aborted,
        };
        if let Ok(r) = &result {
            self.shared
                .stats
                .queries
                .fetch_add(r.queries, Ordering::Relaxed);
        }
        if policy.wants(Hook::Complete) {
            policy.on_complete(&CompletionFacts {
                cookies: &self.cookies,
                class: &self.class_name,
                duration_us: started.elapsed().as_micros() as u64,
                wait_us: waited.as_micros() as u64,
                outcome,
            });
        }
        self.shared.stats.record_tx(started.elapsed(), waited);
        match result {
            Ok(relay) => {
                self.relay = relay;
                self.release(guard);
                Ok(())
            }
            Err(end) => {
                self.abandon(guard);
                Err(end)
            }
        }
    }

    fn release(&self, guard: ServerGuard) {
        if guard.cancels.idle() {
            drop(guard);
            return;
        }
        // A cancel is still in flight against this backend: reuse it only after it landed.
        let wait = self.shared.config().sluice.cancel_wait_timeout;
        self.shared.tracker.spawn(async move {
            let _ = tokio::time::timeout(wait, guard.cancels.wait()).await;
            drop(guard);
        });
    }

    /// The client went away mid-transaction: roll back and reuse the server connection if it
    /// is in a clean state to do so; otherwise close it. Never reuse it dirty.
    fn abandon(&self, mut guard: ServerGuard) {
        self.shared.stats.abandoned.fetch_add(1, Ordering::Relaxed);
        if !guard.quiet && !guard.broken {
            // A query is still running for nobody: cancel it and close the connection, so
            // its answers can never reach another client.
            guard.broken = true;
            let target = guard.cancel_target();
            let timeout = self.shared.config().sluice.cancel_wait_timeout;
            self.shared.tracker.spawn(async move {
                let _ = tokio::time::timeout(timeout, crate::cancel::forward(&target)).await;
            });
        }
        let clean_point = guard.rbuf.is_empty() && !guard.broken && guard.quiet;
        if !clean_point || guard.status == TransactionStatus::Idle {
            if guard.status != TransactionStatus::Idle || !clean_point {
                guard.broken = true;
            }
            drop(guard);
            return;
        }
        self.shared.tracker.spawn(async move {
            let mut out = BytesMut::new();
            frontend::encode_query(&mut out, "ROLLBACK");
            let ok =
                tokio::time::timeout(Duration::from_secs(5), run_simple(&mut guard, &out)).await;
            if !matches!(ok, Ok(Ok(_))) || guard.status != TransactionStatus::Idle {
                guard.broken = true;
            }
            drop(guard);
        });
    }

    /// Relays between client and server until the server connection is free.
    async fn relay(
        &mut self,
        io: &mut ClientIo,
        guard: &mut ServerGuard,
        timeout_ms: Option<u32>,
    ) -> Result<Relay, End> {
        let cfg = self.shared.config();
        let max = cfg.sluice.max_packet_size;
        let idle_tx = self.user_idle_tx(&cfg);
        let server: &mut ServerConn = guard;
        let mut relay = std::mem::take(&mut self.relay);
        relay.reset();
        let mut to_server = std::mem::take(&mut self.to_server);
        to_server.clear();
        relay.close_orphans(server, &mut to_server);
        if server.params_for != Some((self.info.id, self.params.epoch())) {
            if let Some(sql) = self.params.diff(&server.params, &mut server.applied) {
                relay.inject_query(&sql, &mut to_server);
            }
        }
        let _ = timeout_ms;
        let kill = self.info.kill.clone();
        let mut statements = 0u32;
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
                let raw = io.rbuf.split_to(header.total_len()).freeze();
                let status = server.status;
                if matches!(header.tag, b'Q' | b'P') {
                    statements += 1;
                    // The first statement was judged before checkout; later ones here.
                    if statements > 1 && self.shared.policy.wants(Hook::Query) {
                        if let Some(r) = self.judge_statement(&raw, header.tag, status) {
                            relay.reject_statement(header.tag, r, &mut to_server);
                            continue;
                        }
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
                    raw,
                    &mut side,
                    server,
                    &mut to_server,
                    &mut io.wbuf,
                    status,
                );
            }
            if relay.started && relay.done(server) && to_server.is_empty() {
                server.params_for = Some((self.info.id, self.params.epoch()));
                if !io.wbuf.is_empty() {
                    io.flush().await.map_err(|_| End::Client)?;
                }
                self.to_server = to_server;
                return Ok(relay);
            }
            let read_client = to_server.len() < HIGH_WATER;
            let read_server = io.wbuf.len() < HIGH_WATER;
            let idle_wait = async {
                match idle_tx {
                    Some(t)
                        if !relay.waiting_for_server()
                            && server.status != TransactionStatus::Idle =>
                    {
                        tokio::time::sleep(t).await
                    }
                    _ => std::future::pending().await,
                }
            };
            let (mut cr, mut cw) = io.stream.split();
            let (mut sr, mut sw) = server.stream.split();
            tokio::select! {
                biased;
                r = sr.read_buf(&mut server.rbuf), if read_server => {
                    match r {
                        Ok(0) | Err(_) => {
                            server.broken = true;
                            let mut f = ErrorFields::fatal(SqlState::CONNECTION_FAILURE, "server connection lost: the server closed the connection unexpectedly");
                            if let Some(reason) = server.fatal.take() {
                                f = f.with_detail(format!("The server said: {reason}"));
                            }
                            let _ = (cr, cw);
                            io.send_error(&f).await;
                            return Err(End::Server(f.message));
                        }
                        Ok(_) => {
                            let mut side = ClientSide { statements: &mut self.statements, params: &mut self.params, registry: &self.shared.registry };
                            let out = relay.server_output(&mut side, server, &mut io.wbuf, max);
                            server.quiet = relay.quiescent();
                            if !relay.upstream.is_empty() {
                                to_server.extend_from_slice(&relay.upstream);
                                relay.upstream.clear();
                            }
                            if let Err(e) = out {
                                server.broken = true;
                                let _ = (cr, cw);
                                let f = ErrorFields::fatal(SqlState::CONNECTION_FAILURE, format!("server connection lost: {e}"));
                                io.send_error(&f).await;
                                return Err(End::Server(e));
                            }
                        }
                    }
                }
                r = cw.write_buf(&mut io.wbuf), if !io.wbuf.is_empty() => {
                    if r.is_err() { return Err(End::Client); }
                }
                r = sw.write_buf(&mut to_server), if !to_server.is_empty() => {
                    if r.is_err() {
                        server.broken = true;
                        let _ = (cr, cw);
                        let f = ErrorFields::fatal(SqlState::CONNECTION_FAILURE, "server connection lost while sending");
                        io.send_error(&f).await;
                        return Err(End::Server(f.message));
                    }
                }
                r = cr.read_buf(&mut io.rbuf), if read_client => {
                    match r {
                        Ok(0) | Err(_) => return Err(End::Client),
                        Ok(_) => {}
                    }
                }
                _ = idle_wait => {
                    let _ = (cr, cw);
                    io.send_error(&ErrorFields::fatal(SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT, "idle_transaction_timeout: terminating connection due to idle-in-transaction timeout")).await;
                    return Err(End::Timeout("idle_transaction_timeout"));
                }
                _ = kill.cancelled() => return Err(End::Terminated),
            }
        }
    }

    /// Runs `on-query` for a statement inside a running transaction; `Some` to refuse it.
    fn judge_statement(
        &self,
        raw: &[u8],
        tag: u8,
        status: TransactionStatus,
    ) -> Option<ErrorFields> {
        let cap = self.shared.config().policy.max_query_len as usize;
        let body = raw.get(5..).unwrap_or_default();
        let text = match tag {
            b'P' => {
                let name_end = body
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(body.len(), |p| p + 1);
                &body[name_end.min(body.len())..]
            }
            _ => body,
        };
        let end = text
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(text.len())
            .min(cap);
        let query = String::from_utf8_lossy(&text[..end]);
        let (size, active, idle, waiting) = self.pool.pool.load();
        let facts = TransactionFacts {
            cookies: &self.cookies,
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
        match self.shared.policy.on_query(&facts) {
            TransactionDecision::Proceed(_) => None,
            TransactionDecision::Reject(r) => {
                self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                let code = SqlState::parse(r.sqlstate.as_str())
                    .unwrap_or(SqlState::INSUFFICIENT_PRIVILEGE);
                Some(ErrorFields::error(code, r.message))
            }
        }
    }

    fn user_idle_tx(&self, cfg: &sluice_config::Config) -> Option<Duration> {
        cfg.users
            .get(&self.info.user)
            .and_then(|u| u.idle_transaction_timeout)
            .unwrap_or(cfg.sluice.idle_transaction_timeout)
    }
}

/// Sends one simple query and reads to ReadyForQuery. Returns the ParameterStatus values seen,
/// or the server's error.
async fn run_simple(
    server: &mut ServerConn,
    query: &[u8],
) -> Result<Vec<(String, String)>, ErrorFields> {
    let io_err = |e: std::io::Error| {
        ErrorFields::error(
            SqlState::CONNECTION_FAILURE,
            format!("server connection lost: {e}"),
        )
    };
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

/// The canonical spelling of a reported parameter name.
fn canonical(lower: &str) -> &str {
    match lower {
        "datestyle" => "DateStyle",
        "intervalstyle" => "IntervalStyle",
        "timezone" => "TimeZone",
        other => other,
    }
}
