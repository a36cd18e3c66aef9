//! sluice-config: reads `sluice.toml`, checks every value, and hands out one validated [`Config`].
//!
//! Loading happens once before any port is bound, and again on reload; a [`Config`] is immutable
//! and cheap to clone into the next `ArcSwap` generation. Every error names the file, the dotted
//! key and what is wrong ([`ConfigError`]). Settings and defaults follow PgBouncer where the
//! meaning is the same; `config/sluice.toml` documents each one.

mod error;
mod raw;
mod secret;
mod validate;
mod value;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use secret::{md5_secret, md5_text, ScramSecret, Secret};

/// A validated configuration: what `sluice.toml` says, with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from (`None` when parsed from a string).
    pub path: Option<PathBuf>,
    /// `[sluice]`: listeners, global limits, timeouts, logging.
    pub sluice: General,
    /// `[databases.NAME]`, by the name clients connect to.
    pub databases: BTreeMap<String, Database>,
    /// `[users.NAME]`, by user name.
    pub users: BTreeMap<String, User>,
    /// `[classes.NAME]`, sorted by name; always contains `scheduler.default_class`.
    pub classes: Vec<Class>,
    /// `[scheduler]`: how waiting transactions are ordered.
    pub scheduler: Scheduler,
    /// `[policy]`: Wasm policy plugins and their limits.
    pub policy: PolicyConfig,
}

/// The `[sluice]` section. Timeouts that are `Option` are disabled by `0` (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct General {
    /// TCP addresses to listen on; `"*"` gives `0.0.0.0` and `::`. Empty: Unix socket only.
    pub listen_addr: Vec<IpAddr>,
    /// TCP port; `0` picks a free port (tests).
    pub listen_port: u16,
    /// Directory for the `.s.PGSQL.<port>` Unix socket, if any.
    pub unix_socket_dir: Option<PathBuf>,
    /// Always [`PoolMode::Transaction`].
    pub pool_mode: PoolMode,
    /// How clients authenticate unless a user overrides it.
    pub auth_type: AuthType,
    /// Most client connections at once.
    pub max_client_conn: u32,
    /// Server connections per (database, user) pool unless overridden.
    pub default_pool_size: u32,
    /// Server connections kept open per pool even when idle.
    pub min_pool_size: u32,
    /// Server connections per database over all users; 0 = unlimited.
    pub max_db_connections: u32,
    /// Server connections per user over all databases; 0 = unlimited.
    pub max_user_connections: u32,
    /// Client connections per database; 0 = unlimited.
    pub max_db_client_connections: u32,
    /// Client connections per user; 0 = unlimited.
    pub max_user_client_connections: u32,
    /// Client connections per client IP address; 0 = unlimited.
    pub max_addr_client_connections: u32,
    /// Client connections per `application_name`; 0 = unlimited.
    pub max_app_client_connections: u32,
    /// Longest a transaction waits for a server connection before the client gets an error.
    pub query_wait_timeout: Option<Duration>,
    /// Wait after which a queued client gets a NOTICE that it is waiting.
    pub query_wait_notify: Option<Duration>,
    /// Longest to wait for a server connection and login to complete.
    pub server_connect_timeout: Duration,
    /// Idle server connections older than this are closed.
    pub server_idle_timeout: Option<Duration>,
    /// Server connections older than this are closed once released.
    pub server_lifetime: Option<Duration>,
    /// After a failed server login, new logins to that pool fail fast for this long.
    pub server_login_retry: Duration,
    /// Idle clients (outside a transaction) are disconnected after this long.
    pub client_idle_timeout: Option<Duration>,
    /// Clients idle inside a transaction are disconnected after this long.
    pub idle_transaction_timeout: Option<Duration>,
    /// Clients must finish startup and authentication within this.
    pub client_login_timeout: Option<Duration>,
    /// Longest a cancel request waits to be forwarded.
    pub cancel_wait_timeout: Duration,
    /// Longest a graceful shutdown waits for transactions to finish.
    pub shutdown_timeout: Duration,
    /// Prepared statements tracked per server connection; 0 disables tracking.
    pub max_prepared_statements: u32,
    /// Largest protocol message accepted from a client, in bytes.
    pub max_packet_size: u32,
    /// Runtime worker threads; 0 = number of CPUs.
    pub workers: usize,
    /// Users allowed to run any admin console command.
    pub admin_users: Vec<String>,
    /// Users allowed to run the read-only admin console commands.
    pub stats_users: Vec<String>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log each client connection.
    pub log_connections: bool,
    /// Log each client disconnection, with the reason.
    pub log_disconnections: bool,
    /// Log the errors the pooler itself sends to clients.
    pub log_pooler_errors: bool,
    /// Interval of the periodic stats log line.
    pub stats_period: Option<Duration>,
    /// Address of the Prometheus `/metrics` listener, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Enable TCP keepalive on client and server sockets.
    pub tcp_keepalive: bool,
    /// Accept a TCP client only once its first bytes arrived (`TCP_DEFER_ACCEPT`, Linux).
    pub tcp_defer_accept: bool,
}

