//! Cost of one policy hook call through the real `PolicyEngine`, with the `priority` example
//! plugin (built from `plugins/` on first run). Target: on-transaction <= 2 µs median.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice_config::{FailMode, PluginConfig, PolicyConfig};
use sluice_policy::{
    ClassPressure, ClientFacts, PolicyEngine, PoolSnapshot, PressureFacts, TransactionFacts,
};

const SETTINGS: &str = r#"
web = "web,checkout"
batch = "scraper*"
default = "default"
select_boost = 5
pressure_max_active.batch = 3
[priorities]
web = 100
batch = -10
"#;

fn engine() -> std::sync::Arc<PolicyEngine> {
    let cfg = PolicyConfig {
        deadline: Duration::from_millis(1),
        memory_limit: 16 << 20,
        watch: false,
        watch_interval: Duration::from_secs(1),
        breaker_failures: 5,
        breaker_window: Duration::from_secs(10),
        breaker_cooldown: Duration::from_secs(30),
        pressure_interval: Duration::from_millis(100),
        max_query_len: 1024,
        plugins: vec![PluginConfig {
            name: "priority".into(),
            path: sluice_policy::testing::plugin_path("priority"),
            fail: FailMode::Open,
            settings: SETTINGS.parse().expect("settings"),
        }],
    };
    let classes: Vec<String> = ["default", "web", "batch"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    PolicyEngine::new(&cfg, &classes).expect("load priority plugin")
}

fn hooks(c: &mut Criterion) {
    let e = engine();
    let facts = ClientFacts {
        user: "app",
        database: "shop",
        application_name: "checkout",
        addr: Some("10.1.2.3".parse().expect("ip")),
        port: 40000,
        tls: true,
        params: &[],
    };
    c.bench_function("policy/on_connect", |b| {
        b.iter(|| black_box(e.on_connect(black_box(&facts))))
    });

    // A 200-byte query.
    let mut query = String::from("SELECT o.id, o.total, c.email FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.status = $1");
    while query.len() < 200 {
        query.push_str(" AND 1=1");
    }
    query.truncate(200);
    // The priority plugin's cookie for "checkout": (1 << 32) | 100.
    let sluice_policy::ConnectDecision::Admit(admission) = e.on_connect(&facts) else {
        panic!("checkout rejected")
    };
    let cookies = admission.cookies;
    let tx = TransactionFacts {
        cookies: &cookies,
        class: "web",
        kind: sluice_policy::statement_kind(&query),
        in_transaction: false,
        query: &query,
        pool: PoolSnapshot {
            size: 20,
            active: 12,
            idle: 8,
            waiting: 0,
        },
    };
    c.bench_function("policy/on_transaction_200B", |b| {
        b.iter(|| black_box(e.on_transaction(black_box(&tx))))
    });

    let pressure = PressureFacts {
        pool: "shop/app".into(),
        size: 20,
        active: 20,
        idle: 0,
        waiting: 35,
        classes: ["default", "web", "batch"]
            .iter()
            .map(|n| ClassPressure {
                name: (*n).into(),
                active: 6,
                waiting: 10,
                oldest_wait_ms: 120,
                max_active: None,
                max_wait_ms: None,
                shed_total: 0,
            })
            .collect(),
    };
    c.bench_function("policy/on_pressure_3_classes", |b| {
        b.iter(|| black_box(e.on_pressure(black_box(&pressure))))
    });

    let empty = PolicyEngine::empty();
    c.bench_function("policy/on_transaction_no_plugin", |b| {
        b.iter(|| black_box(empty.on_transaction(black_box(&tx))))
    });
}

criterion_group!(benches, hooks);
criterion_main!(benches);
