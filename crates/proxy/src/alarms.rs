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
//!
//! The idle timeouts (`client_idle_timeout`, `idle_transaction_timeout`) are cheaper again: they
//! restart at every transaction, and inside a transaction at every statement, so even a queue
//! push each time is too much. As [`sluice_pool::timer`] sleeps they cost about 400
//! instructions per select-only transaction with both set, 9 % of it: a registration and a
//! removal per transaction (two locks, a heap push, a waker clone) and a reset per statement.
//! PgBouncer checks these timeouts in its periodic maintenance, and so does Sluice:
//! - a session waiting for its client stores a deadline in the [`CoarseClock`]'s milliseconds
//!   in its [`IdleDeadline`], one store ([`IdleWait::start`]), and clears it when the wait ends;
//! - every tick, [`crate::clients::Clients::flag_idle`] flags the clients whose deadline passed
//!   and wakes them;
//! - the flagged session checks the exact time itself ([`IdleWait::timed_out`]), so an idle
//!   timeout never fires early. It fires up to about two ticks late.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::clients::ClientInfo;

/// The maintenance tick's period: how late an alarm or an idle timeout may fire.
pub const TICK: Duration = Duration::from_millis(100);

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

/// The time as of the maintenance tick's last turn, in milliseconds since the instance started:
/// what [`IdleDeadline`]s count in. Reading it is a load; it lags the clock by up to a tick.
#[derive(Debug)]
pub struct CoarseClock {
    epoch: Instant,
    ms: AtomicU64,
}

impl CoarseClock {
    /// A clock counting from `epoch`, reading 0 until [`Self::set`].
    pub fn new(epoch: Instant) -> Self {
        CoarseClock {
            epoch,
            ms: AtomicU64::new(0),
        }
    }

    /// The time of the last [`Self::set`].
    #[inline]
    pub fn now_ms(&self) -> u64 {
        self.ms.load(Ordering::Relaxed)
    }

    /// Moves the clock to `now` (never back); returns the time it reads then.
    pub fn set(&self, now: Instant) -> u64 {
        let ms = millis(now.saturating_duration_since(self.epoch));
        self.ms.fetch_max(ms, Ordering::Relaxed).max(ms)
    }
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// When a client waiting for its own next message times out, in [`CoarseClock`] milliseconds;
/// 0 while it is not waiting under an idle timeout.
#[derive(Debug, Default)]
pub struct IdleDeadline(AtomicU64);

impl IdleDeadline {
    fn arm(&self, at_ms: u64) {
        self.0.store(at_ms.max(1), Ordering::Relaxed);
    }

    /// Clears the deadline: the wait is over.
    #[inline]
    pub fn disarm(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Whether a deadline is set and `now_ms` is past it.
    pub fn passed(&self, now_ms: u64) -> bool {
        let at = self.0.load(Ordering::Relaxed);
        at != 0 && at <= now_ms
    }
}

/// One wait for the client's next message under an idle timeout: when it began and how long it
/// may last. The session clears the client's deadline when the wait is over.
#[derive(Debug, Clone, Copy)]
pub struct IdleWait {
    since: Instant,
    limit: Duration,
}

impl IdleWait {
    /// Starts a wait of at most `limit`, from this wake-up's time: arms `info`'s deadline for the
    /// tick. The deadline has a tick's margin for the coarse clock's lag, so the tick rarely flags
    /// a wait before its time.
    #[inline]
    pub fn start(info: &ClientInfo, clock: &CoarseClock, limit: Duration) -> Self {
        let at = clock
            .now_ms()
            .saturating_add(millis(limit))
            .saturating_add(millis(TICK));
        info.idle.arm(at);
        IdleWait {
            since: sluice_pool::clock::now(),
            limit,
        }
    }

    /// Whether the wait timed out: the tick flagged the client, and `limit` has really passed
    /// since the wait began. A flag left from an earlier wait, or raised early by the coarse
    /// clock, is dropped; the tick flags the client again while its deadline stays passed.
    #[inline]
    pub fn timed_out(&self, info: &ClientInfo) -> bool {
        info.kill.take_idle_flag()
            && sluice_pool::clock::now().saturating_duration_since(self.since) >= self.limit
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
    fn the_coarse_clock_never_goes_back() {
        let epoch = Instant::now();
        let clock = CoarseClock::new(epoch);
        assert_eq!(clock.now_ms(), 0);
        assert_eq!(clock.set(epoch + Duration::from_millis(250)), 250);
        // A tick of another runtime that read the clock a little earlier.
        assert_eq!(clock.set(epoch + Duration::from_millis(200)), 250);
        assert_eq!(clock.now_ms(), 250);
    }

    #[test]
    fn an_idle_wait_arms_its_deadline_with_a_tick_of_margin() {
        let info = ClientInfo::new("u", "db", "app", None, 1, "class");
        let clock = CoarseClock::new(Instant::now());
        clock.set(clock.epoch + Duration::from_millis(1_000));
        let _wait = IdleWait::start(&info, &clock, Duration::from_millis(500));
        assert!(!info.idle.passed(1_599));
        assert!(info.idle.passed(1_600));
        info.idle.disarm();
        assert!(!info.idle.passed(u64::MAX));
    }

    #[test]
    fn an_idle_wait_times_out_only_when_flagged_and_past_its_limit() {
        let info = ClientInfo::new("u", "db", "app", None, 1, "class");
        let limit = Duration::from_secs(60);
        let young = IdleWait {
            since: Instant::now(),
            limit,
        };
        let Some(since) = Instant::now().checked_sub(limit) else {
            return; // A clock too close to its origin to have a wait this old.
        };
        let old = IdleWait { since, limit };
        // Not flagged: the tick has not seen the deadline pass.
        assert!(!old.timed_out(&info));
        // Flagged early (a flag of an earlier wait, or the coarse clock's lag): dropped.
        info.kill.flag_idle();
        assert!(!young.timed_out(&info));
        assert!(!info.kill.take_idle_flag());
        info.kill.flag_idle();
        assert!(old.timed_out(&info));
    }

    #[test]
    fn no_alarm_never_completes() {
        let count = Arc::new(Count::default());
        let mut wait = pin!(Alarm::wait(None));
        assert!(!poll_once(wait.as_mut(), &count));
    }
}
