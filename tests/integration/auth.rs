//! Client authentication: SCRAM, md5 and trust logins, the errors for a wrong password, an
//! unknown user and an unknown database, and SCRAM pass-through with only the stored secret.

use std::time::Duration;

use sluice_tests::harness::{Auth, ConfigBuilder, PgCluster, SluiceHandle, SCRAM_ONLY};

use crate::util::{message, sqlstate};

async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("select current_user::text", &[])
        .await
        .expect("select current_user")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_md5_and_trust_logins() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg)).await;
    for user in ["app", "md5user", "trusted"] {
        let client = sluice.connect(user, "appdb").await;
        assert_eq!(current_user(&client).await, user);
    }
    // trust needs no password at all.
    let client = sluice
        .try_connect("trusted", None, "appdb")
        .await
        .expect("trust login without password");
    assert_eq!(current_user(&client).await, "trusted");
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_and_unknown_user_get_the_same_error() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg)).await;
    for (user, pw) in [
        ("app", "wrong"),
        ("md5user", "wrong"),
        ("nosuchuser", "whatever"),
    ] {
        let err = sluice
            .try_connect(user, Some(pw), "appdb")
            .await
            .err()
            .unwrap_or_else(|| panic!("login as {user} with a wrong password must fail"));
        assert_eq!(sqlstate(&err), "28P01", "{user}: {err}");
        assert_eq!(
            message(&err),
            format!("password authentication failed for user \"{user}\""),
            "{user}"
        );
    }
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_database_is_3d000() {
    let pg = PgCluster::shared();
    let sluice = SluiceHandle::start(ConfigBuilder::new(pg)).await;
    let err = sluice
        .try_connect("app", Some("secret"), "nosuchdb")
        .await
        .expect_err("unknown database must fail");
    assert_eq!(sqlstate(&err), "3D000", "{err}");
    assert_eq!(message(&err), "database \"nosuchdb\" does not exist");
    sluice.shutdown().await;
}

/// Sluice knows only `scram_only`'s SCRAM secret; it logs into PostgreSQL with the keys the
/// client proved, for every server connection it opens (two here).
#[tokio::test(flavor = "multi_thread")]
async fn scram_pass_through_with_secret_only() {
    let pg = PgCluster::shared();
    let secret = pg.scram_secret(SCRAM_ONLY.user);
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    let builder = ConfigBuilder::new(pg)
        .without_user(SCRAM_ONLY.user)
        .user_with_secret(
            SCRAM_ONLY.user,
            &secret,
            SCRAM_ONLY.password.expect("password"),
            Auth::Scram,
        )
        .pool_size(2);
    let sluice = SluiceHandle::start(builder).await;

    let a = sluice.connect(SCRAM_ONLY.user, "appdb").await;
    let b = sluice.connect(SCRAM_ONLY.user, "appdb").await;
    // Two transactions open at once need two server connections, each logged in.
    a.batch_execute("begin").await.expect("a begin");
    b.batch_execute("begin").await.expect("b begin");
    let pa: i32 = a
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("a pid")
        .get(0);
    let pb: i32 = b
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("b pid")
        .get(0);
    assert_ne!(pa, pb);
    assert_eq!(current_user(&a).await, SCRAM_ONLY.user);
    let n: i64 = b
        .query_one("select count(*) from sluice_fixture", &[])
        .await
        .expect("b reads the fixture")
        .get(0);
    assert_eq!(n, 1000);
    a.batch_execute("commit").await.expect("a commit");
    b.batch_execute("commit").await.expect("b commit");

    // A wrong password is still refused.
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        sluice.try_connect(SCRAM_ONLY.user, Some("not-it"), "appdb"),
    )
    .await
    .expect("bounded")
    .expect_err("wrong password refused");
    assert_eq!(sqlstate(&err), "28P01", "{err}");
    sluice.shutdown().await;
}
