//! sluice-policy: the WebAssembly policy engine, the only crate that knows wasmtime.
//!
//! Plugins are WebAssembly components of the world `sluice:policy/policy@0.1.0` (see `wit/`).
//! [`PolicyEngine`] loads them, calls their hooks under a CPU deadline and a memory cap, applies
//! each plugin's failure mode and circuit breaker, validates and merges decisions, and reloads
//! plugins atomically. The proxy sees only the plain Rust types of this module: every hook method
//! returns a final decision, never an error.

mod breaker;
mod convert;
mod engine;
mod error;
mod kind;
mod policy;
mod runtime;
mod shared;
pub mod simulate;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod watch;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

pub use engine::{Cookies, PolicyEngine, ReloadReport, ReloadedPlugin};
pub use error::PolicyError;
pub use kind::statement_kind;
pub use policy::Policy;
pub use simulate::{simulate, SimSummary};
pub use watch::Watcher;

/// A validated SQLSTATE: exactly 5 characters of `[0-9A-Z]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(pub [u8; 5]);

impl SqlState {
    /// 58000 `system_error`: what a failed plugin with `fail = "closed"` answers.
    pub const SYSTEM_ERROR: SqlState = SqlState(*b"58000");

    /// Parses and validates a SQLSTATE.
    pub fn parse(text: &str) -> Option<SqlState> {
        let bytes: [u8; 5] = text.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            .then_some(SqlState(bytes))
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Only constructed from ASCII.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is connecting: the input of `on-connect`.
#[derive(Debug, Clone, Copy)]
pub struct ClientFacts<'a> {
    /// User name from the startup packet.
    pub user: &'a str,
    /// Database name from the startup packet.
    pub database: &'a str,
    /// `application_name`, or "".
    pub application_name: &'a str,
    /// Client address; None for a Unix socket.
    pub addr: Option<IpAddr>,
    /// Client port; 0 for a Unix socket.
    pub port: u16,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Every startup parameter, in the order the client sent them (`user`, `database` and
    /// `application_name` included).
    pub params: &'a [(String, String)],
}

/// The final answer for a connecting client.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectDecision {
    /// Let the client in.
    Admit(Admission),
    /// Refuse it.
    Reject(Rejection),
}

/// A merged admission: the result of every plugin's `on-connect`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    /// A configured class name; None = the user's class or the default class.
    pub class: Option<String>,
    /// None = the class priority.
    pub priority: Option<i32>,
    /// Each admitting plugin's cookie, tagged with that plugin: keep it with the client and pass
    /// it back on later hooks ([`TransactionFacts::cookies`], [`CompletionFacts::cookies`],
    /// [`PolicyEngine::on_disconnect`]).
    pub cookies: Cookies,
    /// Per-client key (address, application, tenant...) for the `key_*` limits.
    pub limit_key: Option<String>,
    /// Max server connections held at once by this key (>= 1).
    pub key_max_active: Option<u32>,
    /// Transactions per second for this key.
    pub key_rate: Option<Rate>,
    /// Max client connections for this key (>= 1; 53300 beyond).
    pub key_max_clients: Option<u32>,
}

/// A token-bucket rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained rate per second (finite, > 0).
    pub per_sec: f64,
    /// Bucket size (>= 1).
    pub burst: u32,
}

/// A refusal, sent to the client as an ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Validated SQLSTATE.
    pub sqlstate: SqlState,
    /// Non-empty message, at most 1024 bytes.
    pub message: String,
}

/// Kind of a statement, from its first keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// SELECT, WITH, VALUES, TABLE, SHOW, EXPLAIN.
    Select,
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// CREATE, ALTER, DROP, TRUNCATE, COMMENT, GRANT, REVOKE, REINDEX, CLUSTER, VACUUM, ANALYZE.
    Ddl,
    /// BEGIN, START TRANSACTION.
    Begin,
    /// COMMIT, END.
    Commit,
    /// ROLLBACK, ABORT.
    Rollback,
    /// SET, RESET.
    Set,
    /// COPY.
    Copy,
    /// Anything else.
    Other,
}

/// A pool's occupancy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// Server connections the pool may open.
    pub size: u32,
    /// Busy server connections.
    pub active: u32,
    /// Idle server connections.
    pub idle: u32,
    /// Queued transactions.
    pub waiting: u32,
}

/// A transaction start or a statement: the input of `on-transaction` and `on-query`.
#[derive(Debug, Clone, Copy)]
pub struct TransactionFacts<'a> {
    /// The cookies of the client's admission.
    pub cookies: &'a Cookies,
    /// The client's class.
    pub class: &'a str,
    /// Kind of `query`.
    pub kind: StatementKind,
    /// The server's last ReadyForQuery status was "in a transaction block" (or "failed
    /// transaction block"): false at a transaction start.
    pub in_transaction: bool,
    /// Statement text (the engine caps it at `max_query_len` bytes on a char boundary).
    pub query: &'a str,
    /// The client's pool.
    pub pool: PoolSnapshot,
}

/// The final answer for a transaction or statement.
#[derive(Debug, Clone, PartialEq)]
pub enum TransactionDecision {
    /// Go ahead.
    Proceed(Proceed),
    /// Refuse it; the client stays connected.
    Reject(Rejection),
}

