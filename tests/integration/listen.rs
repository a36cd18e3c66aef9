//! Listeners: the optional unix socket serves clients like the TCP port does.

use sluice_tests::harness::{ConfigBuilder, PgCluster, SluiceHandle};

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
