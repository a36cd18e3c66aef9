//! The harness works end to end: PostgreSQL starts and a query goes through Sluice.

use sluice_tests::harness::{ConfigBuilder, PgCluster, SluiceHandle};

#[tokio::test]
async fn select_one_through_sluice() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg)).await;
    let client = sluice.connect("app", "appdb").await;
    let row = client
        .query_one("select 1::int4", &[])
        .await
        .expect("select 1");
    assert_eq!(row.get::<_, i32>(0), 1);
    drop(client);
    sluice.shutdown().await;
}
