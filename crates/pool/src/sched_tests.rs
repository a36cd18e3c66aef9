//! Scheduler unit and property tests: no sockets, no clocks but the ones passed in.

use super::*;
use proptest::prelude::*;

fn class(name: &str, priority: i32, max_active: Option<u32>, reserved: u32) -> ClassSpec {
    ClassSpec {
        name: Arc::from(name),
        priority,
        max_active,
        reserved,
        max_wait: None,
    }
}

fn ticket(class: usize, priority: i32) -> Ticket {
    Ticket {
        class,
        priority: Some(priority),
        key: None,
    }
}

fn keyed(class: usize, key: &str, max: u32) -> Ticket {
    Ticket {
        class,
        priority: Some(0),
        key: Some(KeyLimit {
            key: Arc::from(key),
            max_active: max,
        }),
    }
}

#[test]
fn higher_priority_goes_first_and_ties_are_fifo() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(3, vec![class("a", 0, None, 0)], 0.0, t0);
    s.enqueue(ticket(0, 0), "low-1", t0);
    s.enqueue(ticket(0, 10), "high", t0);
    s.enqueue(ticket(0, 0), "low-2", t0);
    let order: Vec<_> = std::iter::from_fn(|| s.pick(t0).map(|(w, _, _)| w)).collect();
    assert_eq!(order, vec!["high", "low-1", "low-2"]);
}

/// A reload that adds a class sorting before others, and removes one, must not move anyone:
/// sessions, waiters and grants hold class indexes.
#[test]
fn reload_keeps_class_indexes_and_retires_removed_classes() {
    let t0 = Instant::now();
    let before = vec![
        class("default", 0, None, 0),
        class("batch", 0, Some(1), 0),
        class("web", 10, Some(5), 1),
    ];
    let mut s: Scheduler<&str> = Scheduler::new(4, before, 0.0, t0);
    let (batch, web) = (1, 2);
    let held = s.grant_now(&ticket(batch, 0));
    s.enqueue(
        Ticket {
            class: batch,
            priority: None,
            key: None,
        },
        "batch-waiter",
        t0,
    );
    s.set_override(
        web,
        ClassOverride {
            max_active: Some(1),
            max_wait: None,
        },
    );
    let after = vec![
        class("default", 0, None, 0),
        class("analytics", 5, Some(2), 0),
        class("web", 20, Some(5), 1),
    ];
    s.reconfigure(4, after, 0.0);
    assert_eq!(s.class_index("web"), Some(web), "web keeps its index");
    assert_eq!(&*s.class_name(web), "web");
    assert_eq!(s.class_priority(web), 20, "the new priority applies");
    assert_eq!(
        s.class_index("analytics"),
        Some(3),
        "a new class is appended"
    );
    assert_eq!(s.class_index("batch"), None, "batch is gone");
    assert_eq!(
        &*s.class_name(batch),
        "default",
        "its tickets go to the default class"
    );
    let snap = s.snapshot(t0);
    let names: Vec<_> = snap.iter().map(|c| c.name.to_string()).collect();
    assert_eq!(names, ["default", "web", "analytics"]);
    assert_eq!(
        snap[1].max_active,
        Some(5),
        "the reload ended the pressure override"
    );
    s.check_invariants().expect("invariants after reload");
    // The connection batch held releases against batch, not against whatever took index 1.
    s.release(&held);
    s.check_invariants().expect("invariants after release");
    assert_eq!(s.active(), 0);
    // Batch's waiter now waits in the default class, where nothing limits it.
    let (w, g, _) = s.pick(t0).expect("the moved waiter is served");
    assert_eq!((w, g.class), ("batch-waiter", 0));
    // A class that comes back is revived at its old index.
    s.reconfigure(
        4,
        vec![class("default", 0, None, 0), class("batch", 1, None, 0)],
        0.0,
    );
    assert_eq!(s.class_index("batch"), Some(batch));
    assert_eq!(s.class_index("web"), None);
    s.release(&g);
    s.check_invariants().expect("invariants after revival");
}

