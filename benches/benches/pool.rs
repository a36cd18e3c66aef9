//! Pool checkout micro-benchmarks: an uncontended checkout/release, and checkouts under
//! contention from many tasks on a small pool with two classes.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice_pool::{BoxFuture, ClassSpec, Connector, Pool, PoolSettings, Poolable, Ticket};

struct Conn;

impl Poolable for Conn {
    fn reusable(&self) -> bool {
        true
    }
    fn healthy(&mut self) -> bool {
        true
    }
}

struct Fake;

impl Connector for Fake {
    type Conn = Conn;
    type Error = String;
    fn connect(&self) -> BoxFuture<Result<Conn, String>> {
        Box::pin(async { Ok(Conn) })
    }
    fn close(&self, _c: Conn) {}
}

fn settings(size: u32) -> PoolSettings {
    let class = |name: &str, priority| ClassSpec {
        name: Arc::from(name),
        priority,
        max_active: None,
        reserved: 0,
        max_wait: None,
    };
    PoolSettings {
        name: Arc::from("bench"),
        size,
        min_size: 0,
        idle_timeout: None,
        lifetime: None,
        wait_timeout: Some(Duration::from_secs(60)),
        login_retry: Duration::from_secs(1),
        classes: vec![class("batch", 0), class("web", 100)],
        aging_per_sec: 1.0,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()
        .unwrap();
    let pool = rt.block_on(async { Pool::new(settings(4), Fake, vec![]) });
    let ticket = Ticket {
        class: 1,
        priority: Some(100),
        key: None,
    };
    rt.block_on(async { drop(pool.checkout(ticket.clone()).await.unwrap()) });
    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(1));
    g.bench_function("checkout+release, idle connection", |b| {
        b.iter(|| drop(pool.try_checkout(&ticket).unwrap()))
    });
    const TASKS: usize = 64;
    const EACH: usize = 50;
    g.throughput(Throughput::Elements((TASKS * EACH) as u64));
    g.bench_function("64 tasks x 50 checkouts on a pool of 4, two classes", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut handles = Vec::with_capacity(TASKS);
                for i in 0..TASKS {
                    let pool = pool.clone();
                    handles.push(tokio::spawn(async move {
                        let t = Ticket {
                            class: i % 2,
                            priority: Some(if i % 2 == 1 { 100 } else { 0 }),
                            key: None,
                        };
                        for _ in 0..EACH {
                            let g = pool.checkout(t.clone()).await.unwrap();
                            tokio::task::yield_now().await;
                            drop(g);
                        }
                    }));
                }
                for h in handles {
                    h.await.unwrap();
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
