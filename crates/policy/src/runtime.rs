//! wasmtime plumbing: the engine and its epoch ticker, bindings, host functions, loading a
//! component, and the per-thread instance cache.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    StoreLimits, StoreLimitsBuilder, Trap,
};

use crate::shared::PluginCtx;

/// Generated from `wit/`.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "policy",
    });
}

pub(crate) use bindings::sluice::policy::types as wit;
use bindings::{Policy, PolicyPre};

/// Epoch tick. Deadlines are whole ticks.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// Component instances (and memories) the pooling allocator can hold at once: workers x plugins
/// x 2 generations, with room to spare.
const POOL_INSTANCES: u32 = 512;

/// The wasmtime engine and its epoch ticker thread.
pub(crate) struct Runtime {
    pub(crate) engine: Engine,
    /// Memory slot size of the pooling allocator: the largest `memory_limit` honoured.
    pub(crate) slot_bytes: u64,
    ticker: Arc<Ticker>,
    ticker_thread: Option<JoinHandle<()>>,
}

/// Ticks without a plugin call after which the ticker sleeps until the next call.
const IDLE_TICKS: u32 = 100;

/// Advances the engine's epoch every [`TICK`] while plugins run, so a runaway call reaches its
/// deadline. After [`IDLE_TICKS`] ticks with no call started and none running it sleeps until
/// the next call: an idle pooler does not wake a thousand times a second (measured at 2.5% of a
/// core on a 2-core VM).
pub(crate) struct Ticker {
    /// Calls started so far.
    started: AtomicU64,
    /// Calls running now.
    running: AtomicU32,
    /// The ticker is asleep (or about to be): the next call wakes it.
    parked: AtomicBool,
    stop: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

/// A plugin call in progress, for the ticker.
pub(crate) struct Running<'a>(&'a Ticker);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticker {
    /// Marks a call into wasm (instantiation included) as running until the guard drops.
    pub(crate) fn running(&self) -> Running<'_> {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
        Running(self)
    }

    fn run(&self, engine: &Engine) {
        let mut seen = self.started.load(Ordering::SeqCst);
        let mut idle = 0;
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(TICK);
            engine.increment_epoch();
            let now = self.started.load(Ordering::SeqCst);
            if now != seen || self.running.load(Ordering::SeqCst) > 0 {
                seen = now;
                idle = 0;
                continue;
            }
            idle += 1;
            if idle >= IDLE_TICKS {
                // Announce the sleep, then look again: a call that started in between either
                // shows in `started` here or sees `parked` and unparks us.
                self.parked.store(true, Ordering::SeqCst);
                if self.started.load(Ordering::SeqCst) == seen && !self.stop.load(Ordering::SeqCst)
                {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                idle = 0;
            }
        }
    }
}

impl Runtime {
    pub(crate) fn new(memory_limit: u64) -> Result<Runtime, String> {
        // A slot of at least 16 MiB, in whole wasm pages, so later reloads may raise the limit
        // up to there. Beyond it the limit is capped (`Loaded::link`) and a reload warns.
        let slot_bytes = memory_limit.max(16 << 20).div_ceil(65_536) * 65_536;
        let slot = usize::try_from(slot_bytes).map_err(|e| e.to_string())?;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 8)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES * 4)
            .max_memory_size(slot);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // Hooks are synchronous; the async machinery costs ~0.6 µs per call.
            .concurrency_support(false)
            .memory_init_cow(true)
            .memory_reservation(slot_bytes)
            .memory_guard_size(2 << 20)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| format!("{e:#}"))?;
        let ticker = Arc::new(Ticker {
            started: AtomicU64::new(0),
            running: AtomicU32::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: OnceLock::new(),
        });
        let ticker_thread = {
            let engine = engine.clone();
            let ticker = Arc::clone(&ticker);
            std::thread::Builder::new()
                .name("sluice-policy-epoch".into())
                .spawn(move || {
                    let _ = ticker.thread.set(std::thread::current());
                    ticker.run(&engine);
                })
                .map_err(|e| format!("spawning the epoch ticker: {e}"))?
        };
        Ok(Runtime {
            engine,
            slot_bytes,
            ticker,
            ticker_thread: Some(ticker_thread),
        })
    }
}

