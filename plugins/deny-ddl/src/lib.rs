//! `deny-ddl`: refuses DDL and TRUNCATE (SQLSTATE 42501) for chosen roles or classes, on every
//! statement, including those inside transaction blocks. See README.md.

use sluice_policy_sdk::{
    self as sdk, ClientFacts, ConnectDecision, Hooks, Policy, StatementKind, TxDecision, TxFacts,
};

/// Cookie bit: this client's role is restricted.
const RESTRICTED: u64 = 1;

struct DenyDdl {
    roles: Vec<String>,
    classes: Vec<String>,
}

impl DenyDdl {
    fn check(&self, facts: &TxFacts) -> TxDecision {
        let restricted = facts.cookie & RESTRICTED != 0 || self.classes.contains(&facts.class);
        let ddl =
            facts.kind == StatementKind::Ddl || sdk::starts_with_keyword(&facts.query, "TRUNCATE");
        if restricted && ddl {
            return sdk::reject_tx(
                "42501",
                format!(
                    "permission denied: {} is not allowed for this client (policy deny-ddl)",
                    sdk::first_keyword(&facts.query).to_ascii_uppercase()
                ),
            );
        }
        sdk::proceed()
    }
}

impl Policy for DenyDdl {
    const HOOKS: Hooks = Hooks::CONNECT.union(Hooks::TRANSACTION).union(Hooks::QUERY);

    fn new() -> Self {
        DenyDdl {
            roles: sdk::config_list("roles"),
            classes: sdk::config_list("classes"),
        }
    }

    fn on_connect(&self, facts: &ClientFacts) -> ConnectDecision {
        let mut a = sdk::admission();
        if self.roles.contains(&facts.user) {
            a.cookie = RESTRICTED;
        }
        ConnectDecision::Admit(a)
    }

    fn on_transaction(&self, facts: &TxFacts) -> TxDecision {
        self.check(facts)
    }

    fn on_query(&self, facts: &TxFacts) -> TxDecision {
        self.check(facts)
    }
}

sluice_policy_sdk::export!(DenyDdl);
