//! Prepared statements under transaction pooling: protocol-level names reused across
//! transactions and server connections, the per-server bound max_prepared_statements, name
//! errors (26000, 42P05), Parse errors, DEALLOCATE per client, and DDL changing a result type.

use std::time::Duration;

use sluice_tests::harness::raw::frontend;
use sluice_tests::harness::{BackendMessage, ConfigBuilder, PgCluster, RawClient, SluiceHandle};
use tokio::task::JoinSet;

use crate::util::{fresh_table, raw_trusted, simple_value, sqlstate};

const DISTINCT: i32 = 10;

/// 10 clients, pool of 2, each preparing 10 distinct statements once and running them many
/// times in separate transactions; no server backend ever holds more than 3 prepared statements.
#[tokio::test(flavor = "multi_thread")]
async fn named_statements_across_transactions_bounded_per_server() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .pool_size(2)
            .set("max_prepared_statements", "3"),
    )
    .await;
    let mut set = JoinSet::new();
    for c in 0..10i32 {
        let cfg = sluice.pg_config("app", "appdb");
        set.spawn(async move {
            let (mut client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let mut stmts = Vec::new();
            for k in 0..DISTINCT {
                stmts.push(
                    client
                        .prepare(&format!("select $1::int4 + {k}, 'k{k}'::text"))
                        .await?,
                );
            }
            let mut max_count = 0i64;
            for round in 0..5i32 {
                for (k, st) in stmts.iter().enumerate() {
                    let k = i32::try_from(k).expect("small");
                    let tx = client.transaction().await?;
                    let row = tx.query_one(st, &[&(c * 100 + round)]).await?;
                    assert_eq!(row.get::<_, i32>(0), c * 100 + round + k);
                    assert_eq!(row.get::<_, String>(1), format!("k{k}"));
                    // Same transaction, same backend: count its prepared statements.
                    let n = tx
                        .simple_query("select count(*) from pg_prepared_statements")
                        .await?;
                    let n: i64 = n
                        .iter()
                        .find_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).and_then(|v| v.parse().ok())
                            }
                            _ => None,
                        })
                        .expect("a count");
                    assert!(n <= 3, "client {c}: backend holds {n} prepared statements");
                    max_count = max_count.max(n);
                    tx.commit().await?;
                }
            }
            Ok::<_, tokio_postgres::Error>(max_count)
        });
    }
    let mut overall = 0;
    let run = async {
        while let Some(r) = set.join_next().await {
            overall = overall.max(r.expect("join").expect("client"));
        }
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("bounded");
    assert!(overall >= 1, "statements were prepared on the server");
    sluice.shutdown().await;
}

async fn exchange(raw: &mut RawClient, parts: &[Vec<u8>]) -> Vec<BackendMessage> {
    let bytes: Vec<u8> = parts.concat();
    raw.send(&bytes).await.expect("send");
    raw.recv_until_ready().await.expect("until ready")
}

fn kinds(msgs: &[BackendMessage]) -> String {
    msgs.iter().map(BackendMessage::kind).collect()
}

fn error_code(msgs: &[BackendMessage]) -> Option<String> {
    msgs.iter()
        .find(|m| m.tag == b'E')
        .and_then(BackendMessage::sqlstate)
}

