//! From TOML text to a checked [`Config`]: deserialize the raw structs (tracking the key path),
//! then check values and cross-references, naming the key of every problem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::raw::{RawClass, RawConfig, RawDatabase, RawGeneral, RawPolicy, RawUser};
use crate::value::Dur;
use crate::{
    AuthType, Class, Config, ConfigError, Database, General, PluginConfig, PolicyConfig, Scheduler,
    Secret, User,
};

/// Database names the admin console answers to.
const RESERVED_DATABASES: [&str; 2] = ["sluice", "pgbouncer"];
/// Largest `max_packet_size`, as in PostgreSQL (`PQ_LARGE_MESSAGE_LIMIT` is 1 GiB - 1).
const MAX_PACKET_LIMIT: u64 = 1 << 30;
/// Smallest `max_packet_size`: below this, ordinary startup packets would be refused.
const MIN_PACKET_LIMIT: u64 = 1024;
/// Most worker threads accepted.
const MAX_WORKERS: usize = 1024;
/// One Wasm page; a plugin memory limit below this cannot hold any memory.
const WASM_PAGE: u64 = 64 << 10;
/// A 32-bit Wasm memory cannot grow past 4 GiB.
const WASM32_MAX_MEMORY: u64 = 4 << 30;

type Result<T> = std::result::Result<T, ConfigError>;

/// Parses and validates `text` (errors carry no file; the caller adds it).
pub(crate) fn parse(text: &str, origin: Option<&Path>) -> Result<Config> {
    let raw = deserialize(text)?;
    let sluice = general(raw.sluice)?;
    let mut classes = classes(raw.classes)?;
    let scheduler = Scheduler {
        default_class: raw.scheduler.default_class,
        aging_per_sec: raw.scheduler.aging_per_sec,
    };
    check(
        !scheduler.default_class.is_empty(),
        "scheduler.default_class",
        "must not be empty",
    )?;
    check(
        scheduler.aging_per_sec.is_finite() && scheduler.aging_per_sec >= 0.0,
        "scheduler.aging_per_sec",
        "must be a finite number, zero or positive",
    )?;
    if !classes.iter().any(|c| c.name == scheduler.default_class) {
        classes.push(Class {
            name: scheduler.default_class.clone(),
            priority: 0,
            max_active: None,
            reserved: 0,
            max_wait: None,
        });
        classes.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let databases = raw
        .databases
        .into_iter()
        .map(|(name, db)| database(name.clone(), db, &sluice).map(|db| (name, db)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let users = raw
        .users
        .into_iter()
        .map(|(name, user)| self::user(name.clone(), user, &sluice, &classes).map(|u| (name, u)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let policy = policy(raw.policy, origin)?;
    Ok(Config {
        path: origin.map(Path::to_path_buf),
        sluice,
        databases,
        users,
        classes,
        scheduler,
        policy,
    })
}

/// TOML to raw structs; type errors and unknown keys are reported with their key path and line.
fn deserialize(text: &str) -> Result<RawConfig> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let key = if path == "." || path == "?" {
            String::new()
        } else {
            path
        };
        let mut message = plain_types(&inner.message().trim_end().replace('\n', ": "));
        if key.is_empty() {
            message = format!("TOML syntax error: {message}");
        }
        if let Some(span) = inner.span() {
            let upto = span.start.min(text.len());
            let line = text.as_bytes()[..upto]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            message = format!("{message} (line {line})");
        }
        ConfigError::new(key, message)
    })
}

/// Replaces serde's Rust type names (`expected u16`) with words an operator knows.
fn plain_types(message: &str) -> String {
    const NAMES: [(&str, &str); 6] = [
        ("expected u16", "expected an integer from 0 to 65535"),
        ("expected u32", "expected an integer from 0 to 4294967295"),
        ("expected usize", "expected an integer, zero or positive"),
        (
            "expected i32",
            "expected an integer from -2147483648 to 2147483647",
        ),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ];
    let mut message = message.to_owned();
    for (rust, plain) in NAMES {
        if message.ends_with(rust) {
            message.truncate(message.len() - rust.len());
            message.push_str(plain);
        }
    }
    message
}

/// `Err` naming `key` unless `ok`.
fn check(ok: bool, key: impl Into<String>, message: impl Into<String>) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(key, message))
    }
}

/// A duration that must not be zero.
fn positive(value: Dur, key: &str) -> Result<Duration> {
    check(!value.0.is_zero(), key, "must be greater than 0")?;
    Ok(value.0)
}

