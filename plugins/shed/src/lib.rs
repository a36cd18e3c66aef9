//! `shed`: load shedding. Under pressure, a class whose oldest waiter has waited too long gets a
//! lower `max_wait` / `max_active`; and when the pool is saturated, transactions of the "batch"
//! classes are refused at once with 53300 instead of queueing. See README.md.

use sluice_policy_sdk::{
    self as sdk, Hooks, Policy, PoolSnapshot, PressureAction, PressureFacts, TxDecision, TxFacts,
};

/// Per-class shedding rule (`classes.NAME.*` settings).
struct ClassRule {
    class: String,
    /// Trigger: the class's oldest wait, in ms, above which the shed limits apply.
    oldest_wait_ms: u64,
    shed_max_wait_ms: Option<u64>,
    shed_max_active: Option<u32>,
    /// Limits restored when the class is back under its trigger (optional).
    normal_max_wait_ms: Option<u64>,
    normal_max_active: Option<u32>,
}

struct Shed {
    rules: Vec<ClassRule>,
    batch_classes: Vec<String>,
    /// Saturation threshold, active / size, in [0, 1].
    saturation: f64,
    /// Minimum waiters for the pool to count as saturated.
    min_waiting: u32,
    /// Pool to look up with `pool-state` instead of the transaction's own pool snapshot.
    pool: Option<String>,
}

impl Shed {
    fn saturated(&self, p: &PoolSnapshot) -> bool {
        p.size > 0
            && f64::from(p.active) >= self.saturation * f64::from(p.size)
            && p.waiting >= self.min_waiting
    }
}

impl Policy for Shed {
    const HOOKS: Hooks = Hooks::TRANSACTION.union(Hooks::PRESSURE);

    fn new() -> Self {
        let mut names: Vec<String> = sdk::config_keys()
            .iter()
            .filter_map(|k| {
                k.strip_prefix("classes.")?
                    .split_once('.')
                    .map(|(c, _)| c.to_string())
            })
            .collect();
        names.dedup();
        let rules = names
            .into_iter()
            .map(|c| {
                let get = |f: &str| format!("classes.{c}.{f}");
                ClassRule {
                    oldest_wait_ms: sdk::config_u64(&get("oldest_wait_ms")).unwrap_or(0),
                    shed_max_wait_ms: sdk::config_u64(&get("max_wait_ms")),
                    shed_max_active: sdk::config_u32(&get("max_active")),
                    normal_max_wait_ms: sdk::config_u64(&get("normal_max_wait_ms")),
                    normal_max_active: sdk::config_u32(&get("normal_max_active")),
                    class: c,
                }
            })
            .collect();
        let saturation = sdk::config_f64("saturation").unwrap_or(1.0);
        assert!(
            (0.0..=1.0).contains(&saturation),
            "setting \"saturation\" must be within 0..=1"
        );
        Shed {
            rules,
            batch_classes: sdk::config_list("batch_classes"),
            saturation,
            min_waiting: sdk::config_u32("min_waiting").unwrap_or(1),
            pool: sdk::config_get("pool"),
        }
    }

    fn on_transaction(&self, facts: &TxFacts) -> TxDecision {
        if !self.batch_classes.contains(&facts.class) {
            return sdk::proceed();
        }
        let pool = match &self.pool {
            Some(name) => sdk::pool_state(name).unwrap_or(facts.pool),
            None => facts.pool,
        };
        if self.saturated(&pool) {
            return sdk::reject_tx(
                "53300",
                format!(
                    "pool saturated ({}/{} busy, {} waiting): {} work refused, retry later",
                    pool.active, pool.size, pool.waiting, facts.class
                ),
            );
        }
        sdk::proceed()
    }

    fn on_pressure(&self, facts: &PressureFacts) -> Vec<PressureAction> {
        let mut out = Vec::new();
        for c in &facts.classes {
            let Some(rule) = self.rules.iter().find(|r| r.class == c.name) else {
                continue;
            };
            let (max_wait_ms, max_active) = if c.oldest_wait_ms > rule.oldest_wait_ms {
                (rule.shed_max_wait_ms, rule.shed_max_active)
            } else {
                (rule.normal_max_wait_ms, rule.normal_max_active)
            };
            // Only report changes.
            let max_wait_ms = max_wait_ms.filter(|v| c.max_wait_ms != Some(*v));
            let max_active = max_active.filter(|v| c.max_active != Some(*v));
            if max_wait_ms.is_some() || max_active.is_some() {
                out.push(PressureAction {
                    class: c.name.clone(),
                    max_active,
                    max_wait_ms,
                });
            }
        }
        out
    }
}

sluice_policy_sdk::export!(Shed);
