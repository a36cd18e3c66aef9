//! Loads the real plugin components (built from `plugins/` once per test binary) and checks
//! decisions, sandbox failures, the breaker, reloads and the simulator.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_config::{FailMode, PluginConfig, PolicyConfig};
use sluice_policy::testing::plugin_path;
use sluice_policy::{
    simulate, ClassPressure, ClientFacts, ConnectDecision, Cookies, Hook, PolicyEngine,
    PoolSnapshot, PressureFacts, SqlState, StatementKind, TransactionDecision, TransactionFacts,
};

fn classes() -> Vec<String> {
    ["default", "web", "batch"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn plugin(name: &str, path: PathBuf, fail: FailMode, settings: &str) -> PluginConfig {
    PluginConfig {
        name: name.to_string(),
        path,
        fail,
        settings: toml::from_str(settings).expect("settings toml"),
    }
}

/// The timeout test sets the real default deadline (1 ms).
fn config(plugins: Vec<PluginConfig>) -> PolicyConfig {
    sluice_policy::testing::test_policy_config(plugins)
}

fn engine(plugins: Vec<PluginConfig>) -> std::sync::Arc<PolicyEngine> {
    PolicyEngine::new(&config(plugins), &classes()).expect("load")
}

fn client<'a>(user: &'a str, app: &'a str) -> ClientFacts<'a> {
    ClientFacts {
        user,
        database: "db",
        application_name: app,
        addr: Some("10.0.0.7".parse().expect("ip")),
        port: 5555,
        tls: false,
        params: &[],
    }
}

fn tx<'a>(
    cookies: &'a Cookies,
    class: &'a str,
    query: &'a str,
    pool: PoolSnapshot,
) -> TransactionFacts<'a> {
    TransactionFacts {
        cookies,
        class,
        kind: sluice_policy::statement_kind(query),
        in_transaction: false,
        query,
        pool,
    }
}

/// The cookies of a client no plugin admitted: every plugin sees cookie 0.
static NO_COOKIES: Cookies = Cookies::EMPTY;

fn admit(d: ConnectDecision) -> sluice_policy::Admission {
    match d {
        ConnectDecision::Admit(a) => a,
        ConnectDecision::Reject(r) => panic!("rejected: {r:?}"),
    }
}

fn reject_tx(d: TransactionDecision) -> sluice_policy::Rejection {
    match d {
        TransactionDecision::Reject(r) => r,
        TransactionDecision::Proceed(p) => panic!("proceeded: {p:?}"),
    }
}

const PRIORITY: &str = r#"
web = "web,checkout"
batch = ["scraper*"]
default = "default"
select_boost = 5
pressure_max_active.batch = 3
[priorities]
web = 100
batch = -10
"#;

#[test]
fn priority_assigns_class_and_priority() {
    let e = engine(vec![plugin(
        "priority",
        plugin_path("priority"),
        FailMode::Open,
        PRIORITY,
    )]);
    assert!(e.wants(Hook::Connect) && e.wants(Hook::Transaction) && !e.wants(Hook::Query));
    let web = admit(e.on_connect(&client("app", "checkout")));
    assert_eq!(
        (web.class.as_deref(), web.priority),
        (Some("web"), Some(100))
    );
    assert_eq!(web.cookies.len(), 1);
    let batch = admit(e.on_connect(&client("app", "scraper-7")));
    assert_eq!(
        (batch.class.as_deref(), batch.priority),
        (Some("batch"), Some(-10))
    );
    let other = admit(e.on_connect(&client("app", "psql")));
    assert_eq!(
        (other.class.as_deref(), other.priority),
        (Some("default"), None)
    );

    let d = e.on_transaction(&tx(
        &web.cookies,
        "web",
        "select 1",
        PoolSnapshot::default(),
    ));
    assert_eq!(
        d,
        TransactionDecision::Proceed(sluice_policy::Proceed {
            priority: Some(105),
            ..Default::default()
        })
    );
    let actions = e.on_pressure(&PressureFacts {
        pool: "db.app".into(),
        size: 10,
        active: 10,
        idle: 0,
        waiting: 4,
        classes: vec![ClassPressure {
            name: "batch".into(),
            active: 8,
            waiting: 4,
            oldest_wait_ms: 10,
            max_active: None,
            max_wait_ms: None,
            shed_total: 0,
        }],
    });
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].max_active, Some(3));
    let stats = &e.stats()[0];
    assert_eq!(stats.calls[Hook::Connect as usize], 3);
    assert_eq!(stats.digest.len(), 64);
}

