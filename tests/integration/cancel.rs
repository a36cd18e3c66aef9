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

/// A TCP relay to PostgreSQL that holds back CancelRequests: the test decides when (and
/// whether) one reaches the server, as a slow postmaster would. Other connections pass through.
struct CancelHoldingRelay {
    port: u16,
    held: tokio::sync::mpsc::UnboundedReceiver<(Vec<u8>, tokio::net::TcpStream)>,
}

impl CancelHoldingRelay {
    async fn start(pg: &PgCluster) -> Self {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let upstream = pg.addr();
        let (tx, held) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = [0u8; 8];
                    if conn.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    // CancelRequest: length 16, code 80877102.
                    if head[4..8] == 80_877_102u32.to_be_bytes() {
                        let mut rest = [0u8; 8];
                        if conn.read_exact(&mut rest).await.is_ok() {
                            let mut request = head.to_vec();
                            request.extend_from_slice(&rest);
                            let _ = tx.send((request, conn));
                        }
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    if tokio::io::AsyncWriteExt::write_all(&mut server, &head)
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut server).await;
                    }
                });
            }
        });
        CancelHoldingRelay { port, held }
    }
}

/// A cancel PostgreSQL is slow to take: Sluice stops waiting for it after
/// `cancel_wait_timeout`, but the request can still land later. The server connection it was
/// aimed at is closed when its transaction ends, not given to the next client, whose query the
/// late cancel would otherwise stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_sluice_gave_up_on_never_reaches_the_next_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LOCK: i64 = 7_301_001;
    let pg = PgCluster::shared();
    let mut relay = CancelHoldingRelay::start(pg).await;
    let b = ConfigBuilder::for_server("127.0.0.1", relay.port)
        .pool_size(1)
        .set_str("cancel_wait_timeout", "200ms");
    let sluice = SluiceHandle::start(b).await;
    let su = pg
        .connect_direct("app", "appdb")
        .await
        .expect("direct connection");
    let inspect = superuser(pg).await;
    let lock = format!("select pg_advisory_xact_lock({LOCK})");

    // A's query waits on a lock the test holds, so it runs until the test lets it go.
    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("cancel-lost-a");
    let a = sluice.try_connect_with(cfg).await.expect("connect a");
    let a_pid: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("a's backend")
        .get(0);
    su.batch_execute(&format!("begin; {lock}"))
        .await
        .expect("the test takes the lock");
    let token = a.cancel_token();
    let a_task = {
        let lock = lock.clone();
        tokio::spawn(async move { a.simple_query(&lock).await.map(|_| ()) })
    };
    wait_backends(&inspect, "cancel-lost-a", "active", 1).await;

    // A's cancel reaches the relay and stays there; Sluice gives up on it (closes its side).
    token.cancel_query(NoTls).await.expect("send cancel");
    let (request, mut sluice_side) =
        tokio::time::timeout(Duration::from_secs(10), relay.held.recv())
            .await
            .expect("the cancel reaches the relay")
            .expect("relay running");
    let mut rest = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), sluice_side.read(&mut rest))
        .await
        .expect("Sluice stops waiting after cancel_wait_timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "Sluice closes the forward it gave up on");

    // A's query was never cancelled: it ends when the lock is free.
    su.batch_execute("commit")
        .await
        .expect("the test frees the lock");
    tokio::time::timeout(Duration::from_secs(10), a_task)
        .await
        .expect("A finishes")
        .expect("join")
        .expect("A's query was not cancelled");

    // B waits on the lock in turn; now the held cancel lands.
    su.batch_execute(&format!("begin; {lock}"))
        .await
        .expect("the test takes the lock again");
    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("cancel-lost-b");
    let b = sluice.try_connect_with(cfg).await.expect("connect b");
    let b_task = {
        let lock = lock.clone();
        tokio::spawn(async move {
            let pid: i32 = b.query_one("select pg_backend_pid()", &[]).await?.get(0);
            b.simple_query(&lock).await?;
            Ok::<_, tokio_postgres::Error>(pid)
        })
    };
    wait_backends(&inspect, "cancel-lost-b", "active", 1).await;
    let mut late = tokio::net::TcpStream::connect(pg.addr())
        .await
        .expect("connect to PostgreSQL");
    late.write_all(&request)
        .await
        .expect("deliver the held cancel");
    let mut sink = Vec::new();
    late.read_to_end(&mut sink)
        .await
        .expect("PostgreSQL handles the cancel and closes");
    su.batch_execute("commit")
        .await
        .expect("the test frees the lock");
    let b_pid = tokio::time::timeout(Duration::from_secs(10), b_task)
        .await
        .expect("B finishes")
        .expect("join")
        .unwrap_or_else(|e| panic!("B's query was cancelled by A's late cancel: {e}"));
    assert_ne!(b_pid, a_pid, "A's server connection was closed, not reused");
    sluice.shutdown().await;
}
