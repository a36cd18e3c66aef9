//! Cookies reach the plugin that issued them, across reloads that add, remove or reorder plugins;
//! every admission gets exactly one `on-disconnect` (also when a later plugin rejects the
//! client), and a plugin that did not admit the client gets none; an invalid decision throws the
//! instance away. Uses the test plugin `probe` (`tests/wasm/probe`), which records what it sees
//! in host counters.

use std::sync::Arc;

use sluice_config::{FailMode, PluginConfig, PolicyConfig};
use sluice_policy::testing::test_plugin_path;
use sluice_policy::{
    ClientFacts, CompletionFacts, ConnectDecision, Cookies, Outcome, PolicyEngine, PoolSnapshot,
    TransactionDecision, TransactionFacts,
};

fn classes() -> Vec<String> {
    vec!["default".to_string()]
}

/// A `probe` named `name` whose cookies carry `tag`, with extra settings lines.
fn probe(name: &str, tag: u32, fail: FailMode, extra: &str) -> PluginConfig {
    PluginConfig {
        name: name.to_string(),
        path: test_plugin_path("probe"),
        fail,
        settings: toml::from_str(&format!("tag = {tag}\n{extra}")).expect("settings toml"),
    }
}

/// The breaker stays shut: these tests make plugins fail on purpose.
fn config(plugins: Vec<PluginConfig>) -> PolicyConfig {
    PolicyConfig {
        breaker_failures: 0,
        ..sluice_policy::testing::test_policy_config(plugins)
    }
}

fn engine(plugins: Vec<PluginConfig>) -> Arc<PolicyEngine> {
    PolicyEngine::new(&config(plugins), &classes()).expect("load")
}

fn client(user: &str) -> ClientFacts<'_> {
    ClientFacts {
        user,
        database: "db",
        application_name: "app",
        addr: None,
        port: 0,
        tls: false,
        params: &[],
    }
}

fn connect(e: &PolicyEngine, user: &str) -> Cookies {
    match e.on_connect(&client(user)) {
        ConnectDecision::Admit(a) => a.cookies,
        ConnectDecision::Reject(r) => panic!("{user} rejected: {r:?}"),
    }
}

fn transaction(e: &PolicyEngine, cookies: &Cookies, query: &str) -> TransactionDecision {
    e.on_transaction(&TransactionFacts {
        cookies,
        class: "default",
        kind: sluice_policy::statement_kind(query),
        in_transaction: false,
        query,
        pool: PoolSnapshot::default(),
    })
}

fn complete(e: &PolicyEngine, cookies: &Cookies) {
    e.on_complete(&CompletionFacts {
        cookies,
        class: "default",
        duration_us: 10,
        wait_us: 1,
        outcome: Outcome::Committed,
    });
}

/// The probe counters of `plugin` that account for admissions.
#[derive(Debug, PartialEq, Eq)]
struct Ledger {
    admitted: i64,
    disconnected: i64,
    open: i64,
    zero: i64,
    foreign: i64,
}

fn ledger(e: &PolicyEngine, plugin: &str) -> Ledger {
    let c = |k| e.host_counter(plugin, k);
    Ledger {
        admitted: c("admitted"),
        disconnected: c("disconnected"),
        open: c("open"),
        zero: c("zero"),
        foreign: c("foreign"),
    }
}

fn balanced(admitted: i64) -> Ledger {
    Ledger {
        admitted,
        disconnected: admitted,
        open: 0,
        zero: 0,
        foreign: 0,
    }
}

