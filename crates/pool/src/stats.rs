//! Pool statistics and a fixed-bucket histogram for queue waits.

use std::sync::Arc;
use std::time::Duration;

use crate::sched::ClassSnapshot;

/// Upper bounds of the wait histogram buckets, in seconds (Prometheus `le` labels).
pub const WAIT_BUCKETS: [f64; 14] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A cumulative histogram of durations with the [`WAIT_BUCKETS`] bounds.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Count per bucket (not cumulative); the last slot counts values over every bound.
    pub buckets: [u64; WAIT_BUCKETS.len() + 1],
    /// Number of observations.
    pub count: u64,
    /// Sum of observations, in microseconds.
    pub sum_us: u64,
}

impl Histogram {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = WAIT_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(WAIT_BUCKETS.len());
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_us += d.as_micros() as u64;
    }
}

/// A snapshot of one pool.
#[derive(Debug, Clone)]
pub struct PoolStats {
    /// Pool name.
    pub name: Arc<str>,
    /// Configured size.
    pub size: u32,
    /// Connections checked out.
    pub active: u32,
    /// Idle connections.
    pub idle: u32,
    /// Connections being opened.
    pub connecting: u32,
    /// Waiters in the queue.
    pub waiting: u32,
    /// Whether PAUSE holds the pool.
    pub paused: bool,
    /// Connections granted since start.
    pub checkouts: u64,
    /// Server connections opened since start.
    pub connects: u64,
    /// Failed open attempts since start.
    pub connect_errors: u64,
    /// Wait histogram per class (same order as `classes`).
    pub waits: Vec<Histogram>,
    /// Per-class state.
    pub classes: Vec<ClassSnapshot>,
}

impl PoolStats {
    /// The longest current wait across classes.
    pub fn max_wait(&self) -> Duration {
        self.classes
            .iter()
            .map(|c| c.oldest_wait)
            .max()
            .unwrap_or_default()
    }
}
