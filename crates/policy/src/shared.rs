//! Host-side state shared by plugin instances: counters and token buckets (which survive
//! reloads), rate-limited logging, flattened settings and the pool-state provider.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::PoolStateProvider;

/// Most counters, and most buckets, one plugin may create.
const MAX_KEYS: usize = 65_536;

/// Nanoseconds on a process-wide monotonic clock (never 0).
pub(crate) fn mono_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// A token bucket.
struct Bucket {
    tokens: f64,
    last_ns: u64,
}

/// One plugin's counters and buckets, looked up by plugin name so they survive reloads.
#[derive(Default)]
pub(crate) struct Namespace {
    counters: DashMap<String, AtomicI64>,
    buckets: DashMap<String, Mutex<Bucket>>,
}

impl Namespace {
    pub(crate) fn counter_add(&self, key: &str, delta: i64) -> i64 {
        let value = if let Some(c) = self.counters.get(key) {
            c.fetch_add(delta, Ordering::Relaxed).wrapping_add(delta)
        } else {
            if delta == 0 {
                return 0;
            }
            if self.counters.len() >= MAX_KEYS {
                return delta;
            }
            let entry = self
                .counters
                .entry(key.to_string())
                .or_insert_with(|| AtomicI64::new(0));
            entry
                .fetch_add(delta, Ordering::Relaxed)
                .wrapping_add(delta)
        };
        if value == 0 {
            self.counters
                .remove_if(key, |_, v| v.load(Ordering::Relaxed) == 0);
        }
        value
    }

    pub(crate) fn counter_get(&self, key: &str) -> i64 {
        self.counters
            .get(key)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn rate_limit(&self, key: &str, per_sec: f64, burst: u32) -> bool {
        if !per_sec.is_finite() || per_sec <= 0.0 {
            return false;
        }
        let burst = f64::from(burst.max(1));
        let now = mono_ns();
        let take = |b: &mut Bucket| {
            let elapsed = now.saturating_sub(b.last_ns) as f64 / 1e9;
            b.tokens = (b.tokens + elapsed * per_sec).min(burst);
            b.last_ns = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                true
            } else {
                false
            }
        };
        if let Some(b) = self.buckets.get(key) {
            return take(&mut b.lock());
        }
        if self.buckets.len() >= MAX_KEYS {
            return true;
        }
        let entry = self.buckets.entry(key.to_string()).or_insert_with(|| {
            Mutex::new(Bucket {
                tokens: burst,
                last_ns: now,
            })
        });
        let allowed = take(&mut entry.lock());
        allowed
    }
}

/// Lets through at most `per_sec` events per second and counts the others.
pub(crate) struct LogLimiter {
    per_sec: u32,
    state: Mutex<(u64, u32, u64)>, // (second, count in that second, suppressed since last allowed)
}

impl LogLimiter {
    pub(crate) fn new(per_sec: u32) -> Self {
        LogLimiter {
            per_sec,
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// `Some(suppressed)` if this event may be logged (with the number dropped before it).
    pub(crate) fn allow(&self) -> Option<u64> {
        let second = mono_ns() / 1_000_000_000;
        let mut s = self.state.lock();
        if s.0 != second {
            s.0 = second;
            s.1 = 0;
        }
        if s.1 < self.per_sec {
            s.1 += 1;
            let suppressed = s.2;
            s.2 = 0;
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}

/// The pool-state provider, settable after the engine exists.
pub(crate) type PoolSource = Arc<RwLock<Option<Arc<dyn PoolStateProvider>>>>;

/// Everything a plugin's host functions need; one per loaded plugin generation.
pub(crate) struct PluginCtx {
    pub(crate) name: String,
    pub(crate) settings: BTreeMap<String, String>,
    pub(crate) ns: Arc<Namespace>,
    pub(crate) log: LogLimiter,
    pub(crate) pool: PoolSource,
}

/// Flattens a settings table: nested tables with dots, scalars in TOML form, arrays joined by ",".
pub(crate) fn flatten_settings(table: &toml::Table) -> BTreeMap<String, String> {
    fn scalar(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(","),
            other => other.to_string(),
        }
    }
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(&key, t, out),
                other => {
                    out.insert(key, scalar(other));
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_buckets() {
        let ns = Namespace::default();
        assert_eq!(ns.counter_add("a", 2), 2);
        assert_eq!(ns.counter_add("a", -2), 0);
        assert_eq!(ns.counters.len(), 0, "a counter back at 0 is forgotten");
        assert_eq!(ns.counter_get("a"), 0);
        assert!(ns.rate_limit("k", 0.001, 2));
        assert!(ns.rate_limit("k", 0.001, 2));
        assert!(!ns.rate_limit("k", 0.001, 2));
        assert!(!ns.rate_limit("z", f64::NAN, 2));
    }

    #[test]
    fn flatten() {
        let t: toml::Table = toml::from_str(
            "web = [\"web\", \"checkout\"]\nn = 5\n[classes.batch]\nmax_wait_ms = 100\n",
        )
        .expect("toml");
        let f = flatten_settings(&t);
        assert_eq!(f["web"], "web,checkout");
        assert_eq!(f["n"], "5");
        assert_eq!(f["classes.batch.max_wait_ms"], "100");
    }

    #[test]
    fn log_limiter() {
        let l = LogLimiter::new(2);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        // The third in the same second is dropped (unless the second just rolled over).
        let third = l.allow();
        assert!(third.is_none() || third == Some(0));
    }
}
