//! Protocol coverage through Sluice: simple and extended queries, pipelined batches with several
//! Syncs, multi-statement simple queries, failed transactions holding their connection, COPY in
//! and out, NOTICE and NOTIFY passthrough, and a large streamed result.

use std::time::Duration;

use sluice_tests::harness::raw::frontend;
use sluice_tests::harness::{BackendMessage, ConfigBuilder, PgCluster, SluiceHandle};
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

use crate::util::{connect_with_messages, fresh_table, raw_trusted, sqlstate, wait_queued};

fn kinds(msgs: &[BackendMessage]) -> String {
    msgs.iter().map(BackendMessage::kind).collect()
}

fn rows(msgs: &[BackendMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter().filter_map(BackendMessage::data_row).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn simple_extended_and_pipelined_queries() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(2)).await;
    let c = sluice.connect("app", "appdb").await;

    let simple = c.simple_query("select 'a'::text, 2").await.expect("simple");
    let row = simple
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((r.get(0).map(str::to_owned), r.get(1).map(str::to_owned)))
            }
            _ => None,
        })
        .expect("a row");
    assert_eq!(row, (Some("a".into()), Some("2".into())));
    let x: i32 = c
        .query_one("select $1::int4 * 2", &[&21i32])
        .await
        .expect("extended")
        .get(0);
    assert_eq!(x, 42);

    // Pipelined by tokio-postgres: each query has its own Sync; the failing one in the middle
    // must not disturb the others.
    let (r1, r2, r3, r4) = tokio::join!(
        c.query_one("select $1::int4 + 1", &[&1i32]),
        c.query_one("select 1/0", &[]),
        c.query("select g from generate_series(1, 100) g", &[]),
        c.query_one("select $1::text || 'x'", &[&"a"]),
    );
    assert_eq!(r1.expect("r1").get::<_, i32>(0), 2);
    assert_eq!(sqlstate(&r2.expect_err("division by zero")), "22012");
    let r3 = r3.expect("r3");
    assert_eq!(r3.len(), 100);
    assert_eq!(r3[99].get::<_, i32>(0), 100);
    assert_eq!(r4.expect("r4").get::<_, String>(0), "ax");

    // Multi-statement simple query.
    let msgs = c.simple_query("select 1; select 2").await.expect("multi");
    let values: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "2"]);
    let completes = msgs
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
        .count();
    assert_eq!(completes, 2);
    sluice.shutdown().await;
}

/// Exact bytes: four batches in one write (extended, extended failing, simple, extended).
#[tokio::test(flavor = "multi_thread")]
async fn raw_pipeline_with_several_syncs() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let mut batch = Vec::new();
    // random() keeps the planner from folding 1/0 at Bind time: the error comes from Execute.
    for (sql, arg) in [
        ("select $1::int4 * 2", "21"),
        ("select 1/($1::int4 + (random() * 0)::int4)", "0"),
    ] {
        batch.extend(frontend::parse("", sql, &[]));
        batch.extend(frontend::bind("", "", &[Some(arg)]));
        batch.extend(frontend::execute("", 0));
        batch.extend(frontend::sync());
    }
    batch.extend(frontend::query("select 'after'"));
    batch.extend(frontend::parse("", "select 7", &[]));
    batch.extend(frontend::bind("", "", &[]));
    batch.extend(frontend::execute("", 0));
    batch.extend(frontend::sync());
    raw.send(&batch).await.expect("send batch");

    let first = raw.recv_until_ready().await.expect("first");
    assert_eq!(kinds(&first), "12DCZ");
    assert_eq!(rows(&first), vec![vec![Some("42".to_owned())]]);
    let second = raw.recv_until_ready().await.expect("second");
    assert_eq!(kinds(&second), "12EZ", "{second:?}");
    assert_eq!(second[2].sqlstate().as_deref(), Some("22012"));
    assert_eq!(second[3].ready_status(), Some(b'I'));
    let third = raw.recv_until_ready().await.expect("third");
    assert_eq!(kinds(&third), "TDCZ");
    assert_eq!(rows(&third), vec![vec![Some("after".to_owned())]]);
    let fourth = raw.recv_until_ready().await.expect("fourth");
    assert_eq!(kinds(&fourth), "12DCZ");
    assert_eq!(rows(&fourth), vec![vec![Some("7".to_owned())]]);
    raw.terminate().await.expect("terminate");
    sluice.shutdown().await;
}

