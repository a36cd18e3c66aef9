//! `client-limits`: per-client limits keyed by client address or application_name: concurrent
//! transactions (server connections held), transaction rate, and client connections. Sluice
//! enforces the limits; this plugin names the key and the numbers. See README.md.

use sluice_policy_sdk::{self as sdk, ClientFacts, ConnectDecision, Hooks, Policy, Rate};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Addr,
    Application,
}

struct ClientLimits {
    key: Key,
    max_active: Option<u32>,
    rate: Option<Rate>,
    max_clients: Option<u32>,
    exempt_users: Vec<String>,
}

impl Policy for ClientLimits {
    const HOOKS: Hooks = Hooks::CONNECT;

    fn new() -> Self {
        let key = match sdk::config_string("key", "addr").as_str() {
            "addr" => Key::Addr,
            "application" => Key::Application,
            other => panic!("setting \"key\": expected \"addr\" or \"application\", got {other:?}"),
        };
        let rate = sdk::config_f64("rate").map(|per_sec| {
            assert!(
                per_sec > 0.0 && per_sec.is_finite(),
                "setting \"rate\" must be > 0"
            );
            let burst = sdk::config_u32("burst").unwrap_or_else(|| per_sec.ceil().max(1.0) as u32);
            Rate {
                per_sec,
                burst: burst.max(1),
            }
        });
        ClientLimits {
            key,
            max_active: sdk::config_u32("max_active"),
            rate,
            max_clients: sdk::config_u32("max_clients"),
            exempt_users: sdk::config_list("exempt_users"),
        }
    }

    fn on_connect(&self, facts: &ClientFacts) -> ConnectDecision {
        if self.exempt_users.contains(&facts.user) {
            return sdk::admit();
        }
        let key = match self.key {
            Key::Addr => format!("addr:{}", facts.addr.as_deref().unwrap_or("local")),
            Key::Application => format!("app:{}", facts.application_name),
        };
        let mut a = sdk::admission();
        a.limit_key = Some(key);
        a.key_max_active = self.max_active;
        a.key_rate = self.rate;
        a.key_max_clients = self.max_clients;
        ConnectDecision::Admit(a)
    }
}

sluice_policy_sdk::export!(ClientLimits);
