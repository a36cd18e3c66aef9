//! Session state a client leaves on its server connection that Sluice does not replay (a role,
//! `set_config`, LISTEN, advisory locks, temporary tables, SQL-level PREPARE, WITH HOLD
//! cursors) is reset with DISCARD ALL before the connection serves anyone else, while session
//! SETs, simple or extended, follow their client. Every test runs on a pool of one, so the next
//! client gets the same server connection; the reset tests check the backend is the same one:
//! reset, not replaced.

use std::time::Duration;

use sluice_tests::harness::raw::frontend;
use sluice_tests::harness::{PgCluster, SluiceHandle};
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::util::{one_connection, simple_value, superuser};

const WAIT: Duration = Duration::from_secs(20);

fn resets(sluice: &SluiceHandle) -> u64 {
    sluice.running().shared().stats.server_resets.get()
}

async fn value(client: &Client, sql: &str) -> String {
    tokio::time::timeout(WAIT, simple_value(client, sql))
        .await
        .unwrap_or_else(|_| panic!("{sql} timed out"))
}

async fn backend_pid(client: &Client) -> String {
    value(client, "select pg_backend_pid()").await
}

/// Sluice on a pool of one with two clients, and the `work_mem` and `search_path` a client
/// sees by default.
async fn two_clients() -> (SluiceHandle, Client, Client, (String, String)) {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let a = sluice.connect("app", "appdb").await;
    let b = sluice.connect("app", "appdb").await;
    let defaults = (
        value(&b, "show work_mem").await,
        value(&b, "show search_path").await,
    );
    (sluice, a, b, defaults)
}

/// After `a` set `work_mem` to `a_mem` and `search_path` to `pg_catalog, public`: `b`, on the
/// same server connection, still sees the defaults, and `a` its own settings after `b`.
async fn settings_follow(a: &Client, b: &Client, a_mem: &str, defaults: (&str, &str)) {
    assert_eq!(value(b, "show work_mem").await, defaults.0, "b");
    assert_eq!(value(b, "show search_path").await, defaults.1, "b");
    assert_eq!(value(a, "show work_mem").await, a_mem, "a, after b");
    assert_eq!(
        value(a, "show search_path").await,
        "pg_catalog, public",
        "a, after b"
    );
}

/// What a client leaves behind, and how the next client would see it.
struct Case {
    /// Run by the first client as a simple query.
    leave: &'static str,
    /// Run by the next client: one value.
    probe: &'static str,
    /// What the probe returns on a fresh session.
    fresh: &'static str,
    /// The probe sees the state inside the transaction that left it (LISTEN takes effect at
    /// commit only).
    seen_in_tx: bool,
}

const CASES: [Case; 8] = [
    Case {
        leave: "set role reset_reader",
        probe: "select current_user",
        fresh: "app",
        seen_in_tx: true,
    },
    Case {
        leave: "select set_config('app.tenant', '42', false)",
        probe: "select coalesce(current_setting('app.tenant', true), '')",
        fresh: "",
        seen_in_tx: true,
    },
    Case {
        leave: "listen reset_channel",
        probe: "select count(*) from pg_listening_channels()",
        fresh: "0",
        seen_in_tx: false,
    },
    Case {
        leave: "select pg_advisory_lock(4242)",
        probe:
            "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()",
        fresh: "0",
        seen_in_tx: true,
    },
    Case {
        leave: "create temp table reset_tmp (x int)",
        probe: "select coalesce(to_regclass('reset_tmp')::text, '')",
        fresh: "",
        seen_in_tx: true,
    },
    Case {
        leave: "prepare reset_plan as select 1",
        probe: "select count(*) from pg_prepared_statements where name = 'reset_plan'",
        fresh: "0",
        seen_in_tx: true,
    },
    Case {
        leave: "declare reset_cursor cursor with hold for select 1",
        probe: "select count(*) from pg_cursors where name = 'reset_cursor'",
        fresh: "0",
        seen_in_tx: true,
    },
    Case {
        // A trackable SET next to an untracked one: the string is reset as a whole.
        leave: "select 1; set work_mem = '3MB'; set role reset_reader",
        probe: "select current_user",
        fresh: "app",
        seen_in_tx: true,
    },
];