#[test]
fn a_later_rejection_disconnects_the_earlier_admissions() {
    let e = engine(vec![
        probe("a", 1, FailMode::Open, ""),
        probe("b", 2, FailMode::Open, ""),
        probe("c", 3, FailMode::Open, "reject = \"mallory\""),
    ]);
    let ConnectDecision::Reject(r) = e.on_connect(&client("mallory")) else {
        panic!("mallory admitted")
    };
    assert_eq!(r.message, "probe 3 rejects");
    // a and b admitted mallory (and counted her): each released her with its own cookie.
    assert_eq!(ledger(&e, "a"), balanced(1));
    assert_eq!(ledger(&e, "b"), balanced(1));
    assert_eq!(e.host_counter("a", "disconnect:1:1"), 1);
    assert_eq!(e.host_counter("b", "disconnect:2:1"), 1);
    // c rejected her: it never admitted her, so no on-disconnect.
    assert_eq!(ledger(&e, "c"), balanced(0));

    // An admitted client is released once by every plugin, at disconnect.
    let alice = connect(&e, "alice");
    assert_eq!(alice.len(), 3);
    assert_eq!(ledger(&e, "c").open, 1);
    e.on_disconnect(&alice);
    assert_eq!(ledger(&e, "a"), balanced(2));
    assert_eq!(ledger(&e, "b"), balanced(2));
    assert_eq!(ledger(&e, "c"), balanced(1));
}

#[test]
fn a_plugin_whose_on_connect_failed_gets_no_on_disconnect() {
    // b traps for carol: fail open admits her without b; fail closed rejects her.
    let e = engine(vec![
        probe("a", 1, FailMode::Open, ""),
        probe(
            "b",
            2,
            FailMode::Open,
            "trap = \"carol\"\ninvalid = \"dave\"",
        ),
        probe("c", 3, FailMode::Open, ""),
    ]);
    for user in ["carol", "dave"] {
        let cookies = connect(&e, user);
        assert_eq!(cookies.len(), 2, "{user}: b did not admit");
        // b gets cookie 0 on later hooks.
        assert!(matches!(
            transaction(&e, &cookies, "select 1"),
            TransactionDecision::Proceed(_)
        ));
        e.on_disconnect(&cookies);
    }
    assert_eq!(ledger(&e, "a"), balanced(2));
    assert_eq!(ledger(&e, "c"), balanced(2));
    let b = ledger(&e, "b");
    assert_eq!((b.admitted, b.disconnected, b.open), (0, 0, 0), "{b:?}");
    assert_eq!(e.host_counter("b", "tx:0:0"), 2);
    assert_eq!(e.host_counter("b", "disconnect:0:0"), 0);

    let closed = engine(vec![
        probe("a", 1, FailMode::Open, ""),
        probe("b", 2, FailMode::Closed, "trap = \"carol\""),
        probe("c", 3, FailMode::Open, ""),
    ]);
    let ConnectDecision::Reject(r) = closed.on_connect(&client("carol")) else {
        panic!("carol admitted by a fail-closed plugin that trapped")
    };
    assert_eq!(r.sqlstate.as_str(), "58000");
    // a admitted her before b failed closed: released; b and c never admitted her.
    assert_eq!(ledger(&closed, "a"), balanced(1));
    assert_eq!(ledger(&closed, "b"), balanced(0));
    assert_eq!(ledger(&closed, "c"), balanced(0));
}

#[test]
fn cookies_follow_their_plugin_when_a_reload_reorders_adds_and_removes() {
    let e = engine(vec![
        probe("a", 1, FailMode::Open, ""),
        probe("b", 2, FailMode::Open, ""),
    ]);
    let early = connect(&e, "early");

    // Reordered: each plugin still gets its own cookie.
    e.reload(
        &config(vec![
            probe("b", 2, FailMode::Open, ""),
            probe("a", 1, FailMode::Open, ""),
        ]),
        &classes(),
    )
    .expect("reorder");
    transaction(&e, &early, "select 1");
    complete(&e, &early);
    assert_eq!(e.host_counter("a", "tx:1:1"), 1);
    assert_eq!(e.host_counter("b", "tx:2:1"), 1);
    assert_eq!(e.host_counter("a", "complete:1:1"), 1);
    assert_eq!(e.host_counter("b", "complete:2:1"), 1);

    // n is new, a is gone: n gets cookie 0 for the early client, and no on-disconnect.
    e.reload(
        &config(vec![
            probe("n", 3, FailMode::Open, ""),
            probe("b", 2, FailMode::Open, ""),
        ]),
        &classes(),
    )
    .expect("add and remove");
    transaction(&e, &early, "select 1");
    assert_eq!(e.host_counter("n", "tx:0:0"), 1);
    assert_eq!(e.host_counter("b", "tx:2:1"), 2);
    let late = connect(&e, "late");
    transaction(&e, &late, "select 1");
    assert_eq!(e.host_counter("n", "tx:3:1"), 1);
    assert_eq!(e.host_counter("b", "tx:2:2"), 1);

    e.on_disconnect(&early);
    e.on_disconnect(&late);
    assert_eq!(e.host_counter("b", "disconnect:2:1"), 1);
    assert_eq!(e.host_counter("b", "disconnect:2:2"), 1);
    assert_eq!(e.host_counter("n", "disconnect:3:1"), 1);
    assert_eq!(ledger(&e, "b"), balanced(2));
    let n = ledger(&e, "n");
    assert_eq!(
        (n.admitted, n.disconnected, n.open, n.foreign),
        (1, 1, 0, 0),
        "{n:?}"
    );
    // a was unloaded before the early client left: it is not called any more.
    assert_eq!(e.host_counter("a", "disconnected"), 0);
    assert_eq!(e.host_counter("a", "foreign"), 0);
}

