//! State shared by every task of a running Sluice: config, pools, clients, cancel keys,
//! policies, statistics and shutdown signals. Passed explicitly; there are no globals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::counter::Counter;

use sluice_config::Config;
use sluice_policy::Policy;

use crate::alarms::{Alarms, CoarseClock};
use crate::cancel::CancelMap;
use crate::clients::Clients;
use crate::pools::PoolSet;
use crate::prepared::Registry;

/// Everything a session needs, behind one `Arc`.
pub struct Shared {
    config: ArcSwap<Config>,
    /// Bumped after every config swap: a cheaper "has it changed" than loading the config.
    config_generation: AtomicU64,
    /// Server pools.
    pub pools: PoolSet,
    /// Prepared statements shared by content.
    pub registry: Registry,
    /// Cancel keys.
    pub cancels: CancelMap,
    /// Logged-in clients.
    pub clients: Arc<Clients>,
    /// Policy plugins.
    pub policy: Arc<dyn Policy>,
    /// Counters.
    pub stats: Stats,
    /// Per-key transaction rate limiters.
    pub rates: Rates,
    /// Stop accepting and close idle clients (graceful shutdown).
    pub shutdown: CancellationToken,
    /// Close everything now (shutdown deadline passed).
    pub hard_stop: CancellationToken,
    /// Deadlines that may fire a tick late (`client_login_timeout`).
    pub alarms: Alarms,
    /// The maintenance tick's time, for the idle timeouts (see [`crate::alarms`]).
    pub coarse_clock: CoarseClock,
    /// Every task, for draining.
    pub tracker: TaskTracker,
    /// Key for mock SCRAM salts of unknown users.
    pub mock_key: [u8; 32],
    /// When Sluice started.
    pub started: Instant,
    /// Reload outcomes.
    pub reloads_ok: AtomicU64,
    /// Failed reloads.
    pub reloads_failed: AtomicU64,
    /// One permit per client connection (`max_client_conn`), resized on reload.
    pub client_permits: Arc<tokio::sync::Semaphore>,
    /// Called with the new config after every successful reload, whatever triggered it.
    reload_hook: parking_lot::Mutex<Option<ReloadHook>>,
}

/// See [`Shared::on_reload`].
pub type ReloadHook = Arc<dyn Fn(&Config) + Send + Sync>;

impl Shared {
    /// Builds the shared state.
    pub fn new(config: Config, policy: Arc<dyn Policy>) -> Self {
        let mut mock_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut mock_key);
        let client_permits = Arc::new(tokio::sync::Semaphore::new(
            config.sluice.max_client_conn as usize,
        ));
        let started = Instant::now();
        Shared {
            client_permits,
            config: ArcSwap::from_pointee(config),
            config_generation: AtomicU64::new(0),
            pools: PoolSet::default(),
            registry: Registry::default(),
            cancels: CancelMap::default(),
            clients: Arc::new(Clients::default()),
            policy,
            stats: Stats::default(),
            rates: Rates::default(),
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            alarms: Alarms::default(),
            coarse_clock: CoarseClock::new(started),
            tracker: TaskTracker::new(),
            mock_key,
            started,
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            reload_hook: parking_lot::Mutex::new(None),
        }
    }

    /// Registers `hook`, run (on a blocking thread) after every successful reload, from SIGHUP
    /// and the admin console's RELOAD alike: the binary restarts its plugin watcher there.
    pub fn on_reload(&self, hook: impl Fn(&Config) + Send + Sync + 'static) {
        *self.reload_hook.lock() = Some(Arc::new(hook));
    }

    pub(crate) fn reload_hook(&self) -> Option<ReloadHook> {
        self.reload_hook.lock().clone()
    }

    /// The current config.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The config's generation, bumped by every reload. Read it before the config: a
    /// generation never belongs to a config older than the one read after it.
    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Swaps the config (reload).
    pub fn set_config(&self, cfg: Config) {
        self.config.store(Arc::new(cfg));
        self.config_generation.fetch_add(1, Ordering::Release);
    }
}

/// Process-wide counters.
#[derive(Default)]
pub struct Stats {
    /// Transactions completed.
    pub transactions: Counter,
    /// Queries forwarded.
    pub queries: Counter,
    /// Total transaction time, microseconds.
    pub xact_us: Counter,
    /// Total queue wait, microseconds.
    pub wait_us: Counter,
    /// Checkouts that failed (shed, timeout, connect error).
    pub checkout_errors: Counter,
    /// Transactions rejected by policy.
    pub rejected: Counter,
    /// Transactions abandoned by their client.
    pub abandoned: Counter,
    /// Server sessions reset because a client left state on them.
    pub server_resets: Counter,
    /// Client connections accepted.
    pub accepted: Counter,
    /// Client connections refused at accept (max_client_conn).
    pub refused: Counter,
}

impl Stats {
    /// Records one finished transaction.
    pub fn record_tx(&self, took: Duration, waited: Duration) {
        self.xact_us.add(took.as_micros() as u64);
        self.wait_us.add(waited.as_micros() as u64);
    }
}

/// Token buckets per policy key, with reservations so waiters queue for tokens fairly.
#[derive(Default)]
pub struct Rates {
    buckets: DashMap<String, Mutex<Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Rates {
    /// Takes a token for `key`; returns how long to wait before using it (zero if available).
    pub fn reserve(&self, key: &str, per_sec: f64, burst: u32) -> Duration {
        let per_sec = if per_sec.is_finite() && per_sec > 0.0 {
            per_sec
        } else {
            return Duration::ZERO;
        };
        let burst = f64::from(burst.max(1));
        let now = Instant::now();
        let entry = self.buckets.entry(key.to_string()).or_insert_with(|| {
            Mutex::new(Bucket {
                tokens: burst,
                at: now,
            })
        });
        let mut b = entry.lock();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec).min(burst);
        b.at = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / per_sec)
        }
    }

    /// Gives back a token reserved but not used.
    pub fn refund(&self, key: &str) {
        if let Some(b) = self.buckets.get(key) {
            b.lock().tokens += 1.0;
        }
    }
}
