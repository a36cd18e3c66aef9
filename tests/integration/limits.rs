//! Limits and timeouts: query_wait_timeout, max_client_conn, client_idle_timeout,
//! idle_transaction_timeout, client_login_timeout, server_connect_timeout and
//! max_db_connections.

use std::time::{Duration, Instant};

use sluice_tests::harness::raw::{frontend, RawClient};
use sluice_tests::harness::{eventually, free_port, ConfigBuilder, PgCluster, SluiceHandle};
use tokio::net::TcpListener;

use crate::util::{
    backends_in_db, create_database, fresh_table, message, raw_trusted, simple_value, sqlstate,
    superuser, wait_backends, wait_queued, with_stats, SETTLE,
};

#[tokio::test(flavor = "multi_thread")]
async fn query_wait_timeout_names_the_pool() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .pool_size(1)
            .set("query_wait_timeout", "0.5"),
    )
    .await;
    let a = sluice.connect("app", "appdb").await;
    let b = sluice.connect("app", "appdb").await;
    a.batch_execute("begin; select 1").await.expect("a holds");
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), b.simple_query("select 1"))
        .await
        .expect("B gets an answer")
        .expect_err("B times out waiting");
    let waited = started.elapsed();
    assert_eq!(sqlstate(&err), "53300", "{err}");
    assert!(message(&err).contains("appdb.app"), "{}", message(&err));
    assert!(waited >= Duration::from_millis(400), "waited {waited:?}");
    a.batch_execute("commit").await.expect("commit");
    let c = sluice.connect("app", "appdb").await;
    assert_eq!(simple_value(&c, "select 1").await, "1");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_client_conn_refuses_with_53300() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).set("max_client_conn", "2")).await;
    let c1 = sluice.connect("app", "appdb").await;
    let c2 = sluice.connect("app", "appdb").await;
    let err = sluice
        .try_connect("app", Some("secret"), "appdb")
        .await
        .expect_err("third client refused");
    assert_eq!(sqlstate(&err), "53300", "{err}");
    assert_eq!(simple_value(&c2, "select 2").await, "2");
    drop(c1);
    let c3 = eventually("a slot to free up", SETTLE, || async {
        Ok(sluice
            .try_connect("app", Some("secret"), "appdb")
            .await
            .ok())
    })
    .await
    .expect("a client is accepted once another left");
    assert_eq!(simple_value(&c3, "select 3").await, "3");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_idle_timeout_closes_idle_client() {
    let pg = PgCluster::shared();
    let sluice =
        SluiceHandle::start(ConfigBuilder::new(pg).set("client_idle_timeout", "0.5")).await;
    let c = sluice.connect("app", "appdb").await;
    assert_eq!(simple_value(&c, "select 1").await, "1");
    eventually("idle client to be closed", SETTLE, || async {
        Ok(c.is_closed().then_some(()))
    })
    .await
    .expect("client_idle_timeout closes the client");

    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let seen = raw.expect_closed(SETTLE).await.expect("raw client closed");
    assert!(
        seen.iter().all(|m| m.tag == b'E' || m.tag == b'N'),
        "only an error/notice before closing: {seen:?}"
    );
    sluice.shutdown().await;
}

