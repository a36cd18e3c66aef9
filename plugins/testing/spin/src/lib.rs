//! Test plugin `spin`: admits, then loops forever in on-transaction (must hit the deadline).

use sluice_policy_sdk::{Hooks, Policy, TxDecision, TxFacts};

struct Spin;

impl Policy for Spin {
    const HOOKS: Hooks = Hooks::CONNECT.union(Hooks::TRANSACTION);

    fn new() -> Self {
        Spin
    }

    fn on_transaction(&self, facts: &TxFacts) -> TxDecision {
        let mut n = facts.cookie;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

sluice_policy_sdk::export!(Spin);
