//! Cancel requests: a cancel reaches the server backend running the client's query and nothing
//! else; a late cancel (the client's query is over) cancels nothing.

use std::time::{Duration, Instant};

use sluice_tests::harness::{ConfigBuilder, PgCluster, RawClient, SluiceHandle};
use tokio_postgres::NoTls;

use crate::util::{simple_value, sqlstate, superuser, wait_backends, wait_queued, with_stats};

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_only_the_target_query() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(2)).await;
    let su = superuser(pg).await;
    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("cancel-a");
    let a = sluice.try_connect_with(cfg).await.expect("connect a");
    let b = sluice.connect("app", "appdb").await;
    let token = a.cancel_token();

    let a_task = tokio::spawn(async move {
        let started = Instant::now();
        let r = a.simple_query("select pg_sleep(30)").await;
        (a, r, started.elapsed())
    });
    wait_backends(&su, "cancel-a", "active", 1).await;

    // B works while A sleeps.
    for i in 0..20i32 {
        let v: i32 = b
            .query_one("select $1::int4 + 1", &[&i])
            .await
            .expect("b query")
            .get(0);
        assert_eq!(v, i + 1);
    }
    token.cancel_query(NoTls).await.expect("send cancel");
    let (a, r, elapsed) = tokio::time::timeout(Duration::from_secs(10), a_task)
        .await
        .expect("A returns soon after the cancel")
        .expect("join");
    let err = r.expect_err("A's query is cancelled");
    assert_eq!(sqlstate(&err), "57014", "{err}");
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");

    // Both clients carry on.
    assert_eq!(simple_value(&a, "select 'a-ok'").await, "a-ok");
    assert_eq!(simple_value(&b, "select 'b-ok'").await, "b-ok");
    sluice.shutdown().await;
}

/// On a pool of one, A's query has finished and B's long query runs on the same server
/// connection; A's cancel (and a bogus key) must not cancel B.
#[tokio::test(flavor = "multi_thread")]
async fn late_cancel_cancels_nothing() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let su = superuser(pg).await;
    let a = sluice.connect("app", "appdb").await;
    let a_pid: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("a")
        .get(0);
    let token = a.cancel_token();

    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("cancel-late-b");
    let b = sluice.try_connect_with(cfg).await.expect("connect b");
    let b_task = tokio::spawn(async move {
        b.query_one("select pg_backend_pid(), pg_sleep(3)::text", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    wait_backends(&su, "cancel-late-b", "active", 1).await;

    token.cancel_query(NoTls).await.expect("send late cancel");
    RawClient::cancel(sluice.addr(), (12345, 67890))
        .await
        .expect("bogus cancel is closed cleanly");

    let b_pid = tokio::time::timeout(Duration::from_secs(20), b_task)
        .await
        .expect("B finishes")
        .expect("join")
        .expect("B's query is not cancelled");
    assert_eq!(b_pid, a_pid, "B ran on the server connection A had used");
    assert_eq!(simple_value(&a, "select 'a-ok'").await, "a-ok");
    sluice.shutdown().await;
}

/// On a pool of one held by A's open transaction, B waits for a server connection; B's cancel
/// ends that wait with 57014. A cancel sent while B waited for nothing does not end B's next
/// wait.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_ends_a_wait_for_a_server_connection() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(with_stats(ConfigBuilder::new(pg).pool_size(1))).await;
    let a = sluice.connect("app", "appdb").await;
    let b = std::sync::Arc::new(sluice.connect("app", "appdb").await);
    let token = b.cancel_token();
    // A cancel while B is idle: nothing to stop, and nothing stored for later.
    token.cancel_query(NoTls).await.expect("send idle cancel");

    a.batch_execute("begin").await.expect("a begins");
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.simple_query("select 'b-1'").await })
    };
    wait_queued(&sluice, "appdb", "app", 1).await;
    token.cancel_query(NoTls).await.expect("send cancel");
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("B's wait ends soon after the cancel")
        .expect("join");
    let err = r.expect_err("B's wait is cancelled");
    assert_eq!(sqlstate(&err), "57014", "{err}");

    // B waits again; this time A commits and B gets the connection.
    let again = {
        let b = b.clone();
        tokio::spawn(async move { simple_value(&b, "select 'b-2'").await })
    };
    wait_queued(&sluice, "appdb", "app", 1).await;
    a.batch_execute("commit").await.expect("a commits");
    let v = tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("B runs once A commits")
        .expect("join");
    assert_eq!(v, "b-2");
    sluice.shutdown().await;
}
