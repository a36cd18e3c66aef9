//! Counters that every transaction adds to and only the admin console and metrics read.
//!
//! An `AtomicU64::fetch_add` is a locked read-modify-write: about 20 cycles even with no other
//! thread near the line, and a select-only transaction bumped four of them. A [`Counter`] gives
//! each worker thread its own cache line, which only that thread writes, so an add is a plain
//! load and store. A read sums the lines.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Lines with a single writer each. Threads beyond these share the last line and add to it
/// with `fetch_add`. In Sluice the threads that count are the runtime's workers (the main
/// thread with `workers = 1`), well under this; test binaries with many threads fall back.
const OWNED: usize = 15;

/// One thread's share, on its own cache line so that writers never share a line.
#[derive(Default)]
#[repr(align(64))]
struct Line(AtomicU64);

/// A monotonic counter, added to from many threads.
#[derive(Default)]
pub struct Counter {
    lines: [Line; OWNED + 1],
}

/// The next thread's line.
static NEXT_LINE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's line: its own below [`OWNED`], else the shared last one.
    static LINE: usize = NEXT_LINE.fetch_add(1, Ordering::Relaxed).min(OWNED);
}

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        let i = LINE.with(|i| *i);
        let line = &self.lines[i].0;
        if i < OWNED {
            // This thread is the line's only writer: nothing can change it between the two.
            line.store(
                line.load(Ordering::Relaxed).wrapping_add(n),
                Ordering::Relaxed,
            );
        } else {
            line.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The total so far. Adds made on other threads show up a little later, never lost.
    pub fn get(&self) -> u64 {
        self.lines
            .iter()
            .fold(0u64, |sum, l| sum.wrapping_add(l.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More threads than owned lines, all adding at once: the total is exact, whether a
    /// thread owns its line or shares the last one.
    #[test]
    fn adds_from_more_threads_than_lines_are_all_counted() {
        let c = Counter::default();
        let threads = OWNED * 2;
        std::thread::scope(|s| {
            for t in 0..threads {
                let c = &c;
                s.spawn(move || {
                    for _ in 0..10_000 {
                        c.add(t as u64 + 1);
                    }
                });
            }
        });
        let expected: u64 = (1..=threads as u64).map(|n| n * 10_000).sum();
        assert_eq!(c.get(), expected);
    }
}
