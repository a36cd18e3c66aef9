//! Small helpers shared by the integration test modules: SQLSTATE extraction, per-test databases,
//! pg_stat_activity counts, the admin console's `SHOW POOLS`, and clients that keep their
//! asynchronous messages (notices, notifications).

use std::time::Duration;

use sluice_tests::harness::{
    eventually, ConfigBuilder, PgCluster, RawClient, SluiceHandle, SUPERUSER,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, SimpleQueryMessage};

/// Bound for state that settles eventually (pg_stat_activity, pools).
pub const SETTLE: Duration = Duration::from_secs(10);

/// The SQLSTATE of a driver error, or "" if it carries none (I/O error, closed connection).
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// The server's message of a driver error, or the error's text.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// A superuser connection straight to PostgreSQL (database `postgres`), for inspection.
pub async fn superuser(pg: &PgCluster) -> Client {
    pg.connect_direct(SUPERUSER.user, "postgres")
        .await
        .expect("superuser connection to PostgreSQL")
}

/// Creates database `name` owned by `app` in which every role may create tables, so a test can
/// count its server connections by `datname` without seeing other tests' connections.
pub fn create_database(pg: &PgCluster, name: &str) {
    pg.psql(&format!("drop database if exists {name} (force)"));
    pg.psql(&format!("create database {name} owner app"));
    pg.psql_db(name, "grant all on schema public to public");
}

/// Drops and creates a table in `db` through a direct connection as the superuser, owned by
/// `app`, readable and writable by every role.
pub async fn fresh_table(pg: &PgCluster, db: &str, name: &str, columns: &str) {
    let su = pg
        .connect_direct(SUPERUSER.user, db)
        .await
        .expect("superuser connection");
    su.batch_execute(&format!(
        "drop table if exists {name}; create table {name} ({columns}); \
         alter table {name} owner to app; grant all on {name} to public"
    ))
    .await
    .expect("create test table");
}

/// Client backends matching `filter` (SQL over pg_stat_activity, with `params` as $1, $2...).
async fn count_backends(
    su: &Client,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    su.query_one(
        &format!(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' and {filter}"
        ),
        params,
    )
    .await
    .expect("count backends")
    .get(0)
}

/// Client backends connected to database `db`.
pub async fn backends_in_db(su: &Client, db: &str) -> i64 {
    count_backends(su, "datname = $1", &[&db]).await
}

/// Client backends of role `user` connected to database `db`.
pub async fn backends_of(su: &Client, db: &str, user: &str) -> i64 {
    count_backends(su, "datname = $1 and usename = $2", &[&db, &user]).await
}

/// Backends whose application_name is `app` and whose state is `state`.
pub async fn backends_with(su: &Client, app: &str, state: &str) -> i64 {
    count_backends(su, "application_name = $1 and state = $2", &[&app, &state]).await
}

/// Waits until exactly `n` backends have application_name `app` and state `state`.
pub async fn wait_backends(su: &Client, app: &str, state: &str, n: i64) {
    let what = format!("{n} backend(s) with application_name {app} in state {state}");
    eventually(&what, SETTLE, || async {
        Ok((backends_with(su, app, state).await == n).then_some(()))
    })
    .await
    .expect("pg_stat_activity to settle");
}

/// `cl_waiting` of pool (`db`, `user`) from the admin console (`stats_users` must include
/// `app`; see [`with_stats`]). 0 if the pool doesn't exist yet.
pub async fn waiting_clients(sluice: &SluiceHandle, db: &str, user: &str) -> i64 {
    let admin = sluice.connect("app", "sluice").await;
    let rows = admin.simple_query("show pools").await.expect("show pools");
    rows.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .filter(|r| r.get("database") == Some(db) && r.get("user") == Some(user))
        .map(|r| {
            r.get("cl_waiting")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Waits until at least `n` clients of pool (`db`, `user`) are queued for a server connection.
pub async fn wait_queued(sluice: &SluiceHandle, db: &str, user: &str, n: i64) {
    let what = format!("{n} client(s) queued in pool {db}.{user}");
    eventually(&what, SETTLE, || async {
        Ok((waiting_clients(sluice, db, user).await >= n).then_some(()))
    })
    .await
    .expect("client to be queued");
}

/// Lets `app` read the admin console (for [`waiting_clients`]).
pub fn with_stats(b: sluice_tests::harness::ConfigBuilder) -> sluice_tests::harness::ConfigBuilder {
    b.set("stats_users", "[\"app\"]")
}

/// Connects with `cfg` and forwards the connection's asynchronous messages (notices,
/// notifications) to the returned channel.
pub async fn connect_with_messages(
    cfg: Config,
) -> Result<(Client, UnboundedReceiver<AsyncMessage>), tokio_postgres::Error> {
    let (client, mut conn) = cfg.connect(NoTls).await?;
    let (tx, rx) = unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match m {
                Ok(m) => {
                    let _ = tx.send(m);
                }
                Err(_) => break,
            }
        }
    });
    Ok((client, rx))
}

/// Text of the first column of the first row of a simple query.
pub async fn simple_value(client: &Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.expect(sql);
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or_default().to_owned()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no row from {sql}"))
}

/// A raw client logged in as `trusted` to `db` with extra startup parameters.
pub async fn raw_trusted(sluice: &SluiceHandle, db: &str, params: &[(&str, &str)]) -> RawClient {
    let mut raw = sluice.raw().await;
    raw.login("trusted", db, None, params)
        .await
        .expect("raw login as trusted");
    raw
}

/// Asserts that Sluice still serves a normal client: a trust login and `select 1`.
pub async fn assert_serves(sluice: &SluiceHandle) {
    let mut raw = raw_trusted(sluice, "appdb", &[]).await;
    let rows = raw.simple_rows("select 1").await.expect("select 1");
    assert_eq!(rows, vec![vec![Some("1".to_owned())]]);
    raw.terminate().await.expect("terminate");
}

/// A pool of one, so the next client gets the same server connection, and a short queue wait
/// so a pinned connection fails fast.
pub fn one_connection(pg: &PgCluster) -> ConfigBuilder {
    ConfigBuilder::new(pg)
        .pool_size(1)
        .set_str("query_wait_timeout", "5s")
}
