//! The one trait the proxy sees. [`PolicyEngine`] implements it with WebAssembly plugins; the
//! proxy never names a wasmtime type.

use std::sync::Arc;

use sluice_config::PolicyConfig;

use crate::{
    ClientFacts, CompletionFacts, ConnectDecision, Cookies, Hook, PluginStats, PolicyEngine,
    PolicyError, PoolStateProvider, PressureAction, PressureFacts, ReloadReport,
    TransactionDecision, TransactionFacts,
};

/// Decisions the proxy asks for. Every hook returns a final decision: failure modes, the circuit
/// breaker and validation are the implementation's business.
pub trait Policy: Send + Sync {
    /// Whether any loaded plugin implements `hook` (cheap; the proxy skips building facts if not).
    fn wants(&self, hook: Hook) -> bool;
    /// At login: admit with a class, priority and limits, or reject.
    fn on_connect(&self, f: &ClientFacts<'_>) -> ConnectDecision;
    /// Before a transaction's checkout: proceed (maybe with a new priority) or reject.
    fn on_transaction(&self, f: &TransactionFacts<'_>) -> TransactionDecision;
    /// For each statement: allow or reject.
    fn on_query(&self, f: &TransactionFacts<'_>) -> TransactionDecision;
    /// While a pool is saturated, at a bounded rate: class overrides.
    fn on_pressure(&self, f: &PressureFacts) -> Vec<PressureAction>;
    /// After a transaction.
    fn on_complete(&self, f: &CompletionFacts<'_>);
    /// When a client leaves (or after an admission the proxy then refused), with the cookies of
    /// its admission.
    fn on_disconnect(&self, cookies: &Cookies);
    /// Swaps in the plugins of `cfg`, or refuses and keeps the old ones. Blocking.
    fn reload(&self, cfg: &PolicyConfig, classes: &[String]) -> Result<ReloadReport, PolicyError>;
    /// Where plugins read pool state from.
    fn set_pool_state(&self, provider: Arc<dyn PoolStateProvider>);
    /// Per-plugin statistics, for SHOW POLICIES and metrics.
    fn stats(&self) -> Vec<PluginStats>;
    /// Reloads (ok, failed).
    fn reload_counts(&self) -> (u64, u64);
}

impl Policy for PolicyEngine {
    fn wants(&self, hook: Hook) -> bool {
        PolicyEngine::wants(self, hook)
    }
    fn on_connect(&self, f: &ClientFacts<'_>) -> ConnectDecision {
        PolicyEngine::on_connect(self, f)
    }
    fn on_transaction(&self, f: &TransactionFacts<'_>) -> TransactionDecision {
        PolicyEngine::on_transaction(self, f)
    }
    fn on_query(&self, f: &TransactionFacts<'_>) -> TransactionDecision {
        PolicyEngine::on_query(self, f)
    }
    fn on_pressure(&self, f: &PressureFacts) -> Vec<PressureAction> {
        PolicyEngine::on_pressure(self, f)
    }
    fn on_complete(&self, f: &CompletionFacts<'_>) {
        PolicyEngine::on_complete(self, f)
    }
    fn on_disconnect(&self, cookies: &Cookies) {
        PolicyEngine::on_disconnect(self, cookies)
    }
    fn reload(&self, cfg: &PolicyConfig, classes: &[String]) -> Result<ReloadReport, PolicyError> {
        PolicyEngine::reload(self, cfg, classes)
    }
    fn set_pool_state(&self, provider: Arc<dyn PoolStateProvider>) {
        PolicyEngine::set_pool_state(self, provider)
    }
    fn stats(&self) -> Vec<PluginStats> {
        PolicyEngine::stats(self)
    }
    fn reload_counts(&self) -> (u64, u64) {
        PolicyEngine::reload_counts(self)
    }
}