fn general(g: RawGeneral) -> Result<General> {
    let unix_socket_dir = g
        .unix_socket_dir
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    check(
        !g.listen_addr.0.is_empty() || unix_socket_dir.is_some(),
        "sluice.listen_addr",
        "is empty and no unix_socket_dir is set: nothing to listen on",
    )?;
    check(
        g.max_prepared_statements >= 1,
        "sluice.max_prepared_statements",
        "must be at least 1: Sluice always maps named prepared statements in transaction mode \
         (unlike PgBouncer, 0 does not turn that off)",
    )?;
    check(
        g.max_client_conn >= 1,
        "sluice.max_client_conn",
        "must be at least 1",
    )?;
    check(
        g.default_pool_size >= 1,
        "sluice.default_pool_size",
        "must be at least 1",
    )?;
    check(
        g.min_pool_size <= g.default_pool_size,
        "sluice.min_pool_size",
        format!(
            "{} exceeds default_pool_size ({})",
            g.min_pool_size, g.default_pool_size
        ),
    )?;
    let packet = g.max_packet_size.0;
    check(
        (MIN_PACKET_LIMIT..=MAX_PACKET_LIMIT).contains(&packet),
        "sluice.max_packet_size",
        format!("{packet} bytes is out of range: it must be between 1 KiB and 1 GiB"),
    )?;
    check(
        g.workers <= MAX_WORKERS,
        "sluice.workers",
        format!("must be at most {MAX_WORKERS}"),
    )?;
    let metrics_addr = match g.metrics_addr.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            ConfigError::new(
                "sluice.metrics_addr",
                format!("{text:?} is not an IP address and port such as \"127.0.0.1:9930\""),
            )
        })?),
    };
    Ok(General {
        listen_addr: g.listen_addr.0,
        listen_port: g.listen_port,
        unix_socket_dir,
        pool_mode: g.pool_mode.0,
        auth_type: g.auth_type.0,
        max_client_conn: g.max_client_conn,
        default_pool_size: g.default_pool_size,
        min_pool_size: g.min_pool_size,
        max_db_connections: g.max_db_connections,
        max_user_connections: g.max_user_connections,
        max_db_client_connections: g.max_db_client_connections,
        max_user_client_connections: g.max_user_client_connections,
        max_addr_client_connections: g.max_addr_client_connections,
        max_app_client_connections: g.max_app_client_connections,
        query_wait_timeout: g.query_wait_timeout.or_disabled(),
        query_wait_notify: g.query_wait_notify.or_disabled(),
        server_connect_timeout: positive(
            g.server_connect_timeout,
            "sluice.server_connect_timeout",
        )?,
        server_idle_timeout: g.server_idle_timeout.or_disabled(),
        server_lifetime: g.server_lifetime.or_disabled(),
        server_login_retry: g.server_login_retry.0,
        client_idle_timeout: g.client_idle_timeout.or_disabled(),
        idle_transaction_timeout: g.idle_transaction_timeout.or_disabled(),
        client_login_timeout: g.client_login_timeout.or_disabled(),
        cancel_wait_timeout: positive(g.cancel_wait_timeout, "sluice.cancel_wait_timeout")?,
        shutdown_timeout: g.shutdown_timeout.0,
        max_prepared_statements: g.max_prepared_statements,
        // In range: checked against MAX_PACKET_LIMIT above.
        max_packet_size: u32::try_from(packet).unwrap_or(u32::MAX),
        workers: g.workers,
        admin_users: g.admin_users.0,
        stats_users: g.stats_users.0,
        log_format: g.log_format.0,
        log_connections: g.log_connections,
        log_disconnections: g.log_disconnections,
        log_pooler_errors: g.log_pooler_errors,
        stats_period: g.stats_period.or_disabled(),
        metrics_addr,
        tcp_keepalive: g.tcp_keepalive,
        tcp_defer_accept: g.tcp_defer_accept,
    })
}

fn database(name: String, d: RawDatabase, general: &General) -> Result<Database> {
    let key = |field: &str| format!("databases.{name}.{field}");
    check(!name.is_empty(), "databases", "a database name is empty")?;
    check(
        !RESERVED_DATABASES.contains(&name.as_str()),
        format!("databases.{name}"),
        format!(
            "the name {name:?} is reserved for the admin console; choose another name \
             (dbname = {name:?} still reaches a server database of that name)"
        ),
    )?;
    check(!d.host.trim().is_empty(), key("host"), "must not be empty")?;
    check(d.port != 0, key("port"), "must be between 1 and 65535")?;
    let dbname = d.dbname.unwrap_or_else(|| name.clone());
    check(!dbname.is_empty(), key("dbname"), "must not be empty")?;
    check(
        d.password.is_none() || d.user.is_some(),
        key("password"),
        "is set without user: the forced server login needs both",
    )?;
    if let Some(user) = &d.user {
        check(!user.is_empty(), key("user"), "must not be empty")?;
    }
    if let Some(size) = d.pool_size {
        check(size >= 1, key("pool_size"), "must be at least 1")?;
    }
    let pool_size = d.pool_size.unwrap_or(general.default_pool_size);
    if let Some(min) = d.min_pool_size {
        check(
            min <= pool_size,
            key("min_pool_size"),
            format!("{min} exceeds the database's pool size ({pool_size})"),
        )?;
    }
    Ok(Database {
        host: d.host,
        port: d.port,
        dbname,
        user: d.user,
        password: d.password,
        pool_size: d.pool_size,
        min_pool_size: d.min_pool_size,
        max_db_connections: d.max_db_connections,
        query_wait_timeout: d.query_wait_timeout.map(Dur::or_disabled),
        server_lifetime: d.server_lifetime.map(Dur::or_disabled),
        max_db_client_connections: d.max_db_client_connections,
        name,
    })
}

