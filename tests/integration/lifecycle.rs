//! Nothing dirty survives: clients that vanish mid-transaction leave no open transaction and no
//! visible writes; a server killed mid-transaction gives the client 08006 and the pool recovers;
//! a client's application_name is what its server connection shows.

use std::time::Duration;

use sluice_tests::harness::{ConfigBuilder, PgCluster, SluiceHandle};

use crate::util::{
    fresh_table, raw_trusted, simple_value, sqlstate, superuser, wait_backends, SETTLE,
};

async fn count(c: &tokio_postgres::Client, table: &str) -> i64 {
    c.query_one(&format!("select count(*) from {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// tokio-postgres client dropped (Terminate) inside a transaction.
#[tokio::test(flavor = "multi_thread")]
async fn client_drop_mid_transaction_leaves_nothing() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "life_drop_t", "v int").await;
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let su = superuser(pg).await;

    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("life-drop-tp");
    let c = sluice.try_connect_with(cfg).await.expect("connect");
    c.batch_execute("begin").await.expect("begin");
    c.execute("insert into life_drop_t values (1)", &[])
        .await
        .expect("insert");
    wait_backends(&su, "life-drop-tp", "idle in transaction", 1).await;
    drop(c);
    wait_backends(&su, "life-drop-tp", "idle in transaction", 0).await;

    let next = sluice.connect("app", "appdb").await;
    assert_eq!(
        count(&next, "life_drop_t").await,
        0,
        "the insert was rolled back"
    );
    next.execute("insert into life_drop_t values (2)", &[])
        .await
        .expect("next client works on the pool of one");
    assert_eq!(count(&next, "life_drop_t").await, 1);
    sluice.shutdown().await;
}

/// Raw client whose socket just closes (no Terminate) inside a transaction.
#[tokio::test(flavor = "multi_thread")]
async fn client_socket_close_mid_transaction_leaves_nothing() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "life_close_t", "v int").await;
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let su = superuser(pg).await;

    let mut raw = raw_trusted(&sluice, "appdb", &[("application_name", "life-close-raw")]).await;
    raw.simple_rows("begin").await.expect("begin");
    raw.simple_rows("insert into life_close_t values (1)")
        .await
        .expect("insert");
    wait_backends(&su, "life-close-raw", "idle in transaction", 1).await;
    drop(raw);
    wait_backends(&su, "life-close-raw", "idle in transaction", 0).await;

    let next = sluice.connect("trusted", "appdb").await;
    assert_eq!(count(&next, "life_close_t").await, 0);
    next.batch_execute("insert into life_close_t values (2)")
        .await
        .expect("next client works");
    sluice.shutdown().await;
}

/// The server backend is terminated while the client's query runs: 08006, then recovery.
#[tokio::test(flavor = "multi_thread")]
async fn server_killed_mid_query_gives_08006() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let su = superuser(pg).await;
    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("life-kill-query");
    let c = sluice.try_connect_with(cfg).await.expect("connect");
    c.batch_execute("begin").await.expect("begin");
    let task = tokio::spawn(async move {
        let r = c.simple_query("select pg_sleep(30)").await;
        (c, r)
    });
    wait_backends(&su, "life-kill-query", "active", 1).await;
    let pids = pg.backend_pids("application_name = 'life-kill-query'");
    assert_eq!(pids.len(), 1, "{pids:?}");
    pg.kill_backend(pids[0]);

    let (_c, r) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("client hears about the dead server promptly")
        .expect("join");
    let err = r.expect_err("query on a killed server fails");
    assert_eq!(sqlstate(&err), "08006", "{err}");

    let next = sluice.connect("app", "appdb").await;
    assert_eq!(simple_value(&next, "select 41 + 1").await, "42");
    sluice.shutdown().await;
}

/// The server backend is terminated while the client sits idle in a transaction: the client
/// gets 08006 (at once or on its next query), then a new client works.
#[tokio::test(flavor = "multi_thread")]
async fn server_killed_idle_in_transaction_gives_08006() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "life_kill_t", "v int").await;
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let su = superuser(pg).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[("application_name", "life-kill-idle")]).await;
    raw.simple_rows("begin").await.expect("begin");
    raw.simple_rows("insert into life_kill_t values (1)")
        .await
        .expect("insert");
    wait_backends(&su, "life-kill-idle", "idle in transaction", 1).await;
    let pids = pg.backend_pids("application_name = 'life-kill-idle'");
    assert_eq!(pids.len(), 1, "{pids:?}");
    pg.kill_backend(pids[0]);

    // The query may not even be read if Sluice already closed the client; that's fine.
    let _ = raw.query("select 1").await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        match raw.recv_timeout(SETTLE).await {
            Ok(m) => {
                let done = m.tag == b'Z';
                seen.push(m);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let codes: Vec<String> = seen.iter().filter_map(|m| m.sqlstate()).collect();
    // Drivers report the first ErrorResponse they get; that one must be 08006.
    assert_eq!(
        codes.first().map(String::as_str),
        Some("08006"),
        "expected 08006 first, got {codes:?}: {seen:?}"
    );

    let next = sluice.connect("trusted", "appdb").await;
    assert_eq!(count(&next, "life_kill_t").await, 0);
    sluice.shutdown().await;
}

/// Two clients with different application_name alternate on a pool of one; inside each
/// transaction the server connection shows the client's own name.
#[tokio::test(flavor = "multi_thread")]
async fn application_name_follows_the_client() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let mut clients = Vec::new();
    for name in ["life-app-a", "life-app-b"] {
        let mut cfg = sluice.pg_config("app", "appdb");
        cfg.application_name(name);
        clients.push((name, sluice.try_connect_with(cfg).await.expect("connect")));
    }
    let mut pids = Vec::new();
    for _ in 0..10 {
        for (name, c) in &clients {
            c.batch_execute("begin").await.expect("begin");
            let row = c
                .query_one(
                    "select application_name::text, pg_backend_pid() from pg_stat_activity \
                     where pid = pg_backend_pid()",
                    &[],
                )
                .await
                .expect("own row");
            assert_eq!(row.get::<_, String>(0), *name);
            pids.push(row.get::<_, i32>(1));
            c.batch_execute("commit").await.expect("commit");
        }
    }
    pids.dedup();
    assert_eq!(
        pids.len(),
        1,
        "a pool of one used a single server connection"
    );
    sluice.shutdown().await;
}
