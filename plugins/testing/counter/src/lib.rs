//! Test plugin `counter`: admits; on-transaction increments the host counter "calls" and rejects
//! every third call with P0001 and a message naming its `version` setting. Used to test reload
//! semantics (the counter survives a reload; the message shows which version decided).

use sluice_policy_sdk::{self as sdk, Hooks, Policy, TxDecision, TxFacts};

struct Counter {
    version: String,
}

impl Policy for Counter {
    const HOOKS: Hooks = Hooks::CONNECT.union(Hooks::TRANSACTION);

    fn new() -> Self {
        Counter {
            version: sdk::config_string("version", "v1"),
        }
    }

    fn on_transaction(&self, _facts: &TxFacts) -> TxDecision {
        let n = sdk::counter_add("calls", 1);
        if n % 3 == 0 {
            return sdk::reject_tx(
                "P0001",
                format!("call {n} rejected by counter {}", self.version),
            );
        }
        sdk::proceed()
    }
}

sluice_policy_sdk::export!(Counter);
