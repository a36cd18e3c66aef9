//! Unit tests: the shipped files, defaults, value syntaxes and the lookup helpers.

mod errors;
mod secrets;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{AuthType, Config, ConfigError, FailMode, LogFormat, PoolMode, Secret};

/// Parses `text` (no file), failing the test with the error's text.
fn parse(text: &str) -> Config {
    match Config::parse(text, None) {
        Ok(config) => config,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Parses `text`, which must fail.
fn parse_err(text: &str) -> ConfigError {
    match Config::parse(text, None) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e,
    }
}

fn repo_file(name: &str) -> PathBuf {
    std::path::PathBuf::from(
        // At run time (cargo sets it for tests): the compile-time value is stale when a shared
        // target dir holds a binary built from another checkout.
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../../config")
    .join(name)
}

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn minimal_file_parses_with_its_values() {
    let path = repo_file("minimal.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.path.as_deref(), Some(path.as_path()));
    let g = &config.sluice;
    assert_eq!(g.listen_addr, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    assert_eq!(g.listen_port, 6432);
    assert_eq!(g.pool_mode, PoolMode::Transaction);
    assert_eq!(g.default_pool_size, 20);
    assert_eq!(g.max_client_conn, 5000);

    let db = &config.databases["appdb"];
    assert_eq!(
        (db.name.as_str(), db.host.as_str(), db.port),
        ("appdb", "127.0.0.1", 5432)
    );
    assert_eq!(db.dbname, "appdb");
    assert_eq!(db.pool_size, None);

    let user = &config.users["app"];
    assert_eq!(user.name, "app");
    let secret = user.password.as_ref().expect("a password");
    assert_eq!(secret.plaintext(), Some("secret"));
    assert_eq!(config.auth_type("app"), AuthType::ScramSha256);
    assert_eq!(config.pool_size("appdb", "app"), 20);
    assert_eq!(config.default_class().name, "default");
}

#[test]
fn reference_file_parses_and_states_the_defaults() {
    let path = repo_file("sluice.toml");
    let loaded = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let defaults = parse("");
    assert_eq!(
        Config {
            path: None,
            ..loaded
        },
        defaults,
        "sluice.toml must list the defaults"
    );
}

#[test]
fn reference_file_examples_parse_when_uncommented() {
    // Uncomment the example blocks (lines "# key = value" and "# [section]") of the reference file.
    let text = std::fs::read_to_string(repo_file("sluice.toml")).expect("read sluice.toml");
    let mut out = String::new();
    for line in text.lines() {
        let body = line.strip_prefix("# ").unwrap_or(line);
        let header = body.starts_with('[')
            && body.rfind(']').is_some_and(|i| {
                let rest = body[i + 1..].trim();
                rest.is_empty() || rest.starts_with('#')
            });
        let looks_like_toml = header
            || body.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
        out.push_str(if line.starts_with("# ") && looks_like_toml {
            body
        } else {
            line
        });
        out.push('\n');
    }
    let config = Config::parse(&out, Some(Path::new("/etc/sluice/sluice.toml")))
        .unwrap_or_else(|e| panic!("{e}\n{out}"));
    assert_eq!(
        config.sluice.unix_socket_dir.as_deref(),
        Some(Path::new("/tmp"))
    );
    assert_eq!(
        config.sluice.metrics_addr,
        Some(SocketAddr::from(([127, 0, 0, 1], 9930)))
    );
    assert_eq!(config.databases["appdb"].user.as_deref(), Some("app_owner"));
    assert_eq!(config.users["app"].class.as_deref(), Some("interactive"));
    let names: Vec<&str> = config.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["batch", "default", "interactive"]);
    let plugin = &config.policy.plugins[0];
    assert_eq!(
        plugin.path,
        Path::new("/etc/sluice/plugins/tenant_limits.wasm")
    );
    assert_eq!(
        plugin.settings["max_clients_per_tenant"].as_integer(),
        Some(50)
    );
}

#[test]
fn defaults_follow_pgbouncer() {
    let c = parse("");
    let g = &c.sluice;
    assert_eq!(g.listen_addr, vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    assert_eq!((g.listen_port, g.unix_socket_dir.as_ref()), (6432, None));
    assert_eq!(
        (g.pool_mode, g.auth_type),
        (PoolMode::Transaction, AuthType::ScramSha256)
    );
    assert_eq!(
        (g.max_client_conn, g.default_pool_size, g.min_pool_size),
        (100, 20, 0)
    );
    assert_eq!((g.max_db_connections, g.max_user_connections), (0, 0));
    assert_eq!(
        (g.max_db_client_connections, g.max_user_client_connections),
        (0, 0)
    );
    assert_eq!(
        (g.max_addr_client_connections, g.max_app_client_connections),
        (0, 0)
    );
    assert_eq!(g.query_wait_timeout, Some(SECS(120)));
    assert_eq!(g.query_wait_notify, Some(SECS(5)));
    assert_eq!(g.server_connect_timeout, SECS(15));
    assert_eq!(g.server_idle_timeout, Some(SECS(600)));
    assert_eq!(g.server_lifetime, Some(SECS(3600)));
    assert_eq!(g.server_login_retry, SECS(15));
    assert_eq!(
        (g.client_idle_timeout, g.idle_transaction_timeout),
        (None, None)
    );
    assert_eq!(g.client_login_timeout, Some(SECS(60)));
    assert_eq!(
        (g.cancel_wait_timeout, g.shutdown_timeout),
        (SECS(10), SECS(30))
    );
    assert_eq!(
        (g.max_prepared_statements, g.max_packet_size),
        (200, 256 << 20)
    );
    assert_eq!(g.workers, 0);
    assert!(g.admin_users.is_empty() && g.stats_users.is_empty());
    assert_eq!(g.log_format, LogFormat::Text);
    assert!(g.log_connections && g.log_disconnections && g.log_pooler_errors && g.tcp_keepalive);
    assert_eq!((g.stats_period, g.metrics_addr), (Some(SECS(60)), None));
    assert_eq!(g.tcp_defer_accept, cfg!(target_os = "linux"));

    assert!(c.databases.is_empty() && c.users.is_empty());
    assert_eq!(c.scheduler.default_class, "default");
    assert_eq!(c.scheduler.aging_per_sec, 1.0);
    assert_eq!(c.classes.len(), 1);
    let class = c.default_class();
    assert_eq!(
        (
            class.priority,
            class.max_active,
            class.reserved,
            class.max_wait
        ),
        (0, None, 0, None)
    );

    let p = &c.policy;
    assert_eq!(
        (p.deadline, p.memory_limit),
        (Duration::from_millis(1), 16 << 20)
    );
    assert_eq!((p.watch, p.watch_interval), (false, SECS(1)));
    assert_eq!(
        (p.breaker_failures, p.breaker_window, p.breaker_cooldown),
        (5, SECS(10), SECS(30))
    );
    assert_eq!(
        (p.pressure_interval, p.max_query_len),
        (Duration::from_millis(100), 1024)
    );
    assert!(p.plugins.is_empty());
}

#[test]
fn durations_accept_numbers_and_units() {
    let c = parse(
        "[sluice]\nquery_wait_timeout = 0.5\nquery_wait_notify = \"250ms\"\nserver_connect_timeout = 3\n\
         server_idle_timeout = \"2m\"\nserver_lifetime = \"1h\"\nclient_idle_timeout = \"1d\"\n\
         idle_transaction_timeout = \"1.5s\"\nclient_login_timeout = \"30\"\nstats_period = 0\n",
    );
    let g = &c.sluice;
    assert_eq!(g.query_wait_timeout, Some(Duration::from_millis(500)));
    assert_eq!(g.query_wait_notify, Some(Duration::from_millis(250)));
    assert_eq!(g.server_connect_timeout, SECS(3));
    assert_eq!(g.server_idle_timeout, Some(SECS(120)));
    assert_eq!(g.server_lifetime, Some(SECS(3600)));
    assert_eq!(g.client_idle_timeout, Some(SECS(86400)));
    assert_eq!(
        g.idle_transaction_timeout,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(g.client_login_timeout, Some(SECS(30)));
    assert_eq!(g.stats_period, None, "0 disables");
    let c = parse("[policy]\ndeadline = \"1ms\"\npressure_interval = 0.001");
    assert_eq!(c.policy.deadline, Duration::from_millis(1));
    assert_eq!(c.policy.pressure_interval, Duration::from_millis(1));
}

#[test]
fn sizes_accept_bytes_and_binary_units() {
    for (text, bytes) in [
        ("65536", 65536),
        ("\"64KiB\"", 64 << 10),
        ("\"16MiB\"", 16 << 20),
        ("\"1GiB\"", 1 << 30),
        ("\"2 MB\"", 2 << 20),
    ] {
        let c = parse(&format!("[policy]\nmemory_limit = {text}"));
        assert_eq!(c.policy.memory_limit, bytes, "{text}");
    }
    let c = parse("[sluice]\nmax_packet_size = \"1GiB\"");
    assert_eq!(c.sluice.max_packet_size, 1 << 30);
}

#[test]
fn listen_addr_forms() {
    let all = vec![
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    ];
    assert_eq!(
        parse("[sluice]\nlisten_addr = \"*\"").sluice.listen_addr,
        all
    );
    let both = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    assert_eq!(
        parse("[sluice]\nlisten_addr = \"127.0.0.1, ::1\"")
            .sluice
            .listen_addr,
        both
    );
    assert_eq!(
        parse("[sluice]\nlisten_addr = [\"127.0.0.1\", \"[::1]\"]")
            .sluice
            .listen_addr,
        both
    );
    assert_eq!(
        parse("[sluice]\nlisten_addr = \"localhost,127.0.0.1\"")
            .sluice
            .listen_addr,
        both[..1]
    );
    let c = parse("[sluice]\nlisten_addr = \"\"\nunix_socket_dir = \"/tmp\"\nlisten_port = 0");
    assert!(c.sluice.listen_addr.is_empty());
    assert_eq!(c.sluice.listen_port, 0);
}

#[test]
fn name_lists_accept_arrays_and_comma_strings() {
    let c = parse("[sluice]\nadmin_users = \"admin, ops ,\"\nstats_users = [\"mon\", \"grafana\"]");
    assert_eq!(c.sluice.admin_users, ["admin", "ops"]);
    assert_eq!(c.sluice.stats_users, ["mon", "grafana"]);
}

#[test]
fn keywords_and_misc_general_settings() {
    let c = parse(
        "[sluice]\nauth_type = \"md5\"\nlog_format = \"json\"\nmetrics_addr = \"127.0.0.1:9930\"\n\
         tcp_keepalive = false\ntcp_defer_accept = false\nworkers = 4",
    );
    assert_eq!(c.sluice.auth_type, AuthType::Md5);
    assert_eq!(c.sluice.log_format, LogFormat::Json);
    assert_eq!(
        c.sluice.metrics_addr,
        Some(SocketAddr::from(([127, 0, 0, 1], 9930)))
    );
    assert!(!c.sluice.tcp_keepalive && !c.sluice.tcp_defer_accept);
    assert_eq!(c.sluice.workers, 4);
    assert_eq!(
        parse("[sluice]\nauth_type = \"trust\"").sluice.auth_type,
        AuthType::Trust
    );
}

const OVERRIDES: &str = r#"
[sluice]
default_pool_size = 20
query_wait_timeout = 120

[databases.a]
host = "db1"
pool_size = 10
query_wait_timeout = 30
server_lifetime = 0

[databases.b]
host = "db2"
dbname = "real_b"
port = 6543

[users.u]
pool_size = 5
query_wait_timeout = 0
client_idle_timeout = "5m"

[users.v]
"#;

#[test]
fn overrides_resolve_user_then_database_then_general() {
    let c = parse(OVERRIDES);
    assert_eq!(c.pool_size("a", "u"), 5);
    assert_eq!(c.pool_size("a", "v"), 10);
    assert_eq!(c.pool_size("b", "v"), 20);
    assert_eq!(c.pool_size("missing", "missing"), 20);
    assert_eq!(c.query_wait_timeout("a", "u"), None, "user's 0 disables");
    assert_eq!(c.query_wait_timeout("a", "v"), Some(SECS(30)));
    assert_eq!(c.query_wait_timeout("b", "v"), Some(SECS(120)));
    assert_eq!(c.databases["a"].server_lifetime, Some(None));
    assert_eq!(c.databases["b"].server_lifetime, None);
    assert_eq!(
        (c.databases["b"].dbname.as_str(), c.databases["b"].port),
        ("real_b", 6543)
    );
    assert_eq!(c.users["u"].client_idle_timeout, Some(Some(SECS(300))));
    assert_eq!(c.users["v"].password, None);
}

#[test]
fn classes_and_scheduler() {
    let c = parse(
        "[scheduler]\ndefault_class = \"normal\"\naging_per_sec = 2\n\
         [classes.batch]\npriority = -5\nmax_active = 4\nreserved = 1\nmax_wait = \"2s\"\n\
         [classes.fast]\npriority = 10\nmax_active = 0\nmax_wait = 0\n\
         [users.etl]\nclass = \"batch\"\n[users.web]\n",
    );
    let names: Vec<&str> = c.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["batch", "fast", "normal"],
        "the default class is added, sorted"
    );
    assert_eq!(c.scheduler.aging_per_sec, 2.0);
    let batch = c.class("batch").expect("batch");
    assert_eq!(
        (batch.priority, batch.max_active, batch.reserved),
        (-5, Some(4), 1)
    );
    assert_eq!(batch.max_wait, Some(SECS(2)));
    let fast = c.class("fast").expect("fast");
    assert_eq!(
        (fast.max_active, fast.max_wait),
        (None, None),
        "0 means unlimited / fall back"
    );
    assert_eq!(c.default_class().name, "normal");
    assert_eq!(c.user_class("etl").name, "batch");
    assert_eq!(c.user_class("web").name, "normal");
    assert_eq!(c.user_class("nobody").name, "normal");
    assert!(c.class("missing").is_none());
    // A configured default class keeps its settings.
    let c = parse("[classes.default]\npriority = 3");
    assert_eq!((c.classes.len(), c.default_class().priority), (1, 3));
}

#[test]
fn plugins_resolve_paths_and_keep_settings() {
    let text = r#"
[policy]
deadline = "2ms"
memory_limit = "32MiB"
watch = true

[[policy.plugins]]
name = "limits"
path = "plugins/limits.wasm"
fail = "closed"

[policy.plugins.config]
max = 5
tenants = ["a", "b"]

[[policy.plugins]]
name = "audit"
path = "/opt/audit.wasm"
"#;
    let c = Config::parse(text, Some(Path::new("/etc/sluice/sluice.toml")))
        .unwrap_or_else(|e| panic!("{e}"));
    let [limits, audit] = c.policy.plugins.as_slice() else {
        panic!("two plugins")
    };
    assert_eq!(limits.name, "limits");
    assert_eq!(limits.path, Path::new("/etc/sluice/plugins/limits.wasm"));
    assert_eq!(limits.fail, FailMode::Closed);
    assert_eq!(limits.settings["max"].as_integer(), Some(5));
    assert_eq!(audit.path, Path::new("/opt/audit.wasm"));
    assert_eq!(audit.fail, FailMode::Open);
    assert!(audit.settings.is_empty());
    assert_eq!(
        (c.policy.deadline, c.policy.memory_limit),
        (Duration::from_millis(2), 32 << 20)
    );
    // Without a file, relative paths stay relative.
    let c = parse(text);
    assert_eq!(c.policy.plugins[0].path, Path::new("plugins/limits.wasm"));
}

#[test]
fn reload_of_the_same_text_compares_equal() {
    let text = std::fs::read_to_string(repo_file("minimal.toml")).expect("read minimal.toml");
    let (a, b) = (parse(&text), parse(&text));
    assert_eq!(
        a.clone(),
        b,
        "derived SCRAM salts differ but the config is the same"
    );
}

#[test]
fn debug_never_shows_passwords() {
    let c = parse(
        "[databases.d]\nhost = \"h\"\nuser = \"owner\"\npassword = \"dbpass-xyz\"\n\
         [users.a]\npassword = \"plain-xyz\"\n\
         [users.b]\npassword = \"md56a422f785c9e20873908ce25d1736ae2\"\nauth_type = \"md5\"\n",
    );
    let debug = format!("{c:?} {:?}", c.users["a"].password);
    for secret in ["dbpass-xyz", "plain-xyz", "6a422f785c9e"] {
        assert!(!debug.contains(secret), "{secret} leaked in {debug}");
    }
    assert!(debug.contains("<redacted>"));
    assert!(matches!(c.users["b"].password, Some(Secret::Md5 { .. })));
}

#[test]
fn no_input_panics() {
    // Every prefix of the reference and minimal files, and byte-level corruptions of them, give
    // Ok or Err, never a panic.
    let mut inputs = Vec::new();
    for name in ["sluice.toml", "minimal.toml"] {
        inputs.push(std::fs::read_to_string(repo_file(name)).expect("read config"));
    }
    inputs.push(OVERRIDES.to_owned());
    for text in &inputs {
        for end in (0..text.len())
            .step_by(13)
            .filter(|&i| text.is_char_boundary(i))
        {
            let _ = Config::parse(&text[..end], None);
        }
        let bytes = text.as_bytes();
        let junk = [b'"', b'[', b']', b'=', b'\n', b'0', b'-', b'.', b'#', b'x'];
        for (n, i) in (0..bytes.len()).step_by(17).enumerate() {
            let mut mutated = bytes.to_vec();
            mutated[i] = junk[n % junk.len()];
            if let Ok(s) = String::from_utf8(mutated) {
                let _ = Config::parse(&s, None);
            }
        }
    }
    for odd in [
        "[databases.\"\"]\nhost=\"h\"",
        "[users.\"\"]",
        "[classes.\"\"]",
        "[sluice]\nworkers = -1",
        "[sluice]\nquery_wait_timeout = 1e300",
        "[sluice]\nquery_wait_timeout = nan",
        "[sluice]\nquery_wait_timeout = -inf",
        "[policy]\nmemory_limit = \"99999999999999TiB\"",
        "[sluice]\nquery_wait_timeout = \"..s\"",
        "[sluice]\nquery_wait_timeout = \"\"",
    ] {
        assert!(Config::parse(odd, None).is_err(), "{odd}");
    }
}

#[test]
fn zero_prepared_statements_is_refused_with_the_reason() {
    let e = parse_err("[sluice]\nmax_prepared_statements = 0").to_string();
    assert!(e.contains("sluice.max_prepared_statements"), "{e}");
    assert!(e.contains("at least 1"), "{e}");
}