/// Tickets without a priority of their own take their class's priority when they queue, as it
/// is configured at that moment; waiters already queued keep their place.
#[test]
fn waiters_without_a_priority_use_the_class_priority_of_the_moment() {
    let t0 = Instant::now();
    let classes = vec![class("a", 0, None, 0), class("b", 5, None, 0)];
    let mut s: Scheduler<&str> = Scheduler::new(3, classes, 0.0, t0);
    let none = |class| Ticket {
        class,
        priority: None,
        key: None,
    };
    s.enqueue(none(0), "a-1", t0);
    s.enqueue(none(1), "b-1", t0);
    let (first, g, _) = s.pick(t0).expect("a grant");
    assert_eq!(first, "b-1");
    s.release(&g);
    s.reconfigure(3, vec![class("a", 9, None, 0), class("b", 5, None, 0)], 0.0);
    s.enqueue(none(1), "b-2", t0);
    s.enqueue(none(0), "a-2", t0);
    let order: Vec<_> = std::iter::from_fn(|| s.pick(t0).map(|(w, _, _)| w)).collect();
    // a-1 keeps the place it queued with (priority 0); a-2 queued at the new 9.
    assert_eq!(order, ["a-2", "b-2", "a-1"]);
}

/// The sweep expires waiters against their class budget, else the pool's; only the first is a
/// shed (`sluice_class_shed_total`), the second is a query_wait_timeout.
#[test]
fn expiry_by_pool_timeout_is_not_a_shed() {
    let t0 = Instant::now();
    let mut limited = class("batch", 0, None, 0);
    limited.max_wait = Some(Duration::from_millis(10));
    let classes = vec![class("web", 0, None, 0), limited];
    let mut s: Scheduler<&str> = Scheduler::new(0, classes, 0.0, t0);
    s.enqueue(ticket(0, 0), "web", t0);
    s.enqueue(ticket(1, 0), "batch", t0);
    let later = t0 + Duration::from_millis(50);
    let mut gone = s.expire(later, Some(Duration::from_millis(20)));
    gone.sort_by_key(|e| e.payload);
    let got: Vec<_> = gone.iter().map(|e| (e.payload, e.pool_timeout)).collect();
    assert_eq!(got, [("batch", false), ("web", true)]);
    let shed: Vec<_> = s.snapshot(later).iter().map(|c| c.shed_total).collect();
    assert_eq!(shed, [0, 1]);
}

#[test]
fn class_quota_holds_until_release() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(4, vec![class("batch", 0, Some(1), 0)], 0.0, t0);
    assert!(s.eligible(&ticket(0, 0)));
    let g = s.grant_now(&ticket(0, 0));
    assert!(!s.eligible(&ticket(0, 0)));
    s.enqueue(ticket(0, 0), 1, t0);
    assert!(s.pick(t0).is_none(), "quota must hold");
    assert_eq!(s.eligible_waiting(), 0);
    s.release(&g);
    assert_eq!(s.pick(t0).map(|(w, _, _)| w), Some(1));
}

#[test]
fn reserved_connections_are_held_back_from_other_classes() {
    let t0 = Instant::now();
    let classes = vec![class("batch", 0, None, 0), class("web", 10, None, 1)];
    let mut s: Scheduler<u32> = Scheduler::new(2, classes, 0.0, t0);
    let _g = s.grant_now(&ticket(0, 0));
    assert!(!s.eligible(&ticket(0, 0)), "the last connection is web's");
    assert!(s.eligible(&ticket(1, 10)));
}

#[test]
fn key_quota_parks_waiters_and_lets_others_pass() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(8, vec![class("a", 0, None, 0)], 0.0, t0);
    let g = s.grant_now(&keyed(0, "10.0.0.1", 1));
    s.enqueue(keyed(0, "10.0.0.1", 1), "same-host", t0);
    s.enqueue(ticket(0, 0), "other", t0);
    assert_eq!(s.pick(t0).map(|(w, _, _)| w), Some("other"));
    assert!(
        s.pick(t0).is_none(),
        "same-host stays parked while its key is at quota"
    );
    s.check_invariants().unwrap();
    s.release(&g);
    assert_eq!(s.pick(t0).map(|(w, _, _)| w), Some("same-host"));
    s.check_invariants().unwrap();
}

