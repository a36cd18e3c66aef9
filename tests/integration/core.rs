//! Core pooling: many clients over a small pool with exact results, and two clients taking turns
//! on a pool of one.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_tests::harness::{ConfigBuilder, PgCluster, SluiceHandle};
use tokio::task::JoinSet;

use crate::util::{backends_of, create_database, fresh_table, superuser, wait_queued, with_stats};

const CLIENTS: i32 = 200;
const TXNS: i32 = 20;
const POOL: i64 = 5;
const USER: &str = "md5user";

/// 200 clients, 20 transactions each, over a pool of 5: every transaction sees its own writes,
/// the final counts are exact, and PostgreSQL never sees more than 5 connections for the pool.
///
/// The clients log in as `md5user`: 200 SCRAM proofs computed by unoptimised tokio-postgres in
/// this very process would starve the runtime Sluice shares with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_clients_over_small_pool() {
    let pg = PgCluster::shared();
    create_database(pg, "core_many");
    let sluice = SluiceHandle::start(
        ConfigBuilder::new(pg)
            .database("core_many", "core_many")
            .pool_size(POOL as u32),
    )
    .await;
    fresh_table(
        pg,
        "core_many",
        "core_many_t",
        "client int not null, seq int not null",
    )
    .await;

    // Sample pg_stat_activity while the clients run.
    let su = superuser(pg).await;
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (stop, max_seen) = (stop.clone(), max_seen.clone());
        tokio::spawn(async move {
            // Bounded: the run itself is bounded by the timeout below.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = backends_of(&su, "core_many", USER).await;
                max_seen.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut set = JoinSet::new();
    for c in 0..CLIENTS {
        let cfg = sluice.pg_config(USER, "core_many");
        set.spawn(async move {
            let (mut client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            for i in 0..TXNS {
                let tx = client.transaction().await?;
                tx.execute("insert into core_many_t values ($1, $2)", &[&c, &i])
                    .await?;
                let n: i64 = tx
                    .query_one("select count(*) from core_many_t where client = $1", &[&c])
                    .await?
                    .get(0);
                assert_eq!(n, i64::from(i) + 1, "client {c} txn {i} sees its own rows");
                tx.commit().await?;
            }
            Ok::<_, tokio_postgres::Error>(c)
        });
    }
    let run = async {
        let mut done = 0;
        while let Some(r) = set.join_next().await {
            r.expect("client task panicked").expect("client failed");
            done += 1;
        }
        done
    };
    let done = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("200 clients finish within 240 s");
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    assert_eq!(done, CLIENTS);

    let check = sluice.connect(USER, "core_many").await;
    let total: i64 = check
        .query_one("select count(*) from core_many_t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(total, i64::from(CLIENTS * TXNS));
    let per_client = check
        .query(
            "select client, count(*), count(distinct seq) from core_many_t group by client",
            &[],
        )
        .await
        .expect("per client");
    assert_eq!(per_client.len(), CLIENTS as usize);
    for row in per_client {
        assert_eq!(row.get::<_, i64>(1), i64::from(TXNS));
        assert_eq!(row.get::<_, i64>(2), i64::from(TXNS));
    }
    let max = max_seen.load(Ordering::Relaxed);
    assert!(max >= 1, "the sampler saw the pool's connections");
    assert!(
        max <= POOL,
        "at most {POOL} server connections to core_many, saw {max}"
    );
    drop(check);
    sluice.shutdown().await;
}

/// Pool of one: while A holds a transaction, B's query waits; A keeps working; after A commits
/// B runs and sees A's committed row.
#[tokio::test(flavor = "multi_thread")]
async fn two_clients_take_turns_on_pool_of_one() {
    let pg = PgCluster::shared();
    fresh_table(pg, "appdb", "core_turns_t", "v int").await;
    let sluice = SluiceHandle::start(with_stats(ConfigBuilder::new(pg).pool_size(1))).await;
    let a = sluice.connect("app", "appdb").await;
    let b = sluice.connect("app", "appdb").await;

    a.batch_execute("begin").await.expect("begin");
    a.execute("insert into core_turns_t values (1)", &[])
        .await
        .expect("insert");
    let mut b_task = tokio::spawn(async move {
        let n: i64 = b
            .query_one("select count(*) from core_turns_t", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>((b, n))
    });
    wait_queued(&sluice, "appdb", "app", 1).await;

    // A is not disturbed by the queued client.
    let mine: i64 = a
        .query_one("select count(*) from core_turns_t", &[])
        .await
        .expect("a counts")
        .get(0);
    assert_eq!(mine, 1);
    assert!(
        !b_task.is_finished(),
        "B must wait while A holds the only connection"
    );
    a.batch_execute("commit").await.expect("commit");

    let (b, n) = tokio::time::timeout(Duration::from_secs(10), &mut b_task)
        .await
        .expect("B proceeds after A commits")
        .expect("join")
        .expect("B's query");
    assert_eq!(n, 1, "B ran after A's commit");

    // And the other way round.
    b.batch_execute("begin; insert into core_turns_t values (2)")
        .await
        .expect("b begins");
    let a_task = tokio::spawn(async move {
        a.query_one("select count(*) from core_turns_t", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    wait_queued(&sluice, "appdb", "app", 1).await;
    b.batch_execute("commit").await.expect("b commits");
    let n = tokio::time::timeout(Duration::from_secs(10), a_task)
        .await
        .expect("A proceeds")
        .expect("join")
        .expect("A's query");
    assert_eq!(n, 2);
    drop(b);
    sluice.shutdown().await;
}
