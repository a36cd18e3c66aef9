//! The policy engine through the proxy: real plugins decide class, admission, DDL and limits,
//! and misbehaving plugins never take the pooler down (fail open) or fail safe (fail closed).

use std::time::{Duration, Instant};

use sluice_tests::harness::ops::{
    connect_app, db_error_text, plugin_toml, sqlstate, ActivitySampler, AdminConsole,
};
use sluice_tests::harness::{ConfigBuilder, PgCluster, SluiceHandle};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// Test defaults plus an admin user (`app`) for the console.
fn base(pg: &PgCluster) -> ConfigBuilder {
    ConfigBuilder::new(pg).set("admin_users", r#"["app"]"#)
}

/// A `[policy]` table for tests that are not about the deadline. The epoch deadline counts wall
/// time, so on a loaded 2-CPU machine a well-behaved 1 ms call can be preempted past it.
pub(crate) const RELAXED_POLICY: &str = "[policy]\ndeadline = \"250ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_plugin_assigns_classes_by_application_name() {
    let pg = PgCluster::shared();
    let b = base(pg)
        .append(RELAXED_POLICY)
        .append("[classes.web]\npriority = 100\n[classes.batch]\npriority = -10\n")
        .append(&plugin_toml(
            "priority",
            "priority",
            "closed",
            &[
                r#"match = "application""#,
                r#"web = "pol-web*""#,
                r#"batch = ["pol-scraper*", "pol-cron"]"#,
                r#"default = "default""#,
            ],
        ));
    let sluice = SluiceHandle::start(b).await;
    let expect = [
        ("pol-web-1", "web"),
        ("pol-scraper-7", "batch"),
        ("pol-cron", "batch"),
        ("pol-other", "default"),
    ];
    let mut clients = Vec::new();
    for (app, _) in expect {
        let c = connect_app(&sluice, "app", "appdb", app)
            .await
            .unwrap_or_else(|e| panic!("connect as {app}: {}", db_error_text(&e)));
        // A transaction goes through with the assigned class.
        c.simple_query("select 1").await.expect("select 1");
        clients.push(c);
    }
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    for (app, class) in expect {
        let rows = admin.clients_of_app(app).await.expect("SHOW CLIENTS");
        assert_eq!(rows.len(), 1, "SHOW CLIENTS rows for {app}: {rows:?}");
        assert_eq!(rows[0]["class"], class, "class of {app}: {:?}", rows[0]);
    }
    let policies = admin.policy_row("priority").await.expect("SHOW POLICIES");
    // What the plugin reported in init: its crate's name and version.
    assert_eq!(
        (
            policies["plugin_name"].as_str(),
            policies["version"].as_str()
        ),
        ("priority", "0.1.0"),
        "{policies:?}"
    );
    assert_eq!(policies["breaker_open"], "0");
    let calls: u64 = policies["calls"].parse().expect("calls");
    assert!(calls >= 4, "priority plugin calls: {policies:?}");
    drop(clients);
    drop(admin);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_ddl_refuses_ddl_and_truncate_for_the_configured_role() {
    let pg = PgCluster::shared();
    // A table md5user owns, so that PostgreSQL itself would allow TRUNCATE: only the policy
    // can be the one refusing it.
    let direct = pg
        .connect_direct("postgres", "appdb")
        .await
        .expect("direct");
    direct
        .batch_execute(
            "create table pol_ddl_owned (id int); insert into pol_ddl_owned values (1); \
             alter table pol_ddl_owned owner to md5user;",
        )
        .await
        .expect("create pol_ddl_owned");
    let b = base(pg).append(RELAXED_POLICY).append(&plugin_toml(
        "deny-ddl",
        "deny-ddl",
        "closed",
        &[r#"roles = "md5user""#],
    ));
    let sluice = SluiceHandle::start(b).await;
    let restricted = sluice.connect("md5user", "appdb").await;

    for sql in [
        "create table pol_ddl_denied (id int)",
        "truncate pol_ddl_owned",
        "  TRUNCATE TABLE pol_ddl_owned",
        "drop table pol_ddl_owned",
    ] {
        let e = restricted
            .simple_query(sql)
            .await
            .expect_err(&format!("{sql} must be refused"));
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{sql}: {}",
            db_error_text(&e)
        );
        assert!(
            db_error_text(&e).contains("deny-ddl"),
            "{sql}: refused by something else: {}",
            db_error_text(&e)
        );
    }
    // Reads still work, on the same connection.
    let rows = restricted
        .query_one("select count(*) from pol_ddl_owned", &[])
        .await
        .expect("select after refusals");
    assert_eq!(
        rows.get::<_, i64>(0),
        1,
        "the refused TRUNCATE must not have run"
    );
    let n: i64 = restricted
        .query_one("select count(*) from sluice_fixture", &[])
        .await
        .expect("select fixture")
        .get(0);
    assert_eq!(n, 1000);
    // Nothing was created.
    let exists: bool = direct
        .query_one(
            "select to_regclass('public.pol_ddl_denied') is not null",
            &[],
        )
        .await
        .expect("to_regclass")
        .get(0);
    assert!(!exists, "pol_ddl_denied was created despite the policy");

    // A role not listed may run DDL.
    let free = sluice.connect("app", "appdb").await;
    free.batch_execute("create table pol_ddl_allowed (id int); drop table pol_ddl_allowed")
        .await
        .expect("DDL by app is allowed");

    drop((restricted, free));
    sluice.shutdown().await;
    direct
        .batch_execute("drop table pol_ddl_owned")
        .await
        .expect("cleanup");
}

/// The WIT contract and the deny-ddl README: on-query sees every statement, including those
/// inside a transaction block, so DDL after BEGIN is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_ddl_refuses_ddl_inside_a_transaction_block() {
    let pg = PgCluster::shared();
    let b = base(pg).append(RELAXED_POLICY).append(&plugin_toml(
        "deny-ddl",
        "deny-ddl",
        "closed",
        &[r#"roles = "md5user""#],
    ));
    let sluice = SluiceHandle::start(b).await;
    let c = sluice.connect("md5user", "appdb").await;
    c.batch_execute("begin").await.expect("begin");
    c.simple_query("select 1").await.expect("select in block");
    let res = c
        .simple_query("create table pol_ddl_in_block (id int)")
        .await;
    let _ = c.batch_execute("rollback").await;
    match res {
        Ok(_) => panic!("CREATE TABLE inside a transaction block was not refused by deny-ddl"),
        Err(e) => assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{}",
            db_error_text(&e)
        ),
    }
    drop(c);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_limits_caps_concurrent_transactions_per_application() {
    let pg = PgCluster::shared();
    const APP: &str = "pol-limited";
    let b = base(pg)
        .pool_size(6)
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "client-limits",
            "client-limits",
            "closed",
            &[r#"key = "application""#, "max_active = 2"],
        ));
    let sluice = SluiceHandle::start(b).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(
            connect_app(&sluice, "app", "appdb", APP)
                .await
                .unwrap_or_else(|e| panic!("connect: {}", db_error_text(&e))),
        );
    }
    let sampler = ActivitySampler::start(pg, APP).await.expect("sampler");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            c.simple_query("select pg_sleep(0.2)").await.map(|_| c)
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .expect("join");
        if let Err(e) = r {
            panic!("a limited transaction failed: {}", db_error_text(&e));
        }
    }
    let elapsed = started.elapsed();
    let (max, samples) = sampler.finish().await.expect("sampler");
    assert!(samples > 0, "no samples of pg_stat_activity");
    assert_eq!(
        max, 2,
        "most active server backends of {APP} at once ({samples} samples); key_max_active is 2"
    );
    // Six 200 ms transactions two at a time take at least three rounds.
    assert!(
        elapsed >= Duration::from_millis(550),
        "6 x pg_sleep(0.2) with max_active 2 finished in {elapsed:?}"
    );
    sluice.shutdown().await;
}