async fn run_s1(raw: &mut RawClient, arg: &str) -> Vec<BackendMessage> {
    exchange(
        raw,
        &[
            frontend::bind("", "s1", &[Some(arg)]),
            frontend::execute("", 0),
            frontend::sync(),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn statement_names_errors_and_deallocate() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let mut a = raw_trusted(&sluice, "appdb", &[]).await;
    let mut b = raw_trusted(&sluice, "appdb", &[]).await;

    // A failed Parse leaves no mapping behind: the name is free afterwards.
    let m = exchange(
        &mut a,
        &[frontend::parse("s1", "selec 1", &[]), frontend::sync()],
    )
    .await;
    assert_eq!(kinds(&m), "EZ", "{m:?}");
    assert_eq!(error_code(&m).as_deref(), Some("42601"));
    let m = run_s1(&mut a, "1").await;
    assert_eq!(error_code(&m).as_deref(), Some("26000"), "{m:?}");
    let sql = "select $1::int4 * 10";
    let m = exchange(&mut a, &[frontend::parse("s1", sql, &[]), frontend::sync()]).await;
    assert_eq!(kinds(&m), "1Z", "{m:?}");
    let m = run_s1(&mut a, "4").await;
    assert_eq!(kinds(&m), "2DCZ", "{m:?}");
    assert_eq!(m[1].data_row(), Some(vec![Some("40".to_owned())]));

    // Duplicate name.
    let m = exchange(&mut a, &[frontend::parse("s1", sql, &[]), frontend::sync()]).await;
    assert_eq!(error_code(&m).as_deref(), Some("42P05"), "{m:?}");
    // Unknown name.
    let m = exchange(
        &mut a,
        &[
            frontend::bind("", "nosuch", &[]),
            frontend::execute("", 0),
            frontend::sync(),
        ],
    )
    .await;
    assert_eq!(kinds(&m), "EZ", "{m:?}");
    assert_eq!(error_code(&m).as_deref(), Some("26000"));
    let m = exchange(
        &mut a,
        &[frontend::describe(b'S', "nosuch"), frontend::sync()],
    )
    .await;
    assert_eq!(error_code(&m).as_deref(), Some("26000"), "{m:?}");

    // B has its own s1 with the same text.
    let m = exchange(&mut b, &[frontend::parse("s1", sql, &[]), frontend::sync()]).await;
    assert_eq!(kinds(&m), "1Z", "{m:?}");

    // DEALLOCATE affects only A.
    a.simple_rows("deallocate s1").await.expect("deallocate");
    let m = run_s1(&mut a, "1").await;
    assert_eq!(error_code(&m).as_deref(), Some("26000"), "{m:?}");
    let m = run_s1(&mut b, "5").await;
    assert_eq!(m[1].data_row(), Some(vec![Some("50".to_owned())]), "{m:?}");

    // A can reuse the name; Close and DEALLOCATE ALL / DISCARD ALL are per client as well.
    let m = exchange(&mut a, &[frontend::parse("s1", sql, &[]), frontend::sync()]).await;
    assert_eq!(kinds(&m), "1Z", "{m:?}");
    let m = exchange(&mut a, &[frontend::close(b'S', "s1"), frontend::sync()]).await;
    assert_eq!(kinds(&m), "3Z", "{m:?}");
    assert_eq!(
        error_code(&run_s1(&mut a, "1").await).as_deref(),
        Some("26000")
    );
    let m = exchange(&mut a, &[frontend::parse("s2", sql, &[]), frontend::sync()]).await;
    assert_eq!(kinds(&m), "1Z", "{m:?}");
    a.simple_rows("deallocate all")
        .await
        .expect("deallocate all");
    let m = exchange(
        &mut a,
        &[
            frontend::bind("", "s2", &[Some("1")]),
            frontend::execute("", 0),
            frontend::sync(),
        ],
    )
    .await;
    assert_eq!(error_code(&m).as_deref(), Some("26000"), "{m:?}");
    b.simple_rows("discard all").await.expect("discard all");
    assert_eq!(
        error_code(&run_s1(&mut b, "1").await).as_deref(),
        Some("26000")
    );
    let m = exchange(&mut a, &[frontend::parse("s1", sql, &[]), frontend::sync()]).await;
    assert_eq!(
        kinds(&m),
        "1Z",
        "A's s1 again after DISCARD ALL by B: {m:?}"
    );
    let m = run_s1(&mut a, "7").await;
    assert_eq!(m[1].data_row(), Some(vec![Some("70".to_owned())]), "{m:?}");
    sluice.shutdown().await;
}

/// After `alter table add column`, the old statement may fail once with 0A000; a new prepare
/// of the same text works and sees the new column.
#[tokio::test(flavor = "multi_thread")]
async fn ddl_result_change_then_reprepare() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "prep_ddl_a", "id int, label text").await;
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let c = sluice.connect("app", "appdb").await;
    c.execute("insert into prep_ddl_a values (1, 'one')", &[])
        .await
        .expect("insert");
    let text = "select * from prep_ddl_a";
    let st = c.prepare(text).await.expect("prepare");
    assert_eq!(st.columns().len(), 2);
    assert_eq!(c.query(&st, &[]).await.expect("run").len(), 1);

    c.batch_execute("alter table prep_ddl_a add column extra int default 7")
        .await
        .expect("alter");
    match c.query(&st, &[]).await {
        Err(e) => assert_eq!(sqlstate(&e), "0A000", "{e}"),
        Ok(rows) => assert_eq!(rows.len(), 1),
    }
    let st2 = c.prepare(text).await.expect("re-prepare after DDL");
    assert_eq!(st2.columns().len(), 3);
    let rows = c.query(&st2, &[]).await.expect("run new statement");
    assert_eq!(rows[0].get::<_, i32>(2), 7);
    // Still fine the next time.
    assert_eq!(c.query(&st2, &[]).await.expect("again").len(), 1);
    sluice.shutdown().await;
}

/// Client A's statement is on the (only) server connection when the DDL runs; client B then
/// prepares the same text and must get the new shape at once, without an error.
#[tokio::test(flavor = "multi_thread")]
async fn ddl_second_client_prepares_fresh_statement() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "prep_ddl_b", "id int, label text").await;
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let a = sluice.connect("app", "appdb").await;
    let b = sluice.connect("app", "appdb").await;
    a.execute("insert into prep_ddl_b values (1, 'one')", &[])
        .await
        .expect("insert");
    let text = "select * from prep_ddl_b";
    let st = a.prepare(text).await.expect("prepare");
    assert_eq!(a.query(&st, &[]).await.expect("run").len(), 1);

    let direct = pg.connect_direct("app", "appdb").await.expect("direct");
    direct
        .batch_execute("alter table prep_ddl_b add column extra int default 7")
        .await
        .expect("alter");

    let st_b = b.prepare(text).await.expect("B prepares after the DDL");
    assert_eq!(st_b.columns().len(), 3);
    let rows = b.query(&st_b, &[]).await.expect("B runs at once");
    assert_eq!(rows[0].get::<_, i32>(2), 7);

    // A: at most one 0A000, then a re-prepare works.
    match a.query(&st, &[]).await {
        Err(e) => assert_eq!(sqlstate(&e), "0A000", "{e}"),
        Ok(rows) => assert_eq!(rows.len(), 1),
    }
    let st_a = a.prepare(text).await.expect("A re-prepares");
    assert_eq!(st_a.columns().len(), 3);
    assert_eq!(a.query(&st_a, &[]).await.expect("A runs").len(), 1);
    assert_eq!(simple_value(&b, "select 1").await, "1");
    sluice.shutdown().await;
}