/// An error inside a transaction leaves status E; the client keeps its server connection (the
/// other client on a pool of one waits) until ROLLBACK.
#[tokio::test(flavor = "multi_thread")]
async fn failed_transaction_holds_connection_until_rollback() {
    let pg = PgCluster::shared();
    let sluice =
        SluiceHandle::start(crate::util::with_stats(ConfigBuilder::new(pg).pool_size(1))).await;
    let mut a = raw_trusted(&sluice, "appdb", &[]).await;
    let b = sluice.connect("trusted", "appdb").await;

    a.query("begin").await.expect("begin");
    let m = a.recv_until_ready().await.expect("begin");
    assert_eq!(m.last().and_then(BackendMessage::ready_status), Some(b'T'));
    a.query("select 1/0").await.expect("send");
    let m = a.recv_until_ready().await.expect("error");
    assert_eq!(kinds(&m), "EZ");
    assert_eq!(m[0].sqlstate().as_deref(), Some("22012"));
    assert_eq!(m[1].ready_status(), Some(b'E'));

    let b_task = tokio::spawn(async move { b.simple_query("select 1").await.map(|_| b) });
    wait_queued(&sluice, "appdb", "trusted", 1).await;

    a.query("select 1").await.expect("send");
    let m = a.recv_until_ready().await.expect("aborted");
    assert_eq!(m[0].sqlstate().as_deref(), Some("25P02"));
    assert_eq!(m.last().and_then(BackendMessage::ready_status), Some(b'E'));
    assert!(
        !b_task.is_finished(),
        "B waits while A's failed transaction is open"
    );

    a.query("rollback").await.expect("send");
    let m = a.recv_until_ready().await.expect("rollback");
    assert_eq!(m.last().and_then(BackendMessage::ready_status), Some(b'I'));
    tokio::time::timeout(Duration::from_secs(10), b_task)
        .await
        .expect("B proceeds after ROLLBACK")
        .expect("join")
        .expect("B's query");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_and_out() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "proto_copy_t", "id int, label text").await;
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;

    raw.query("copy proto_copy_t from stdin")
        .await
        .expect("copy in");
    let g = raw.recv().await.expect("CopyInResponse");
    assert_eq!(g.kind(), 'G', "{g:?}");
    for line in ["1\tone\n", "2\ttwo\n", "3\tthree\n"] {
        raw.send(&frontend::message(b'd', line.as_bytes()))
            .await
            .expect("CopyData");
    }
    raw.send(&frontend::message(b'c', &[]))
        .await
        .expect("CopyDone");
    let m = raw.recv_until_ready().await.expect("copy in done");
    assert_eq!(kinds(&m), "CZ", "{m:?}");
    assert_eq!(m[0].command_tag().as_deref(), Some("COPY 3"));

    // A failed COPY IN (CopyFail) is an error and changes nothing.
    raw.query("copy proto_copy_t from stdin")
        .await
        .expect("copy in");
    assert_eq!(raw.recv().await.expect("G").kind(), 'G');
    raw.send(&frontend::message(b'd', b"4\tfour\n"))
        .await
        .expect("data");
    raw.send(&frontend::message(b'f', b"client gave up\0"))
        .await
        .expect("CopyFail");
    let m = raw.recv_until_ready().await.expect("copy fail");
    assert_eq!(kinds(&m), "EZ", "{m:?}");
    assert_eq!(m[0].sqlstate().as_deref(), Some("57014"));

    raw.query("copy (select id, label from proto_copy_t order by id) to stdout")
        .await
        .expect("copy out");
    let m = raw.recv_until_ready().await.expect("copy out done");
    assert_eq!(kinds(&m), "HdddcCZ", "{m:?}");
    let data: Vec<u8> = m
        .iter()
        .filter(|x| x.tag == b'd')
        .flat_map(|x| x.body.to_vec())
        .collect();
    assert_eq!(String::from_utf8_lossy(&data), "1\tone\n2\ttwo\n3\tthree\n");
    assert_eq!(m[5].command_tag().as_deref(), Some("COPY 3"));

    // A tokio-postgres client on the same (single) server connection sees exactly 3 rows.
    let c = sluice.connect("trusted", "appdb").await;
    let n: i64 = c
        .query_one("select count(*) from proto_copy_t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notice_and_notify_pass_through() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let (c, mut rx) = connect_with_messages(sluice.pg_config("app", "appdb"))
        .await
        .expect("connect");

    c.batch_execute("do $$ begin raise notice 'hello %', 42; end $$")
        .await
        .expect("do block");
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notice arrives")
        .expect("channel open");
    match m {
        AsyncMessage::Notice(n) => {
            assert_eq!(n.message(), "hello 42");
            assert_eq!(n.severity(), "NOTICE");
        }
        other => panic!("expected a notice, got {other:?}"),
    }

    c.batch_execute("begin").await.expect("begin");
    c.batch_execute("listen proto_chan").await.expect("listen");
    c.batch_execute("notify proto_chan, 'payload-1'")
        .await
        .expect("notify");
    c.batch_execute("commit").await.expect("commit");
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification arrives")
        .expect("channel open");
    match m {
        AsyncMessage::Notification(n) => {
            assert_eq!(n.channel(), "proto_chan");
            assert_eq!(n.payload(), "payload-1");
        }
        other => panic!("expected a notification, got {other:?}"),
    }
    c.batch_execute("unlisten *").await.expect("unlisten");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_result_is_streamed_whole() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let c = sluice.connect("app", "appdb").await;
    let rows = tokio::time::timeout(
        Duration::from_secs(120),
        c.query(
            "select repeat('x', 1000000) from generate_series(1, 50)",
            &[],
        ),
    )
    .await
    .expect("bounded")
    .expect("large query");
    assert_eq!(rows.len(), 50);
    let total: usize = rows.iter().map(|r| r.get::<_, &str>(0).len()).sum();
    assert_eq!(total, 50_000_000);
    // The connection is still in step afterwards.
    let one: i32 = c.query_one("select 1", &[]).await.expect("after").get(0);
    assert_eq!(one, 1);
    sluice.shutdown().await;
}
