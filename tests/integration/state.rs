//! Nothing dirty reaches the next client: session settings after an abandoned transaction or a
//! DISCARD ALL, a batch Sluice fails part-way, a server error in a batch that arrives in pieces,
//! and COPY FROM STDIN through the extended protocol. Every test runs on a pool of one, so the
//! next client gets the same server connection.

use std::time::Duration;

use futures_util::SinkExt;
use sluice_tests::harness::raw::frontend;
use sluice_tests::harness::{BackendMessage, PgCluster, RawClient, SluiceHandle};

use crate::util::{fresh_table, one_connection, raw_trusted};

const WAIT: Duration = Duration::from_secs(20);

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    let row = tokio::time::timeout(WAIT, client.query_one(&format!("show {setting}"), &[]))
        .await
        .expect("bounded")
        .unwrap_or_else(|e| panic!("show {setting}: {e}"));
    row.get(0)
}

/// A client whose startup options changed a setting opens a transaction and vanishes. The
/// rollback does not undo the settings sync (it ran before BEGIN), so the next client with the
/// earlier client's wishes must not be told the connection already matches them.
#[tokio::test(flavor = "multi_thread")]
async fn settings_of_an_abandoned_transaction_do_not_reach_the_next_client() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let plain = sluice.connect("app", "appdb").await;
    let default_path = show(&plain, "search_path").await;
    drop(plain);
    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.options("-c search_path=pg_catalog");
    let other = sluice
        .try_connect_with(cfg)
        .await
        .expect("client with options");
    other.batch_execute("begin").await.expect("begin");
    drop(other); // gone inside its transaction: Sluice rolls it back
    let next = sluice.connect("app", "appdb").await;
    assert_eq!(show(&next, "search_path").await, default_path);
    drop(next);
    sluice.shutdown().await;
}

/// DISCARD ALL is answered by Sluice (it would drop every mapped statement on the server), so
/// the server still has the client's settings: the next client must not inherit them.
#[tokio::test(flavor = "multi_thread")]
async fn settings_cleared_by_discard_all_do_not_reach_the_next_client() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let a = sluice.connect("app", "appdb").await;
    let default_mem = show(&a, "work_mem").await;
    a.batch_execute("set work_mem = '77MB'").await.expect("set");
    assert_eq!(show(&a, "work_mem").await, "77MB");
    a.batch_execute("discard all").await.expect("discard all");
    assert_eq!(show(&a, "work_mem").await, default_mem, "DISCARD ALL for a");
    drop(a);
    let b = sluice.connect("app", "appdb").await;
    assert_eq!(show(&b, "work_mem").await, default_mem, "the next client");
    drop(b);
    sluice.shutdown().await;
}

/// A batch that Sluice fails part-way (here a Bind of a statement the client never prepared)
/// fails as a whole, as PostgreSQL would fail it: the INSERT earlier in the same batch must not
/// commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_sluice_fails_part_way_does_not_commit_its_earlier_statements() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "state_batch", "n int").await;
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let batch = [
        frontend::parse("", "insert into state_batch values (1)", &[]),
        frontend::bind("", "", &[]),
        frontend::execute("", 0),
        frontend::bind("", "never_prepared", &[]),
        frontend::execute("", 0),
        frontend::sync(),
    ]
    .concat();
    raw.send(&batch).await.expect("send");
    let msgs = raw.recv_until_ready().await.expect("answers");
    let err = msgs.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(
        err.sqlstate().as_deref(),
        Some("26000"),
        "{:?}",
        err.message()
    );
    assert_eq!(msgs.last().and_then(|m| m.ready_status()), Some(b'I'));
    let rows = raw
        .simple_rows("select count(*) from state_batch")
        .await
        .expect("count");
    assert_eq!(
        rows,
        vec![vec![Some("0".to_owned())]],
        "the INSERT rolled back"
    );
    // Inside a transaction block, the block is failed, as PostgreSQL would leave it.
    raw.simple_rows("begin").await.expect("begin");
    let batch = [
        frontend::bind("", "never_prepared", &[]),
        frontend::execute("", 0),
        frontend::sync(),
    ]
    .concat();
    raw.send(&batch).await.expect("send");
    let msgs = raw.recv_until_ready().await.expect("answers");
    assert_eq!(msgs.last().and_then(|m| m.ready_status()), Some(b'E'));
    raw.simple_rows("rollback").await.expect("rollback");
    raw.terminate().await.expect("terminate");
    sluice.shutdown().await;
}

/// A server error in a batch whose Sync has not arrived yet: the server skips the rest of the
/// batch, so what the client sends next (before its Sync) must not wait for answers. The batch
/// ends with one ReadyForQuery, the next query gets its own answer, and the connection is
/// released.
#[tokio::test(flavor = "multi_thread")]
async fn an_error_before_the_sync_keeps_the_answers_in_step() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "state_unique", "n int primary key").await;
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    raw.simple_rows("insert into state_unique values (1)")
        .await
        .expect("seed");
    // First half: a unique violation, flushed so the error comes back before the Sync is sent.
    let first = [
        frontend::parse("", "insert into state_unique values (1)", &[]),
        frontend::bind("", "", &[]),
        frontend::execute("", 0),
        frontend::flush(),
    ]
    .concat();
    raw.send(&first).await.expect("send");
    let msgs = raw.recv_until(b'E').await.expect("the error");
    assert_eq!(
        msgs.last().and_then(|m| m.sqlstate()).as_deref(),
        Some("23505")
    );
    // Second half: more work, then the Sync. PostgreSQL skips it all up to the Sync.
    let rest = [
        frontend::parse("", "select 42", &[]),
        frontend::bind("", "", &[]),
        frontend::execute("", 0),
        frontend::sync(),
    ]
    .concat();
    raw.send(&rest).await.expect("send");
    let msgs = raw.recv_until_ready().await.expect("ready");
    let tags: Vec<char> = msgs.iter().map(|m| m.tag as char).collect();
    assert_eq!(
        tags,
        ['Z'],
        "only ReadyForQuery answers the skipped messages"
    );
    let rows = raw.simple_rows("select 7").await.expect("next query");
    assert_eq!(rows, vec![vec![Some("7".to_owned())]]);
    // Released: another client gets the pool's only connection.
    let other = sluice.connect("app", "appdb").await;
    let one: i32 = tokio::time::timeout(WAIT, other.query_one("select 1", &[]))
        .await
        .expect("bounded")
        .expect("the connection was released")
        .get(0);
    assert_eq!(one, 1);
    raw.terminate().await.expect("terminate");
    drop(other);
    sluice.shutdown().await;
}