/// A `[databases.NAME]` entry: where clients connecting to `NAME` are sent. `None` overrides fall
/// back to `[sluice]`; an override of `Some(None)` is an explicit `0` (disabled).
#[derive(Clone, PartialEq, Eq)]
pub struct Database {
    /// The name clients connect to (the table key).
    pub name: String,
    /// Server host name, IP address, or Unix socket directory.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database name on the server (defaults to `name`).
    pub dbname: String,
    /// Forced server login user instead of the client's.
    pub user: Option<String>,
    /// Password for the forced server login user.
    pub password: Option<String>,
    /// Per-database pool size.
    pub pool_size: Option<u32>,
    /// Per-database minimum pool size.
    pub min_pool_size: Option<u32>,
    /// Per-database server connection cap (0 = unlimited).
    pub max_db_connections: Option<u32>,
    /// Per-database query_wait_timeout.
    pub query_wait_timeout: Option<Option<Duration>>,
    /// Per-database server_lifetime.
    pub server_lifetime: Option<Option<Duration>>,
    /// Per-database client connection cap (0 = unlimited).
    pub max_db_client_connections: Option<u32>,
}

/// A `[users.NAME]` entry. `None` overrides fall back to `[sluice]`; an override of `Some(None)`
/// is an explicit `0` (disabled). `Debug` never shows the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User name (the table key).
    pub name: String,
    /// The password clients must prove, if any.
    pub password: Option<Secret>,
    /// Per-user authentication method (see [`Config::auth_type`] for the effective one).
    pub auth_type: Option<AuthType>,
    /// Per-user pool size (wins over the database's).
    pub pool_size: Option<u32>,
    /// Per-user server connection cap (0 = unlimited).
    pub max_user_connections: Option<u32>,
    /// Per-user client connection cap (0 = unlimited).
    pub max_user_client_connections: Option<u32>,
    /// Per-user query_wait_timeout (wins over the database's).
    pub query_wait_timeout: Option<Option<Duration>>,
    /// Per-user client_idle_timeout.
    pub client_idle_timeout: Option<Option<Duration>>,
    /// Per-user idle_transaction_timeout.
    pub idle_transaction_timeout: Option<Option<Duration>>,
    /// Scheduling class of this user's transactions (`None` = the default class).
    pub class: Option<String>,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthType {
    /// SCRAM-SHA-256 (`"scram-sha-256"`).
    ScramSha256,
    /// md5 (`"md5"`); upgraded to SCRAM for users whose secret is a SCRAM secret.
    Md5,
    /// No password (`"trust"`).
    Trust,
}

impl AuthType {
    /// The configuration keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Md5 => "md5",
            AuthType::Trust => "trust",
        }
    }
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a server connection goes back to the pool. Only transaction pooling exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolMode {
    /// Released at the end of each transaction.
    Transaction,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A `[classes.NAME]` entry: a scheduling class for waiting transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// Class name (the table key).
    pub name: String,
    /// Higher runs first when a server connection frees up.
    pub priority: i32,
    /// Most server connections this class may hold at once (`None` = unlimited).
    pub max_active: Option<u32>,
    /// Server connections kept free for this class.
    pub reserved: u32,
    /// Longest a transaction of this class waits (`None` = the query_wait_timeout in effect).
    pub max_wait: Option<Duration>,
}

/// The `[scheduler]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduler {
    /// Class of users without a `class`.
    pub default_class: String,
    /// Priority points a waiting transaction gains per second, so low priorities cannot starve.
    pub aging_per_sec: f64,
}