fn user(name: String, u: RawUser, general: &General, classes: &[Class]) -> Result<User> {
    let key = |field: &str| format!("users.{name}.{field}");
    check(!name.is_empty(), "users", "a user name is empty")?;
    let password = match &u.password {
        Some(text) => Some(Secret::parse(text).map_err(|m| ConfigError::new(key("password"), m))?),
        None => None,
    };
    let auth_type = u.auth_type.map(|a| a.0);
    let effective = auth_type.unwrap_or(general.auth_type);
    check(
        !(effective == AuthType::ScramSha256 && matches!(password, Some(Secret::Md5 { .. }))),
        key("password"),
        "an md5 secret cannot verify SCRAM-SHA-256 logins; give the plaintext password or a SCRAM secret",
    )?;
    if let Some(size) = u.pool_size {
        check(size >= 1, key("pool_size"), "must be at least 1")?;
    }
    if let Some(class) = &u.class {
        if !classes.iter().any(|c| &c.name == class) {
            let known: Vec<&str> = classes.iter().map(|c| c.name.as_str()).collect();
            return Err(ConfigError::new(
                key("class"),
                format!(
                    "no class named {class:?}; define [classes.{class}] (classes: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    Ok(User {
        password,
        auth_type,
        pool_size: u.pool_size,
        max_user_connections: u.max_user_connections,
        max_user_client_connections: u.max_user_client_connections,
        query_wait_timeout: u.query_wait_timeout.map(Dur::or_disabled),
        client_idle_timeout: u.client_idle_timeout.map(Dur::or_disabled),
        idle_transaction_timeout: u.idle_transaction_timeout.map(Dur::or_disabled),
        class: u.class,
        name,
    })
}

fn classes(raw: BTreeMap<String, RawClass>) -> Result<Vec<Class>> {
    raw.into_iter()
        .map(|(name, c)| {
            check(!name.is_empty(), "classes", "a class name is empty")?;
            let max_active = c.max_active.filter(|&n| n > 0);
            if let Some(max) = max_active {
                check(
                    c.reserved <= max,
                    format!("classes.{name}.reserved"),
                    format!("{} exceeds max_active ({max})", c.reserved),
                )?;
            }
            Ok(Class {
                priority: c.priority,
                max_active,
                reserved: c.reserved,
                max_wait: c.max_wait.and_then(Dur::or_disabled),
                name,
            })
        })
        .collect()
}

fn policy(p: RawPolicy, origin: Option<&Path>) -> Result<PolicyConfig> {
    check(
        (WASM_PAGE..=WASM32_MAX_MEMORY).contains(&p.memory_limit.0),
        "policy.memory_limit",
        "must be between 64KiB (one Wasm page) and 4GiB (the most a 32-bit Wasm memory holds)",
    )?;
    let base = origin.and_then(Path::parent);
    let mut names = BTreeSet::new();
    let mut plugins = Vec::with_capacity(p.plugins.len());
    for (i, plugin) in p.plugins.into_iter().enumerate() {
        let key = |field: &str| format!("policy.plugins[{i}].{field}");
        check(
            !plugin.name.is_empty()
                && plugin
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            key("name"),
            format!(
                "{:?} is not a valid plugin name: use letters, digits, '-', '_' or '.'",
                plugin.name
            ),
        )?;
        check(
            names.insert(plugin.name.clone()),
            key("name"),
            format!("another plugin is already named {:?}", plugin.name),
        )?;
        check(!plugin.path.is_empty(), key("path"), "must not be empty")?;
        let path = PathBuf::from(&plugin.path);
        let path = match base {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        };
        plugins.push(PluginConfig {
            name: plugin.name,
            path,
            fail: plugin.fail.0,
            settings: plugin.config,
        });
    }
    Ok(PolicyConfig {
        deadline: positive(p.deadline, "policy.deadline")?,
        memory_limit: p.memory_limit.0,
        watch: p.watch,
        watch_interval: positive(p.watch_interval, "policy.watch_interval")?,
        breaker_failures: p.breaker_failures,
        breaker_window: positive(p.breaker_window, "policy.breaker_window")?,
        breaker_cooldown: positive(p.breaker_cooldown, "policy.breaker_cooldown")?,
        pressure_interval: positive(p.pressure_interval, "policy.pressure_interval")?,
        max_query_len: p.max_query_len,
        plugins,
    })
}
