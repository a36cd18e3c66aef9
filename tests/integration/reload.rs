//! Reloading while clients run: policy hot reload under load, a corrupt plugin refused, and the
//! admin command RELOAD re-reading the config file (new pool size and user, invalid file refused).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_tests::harness::ops::{
    connect_app, db_error_text, plugin_toml, plugin_toml_at, sqlstate, start_from_file,
    AdminConsole,
};
use sluice_tests::harness::{eventually, ConfigBuilder, PgCluster, SluiceHandle};

use crate::policy::RELAXED_POLICY;

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);

fn counter_config(pg: &PgCluster, version: &str) -> ConfigBuilder {
    ConfigBuilder::new(pg)
        .set("admin_users", r#"["app"]"#)
        .pool_size(5)
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "counter",
            "counter",
            "closed",
            &[&format!("version = \"{version}\"")],
        ))
}

/// What the load clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// The counter plugin's own rejections (P0001, "call N rejected by counter V").
    rejected: AtomicU64,
    /// Versions named by those rejections.
    versions: Mutex<std::collections::BTreeSet<String>>,
    /// Anything else: every entry is a failure of the test.
    failures: Mutex<Vec<String>>,
}

/// The version a counter rejection names, if `e` is one.
fn counter_rejection(e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    if db.code().code() != "P0001" {
        return None;
    }
    let msg = db.message();
    let rest = msg.strip_prefix("call ")?;
    let (n, version) = rest.split_once(" rejected by counter ")?;
    n.parse::<u64>().ok()?;
    Some(version.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_reload_under_load_loses_no_transactions() {
    let pg = PgCluster::shared();
    let configs = [
        counter_config(pg, "gen-a").build().expect("config a"),
        counter_config(pg, "gen-b").build().expect("config b"),
    ];
    let sluice = SluiceHandle::start(counter_config(pg, "gen-a")).await;
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let gen0: u64 = admin.policy_row("counter").await.expect("row")["generation"]
        .parse()
        .expect("generation");
    // A client connected before every reload, used after the last one.
    let probe = connect_app(&sluice, "app", "appdb", "rl-probe")
        .await
        .expect("probe");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let c = connect_app(&sluice, "app", "appdb", &format!("rl-load-{i}"))
            .await
            .unwrap_or_else(|e| panic!("load client {i}: {}", db_error_text(&e)));
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            // Bounded: stops when asked, or after many iterations whatever happens.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.simple_query("select 1").await {
                    Ok(_) => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => match counter_rejection(&e) {
                        Some(v) => {
                            tally.rejected.fetch_add(1, Ordering::Relaxed);
                            tally.versions.lock().expect("lock").insert(v);
                        }
                        None => {
                            tally.failures.lock().expect("lock").push(db_error_text(&e));
                            if c.is_closed() {
                                break;
                            }
                        }
                    },
                }
            }
        }));
    }

    let total = |t: &Tally| t.ok.load(Ordering::Relaxed) + t.rejected.load(Ordering::Relaxed);
    for i in 0..20 {
        // Let the load make progress under the current generation before swapping it.
        let before = total(&tally);
        eventually("transactions between reloads", WAIT, || async {
            Ok((total(&tally) >= before + 30).then_some(()))
        })
        .await
        .expect("load progresses");
        let next = configs[(i + 1) % 2].clone();
        sluice
            .reload_config(next)
            .await
            .unwrap_or_else(|e| panic!("reload {i}: {e:#}"));
    }
    let before = total(&tally);
    eventually("transactions after the last reload", WAIT, || async {
        Ok((total(&tally) >= before + 30).then_some(()))
    })
    .await
    .expect("load progresses");
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .expect("join");
    }

    let failures = tally.failures.lock().expect("lock").clone();
    assert!(
        failures.is_empty(),
        "{} failed transactions, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let (ok, rejected) = (
        tally.ok.load(Ordering::Relaxed),
        tally.rejected.load(Ordering::Relaxed),
    );
    assert!(ok > 0 && rejected > 0, "ok {ok}, rejected {rejected}");
    // The counter lives in the host and survives reloads: exactly every third call was refused.
    assert_eq!(
        rejected,
        (ok + rejected) / 3,
        "ok {ok}, rejected {rejected}"
    );
    let versions = tally.versions.lock().expect("lock").clone();
    assert!(
        versions.contains("gen-a") && versions.contains("gen-b") && versions.len() == 2,
        "versions that decided: {versions:?}"
    );

    // 20 reloads from gen-a end on gen-a: the next decisions on an old connection are gen-a's.
    let row = admin.policy_row("counter").await.expect("row");
    assert_eq!(
        row["generation"].parse::<u64>().expect("generation"),
        gen0 + 20,
        "{row:?}"
    );
    let mut last = None;
    for _ in 0..3 {
        if let Err(e) = probe.simple_query("select 1").await {
            last = Some(counter_rejection(&e).unwrap_or_else(|| panic!("{}", db_error_text(&e))));
        }
    }
    assert_eq!(
        last.as_deref(),
        Some("gen-a"),
        "three calls include one rejection, by gen-a"
    );

    // One more reload: the very next rejection comes from the new generation.
    sluice
        .reload_config(configs[1].clone())
        .await
        .expect("reload to gen-b");
    let mut last = None;
    for _ in 0..3 {
        if let Err(e) = probe.simple_query("select 1").await {
            last = Some(counter_rejection(&e).unwrap_or_else(|| panic!("{}", db_error_text(&e))));
        }
    }
    assert_eq!(last.as_deref(), Some("gen-b"));
    drop((probe, admin));
    sluice.shutdown().await;
}

