//! Test plugin `membomb`: admits, then allocates without bound in on-transaction (must hit the
//! memory limit).

use sluice_policy_sdk::{Hooks, Policy, TxDecision, TxFacts};

struct MemBomb;

impl Policy for MemBomb {
    const HOOKS: Hooks = Hooks::CONNECT.union(Hooks::TRANSACTION);

    fn new() -> Self {
        MemBomb
    }

    fn on_transaction(&self, _facts: &TxFacts) -> TxDecision {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Reserve without touching: memory.grow without the cost of writing.
            hoard.push(Vec::<u8>::with_capacity(1 << 20));
            std::hint::black_box(&hoard);
        }
    }
}

sluice_policy_sdk::export!(MemBomb);