#[test]
fn client_limits_names_key_and_limits() {
    let e = engine(vec![plugin(
        "limits",
        plugin_path("client-limits"),
        FailMode::Open,
        "key = \"addr\"\nmax_active = 5\nrate = 20.0\nburst = 40\nmax_clients = 50\nexempt_users = \"admin\"",
    )]);
    let a = admit(e.on_connect(&client("app", "x")));
    assert_eq!(a.limit_key.as_deref(), Some("addr:10.0.0.7"));
    assert_eq!(a.key_max_active, Some(5));
    assert_eq!(
        a.key_rate,
        Some(sluice_policy::Rate {
            per_sec: 20.0,
            burst: 40
        })
    );
    assert_eq!(a.key_max_clients, Some(50));
    assert_eq!(admit(e.on_connect(&client("admin", "x"))).limit_key, None);
}

#[test]
fn deny_ddl_rejects_ddl_for_roles_and_classes() {
    let e = engine(vec![plugin(
        "deny-ddl",
        plugin_path("deny-ddl"),
        FailMode::Open,
        "roles = \"reporting\"\nclasses = \"batch\"",
    )]);
    let rep = admit(e.on_connect(&client("reporting", "bi")));
    let r = reject_tx(e.on_transaction(&tx(
        &rep.cookies,
        "default",
        "drop table t",
        PoolSnapshot::default(),
    )));
    assert_eq!(r.sqlstate, SqlState(*b"42501"));
    let mut q = tx(
        &rep.cookies,
        "default",
        "  truncate t",
        PoolSnapshot::default(),
    );
    q.in_transaction = true;
    assert_eq!(reject_tx(e.on_query(&q)).sqlstate.as_str(), "42501");
    assert!(matches!(
        e.on_transaction(&tx(
            &rep.cookies,
            "default",
            "select 1",
            PoolSnapshot::default()
        )),
        TransactionDecision::Proceed(_)
    ));
    let app = admit(e.on_connect(&client("app", "web")));
    assert!(matches!(
        e.on_transaction(&tx(
            &app.cookies,
            "default",
            "create table t()",
            PoolSnapshot::default()
        )),
        TransactionDecision::Proceed(_)
    ));
    assert!(matches!(
        e.on_transaction(&tx(
            &app.cookies,
            "batch",
            "alter table t add c int",
            PoolSnapshot::default()
        )),
        TransactionDecision::Reject(_)
    ));
}

#[test]
fn shed_rejects_batch_when_saturated_and_lowers_limits() {
    let e = engine(vec![plugin(
        "shed",
        plugin_path("shed"),
        FailMode::Open,
        "batch_classes = \"batch\"\nsaturation = 0.9\nmin_waiting = 2\n[classes.batch]\noldest_wait_ms = 200\nmax_wait_ms = 50\nmax_active = 2\nnormal_max_active = 10",
    )]);
    let busy = PoolSnapshot {
        size: 10,
        active: 10,
        idle: 0,
        waiting: 5,
    };
    let calm = PoolSnapshot {
        size: 10,
        active: 3,
        idle: 7,
        waiting: 0,
    };
    let r = reject_tx(e.on_transaction(&tx(&NO_COOKIES, "batch", "select 1", busy)));
    assert_eq!(r.sqlstate.as_str(), "53300");
    assert!(matches!(
        e.on_transaction(&tx(&NO_COOKIES, "batch", "select 1", calm)),
        TransactionDecision::Proceed(_)
    ));
    assert!(matches!(
        e.on_transaction(&tx(&NO_COOKIES, "web", "select 1", busy)),
        TransactionDecision::Proceed(_)
    ));
    let pressure = |oldest, max_active| PressureFacts {
        pool: "db.app".into(),
        size: 10,
        active: 10,
        idle: 0,
        waiting: 5,
        classes: vec![ClassPressure {
            name: "batch".into(),
            active: 9,
            waiting: 5,
            oldest_wait_ms: oldest,
            max_active,
            max_wait_ms: None,
            shed_total: 0,
        }],
    };
    let a = e.on_pressure(&pressure(500, None));
    assert_eq!((a[0].max_active, a[0].max_wait_ms), (Some(2), Some(50)));
    let a = e.on_pressure(&pressure(10, Some(2)));
    assert_eq!((a[0].max_active, a[0].max_wait_ms), (Some(10), None));
}

