//! Session parameters under transaction pooling: startup parameters (options=-c ...,
//! application_name, DateStyle, extra_float_digits) and session-level SET/RESET follow the
//! client onto whichever server connection serves it, and never leak to another client.

use sluice_tests::harness::{BackendMessage, ConfigBuilder, PgCluster, RawClient, SluiceHandle};
use tokio_postgres::Client;

use crate::util::raw_trusted;

const SETTINGS: &str = "select current_setting('search_path'), \
     current_setting('application_name'), current_setting('TimeZone')";

type Seen = (String, String, String);

async fn settings(c: &Client, in_tx: bool) -> Seen {
    if in_tx {
        c.batch_execute("begin").await.expect("begin");
    }
    let row = c.query_one(SETTINGS, &[]).await.expect("settings");
    if in_tx {
        c.batch_execute("commit").await.expect("commit");
    }
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_and_set_parameters_follow_each_client() {
    let pg = PgCluster::shared();
    let direct = pg.connect_direct("app", "appdb").await.expect("direct");
    direct
        .batch_execute("create schema if not exists params_a; create schema if not exists params_b")
        .await
        .expect("schemas");
    // What a client without parameters sees, straight from PostgreSQL.
    let plain = settings(&direct, false).await;

    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let mut cfg = sluice.pg_config("app", "appdb");
    cfg.application_name("params-x")
        .options("-c search_path=params_a,public -c TimeZone=Asia/Tokyo");
    let x = sluice.try_connect_with(cfg).await.expect("connect x");
    let y = sluice.connect("app", "appdb").await;
    // A list, as PostgreSQL keeps it from the startup packet (not one quoted schema name).
    let x_start: Seen = (
        "params_a,public".into(),
        "params-x".into(),
        "Asia/Tokyo".into(),
    );
    assert_ne!(
        plain.2, x_start.2,
        "pick a TimeZone that differs from the server's"
    );

    for round in 0..10 {
        let in_tx = round % 2 == 0;
        assert_eq!(settings(&x, in_tx).await, x_start, "x, round {round}");
        assert_eq!(settings(&y, in_tx).await, plain, "y, round {round}");
    }

    // Session-level SET persists for X only.
    x.batch_execute("set TimeZone = 'America/New_York'")
        .await
        .expect("set tz");
    x.batch_execute("set search_path = params_b")
        .await
        .expect("set sp");
    let x_set: Seen = (
        "params_b".into(),
        "params-x".into(),
        "America/New_York".into(),
    );
    for round in 0..10 {
        let in_tx = round % 2 == 1;
        assert_eq!(
            settings(&y, in_tx).await,
            plain,
            "y after x's SET, round {round}"
        );
        assert_eq!(
            settings(&x, in_tx).await,
            x_set,
            "x after SET, round {round}"
        );
    }

    // SET LOCAL and a rolled-back SET do not persist.
    x.batch_execute("begin; set local search_path = public; commit")
        .await
        .expect("set local");
    x.batch_execute("begin; set TimeZone = 'UTC'; rollback")
        .await
        .expect("rolled back set");
    assert_eq!(settings(&y, false).await, plain);
    assert_eq!(settings(&x, false).await, x_set);

    // RESET goes back to the startup value, not the server default.
    x.batch_execute("reset search_path").await.expect("reset");
    x.batch_execute("reset TimeZone").await.expect("reset");
    assert_eq!(settings(&y, true).await, plain);
    assert_eq!(settings(&x, true).await, x_start);

    // Y sets its own application_name; X is not affected.
    y.batch_execute("set application_name = 'params-y'")
        .await
        .expect("set app name");
    assert_eq!(settings(&x, false).await, x_start);
    assert_eq!(settings(&y, false).await.1, "params-y");
    sluice.shutdown().await;
}

async fn show(raw: &mut RawClient, what: &str) -> String {
    let rows = raw
        .simple_rows(&format!("show {what}"))
        .await
        .expect("show");
    rows[0][0].clone().expect("a value")
}

#[tokio::test(flavor = "multi_thread")]
async fn datestyle_and_extra_float_digits_from_startup() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(1)).await;
    let mut x = sluice.raw().await;
    let login = x
        .login(
            "trusted",
            "appdb",
            None,
            &[("extra_float_digits", "3"), ("DateStyle", "SQL, DMY")],
        )
        .await
        .expect("startup parameters accepted");
    let reported: Vec<(String, String)> =
        login.iter().filter_map(BackendMessage::parameter).collect();
    assert!(
        reported
            .iter()
            .any(|(k, v)| k == "DateStyle" && v == "SQL, DMY"),
        "ParameterStatus DateStyle: {reported:?}"
    );
    let mut y = raw_trusted(&sluice, "appdb", &[]).await;
    for _ in 0..5 {
        assert_eq!(show(&mut x, "extra_float_digits").await, "3");
        assert_eq!(show(&mut x, "DateStyle").await, "SQL, DMY");
        assert_eq!(
            x.simple_rows("select '2024-03-05'::date")
                .await
                .expect("date"),
            vec![vec![Some("05/03/2024".to_owned())]]
        );
        assert_eq!(show(&mut y, "extra_float_digits").await, "1");
        assert_ne!(show(&mut y, "DateStyle").await, "SQL, DMY");
        assert_eq!(
            y.simple_rows("select '2024-03-05'::date")
                .await
                .expect("date"),
            vec![vec![Some("2024-03-05".to_owned())]]
        );
    }
    sluice.shutdown().await;
}
