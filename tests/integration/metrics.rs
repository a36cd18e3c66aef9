//! The Prometheus endpoint, scraped over HTTP while load runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_tests::harness::ops::{connect_app, metric, plugin_toml, scrape_metrics};
use sluice_tests::harness::{eventually, ConfigBuilder, PgCluster, SluiceHandle};

use crate::policy::RELAXED_POLICY;

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_scraped_under_load_show_progress_and_pool_gauges() {
    let pg = PgCluster::shared();
    let b = ConfigBuilder::new(pg)
        .pool_size(3)
        .set_str("metrics_addr", "127.0.0.1:0")
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "priority",
            "priority",
            "closed",
            &[r#"default = "default""#],
        ));
    let sluice = SluiceHandle::start(b).await;
    let addr = sluice.running().metrics_addr().expect("metrics listener");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");

    // One transaction held open: the active gauge can't be 0 while it lasts.
    let holder = connect_app(&sluice, "app", "appdb", "met-holder")
        .await
        .expect("holder");
    holder
        .batch_execute("begin; select 1")
        .await
        .expect("begin");

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let c = connect_app(&sluice, "app", "appdb", &format!("met-load-{i}"))
            .await
            .expect("load");
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                c.simple_query("select 1")
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }

    let first = scrape_metrics(addr).await.expect("scrape");
    let t0 = metric(&first, "sluice_transactions_total").expect("sluice_transactions_total");
    assert_eq!(metric(&first, "sluice_up"), Some(1.0));
    let series =
        |state: &str| format!("sluice_pool_servers{{pool=\"appdb.app\",state=\"{state}\"}}");
    let (t1, second) = eventually("sluice_transactions_total to grow", WAIT, || async {
        let text = scrape_metrics(addr).await?;
        let t = metric(&text, "sluice_transactions_total").unwrap_or(0.0);
        Ok((t >= t0 + 20.0).then_some((t, text)))
    })
    .await
    .expect("progress");
    assert!(t1 > t0);

    let active = metric(&second, &series("active")).expect("active gauge");
    let idle = metric(&second, &series("idle")).expect("idle gauge");
    assert!(active >= 1.0, "a transaction is held open: active {active}");
    assert!(
        active + idle <= 3.0,
        "pool of 3: active {active}, idle {idle}"
    );
    assert_eq!(
        metric(&second, "sluice_pool_size{pool=\"appdb.app\"}"),
        Some(3.0)
    );
    let clients: f64 = ["idle", "waiting", "active"]
        .iter()
        .filter_map(|s| metric(&second, &format!("sluice_clients{{state=\"{s}\"}}")))
        .sum();
    assert_eq!(clients, 7.0, "7 clients connected");
    assert!(
        second.lines().any(|l| l.starts_with(
            "sluice_queue_wait_seconds_bucket{pool=\"appdb.app\",class=\"default\",le=\"+Inf\"}"
        )),
        "queue-wait histogram missing:\n{second}"
    );
    let connects = metric(
        &second,
        "sluice_policy_calls_total{plugin=\"priority\",hook=\"on-connect\"}",
    )
    .expect("policy call counter");
    assert!(connects >= 7.0, "on-connect calls: {connects}");

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let r = tokio::time::timeout(WAIT, t)
            .await
            .expect("bounded")
            .expect("join");
        r.unwrap_or_else(|e| panic!("load transaction failed: {e}"));
    }
    holder.batch_execute("commit").await.expect("commit");
    // The counter never goes backwards.
    let last = scrape_metrics(addr).await.expect("scrape");
    let t2 = metric(&last, "sluice_transactions_total").expect("counter");
    assert!(t2 >= t1, "{t2} < {t1}");
    drop(holder);
    sluice.shutdown().await;
}