/// `[policy]` table that keeps the breaker shut, so every call reaches the bad plugins. The
/// deadline is generous so that each plugin fails the way it is built to (membomb by memory,
/// not by time); spin still never returns.
const NO_BREAKER: &str = "[policy]\nbreaker_failures = 0\ndeadline = \"100ms\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_fail_open_and_are_counted() {
    let pg = PgCluster::shared();
    let mut b = base(pg).append(NO_BREAKER);
    for p in ["spin", "membomb", "trap", "bad-decision"] {
        b = b.append(&plugin_toml(p, p, "open", &[]));
    }
    let sluice = SluiceHandle::start(b).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = connect_app(&sluice, "app", "appdb", &format!("pol-open-{i}"))
            .await
            .unwrap_or_else(|e| panic!("fail-open client {i} refused: {}", db_error_text(&e)));
        for _ in 0..3 {
            let row = c
                .query_one("select 41 + 1", &[])
                .await
                .unwrap_or_else(|e| panic!("fail-open transaction failed: {}", db_error_text(&e)));
            assert_eq!(row.get::<_, i32>(0), 42);
        }
        clients.push(c);
    }
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let num = |row: &std::collections::BTreeMap<String, String>, col: &str| -> u64 {
        row[col]
            .parse()
            .unwrap_or_else(|_| panic!("{col} in {row:?}"))
    };
    let spin = admin.policy_row("spin").await.expect("spin");
    assert!(num(&spin, "timeouts") > 0, "spin timeouts: {spin:?}");
    let membomb = admin.policy_row("membomb").await.expect("membomb");
    assert!(
        num(&membomb, "traps") > 0,
        "membomb out-of-memory (traps): {membomb:?}"
    );
    let trap = admin.policy_row("trap").await.expect("trap");
    assert!(num(&trap, "traps") > 0, "trap traps: {trap:?}");
    let bad = admin
        .policy_row("bad-decision")
        .await
        .expect("bad-decision");
    assert!(num(&bad, "invalid") > 0, "bad-decision invalid: {bad:?}");
    // The clients are still served after all that.
    for c in &clients {
        c.simple_query("select 1").await.expect("still served");
    }
    drop(clients);
    drop(admin);
    sluice.shutdown().await;
}

