//! The admin console: who may use it, what SHOW POOLS says, and PAUSE / RESUME / KILL_CLIENT /
//! RECONNECT against real clients and server connections.

use std::time::Duration;

use sluice_tests::harness::ops::{connect_app, db_error_text, sqlstate, AdminConsole};
use sluice_tests::harness::{eventually, ConfigBuilder, PgCluster, SluiceHandle};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// `app` is an admin, `md5user` may only look.
fn base(pg: &PgCluster) -> ConfigBuilder {
    ConfigBuilder::new(pg)
        .set("admin_users", r#"["app"]"#)
        .set("stats_users", r#"["md5user"]"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_access_control() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg)).await;

    // Not listed: refused at login, for both console names.
    for db in ["sluice", "pgbouncer"] {
        match sluice
            .try_connect_with(sluice.pg_config("trusted", db))
            .await
        {
            Ok(_) => panic!("a user in neither admin_users nor stats_users reached {db}"),
            Err(e) => assert_eq!(
                sqlstate(&e).as_deref(),
                Some("42501"),
                "{}",
                db_error_text(&e)
            ),
        }
    }

    // Stats user: SHOW works, changes are refused and change nothing.
    let stats = AdminConsole::connect(&sluice, "md5user")
        .await
        .expect("stats login");
    let (cols, _) = stats
        .query("SHOW POOLS")
        .await
        .expect("SHOW POOLS as stats user");
    assert!(cols.iter().any(|c| c == "cl_waiting"), "{cols:?}");
    stats.show("VERSION").await.expect("SHOW VERSION");
    for cmd in [
        "PAUSE",
        "RESUME",
        "RECONNECT",
        "RELOAD",
        "KILL_CLIENT 1",
        "SHUTDOWN",
    ] {
        let e = stats
            .try_query(cmd)
            .await
            .expect_err(&format!("{cmd} by a stats user"));
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42501"),
            "{cmd}: {}",
            db_error_text(&e)
        );
    }
    let client = sluice.connect("app", "appdb").await;
    client
        .simple_query("select 1")
        .await
        .expect("not paused, not shut down");

    // Admin user: everything, including HELP listing the commands.
    let admin = AdminConsole::connect(&sluice, "app")
        .await
        .expect("admin login");
    let help = admin.show("HELP").await.expect("SHOW HELP");
    let all: String = help
        .iter()
        .map(|r| r["command"].clone())
        .collect::<Vec<_>>()
        .join("\n");
    for word in [
        "PAUSE",
        "RESUME",
        "RECONNECT",
        "KILL_CLIENT",
        "RELOAD",
        "SHUTDOWN",
    ] {
        assert!(all.contains(word), "SHOW HELP lacks {word}:\n{all}");
    }
    for what in [
        "POOLS",
        "CLIENTS",
        "SERVERS",
        "STATS",
        "STATS_TOTALS",
        "DATABASES",
        "USERS",
        "CONFIG",
        "VERSION",
        "LISTS",
        "POLICIES",
        "CLASSES",
    ] {
        admin
            .query(&format!("SHOW {what}"))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let e = admin
        .try_query("SHOW NONSENSE")
        .await
        .expect_err("unknown SHOW");
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("42601"),
        "{}",
        db_error_text(&e)
    );
    drop((stats, admin, client));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_pools_has_pgbouncer_columns_and_counts() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg).pool_size(3)).await;
    let client = sluice.connect("app", "appdb").await;
    client.simple_query("select 1").await.expect("select");
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let (cols, rows) = admin.query("SHOW POOLS").await.expect("SHOW POOLS");
    for c in [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "maxwait",
    ] {
        assert!(
            cols.iter().any(|x| x == c),
            "SHOW POOLS lacks {c}: {cols:?}"
        );
    }
    let row = rows
        .iter()
        .find(|r| r["database"] == "appdb" && r["user"] == "app")
        .unwrap_or_else(|| panic!("no appdb/app pool: {rows:?}"));
    assert_eq!(row["cl_active"], "1", "{row:?}");
    assert_eq!(row["cl_waiting"], "0", "{row:?}");
    assert_eq!(row["sv_active"], "0", "{row:?}");
    assert_eq!(
        row["sv_idle"], "1",
        "the one server connection is back in the pool: {row:?}"
    );
    assert_eq!(row["maxwait"], "0", "{row:?}");
    assert_eq!(row["pool_size"], "3", "{row:?}");

    // A transaction in progress shows as an active server connection.
    client
        .batch_execute("begin; select 1")
        .await
        .expect("begin");
    let busy = admin
        .pool_row("appdb", "app")
        .await
        .expect("SHOW POOLS")
        .expect("row");
    assert_eq!(busy["sv_active"], "1", "{busy:?}");
    client.batch_execute("commit").await.expect("commit");
    drop((client, admin));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_waits_for_transactions_then_holds_new_ones_until_resume() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg).pool_size(2)).await;
    let direct = pg
        .connect_direct("postgres", "appdb")
        .await
        .expect("direct");
    direct
        .batch_execute("create table adm_pause (v int); grant all on adm_pause to app")
        .await
        .expect("create adm_pause");
    let a = connect_app(&sluice, "app", "appdb", "adm-pause-a")
        .await
        .expect("a");
    // B logs in before the pause (a login may need a server connection).
    let b = connect_app(&sluice, "app", "appdb", "adm-pause-b")
        .await
        .expect("b");
    a.batch_execute("begin; insert into adm_pause values (1)")
        .await
        .expect("a begins");

    let pauser = AdminConsole::connect(&sluice, "app")
        .await
        .expect("admin 1");
    let watcher = AdminConsole::connect(&sluice, "app")
        .await
        .expect("admin 2");
    let pause = tokio::spawn(async move { pauser.try_query("PAUSE").await.map(|_| ()) });
    eventually("the pool to be marked paused", WAIT, || async {
        let row = watcher.pool_row("appdb", "app").await?;
        Ok(row.filter(|r| r["paused"] == "1").map(|_| ()))
    })
    .await
    .expect("paused");
    // A's transaction is still open on the server, so PAUSE has not returned.
    let open: i64 = direct
        .query_one(
            "select count(*) from pg_stat_activity where application_name = 'adm-pause-a' \
             and state = 'idle in transaction'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert_eq!(open, 1, "A's transaction should be open");
    assert!(
        !pause.is_finished(),
        "PAUSE returned while a transaction was still running"
    );

    // A may finish its transaction; then PAUSE completes.
    a.batch_execute("insert into adm_pause values (2); commit")
        .await
        .expect("a commits");
    tokio::time::timeout(WAIT, pause)
        .await
        .expect("PAUSE returns once the transaction ended")
        .expect("join")
        .unwrap_or_else(|e| panic!("PAUSE: {}", db_error_text(&e)));

    // New transactions are held.
    let b_task = tokio::spawn(async move {
        b.query_one("select count(*) from adm_pause", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
    });
    eventually("B queued while paused", WAIT, || async {
        Ok((watcher.pool_number("appdb", "app", "cl_waiting").await? == 1).then_some(()))
    })
    .await
    .expect("B waits");
    assert!(!b_task.is_finished(), "B ran while the pool was paused");

    watcher.query("RESUME").await.expect("RESUME");
    let n = tokio::time::timeout(WAIT, b_task)
        .await
        .expect("B runs after RESUME")
        .expect("join")
        .unwrap_or_else(|e| panic!("B: {}", db_error_text(&e)));
    assert_eq!(n, 2, "B sees A's committed rows");
    drop((a, watcher));
    sluice.shutdown().await;
    direct
        .batch_execute("drop table adm_pause")
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_disconnects_that_client_only() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg)).await;
    let victim = connect_app(&sluice, "app", "appdb", "adm-kill-victim")
        .await
        .expect("victim");
    let bystander = connect_app(&sluice, "app", "appdb", "adm-kill-bystander")
        .await
        .expect("by");
    victim.simple_query("select 1").await.expect("victim works");
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let rows = admin
        .clients_of_app("adm-kill-victim")
        .await
        .expect("SHOW CLIENTS");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let id = rows[0]["id"].clone();

    admin
        .query(&format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    eventually("the killed client to leave SHOW CLIENTS", WAIT, || async {
        Ok(admin
            .clients_of_app("adm-kill-victim")
            .await?
            .is_empty()
            .then_some(()))
    })
    .await
    .expect("gone");
    assert!(
        victim.simple_query("select 1").await.is_err(),
        "the killed client still works"
    );
    bystander
        .simple_query("select 1")
        .await
        .expect("the other client is untouched");

    let e = admin
        .try_query("KILL_CLIENT 987654321")
        .await
        .expect_err("unknown id");
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("42704"),
        "{}",
        db_error_text(&e)
    );
    drop((bystander, admin));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_replaces_server_connections() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg).pool_size(1)).await;
    let client = sluice.connect("app", "appdb").await;
    let first: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let again: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_eq!(first, again, "a pool of 1 reuses its server connection");

    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    admin.query("RECONNECT").await.expect("RECONNECT");
    let after: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_ne!(after, first, "RECONNECT must replace the server connection");
    let direct = pg
        .connect_direct("postgres", "postgres")
        .await
        .expect("direct");
    eventually("the old backend to exit", WAIT, || async {
        let n: i64 = direct
            .query_one(
                "select count(*) from pg_stat_activity where pid = $1",
                &[&first],
            )
            .await?
            .get(0);
        Ok((n == 0).then_some(()))
    })
    .await
    .expect("old server connection closed");
    drop((client, admin));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_reconnect_of_one_database_and_unknown_ones() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg)).await;
    let app = sluice.connect("app", "appdb").await;
    app.simple_query("select 1").await.expect("appdb");
    let other = sluice.connect("app", "otherdb").await;
    other.simple_query("select 1").await.expect("otherdb");
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let paused = |db: &'static str| {
        let admin = &admin;
        async move {
            let pool = admin
                .pool_row(db, "app")
                .await
                .expect("SHOW POOLS")
                .unwrap_or_else(|| panic!("no {db}/app pool"))["paused"]
                .clone();
            let database = admin
                .show("DATABASES")
                .await
                .expect("SHOW DATABASES")
                .into_iter()
                .find(|r| r["name"] == db)
                .unwrap_or_else(|| panic!("SHOW DATABASES lacks {db}"))["paused"]
                .clone();
            (pool, database)
        }
    };
    // Both views print PgBouncer's integers.
    assert_eq!(paused("appdb").await, ("0".into(), "0".into()));

    // A database that is neither configured nor pooled: PgBouncer's "no such database", and
    // nothing changes.
    for cmd in ["PAUSE", "RESUME", "RECONNECT"] {
        let e = admin
            .try_query(&format!("{cmd} NoSuchDb"))
            .await
            .expect_err(&format!("{cmd} of an unknown database"));
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("42704"),
            "{cmd}: {}",
            db_error_text(&e)
        );
        assert_eq!(
            e.as_db_error().map(|d| d.message()),
            Some("no such database: NoSuchDb"),
            "{cmd}"
        );
    }
    assert_eq!(paused("appdb").await, ("0".into(), "0".into()));
    assert_eq!(paused("otherdb").await, ("0".into(), "0".into()));
    let e = admin
        .try_query("PAUSE appdb otherdb")
        .await
        .expect_err("two databases");
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("42601"),
        "{}",
        db_error_text(&e)
    );

    // A configured database: only its pools pause (no transaction runs, so PAUSE returns).
    tokio::time::timeout(WAIT, admin.query("PAUSE appdb"))
        .await
        .expect("PAUSE appdb returns with nothing running")
        .expect("PAUSE appdb");
    assert_eq!(paused("appdb").await, ("1".into(), "1".into()));
    assert_eq!(paused("otherdb").await, ("0".into(), "0".into()));
    other
        .simple_query("select 1")
        .await
        .expect("otherdb is not paused");
    admin.query("RECONNECT otherdb").await.expect("RECONNECT");
    admin.query("RESUME appdb").await.expect("RESUME appdb");
    assert_eq!(paused("appdb").await, ("0".into(), "0".into()));
    app.simple_query("select 1").await.expect("appdb resumed");
    // Resuming what is not paused is an error, as in PgBouncer.
    for (cmd, msg) in [
        ("RESUME appdb", "database appdb is not paused"),
        ("RESUME", "pooler is not paused"),
    ] {
        let e = admin.try_query(cmd).await.expect_err(cmd);
        assert_eq!(
            sqlstate(&e).as_deref(),
            Some("55000"),
            "{cmd}: {}",
            db_error_text(&e)
        );
        assert!(
            db_error_text(&e).contains(msg),
            "{cmd}: {}",
            db_error_text(&e)
        );
    }
    drop((app, other, admin));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_users_class_is_the_class_in_effect() {
    let pg = PgCluster::shared();
    let b = base(pg)
        .append("[classes.web]\npriority = 100\n")
        .user_set("md5user", "class", "\"web\"");
    let sluice = SluiceHandle::start(b).await;
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let users = admin.show("USERS").await.expect("SHOW USERS");
    let class = |name: &str| {
        users
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("SHOW USERS lacks {name}: {users:?}"))["class"]
            .clone()
    };
    assert_eq!(class("md5user"), "web");
    assert_eq!(
        class("app"),
        "default",
        "a user without a class runs in the default class"
    );
    drop(admin);
    sluice.shutdown().await;
}