/// The `[policy]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// CPU time a plugin hook may use per call.
    pub deadline: Duration,
    /// Linear memory limit per plugin instance, in bytes.
    pub memory_limit: u64,
    /// Reload plugins when their files change.
    pub watch: bool,
    /// How often plugin files are checked when `watch` is on.
    pub watch_interval: Duration,
    /// Failures (traps, timeouts, invalid decisions) within `breaker_window` that open the breaker; 0 = never.
    pub breaker_failures: u32,
    /// Window over which failures are counted.
    pub breaker_window: Duration,
    /// How long an open breaker bypasses the plugin (applying its fail mode).
    pub breaker_cooldown: Duration,
    /// Interval of the pressure hook.
    pub pressure_interval: Duration,
    /// Query text passed to plugins is cut to this many bytes.
    pub max_query_len: u32,
    /// `[[policy.plugins]]`, in the order they run.
    pub plugins: Vec<PluginConfig>,
}

/// A `[[policy.plugins]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// Unique name, used in logs, metrics and the admin console.
    pub name: String,
    /// The Wasm component, resolved against the config file's directory.
    pub path: PathBuf,
    /// What happens when the plugin traps, times out or its breaker is open.
    pub fail: FailMode,
    /// `[policy.plugins.config]`, handed to the plugin as is.
    pub settings: toml::Table,
}

/// Behaviour when a plugin cannot give a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailMode {
    /// Proceed as if the plugin were not loaded.
    Open,
    /// Reject the connection or transaction.
    Closed,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            key: String::new(),
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Config::parse(&text, Some(path))
    }

    /// Parses and validates `text`; `origin` is the file it came from, used in errors and to
    /// resolve relative plugin paths.
    pub fn parse(text: &str, origin: Option<&Path>) -> Result<Config, ConfigError> {
        validate::parse(text, origin).map_err(|e| ConfigError {
            file: origin.map(Path::to_path_buf),
            ..e
        })
    }

    /// Server connections for the (`db`, `user`) pool: the user's pool_size, else the database's,
    /// else `default_pool_size`.
    pub fn pool_size(&self, db: &str, user: &str) -> u32 {
        let user_size = self.users.get(user).and_then(|u| u.pool_size);
        let db_size = self.databases.get(db).and_then(|d| d.pool_size);
        user_size
            .or(db_size)
            .unwrap_or(self.sluice.default_pool_size)
    }

    /// How long a transaction of `user` on `db` waits for a server: the user's setting, else the
    /// database's, else `[sluice]`'s. `None` = no limit.
    pub fn query_wait_timeout(&self, db: &str, user: &str) -> Option<Duration> {
        let user_wait = self.users.get(user).and_then(|u| u.query_wait_timeout);
        let db_wait = self.databases.get(db).and_then(|d| d.query_wait_timeout);
        user_wait
            .or(db_wait)
            .unwrap_or(self.sluice.query_wait_timeout)
    }

    /// The method `user` must authenticate with: the user's auth_type, else `[sluice]`'s; md5
    /// becomes SCRAM-SHA-256 when the user's secret is a SCRAM secret (as PgBouncer does).
    pub fn auth_type(&self, user: &str) -> AuthType {
        let entry = self.users.get(user);
        let auth = entry
            .and_then(|u| u.auth_type)
            .unwrap_or(self.sluice.auth_type);
        let scram_only = matches!(
            entry.and_then(|u| u.password.as_ref()),
            Some(Secret::Scram(_))
        );
        if auth == AuthType::Md5 && scram_only {
            AuthType::ScramSha256
        } else {
            auth
        }
    }

    /// The class called `name`.
    pub fn class(&self, name: &str) -> Option<&Class> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// The class named by `scheduler.default_class` (always present in a loaded config).
    pub fn default_class(&self) -> &Class {
        static FALLBACK: Class = Class {
            name: String::new(),
            priority: 0,
            max_active: None,
            reserved: 0,
            max_wait: None,
        };
        self.class(&self.scheduler.default_class)
            .unwrap_or(&FALLBACK)
    }

    /// The class of `user`'s transactions: its `class`, else the default class.
    pub fn user_class(&self, user: &str) -> &Class {
        self.users
            .get(user)
            .and_then(|u| u.class.as_deref())
            .and_then(|name| self.class(name))
            .unwrap_or_else(|| self.default_class())
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field(
                "password",
                &self.password.as_ref().map(|_| secret::Redacted),
            )
            .field("pool_size", &self.pool_size)
            .field("min_pool_size", &self.min_pool_size)
            .field("max_db_connections", &self.max_db_connections)
            .field("query_wait_timeout", &self.query_wait_timeout)
            .field("server_lifetime", &self.server_lifetime)
            .field("max_db_client_connections", &self.max_db_client_connections)
            .finish()
    }
}