#[test]
fn aging_lets_an_old_low_priority_waiter_pass_a_new_high_one() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(1, vec![class("a", 0, None, 0)], 10.0, t0);
    s.enqueue(ticket(0, 0), "old-low", t0);
    s.enqueue(ticket(0, 5), "new-high", t0 + Duration::from_secs(1));
    // At pick time old-low has aged 10 points more than new-high: 0 + 10 > 5.
    assert_eq!(
        s.pick(t0 + Duration::from_secs(2)).map(|(w, _, _)| w),
        Some("old-low")
    );
}

#[test]
fn without_aging_priority_is_strict() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(1, vec![class("a", 0, None, 0)], 0.0, t0);
    s.enqueue(ticket(0, 0), "old-low", t0);
    s.enqueue(ticket(0, 5), "new-high", t0 + Duration::from_secs(100));
    assert_eq!(s.pick(t0).map(|(w, _, _)| w), Some("new-high"));
}

#[test]
fn expire_sheds_only_past_the_class_budget() {
    let t0 = Instant::now();
    let mut c = class("batch", 0, None, 0);
    c.max_wait = Some(Duration::from_millis(100));
    let mut s = Scheduler::new(1, vec![c, class("web", 0, None, 0)], 0.0, t0);
    s.enqueue(ticket(0, 0), "batch", t0);
    s.enqueue(ticket(1, 0), "web", t0);
    assert!(s.expire(t0 + Duration::from_millis(50), None).is_empty());
    let gone = s.expire(t0 + Duration::from_millis(150), None);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].payload, "batch");
    assert_eq!(&*gone[0].class, "batch");
    assert_eq!(s.snapshot(t0)[0].shed_total, 1);
    assert_eq!(s.waiting(), 1);
}

fn limits(max_active: Option<u32>, max_wait: Option<Duration>) -> ClassOverride {
    ClassOverride {
        max_active,
        max_wait,
    }
}

#[test]
fn override_tightens_a_quota_live() {
    let t0 = Instant::now();
    let mut s: Scheduler<u32> = Scheduler::new(4, vec![class("batch", 0, None, 0)], 0.0, t0);
    s.set_override(0, limits(Some(0), None));
    assert!(!s.eligible(&ticket(0, 0)));
    s.clear_overrides();
    assert!(s.eligible(&ticket(0, 0)));
}

#[test]
fn overrides_change_only_the_limits_they_set() {
    let t0 = Instant::now();
    let mut s: Scheduler<u32> = Scheduler::new(4, vec![class("batch", 0, None, 0)], 0.0, t0);
    // One plugin caps the class, another (or a later tick) sets only its wait budget.
    s.set_override(0, limits(Some(0), None));
    s.set_override(0, limits(None, Some(Duration::from_millis(50))));
    assert!(
        !s.eligible(&ticket(0, 0)),
        "the cap survives the second change"
    );
    assert_eq!(s.class_max_wait(0), Some(Duration::from_millis(50)));
    s.clear_overrides();
    assert!(s.eligible(&ticket(0, 0)));
    assert_eq!(s.class_max_wait(0), None);
}

#[test]
fn removing_a_parked_waiter_leaves_no_trace() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(4, vec![class("a", 0, None, 0)], 0.0, t0);
    let g = s.grant_now(&keyed(0, "k", 1));
    let id = s.enqueue(keyed(0, "k", 1), 7, t0);
    assert_eq!(s.remove(id), Some(7));
    assert_eq!(s.remove(id), None);
    s.check_invariants().unwrap();
    s.release(&g);
    assert!(s.keys.is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Arrive {
        class: usize,
        prio: i32,
        key: Option<u8>,
    },
    Release(usize),
    GiveUp(usize),
    Expire(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, -5i32..5, proptest::option::of(0u8..3))
            .prop_map(|(class, prio, key)| Op::Arrive { class, prio, key }),
        3 => (0usize..64).prop_map(Op::Release),
        1 => (0usize..64).prop_map(Op::GiveUp),
        1 => (0u64..500).prop_map(Op::Expire),
    ]
}

