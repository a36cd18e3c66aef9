//! Coarse deadlines, fired by the maintenance tick instead of a timer.
//!
//! Every login carries a deadline (`client_login_timeout`, 60 s by default) that almost never
//! fires. On tokio's timer wheel, arming one woke the IO driver (an eventfd write, then an extra
//! round through epoll), and while any login was in progress every park of the runtime read the
//! clock and scanned the wheel: about 2,500 instructions and two system calls per connection, 5 %
//! of a connect-per-transaction workload. Here arming is a push onto a queue kept in deadline
//! order, and the maintenance tick, which runs anyway, fires whatever is due. An alarm therefore
//! fires up to one tick (100 ms) after its deadline. This is cheaper still than
//! [`sluice_pool::timer`]: every login has the same timeout, so deadlines arrive in order and a
//! queue needs no slot, no heap and never re-arms a timerfd.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::Instant;

use parking_lot::Mutex;

/// Above this many queued alarms, a tick also drops the ones nobody waits on any more, wherever
/// they are in the queue (normally only those at the front go).
const COMPACT_ABOVE: usize = 1024;

/// The armed alarms, earliest deadline first.
#[derive(Default)]
pub struct Alarms {
    queue: Mutex<VecDeque<(Instant, Weak<Alarm>)>>,
}

impl Alarms {
    /// An alarm that fires at `deadline` (at the first tick after it). Dropping every handle
    /// disarms it.
    pub fn arm(&self, deadline: Instant) -> Arc<Alarm> {
        let alarm = Arc::new(Alarm::default());
        let entry = (deadline, Arc::downgrade(&alarm));
        let mut queue = self.queue.lock();
        // Deadlines come in order unless a reload shortened the timeout.
        if queue.back().is_none_or(|(last, _)| *last <= deadline) {
            queue.push_back(entry);
        } else {
            let at = queue.partition_point(|(d, _)| *d <= deadline);
            queue.insert(at, entry);
        }
        alarm
    }

    /// Fires every alarm due at `now`, and forgets the disarmed ones at the front of the queue.
    pub fn fire_due(&self, now: Instant) {
        let mut queue = self.queue.lock();
        while let Some((deadline, weak)) = queue.front() {
            match weak.upgrade() {
                None => {}
                Some(_) if *deadline > now => break,
                Some(alarm) => alarm.fire(),
            }
            queue.pop_front();
        }
        // A login stuck at the front keeps every later entry queued until it ends; bound that.
        if queue.len() > COMPACT_ABOVE {
            queue.retain(|(_, weak)| weak.strong_count() > 0);
        }
    }

    /// How many alarms are queued, disarmed ones not yet forgotten included.
    pub fn len(&self) -> usize {
        self.queue.lock().len()
    }

    /// Whether no alarm is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.lock().is_empty()
    }
}

/// One deadline. [`Alarm::wait`] completes once it has fired.
#[derive(Default)]
pub struct Alarm {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Alarm {
    fn fire(&self) {
        let waker = {
            let mut slot = self.waker.lock();
            self.fired.store(true, Ordering::Release);
            slot.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the deadline has passed (and a tick has seen it).
    pub fn has_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Completes when `alarm` fires; never, when there is no alarm.
    pub fn wait(alarm: Option<&Self>) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            let Some(alarm) = alarm else {
                return Poll::Pending;
            };
            if alarm.has_fired() {
                return Poll::Ready(());
            }
            let mut slot = alarm.waker.lock();
            // Checked again under the lock `fire` takes, so a firing cannot slip in between.
            if alarm.has_fired() {
                return Poll::Ready(());
            }
            match slot.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Wake};
    use std::time::Duration;

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_once(f: std::pin::Pin<&mut impl Future<Output = ()>>, count: &Arc<Count>) -> bool {
        let waker = Waker::from(count.clone());
        f.poll(&mut Context::from_waker(&waker)).is_ready()
    }

    #[test]
    fn fires_at_the_first_tick_after_its_deadline_and_wakes_the_waiter() {
        let alarms = Alarms::default();
        let t0 = Instant::now();
        let alarm = alarms.arm(t0 + Duration::from_secs(5));
        let count = Arc::new(Count::default());
        let mut wait = pin!(Alarm::wait(Some(&alarm)));
        assert!(!poll_once(wait.as_mut(), &count));

        alarms.fire_due(t0 + Duration::from_secs(4));
        assert!(!alarm.has_fired());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);

        alarms.fire_due(t0 + Duration::from_secs(5));
        assert!(alarm.has_fired());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(poll_once(wait.as_mut(), &count));
        assert!(alarms.is_empty());
    }

    #[test]
    fn a_shorter_deadline_armed_later_fires_first() {
        let alarms = Alarms::default();
        let t0 = Instant::now();
        let long = alarms.arm(t0 + Duration::from_secs(60));
        let short = alarms.arm(t0 + Duration::from_secs(1));
        alarms.fire_due(t0 + Duration::from_secs(2));
        assert!(short.has_fired());
        assert!(!long.has_fired());
        assert_eq!(alarms.len(), 1);
    }

    #[test]
    fn disarmed_alarms_are_forgotten_and_never_fire() {
        let alarms = Alarms::default();
        let t0 = Instant::now();
        let kept = alarms.arm(t0 + Duration::from_secs(1));
        for _ in 0..COMPACT_ABOVE + 10 {
            drop(alarms.arm(t0 + Duration::from_secs(2)));
        }
        // The live alarm at the front holds the queue until a tick compacts it.
        alarms.fire_due(t0);
        assert_eq!(alarms.len(), 1);
        drop(kept);
        alarms.fire_due(t0);
        assert!(alarms.is_empty());
    }

    #[test]
    fn no_alarm_never_completes() {
        let count = Arc::new(Count::default());
        let mut wait = pin!(Alarm::wait(None));
        assert!(!poll_once(wait.as_mut(), &count));
    }
}
