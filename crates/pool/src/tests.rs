//! Pool tests with fake connections: reuse, priority hand-off, quotas, shedding, dirty
//! connections, cancelled waiters and failing connects. No sockets.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{
    BoxFuture, CheckoutError, ClassSpec, Connector, KeyLimit, Pool, PoolSettings, Poolable,
    SharedLimit, Ticket,
};

struct FakeConn {
    id: usize,
    dirty: bool,
    alive: Arc<AtomicBool>,
}

impl Poolable for FakeConn {
    fn reusable(&self) -> bool {
        !self.dirty
    }
    fn healthy(&mut self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

#[derive(Clone, Default)]
struct Fake {
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    fail: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
}

impl Fake {
    fn new() -> Self {
        let f = Fake::default();
        f.alive.store(true, Ordering::SeqCst);
        f
    }
}

impl Connector for Fake {
    type Conn = FakeConn;
    type Error = String;
    fn connect(&self) -> BoxFuture<Result<FakeConn, String>> {
        let fail = self.fail.load(Ordering::SeqCst);
        let id = self.opened.fetch_add(1, Ordering::SeqCst);
        let alive = self.alive.clone();
        Box::pin(async move {
            tokio::task::yield_now().await;
            if fail {
                Err("password authentication failed".to_string())
            } else {
                Ok(FakeConn {
                    id,
                    dirty: false,
                    alive,
                })
            }
        })
    }
    fn close(&self, _conn: FakeConn) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn settings(size: u32, classes: Vec<ClassSpec>) -> PoolSettings {
    PoolSettings {
        name: Arc::from("appdb.app"),
        size,
        min_size: 0,
        idle_timeout: None,
        lifetime: None,
        wait_timeout: Some(Duration::from_secs(30)),
        login_retry: Duration::from_secs(15),
        classes,
        aging_per_sec: 0.0,
    }
}

fn class(name: &str, priority: i32, max_active: Option<u32>, max_wait: Option<u64>) -> ClassSpec {
    ClassSpec {
        name: Arc::from(name),
        priority,
        max_active,
        reserved: 0,
        max_wait: max_wait.map(Duration::from_millis),
    }
}

fn t(class: usize, priority: i32) -> Ticket {
    Ticket {
        class,
        priority: Some(priority),
        key: None,
    }
}

#[tokio::test]
async fn a_released_connection_is_reused() {
    let fake = Fake::new();
    let pool = Pool::new(settings(1, vec![]), fake.clone(), vec![]);
    let id = pool.checkout(t(0, 0)).await.unwrap().id;
    let again = pool.checkout(t(0, 0)).await.unwrap().id;
    assert_eq!(id, again);
    assert_eq!(fake.opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dirty_connection_is_closed_not_reused() {
    let fake = Fake::new();
    let pool = Pool::new(settings(1, vec![]), fake.clone(), vec![]);
    let mut g = pool.checkout(t(0, 0)).await.unwrap();
    let first = g.id;
    g.dirty = true;
    drop(g);
    assert_eq!(fake.closed.load(Ordering::SeqCst), 1);
    let g = pool.checkout(t(0, 0)).await.unwrap();
    assert_ne!(g.id, first);
}

#[tokio::test]
async fn high_priority_waiter_overtakes_earlier_low_ones() {
    let fake = Fake::new();
    let classes = vec![class("batch", 0, None, None), class("web", 100, None, None)];
    let pool = Pool::new(settings(2, classes), fake, vec![]);
    let a = pool.checkout(t(0, 0)).await.unwrap();
    let b = pool.checkout(t(0, 0)).await.unwrap();
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, ticket) in [("low-1", t(0, 0)), ("low-2", t(0, 0)), ("web", t(1, 100))] {
        let (p, order) = (pool.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let g = p.checkout(ticket).await.unwrap();
            order.lock().push(name);
            drop(g);
        }));
        // Each waiter must be queued before the next arrives, so arrival order is known.
        while pool.stats().waiting < tasks.len() as u32 {
            tokio::task::yield_now().await;
        }
    }
    drop(a);
    for task in tasks {
        task.await.unwrap();
    }
    drop(b);
    assert_eq!(order.lock()[0], "web");
}

#[tokio::test]
async fn class_quota_holds_under_concurrency() {
    let fake = Fake::new();
    let classes = vec![
        class("batch", 0, Some(2), None),
        class("web", 10, None, None),
    ];
    let pool = Pool::new(settings(5, classes), fake, vec![]);
    let in_use = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let peak = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (pool, in_use, peak) = (pool.clone(), in_use.clone(), peak.clone());
        let c = i % 2;
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let g = pool.checkout(t(c, 0)).await.unwrap();
                let n = in_use[c].fetch_add(1, Ordering::SeqCst) + 1;
                peak[c].fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                in_use[c].fetch_sub(1, Ordering::SeqCst);
                drop(g);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(peak[0].load(Ordering::SeqCst) <= 2, "batch quota exceeded");
    assert!(peak[0].load(Ordering::SeqCst) + peak[1].load(Ordering::SeqCst) >= 3);
    let s = pool.stats();
    assert_eq!((s.active, s.waiting), (0, 0));
    assert!(s.idle <= 5);
}

#[tokio::test]
async fn key_quota_holds_under_concurrency() {
    let fake = Fake::new();
    let pool = Pool::new(settings(6, vec![]), fake, vec![]);
    let in_use = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (pool, in_use, peak) = (pool.clone(), in_use.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..30 {
                let ticket = Ticket {
                    class: 0,
                    priority: Some(0),
                    key: Some(KeyLimit {
                        key: Arc::from("10.1.1.1"),
                        max_active: 2,
                    }),
                };
                let g = pool.checkout(ticket).await.unwrap();
                let n = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                in_use.fetch_sub(1, Ordering::SeqCst);
                drop(g);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_waiter_past_its_class_budget_is_shed() {
    let fake = Fake::new();
    let classes = vec![class("batch", 0, None, Some(200))];
    let pool = Pool::new(settings(1, classes), fake, vec![]);
    let _held = pool.checkout(t(0, 0)).await.unwrap();
    let err = pool.checkout(t(0, 0)).await.err().unwrap();
    match err {
        CheckoutError::Shed { class, waited, .. } => {
            assert_eq!(&*class, "batch");
            assert!(waited >= Duration::from_millis(200));
        }
        other => panic!("expected Shed, got {other:?}"),
    }
    let s = pool.stats();
    assert_eq!(s.classes[0].shed_total, 1);
    assert_eq!(s.waiting, 0);
}

#[tokio::test]
async fn query_wait_timeout_names_the_pool() {
    let fake = Fake::new();
    let mut st = settings(1, vec![]);
    st.wait_timeout = Some(Duration::from_millis(100));
    let pool = Pool::new(st, fake, vec![]);
    let _held = pool.checkout(t(0, 0)).await.unwrap();
    let err = pool.checkout(t(0, 0)).await.err().unwrap();
    assert!(matches!(err, CheckoutError::Timeout { .. }));
    assert!(err.to_string().contains("appdb.app"), "{err}");
}

#[tokio::test]
async fn a_cancelled_waiter_loses_nothing() {
    let fake = Fake::new();
    let pool = Pool::new(settings(1, vec![]), fake.clone(), vec![]);
    let held = pool.checkout(t(0, 0)).await.unwrap();
    let p = pool.clone();
    let waiter = tokio::spawn(async move { p.checkout(t(0, 0)).await.map(|g| g.id) });
    while pool.stats().waiting == 0 {
        tokio::task::yield_now().await;
    }
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.stats().waiting, 0);
    drop(held);
    let s = pool.stats();
    assert_eq!((s.active, s.idle), (0, 1));
    assert!(pool.checkout(t(0, 0)).await.is_ok());
    assert_eq!(fake.opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failing_server_fails_waiters_fast() {
    let fake = Fake::new();
    fake.fail.store(true, Ordering::SeqCst);
    let pool = Pool::new(settings(2, vec![]), fake.clone(), vec![]);
    let err = pool.checkout(t(0, 0)).await.err().unwrap();
    assert!(matches!(err, CheckoutError::Connect(ref m) if m.contains("password")));
    // Within server_login_retry no new attempt is made.
    let err = pool.checkout(t(0, 0)).await.err().unwrap();
    assert!(matches!(err, CheckoutError::Connect(_)));
    assert_eq!(fake.opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dead_idle_connection_is_replaced_at_checkout() {
    let fake = Fake::new();
    let pool = Pool::new(settings(1, vec![]), fake.clone(), vec![]);
    drop(pool.checkout(t(0, 0)).await.unwrap());
    fake.alive.store(false, Ordering::SeqCst);
    let p = pool.clone();
    let f = fake.clone();
    // The replacement is alive again.
    let task = tokio::spawn(async move { p.checkout(t(0, 0)).await.map(|g| g.id) });
    while f.closed.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    fake.alive.store(true, Ordering::SeqCst);
    assert_eq!(task.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn a_shared_limit_caps_connections_across_pools() {
    let limit = SharedLimit::new("appdb", 2);
    let a = Pool::new(settings(2, vec![]), Fake::new(), vec![limit.clone()]);
    let b = Pool::new(settings(2, vec![]), Fake::new(), vec![limit.clone()]);
    let a1 = a.checkout(t(0, 0)).await.unwrap();
    let a2 = a.checkout(t(0, 0)).await.unwrap();
    assert_eq!(limit.used(), 2);
    let b2 = b.clone();
    let waiter = tokio::spawn(async move { b2.checkout(t(0, 0)).await.map(|g| g.id) });
    while b.stats().waiting == 0 {
        tokio::task::yield_now().await;
    }
    drop(a1);
    // a's released connection is closed because b is hungry for the shared slot.
    assert!(waiter.await.unwrap().is_ok());
    assert!(limit.used() <= 2);
    drop(a2);
}

#[tokio::test]
async fn reconnect_closes_connections_on_release() {
    let fake = Fake::new();
    let pool = Pool::new(settings(2, vec![]), fake.clone(), vec![]);
    let g = pool.checkout(t(0, 0)).await.unwrap();
    pool.reconnect();
    drop(g);
    assert_eq!(fake.closed.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats().idle, 0);
}

#[tokio::test]
async fn one_timer_gives_the_notice_then_the_timeout() {
    let fake = Fake::new();
    let mut st = settings(1, vec![]);
    st.wait_timeout = Some(Duration::from_millis(300));
    let pool = Pool::new(st, fake, vec![]);
    let _held = pool.checkout(t(0, 0)).await.unwrap();
    let started = std::time::Instant::now();
    let mut notices = Vec::new();
    let err = pool
        .checkout_notify(t(0, 0), Some(Duration::from_millis(100)), || {
            notices.push(started.elapsed());
        })
        .await
        .err()
        .unwrap();
    let waited = match err {
        CheckoutError::Timeout { waited, .. } => waited,
        other => panic!("expected Timeout, got {other:?}"),
    };
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert_eq!(notices.len(), 1, "one notice: {notices:?}");
    assert!(
        notices[0] >= Duration::from_millis(100) && notices[0] < waited,
        "the notice comes after 100 ms and before the timeout: {notices:?}, {waited:?}"
    );
    // A notice point past the budget never comes.
    let mut late = 0;
    let err = pool
        .checkout_notify(t(0, 0), Some(Duration::from_secs(5)), || late += 1)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, CheckoutError::Timeout { .. }), "{err:?}");
    assert_eq!(late, 0);
    assert_eq!(pool.stats().waiting, 0);
}

#[tokio::test]
async fn a_waiter_served_after_its_notice_gets_the_connection() {
    let fake = Fake::new();
    let pool = Pool::new(settings(1, vec![]), fake, vec![]);
    let held = pool.checkout(t(0, 0)).await.unwrap();
    let first = held.id;
    let p = pool.clone();
    let noticed = Arc::new(tokio::sync::Notify::new());
    let tell = noticed.clone();
    let waiter = tokio::spawn(async move {
        let mut notices = 0;
        let g = p
            .checkout_notify(t(0, 0), Some(Duration::from_millis(50)), || {
                notices += 1;
                tell.notify_one();
            })
            .await;
        (g.map(|g| g.id), notices)
    });
    noticed.notified().await;
    drop(held);
    let (got, notices) = waiter.await.unwrap();
    assert_eq!(
        got.unwrap(),
        first,
        "the released connection goes to the waiter"
    );
    assert_eq!(notices, 1);
}
