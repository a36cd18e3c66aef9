//! Test plugin `probe`: records in host counters what the host passes it, so that tests can
//! check which cookie reaches which plugin and that every admission gets one `on-disconnect`.
//!
//! Settings:
//! - `tag` (u32, default 1): the high 32 bits of every cookie it issues; the low 32 bits are the
//!   admission's sequence number (the `admitted` counter), so cookie `tag << 32 | n`.
//! - `reject`, `trap`, `invalid` (user lists): on-connect rejects those users (28000), panics,
//!   or returns an invalid admission (an unknown class).
//!
//! Counters (read with `PolicyEngine::host_counter`):
//! - `inits`: instances built (`init` ran), including the load-time smoke test;
//! - `admitted`, `disconnected`, and `open` (admitted minus disconnected);
//! - `tx:T:N`, `complete:T:N`, `disconnect:T:N`: a hook got cookie `T << 32 | N`;
//! - `zero`: a hook after on-connect got cookie 0; `foreign`: it got a cookie of another tag.
//!
//! on-transaction by query text: "invalid" returns a malformed SQLSTATE (an invalid decision),
//! "trap" panics, anything else proceeds.

use sluice_policy_sdk::{
    self as sdk, ClientFacts, CompletionFacts, ConnectDecision, Hooks, Policy, TxDecision, TxFacts,
};

struct Probe {
    tag: u64,
    reject: Vec<String>,
    trap: Vec<String>,
    invalid: Vec<String>,
}

impl Probe {
    fn saw(&self, hook: &str, cookie: u64) {
        sdk::counter_add(
            &format!("{hook}:{}:{}", cookie >> 32, cookie & 0xffff_ffff),
            1,
        );
        if cookie == 0 {
            sdk::counter_add("zero", 1);
        } else if cookie >> 32 != self.tag {
            sdk::counter_add("foreign", 1);
        }
    }
}

impl Policy for Probe {
    const HOOKS: Hooks = Hooks::CONNECT
        .union(Hooks::TRANSACTION)
        .union(Hooks::COMPLETE)
        .union(Hooks::DISCONNECT);

    fn new() -> Self {
        sdk::counter_add("inits", 1);
        Probe {
            tag: u64::from(sdk::config_u32("tag").unwrap_or(1)),
            reject: sdk::config_list("reject"),
            trap: sdk::config_list("trap"),
            invalid: sdk::config_list("invalid"),
        }
    }

    fn on_connect(&self, facts: &ClientFacts) -> ConnectDecision {
        if self.reject.contains(&facts.user) {
            return sdk::reject_connect("28000", format!("probe {} rejects", self.tag));
        }
        if self.trap.contains(&facts.user) {
            panic!("probe {} traps for {}", self.tag, facts.user);
        }
        let mut a = sdk::admission();
        if self.invalid.contains(&facts.user) {
            a.class = Some("no-such-class".into());
            return ConnectDecision::Admit(a);
        }
        let n = sdk::counter_add("admitted", 1);
        sdk::counter_add("open", 1);
        a.cookie = (self.tag << 32) | (n as u64 & 0xffff_ffff);
        ConnectDecision::Admit(a)
    }

    fn on_transaction(&self, facts: &TxFacts) -> TxDecision {
        self.saw("tx", facts.cookie);
        match facts.query.as_str() {
            "invalid" => sdk::reject_tx("bad", "not a SQLSTATE"),
            "trap" => panic!("probe {} traps in on-transaction", self.tag),
            _ => sdk::proceed(),
        }
    }

    fn on_complete(&self, facts: &CompletionFacts) {
        self.saw("complete", facts.cookie);
    }

    fn on_disconnect(&self, cookie: u64) {
        self.saw("disconnect", cookie);
        sdk::counter_add("disconnected", 1);
        sdk::counter_add("open", -1);
    }
}

sluice_policy_sdk::export!(Probe);