/// Clients that stall before or during authentication are cut off at client_login_timeout with
/// 08P01; a client that logged in in time is not, and its alarm never fires.
#[tokio::test(flavor = "multi_thread")]
async fn client_login_timeout_cuts_stalled_logins() {
    let pg = PgCluster::shared();
    // A deadline well above a trust login's few milliseconds even on a loaded CI machine (a
    // SCRAM login in the debug-built test client can take a few hundred).
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).set("client_login_timeout", "1")).await;
    let before = Instant::now();
    let on_time = sluice.connect("trusted", "appdb").await;
    // Half a startup packet.
    let mut half = sluice.raw().await;
    half.send(&frontend::startup("trusted", "appdb", &[])[..6])
        .await
        .expect("send half a startup packet");
    // A startup packet, and no answer to the password request.
    let mut mute = sluice.raw().await;
    mute.startup("app", "appdb", &[]).await.expect("startup");

    for (what, raw) in [("half startup", &mut half), ("no password", &mut mute)] {
        let seen = raw.expect_closed(SETTLE).await.expect(what);
        let err = seen
            .iter()
            .find(|m| m.tag == b'E')
            .unwrap_or_else(|| panic!("{what}: no error before closing: {seen:?}"));
        assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{what}: {err:?}");
        let msg = err.message().unwrap_or_default();
        assert!(msg.contains("client_login_timeout"), "{what}: {msg}");
    }
    // Cut no earlier than the deadline, counted from each client's connect.
    assert!(before.elapsed() >= Duration::from_secs(1));
    // Logged in on time: still served, past its own deadline.
    assert_eq!(simple_value(&on_time, "select 1").await, "1");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_transaction_timeout_closes_client_and_frees_server() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "limits_itx_t", "v int").await;
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .pool_size(1)
            .set("idle_transaction_timeout", "0.5"),
    )
    .await;
    let su = superuser(pg).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[("application_name", "limits-itx")]).await;
    raw.simple_rows("begin").await.expect("begin");
    raw.simple_rows("insert into limits_itx_t values (1)")
        .await
        .expect("insert");
    let seen = raw.expect_closed(SETTLE).await.expect("client closed");
    let codes: Vec<String> = seen.iter().filter_map(|m| m.sqlstate()).collect();
    assert_eq!(codes, ["25P03"], "{seen:?}");
    wait_backends(&su, "limits-itx", "idle in transaction", 0).await;

    let next = sluice.connect("trusted", "appdb").await;
    let n: i64 = next
        .query_one("select count(*) from limits_itx_t", &[])
        .await
        .expect("pool of one is free again")
        .get(0);
    assert_eq!(n, 0, "the transaction was rolled back");
    sluice.shutdown().await;
}

/// The idle timeouts are checked by the maintenance tick, not timed per wait: they must still
/// fire no earlier than set, counted from the client's last message, and spare a client that
/// keeps working or whose statement runs longer than the timeout.
#[tokio::test(flavor = "multi_thread")]
async fn idle_timeouts_fire_no_earlier_than_set_and_spare_busy_clients() {
    let pg = PgCluster::shared();
    let limit = Duration::from_secs(1);
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .set("client_idle_timeout", "1")
            .set("idle_transaction_timeout", "1"),
    )
    .await;
    // Each idle time is counted from before the client's last message: no later than Sluice's.
    let mut idle = raw_trusted(&sluice, "appdb", &[]).await;
    let idle_since = Instant::now();
    idle.simple_rows("select 1").await.expect("select");
    let mut in_tx = raw_trusted(&sluice, "appdb", &[]).await;
    in_tx.simple_rows("begin").await.expect("begin");
    let in_tx_since = Instant::now();
    in_tx.simple_rows("select 1").await.expect("select");

    // Busy for twice the timeout: a transaction every 100 ms, and inside a transaction a
    // statement that runs longer than the timeout (the server owes the answer, not the client).
    let busy = sluice.connect("app", "appdb").await;
    let slow = sluice.connect("app", "appdb").await;
    let pacing = async {
        for i in 0..20 {
            assert_eq!(
                simple_value(&busy, &format!("select {i}")).await,
                i.to_string()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let long_statement = async {
        slow.batch_execute("begin").await.expect("begin");
        slow.batch_execute("select pg_sleep(1.5)")
            .await
            .expect("a statement longer than idle_transaction_timeout runs to the end");
        slow.batch_execute("commit").await.expect("commit");
    };
    // Watched while the others work, so the time each was closed at is known.
    let closed = |what: &'static str, mut client: RawClient| async move {
        let seen = client.expect_closed(SETTLE).await.expect(what);
        let codes: Vec<String> = seen.iter().filter_map(|m| m.sqlstate()).collect();
        (codes, Instant::now())
    };
    let ((), (), (idle_codes, idle_closed), (tx_codes, tx_closed)) = tokio::join!(
        pacing,
        long_statement,
        closed("idle", idle),
        closed("idle in transaction", in_tx)
    );
    assert_eq!(idle_codes, ["57P05"]);
    assert_eq!(tx_codes, ["25P03"]);
    let idle_for = idle_closed - idle_since;
    let tx_idle_for = tx_closed - in_tx_since;
    assert!(idle_for >= limit, "idle client closed after {idle_for:?}");
    assert!(
        tx_idle_for >= limit,
        "idle transaction closed after {tx_idle_for:?}"
    );
    // The busy ones outlived both.
    assert!(!busy.is_closed() && !slow.is_closed());
    assert_eq!(
        simple_value(&busy, "select 'still here'").await,
        "still here"
    );
    sluice.shutdown().await;
}

/// Nothing listens on the server port: the client gets a clean 08xxx error, quickly.
#[tokio::test(flavor = "multi_thread")]
async fn server_connect_to_closed_port_fails_cleanly() {
    let pg = PgCluster::shared();
    let closed = free_port().expect("free port");
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .database_set("appdb", "port", &closed.to_string())
            .set("server_connect_timeout", "1"),
    )
    .await;
    let err = first_error(&sluice).await;
    assert!(sqlstate(&err).starts_with("08"), "{err}");
    assert_serves_other_db(&sluice).await;
    sluice.shutdown().await;
}