#[tokio::test(flavor = "multi_thread")]
async fn state_a_client_leaves_is_reset_before_the_next_client() {
    let pg = PgCluster::shared();
    let su = superuser(pg).await;
    su.batch_execute(
        "do $$ begin
             if not exists (select from pg_roles where rolname = 'reset_reader') then
                 create role reset_reader nologin;
             end if;
         end $$;
         grant reset_reader to app",
    )
    .await
    .expect("role");
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let first = sluice.connect("app", "appdb").await;
    let default_work_mem = value(&first, "show work_mem").await;
    let pid = backend_pid(&first).await;
    for (i, case) in CASES.iter().enumerate() {
        let fresh = if case.fresh.is_empty() && case.probe.starts_with("show") {
            default_work_mem.as_str()
        } else {
            case.fresh
        };
        let a = sluice.connect("app", "appdb").await;
        // In one transaction, so the probe sees the session before Sluice resets it.
        a.batch_execute("begin").await.expect("begin");
        tokio::time::timeout(WAIT, a.batch_execute(case.leave))
            .await
            .expect("bounded")
            .unwrap_or_else(|e| panic!("{}: {e}", case.leave));
        if case.seen_in_tx {
            let left = value(&a, case.probe).await;
            assert_ne!(left, fresh, "{} changed the session", case.leave);
        }
        a.batch_execute("commit").await.expect("commit");
        let b = sluice.connect("app", "appdb").await;
        assert_eq!(value(&b, case.probe).await, fresh, "after {}", case.leave);
        assert_eq!(backend_pid(&b).await, pid, "the same backend, reset");
        // Each case left state once (its probe ran on the session it left dirty).
        assert_eq!(resets(&sluice), i as u64 + 1, "resets after {}", case.leave);
        drop((a, b));
    }
    drop(first);
    sluice.shutdown().await;
}

/// The same through the extended protocol: a named statement (prepared once, run on a
/// session where it is not yet prepared) and the unnamed statement.
#[tokio::test(flavor = "multi_thread")]
async fn state_left_through_the_extended_protocol_is_reset() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let a = sluice.connect("app", "appdb").await;
    let b = sluice.connect("app", "appdb").await;
    let pid = backend_pid(&b).await;
    let probe = "select coalesce(current_setting('app.tenant', true), '')";
    // Named: tokio-postgres prepares the statement, then binds it.
    let named = a
        .prepare("select set_config('app.tenant', $1, false)")
        .await
        .expect("prepare");
    a.batch_execute("begin").await.expect("begin");
    a.query(&named, &[&"7"]).await.expect("named");
    assert_eq!(value(&a, probe).await, "7", "set on the session");
    a.batch_execute("commit").await.expect("commit");
    assert_eq!(value(&b, probe).await, "");
    assert_eq!(resets(&sluice), 1);
    // The reset dropped the server-side statement: Sluice prepares it again.
    a.query(&named, &[&"8"]).await.expect("named again");
    assert_eq!(value(&b, probe).await, "");
    assert_eq!(resets(&sluice), 2);
    // Unnamed.
    a.query_typed(
        "select set_config('app.tenant', $1, false)",
        &[(&"9", Type::TEXT)],
    )
    .await
    .expect("unnamed");
    assert_eq!(value(&b, probe).await, "");
    assert_eq!(resets(&sluice), 3);
    // Sluice scans each distinct unnamed text once: the same text again is still seen.
    for n in 4..6 {
        a.query_typed(
            "select set_config('app.tenant', $1, false)",
            &[(&"10", Type::TEXT)],
        )
        .await
        .expect("unnamed again");
        assert_eq!(value(&b, probe).await, "");
        assert_eq!(resets(&sluice), n);
    }
    assert_eq!(backend_pid(&b).await, pid, "the same backend, reset");
    drop((a, b));
    sluice.shutdown().await;
}

/// What leaves nothing behind is not reset, and a reset keeps what Sluice tracks for the
/// client: its own SETs and its prepared statements still work afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn only_leftover_state_is_reset_and_tracked_state_survives_it() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let a = sluice.connect("app", "appdb").await;
    for sql in [
        "select set_config('app.tenant', '1', true)",
        "begin; set local work_mem = '5MB'; commit",
        "select pg_advisory_xact_lock(77)",
        "set work_mem = '9MB'",
        "set transaction isolation level read committed",
        "select 1",
    ] {
        a.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let stmt = a.prepare("select $1::int + 1").await.expect("prepare");
    assert_eq!(
        a.query_one(&stmt, &[&1i32])
            .await
            .expect("run")
            .get::<_, i32>(0),
        2
    );
    assert_eq!(resets(&sluice), 0, "nothing was left on the session");
    a.batch_execute("listen reset_tracked")
        .await
        .expect("listen");
    assert_eq!(value(&a, "show work_mem").await, "9MB", "the client's SET");
    assert_eq!(resets(&sluice), 1);
    assert_eq!(
        a.query_one(&stmt, &[&41i32])
            .await
            .expect("run")
            .get::<_, i32>(0),
        42,
        "the client's prepared statement"
    );
    drop(a);
    sluice.shutdown().await;
}

