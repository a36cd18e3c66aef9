//! Per-plugin circuit breaker and statistics counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::shared::mono_ns;

/// Opens after `threshold` failures within `window`, for `cooldown`.
pub(crate) struct Breaker {
    threshold: u32,
    window_ns: u64,
    cooldown_ns: u64,
    failures: Mutex<VecDeque<u64>>,
    /// `mono_ns()` until which the breaker is open; 0 = closed. Checked on every call.
    open_until: AtomicU64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Breaker {
    pub(crate) fn new(threshold: u32, window: Duration, cooldown: Duration) -> Self {
        Breaker {
            threshold,
            window_ns: ns(window),
            cooldown_ns: ns(cooldown),
            failures: Mutex::new(VecDeque::new()),
            open_until: AtomicU64::new(0),
        }
    }

    /// Whether calls are skipped now. One relaxed load while closed.
    pub(crate) fn is_open(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if mono_ns() < until {
            return true;
        }
        // Cooldown over: close (half-open: the next failures count afresh).
        self.open_until.store(0, Ordering::Relaxed);
        false
    }

    /// Records a failure; true if that opened the breaker.
    pub(crate) fn record_failure(&self) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let now = mono_ns();
        let mut f = self.failures.lock();
        f.push_back(now);
        while f
            .front()
            .is_some_and(|&t| now.saturating_sub(t) > self.window_ns)
        {
            f.pop_front();
        }
        if f.len() >= self.threshold as usize {
            f.clear();
            self.open_until.store(
                now.saturating_add(self.cooldown_ns).max(1),
                Ordering::Relaxed,
            );
            return true;
        }
        false
    }
}

/// Decision outcomes counted per plugin, in [`Counters::decisions`] order.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Admit = 0,
    Reject = 1,
    Proceed = 2,
    Actions = 3,
    FailOpen = 4,
    FailClosed = 5,
    BreakerSkip = 6,
}

pub(crate) const OUTCOME_NAMES: [&str; 7] = [
    "admit",
    "reject",
    "proceed",
    "actions",
    "fail_open",
    "fail_closed",
    "breaker_skip",
];

/// Monotonic statistics of one plugin name; survive reloads.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) calls: [AtomicU64; 6],
    pub(crate) call_ns: AtomicU64,
    pub(crate) traps: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) invalid: AtomicU64,
    pub(crate) decisions: [AtomicU64; 7],
}

impl Counters {
    pub(crate) fn decided(&self, o: Outcome) {
        self.decisions[o as usize].fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_and_closes() {
        let b = Breaker::new(3, Duration::from_secs(10), Duration::from_millis(30));
        assert!(!b.record_failure());
        assert!(!b.record_failure());
        assert!(!b.is_open());
        assert!(b.record_failure());
        assert!(b.is_open());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!b.is_open());
        assert!(!Breaker::new(0, Duration::from_secs(1), Duration::from_secs(1)).record_failure());
    }
}
