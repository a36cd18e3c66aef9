//! `priority`: sorts clients into scheduling classes by application_name or user, and gives each
//! a priority. See README.md for the settings.

use std::collections::BTreeMap;

use sluice_policy_sdk::{
    self as sdk, ClientFacts, ConnectDecision, Hooks, Policy, PressureAction, PressureFacts,
    StatementKind, TxDecision, TxFacts,
};

/// Which client fact is matched against the class lists.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Match {
    Application,
    User,
    Both,
}

struct Rule {
    class: String,
    names: Vec<String>,
    priority: Option<i32>,
}

struct Priority {
    by: Match,
    rules: Vec<Rule>,
    default_class: Option<String>,
    default_priority: Option<i32>,
    select_boost: i32,
    pressure_max_active: BTreeMap<String, u32>,
    statement_timeout_ms: BTreeMap<String, u32>,
}

/// Keys of the settings table that are not class lists.
const RESERVED: &[&str] = &["match", "default", "select_boost"];

fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

impl Priority {
    fn classify(&self, facts: &ClientFacts) -> Option<&Rule> {
        let hit = |value: &str| {
            self.rules
                .iter()
                .find(|r| r.names.iter().any(|n| matches(n, value)))
        };
        match self.by {
            Match::Application => hit(&facts.application_name),
            Match::User => hit(&facts.user),
            Match::Both => hit(&facts.application_name).or_else(|| hit(&facts.user)),
        }
    }
}

/// The cookie carries the client's priority (as i32 bits) plus one flag bit meaning "set".
fn cookie_for(priority: Option<i32>) -> u64 {
    priority.map_or(0, |p| (1 << 32) | u64::from(p as u32))
}

fn priority_from_cookie(cookie: u64) -> Option<i32> {
    (cookie >> 32 == 1).then_some(cookie as u32 as i32)
}

impl Policy for Priority {
    const HOOKS: Hooks = Hooks::CONNECT
        .union(Hooks::TRANSACTION)
        .union(Hooks::PRESSURE);

    fn new() -> Self {
        let by = match sdk::config_string("match", "both").as_str() {
            "application" => Match::Application,
            "user" => Match::User,
            "both" => Match::Both,
            other => panic!("setting \"match\": expected application, user or both, got {other:?}"),
        };
        let mut rules = Vec::new();
        let mut pressure_max_active = BTreeMap::new();
        let mut statement_timeout_ms = BTreeMap::new();
        for key in sdk::config_keys() {
            if let Some(class) = key.strip_prefix("statement_timeout.") {
                let ms = sdk::config_u32(&key).unwrap_or_else(|| {
                    panic!("setting \"{key}\": expected milliseconds (a whole number)")
                });
                statement_timeout_ms.insert(class.to_string(), ms);
                continue;
            }
            if let Some(class) = key.strip_prefix("pressure_max_active.") {
                pressure_max_active.insert(class.to_string(), sdk::config_u32(&key).unwrap_or(0));
                continue;
            }
            if key.contains('.') || RESERVED.contains(&key.as_str()) {
                continue;
            }
            rules.push(Rule {
                class: key.clone(),
                names: sdk::config_list(&key),
                priority: sdk::config_i32(&format!("priorities.{key}")),
            });
        }
        let default_class = sdk::config_get("default");
        let default_priority = default_class
            .as_ref()
            .and_then(|c| sdk::config_i32(&format!("priorities.{c}")));
        Priority {
            by,
            rules,
            default_class,
            default_priority,
            select_boost: sdk::config_i32("select_boost").unwrap_or(0),
            pressure_max_active,
            statement_timeout_ms,
        }
    }

    fn on_connect(&self, facts: &ClientFacts) -> ConnectDecision {
        let (class, priority) = match self.classify(facts) {
            Some(rule) => (Some(rule.class.clone()), rule.priority),
            None => (self.default_class.clone(), self.default_priority),
        };
        let mut admission = sdk::admission();
        admission.class = class;
        admission.priority = priority;
        admission.cookie = cookie_for(priority);
        ConnectDecision::Admit(admission)
    }

    fn on_transaction(&self, facts: &TxFacts) -> TxDecision {
        let mut priority = None;
        // A lone SELECT (autocommit) is short: let it jump ahead a little.
        if self.select_boost != 0 && facts.kind == StatementKind::Select && !facts.in_transaction {
            priority =
                priority_from_cookie(facts.cookie).map(|p| p.saturating_add(self.select_boost));
        }
        let timeout_ms = self.statement_timeout_ms.get(&facts.class).copied();
        let mut d = sdk::proceed();
        if let TxDecision::Proceed(p) = &mut d {
            p.priority = priority;
            p.timeout_ms = timeout_ms;
        }
        d
    }

    fn on_pressure(&self, facts: &PressureFacts) -> Vec<PressureAction> {
        facts
            .classes
            .iter()
            .filter_map(|c| {
                let cap = *self.pressure_max_active.get(&c.name)?;
                (c.max_active != Some(cap)).then(|| PressureAction {
                    class: c.name.clone(),
                    max_active: Some(cap),
                    max_wait_ms: None,
                })
            })
            .collect()
    }
}

sluice_policy_sdk::export!(Priority);