/// A session SET sent through the extended protocol follows its client like a simple-query SET:
/// tracked, re-applied on the client's next transactions, not seen by other clients, and
/// without a reset. A SET that its batch or block rolls back is not kept.
#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_sets_follow_their_client() {
    let (sluice, a, b, (default_mem, default_path)) = two_clients().await;
    // Unnamed (query_typed) and named (execute prepares a statement).
    a.query_typed("set work_mem = '7MB'", &[])
        .await
        .expect("unnamed set");
    a.execute("set search_path = pg_catalog, public", &[])
        .await
        .expect("named set");
    settings_follow(&a, &b, "7MB", (&default_mem, &default_path)).await;
    // Rolled back with its block: not kept.
    a.batch_execute("begin").await.expect("begin");
    a.query_typed("set work_mem = '9MB'", &[])
        .await
        .expect("set in block");
    assert_eq!(value(&a, "show work_mem").await, "9MB", "inside the block");
    a.batch_execute("rollback").await.expect("rollback");
    assert_eq!(value(&b, "show work_mem").await, default_mem, "b");
    assert_eq!(
        value(&a, "show work_mem").await,
        "7MB",
        "a, after the rollback"
    );
    // Committed with its block: kept.
    a.batch_execute("begin").await.expect("begin");
    a.query_typed("set work_mem = '11MB'", &[])
        .await
        .expect("set in block");
    a.batch_execute("commit").await.expect("commit");
    assert_eq!(value(&b, "show work_mem").await, default_mem, "b");
    assert_eq!(
        value(&a, "show work_mem").await,
        "11MB",
        "a, after the commit"
    );
    assert_eq!(resets(&sluice), 0, "tracked, not reset");
    drop((a, b));
    sluice.shutdown().await;
}

/// A SET whose implicit transaction fails later in the same batch is rolled back by the server,
/// and Sluice does not keep it for the client either.
#[tokio::test(flavor = "multi_thread")]
async fn an_extended_set_in_a_failed_batch_is_not_kept() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(one_connection(pg)).await;
    let mut raw = crate::util::raw_trusted(&sluice, "appdb", &[]).await;
    let default_mem = raw.simple_rows("show work_mem").await.expect("show");
    let batch = [
        frontend::parse("", "set work_mem = '13MB'", &[]),
        frontend::bind("", "", &[]),
        frontend::execute("", 0),
        frontend::parse("", "select 1/0", &[]),
        frontend::bind("", "", &[]),
        frontend::execute("", 0),
        frontend::sync(),
    ]
    .concat();
    raw.send(&batch).await.expect("send");
    let msgs = raw.recv_until_ready().await.expect("answers");
    assert!(msgs.iter().any(|m| m.tag == b'E'), "division by zero");
    assert_eq!(
        raw.simple_rows("show work_mem").await.expect("show"),
        default_mem
    );
    // Another client on the connection in between: what Sluice re-applies for this client
    // next is what it keeps for it.
    let mut other = crate::util::raw_trusted(&sluice, "appdb", &[]).await;
    other.simple_rows("select 1").await.expect("other");
    other.terminate().await.expect("terminate");
    assert_eq!(
        raw.simple_rows("show work_mem").await.expect("show"),
        default_mem,
        "after another client"
    );
    // The same SET alone is kept.
    let batch = [
        frontend::parse("", "set work_mem = '13MB'", &[]),
        frontend::bind("", "", &[]),
        frontend::execute("", 0),
        frontend::sync(),
    ]
    .concat();
    raw.send(&batch).await.expect("send");
    raw.recv_until_ready().await.expect("answers");
    assert_eq!(
        raw.simple_rows("show work_mem").await.expect("show"),
        vec![vec![Some("13MB".to_owned())]]
    );
    raw.terminate().await.expect("terminate");
    sluice.shutdown().await;
}

/// The SETs of a multi-statement simple query (`SET search_path = ...; SELECT ...`) follow their
/// client like single SETs, without a reset, and roll back with the query's implicit
/// transaction. A string that also leaves untracked state is reset as a whole.
#[tokio::test(flavor = "multi_thread")]
async fn sets_in_a_multi_statement_query_follow_their_client() {
    let (sluice, a, b, (default_mem, default_path)) = two_clients().await;
    a.batch_execute("set work_mem = '5MB'; select 1; set search_path = pg_catalog, public")
        .await
        .expect("multi-statement set");
    settings_follow(&a, &b, "5MB", (&default_mem, &default_path)).await;
    assert_eq!(resets(&sluice), 0, "tracked, not reset");
    // A failing statement rolls the string's SETs back on the server: Sluice drops them too.
    a.batch_execute("set work_mem = '6MB'; select 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(value(&b, "show work_mem").await, default_mem, "b");
    assert_eq!(
        value(&a, "show work_mem").await,
        "5MB",
        "a keeps its last SET"
    );
    // With untracked state in the same string, the session is reset after it.
    a.batch_execute("set work_mem = '7MB'; select set_config('app.tenant', '9', false)")
        .await
        .expect("set with set_config");
    assert_eq!(
        value(&b, "select current_setting('app.tenant', true)").await,
        "",
        "b"
    );
    assert_eq!(resets(&sluice), 1, "reset once");
    drop((a, b));
    sluice.shutdown().await;
}
