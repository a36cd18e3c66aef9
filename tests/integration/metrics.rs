//! The Prometheus endpoint, scraped over HTTP while load runs, and the shape of its text.

use std::collections::{BTreeMap, BTreeSet};
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

/// One metric family of a scrape: its `# TYPE` and its samples (whole lines) in order.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    samples: Vec<String>,
}

/// Parses Prometheus text format strictly enough to catch what scrapers trip over: every family
/// has `# HELP` then `# TYPE` (once each) before its first sample, and all its samples form one
/// block, not interleaved with another family's. Histogram samples (`_bucket`, `_sum`,
/// `_count`) belong to their family.
fn families(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let mut helps = BTreeSet::new();
    // Families whose block has ended: another family's lines came after them.
    let mut closed = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut enter = |name: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() == Some(name) {
            return Ok(());
        }
        if closed.contains(name) {
            return Err(format!("{name}: its lines are not one contiguous block"));
        }
        if let Some(prev) = current.replace(name.to_owned()) {
            closed.insert(prev);
        }
        Ok(())
    };
    for (i, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            enter(name, &mut current)?;
            if !helps.insert(name.to_owned()) {
                return Err(format!("line {i}: second HELP for {name}"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| format!("line {i}: malformed TYPE: {line}"))?;
            enter(name, &mut current)?;
            if !helps.contains(name) {
                return Err(format!("line {i}: TYPE of {name} without a HELP before it"));
            }
            if out.contains_key(name) {
                return Err(format!("line {i}: second TYPE for {name}"));
            }
            out.insert(
                name.to_owned(),
                Family {
                    kind: kind.to_owned(),
                    samples: Vec::new(),
                },
            );
        } else if line.starts_with('#') {
            continue;
        } else {
            let name = line
                .split(['{', ' '])
                .next()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| format!("line {i}: malformed sample: {line}"))?;
            let family = if out.contains_key(name) {
                name
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        let base = name.strip_suffix(suffix)?;
                        (out.get(base)?.kind == "histogram").then_some(base)
                    })
                    .ok_or_else(|| format!("line {i}: sample of {name} before any TYPE for it"))?
            };
            enter(family, &mut current)?;
            out.get_mut(family)
                .expect("typed above")
                .samples
                .push(line.to_owned());
        }
    }
    Ok(out)
}

