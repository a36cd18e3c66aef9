//! The time of the runtime's current wake-up, read once and shared by everything that runs in it.
//!
//! A transaction reads the clock three times of its own (its start and end for the statistics,
//! and the pool's check-in), and on a virtual machine each read is an `rdtscp` that costs about
//! 60 ns: together about 1 % of a select-only transaction's CPU. PgBouncer reads the clock once
//! per turn of its event loop and uses that time for everything the turn does; Sluice does the
//! same where the runtime tells it when a turn starts. The binary installs [`on_unpark`] as the
//! runtime's `on_thread_unpark` hook: the first [`now`] after each wake-up reads the clock, and up
//! to [`READS_PER_WAKEUP`] more reuse that time. The bound keeps the time fresh on a busy runtime
//! that polls its tasks for a long while without parking.
//!
//! A policy plugin's call can take a good part of a millisecond: the session calls [`expire`]
//! after one, so the time it reads next (a transaction's start or end) is not from before it.
//!
//! On a thread where the hook never ran (tests, blocking threads), [`now`] reads the clock every
//! time.

use std::cell::Cell;
use std::time::Instant;

/// How many reads after the first one share a wake-up's time.
pub const READS_PER_WAKEUP: u8 = 16;

#[derive(Clone, Copy)]
enum Cached {
    /// No hook on this thread: always read the clock.
    Off,
    /// A wake-up began: the next read takes a fresh time.
    Stale,
    /// The time of this wake-up, and how many more reads may use it.
    Fresh(Instant, u8),
}

thread_local! {
    static CACHED: Cell<Cached> = const { Cell::new(Cached::Off) };
}

/// The current time, or the time read earlier in this wake-up of the runtime (see the module).
#[inline]
pub fn now() -> Instant {
    CACHED.with(|c| match c.get() {
        Cached::Fresh(t, left) if left > 0 => {
            c.set(Cached::Fresh(t, left - 1));
            t
        }
        Cached::Off => read(),
        Cached::Fresh(..) | Cached::Stale => {
            let t = read();
            c.set(Cached::Fresh(t, READS_PER_WAKEUP));
            t
        }
    })
}

/// Marks the start of a wake-up on this thread: the next [`now`] reads the clock. Install as the
/// runtime's `on_thread_unpark` hook.
pub fn on_unpark() {
    CACHED.with(|c| c.set(Cached::Stale));
}

/// Work that may have taken a while ran since the last read (a policy plugin's call): the next
/// [`now`] reads the clock instead of reusing this wake-up's time. No effect without the hook.
pub fn expire() {
    CACHED.with(|c| {
        if !matches!(c.get(), Cached::Off) {
            c.set(Cached::Stale);
        }
    });
}

fn read() -> Instant {
    Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (briefly, spinning) until the clock is past `t`.
    fn pass(t: Instant) {
        while Instant::now() <= t {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn without_the_hook_every_read_is_fresh() {
        std::thread::spawn(|| {
            let a = now();
            pass(a);
            assert!(now() > a);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn a_wake_up_shares_one_time_for_a_bounded_number_of_reads() {
        std::thread::spawn(|| {
            on_unpark();
            let first = now();
            pass(first);
            for _ in 0..READS_PER_WAKEUP {
                assert_eq!(now(), first);
            }
            // The budget is spent: the next read is fresh.
            let later = now();
            assert!(later > first);
            // A new wake-up reads the clock again at once.
            pass(later);
            on_unpark();
            assert!(now() > later);
            // Expired within a wake-up: fresh again, then shared.
            let before = now();
            pass(before);
            expire();
            let after = now();
            assert!(after > before);
            assert_eq!(now(), after);
        })
        .join()
        .expect("thread");
    }
}
