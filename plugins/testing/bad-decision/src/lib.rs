//! Test plugin `bad-decision`: returns invalid decisions: an unknown class from on-connect, a
//! malformed SQLSTATE from on-transaction.

use sluice_policy_sdk::{
    self as sdk, ClientFacts, ConnectDecision, Hooks, Policy, TxDecision, TxFacts,
};

struct BadDecision;

impl Policy for BadDecision {
    const HOOKS: Hooks = Hooks::CONNECT.union(Hooks::TRANSACTION);

    fn new() -> Self {
        BadDecision
    }

    fn on_connect(&self, _facts: &ClientFacts) -> ConnectDecision {
        let mut a = sdk::admission();
        a.class = Some("no-such-class".into());
        ConnectDecision::Admit(a)
    }

    fn on_transaction(&self, _facts: &TxFacts) -> TxDecision {
        sdk::reject_tx("bad", "not a SQLSTATE")
    }
}

sluice_policy_sdk::export!(BadDecision);