#[test]
fn spin_times_out_fail_open_and_closed() {
    let cfgs = [
        plugin("spin-open", plugin_path("spin"), FailMode::Open, ""),
        plugin("spin-closed", plugin_path("spin"), FailMode::Closed, ""),
    ];
    let mut cfg = config(vec![cfgs[0].clone()]);
    cfg.deadline = Duration::from_millis(1);
    let open = PolicyEngine::new(&cfg, &classes()).expect("load");
    let start = Instant::now();
    let d = open.on_transaction(&tx(
        &NO_COOKIES,
        "default",
        "select 1",
        PoolSnapshot::default(),
    ));
    let took = start.elapsed();
    assert!(
        matches!(d, TransactionDecision::Proceed(_)),
        "fail open proceeds: {d:?}"
    );
    // Deadline 1 ms, enforced within 2 ticks; generous slack for a loaded CI machine.
    assert!(took < Duration::from_millis(100), "took {took:?}");
    let s = &open.stats()[0];
    assert_eq!((s.timeouts, s.traps), (1, 0));

    cfg.plugins = vec![cfgs[1].clone()];
    let closed = PolicyEngine::new(&cfg, &classes()).expect("load");
    let r = reject_tx(closed.on_transaction(&tx(
        &NO_COOKIES,
        "default",
        "select 1",
        PoolSnapshot::default(),
    )));
    assert_eq!(r.sqlstate.as_str(), "58000");
    assert_eq!(
        r.message,
        "policy plugin \"spin-closed\" failed: deadline exceeded"
    );
    // The instance is rebuilt and still answers on-connect afterwards.
    admit(closed.on_connect(&client("a", "b")));
}