#[test]
fn a_reloaded_plugin_keeps_the_clients_of_its_previous_generation() {
    let e = engine(vec![probe("a", 1, FailMode::Open, "")]);
    let c = connect(&e, "c");
    // Same name, new settings: a new generation of the same plugin.
    e.reload(
        &config(vec![probe("a", 1, FailMode::Open, "reject = \"x\"")]),
        &classes(),
    )
    .expect("reload");
    assert_eq!(e.stats()[0].generation, 2);
    transaction(&e, &c, "select 1");
    assert_eq!(e.host_counter("a", "tx:1:1"), 1);
    e.on_disconnect(&c);
    assert_eq!(e.host_counter("a", "disconnect:1:1"), 1);
    assert_eq!(ledger(&e, "a"), balanced(1));

    // Dropped from the config, then added back: a new plugin, which did not admit `d`.
    let d = connect(&e, "d");
    e.reload(&config(vec![]), &classes()).expect("remove");
    e.reload(&config(vec![probe("a", 1, FailMode::Open, "")]), &classes())
        .expect("add back");
    transaction(&e, &d, "select 1");
    assert_eq!(e.host_counter("a", "tx:0:0"), 1);
    e.on_disconnect(&d);
    assert_eq!(e.host_counter("a", "disconnect:1:2"), 0);
    assert_eq!(
        e.host_counter("a", "open"),
        1,
        "d's admission was never released"
    );
}

#[test]
fn an_invalid_decision_throws_the_instance_away() {
    let e = engine(vec![probe("a", 1, FailMode::Open, "invalid = \"dave\"")]);
    // init ran once at load, as a smoke test.
    assert_eq!(e.host_counter("a", "inits"), 1);
    let c = connect(&e, "c");
    assert_eq!(e.host_counter("a", "inits"), 2, "this thread's instance");
    transaction(&e, &c, "select 1");
    assert_eq!(e.host_counter("a", "inits"), 2, "reused");

    // An invalid tx decision (malformed SQLSTATE), failed open.
    assert!(matches!(
        transaction(&e, &c, "invalid"),
        TransactionDecision::Proceed(_)
    ));
    assert_eq!(e.stats()[0].invalid, 1);
    transaction(&e, &c, "select 1");
    assert_eq!(
        e.host_counter("a", "inits"),
        3,
        "rebuilt after the invalid decision"
    );

    // An invalid admission (unknown class).
    let dave = connect(&e, "dave");
    assert!(dave.is_empty());
    assert_eq!(e.stats()[0].invalid, 2);
    transaction(&e, &c, "select 1");
    assert_eq!(
        e.host_counter("a", "inits"),
        4,
        "rebuilt after the invalid admission"
    );

    // A trap, for comparison.
    transaction(&e, &c, "trap");
    transaction(&e, &c, "select 1");
    assert_eq!(e.host_counter("a", "inits"), 5);
    e.on_disconnect(&c);
    assert_eq!(ledger(&e, "a").open, 0);
}