/// The server accepts TCP but never answers: server_connect_timeout bounds the wait.
#[tokio::test(flavor = "multi_thread")]
async fn server_connect_timeout_bounds_a_silent_server() {
    let pg = PgCluster::shared();
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..50 {
            match silent.accept().await {
                Ok((s, _)) => held.push(s),
                Err(_) => break,
            }
        }
    });
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .database_set("appdb", "port", &port.to_string())
            .set("server_connect_timeout", "0.5"),
    )
    .await;
    let started = Instant::now();
    let err = first_error(&sluice).await;
    assert!(sqlstate(&err).starts_with("08"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_serves_other_db(&sluice).await;
    holder.abort();
    sluice.shutdown().await;
}

/// The first error a client of appdb sees, at login or at its first query, bounded.
async fn first_error(sluice: &SluiceHandle) -> tokio_postgres::Error {
    let attempt = async {
        match sluice.try_connect("app", Some("secret"), "appdb").await {
            Err(e) => e,
            Ok(c) => c
                .simple_query("select 1")
                .await
                .expect_err("a query on an unreachable server fails"),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .expect("the error comes within 15 s")
}

/// otherdb still points at the real server.
async fn assert_serves_other_db(sluice: &SluiceHandle) {
    let c = sluice.connect("app", "otherdb").await;
    assert_eq!(simple_value(&c, "select 1").await, "1");
}

/// max_db_connections = 2 over users app and md5user: a third transaction waits until one
/// of the two open ones ends, and PostgreSQL never sees more than 2 connections.
#[tokio::test(flavor = "multi_thread")]
async fn max_db_connections_across_users() {
    let pg = PgCluster::shared();
    create_database(pg, "limits_maxdb");
    let sluice = SluiceHandle::start(with_stats(
        ConfigBuilder::new(pg)
            .pool_size(5)
            .set("query_wait_timeout", "10")
            .database("limits_maxdb", "limits_maxdb")
            .database_set("limits_maxdb", "max_db_connections", "2"),
    ))
    .await;
    let su = superuser(pg).await;
    let a1 = sluice.connect("app", "limits_maxdb").await;
    let a2 = sluice.connect("app", "limits_maxdb").await;
    let m = sluice.connect("md5user", "limits_maxdb").await;
    a1.batch_execute("begin; select 1").await.expect("a1 holds");
    a2.batch_execute("begin; select 1").await.expect("a2 holds");
    assert_eq!(backends_in_db(&su, "limits_maxdb").await, 2);

    let m_task = tokio::spawn(async move {
        let r = m.simple_query("select current_user").await;
        (m, r)
    });
    wait_queued(&sluice, "limits_maxdb", "md5user", 1).await;
    assert!(!m_task.is_finished(), "md5user waits for a connection slot");
    assert!(backends_in_db(&su, "limits_maxdb").await <= 2);

    a1.batch_execute("commit").await.expect("a1 commits");
    let (m, r) = tokio::time::timeout(Duration::from_secs(10), m_task)
        .await
        .expect("md5user proceeds once a slot frees")
        .expect("join");
    r.expect("md5user's query");
    assert!(backends_in_db(&su, "limits_maxdb").await <= 2);
    assert_eq!(simple_value(&m, "select current_user").await, "md5user");
    a2.batch_execute("commit").await.expect("a2 commits");
    assert!(backends_in_db(&su, "limits_maxdb").await <= 2);
    sluice.shutdown().await;
}
