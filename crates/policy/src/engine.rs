//! [`PolicyEngine`]: loads plugin sets, calls hooks, applies failure modes, merges decisions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use sluice_config::{FailMode, PluginConfig, PolicyConfig};
use wasmtime::component::Component;

use crate::breaker::{Breaker, Counters, Outcome, OUTCOME_NAMES};
use crate::runtime::{self, wit, Failure, Loaded, Runtime};
use crate::shared::{flatten_settings, LogLimiter, Namespace, PluginCtx, PoolSource};
use crate::{
    convert, Admission, ClientFacts, CompletionFacts, ConnectDecision, Hook, PluginStats,
    PolicyError, PoolStateProvider, PressureAction, PressureFacts, Proceed, Rejection, SqlState,
    TransactionDecision, TransactionFacts,
};

/// Unique id of each loaded plugin generation (keys the per-thread instance caches).
static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// Longest `plugin-info.name` / `version` kept from `init`.
const MAX_INFO: usize = 256;

/// The cookies of one client's admission: the value each admitting plugin returned from
/// `on-connect`, tagged with the plugin that returned it.
///
/// Opaque to the proxy, which keeps it with the client and passes it back on every later hook;
/// the engine hands each plugin its own cookie, whatever reloads added, removed or reordered in
/// between. A plugin is identified by its *lineage*: the generations loaded under one config
/// name in consecutive plugin sets (a reload of the same name continues the lineage; a name
/// dropped from the config ends it). So:
/// - a plugin gets the cookie its lineage returned for this client, or 0 if the client was
///   admitted before the plugin was loaded (or its `on-connect` failed);
/// - `on-disconnect` reaches exactly the still-loaded lineages that admitted the client.
///
/// A plugin admits a client when its `on-connect` returns an admission, or implicitly (cookie 0)
/// when it does not implement `on-connect`. A plugin whose `on-connect` failed (fail open, or the
/// breaker was open) did not admit the client: it gets cookie 0 and no `on-disconnect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cookies {
    /// (lineage, cookie), in the order of the plugin set that admitted the client.
    entries: Vec<(u64, u64)>,
}

impl Cookies {
    /// The cookies of a client no plugin admitted: every plugin gets cookie 0 and no
    /// `on-disconnect`.
    pub const EMPTY: Cookies = Cookies {
        entries: Vec::new(),
    };

    fn with_capacity(n: usize) -> Self {
        Cookies {
            entries: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, lineage: u64, cookie: u64) {
        self.entries.push((lineage, cookie));
    }

    /// The cookie `lineage` issued. `at` is the plugin's position in the current set: unless
    /// a reload changed the set since the client connected, its entry is right there.
    fn get(&self, at: usize, lineage: u64) -> Option<u64> {
        match self.entries.get(at) {
            Some(&(l, c)) if l == lineage => Some(c),
            _ => self
                .entries
                .iter()
                .find(|(l, _)| *l == lineage)
                .map(|&(_, c)| c),
        }
    }

    /// How many plugins admitted the client.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no plugin admitted the client (none was loaded, or all failed open).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cookie values, in the order of the plugin set that admitted the client (one per
    /// admitting plugin), for display.
    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|&(_, c)| c)
    }
}

/// One plugin of a loaded set.
pub(crate) struct LoadedPlugin {
    pub(crate) uid: u64,
    /// The uid of the first generation of this plugin's name in consecutive sets: cookies are
    /// keyed by it (see [`Cookies`]).
    lineage: u64,
    pub(crate) name: String,
    /// `plugin-info.name` from `init`.
    reported_name: String,
    path: PathBuf,
    digest: String,
    version: String,
    generation: u64,
    loaded_at: SystemTime,
    hooks: u8,
    fail: FailMode,
    pub(crate) loaded: Loaded,
    counters: Arc<Counters>,
    breaker: Breaker,
    fail_log: LogLimiter,
}

impl LoadedPlugin {
    fn implements(&self, hook: Hook) -> bool {
        self.hooks & hook.bit() != 0
    }
}

/// An immutable set of plugins, swapped as a whole on reload.
struct PluginSet {
    generation: u64,
    plugins: Vec<Arc<LoadedPlugin>>,
    classes: Vec<String>,
    max_query_len: usize,
}