/// Adjustments to a transaction. None = default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proceed {
    /// Queue priority for this transaction.
    pub priority: Option<i32>,
    /// Route name.
    pub route: Option<String>,
    /// Statement timeout in milliseconds.
    pub timeout_ms: Option<u32>,
}

/// One class of a saturated pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassPressure {
    /// Class name.
    pub name: String,
    /// Connections held by the class.
    #[serde(default)]
    pub active: u32,
    /// Waiters of the class.
    #[serde(default)]
    pub waiting: u32,
    /// Wait of the oldest waiter, ms.
    #[serde(default)]
    pub oldest_wait_ms: u64,
    /// Current limit on active connections.
    #[serde(default)]
    pub max_active: Option<u32>,
    /// Current wait budget, ms.
    #[serde(default)]
    pub max_wait_ms: Option<u64>,
    /// Shed so far.
    #[serde(default)]
    pub shed_total: u64,
}

/// A saturated pool: the input of `on-pressure`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PressureFacts {
    /// Pool name ("db.user").
    pub pool: String,
    /// Pool size.
    #[serde(default)]
    pub size: u32,
    /// Busy connections.
    #[serde(default)]
    pub active: u32,
    /// Idle connections.
    #[serde(default)]
    pub idle: u32,
    /// Queued transactions.
    #[serde(default)]
    pub waiting: u32,
    /// Per-class state.
    #[serde(default)]
    pub classes: Vec<ClassPressure>,
}

/// A change to a class's limits, from `on-pressure`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PressureAction {
    /// A configured class.
    pub class: String,
    /// New active-connection limit.
    pub max_active: Option<u32>,
    /// New wait budget, ms.
    pub max_wait_ms: Option<u64>,
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Ended without an error. The proxy reports a client's ROLLBACK as this too.
    Committed,
    /// Rolled back by the client. Not produced by the proxy yet (see `docs/plugins.md`).
    RolledBack,
    /// Ended with an error.
    Failed,
    /// Client or server went away.
    Aborted,
}

/// A finished transaction: the input of `on-complete`.
#[derive(Debug, Clone, Copy)]
pub struct CompletionFacts<'a> {
    /// The cookies of the client's admission.
    pub cookies: &'a Cookies,
    /// The client's class.
    pub class: &'a str,
    /// From checkout (a server connection assigned) to the end of the transaction, µs. Excludes
    /// the queue wait.
    pub duration_us: u64,
    /// Queue wait before checkout, µs.
    pub wait_us: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A plugin hook. The discriminant indexes [`PluginStats::calls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `on-connect`.
    Connect = 0,
    /// `on-transaction`.
    Transaction = 1,
    /// `on-query`.
    Query = 2,
    /// `on-pressure`.
    Pressure = 3,
    /// `on-complete`.
    Complete = 4,
    /// `on-disconnect`.
    Disconnect = 5,
}

impl Hook {
    /// Every hook, in discriminant order.
    pub const ALL: [Hook; 6] = [
        Hook::Connect,
        Hook::Transaction,
        Hook::Query,
        Hook::Pressure,
        Hook::Complete,
        Hook::Disconnect,
    ];

    /// The WIT name of the hook (`on-connect`...).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect => "on-connect",
            Hook::Transaction => "on-transaction",
            Hook::Query => "on-query",
            Hook::Pressure => "on-pressure",
            Hook::Complete => "on-complete",
            Hook::Disconnect => "on-disconnect",
        }
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Source of pool occupancy for the `pool-state` host function.
pub trait PoolStateProvider: Send + Sync {
    /// The occupancy of `pool` ("db.user"), if it exists.
    fn pool_state(&self, pool: &str) -> Option<PoolSnapshot>;
}

/// Per-plugin statistics, for `SHOW POLICIES` and `/metrics`. Counters are kept by plugin name
/// and survive reloads.
#[derive(Debug, Clone)]
pub struct PluginStats {
    /// Name from the config.
    pub name: String,
    /// The name the plugin reported from `init` (`plugin-info.name`; informational, at most
    /// 256 bytes).
    pub plugin_name: String,
    /// The version the plugin reported from `init` (`plugin-info.version`, at most 256 bytes).
    pub version: String,
    /// Component file.
    pub path: PathBuf,
    /// Generation of the plugin set this plugin was loaded in.
    pub generation: u64,
    /// sha256 of the file, hex.
    pub digest: String,
    /// When this generation was loaded.
    pub loaded_at: SystemTime,
    /// Calls by [`Hook`] discriminant.
    pub calls: [u64; 6],
    /// Traps (including out-of-memory and instantiation failures).
    pub traps: u64,
    /// Deadline overruns.
    pub timeouts: u64,
    /// Invalid decisions.
    pub invalid: u64,
    /// Whether the circuit breaker is open now.
    pub breaker_open: bool,
    /// Decisions by outcome: admit, reject, proceed, actions, fail_open, fail_closed, breaker_skip.
    pub decisions: Vec<(String, u64)>,
    /// Total time spent in calls, ns.
    pub call_ns_total: u64,
}
