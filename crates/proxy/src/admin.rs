//! The admin console: the virtual database `sluice` (alias `pgbouncer`), simple protocol only.
//! Column names follow PgBouncer's where the meaning matches, so its tools can read them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tracing::info;

use sluice_wire::backend::{self, TransactionStatus};
use sluice_wire::frontend::FrontendMessage;
use sluice_wire::{ErrorFields, SqlState};

use crate::clients::ClientState;
use crate::io::ClientIo;
use crate::pools::PoolEntry;
use crate::shared::Shared;
use crate::ShutdownMode;

/// SQLSTATE of a command naming something that does not exist (a client id, a database).
const UNDEFINED_OBJECT: SqlState = SqlState::new(b"42704");

/// An admin console session.
pub struct Admin {
    shared: Arc<Shared>,
    user: String,
    /// Admin users may change things; stats users may only look.
    admin: bool,
}

/// A result set built in memory (admin results are small).
struct Table {
    columns: Vec<&'static str>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[&'static str]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, values: Vec<String>) {
        self.rows.push(values.into_iter().map(Some).collect());
    }

    fn write(&self, out: &mut BytesMut, tag: &str) {
        backend::encode_row_description(out, &self.columns);
        for r in &self.rows {
            let vals: Vec<Option<&[u8]>> =
                r.iter().map(|v| v.as_deref().map(str::as_bytes)).collect();
            backend::encode_data_row(out, &vals);
        }
        backend::encode_command_complete(out, &format!("{tag} {}", self.rows.len()));
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Admin {
    /// A console for `user`.
    pub fn new(shared: Arc<Shared>, user: String, admin: bool) -> Self {
        Admin {
            shared,
            user,
            admin,
        }
    }

    /// Serves commands until the client leaves.
    pub async fn serve(self, mut io: ClientIo) {
        let version = env!("CARGO_PKG_VERSION");
        for (k, v) in [
            (
                "server_version",
                "15.0 (Sluice ".to_string() + version + ")",
            ),
            ("client_encoding", "UTF8".into()),
            ("server_encoding", "UTF8".into()),
            ("DateStyle", "ISO, MDY".into()),
            ("integer_datetimes", "on".into()),
            ("standard_conforming_strings", "on".into()),
            ("application_name", String::new()),
        ] {
            backend::encode_parameter_status(&mut io.wbuf, k, &v);
        }
        backend::encode_backend_key_data(&mut io.wbuf, 0, &[0, 0, 0, 0]);
        backend::encode_ready_for_query(&mut io.wbuf, TransactionStatus::Idle);
        if io.flush().await.is_err() {
            return;
        }
        loop {
            let msg = loop {
                match FrontendMessage::decode(&mut io.rbuf, 1 << 20) {
                    Ok(Some(m)) => break Some(m),
                    Ok(None) => {
                        let hard_stop = self.shared.hard_stop.clone();
                        let filled = tokio::select! {
                            r = io.fill() => r.is_ok(),
                            _ = hard_stop.cancelled() => false,
                        };
                        if !filled {
                            break None;
                        }
                    }
                    Err(_) => break None,
                }
            };
            let Some(msg) = msg else { return };
            match msg {
                FrontendMessage::Query { sql } => {
                    let text = String::from_utf8_lossy(&sql).to_string();
                    let mut out = BytesMut::new();
                    let stop = self.command(&text, &mut out).await;
                    backend::encode_ready_for_query(&mut out, TransactionStatus::Idle);
                    io.wbuf.extend_from_slice(&out);
                    if io.flush().await.is_err() || stop {
                        return;
                    }
                }
                FrontendMessage::Terminate => return,
                FrontendMessage::Sync => {
                    backend::encode_ready_for_query(&mut io.wbuf, TransactionStatus::Idle);
                    let _ = io.flush().await;
                }
                _ => {
                    io.send_error(&ErrorFields::error(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "the admin console supports the simple query protocol only",
                    ))
                    .await;
                }
            }
        }
    }

    /// Runs one command; returns true when the console should close.
    async fn command(&self, text: &str, out: &mut BytesMut) -> bool {
        let cleaned = text.trim().trim_end_matches(';').trim();
        let words: Vec<String> = cleaned
            .split_whitespace()
            .map(|w| w.to_ascii_lowercase())
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        // The database argument of PAUSE / RESUME / RECONNECT as typed (for messages).
        let db_arg = cleaned.split_whitespace().nth(1);
        let err = |out: &mut BytesMut, code: SqlState, msg: String| {
            backend::encode_error(out, &ErrorFields::error(code, msg));
        };
        match words.as_slice() {
            [] => backend::encode_empty_query(out),
            ["show", what] => match self.show(what) {
                Some(t) => t.write(out, "SHOW"),
                None => err(
                    out,
                    SqlState::SYNTAX_ERROR,
                    format!("unknown SHOW item \"{what}\""),
                ),
            },
            _ if !self.admin => err(
                out,
                SqlState::INSUFFICIENT_PRIVILEGE,
                format!("\"{}\" may only run SHOW commands", self.user),
            ),
            ["pause"] | ["pause", _] => match self.pools(db_arg) {
                Ok(pools) => {
                    for p in &pools {
                        p.pool.pause();
                    }
                    for p in &pools {
                        p.pool.wait_idle().await;
                    }
                    info!(admin = %self.user, target = ?db_arg, "PAUSE");
                    backend::encode_command_complete(out, "PAUSE");
                }
                Err(e) => backend::encode_error(out, &e),
            },
            ["resume"] | ["resume", _] => match self.pools(db_arg) {
                // As PgBouncer: resuming what is not paused is an error, so a script that
                // resumes the wrong database hears of it.
                Ok(pools) if !pools.iter().any(|p| p.pool.is_paused()) => {
                    let msg = match db_arg {
                        Some(db) => format!("database {db} is not paused"),
                        None => "pooler is not paused".to_owned(),
                    };
                    backend::encode_error(
                        out,
                        &ErrorFields::error(SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE, msg),
                    );
                }
                Ok(pools) => {
                    for p in pools {
                        p.pool.resume();
                    }
                    info!(admin = %self.user, target = ?db_arg, "RESUME");
                    backend::encode_command_complete(out, "RESUME");
                }
                Err(e) => backend::encode_error(out, &e),
            },
            ["reconnect"] | ["reconnect", _] => match self.pools(db_arg) {
                Ok(pools) => {
                    for p in pools {
                        p.pool.reconnect();
                    }
                    info!(admin = %self.user, target = ?db_arg, "RECONNECT");
                    backend::encode_command_complete(out, "RECONNECT");
                }
                Err(e) => backend::encode_error(out, &e),
            },
            ["kill_client", id] => match id.parse::<u64>() {
                Ok(id) if self.shared.clients.kill(id) => {
                    backend::encode_command_complete(out, "KILL_CLIENT")
                }
                _ => err(out, UNDEFINED_OBJECT, format!("no client with id {id}")),
            },
            ["reload"] => match crate::reload_from_disk(&self.shared).await {
                Ok(()) => backend::encode_command_complete(out, "RELOAD"),
                Err(e) => err(
                    out,
                    SqlState::new(b"F0000"),
                    format!("RELOAD failed, the previous configuration stays: {e}"),
                ),
            },
            ["shutdown"] | ["shutdown", "wait_for_clients"] => {
                crate::begin_shutdown(&self.shared, ShutdownMode::Graceful);
                backend::encode_command_complete(out, "SHUTDOWN");
                return true;
            }
            _ => err(
                out,
                SqlState::SYNTAX_ERROR,
                format!("unknown command: {cleaned}"),
            ),
        }
        false
    }

    /// The pools of database `db` (every pool when `None`). A database that is neither
    /// configured nor has a pool is an error, as in PgBouncer ("no such database").
    fn pools(&self, db: Option<&str>) -> Result<Vec<Arc<PoolEntry>>, ErrorFields> {
        let pools: Vec<_> = self
            .shared
            .pools
            .all()
            .into_iter()
            .filter(|p| db.is_none_or(|d| p.db.eq_ignore_ascii_case(d)))
            .collect();
        match db {
            Some(d)
                if pools.is_empty()
                    && !self
                        .shared
                        .config()
                        .databases
                        .keys()
                        .any(|k| k.eq_ignore_ascii_case(d)) =>
            {
                Err(ErrorFields::error(
                    UNDEFINED_OBJECT,
                    format!("no such database: {d}"),
                ))
            }
            _ => Ok(pools),
        }
    }

    fn show(&self, what: &str) -> Option<Table> {
        let shared = &self.shared;
        let cfg = shared.config();
        let clients = shared.clients.all();
        Some(match what {
            "version" => {
                let mut t = Table::new(&["version"]);
                t.row(vec![format!("Sluice {}", env!("CARGO_PKG_VERSION"))]);
                t
            }
            "pools" => {
                let mut t = Table::new(&[
                    "database",
                    "user",
                    "cl_active",
                    "cl_waiting",
                    "sv_active",
                    "sv_idle",
                    "sv_used",
                    "sv_tested",
                    "sv_login",
                    "maxwait",
                    "maxwait_us",
                    "pool_mode",
                    "pool_size",
                    "paused",
                ]);
                for p in shared.pools.all() {
                    let s = p.pool.stats();
                    let mine = clients.iter().filter(|c| c.db == p.db && c.user == p.user);
                    let (mut active, mut waiting) = (0, 0);
                    for c in mine {
                        match c.state() {
                            ClientState::Waiting => waiting += 1,
                            _ => active += 1,
                        }
                    }
                    let mw = s.max_wait();
                    t.row(vec![
                        p.db.clone(),
                        p.user.clone(),
                        active.to_string(),
                        waiting.to_string(),
                        s.active.to_string(),
                        s.idle.to_string(),
                        "0".into(),
                        "0".into(),
                        s.connecting.to_string(),
                        mw.as_secs().to_string(),
                        mw.subsec_micros().to_string(),
                        "transaction".into(),
                        s.size.to_string(),
                        u8::from(s.paused).to_string(),
                    ]);
                }
                t
            }
            "clients" => {
                let mut t = Table::new(&[
                    "type",
                    "user",
                    "database",
                    "state",
                    "addr",
                    "port",
                    "connect_time",
                    "remote_pid",
                    "application_name",
                    "id",
                    "class",
                    "tls",
                ]);
                for c in &clients {
                    t.row(vec![
                        "C".into(),
                        c.user.clone(),
                        c.db.clone(),
                        c.state().as_str().into(),
                        c.addr.map_or("unix".into(), |a| a.ip().to_string()),
                        c.addr.map_or(0, |a| a.port()).to_string(),
                        unix_secs(c.connected_at).to_string(),
                        c.server_pid.load(Ordering::Relaxed).to_string(),
                        c.app.clone(),
                        c.id.to_string(),
                        c.class.clone(),
                        "".into(),
                    ]);
                }
                t
            }
            "servers" => {
                let mut t = Table::new(&[
                    "type",
                    "user",
                    "database",
                    "state",
                    "addr",
                    "port",
                    "remote_pid",
                    "link",
                ]);
                for p in shared.pools.all() {
                    let spec = p.pool.connector().spec();
                    let mut server = |state: &str, pid: u32, link: String| {
                        t.row(vec![
                            "S".into(),
                            spec.user.clone(),
                            spec.dbname.clone(),
                            state.into(),
                            spec.addr.host.clone(),
                            spec.addr.port.to_string(),
                            pid.to_string(),
                            link,
                        ]);
                    };
                    for c in clients.iter().filter(|c| c.db == p.db && c.user == p.user) {
                        let pid = c.server_pid.load(Ordering::Relaxed);
                        if pid != 0 {
                            server("active", pid, c.id.to_string());
                        }
                    }
                    for pid in p.pool.idle_map(|s| s.pid) {
                        server("idle", pid, String::new());
                    }
                }
                t
            }
            "stats" | "stats_totals" => {
                let s = &shared.stats;
                let xacts = s.transactions.get();
                let up = shared.started.elapsed().as_secs().max(1);
                let mut t = Table::new(&[
                    "database",
                    "total_xact_count",
                    "total_query_count",
                    "total_xact_time",
                    "total_wait_time",
                    "avg_xact_count",
                    "avg_xact_time",
                    "avg_wait_time",
                    "total_rejected",
                    "total_abandoned",
                    "total_server_resets",
                ]);
                let xact_us = s.xact_us.get();
                let wait_us = s.wait_us.get();
                t.row(vec![
                    "*".into(),
                    xacts.to_string(),
                    s.queries.get().to_string(),
                    xact_us.to_string(),
                    wait_us.to_string(),
                    (xacts / up).to_string(),
                    (xact_us / xacts.max(1)).to_string(),
                    (wait_us / xacts.max(1)).to_string(),
                    s.rejected.get().to_string(),
                    s.abandoned.get().to_string(),
                    s.server_resets.get().to_string(),
                ]);
                t
            }
            "databases" => {
                let mut t = Table::new(&[
                    "name",
                    "host",
                    "port",
                    "database",
                    "force_user",
                    "pool_size",
                    "min_pool_size",
                    "pool_mode",
                    "max_connections",
                    "current_connections",
                    "paused",
                    "disabled",
                ]);
                for (name, d) in &cfg.databases {
                    let pools: Vec<_> = shared
                        .pools
                        .all()
                        .into_iter()
                        .filter(|p| &p.db == name)
                        .collect();
                    let current: u32 = pools
                        .iter()
                        .map(|p| {
                            let s = p.pool.stats();
                            s.active + s.idle
                        })
                        .sum();
                    let paused = pools.iter().any(|p| p.pool.is_paused());
                    t.row(vec![
                        name.clone(),
                        d.host.clone(),
                        d.port.to_string(),
                        d.dbname.clone(),
                        d.user.clone().unwrap_or_default(),
                        d.pool_size
                            .unwrap_or(cfg.sluice.default_pool_size)
                            .to_string(),
                        d.min_pool_size
                            .unwrap_or(cfg.sluice.min_pool_size)
                            .to_string(),
                        "transaction".into(),
                        d.max_db_connections
                            .unwrap_or(cfg.sluice.max_db_connections)
                            .to_string(),
                        current.to_string(),
                        u8::from(paused).to_string(),
                        "0".into(),
                    ]);
                }
                t
            }
            "users" => {
                let mut t = Table::new(&["name", "pool_mode", "auth_type", "pool_size", "class"]);
                for (name, u) in &cfg.users {
                    t.row(vec![
                        name.clone(),
                        "transaction".into(),
                        cfg.auth_type(name).as_str().into(),
                        u.pool_size.map_or(String::new(), |p| p.to_string()),
                        cfg.user_class(name).name.clone(),
                    ]);
                }
                t
            }
            "config" => {
                let g = &cfg.sluice;
                let d = |x: Option<std::time::Duration>| {
                    x.map_or("0".into(), |d| format!("{}", d.as_secs_f64()))
                };
                let mut t = Table::new(&["key", "value", "changeable"]);
                for (k, v, ch) in [
                    ("listen_port", g.listen_port.to_string(), "no"),
                    (
                        "tcp_defer_accept",
                        u8::from(g.tcp_defer_accept).to_string(),
                        "no",
                    ),
                    ("pool_mode", "transaction".to_string(), "no"),
                    ("auth_type", g.auth_type.as_str().to_string(), "yes"),
                    ("max_client_conn", g.max_client_conn.to_string(), "yes"),
                    ("default_pool_size", g.default_pool_size.to_string(), "yes"),
                    ("min_pool_size", g.min_pool_size.to_string(), "yes"),
                    (
                        "max_db_connections",
                        g.max_db_connections.to_string(),
                        "yes",
                    ),
                    (
                        "max_user_connections",
                        g.max_user_connections.to_string(),
                        "yes",
                    ),
                    ("query_wait_timeout", d(g.query_wait_timeout), "yes"),
                    ("query_wait_notify", d(g.query_wait_notify), "yes"),
                    (
                        "server_connect_timeout",
                        format!("{}", g.server_connect_timeout.as_secs_f64()),
                        "yes",
                    ),
                    ("server_idle_timeout", d(g.server_idle_timeout), "yes"),
                    ("server_lifetime", d(g.server_lifetime), "yes"),
                    ("client_idle_timeout", d(g.client_idle_timeout), "yes"),
                    (
                        "idle_transaction_timeout",
                        d(g.idle_transaction_timeout),
                        "yes",
                    ),
                    ("client_login_timeout", d(g.client_login_timeout), "yes"),
                    (
                        "max_prepared_statements",
                        g.max_prepared_statements.to_string(),
                        "yes",
                    ),
                    (
                        "shutdown_timeout",
                        format!("{}", g.shutdown_timeout.as_secs_f64()),
                        "yes",
                    ),
                ] {
                    t.row(vec![k.into(), v, ch.into()]);
                }
                t
            }
            "lists" => {
                let mut t = Table::new(&["list", "items"]);
                let pools = shared.pools.all();
                let (mut idle_sv, mut used_sv) = (0u32, 0u32);
                for p in &pools {
                    let s = p.pool.stats();
                    idle_sv += s.idle;
                    used_sv += s.active;
                }
                for (k, v) in [
                    ("databases", cfg.databases.len() as u32),
                    ("users", cfg.users.len() as u32),
                    ("pools", pools.len() as u32),
                    ("used_clients", clients.len() as u32),
                    ("free_servers", idle_sv),
                    ("used_servers", used_sv),
                    ("prepared_statements", shared.registry.len() as u32),
                ] {
                    t.row(vec![k.into(), v.to_string()]);
                }
                t
            }
            "policies" => {
                let mut t = Table::new(&[
                    "name",
                    "plugin_name",
                    "version",
                    "generation",
                    "digest",
                    "loaded_at",
                    "calls",
                    "traps",
                    "timeouts",
                    "invalid",
                    "breaker_open",
                    "decisions",
                    "avg_call_ns",
                ]);
                for p in shared.policy.stats() {
                    let calls: u64 = p.calls.iter().sum();
                    let decisions = p
                        .decisions
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    t.row(vec![
                        p.name,
                        p.plugin_name,
                        p.version,
                        p.generation.to_string(),
                        p.digest,
                        unix_secs(p.loaded_at).to_string(),
                        calls.to_string(),
                        p.traps.to_string(),
                        p.timeouts.to_string(),
                        p.invalid.to_string(),
                        u8::from(p.breaker_open).to_string(),
                        decisions,
                        (p.call_ns_total / calls.max(1)).to_string(),
                    ]);
                }
                t
            }
            "classes" => {
                let mut t = Table::new(&[
                    "pool",
                    "class",
                    "priority",
                    "active",
                    "waiting",
                    "max_active",
                    "reserved",
                    "max_wait_ms",
                    "oldest_wait_ms",
                    "served",
                    "shed",
                ]);
                for p in shared.pools.all() {
                    let s = p.pool.stats();
                    for c in &s.classes {
                        t.row(vec![
                            s.name.to_string(),
                            c.name.to_string(),
                            c.priority.to_string(),
                            c.active.to_string(),
                            c.waiting.to_string(),
                            c.max_active.map_or("".into(), |m| m.to_string()),
                            c.reserved.to_string(),
                            c.max_wait.map_or("".into(), |m| m.as_millis().to_string()),
                            c.oldest_wait.as_millis().to_string(),
                            c.served_total.to_string(),
                            c.shed_total.to_string(),
                        ]);
                    }
                }
                t
            }
            "help" => {
                let mut t = Table::new(&["command"]);
                for c in [
                    "SHOW POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|DATABASES|USERS|CONFIG|VERSION|LISTS|POLICIES|CLASSES",
                    "PAUSE [db]", "RESUME [db]", "RECONNECT [db]", "KILL_CLIENT id", "RELOAD", "SHUTDOWN",
                ] {
                    t.row(vec![c.into()]);
                }
                t
            }
            _ => return None,
        })
    }
}
