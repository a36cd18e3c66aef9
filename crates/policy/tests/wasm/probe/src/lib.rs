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
//! - `zero`: a hook after on-connect got cookie 0; `foreign`: it got a cookie of another tag;
//! - `outcome:O`: on-complete got outcome O (`committed`, `rolled-back`, `failed`, `aborted`);
//! - `tx-query:KIND:TEXT` and `query:KIND:TEXT`: on-transaction or on-query got that statement.
//!
//! on-transaction by query text: "invalid" returns a malformed SQLSTATE (an invalid decision),
//! "trap" panics, "probe:count KEY" rejects with P0001 and the message "KEY=VALUE" (how an
//! integration test reads a counter through a client), anything else proceeds.
//!
//! on-query rejects with 42501 any statement containing "probe:deny", and proceeds otherwise.

use sluice_policy_sdk::{
    self as sdk, ClientFacts, CompletionFacts, ConnectDecision, Hooks, Outcome, Policy, TxDecision,
    TxFacts,
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

/// The statement kind as WIT spells it: "select", "ddl", "other"...
fn kind(facts: &TxFacts) -> String {
    let debug = format!("{:?}", facts.kind);
    debug
        .trim_start_matches("StatementKind::")
        .to_ascii_lowercase()
}

impl Policy for Probe {
    const HOOKS: Hooks = Hooks::CONNECT
        .union(Hooks::TRANSACTION)
        .union(Hooks::QUERY)
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
        sdk::counter_add(&format!("tx-query:{}:{}", kind(facts), facts.query), 1);
        if let Some(key) = facts.query.strip_prefix("probe:count ") {
            return sdk::reject_tx("P0001", format!("{key}={}", sdk::counter_get(key)));
        }
        match facts.query.as_str() {
            "invalid" => sdk::reject_tx("bad", "not a SQLSTATE"),
            "trap" => panic!("probe {} traps in on-transaction", self.tag),
            _ => sdk::proceed(),
        }
    }

    fn on_query(&self, facts: &TxFacts) -> TxDecision {
        sdk::counter_add(&format!("query:{}:{}", kind(facts), facts.query), 1);
        if facts.query.contains("probe:deny") {
            return sdk::reject_tx("42501", format!("probe {} denies", self.tag));
        }
        sdk::proceed()
    }

    fn on_complete(&self, facts: &CompletionFacts) {
        self.saw("complete", facts.cookie);
        let outcome = match facts.outcome {
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled-back",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        };
        sdk::counter_add(&format!("outcome:{outcome}"), 1);
    }

    fn on_disconnect(&self, cookie: u64) {
        self.saw("disconnect", cookie);
        sdk::counter_add("disconnected", 1);
        sdk::counter_add("open", -1);
    }
}

sluice_policy_sdk::export!(Probe);
