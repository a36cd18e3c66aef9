//! Test plugin `trap`: panics (a trap, with panic = "abort") in on-connect.

use sluice_policy_sdk::{ClientFacts, ConnectDecision, Hooks, Policy};

struct Trap;

impl Policy for Trap {
    const HOOKS: Hooks = Hooks::CONNECT;

    fn new() -> Self {
        Trap
    }

    fn on_connect(&self, facts: &ClientFacts) -> ConnectDecision {
        panic!("trap plugin refuses to decide for {}", facts.user);
    }
}

sluice_policy_sdk::export!(Trap);