impl Runtime {
    /// Whether the epoch ticker is asleep until the next call.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn ticker_asleep(&self) -> bool {
        self.ticker.parked.load(Ordering::SeqCst)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker_thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The data of one plugin instance's `Store`.
pub(crate) struct HostState {
    ctx: Arc<PluginCtx>,
    limits: StoreLimits,
    /// Set when a `memory.grow` was refused: the trap that follows is an out-of-memory.
    memory_denied: bool,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let r = self.limits.memory_growing(current, desired, maximum);
        if !matches!(r, Ok(true)) {
            self.memory_denied = true;
        }
        r
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
}

impl wit::Host for HostState {}

impl bindings::sluice::policy::host::Host for HostState {
    fn log(&mut self, level: wit::LogLevel, msg: String) {
        let Some(suppressed) = self.ctx.log.allow() else {
            return;
        };
        let mut msg = msg;
        crate::convert::truncate(&mut msg, 1024);
        let plugin = self.ctx.name.as_str();
        match level {
            wit::LogLevel::Trace => {
                tracing::trace!(target: "sluice_policy::plugin", plugin, suppressed, "{msg}")
            }
            wit::LogLevel::Debug => {
                tracing::debug!(target: "sluice_policy::plugin", plugin, suppressed, "{msg}")
            }
            wit::LogLevel::Info => {
                tracing::info!(target: "sluice_policy::plugin", plugin, suppressed, "{msg}")
            }
            wit::LogLevel::Warn => {
                tracing::warn!(target: "sluice_policy::plugin", plugin, suppressed, "{msg}")
            }
            wit::LogLevel::Error => {
                tracing::error!(target: "sluice_policy::plugin", plugin, suppressed, "{msg}")
            }
        }
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn monotonic_us(&mut self) -> u64 {
        crate::shared::mono_ns() / 1_000
    }

    fn counter_add(&mut self, key: String, delta: i64) -> i64 {
        self.ctx.ns.counter_add(&key, delta)
    }

    fn counter_get(&mut self, key: String) -> i64 {
        self.ctx.ns.counter_get(&key)
    }

    fn rate_limit(&mut self, key: String, per_sec: f64, burst: u32) -> bool {
        self.ctx.ns.rate_limit(&key, per_sec, burst)
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.ctx.settings.get(&key).cloned()
    }

    fn config_keys(&mut self) -> Vec<String> {
        self.ctx.settings.keys().cloned().collect()
    }

    fn pool_state(&mut self, pool: String) -> Option<wit::PoolSnapshot> {
        let provider = self.ctx.pool.read().clone()?;
        provider.pool_state(&pool).map(|s| wit::PoolSnapshot {
            size: s.size,
            active: s.active,
            idle: s.idle,
            waiting: s.waiting,
        })
    }
}

/// Why a call produced no decision.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// Epoch deadline exceeded.
    Timeout,
    /// A `memory.grow` past the memory limit.
    OutOfMemory,
    /// Any other trap, or a failure to instantiate.
    Trap(String),
    /// The decision broke a rule.
    Invalid(String),
    /// The circuit breaker is open: not called.
    BreakerOpen,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("deadline exceeded"),
            Failure::OutOfMemory => f.write_str("memory limit exceeded"),
            Failure::Trap(m) => write!(f, "trap: {m}"),
            Failure::Invalid(m) => write!(f, "invalid decision: {m}"),
            Failure::BreakerOpen => f.write_str("circuit breaker open"),
        }
    }
}

fn classify(err: &wasmtime::Error, memory_denied: bool) -> Failure {
    if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        Failure::Timeout
    } else if memory_denied {
        Failure::OutOfMemory
    } else {
        // The root cause is the trap kind; the context chain is the guest backtrace.
        let text = format!("{err}");
        Failure::Trap(text.lines().next().unwrap_or("unknown").to_string())
    }
}

/// A compiled, linked plugin, ready to instantiate.
pub(crate) struct Loaded {
    pub(crate) component: Component,
    pre: PolicyPre<HostState>,
    ctx: Arc<PluginCtx>,
    memory_limit: usize,
    deadline_ticks: u64,
    /// `init` (and instantiation) may take longer than a hook: it runs once per instance and
    /// may parse settings.
    init_ticks: u64,
    ticker: Arc<Ticker>,
}

/// Shortest deadline for instantiation plus `init`.
const MIN_INIT_DEADLINE: Duration = Duration::from_millis(100);

