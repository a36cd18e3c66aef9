//! The pool scheduler through the proxy: class priority, class quotas, shedding after max_wait,
//! per-key limits, client-connection caps and the queued NOTICE.

use std::time::{Duration, Instant};

use sluice_tests::harness::ops::{
    connect_app, connect_with_notices, db_error_text, plugin_toml, sqlstate, ActivitySampler,
    AdminConsole,
};
use sluice_tests::harness::{eventually, ConfigBuilder, PgCluster, SluiceHandle};

use crate::policy::RELAXED_POLICY;

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);
/// The pool every test here uses.
const POOL: &str = "appdb.app";

fn base(pg: &PgCluster) -> ConfigBuilder {
    ConfigBuilder::new(pg).set("admin_users", r#"["app"]"#)
}

/// Opens a transaction on `c` that holds a server connection until committed.
async fn hold(c: &tokio_postgres::Client) {
    c.batch_execute("begin; select 1")
        .await
        .expect("open a holding transaction");
}

/// Waits until `SHOW CLASSES` reports `n` waiters of `class` in [`POOL`].
async fn wait_for_waiters(admin: &AdminConsole, class: &str, n: u64) {
    eventually(&format!("{n} waiters of class {class}"), WAIT, || async {
        Ok((admin.class_waiting(POOL, class).await? == n).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn higher_class_gets_the_next_connection_before_earlier_low_waiters() {
    let pg = PgCluster::shared();
    let b = base(pg)
        .pool_size(2)
        .append("[classes.low]\npriority = 0\n[classes.high]\npriority = 100\n")
        .append("[scheduler]\naging_per_sec = 0\n")
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "priority",
            "priority",
            "closed",
            &[
                r#"match = "application""#,
                r#"high = "sch-high*""#,
                r#"low = "sch-low*""#,
            ],
        ));
    let sluice = SluiceHandle::start(b).await;
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let setup = connect_app(&sluice, "app", "appdb", "sch-low-setup")
        .await
        .expect("setup");
    setup
        .batch_execute("create table sch_order (id bigserial primary key, label text not null)")
        .await
        .expect("create sch_order");

    // Two low-class holders saturate the pool of 2.
    let h1 = connect_app(&sluice, "app", "appdb", "sch-low-holder")
        .await
        .expect("h1");
    let h2 = connect_app(&sluice, "app", "appdb", "sch-low-holder")
        .await
        .expect("h2");
    hold(&h1).await;
    hold(&h2).await;
    eventually("both server connections busy", WAIT, || async {
        Ok((admin.pool_number("appdb", "app", "sv_active").await? == 2).then_some(()))
    })
    .await
    .expect("saturated");

    // Three low waiters queue first, one after the other...
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let c = connect_app(&sluice, "app", "appdb", &format!("sch-low-{i}"))
            .await
            .expect("low");
        tasks.push(tokio::spawn(async move {
            c.batch_execute(&format!("insert into sch_order(label) values ('low-{i}')"))
                .await
                .map_err(|e| db_error_text(&e))
        }));
        wait_for_waiters(&admin, "low", i + 1).await;
    }
    // ...then a high-class client arrives.
    let hi = connect_app(&sluice, "app", "appdb", "sch-high-1")
        .await
        .expect("high");
    tasks.push(tokio::spawn(async move {
        hi.batch_execute("insert into sch_order(label) values ('high')")
            .await
            .map_err(|e| db_error_text(&e))
    }));
    wait_for_waiters(&admin, "high", 1).await;

    // One connection comes free; h2 keeps the other, so the waiters run one at a time and the
    // table's ids record the order they were served in.
    h1.batch_execute("commit").await.expect("commit h1");
    for t in tasks {
        let r = tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .expect("join");
        r.unwrap_or_else(|e| panic!("waiter failed: {e}"));
    }
    h2.batch_execute("commit").await.expect("commit h2");
    let rows = setup
        .query("select label from sch_order order by id", &[])
        .await
        .expect("read order");
    let order: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        order,
        ["high", "low-0", "low-1", "low-2"],
        "service order: the high-class waiter must go first, then the low ones FIFO"
    );
    setup
        .batch_execute("drop table sch_order")
        .await
        .expect("drop");
    drop((admin, setup, h1, h2));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn class_max_active_quota_holds() {
    let pg = PgCluster::shared();
    const APP: &str = "sch-quota";
    let b = base(pg)
        .pool_size(5)
        .user_set("app", "class", "\"batch\"")
        .append("[classes.batch]\nmax_active = 2\n");
    let sluice = SluiceHandle::start(b).await;
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(
            connect_app(&sluice, "app", "appdb", APP)
                .await
                .expect("connect"),
        );
    }
    let sampler = ActivitySampler::start(pg, APP).await.expect("sampler");
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            c.simple_query("select pg_sleep(0.2)")
                .await
                .map(|_| ())
                .map_err(|e| db_error_text(&e))
        }));
    }
    // While they run, the console shows the quota and the queue behind it.
    let seen_waiting = eventually("batch waiters behind the quota", WAIT, || async {
        let row = admin.class_row(POOL, "batch").await?;
        Ok(row.filter(|r| r["waiting"] != "0"))
    })
    .await
    .expect("SHOW CLASSES");
    assert_eq!(seen_waiting["max_active"], "2", "{seen_waiting:?}");
    for t in tasks {
        let r = tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .expect("join");
        r.unwrap_or_else(|e| panic!("batch transaction failed: {e}"));
    }
    let (max, samples) = sampler.finish().await.expect("sampler");
    assert!(samples > 0);
    assert_eq!(
        max, 2,
        "most active batch backends at once ({samples} samples); max_active is 2"
    );
    drop(admin);
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_past_max_wait_is_shed_with_53300_naming_the_class() {
    let pg = PgCluster::shared();
    // Same pool, two classes: the holder is `default` (no wait budget), so its own first login,
    // which opens the pool's first server connection, is never shed; the waiter is `batch`.
    let b = base(pg)
        .pool_size(1)
        .append("[classes.batch]\nmax_wait = \"200ms\"\n")
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "priority",
            "priority",
            "closed",
            &[r#"match = "application""#, r#"batch = "sch-shed*""#],
        ));
    let sluice = SluiceHandle::start(b).await;
    let holder = connect_app(&sluice, "app", "appdb", "sch-holder")
        .await
        .expect("holder");
    hold(&holder).await;
    // A login while the pool is saturated (the pool already knows the server's parameters).
    let waiter = connect_app(&sluice, "app", "appdb", "sch-shed")
        .await
        .unwrap_or_else(|e| panic!("login while the pool is busy: {}", db_error_text(&e)));
    let started = Instant::now();
    let e = waiter
        .simple_query("select 1")
        .await
        .map(|_| ())
        .expect_err("the waiter must be shed");
    let waited = started.elapsed();
    let text = db_error_text(&e);
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{text}");
    assert!(
        text.contains("\"batch\""),
        "message should name the class: {text}"
    );
    let ms: u64 = text
        .split("waited ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("message should say how long it waited: {text}"));
    assert!(ms >= 200, "shed after {ms} ms, before max_wait: {text}");
    assert!(
        waited >= Duration::from_millis(200),
        "shed after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "shed only after {waited:?}"
    );

    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let row = admin
        .class_row(POOL, "batch")
        .await
        .expect("SHOW CLASSES")
        .expect("batch row");
    assert_ne!(row["shed"], "0", "{row:?}");
    // The shed client stays connected and is served once the pool frees up.
    holder.batch_execute("commit").await.expect("commit");
    waiter
        .simple_query("select 1")
        .await
        .expect("served after the holder commits");
    drop((admin, holder, waiter));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_max_active_holds_under_concurrency() {
    let pg = PgCluster::shared();
    const APP: &str = "sch-key-addr";
    // Every client comes from 127.0.0.1: one key, `addr:127.0.0.1`, for all of them.
    let b = base(pg)
        .pool_size(8)
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "client-limits",
            "client-limits",
            "closed",
            &[r#"key = "addr""#, "max_active = 3"],
        ));
    let sluice = SluiceHandle::start(b).await;
    let mut clients = Vec::new();
    for _ in 0..9 {
        clients.push(
            connect_app(&sluice, "app", "appdb", APP)
                .await
                .expect("connect"),
        );
    }
    let sampler = ActivitySampler::start(pg, APP).await.expect("sampler");
    let mut tasks = Vec::new();
    for c in clients {
        tasks.push(tokio::spawn(async move {
            for _ in 0..2 {
                c.simple_query("select pg_sleep(0.1)")
                    .await
                    .map_err(|e| db_error_text(&e))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .expect("join");
        r.unwrap_or_else(|e| panic!("keyed transaction failed: {e}"));
    }
    let (max, samples) = sampler.finish().await.expect("sampler");
    assert!(samples > 0);
    assert_eq!(
        max, 3,
        "most active backends for one key ({samples} samples); key_max_active is 3"
    );
    sluice.shutdown().await;
}

/// Asserts that a login fails with FATAL 53300 and a message containing `needle`.
fn assert_refused_53300(r: Result<tokio_postgres::Client, tokio_postgres::Error>, needle: &str) {
    match r {
        Ok(_) => panic!("login should be refused ({needle})"),
        Err(e) => {
            assert_eq!(
                sqlstate(&e).as_deref(),
                Some("53300"),
                "{}",
                db_error_text(&e)
            );
            assert!(db_error_text(&e).contains(needle), "{}", db_error_text(&e));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_addr_client_connections_refuses_with_53300() {
    let pg = PgCluster::shared();
    let b = base(pg).set("max_addr_client_connections", "3");
    let sluice = SluiceHandle::start(b).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(
            connect_app(&sluice, "app", "appdb", &format!("sch-addr-{i}"))
                .await
                .unwrap_or_else(|e| panic!("client {i}: {}", db_error_text(&e))),
        );
    }
    assert_refused_53300(
        connect_app(&sluice, "app", "appdb", "sch-addr-x").await,
        "max_addr_client_connections",
    );
    // The admitted ones keep working; once one leaves, a new client gets in.
    clients[0]
        .simple_query("select 1")
        .await
        .expect("admitted client works");
    drop(clients.pop());
    let again = eventually("a free slot for 127.0.0.1", WAIT, || async {
        Ok(connect_app(&sluice, "app", "appdb", "sch-addr-y")
            .await
            .ok())
    })
    .await
    .expect("slot freed");
    again.simple_query("select 1").await.expect("works");
    drop((clients, again));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_app_client_connections_refuses_with_53300() {
    let pg = PgCluster::shared();
    let b = base(pg).set("max_app_client_connections", "2");
    let sluice = SluiceHandle::start(b).await;
    let a1 = connect_app(&sluice, "app", "appdb", "sch-capped")
        .await
        .expect("a1");
    let a2 = connect_app(&sluice, "md5user", "appdb", "sch-capped")
        .await
        .expect("a2");
    assert_refused_53300(
        connect_app(&sluice, "app", "appdb", "sch-capped").await,
        "max_app_client_connections",
    );
    // Another application is not affected.
    let other = connect_app(&sluice, "app", "appdb", "sch-uncapped")
        .await
        .expect("other app");
    other
        .simple_query("select 1")
        .await
        .expect("other app works");
    drop((a1, a2, other));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_key_max_clients_refuses_with_53300() {
    let pg = PgCluster::shared();
    let b = base(pg).append(RELAXED_POLICY).append(&plugin_toml(
        "client-limits",
        "client-limits",
        "closed",
        &[r#"key = "application""#, "max_clients = 2"],
    ));
    let sluice = SluiceHandle::start(b).await;
    let a1 = connect_app(&sluice, "app", "appdb", "sch-keyed")
        .await
        .expect("a1");
    let a2 = connect_app(&sluice, "app", "appdb", "sch-keyed")
        .await
        .expect("a2");
    assert_refused_53300(
        connect_app(&sluice, "app", "appdb", "sch-keyed").await,
        "sch-keyed",
    );
    let other = connect_app(&sluice, "app", "appdb", "sch-keyed-other")
        .await
        .expect("other key");
    other
        .simple_query("select 1")
        .await
        .expect("other key works");
    drop(a1);
    let again = eventually("a free slot for the key", WAIT, || async {
        Ok(connect_app(&sluice, "app", "appdb", "sch-keyed").await.ok())
    })
    .await
    .expect("slot freed");
    drop((a2, other, again));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_gets_a_notice_after_query_wait_notify() {
    let pg = PgCluster::shared();
    // The first login opens the pool's first server connection and may wait for it; the
    // NOTICE is switched on by a reload afterwards so that it can only concern the query below
    // (see `login_that_waits_past_query_wait_notify_still_succeeds` for the login case).
    let b = base(pg).pool_size(1).set("query_wait_notify", "0");
    let mut sluice = SluiceHandle::start(b.clone()).await;
    let holder = sluice.connect("app", "appdb").await;
    hold(&holder).await;
    sluice
        .reload(b.set_str("query_wait_notify", "100ms"))
        .await
        .expect("reload with query_wait_notify");
    let (waiter, mut notices) = connect_with_notices(&sluice, "app", "appdb", "sch-notified")
        .await
        .expect("waiter");
    let task = tokio::spawn(async move {
        waiter
            .simple_query("select 1")
            .await
            .map(|_| ())
            .map_err(|e| db_error_text(&e))
    });
    let notice = tokio::time::timeout(WAIT, notices.recv())
        .await
        .expect("a NOTICE within the bound")
        .expect("notice channel open");
    assert!(
        notice.contains("waiting for a server connection") && notice.contains(POOL),
        "notice: {notice}"
    );
    assert!(
        !task.is_finished(),
        "the query must still be queued when the NOTICE arrives"
    );
    holder.batch_execute("commit").await.expect("commit");
    tokio::time::timeout(WAIT, task)
        .await
        .expect("bounded")
        .expect("join")
        .expect("the queued query runs after the holder commits");
    drop(holder);
    sluice.shutdown().await;
}

/// A login that has to wait for a server connection (here: a startup parameter the pool has not
/// validated yet, while the pool is busy) longer than `query_wait_notify` must still succeed.
/// The queued NOTICE must not reach the client before AuthenticationOk, where drivers such as
/// tokio-postgres do not accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_that_waits_past_query_wait_notify_still_succeeds() {
    let pg = PgCluster::shared();
    let b = base(pg).pool_size(1).set("query_wait_notify", "0");
    let mut sluice = SluiceHandle::start(b.clone()).await;
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let holder = sluice.connect("app", "appdb").await;
    hold(&holder).await;
    sluice
        .reload(b.set_str("query_wait_notify", "20ms"))
        .await
        .expect("reload with query_wait_notify");

    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("sch-login-wait")
        .options("-c work_mem=7MB");
    let login = tokio::spawn(async move {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok::<_, tokio_postgres::Error>(client)
    });
    // The login is queued behind the holder, well past query_wait_notify.
    eventually("the login to wait past query_wait_notify", WAIT, || async {
        let row = admin.class_row(POOL, "default").await?;
        Ok(row
            .filter(|r| {
                r["waiting"] == "1" && r["oldest_wait_ms"].parse::<u64>().unwrap_or(0) >= 60
            })
            .map(|_| ()))
    })
    .await
    .expect("queued login");
    holder.batch_execute("commit").await.expect("commit");
    let client = tokio::time::timeout(WAIT, login)
        .await
        .expect("bounded")
        .expect("join")
        .unwrap_or_else(|e| {
            panic!(
                "login that waited for the pool failed: {}",
                db_error_text(&e)
            )
        });
    let wm: String = client
        .query_one("show work_mem", &[])
        .await
        .expect("show work_mem")
        .get(0);
    assert_eq!(wm, "7MB");
    drop((client, holder, admin));
    sluice.shutdown().await;
}