proptest! {
    /// Random arrivals, releases, give-ups and expiries never exceed a quota, and never leave an
    /// eligible waiter queued while a connection is free.
    #[test]
    fn quotas_hold_and_no_waiter_is_stranded(ops in proptest::collection::vec(op(), 1..200)) {
        let t0 = Instant::now();
        let size = 4u32;
        let mut c0 = class("batch", 0, Some(2), 0);
        c0.max_wait = Some(Duration::from_millis(300));
        let classes = vec![c0, class("web", 5, None, 1), class("other", 1, Some(1), 0)];
        let mut s: Scheduler<u64> = Scheduler::new(size, classes, 2.0, t0);
        let mut grants: Vec<Grant> = Vec::new();
        let mut ids: Vec<WaiterId> = Vec::new();
        let mut clock = 0u64;
        let mut next = 0u64;
        for op in ops {
            clock += 1;
            let now = t0 + Duration::from_millis(clock);
            match op {
                Op::Arrive { class, prio, key } => {
                    let t = Ticket { class, priority: Some(prio), key: key.map(|k| KeyLimit { key: Arc::from(format!("k{k}")), max_active: 1 }) };
                    // Like the pool: take a free connection at once when eligible, else queue.
                    if (s.active() as usize) < size as usize && s.eligible(&t) && s.waiting() == 0 {
                        grants.push(s.grant_now(&t));
                    } else {
                        ids.push(s.enqueue(t, next, now));
                        next += 1;
                    }
                }
                Op::Release(i) => {
                    if !grants.is_empty() {
                        let g = grants.swap_remove(i % grants.len());
                        s.release(&g);
                    }
                }
                Op::GiveUp(i) => {
                    if !ids.is_empty() {
                        let id = ids.swap_remove(i % ids.len());
                        s.remove(id);
                    }
                }
                Op::Expire(ms) => {
                    s.expire(now + Duration::from_millis(ms), None);
                }
            }
            // Dispatch free connections, as the pool does after every change.
            while s.active() < size {
                match s.pick(now) {
                    Some((_, g, _)) => grants.push(g),
                    None => break,
                }
            }
            prop_assert!(s.check_invariants().is_ok(), "{:?}", s.check_invariants());
            prop_assert!(s.active() <= size);
            for c in &s.classes {
                if let Some(m) = c.max_active() {
                    prop_assert!(c.active <= m, "class {} over quota", c.spec.name);
                }
            }
            if s.active() < size {
                for w in s.waiters.values() {
                    prop_assert!(!s.eligible(&w.ticket), "eligible waiter stranded with a free connection");
                }
            }
        }
    }
}

proptest! {
    /// One class, random priorities and give-ups, no aging: connections go out by priority,
    /// first come first served within one priority, whatever order the waiters arrived in.
    #[test]
    fn grants_follow_priority_then_arrival(
        arrivals in proptest::collection::vec(-3i32..3, 1..60),
        give_ups in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let t0 = Instant::now();
        let mut s: Scheduler<usize> = Scheduler::new(1, vec![class("a", 0, None, 0)], 0.0, t0);
        let mut model: Vec<(i32, usize)> = Vec::new();
        let mut ids = Vec::new();
        for (n, prio) in arrivals.iter().enumerate() {
            ids.push(s.enqueue(ticket(0, *prio), n, t0));
            model.push((*prio, n));
        }
        for ix in give_ups {
            if model.is_empty() {
                break;
            }
            let (_, n) = model.remove(ix.index(model.len()));
            prop_assert_eq!(s.remove(ids[n]), Some(n));
        }
        // Best first: highest priority, then earliest arrival.
        model.sort_by_key(|(prio, n)| (-prio, *n));
        let want: Vec<usize> = model.iter().map(|(_, n)| *n).collect();
        let mut got = Vec::new();
        while let Some((n, g, _)) = s.pick(t0) {
            got.push(n);
            s.release(&g);
        }
        prop_assert_eq!(got, want);
        prop_assert!(s.check_invariants().is_ok());
    }
}
