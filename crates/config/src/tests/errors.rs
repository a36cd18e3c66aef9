//! Every class of error names the key and says what is wrong.

use std::path::{Path, PathBuf};

use super::parse_err;
use crate::{Config, ConfigError};

/// Asserts that `text` fails at `key` with a message containing `needle`.
#[track_caller]
fn fails(text: &str, key: &str, needle: &str) {
    let e = parse_err(text);
    assert_eq!(e.key, key, "wrong key for {e}");
    assert!(
        e.message.contains(needle),
        "{e:?} should mention {needle:?}"
    );
}

#[test]
fn display_is_file_key_message() {
    let e = ConfigError {
        file: Some(PathBuf::from("/etc/sluice.toml")),
        key: "sluice.listen_port".into(),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "/etc/sluice.toml: sluice.listen_port: bad");
    let e = ConfigError { file: None, ..e };
    assert_eq!(e.to_string(), "sluice.listen_port: bad");
    let e = ConfigError {
        key: String::new(),
        ..e
    };
    assert_eq!(e.to_string(), "bad");
}

#[test]
fn errors_carry_the_file() {
    let origin = Path::new("/etc/sluice/sluice.toml");
    let e = Config::parse("[sluice]\npool_mode = \"session\"", Some(origin)).expect_err("session");
    assert_eq!(e.file.as_deref(), Some(origin));
    assert!(
        e.to_string()
            .starts_with("/etc/sluice/sluice.toml: sluice.pool_mode: "),
        "{e}"
    );
    let e = Config::load(Path::new("/nonexistent/sluice.toml")).expect_err("missing file");
    assert_eq!(
        e.file.as_deref(),
        Some(Path::new("/nonexistent/sluice.toml"))
    );
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn unknown_fields_are_named_by_path() {
    fails(
        "[databases.appdb]\nhost = \"h\"\nprot = 5432",
        "databases.appdb.prot",
        "unknown field `prot`",
    );
    fails(
        "[sluice]\nlisten_adr = \"*\"",
        "sluice.listen_adr",
        "unknown field",
    );
    fails("[pgbouncer]\nlisten_port = 1", "pgbouncer", "unknown field");
    fails(
        "[users.app]\npasword = \"x\"",
        "users.app.pasword",
        "unknown field",
    );
    fails("[classes.c]\nprio = 1", "classes.c.prio", "unknown field");
    fails("[scheduler]\naging = 1", "scheduler.aging", "unknown field");
    fails(
        "[[policy.plugins]]\nname = \"p\"\npath = \"p.wasm\"\nfial = \"open\"",
        "policy.plugins[0].fial",
        "unknown field",
    );
}

#[test]
fn wrong_types_are_named_by_path() {
    fails(
        "[sluice]\nlisten_port = \"6432\"",
        "sluice.listen_port",
        "invalid type",
    );
    fails(
        "[sluice]\nlisten_port = 70000",
        "sluice.listen_port",
        "integer `70000`, expected an integer from 0 to 65535",
    );
    fails(
        "[sluice]\nmax_client_conn = -1",
        "sluice.max_client_conn",
        "-1",
    );
    fails(
        "[sluice]\nlog_connections = \"yes\"",
        "sluice.log_connections",
        "invalid type",
    );
    fails(
        "[databases.appdb]\nhost = \"h\"\nport = \"x\"",
        "databases.appdb.port",
        "invalid type",
    );
    fails(
        "[databases.appdb]\nport = 5432",
        "databases.appdb",
        "missing field `host`",
    );
    fails(
        "[users.app]\npassword = 5",
        "users.app.password",
        "invalid type",
    );
    fails(
        "[sluice]\nauth_type = 1",
        "sluice.auth_type",
        "invalid type",
    );
    fails("[policy]\nplugins = 3", "policy.plugins", "invalid type");
    fails(
        "[[policy.plugins]]\nname = \"p\"",
        "policy.plugins[0]",
        "missing field `path`",
    );
    fails("sluice = 1", "sluice", "invalid type");
}

#[test]
fn type_errors_give_the_line() {
    let e = parse_err("[sluice]\n\nlisten_port = \"x\"\n");
    assert!(e.message.ends_with("(line 3)"), "{e}");
}

#[test]
fn toml_syntax_errors_have_no_key() {
    let e = parse_err("[sluice\nlisten_port = 1");
    assert_eq!(e.key, "");
    assert!(e.message.starts_with("TOML syntax error: "), "{e}");
    assert!(!e.message.contains('\n'), "{e}");
    assert!(e.message.contains("line 1"), "{e}");
    let e = parse_err("[sluice]\nlisten_port = 1\nlisten_port = 2");
    assert!(e.message.contains("line 3"), "{e}");
}

#[test]
fn bad_durations_and_sizes() {
    fails(
        "[sluice]\nquery_wait_timeout = \"5x\"",
        "sluice.query_wait_timeout",
        "invalid duration \"5x\"",
    );
    fails(
        "[sluice]\nquery_wait_timeout = \"s\"",
        "sluice.query_wait_timeout",
        "invalid duration",
    );
    fails(
        "[sluice]\nquery_wait_timeout = -1",
        "sluice.query_wait_timeout",
        "zero or positive",
    );
    fails(
        "[sluice]\nquery_wait_timeout = -0.5",
        "sluice.query_wait_timeout",
        "zero or positive",
    );
    fails(
        "[sluice]\nquery_wait_timeout = \"400d\"",
        "sluice.query_wait_timeout",
        "too long",
    );
    fails(
        "[sluice]\nquery_wait_timeout = true",
        "sluice.query_wait_timeout",
        "invalid type",
    );
    fails(
        "[databases.d]\nhost = \"h\"\nserver_lifetime = \"1 week\"",
        "databases.d.server_lifetime",
        "invalid duration",
    );
    fails(
        "[users.u]\nclient_idle_timeout = \"1..5s\"",
        "users.u.client_idle_timeout",
        "invalid duration",
    );
    fails(
        "[classes.c]\nmax_wait = \"fast\"",
        "classes.c.max_wait",
        "invalid duration",
    );
    fails(
        "[sluice]\nserver_connect_timeout = 0",
        "sluice.server_connect_timeout",
        "greater than 0",
    );
    fails(
        "[policy]\ndeadline = 0",
        "policy.deadline",
        "greater than 0",
    );
    fails(
        "[policy]\nmemory_limit = \"16XB\"",
        "policy.memory_limit",
        "invalid size",
    );
    fails(
        "[policy]\nmemory_limit = -5",
        "policy.memory_limit",
        "zero or positive",
    );
    fails(
        "[policy]\nmemory_limit = 1024",
        "policy.memory_limit",
        "64KiB",
    );
    fails(
        "[sluice]\nmax_packet_size = \"2GiB\"",
        "sluice.max_packet_size",
        "1 GiB",
    );
    fails(
        "[sluice]\nmax_packet_size = 10",
        "sluice.max_packet_size",
        "1 KiB",
    );
}

#[test]
fn bad_keywords() {
    fails(
        "[sluice]\npool_mode = \"session\"",
        "sluice.pool_mode",
        "only \"transaction\" is supported",
    );
    fails(
        "[sluice]\npool_mode = \"statement\"",
        "sluice.pool_mode",
        "only \"transaction\" is supported",
    );
    fails(
        "[sluice]\npool_mode = \"tx\"",
        "sluice.pool_mode",
        "only \"transaction\" is supported",
    );
    fails(
        "[sluice]\nauth_type = \"plain\"",
        "sluice.auth_type",
        "unsupported auth_type",
    );
    fails(
        "[users.u]\nauth_type = \"cert\"",
        "users.u.auth_type",
        "unsupported auth_type",
    );
    fails(
        "[sluice]\nlog_format = \"xml\"",
        "sluice.log_format",
        "\"text\" or \"json\"",
    );
    fails(
        "[[policy.plugins]]\nname = \"p\"\npath = \"p.wasm\"\nfail = \"maybe\"",
        "policy.plugins[0].fail",
        "\"open\" or \"closed\"",
    );
}

#[test]
fn bad_general_values() {
    fails(
        "[sluice]\nlisten_addr = \"example.com\"",
        "sluice.listen_addr",
        "not an IP address",
    );
    fails(
        "[sluice]\nlisten_addr = \"\"",
        "sluice.listen_addr",
        "nothing to listen on",
    );
    fails(
        "[sluice]\ndefault_pool_size = 0",
        "sluice.default_pool_size",
        "at least 1",
    );
    fails(
        "[sluice]\nmax_client_conn = 0",
        "sluice.max_client_conn",
        "at least 1",
    );
    fails(
        "[sluice]\nmin_pool_size = 30",
        "sluice.min_pool_size",
        "exceeds default_pool_size",
    );
    fails("[sluice]\nworkers = 100000", "sluice.workers", "at most");
    fails(
        "[sluice]\nmetrics_addr = \"9930\"",
        "sluice.metrics_addr",
        "IP address and port",
    );
    fails(
        "[sluice]\nadmin_users = [\"a\", \"\"]",
        "sluice.admin_users",
        "empty",
    );
    fails(
        "[scheduler]\naging_per_sec = -1.0",
        "scheduler.aging_per_sec",
        "zero or positive",
    );
    fails(
        "[scheduler]\ndefault_class = \"\"",
        "scheduler.default_class",
        "empty",
    );
}

#[test]
fn bad_databases() {
    for name in ["sluice", "pgbouncer"] {
        fails(
            &format!("[databases.{name}]\nhost = \"h\""),
            &format!("databases.{name}"),
            "reserved for the admin console",
        );
    }
    fails("[databases.d]\nhost = \"\"", "databases.d.host", "empty");
    fails(
        "[databases.d]\nhost = \"h\"\nport = 0",
        "databases.d.port",
        "between 1 and 65535",
    );
    fails(
        "[databases.d]\nhost = \"h\"\ndbname = \"\"",
        "databases.d.dbname",
        "empty",
    );
    fails(
        "[databases.d]\nhost = \"h\"\npassword = \"p\"",
        "databases.d.password",
        "without user",
    );
    fails(
        "[databases.d]\nhost = \"h\"\npool_size = 0",
        "databases.d.pool_size",
        "at least 1",
    );
    fails(
        "[databases.d]\nhost = \"h\"\npool_size = 3\nmin_pool_size = 4",
        "databases.d.min_pool_size",
        "exceeds",
    );
    fails(
        "[databases.d]\nhost = \"h\"\nmin_pool_size = 21",
        "databases.d.min_pool_size",
        "exceeds",
    );
}

#[test]
fn bad_class_references_and_limits() {
    fails(
        "[users.u]\nclass = \"gold\"",
        "users.u.class",
        "no class named \"gold\"",
    );
    fails(
        "[classes.c]\nmax_active = 2\nreserved = 3",
        "classes.c.reserved",
        "exceeds max_active",
    );
    fails(
        "[users.u]\npool_size = 0",
        "users.u.pool_size",
        "at least 1",
    );
}

#[test]
fn bad_plugins() {
    let two = "[[policy.plugins]]\nname = \"p\"\npath = \"a.wasm\"\n[[policy.plugins]]\nname = \"p\"\npath = \"b.wasm\"";
    fails(two, "policy.plugins[1].name", "already named \"p\"");
    fails(
        "[[policy.plugins]]\nname = \"a b\"\npath = \"a.wasm\"",
        "policy.plugins[0].name",
        "not a valid plugin name",
    );
    fails(
        "[[policy.plugins]]\nname = \"p\"\npath = \"\"",
        "policy.plugins[0].path",
        "empty",
    );
}