#[test]
fn the_format_checker_rejects_interleaved_and_untyped_families() {
    let good =
        "# HELP a_total A.\n# TYPE a_total counter\na_total{p=\"x\"} 1\na_total{p=\"y\"} 2\n\
                # HELP b B.\n# TYPE b gauge\nb{p=\"x\"} 1\n";
    let f = families(good).expect("well-formed");
    assert_eq!(f["a_total"].samples.len(), 2);
    assert_eq!(f["b"].kind, "gauge");
    // The shape the per-pool loops used to produce: a second family's samples inside the first's
    // block, with no HELP/TYPE of their own.
    let untyped =
        "# HELP a_total A.\n# TYPE a_total counter\na_total{p=\"x\"} 1\nb_total{p=\"x\"} 0\n";
    assert!(families(untyped).is_err());
    let interleaved = "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\n\
                       a{p=\"x\"} 1\nb{p=\"x\"} 1\na{p=\"y\"} 1\n";
    assert!(families(interleaved).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_has_help_type_and_one_block_of_samples() {
    let pg = PgCluster::shared();
    // Two pools and two plugins, so that per-pool, per-class and per-plugin families each have
    // several samples and any interleaving between families shows.
    let b = ConfigBuilder::new(pg)
        .set_str("metrics_addr", "127.0.0.1:0")
        .append(RELAXED_POLICY)
        .append(&plugin_toml(
            "priority",
            "priority",
            "closed",
            &[r#"default = "default""#],
        ))
        .append(&plugin_toml(
            "deny-ddl",
            "deny-ddl",
            "closed",
            &[r#"roles = "md5user""#],
        ));
    let sluice = SluiceHandle::start(b).await;
    let addr = sluice.running().metrics_addr().expect("metrics listener");
    let mut clients = Vec::new();
    for db in ["appdb", "otherdb"] {
        let c = connect_app(&sluice, "app", db, "met-format")
            .await
            .unwrap_or_else(|e| panic!("login to {db}: {e}"));
        c.simple_query("select 1")
            .await
            .unwrap_or_else(|e| panic!("select on {db}: {e}"));
        clients.push(c);
    }

    let text = scrape_metrics(addr).await.expect("scrape");
    let fams = families(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for (name, f) in &fams {
        assert!(
            ["counter", "gauge", "histogram"].contains(&f.kind.as_str()),
            "{name}: unexpected TYPE {}",
            f.kind
        );
        assert!(
            !name.ends_with("_total") || f.kind == "counter",
            "{name} is a _total but typed {}",
            f.kind
        );
    }
    // The types documented in docs/operations.md.
    let documented = [
        ("sluice_up", "gauge"),
        ("sluice_uptime_seconds", "gauge"),
        ("sluice_transactions_total", "counter"),
        ("sluice_queries_total", "counter"),
        ("sluice_client_connections_total", "counter"),
        ("sluice_client_connections_refused_total", "counter"),
        ("sluice_clients", "gauge"),
        ("sluice_pool_servers", "gauge"),
        ("sluice_pool_size", "gauge"),
        ("sluice_pool_waiting", "gauge"),
        ("sluice_server_connects_total", "counter"),
        ("sluice_server_connect_errors_total", "counter"),
        ("sluice_checkout_errors_total", "counter"),
        ("sluice_abandoned_transactions_total", "counter"),
        ("sluice_server_resets_total", "counter"),
        ("sluice_class_active", "gauge"),
        ("sluice_class_waiting", "gauge"),
        ("sluice_class_shed_total", "counter"),
        ("sluice_queue_wait_seconds", "histogram"),
        ("sluice_reloads_total", "counter"),
        ("sluice_policy_reloads_total", "counter"),
        ("sluice_policy_rejections_total", "counter"),
        ("sluice_policy_calls_total", "counter"),
        ("sluice_policy_call_seconds_total", "counter"),
        ("sluice_policy_traps_total", "counter"),
        ("sluice_policy_timeouts_total", "counter"),
        ("sluice_policy_invalid_decisions_total", "counter"),
        ("sluice_policy_breaker_open", "gauge"),
        ("sluice_policy_generation", "gauge"),
        ("sluice_policy_decisions_total", "counter"),
    ];
    for (name, kind) in documented {
        let f = fams
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in:\n{text}"));
        assert_eq!(f.kind, kind, "TYPE of {name}");
    }
    // The families that used to share a loop with another carry samples of both pools / plugins.
    let has = |family: &str, label: &str| fams[family].samples.iter().any(|l| l.contains(label));
    for family in [
        "sluice_server_connects_total",
        "sluice_server_connect_errors_total",
        "sluice_class_active",
        "sluice_class_waiting",
        "sluice_class_shed_total",
    ] {
        for pool in ["appdb.app", "otherdb.app"] {
            assert!(
                has(family, &format!("pool=\"{pool}\"")),
                "{family} lacks pool {pool}:\n{text}"
            );
        }
    }
    for family in [
        "sluice_policy_call_seconds_total",
        "sluice_policy_traps_total",
        "sluice_policy_timeouts_total",
        "sluice_policy_invalid_decisions_total",
        "sluice_policy_breaker_open",
        "sluice_policy_generation",
        "sluice_policy_decisions_total",
    ] {
        for plugin in ["priority", "deny-ddl"] {
            assert!(
                has(family, &format!("plugin=\"{plugin}\"")),
                "{family} lacks plugin {plugin}:\n{text}"
            );
        }
    }
    let opened = metric(&text, "sluice_server_connects_total{pool=\"otherdb.app\"}")
        .expect("otherdb connects");
    assert!(
        opened >= 1.0,
        "the otherdb pool opened a server connection: {opened}"
    );
    assert_eq!(
        metric(&text, "sluice_policy_breaker_open{plugin=\"deny-ddl\"}"),
        Some(0.0)
    );
    drop(clients);
    sluice.shutdown().await;
}