/// COPY FROM STDIN through the extended protocol (tokio-postgres, like libpq, sends a Sync
/// right after the Execute, which PostgreSQL ignores in copy-in mode): the rows arrive, and the
/// connection is released afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn copy_in_through_the_extended_protocol_releases_the_connection() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "state_copy", "n int").await;
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let a = sluice.connect("app", "appdb").await;
    let sink = a
        .copy_in("copy state_copy from stdin")
        .await
        .expect("copy in");
    tokio::pin!(sink);
    for n in 1..=3 {
        sink.send(bytes::Bytes::from(format!("{n}\n")))
            .await
            .expect("row");
    }
    let copied = sink.finish().await.expect("copy done");
    assert_eq!(copied, 3);
    let sum: i64 = a
        .query_one("select sum(n) from state_copy", &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(sum, 6);
    let b = sluice.connect("app", "appdb").await;
    let n: i64 = tokio::time::timeout(WAIT, b.query_one("select count(*) from state_copy", &[]))
        .await
        .expect("bounded")
        .expect("the connection was released after the COPY")
        .get(0);
    assert_eq!(n, 3);
    drop((a, b));
    sluice.shutdown().await;
}

/// A COMMIT pipelined right before Terminate still commits, as it does against PostgreSQL:
/// the server finishes what the client sent before leaving.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_pipelined_before_terminate_commits() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "state_commit", "n int").await;
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    raw.simple_rows("begin").await.expect("begin");
    let last = [
        frontend::query("insert into state_commit values (1)"),
        frontend::query("commit"),
        frontend::terminate(),
    ]
    .concat();
    raw.send(&last).await.expect("send");
    drop(raw);
    let check = sluice.connect("app", "appdb").await;
    sluice_tests::harness::eventually("the pipelined COMMIT", WAIT, || async {
        let n: i64 = check
            .query_one("select count(*) from state_commit", &[])
            .await?
            .get(0);
        Ok((n == 1).then_some(()))
    })
    .await
    .expect("the row committed");
    drop(check);
    sluice.shutdown().await;
}

/// Sends two simple queries in one write, then reads the answers to each.
async fn pipelined(
    raw: &mut RawClient,
    first: &str,
    second: &str,
) -> (Vec<BackendMessage>, Vec<BackendMessage>) {
    let both = [frontend::query(first), frontend::query(second)].concat();
    raw.send(&both).await.expect("send");
    let a = raw.recv_until_ready().await.expect(first);
    let b = raw.recv_until_ready().await.expect(second);
    (a, b)
}

/// A DISCARD ALL pipelined right after BEGIN fails as it does against PostgreSQL (25001: it
/// cannot run inside a transaction block) instead of being answered as if no block were open;
/// pipelined after a statement that opens no block, Sluice answers it.
#[tokio::test(flavor = "multi_thread")]
async fn a_discard_all_pipelined_after_begin_fails_as_in_a_block() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let (begin, discard) = pipelined(&mut raw, "begin", "discard all").await;
    assert_eq!(begin.last().and_then(|m| m.ready_status()), Some(b'T'));
    let codes: Vec<String> = discard.iter().filter_map(|m| m.sqlstate()).collect();
    assert_eq!(codes, ["25001"], "{discard:?}");
    assert_eq!(discard.last().and_then(|m| m.ready_status()), Some(b'E'));
    raw.simple_rows("rollback").await.expect("rollback");
    let (_, discard) = pipelined(&mut raw, "select 1", "discard all").await;
    let tags: Vec<String> = discard.iter().filter_map(|m| m.command_tag()).collect();
    assert_eq!(tags, ["DISCARD ALL"]);
    assert_eq!(discard.last().and_then(|m| m.ready_status()), Some(b'I'));
    raw.terminate().await.expect("terminate");
    sluice.shutdown().await;
}

/// A DEALLOCATE that Sluice answers itself, pipelined after BEGIN, reports the transaction
/// status the server has by then ('T'), not the one from before the BEGIN.
#[tokio::test(flavor = "multi_thread")]
async fn a_locally_answered_command_after_begin_reports_the_open_transaction() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let mut raw = raw_trusted(&sluice, "appdb", &[]).await;
    let (begin, dealloc) = pipelined(&mut raw, "begin", "deallocate all").await;
    assert_eq!(begin.last().and_then(|m| m.ready_status()), Some(b'T'));
    let tags: Vec<String> = dealloc.iter().filter_map(|m| m.command_tag()).collect();
    assert_eq!(tags, ["DEALLOCATE ALL"]);
    assert_eq!(dealloc.last().and_then(|m| m.ready_status()), Some(b'T'));
    raw.simple_rows("rollback").await.expect("rollback");
    raw.terminate().await.expect("terminate");
    sluice.shutdown().await;
}