/// KILL_CLIENT ends a client that waits for a server connection (here in a paused pool) at
/// once, and its statement never reaches PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_ends_a_waiting_client_before_its_statement_runs() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(base(pg)).await;
    let setup = sluice.connect("app", "appdb").await;
    setup
        .batch_execute("create table if not exists adm_kill_wait (n int); truncate adm_kill_wait")
        .await
        .expect("table");
    let victim = connect_app(&sluice, "app", "appdb", "adm-kill-waiting")
        .await
        .expect("victim");
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    admin.query("PAUSE appdb").await.expect("PAUSE");
    let insert = tokio::spawn(async move {
        victim
            .simple_query("insert into adm_kill_wait values (1)")
            .await
            .map(drop)
    });
    let id = eventually("the victim to wait", WAIT, || async {
        let rows = admin.clients_of_app("adm-kill-waiting").await?;
        Ok(rows
            .first()
            .filter(|r| r.get("state").map(String::as_str) == Some("waiting"))
            .map(|r| r["id"].clone()))
    })
    .await
    .expect("waiting");
    admin
        .query(&format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    // While the pool is still paused: the kill does not wait for a connection.
    let err = tokio::time::timeout(WAIT, insert)
        .await
        .expect("the killed client's statement ends while the pool is paused")
        .expect("join")
        .expect_err("killed");
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("57P01"),
        "{}",
        db_error_text(&err)
    );
    admin.query("RESUME appdb").await.expect("RESUME");
    let n: i64 = setup
        .query_one("select count(*) from adm_kill_wait", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "the killed client's insert never ran");
    drop((setup, admin));
    sluice.shutdown().await;
}