#[test]
fn spin_is_cut_off_after_the_epoch_ticker_went_to_sleep() {
    let mut cfg = config(vec![plugin(
        "spin",
        plugin_path("spin"),
        FailMode::Closed,
        "",
    )]);
    cfg.deadline = Duration::from_millis(1);
    let e = PolicyEngine::new(&cfg, &classes()).expect("load");
    // No call for a while: the ticker stops waking every millisecond.
    let waiting = Instant::now();
    while !e.epoch_ticker_asleep() {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the epoch ticker never went to sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The next call wakes it, so a runaway plugin still meets its deadline.
    let start = Instant::now();
    let r = reject_tx(e.on_transaction(&tx(
        &NO_COOKIES,
        "default",
        "select 1",
        PoolSnapshot::default(),
    )));
    assert_eq!(
        r.message,
        "policy plugin \"spin\" failed: deadline exceeded"
    );
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn membomb_hits_memory_limit() {
    let e = engine(vec![plugin(
        "membomb",
        plugin_path("membomb"),
        FailMode::Closed,
        "",
    )]);
    let r = reject_tx(e.on_transaction(&tx(
        &NO_COOKIES,
        "default",
        "select 1",
        PoolSnapshot::default(),
    )));
    assert_eq!(
        r.message,
        "policy plugin \"membomb\" failed: memory limit exceeded"
    );
    assert_eq!(e.stats()[0].traps, 1);
}

#[test]
fn trap_in_on_connect() {
    let e = engine(vec![plugin(
        "trap",
        plugin_path("trap"),
        FailMode::Closed,
        "",
    )]);
    match e.on_connect(&client("a", "b")) {
        ConnectDecision::Reject(r) => {
            assert_eq!(r.sqlstate.as_str(), "58000");
            assert!(
                r.message
                    .starts_with("policy plugin \"trap\" failed: trap:"),
                "{}",
                r.message
            );
        }
        d => panic!("{d:?}"),
    }
    let open = engine(vec![plugin(
        "trap",
        plugin_path("trap"),
        FailMode::Open,
        "",
    )]);
    // A plugin whose on-connect failed (open) did not admit the client: no cookie of its own.
    assert!(admit(open.on_connect(&client("a", "b"))).cookies.is_empty());
    assert_eq!(open.stats()[0].traps, 1);
}

#[test]
fn bad_decisions_are_invalid() {
    let e = engine(vec![plugin(
        "bad",
        plugin_path("bad-decision"),
        FailMode::Closed,
        "",
    )]);
    let ConnectDecision::Reject(r) = e.on_connect(&client("a", "b")) else {
        panic!("admitted")
    };
    assert!(
        r.message.contains("unknown class \"no-such-class\""),
        "{}",
        r.message
    );
    let r = reject_tx(e.on_transaction(&tx(
        &NO_COOKIES,
        "default",
        "select 1",
        PoolSnapshot::default(),
    )));
    assert!(r.message.contains("SQLSTATE \"bad\""), "{}", r.message);
    assert_eq!(e.stats()[0].invalid, 2);
}

#[test]
fn breaker_opens_after_failures() {
    let mut cfg = config(vec![plugin(
        "bad",
        plugin_path("bad-decision"),
        FailMode::Closed,
        "",
    )]);
    cfg.breaker_failures = 3;
    let e = PolicyEngine::new(&cfg, &classes()).expect("load");
    for _ in 0..3 {
        let _ = e.on_connect(&client("a", "b"));
    }
    let s = &e.stats()[0];
    assert!(s.breaker_open);
    assert_eq!(s.calls[Hook::Connect as usize], 3);
    let ConnectDecision::Reject(r) = e.on_connect(&client("a", "b")) else {
        panic!("admitted")
    };
    assert_eq!(
        r.message,
        "policy plugin \"bad\" failed: circuit breaker open"
    );
    let s = &e.stats()[0];
    assert_eq!(s.calls[Hook::Connect as usize], 3, "skipped while open");
    assert!(s.decisions.contains(&("breaker_skip".to_string(), 1)));
}

fn counter_reject_message(e: &PolicyEngine) -> String {
    for _ in 0..3 {
        if let TransactionDecision::Reject(r) = e.on_transaction(&tx(
            &NO_COOKIES,
            "default",
            "select 1",
            PoolSnapshot::default(),
        )) {
            return r.message;
        }
    }
    panic!("counter never rejected in 3 calls");
}

#[test]
fn reload_swaps_generation_keeps_counters_and_refuses_corrupt_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("counter.wasm");
    std::fs::copy(plugin_path("counter"), &path).expect("copy");
    let v1 = config(vec![plugin(
        "counter",
        path.clone(),
        FailMode::Open,
        "version = \"v1\"",
    )]);
    let e = PolicyEngine::new(&v1, &classes()).expect("load");
    assert_eq!(e.generation(), 1);
    assert_eq!(counter_reject_message(&e), "call 3 rejected by counter v1");

    let v2 = config(vec![plugin(
        "counter",
        path.clone(),
        FailMode::Open,
        "version = \"v2\"",
    )]);
    let report = e.reload(&v2, &classes()).expect("reload");
    assert_eq!(report.generation, 2);
    assert!(
        !report.plugins[0].recompiled,
        "same file: compiled code reused"
    );
    // The host counter survived: the next rejection is call 6, by the new version.
    assert_eq!(counter_reject_message(&e), "call 6 rejected by counter v2");
    assert_eq!(e.stats()[0].generation, 2);

    std::fs::write(&path, b"\0asm garbage").expect("write");
    let err = e.reload(&v1, &classes()).expect_err("corrupt file refused");
    assert!(err.to_string().contains("\"counter\""), "{err}");
    assert_eq!(e.generation(), 2);
    assert_eq!(e.reload_counts(), (1, 1));
    assert_eq!(counter_reject_message(&e), "call 9 rejected by counter v2");

    let missing = config(vec![plugin(
        "counter",
        dir.path().join("nope.wasm"),
        FailMode::Open,
        "",
    )]);
    assert!(e.reload(&missing, &classes()).is_err());
}

#[test]
fn reload_to_another_plugin_applies_new_decisions() {
    let e = engine(vec![plugin(
        "p",
        plugin_path("priority"),
        FailMode::Open,
        PRIORITY,
    )]);
    assert!(!e.wants(Hook::Query));
    e.reload(
        &config(vec![plugin(
            "p",
            plugin_path("deny-ddl"),
            FailMode::Open,
            "classes = \"web\"",
        )]),
        &classes(),
    )
    .expect("reload");
    assert!(e.wants(Hook::Query) && !e.wants(Hook::Pressure));
    let r = reject_tx(e.on_transaction(&tx(
        &NO_COOKIES,
        "web",
        "drop table x",
        PoolSnapshot::default(),
    )));
    assert_eq!(r.sqlstate.as_str(), "42501");
}

#[test]
fn several_plugins_merge() {
    let e = engine(vec![
        plugin(
            "priority",
            plugin_path("priority"),
            FailMode::Open,
            PRIORITY,
        ),
        plugin(
            "limits",
            plugin_path("client-limits"),
            FailMode::Open,
            "key = \"application\"\nmax_active = 2",
        ),
        plugin(
            "deny",
            plugin_path("deny-ddl"),
            FailMode::Open,
            "roles = \"reporting\"",
        ),
    ]);
    let a = admit(e.on_connect(&client("reporting", "web")));
    assert_eq!(a.class.as_deref(), Some("web"));
    assert_eq!(a.limit_key.as_deref(), Some("app:web"));
    assert_eq!(
        a.cookies.values().collect::<Vec<_>>(),
        [1 << 32 | 100, 0, 1]
    );
    let r = reject_tx(e.on_transaction(&tx(
        &a.cookies,
        "web",
        "drop table t",
        PoolSnapshot::default(),
    )));
    assert_eq!(r.sqlstate.as_str(), "42501");
}

#[test]
fn watcher_reloads_changed_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.wasm");
    std::fs::copy(plugin_path("priority"), &path).expect("copy");
    let cfg = config(vec![plugin("p", path.clone(), FailMode::Open, PRIORITY)]);
    let e = PolicyEngine::new(&cfg, &classes()).expect("load");
    let w = e.spawn_watcher(cfg, classes());
    std::fs::copy(plugin_path("deny-ddl"), &path).expect("copy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while e.generation() == 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    w.stop();
    assert_eq!(e.generation(), 2);
    assert!(e.wants(Hook::Query));
}

#[test]
fn simulate_writes_one_decision_per_event() {
    let cfg = config(vec![
        plugin(
            "priority",
            plugin_path("priority"),
            FailMode::Open,
            PRIORITY,
        ),
        plugin(
            "deny",
            plugin_path("deny-ddl"),
            FailMode::Open,
            "roles = \"reporting\"",
        ),
    ]);
    let events = r#"
{"event":"connect","user":"app","database":"db","application_name":"web","addr":"10.0.0.1"}
{"event":"connect","user":"reporting","database":"db","application_name":"bi"}
{"event":"transaction","client":0,"query":"select 1","in_transaction":false}
{"event":"transaction","client":1,"query":"drop table t"}
{"event":"pressure","pool":"db.app","size":10,"active":10,"waiting":3,"classes":[{"name":"batch","waiting":3,"oldest_wait_ms":50}]}
{"event":"complete","client":0,"duration_us":100,"wait_us":3,"outcome":"committed"}
{"event":"disconnect","client":0}
"#;
    let mut out = Vec::new();
    let sum = simulate(&cfg, &classes(), events.as_bytes(), &mut out).expect("simulate");
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[0]["decision"], "admit");
    assert_eq!(lines[0]["class"], "web");
    assert_eq!(lines[2]["priority"], 105);
    assert_eq!(lines[2]["kind"], "select");
    assert_eq!(lines[3]["decision"], "reject");
    assert_eq!(lines[3]["sqlstate"], "42501");
    assert_eq!(lines[4]["actions"][0]["max_active"], 3);
    assert_eq!(
        (sum.admitted, sum.proceeded, sum.tx_rejected, sum.actions),
        (2, 1, 1, 1)
    );

    let err = simulate(
        &cfg,
        &classes(),
        "{\"event\":\"transaction\",\"client\":4,\"query\":\"x\"}".as_bytes(),
        Vec::new(),
    )
    .expect_err("unknown client");
    assert!(err.to_string().starts_with("events line 1:"), "{err}");
}