/// What a successful [`PolicyEngine::reload`] loaded.
#[derive(Debug, Clone)]
pub struct ReloadReport {
    /// The new generation number.
    pub generation: u64,
    /// The plugins of the new set, in order.
    pub plugins: Vec<ReloadedPlugin>,
    /// Settings that could not take full effect (also logged as warnings).
    pub warnings: Vec<String>,
}

/// One plugin of a [`ReloadReport`].
#[derive(Debug, Clone)]
pub struct ReloadedPlugin {
    /// Name from the config.
    pub name: String,
    /// Version reported by `init`.
    pub version: String,
    /// sha256 of the file, hex.
    pub digest: String,
    /// Hooks the plugin implements.
    pub hooks: Vec<Hook>,
    /// False when the file was unchanged and its compiled code was reused.
    pub recompiled: bool,
}

/// The policy engine: the proxy's only view of plugins. Cheap to call from any thread; every
/// hook method returns a final decision.
pub struct PolicyEngine {
    runtime: OnceLock<Runtime>,
    current: ArcSwap<PluginSet>,
    /// Union of the hooks of the current set, by [`Hook::bit`].
    wants: AtomicU8,
    pool: PoolSource,
    namespaces: Mutex<HashMap<String, Arc<Namespace>>>,
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    /// Serialises loads.
    reload_lock: Mutex<()>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl PolicyEngine {
    /// An engine with the plugins of `cfg` loaded (possibly none). `classes` are the configured
    /// class names a plugin may assign.
    pub fn new(cfg: &PolicyConfig, classes: &[String]) -> Result<Arc<Self>, PolicyError> {
        let engine = Self::empty();
        if !cfg.plugins.is_empty() {
            let _guard = engine.reload_lock.lock();
            let set = engine.load_set(cfg, classes, 1)?;
            engine.install(set);
        } else {
            engine.install(PluginSet {
                generation: 0,
                plugins: Vec::new(),
                classes: classes.to_vec(),
                max_query_len: cfg.max_query_len as usize,
            });
        }
        Ok(engine)
    }

    /// An engine with no plugins: admits everything, proceeds with defaults.
    pub fn empty() -> Arc<Self> {
        Arc::new(PolicyEngine {
            runtime: OnceLock::new(),
            current: ArcSwap::from_pointee(PluginSet {
                generation: 0,
                plugins: Vec::new(),
                classes: Vec::new(),
                max_query_len: 1024,
            }),
            wants: AtomicU8::new(0),
            pool: PoolSource::default(),
            namespaces: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            reload_lock: Mutex::new(()),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// Whether the epoch ticker is asleep (no plugin call for a while). For tests.
    #[cfg(any(test, feature = "testing"))]
    pub fn epoch_ticker_asleep(&self) -> bool {
        self.runtime.get().is_some_and(Runtime::ticker_asleep)
    }

    /// Whether any loaded plugin implements `hook`. One atomic load.
    pub fn wants(&self, hook: Hook) -> bool {
        self.wants.load(Ordering::Relaxed) & hook.bit() != 0
    }

    /// Sets the source of the `pool-state` host function.
    pub fn set_pool_state(&self, provider: Arc<dyn PoolStateProvider>) {
        *self.pool.write() = Some(provider);
    }

    /// (successful, failed) reloads so far.
    pub fn reload_counts(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// The generation of the active plugin set (0 = none loaded yet).
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Compiles, instantiates and smoke-tests (`init`) every plugin of `cfg`, then swaps the new
    /// set in. Blocking (compilation takes milliseconds to seconds): call it from
    /// `spawn_blocking`. On any failure the current set stays active and the error names the
    /// plugin and the cause. Counters, buckets and statistics survive.
    pub fn reload(
        &self,
        cfg: &PolicyConfig,
        classes: &[String],
    ) -> Result<ReloadReport, PolicyError> {
        let _guard = self.reload_lock.lock();
        let generation = self.current.load().generation + 1;
        match self.load_set(cfg, classes, generation) {
            Ok(set) => {
                let old = self.current.load_full();
                let mut warnings = Vec::new();
                if let Some(rt) = self.runtime.get() {
                    if cfg.memory_limit > rt.slot_bytes {
                        let w = format!(
                            "[policy] memory_limit = {} bytes is above the {} bytes reserved per \
                             instance when the first plugin was loaded: plugins stay capped at {} \
                             bytes; raising the limit above that needs a restart",
                            cfg.memory_limit, rt.slot_bytes, rt.slot_bytes
                        );
                        tracing::warn!(
                            setting = "policy.memory_limit",
                            requested = cfg.memory_limit,
                            effective = rt.slot_bytes,
                            "{w}"
                        );
                        warnings.push(w);
                    }
                }
                let report = ReloadReport {
                    warnings,
                    generation,
                    plugins: set
                        .plugins
                        .iter()
                        .map(|p| ReloadedPlugin {
                            name: p.name.clone(),
                            version: p.version.clone(),
                            digest: p.digest.clone(),
                            hooks: Hook::ALL.into_iter().filter(|h| p.implements(*h)).collect(),
                            recompiled: !old.plugins.iter().any(|o| o.digest == p.digest),
                        })
                        .collect(),
                };
                self.install(set);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    generation,
                    plugins = report.plugins.len(),
                    "policy reloaded"
                );
                Ok(report)
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cause = %e, "policy reload refused; the previous plugins stay active");
                Err(e)
            }
        }
    }

    fn install(&self, set: PluginSet) {
        let wants = set.plugins.iter().fold(0u8, |acc, p| acc | p.hooks);
        self.current.store(Arc::new(set));
        self.wants.store(wants, Ordering::Relaxed);
    }

    fn runtime(&self, cfg: &PolicyConfig) -> Result<&Runtime, PolicyError> {
        if let Some(rt) = self.runtime.get() {
            return Ok(rt);
        }
        let rt = Runtime::new(cfg.memory_limit).map_err(PolicyError::Engine)?;
        Ok(self.runtime.get_or_init(|| rt))
    }

    /// Loads every plugin of `cfg`. Caller holds `reload_lock`.
    fn load_set(
        &self,
        cfg: &PolicyConfig,
        classes: &[String],
        generation: u64,
    ) -> Result<PluginSet, PolicyError> {
        let previous = self.current.load_full();
        let mut plugins = Vec::with_capacity(cfg.plugins.len());
        for (i, pc) in cfg.plugins.iter().enumerate() {
            if cfg.plugins[..i].iter().any(|o| o.name == pc.name) {
                return Err(PolicyError::DuplicateName(pc.name.clone()));
            }
            let reuse = |digest: &str| {
                previous
                    .plugins
                    .iter()
                    .find(|p| p.digest == digest)
                    .map(|p| p.loaded.component.clone())
            };
            // A plugin reloaded under the same name continues its lineage: it gets the cookies
            // (and on-disconnect) of the clients its previous generation admitted.
            let lineage = previous
                .plugins
                .iter()
                .find(|p| p.name == pc.name)
                .map(|p| p.lineage);
            plugins.push(Arc::new(
                self.load_plugin(cfg, pc, generation, lineage, reuse)?,
            ));
        }
        Ok(PluginSet {
            generation,
            plugins,
            classes: classes.to_vec(),
            max_query_len: cfg.max_query_len as usize,
        })
    }

    fn load_plugin(
        &self,
        cfg: &PolicyConfig,
        pc: &PluginConfig,
        generation: u64,
        lineage: Option<u64>,
        reuse: impl Fn(&str) -> Option<Component>,
    ) -> Result<LoadedPlugin, PolicyError> {
        let err = |cause: String| PolicyError::Load {
            plugin: pc.name.clone(),
            path: pc.path.clone(),
            cause,
        };
        let bytes = std::fs::read(&pc.path).map_err(|source| PolicyError::Read {
            plugin: pc.name.clone(),
            path: pc.path.clone(),
            source,
        })?;
        let digest = hex(&Sha256::digest(&bytes));
        let rt = self.runtime(cfg)?;
        let component = match reuse(&digest) {
            Some(c) => c,
            None => Component::new(&rt.engine, &bytes)
                .map_err(|e| err(format!("not a valid component: {e:#}")))?,
        };
        let ns = Arc::clone(self.namespaces.lock().entry(pc.name.clone()).or_default());
        let ctx = Arc::new(PluginCtx {
            name: pc.name.clone(),
            settings: flatten_settings(&pc.settings),
            ns,
            log: LogLimiter::new(50),
            pool: Arc::clone(&self.pool),
        });
        let loaded =
            Loaded::link(rt, component, ctx, cfg.memory_limit, cfg.deadline).map_err(err)?;
        let (_instance, info) = loaded
            .instantiate()
            .map_err(|f| err(format!("init failed: {f}")))?;
        let flags = [
            (wit::HookSet::CONNECT, Hook::Connect),
            (wit::HookSet::TRANSACTION, Hook::Transaction),
            (wit::HookSet::QUERY, Hook::Query),
            (wit::HookSet::PRESSURE, Hook::Pressure),
            (wit::HookSet::COMPLETE, Hook::Complete),
            (wit::HookSet::DISCONNECT, Hook::Disconnect),
        ];
        let hooks = flags
            .iter()
            .filter(|(f, _)| info.hooks.contains(*f))
            .fold(0, |a, (_, h)| a | h.bit());
        let counters = Arc::clone(self.counters.lock().entry(pc.name.clone()).or_default());
        let (mut reported_name, mut version) = (info.name, info.version);
        convert::truncate(&mut reported_name, MAX_INFO);
        convert::truncate(&mut version, MAX_INFO);
        tracing::info!(plugin = %pc.name, reported_name = %reported_name, version = %version, %digest, hooks, "policy plugin loaded");
        let uid = NEXT_UID.fetch_add(1, Ordering::Relaxed);
        Ok(LoadedPlugin {
            uid,
            lineage: lineage.unwrap_or(uid),
            name: pc.name.clone(),
            reported_name,
            path: pc.path.clone(),
            digest,
            version,
            generation,
            loaded_at: SystemTime::now(),
            hooks,
            fail: pc.fail,
            loaded,
            counters,
            breaker: Breaker::new(
                cfg.breaker_failures,
                cfg.breaker_window,
                cfg.breaker_cooldown,
            ),
            fail_log: LogLimiter::new(10),
        })
    }

    /// Calls one hook of one plugin, through its breaker, timing and counting it. `check`
    /// validates the returned value: an invalid decision is a failure, and (like a trap) throws
    /// the instance away.
    fn call<T, R>(
        &self,
        p: &Arc<LoadedPlugin>,
        hook: Hook,
        f: impl FnOnce(
            &runtime::bindings::Policy,
            &mut wasmtime::Store<runtime::HostState>,
        ) -> wasmtime::Result<T>,
        check: impl FnOnce(T) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        if p.breaker.is_open() {
            p.counters.decided(Outcome::BreakerSkip);
            return Err(Failure::BreakerOpen);
        }
        let start = Instant::now();
        let r = runtime::with_instance(p, f, check);
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        p.counters.calls[hook as usize].fetch_add(1, Ordering::Relaxed);
        p.counters.call_ns.fetch_add(ns, Ordering::Relaxed);
        r
    }

    /// Counts and logs a failure; returns the rejection of a `fail = "closed"` plugin.
    fn failed(&self, p: &LoadedPlugin, hook: Hook, failure: &Failure) -> Option<Rejection> {
        let c = &p.counters;
        match failure {
            Failure::Timeout => c.timeouts.fetch_add(1, Ordering::Relaxed),
            Failure::OutOfMemory | Failure::Trap(_) => c.traps.fetch_add(1, Ordering::Relaxed),
            Failure::Invalid(_) => c.invalid.fetch_add(1, Ordering::Relaxed),
            Failure::BreakerOpen => 0,
        };
        if !matches!(failure, Failure::BreakerOpen) {
            let opened = p.breaker.record_failure();
            if let Some(suppressed) = p.fail_log.allow() {
                tracing::warn!(plugin = %p.name, hook = hook.name(), cause = %failure, suppressed,
                    "policy plugin failed");
            }
            if opened {
                tracing::warn!(plugin = %p.name, "policy plugin circuit breaker opened");
            }
        }
        match p.fail {
            FailMode::Open => {
                c.decided(Outcome::FailOpen);
                None
            }
            FailMode::Closed => {
                c.decided(Outcome::FailClosed);
                Some(Rejection {
                    sqlstate: SqlState::SYSTEM_ERROR,
                    message: format!("policy plugin \"{}\" failed: {failure}", p.name),
                })
            }
        }
    }

    /// Runs `on-connect` of every plugin: the first rejection wins, admissions merge.
    ///
    /// A plugin without `on-connect` admits implicitly (cookie 0); a plugin whose `on-connect`
    /// fails open does not admit (no cookie, no `on-disconnect`). When the client is rejected,
    /// the plugins that admitted it before the rejection get `on-disconnect` at once, so what
    /// they took in `on-connect` is released.
    pub fn on_connect(&self, f: &ClientFacts<'_>) -> ConnectDecision {
        let set = self.current.load();
        let mut adm = Admission {
            cookies: Cookies::with_capacity(set.plugins.len()),
            ..Admission::default()
        };
        if !self.wants(Hook::Connect) {
            for p in &set.plugins {
                adm.cookies.push(p.lineage, 0);
            }
            return ConnectDecision::Admit(adm);
        }
        let facts = convert::client_facts(f);
        for p in &set.plugins {
            if !p.implements(Hook::Connect) {
                adm.cookies.push(p.lineage, 0);
                continue;
            }
            let r = self.call(
                p,
                Hook::Connect,
                |i, s| i.call_on_connect(s, &facts),
                |d| match d {
                    wit::ConnectDecision::Admit(a) => {
                        convert::admission(&a, &set.classes).map(|rate| Ok((a, rate)))
                    }
                    wit::ConnectDecision::Reject(r) => convert::rejection(r).map(Err),
                },
            );
            match r {
                Ok(Ok((a, rate))) => {
                    p.counters.decided(Outcome::Admit);
                    adm.cookies.push(p.lineage, a.cookie);
                    merge(&mut adm.class, a.class);
                    merge(&mut adm.priority, a.priority);
                    merge(&mut adm.limit_key, a.limit_key);
                    merge(&mut adm.key_max_active, a.key_max_active);
                    merge(&mut adm.key_rate, rate);
                    merge(&mut adm.key_max_clients, a.key_max_clients);
                }
                Ok(Err(rejection)) => {
                    p.counters.decided(Outcome::Reject);
                    self.disconnect_in(&set, &adm.cookies);
                    return ConnectDecision::Reject(rejection);
                }
                Err(failure) => {
                    if let Some(rejection) = self.failed(p, Hook::Connect, &failure) {
                        self.disconnect_in(&set, &adm.cookies);
                        return ConnectDecision::Reject(rejection);
                    }
                    // Failed open: this plugin did not admit the client.
                }
            }
        }
        ConnectDecision::Admit(adm)
    }

    /// Runs `on-transaction` of every plugin that implements it.
    pub fn on_transaction(&self, f: &TransactionFacts<'_>) -> TransactionDecision {
        self.tx_hook(Hook::Transaction, f)
    }

    /// Runs `on-query` of every plugin that implements it.
    pub fn on_query(&self, f: &TransactionFacts<'_>) -> TransactionDecision {
        self.tx_hook(Hook::Query, f)
    }

    fn tx_hook(&self, hook: Hook, f: &TransactionFacts<'_>) -> TransactionDecision {
        let mut out = Proceed::default();
        if !self.wants(hook) {
            return TransactionDecision::Proceed(out);
        }
        let set = self.current.load();
        let mut facts = convert::tx_facts(f, set.max_query_len);
        for (i, p) in set.plugins.iter().enumerate() {
            if !p.implements(hook) {
                continue;
            }
            facts.cookie = f.cookies.get(i, p.lineage).unwrap_or(0);
            let r = self.call(
                p,
                hook,
                |inst, s| match hook {
                    Hook::Query => inst.call_on_query(s, &facts),
                    _ => inst.call_on_transaction(s, &facts),
                },
                |d| match d {
                    wit::TxDecision::Proceed(pr) => convert::proceed(pr).map(Ok),
                    wit::TxDecision::Reject(r) => convert::rejection(r).map(Err),
                },
            );
            match r {
                Ok(Ok(pr)) => {
                    p.counters.decided(Outcome::Proceed);
                    merge(&mut out.priority, pr.priority);
                    merge(&mut out.route, pr.route);
                    merge(&mut out.timeout_ms, pr.timeout_ms);
                }
                Ok(Err(rejection)) => {
                    p.counters.decided(Outcome::Reject);
                    return TransactionDecision::Reject(rejection);
                }
                Err(failure) => {
                    if let Some(rejection) = self.failed(p, hook, &failure) {
                        return TransactionDecision::Reject(rejection);
                    }
                }
            }
        }
        TransactionDecision::Proceed(out)
    }

    /// Runs `on-pressure` of every plugin; concatenates their actions.
    pub fn on_pressure(&self, f: &PressureFacts) -> Vec<PressureAction> {
        let mut out = Vec::new();
        if !self.wants(Hook::Pressure) {
            return out;
        }
        let set = self.current.load();
        let facts = convert::pressure_facts(f);
        for p in set.plugins.iter().filter(|p| p.implements(Hook::Pressure)) {
            let r = self.call(
                p,
                Hook::Pressure,
                |i, s| i.call_on_pressure(s, &facts),
                |list| convert::actions(list, &set.classes),
            );
            match r {
                Ok(actions) => {
                    p.counters.decided(Outcome::Actions);
                    out.extend(actions);
                }
                Err(failure) => {
                    // Pressure cannot reject: both failure modes mean "no actions".
                    let _ = self.failed(p, Hook::Pressure, &failure);
                }
            }
        }
        out
    }

    /// Runs `on-complete` of every plugin that implements it.
    pub fn on_complete(&self, f: &CompletionFacts<'_>) {
        if !self.wants(Hook::Complete) {
            return;
        }
        let set = self.current.load();
        let mut facts = convert::completion_facts(f);
        for (i, p) in set
            .plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.implements(Hook::Complete))
        {
            facts.cookie = f.cookies.get(i, p.lineage).unwrap_or(0);
            if let Err(failure) = self.call(
                p,
                Hook::Complete,
                |inst, s| inst.call_on_complete(s, &facts),
                Ok,
            ) {
                let _ = self.failed(p, Hook::Complete, &failure);
            }
        }
    }

    /// Runs `on-disconnect` of every loaded plugin that implements it and admitted the client
    /// (see [`Cookies`]), with its own cookie.
    pub fn on_disconnect(&self, cookies: &Cookies) {
        if !self.wants(Hook::Disconnect) {
            return;
        }
        let set = self.current.load();
        self.disconnect_in(&set, cookies);
    }

    /// `on-disconnect` for the plugins of `set` that admitted the client.
    fn disconnect_in(&self, set: &PluginSet, cookies: &Cookies) {
        for (i, p) in set
            .plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| p.implements(Hook::Disconnect))
        {
            let Some(cookie) = cookies.get(i, p.lineage) else {
                continue;
            };
            if let Err(failure) = self.call(
                p,
                Hook::Disconnect,
                |inst, s| inst.call_on_disconnect(s, cookie),
                Ok,
            ) {
                let _ = self.failed(p, Hook::Disconnect, &failure);
            }
        }
    }

    /// The value of host counter `key` of plugin `plugin` (0 if absent). For tests.
    #[cfg(any(test, feature = "testing"))]
    pub fn host_counter(&self, plugin: &str, key: &str) -> i64 {
        self.namespaces
            .lock()
            .get(plugin)
            .map_or(0, |ns| ns.counter_get(key))
    }

    /// Statistics of the active plugins, in order.
    pub fn stats(&self) -> Vec<PluginStats> {
        let set = self.current.load();
        set.plugins
            .iter()
            .map(|p| {
                let c = &p.counters;
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
                PluginStats {
                    name: p.name.clone(),
                    plugin_name: p.reported_name.clone(),
                    version: p.version.clone(),
                    path: p.path.clone(),
                    generation: p.generation,
                    digest: p.digest.clone(),
                    loaded_at: p.loaded_at,
                    calls: std::array::from_fn(|i| load(&c.calls[i])),
                    traps: load(&c.traps),
                    timeouts: load(&c.timeouts),
                    invalid: load(&c.invalid),
                    breaker_open: p.breaker.is_open(),
                    decisions: OUTCOME_NAMES
                        .iter()
                        .zip(&c.decisions)
                        .map(|(n, v)| ((*n).to_string(), load(v)))
                        .collect(),
                    call_ns_total: load(&c.call_ns),
                }
            })
            .collect()
    }

    /// The configured paths and digests of the active plugins (for the file watcher).
    pub(crate) fn active_digests(&self) -> Vec<(PathBuf, String)> {
        self.current
            .load()
            .plugins
            .iter()
            .map(|p| (p.path.clone(), p.digest.clone()))
            .collect()
    }
}

/// Later `Some` overrides.
fn merge<T>(into: &mut Option<T>, value: Option<T>) {
    if value.is_some() {
        *into = value;
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
