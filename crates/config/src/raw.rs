//! The file as written: private serde structs that mirror the TOML layout, with defaults. They
//! reject unknown keys; [`crate::validate`] turns them into the public, checked types.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;

use crate::value::{
    AuthTypeValue, Dur, FailModeValue, ListenAddrs, LogFormatValue, NameList, PoolModeValue, Size,
};
use crate::{AuthType, FailMode, LogFormat, PoolMode};

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub sluice: RawGeneral,
    pub databases: BTreeMap<String, RawDatabase>,
    pub users: BTreeMap<String, RawUser>,
    pub classes: BTreeMap<String, RawClass>,
    pub scheduler: RawScheduler,
    pub policy: RawPolicy,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawGeneral {
    pub listen_addr: ListenAddrs,
    pub listen_port: u16,
    pub unix_socket_dir: Option<String>,
    pub pool_mode: PoolModeValue,
    pub auth_type: AuthTypeValue,
    pub max_client_conn: u32,
    pub default_pool_size: u32,
    pub min_pool_size: u32,
    pub max_db_connections: u32,
    pub max_user_connections: u32,
    pub max_db_client_connections: u32,
    pub max_user_client_connections: u32,
    pub max_addr_client_connections: u32,
    pub max_app_client_connections: u32,
    pub query_wait_timeout: Dur,
    pub query_wait_notify: Dur,
    pub server_connect_timeout: Dur,
    pub server_idle_timeout: Dur,
    pub server_lifetime: Dur,
    pub server_login_retry: Dur,
    pub client_idle_timeout: Dur,
    pub idle_transaction_timeout: Dur,
    pub client_login_timeout: Dur,
    pub cancel_wait_timeout: Dur,
    pub shutdown_timeout: Dur,
    pub max_prepared_statements: u32,
    pub max_packet_size: Size,
    pub workers: usize,
    pub admin_users: NameList,
    pub stats_users: NameList,
    pub log_format: LogFormatValue,
    pub log_connections: bool,
    pub log_disconnections: bool,
    pub log_pooler_errors: bool,
    pub stats_period: Dur,
    pub metrics_addr: Option<String>,
    pub tcp_keepalive: bool,
    pub tcp_defer_accept: bool,
}

/// The defaults, PgBouncer's wherever the setting means the same (see config/sluice.toml).
impl Default for RawGeneral {
    fn default() -> Self {
        RawGeneral {
            listen_addr: ListenAddrs(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
            listen_port: 6432,
            unix_socket_dir: None,
            pool_mode: PoolModeValue(PoolMode::Transaction),
            auth_type: AuthTypeValue(AuthType::ScramSha256),
            max_client_conn: 100,
            default_pool_size: 20,
            min_pool_size: 0,
            max_db_connections: 0,
            max_user_connections: 0,
            max_db_client_connections: 0,
            max_user_client_connections: 0,
            max_addr_client_connections: 0,
            max_app_client_connections: 0,
            query_wait_timeout: Dur::secs(120),
            query_wait_notify: Dur::secs(5),
            server_connect_timeout: Dur::secs(15),
            server_idle_timeout: Dur::secs(600),
            server_lifetime: Dur::secs(3600),
            server_login_retry: Dur::secs(15),
            client_idle_timeout: Dur::secs(0),
            idle_transaction_timeout: Dur::secs(0),
            client_login_timeout: Dur::secs(60),
            cancel_wait_timeout: Dur::secs(10),
            shutdown_timeout: Dur::secs(30),
            max_prepared_statements: 200,
            max_packet_size: Size(256 << 20),
            workers: 0,
            admin_users: NameList::default(),
            stats_users: NameList::default(),
            log_format: LogFormatValue(LogFormat::Text),
            log_connections: true,
            log_disconnections: true,
            log_pooler_errors: true,
            stats_period: Dur::secs(60),
            metrics_addr: None,
            tcp_keepalive: true,
            tcp_defer_accept: cfg!(target_os = "linux"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatabase {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: Option<u32>,
    pub min_pool_size: Option<u32>,
    pub max_db_connections: Option<u32>,
    pub max_db_client_connections: Option<u32>,
    pub query_wait_timeout: Option<Dur>,
    pub server_lifetime: Option<Dur>,
}

fn default_port() -> u16 {
    5432
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawUser {
    pub password: Option<String>,
    pub auth_type: Option<AuthTypeValue>,
    pub pool_size: Option<u32>,
    pub max_user_connections: Option<u32>,
    pub max_user_client_connections: Option<u32>,
    pub query_wait_timeout: Option<Dur>,
    pub client_idle_timeout: Option<Dur>,
    pub idle_transaction_timeout: Option<Dur>,
    pub class: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawClass {
    pub priority: i32,
    pub max_active: Option<u32>,
    pub reserved: u32,
    pub max_wait: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawScheduler {
    pub default_class: String,
    pub aging_per_sec: f64,
}

impl Default for RawScheduler {
    fn default() -> Self {
        RawScheduler {
            default_class: "default".to_owned(),
            aging_per_sec: 1.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub deadline: Dur,
    pub memory_limit: Size,
    pub watch: bool,
    pub watch_interval: Dur,
    pub breaker_failures: u32,
    pub breaker_window: Dur,
    pub breaker_cooldown: Dur,
    pub pressure_interval: Dur,
    pub max_query_len: u32,
    pub plugins: Vec<RawPlugin>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            deadline: Dur::millis(1),
            memory_limit: Size(16 << 20),
            watch: false,
            watch_interval: Dur::secs(1),
            breaker_failures: 5,
            breaker_window: Dur::secs(10),
            breaker_cooldown: Dur::secs(30),
            pressure_interval: Dur::millis(100),
            max_query_len: 1024,
            plugins: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlugin {
    pub name: String,
    pub path: String,
    #[serde(default = "default_fail")]
    pub fail: FailModeValue,
    #[serde(default)]
    pub config: toml::Table,
}

fn default_fail() -> FailModeValue {
    FailModeValue(FailMode::Open)
}