/// With `fail = "closed"`, a failing plugin refuses with 58000 and a message naming it: at login
/// for on-connect plugins, per transaction (the client stays connected) for on-transaction ones.
async fn fails_closed(plugin: &str, at_connect: bool) {
    let pg = PgCluster::shared();
    let b = base(pg)
        .append(NO_BREAKER)
        .append(&plugin_toml(plugin, plugin, "closed", &[]));
    let sluice = SluiceHandle::start(b).await;
    let expect_58000 = |e: &tokio_postgres::Error, what: &str| {
        assert_eq!(
            sqlstate(e).as_deref(),
            Some("58000"),
            "{what}: {}",
            db_error_text(e)
        );
        assert!(
            db_error_text(e).contains(plugin),
            "{what}: message should name plugin {plugin}: {}",
            db_error_text(e)
        );
    };
    if at_connect {
        for _ in 0..2 {
            match connect_app(&sluice, "app", "appdb", "pol-closed").await {
                Ok(_) => panic!("{plugin} (fail closed) admitted a client"),
                Err(e) => expect_58000(&e, "login"),
            }
        }
    } else {
        let c = connect_app(&sluice, "app", "appdb", "pol-closed")
            .await
            .unwrap_or_else(|e| panic!("login: {}", db_error_text(&e)));
        for _ in 0..2 {
            let e = c
                .simple_query("select 1")
                .await
                .expect_err("fail-closed transaction must be refused");
            expect_58000(&e, "transaction");
        }
        assert!(
            !c.is_closed(),
            "a refused transaction must not close the client"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_plugin_fails_closed_with_58000() {
    fails_closed("trap", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_decision_plugin_fails_closed_with_58000() {
    fails_closed("bad-decision", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_plugin_fails_closed_with_58000() {
    fails_closed("spin", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membomb_plugin_fails_closed_with_58000() {
    fails_closed("membomb", false).await;
}

/// A policy's `timeout-ms` is PostgreSQL's `statement_timeout` for that transaction: a long
/// statement of the class is cancelled with 57014, and the server connection goes to the next
/// client (same pool of one) with the timeout gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_statement_timeout_cancels_and_does_not_leak() {
    let pg = PgCluster::shared();
    let b = base(pg)
        .pool_size(1)
        .append(RELAXED_POLICY)
        .append("[classes.batch]\n")
        .append(&plugin_toml(
            "priority",
            "priority",
            "closed",
            &[
                r#"match = "application""#,
                r#"batch = "pol-timeout-batch""#,
                "statement_timeout.batch = 300",
            ],
        ));
    let sluice = SluiceHandle::start(b).await;
    let batch = connect_app(&sluice, "app", "appdb", "pol-timeout-batch")
        .await
        .expect("batch client");
    let started = Instant::now();
    let err = batch
        .simple_query("select pg_sleep(5)")
        .await
        .expect_err("cancelled by the statement timeout");
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("57014"),
        "{}",
        db_error_text(&err)
    );
    assert!(
        db_error_text(&err).contains("statement timeout"),
        "{}",
        db_error_text(&err)
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cancelled early, not at the end"
    );
    // The batch client's next transaction runs under the same timeout.
    let row = batch
        .query_one("show statement_timeout", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "300ms");
    // Another client on the only server connection: no timeout, a 0.5 s statement completes.
    let web = connect_app(&sluice, "app", "appdb", "pol-timeout-web")
        .await
        .expect("web client");
    let row = web
        .query_one("show statement_timeout", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "0");
    web.simple_query("select pg_sleep(0.5)")
        .await
        .expect("no timeout for a client outside the class");
    // A client's own setting wins back after a timed transaction of another client.
    web.batch_execute("set statement_timeout = '7s'")
        .await
        .expect("set");
    batch.simple_query("select 1").await.expect("batch select");
    let row = web
        .query_one("show statement_timeout", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "7s");
    drop((batch, web));
    sluice.shutdown().await;
}

/// A client keeps its own cookie for each plugin across reloads that add plugins in front of
/// the one that admitted it and reorder them: deny-ddl still knows the client is restricted
/// (its cookie), not the cookie of whatever plugin now sits at its old position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_survive_reloads_that_add_and_reorder_plugins() {
    let pg = PgCluster::shared();
    let deny = plugin_toml("deny-ddl", "deny-ddl", "closed", &[r#"roles = "md5user""#]);
    let priority = plugin_toml("priority", "priority", "closed", &[]);
    let config = |plugins: &[&String]| {
        plugins
            .iter()
            .fold(base(pg).append(RELAXED_POLICY), |b, p| b.append(p))
    };
    let mut sluice = SluiceHandle::start(config(&[&deny])).await;
    let restricted = sluice.connect("md5user", "appdb").await;
    let refused = |e: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
                   when: &str| {
        let e = e.expect_err(&format!(
            "{when}: DDL of the restricted client must be refused"
        ));
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{when}: {}",
            db_error_text(&e)
        );
        assert!(
            db_error_text(&e).contains("policy deny-ddl"),
            "{when}: refused by something else: {}",
            db_error_text(&e)
        );
    };
    refused(
        restricted.simple_query("drop table pol_cookie_none").await,
        "before any reload",
    );
    for (when, plugins) in [
        ("after adding a plugin in front", [&priority, &deny]),
        ("after reordering", [&deny, &priority]),
    ] {
        sluice
            .reload(config(&plugins))
            .await
            .unwrap_or_else(|e| panic!("reload {when}: {e:#}"));
        refused(
            restricted.simple_query("drop table pol_cookie_none").await,
            when,
        );
        // Reads still work for the old client, and new clients are judged by the new set.
        restricted
            .simple_query("select 1")
            .await
            .unwrap_or_else(|e| panic!("{when}: select: {}", db_error_text(&e)));
        let fresh = sluice.connect("md5user", "appdb").await;
        refused(
            fresh.simple_query("drop table pol_cookie_none").await,
            &format!("{when}, new client"),
        );
    }
    drop(restricted);
    sluice.shutdown().await;
}

/// Plugins that admitted a client hear `on-disconnect` however the client ends, including
/// when Sluice refuses it after the plugins admitted it (here `max_user_client_connections`):
/// otherwise a plugin's own connection count leaks with every such refusal.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_refused_after_admission_still_gets_on_disconnect() {
    use sluice_tests::harness::ops::{metric, scrape_metrics};
    let pg = PgCluster::shared();
    let b = base(pg)
        .set("max_user_client_connections", "1")
        .set_str("metrics_addr", "127.0.0.1:0");
    let sluice = with_probe(b).await;
    let addr = sluice.running().metrics_addr().expect("metrics listener");
    let calls = |text: &str, hook: &str| {
        metric(
            text,
            &format!("sluice_policy_calls_total{{plugin=\"probe\",hook=\"{hook}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let first = sluice.connect("app", "appdb").await;
    let err = match sluice.try_connect("app", Some("secret"), "appdb").await {
        Ok(_) => panic!("a second client of app must be refused"),
        Err(e) => e,
    };
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("53300"),
        "{}",
        db_error_text(&err)
    );
    // The refused client is released at once; the first is still connected.
    let wait_for = |connects: f64, disconnects: f64| async move {
        sluice_tests::harness::eventually(
            &format!("{connects} on-connect and {disconnects} on-disconnect calls"),
            WAIT,
            || async move {
                let text = scrape_metrics(addr).await?;
                let now = (calls(&text, "on-connect"), calls(&text, "on-disconnect"));
                Ok((now == (connects, disconnects)).then_some(()))
            },
        )
        .await
        .expect("balanced connects and disconnects");
    };
    wait_for(2.0, 1.0).await;
    drop(first);
    wait_for(2.0, 2.0).await;
    sluice.shutdown().await;
}

/// Sluice configured by `b` plus the `probe` test plugin, failing closed.
async fn with_probe(b: ConfigBuilder) -> SluiceHandle {
    use sluice_tests::harness::ops::plugin_toml_at;
    let probe = sluice_policy::testing::test_plugin_path("probe");
    SluiceHandle::start(b.append(RELAXED_POLICY).append(&plugin_toml_at(
        "probe",
        &probe,
        "closed",
        &[],
    )))
    .await
}

/// A counter of the `probe` plugin, read through a client: the probe rejects
/// `probe:count KEY` with the message `KEY=VALUE`.
async fn probe_count(client: &tokio_postgres::Client, key: &str) -> i64 {
    let err = match client.simple_query(&format!("probe:count {key}")).await {
        Ok(_) => panic!("the probe must answer `probe:count {key}` with an error"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("probe:count {key}: {err}"));
    assert_eq!(db.code().code(), "P0001", "{}", db.message());
    let value = db
        .message()
        .strip_prefix(&format!("{key}="))
        .unwrap_or_else(|| panic!("probe:count {key} answered {:?}", db.message()));
    value.parse().expect("a counter value")
}

/// `on-complete` hears how each transaction ended: COMMIT and implicit transactions are
/// `committed`, the client's ROLLBACK or ABORT is `rolled-back`, and a transaction in which a
/// statement failed is `failed` however it ended (a COMMIT of a failed block rolls back too).
/// ROLLBACK TO SAVEPOINT does not end the transaction.
#[tokio::test(flavor = "multi_thread")]
async fn on_complete_reports_how_each_transaction_ended() {
    let pg = PgCluster::shared();
    let sluice = with_probe(base(pg)).await;
    let c = sluice.connect("app", "appdb").await;
    let cases: [(&str, &[&str], [i64; 3]); 7] = [
        ("implicit", &["select 1"], [1, 0, 0]),
        ("commit", &["begin", "select 1", "commit"], [2, 0, 0]),
        ("rollback", &["begin", "select 1", "rollback"], [2, 1, 0]),
        ("abort", &["begin", "abort"], [2, 2, 0]),
        (
            "savepoint",
            &[
                "begin",
                "savepoint s",
                "select 1",
                "rollback to savepoint s",
                "commit",
            ],
            [3, 2, 0],
        ),
        (
            "failed, rolled back",
            &["begin", "select 1/0", "rollback"],
            [3, 2, 1],
        ),
        (
            "failed, committed",
            &["begin", "select 1/0", "commit"],
            [3, 2, 2],
        ),
    ];
    for (name, statements, [committed, rolled_back, failed]) in cases {
        for sql in statements {
            // Errors are part of the cases; the counters say how each transaction ended.
            let _ = c.simple_query(sql).await;
        }
        let seen = [
            probe_count(&c, "outcome:committed").await,
            probe_count(&c, "outcome:rolled-back").await,
            probe_count(&c, "outcome:failed").await,
        ];
        assert_eq!(
            seen,
            [committed, rolled_back, failed],
            "after the {name} case: [committed, rolled-back, failed]"
        );
    }
    assert_eq!(probe_count(&c, "outcome:aborted").await, 0);
    drop(c);
    sluice.shutdown().await;
}

/// A transaction that starts with the Bind of a prepared statement is judged by that
/// statement's text and kind, and a Parse later in the same transaction goes through
/// `on-query` like any later statement.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_starting_with_bind_is_judged_by_its_statement() {
    let pg = PgCluster::shared();
    let sluice = with_probe(base(pg)).await;
    let c = sluice.connect("app", "appdb").await;
    // Parse, Describe, Sync: a transaction that starts with the Parse.
    let begin = c.prepare("BEGIN").await.expect("prepare BEGIN");
    assert_eq!(probe_count(&c, "tx-query:begin:BEGIN").await, 1);
    // Bind, Execute, Sync: a transaction that starts with the Bind.
    c.execute(&begin, &[]).await.expect("execute BEGIN");
    // Inside the block that Bind opened, a Parse is the transaction's second statement.
    let err = c
        .execute("select 'probe:deny'", &[])
        .await
        .expect_err("on-query judges a Parse later in the transaction");
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("42501"),
        "{}",
        db_error_text(&err)
    );
    // As if the statement had failed on the server: the block is aborted.
    let err = c
        .simple_query("select 1")
        .await
        .expect_err("the refused statement aborted the block");
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    c.simple_query("rollback").await.expect("rollback");
    // Outside the block again, the probe's counters can be read.
    assert_eq!(
        probe_count(&c, "tx-query:begin:BEGIN").await,
        2,
        "on-transaction saw the bound statement"
    );
    assert_eq!(probe_count(&c, "tx-query:other:").await, 0);
    assert_eq!(probe_count(&c, "query:begin:BEGIN").await, 2);
    let sel = c.prepare("select 41 + 1").await.expect("prepare select");
    let row = c.query_one(&sel, &[]).await.expect("bound select");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(probe_count(&c, "tx-query:select:select 41 + 1").await, 2);
    drop(c);
    sluice.shutdown().await;
}