/// A config file for RELOAD tests: `builder` rendered to `dir/sluice.toml`.
fn write_config(dir: &tempfile::TempDir, builder: &ConfigBuilder) -> std::path::PathBuf {
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, builder.to_toml()).expect("write sluice.toml");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_a_corrupt_plugin_is_refused_and_the_old_plugin_stays() {
    let pg = PgCluster::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = dir.path().join("priority.wasm");
    std::fs::copy(sluice_policy::testing::plugin_path("priority"), &wasm).expect("copy plugin");
    let b = ConfigBuilder::new(pg)
        .set("admin_users", r#"["app"]"#)
        .append(RELAXED_POLICY)
        .append("[classes.web]\npriority = 100\n")
        .append(&plugin_toml_at(
            "priority",
            &wasm,
            "closed",
            &[r#"match = "application""#, r#"web = "rl-web""#],
        ));
    let path = write_config(&dir, &b);
    let sluice = start_from_file(&path).await.expect("start from file");
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    let before = admin.policy_row("priority").await.expect("row");
    let old = connect_app(&sluice, "app", "appdb", "rl-web")
        .await
        .expect("client");

    std::fs::write(&wasm, b"\0asm this is not a component").expect("corrupt the plugin");
    let e = admin
        .try_query("RELOAD")
        .await
        .expect_err("RELOAD with a corrupt plugin");
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("F0000"),
        "{}",
        db_error_text(&e)
    );
    assert!(
        db_error_text(&e).contains("priority"),
        "the error should name the plugin: {}",
        db_error_text(&e)
    );

    let after = admin.policy_row("priority").await.expect("row");
    assert_eq!(
        after["digest"], before["digest"],
        "the old plugin stays active"
    );
    assert_eq!(after["generation"], before["generation"]);
    // The old plugin still decides, for old and new clients.
    old.simple_query("select 1")
        .await
        .expect("old client works");
    let new = connect_app(&sluice, "app", "appdb", "rl-web")
        .await
        .expect("new client");
    new.simple_query("select 1")
        .await
        .expect("new client works");
    let rows = admin.clients_of_app("rl-web").await.expect("SHOW CLIENTS");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter().all(|r| r["class"] == "web"),
        "classes: {rows:?}"
    );
    drop((old, new, admin));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_pool_size_and_new_user_without_dropping_clients() {
    let pg = PgCluster::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = ConfigBuilder::new(pg)
        .set("admin_users", r#"["app"]"#)
        .pool_size(2)
        .without_user("md5user");
    let path = write_config(&dir, &b);
    let sluice = start_from_file(&path).await.expect("start from file");
    let client = sluice.connect("app", "appdb").await;
    client
        .batch_execute("begin; select 1")
        .await
        .expect("transaction open across the reload");
    assert!(
        sluice
            .try_connect("md5user", Some("secret-md5"), "appdb")
            .await
            .is_err(),
        "md5user is not configured yet"
    );
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");
    assert_eq!(
        admin
            .pool_number("appdb", "app", "pool_size")
            .await
            .expect("pool"),
        2
    );

    let b2 = b.clone().pool_size(4).login(sluice_tests::harness::MD5USER);
    std::fs::write(&path, b2.to_toml()).expect("rewrite sluice.toml");
    admin.query("RELOAD").await.expect("RELOAD");

    // The connected client keeps its transaction and its connection.
    let n: i32 = client
        .query_one("select 7", &[])
        .await
        .expect("query inside the open transaction after RELOAD")
        .get(0);
    assert_eq!(n, 7);
    client.batch_execute("commit").await.expect("commit");
    client
        .simple_query("select 1")
        .await
        .expect("next transaction");
    assert_eq!(
        admin
            .pool_number("appdb", "app", "pool_size")
            .await
            .expect("pool"),
        4
    );
    let config = admin.show("CONFIG").await.expect("SHOW CONFIG");
    let size = config
        .iter()
        .find(|r| r["key"] == "default_pool_size")
        .expect("key");
    assert_eq!(size["value"], "4");
    let md5 = sluice
        .try_connect("md5user", Some("secret-md5"), "appdb")
        .await
        .unwrap_or_else(|e| panic!("md5user after RELOAD: {}", db_error_text(&e)));
    md5.simple_query("select 1").await.expect("md5user works");
    drop((client, md5, admin));
    sluice.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_of_an_invalid_config_is_refused_with_the_reason() {
    let pg = PgCluster::shared();
    let dir = tempfile::tempdir().expect("tempdir");
    let b = ConfigBuilder::new(pg)
        .set("admin_users", r#"["app"]"#)
        .pool_size(3);
    let path = write_config(&dir, &b);
    let sluice = start_from_file(&path).await.expect("start from file");
    let client = sluice.connect("app", "appdb").await;
    let admin = AdminConsole::connect(&sluice, "app").await.expect("admin");

    std::fs::write(
        &path,
        b.clone().set("default_pool_size", "\"lots\"").to_toml(),
    )
    .expect("write an invalid config");
    let e = admin.try_query("RELOAD").await.expect_err("invalid config");
    let text = db_error_text(&e);
    assert_eq!(sqlstate(&e).as_deref(), Some("F0000"), "{text}");
    assert!(
        text.contains("default_pool_size"),
        "the reason should name the key: {text}"
    );

    // Nothing changed, and the client is still served.
    let config = admin.show("CONFIG").await.expect("SHOW CONFIG");
    let size = config
        .iter()
        .find(|r| r["key"] == "default_pool_size")
        .expect("key");
    assert_eq!(size["value"], "3");
    client
        .simple_query("select 1")
        .await
        .expect("client still served");
    let reloads = sluice_tests::harness::ops::metric(
        &sluice_proxy::metrics::render(sluice.running().shared()),
        "sluice_reloads_total{outcome=\"failed\"}",
    );
    assert_eq!(reloads, Some(1.0));
    drop((client, admin));
    sluice.shutdown().await;
}