/// Epoch ticks for a deadline: one more than the deadline in ticks, because the first tick may
/// come at any moment after the call starts.
pub(crate) fn deadline_ticks(deadline: Duration) -> u64 {
    let ticks = deadline.as_nanos().div_ceil(TICK.as_nanos()).max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX / 2) + 1
}

impl Loaded {
    /// Links `component` (compiled already) against the host functions; unknown imports (WASI
    /// from Rust's std) become traps.
    pub(crate) fn link(
        rt: &Runtime,
        component: Component,
        ctx: Arc<PluginCtx>,
        memory_limit: u64,
        deadline: Duration,
    ) -> Result<Loaded, String> {
        let mut linker = Linker::<HostState>::new(&rt.engine);
        Policy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| format!("linking host functions: {e:#}"))?;
        linker
            .define_unknown_imports_as_traps(&component)
            .map_err(|e| format!("linking: {e:#}"))?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| format!("linking: {e:#}"))?;
        let pre = PolicyPre::new(pre)
            .map_err(|e| format!("not a sluice:policy/policy@0.1.0 component: {e:#}"))?;
        let memory_limit = usize::try_from(memory_limit.min(rt.slot_bytes)).unwrap_or(usize::MAX);
        Ok(Loaded {
            component,
            pre,
            ctx,
            memory_limit,
            deadline_ticks: deadline_ticks(deadline),
            init_ticks: deadline_ticks(deadline.saturating_mul(10).max(MIN_INIT_DEADLINE)),
            ticker: Arc::clone(&rt.ticker),
        })
    }

    /// A fresh instance on which `init` has run.
    pub(crate) fn instantiate(&self) -> Result<(Instance, wit::PluginInfo), Failure> {
        let _running = self.ticker.running();
        let state = HostState {
            ctx: Arc::clone(&self.ctx),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.memory_limit)
                .trap_on_grow_failure(true)
                .build(),
            memory_denied: false,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.set_epoch_deadline(self.init_ticks);
        let fail =
            |e: wasmtime::Error, store: &Store<HostState>| classify(&e, store.data().memory_denied);
        let policy = match self.pre.instantiate(&mut store) {
            Ok(p) => p,
            Err(e) => return Err(fail(e, &store)),
        };
        store.set_epoch_deadline(self.init_ticks);
        let info = match policy.call_init(&mut store) {
            Ok(i) => i,
            Err(e) => return Err(fail(e, &store)),
        };
        Ok((
            Instance {
                store,
                policy,
                deadline_ticks: self.deadline_ticks,
            },
            info,
        ))
    }
}

/// A live instance with its store.
pub(crate) struct Instance {
    store: Store<HostState>,
    policy: Policy,
    deadline_ticks: u64,
}

struct Cached {
    uid: u64,
    owner: Weak<crate::engine::LoadedPlugin>,
    instance: Instance,
}

thread_local! {
    /// This thread's instances, one per live plugin generation.
    static INSTANCES: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` on this thread's instance of `plugin`, creating it if needed, and validates its
/// result with `check`. After a failure (a trap, a timeout, out-of-memory, or a result `check`
/// refuses: an invalid decision) the instance is dropped; the next call builds a fresh one.
pub(crate) fn with_instance<T, R>(
    plugin: &Arc<crate::engine::LoadedPlugin>,
    f: impl FnOnce(&Policy, &mut Store<HostState>) -> wasmtime::Result<T>,
    check: impl FnOnce(T) -> Result<R, Failure>,
) -> Result<R, Failure> {
    INSTANCES.with(|cell| {
        let mut cache = cell.borrow_mut();
        let idx = match cache.iter().position(|c| c.uid == plugin.uid) {
            Some(i) => i,
            None => {
                // Old generations are gone once their plugin set is dropped.
                cache.retain(|c| c.owner.strong_count() > 0);
                let (instance, _) = plugin.loaded.instantiate()?;
                cache.push(Cached {
                    uid: plugin.uid,
                    owner: Arc::downgrade(plugin),
                    instance,
                });
                cache.len() - 1
            }
        };
        let _running = plugin.loaded.ticker.running();
        let inst = &mut cache[idx].instance;
        inst.store.set_epoch_deadline(inst.deadline_ticks);
        let r = match f(&inst.policy, &mut inst.store) {
            Ok(v) => check(v),
            Err(e) => Err(classify(&e, inst.store.data().memory_denied)),
        };
        if r.is_err() {
            cache.swap_remove(idx);
        }
        r
    })
}