#[test]
fn statement_kind_is_exported() {
    assert_eq!(
        sluice_policy::statement_kind("/* x */ delete from t"),
        StatementKind::Delete
    );
}

#[test]
fn empty_engine_admits() {
    let e = PolicyEngine::empty();
    assert!(!e.wants(Hook::Connect));
    assert!(admit(e.on_connect(&client("a", "b"))).cookies.is_empty());
    assert!(e.stats().is_empty());
}

#[test]
fn raising_memory_limit_past_the_reserved_slot_warns_and_is_capped() {
    let mut cfg = config(vec![plugin(
        "priority",
        plugin_path("priority"),
        FailMode::Open,
        PRIORITY,
    )]);
    cfg.memory_limit = 8 << 20;
    let e = PolicyEngine::new(&cfg, &classes()).expect("load");
    // Up to the 16 MiB slot reserved at start: honoured, no warning.
    cfg.memory_limit = 16 << 20;
    assert!(e
        .reload(&cfg, &classes())
        .expect("reload")
        .warnings
        .is_empty());
    cfg.memory_limit = 64 << 20;
    let report = e.reload(&cfg, &classes()).expect("reload");
    assert_eq!(
        report.warnings,
        [
            "[policy] memory_limit = 67108864 bytes is above the 16777216 bytes reserved per \
          instance when the first plugin was loaded: plugins stay capped at 16777216 bytes; \
          raising the limit above that needs a restart"
        ]
    );
    // The plugins still load and decide.
    assert_eq!(e.generation(), 3);
    admit(e.on_connect(&client("app", "checkout")));
}

#[test]
fn stats_keep_the_name_and_version_from_init() {
    let e = engine(vec![plugin(
        "p",
        plugin_path("priority"),
        FailMode::Open,
        PRIORITY,
    )]);
    let s = &e.stats()[0];
    assert_eq!(
        (s.name.as_str(), s.plugin_name.as_str(), s.version.as_str()),
        ("p", "priority", "0.1.0")
    );
}
