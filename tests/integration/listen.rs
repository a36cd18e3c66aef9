//! Listeners: the optional unix socket serves clients like the TCP port does; TCP clients are
//! accepted once they speak.

use std::time::Duration;

use sluice_tests::harness::ops::{metric, scrape_metrics};
use sluice_tests::harness::{eventually, ConfigBuilder, PgCluster, SluiceHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn unix_socket_listener_serves_clients() {
    let pg = PgCluster::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_dir = dir.path().to_str().expect("utf-8 path").to_string();
    let sluice =
        SluiceHandle::start(ConfigBuilder::new(pg).set_str("unix_socket_dir", &sock_dir)).await;
    let port = sluice.addr().port();
    assert!(
        dir.path().join(format!(".s.PGSQL.{port}")).exists(),
        "the socket file is named like PostgreSQL's"
    );
    let conn = format!("host={sock_dir} port={port} user=app password=secret dbname=appdb");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .expect("connect over the unix socket");
    tokio::spawn(connection);
    let row = client.query_one("select 40 + 2", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    // The same client keeps working across transactions on the pooled connection.
    for i in 0..5 {
        let row = client
            .query_one("select $1::int", &[&i])
            .await
            .expect("query");
        assert_eq!(row.get::<_, i32>(0), i);
    }
    drop(client);
    sluice.shutdown().await;
}

/// The `sluice_client_connections_total` counter: clients Sluice has accepted.
async fn accepted(metrics: std::net::SocketAddr) -> f64 {
    let text = scrape_metrics(metrics).await.expect("scrape");
    metric(&text, "sluice_client_connections_total").expect("the accepted counter")
}

/// `tcp_defer_accept` (on by default on Linux, as in PgBouncer): a connection that has sent
/// nothing stays with the kernel; once it speaks, Sluice accepts and answers it.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_accepted_once_they_speak() {
    let pg = PgCluster::shared();
    let sluice =
        SluiceHandle::start(ConfigBuilder::new(pg).set_str("metrics_addr", "127.0.0.1:0")).await;
    let metrics = sluice.running().metrics_addr().expect("metrics listener");
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(sluice.addr()).await.expect("connect"));
    }
    // A client that speaks is served meanwhile, and it is the only one accepted.
    let client = sluice.connect("app", "appdb").await;
    let row = client.query_one("select 1 + 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(
        accepted(metrics).await,
        1.0,
        "silent connections were accepted"
    );
    // One silent connection speaks (an SSLRequest): accepted and answered 'N'.
    let mut s = silent.pop().expect("three");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("SSLRequest");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert_eq!(&answer, b"N");
    assert_eq!(accepted(metrics).await, 2.0);
    drop(client);
    sluice.shutdown().await;
}

/// With `tcp_defer_accept = false`, Sluice accepts a connection before it says anything.
#[tokio::test(flavor = "multi_thread")]
async fn without_defer_accept_silent_connections_are_accepted() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .set_str("metrics_addr", "127.0.0.1:0")
            .set("tcp_defer_accept", "false"),
    )
    .await;
    let metrics = sluice.running().metrics_addr().expect("metrics listener");
    let _silent = TcpStream::connect(sluice.addr()).await.expect("connect");
    eventually(
        "the silent connection accepted",
        Duration::from_secs(10),
        || async { Ok((accepted(metrics).await == 1.0).then_some(())) },
    )
    .await
    .expect("accepted");
    sluice.shutdown().await;
}

/// The `tr` (timer) fields of the established 127.0.0.1 sockets in /proc/net/tcp with local
/// port `local` and, if given, remote port `remote`. 2 is the keepalive timer; 1 (retransmit or
/// loss probe) shows briefly after a send.
fn tcp_timers(local: u16, remote: Option<u16>) -> Vec<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{local:04X}");
    let remote = remote.map(|p| format!("0100007F:{p:04X}"));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let matches = f.get(1) == Some(&local.as_str())
                && remote.as_deref().is_none_or(|r| f.get(2) == Some(&r))
                && f.get(3) == Some(&"01"); // ESTABLISHED
            matches
                .then(|| f.get(5)?.split(':').next()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// `tcp_keepalive` covers both legs: Sluice's socket to the client and its socket to the
/// server. An idle socket with SO_KEEPALIVE shows the keepalive timer in /proc/net/tcp.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_keepalive_covers_client_and_server_sockets() {
    for on in [true, false] {
        let pg = PgCluster::shared();
        let flag = if on { "true" } else { "false" };
        let sluice = SluiceHandle::start(ConfigBuilder::new(pg).set("tcp_keepalive", flag)).await;
        let client = sluice.connect("app", "appdb").await;
        // Sluice's end of its server connection, as PostgreSQL sees it.
        let row = client
            .query_one("select inet_client_port(), inet_server_port()", &[])
            .await
            .expect("ports");
        let port = |i| u16::try_from(row.get::<_, i32>(i)).expect("a TCP port");
        let (to_server, pg_port) = (port(0), port(1));
        let want = if on { 2 } else { 0 };
        let legs = [
            ("server", to_server, Some(pg_port)),
            ("client", sluice.port(), None),
        ];
        for (leg, local, remote) in legs {
            eventually(
                &format!("{leg} leg's timer {want} with tcp_keepalive = {on}"),
                Duration::from_secs(10),
                || async move { Ok((tcp_timers(local, remote) == [want]).then_some(())) },
            )
            .await
            .expect("timer");
        }
        drop(client);
        sluice.shutdown().await;
    }
}
