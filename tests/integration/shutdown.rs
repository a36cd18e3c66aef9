//! Graceful and fast shutdown: stop accepting, idle clients get FATAL 57P01, transactions in
//! progress finish (graceful) or are cut (fast), and `Running::wait` returns.

use std::time::{Duration, Instant};

use sluice_proxy::ShutdownMode;
use sluice_tests::harness::ops::{connect_app, db_error_text};
use sluice_tests::harness::{eventually, ConfigBuilder, PgCluster, RawClient, SluiceHandle};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(15);

/// An idle client logged in over the raw protocol (trust user), to read the unsolicited FATAL.
async fn idle_raw_client(sluice: &SluiceHandle) -> RawClient {
    let mut raw = sluice.raw().await;
    raw.login(
        "trusted",
        "appdb",
        None,
        &[("application_name", "shd-idle")],
    )
    .await
    .expect("raw login");
    raw
}

/// The idle client receives FATAL 57P01 and is disconnected.
async fn expect_admin_shutdown(raw: &mut RawClient) {
    let msgs = raw
        .expect_closed(WAIT)
        .await
        .expect("the idle client is disconnected");
    let fatal = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no ErrorResponse before the close: {msgs:?}"));
    assert_eq!(
        fatal.sqlstate().as_deref(),
        Some("57P01"),
        "{:?}",
        fatal.message()
    );
    assert_eq!(fatal.field(b'S').as_deref(), Some("FATAL"));
}

/// Waits until Sluice no longer admits new clients.
async fn expect_not_accepting(sluice_cfg: tokio_postgres::Config) {
    eventually("Sluice to stop accepting clients", WAIT, || {
        let cfg = sluice_cfg.clone();
        async move {
            let r =
                tokio::time::timeout(Duration::from_secs(5), cfg.connect(tokio_postgres::NoTls))
                    .await;
            Ok(matches!(r, Ok(Err(_))).then_some(()))
        }
    })
    .await
    .expect("new logins refused");
}

fn table_config(pg: &PgCluster, timeout: &str) -> ConfigBuilder {
    ConfigBuilder::new(pg)
        .pool_size(2)
        .set_str("shutdown_timeout", timeout)
}

/// A Sluice (shutdown_timeout 60 s) with a client named `app` inside a transaction that has
/// inserted one row into the new table `table`, and an idle raw client.
struct Scene {
    direct: tokio_postgres::Client,
    sluice: SluiceHandle,
    login_cfg: tokio_postgres::Config,
    busy: tokio_postgres::Client,
    idle: RawClient,
}

async fn scene(table: &str, app: &str) -> Scene {
    let pg = PgCluster::shared();
    let direct = pg
        .connect_direct("postgres", "appdb")
        .await
        .expect("direct");
    direct
        .batch_execute(&format!(
            "create table {table} (v int); grant all on {table} to app"
        ))
        .await
        .expect("create");
    let sluice = SluiceHandle::start(table_config(pg, "60s")).await;
    let login_cfg = sluice.pg_config("app", "appdb");
    let busy = connect_app(&sluice, "app", "appdb", app)
        .await
        .expect("busy");
    busy.batch_execute(&format!("begin; insert into {table} values (1)"))
        .await
        .expect("begin");
    let idle = idle_raw_client(&sluice).await;
    Scene {
        direct,
        sluice,
        login_cfg,
        busy,
        idle,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_running_transaction_commit() {
    let Scene {
        direct,
        sluice,
        login_cfg,
        busy,
        mut idle,
    } = scene("shd_graceful", "shd-graceful-busy").await;

    let running = sluice.into_running();
    let started = Instant::now();
    running.shutdown(ShutdownMode::Graceful);
    expect_admin_shutdown(&mut idle).await;
    expect_not_accepting(login_cfg).await;

    // The transaction in progress finishes normally.
    busy.batch_execute("insert into shd_graceful values (2); commit")
        .await
        .unwrap_or_else(|e| panic!("COMMIT during a graceful shutdown: {}", db_error_text(&e)));
    let n: i64 = direct
        .query_one("select count(*) from shd_graceful", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "both rows committed");

    // Once it has ended, Sluice finishes well before shutdown_timeout (60 s).
    tokio::time::timeout(WAIT, running.wait())
        .await
        .expect("Running::wait returns once the transaction has ended");
    assert!(started.elapsed() < Duration::from_secs(30));
    eventually("the busy client to be closed", WAIT, || async {
        Ok(busy.is_closed().then_some(()))
    })
    .await
    .expect("closed after its transaction");
    direct
        .batch_execute("drop table shd_graceful")
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_cuts_transactions_at_shutdown_timeout() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(table_config(pg, "500ms")).await;
    let busy = connect_app(&sluice, "app", "appdb", "shd-deadline")
        .await
        .expect("busy");
    busy.batch_execute("begin; select 1").await.expect("begin");
    let running = sluice.into_running();
    let started = Instant::now();
    running.shutdown(ShutdownMode::Graceful);
    tokio::time::timeout(WAIT, running.wait())
        .await
        .expect("Running::wait returns at the deadline even with a transaction open");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "returned after {:?}, before shutdown_timeout",
        started.elapsed()
    );
    assert!(
        busy.batch_execute("commit").await.is_err(),
        "the cut transaction cannot commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_shutdown_closes_everyone_and_rolls_back() {
    let Scene {
        direct,
        sluice,
        login_cfg,
        busy,
        mut idle,
    } = scene("shd_fast", "shd-fast-busy").await;

    let running = sluice.into_running();
    running.shutdown(ShutdownMode::Fast);
    expect_admin_shutdown(&mut idle).await;
    tokio::time::timeout(WAIT, running.wait())
        .await
        .expect("Running::wait returns without waiting for the transaction");
    expect_not_accepting(login_cfg).await;
    assert!(
        busy.batch_execute("commit").await.is_err(),
        "no COMMIT after a fast shutdown"
    );
    // The server side of the cut transaction is rolled back.
    eventually("the cut transaction's backend to go", WAIT, || async {
        let n: i64 = direct
            .query_one(
                "select count(*) from pg_stat_activity where application_name = 'shd-fast-busy'",
                &[],
            )
            .await?
            .get(0);
        Ok((n == 0).then_some(()))
    })
    .await
    .expect("backend gone");
    let n: i64 = direct
        .query_one("select count(*) from shd_fast", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "the uncommitted row must not survive");
    direct
        .batch_execute("drop table shd_fast")
        .await
        .expect("drop");
}
