//! Replays JSONL events through a policy without a database: the engine behind
//! `sluice policy test PLUGIN.wasm EVENTS.jsonl`.
//!
//! One event per line (blank lines and lines starting with `#` are skipped):
//! ```text
//! {"event":"connect","user":"app","database":"db","application_name":"web","addr":"10.0.0.1"}
//! {"event":"transaction","client":0,"query":"select 1","in_transaction":false,"pool":{"size":20,"active":20,"idle":0,"waiting":5}}
//! {"event":"query","client":0,"query":"drop table t","in_transaction":true}
//! {"event":"pressure","pool":"db/app","size":20,"active":20,"waiting":30,"classes":[{"name":"batch","waiting":25,"oldest_wait_ms":900}]}
//! {"event":"complete","client":0,"duration_us":1500,"wait_us":20,"outcome":"committed"}
//! {"event":"disconnect","client":0}
//! ```
//! `client` is the index of the connect event (0 for the first). For each event one JSON line
//! is written with the decision.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::{json, Value};
use sluice_config::PolicyConfig;

use crate::{
    statement_kind, ClientFacts, CompletionFacts, ConnectDecision, Cookies, Outcome, PolicyEngine,
    PolicyError, PoolSnapshot, PressureFacts, Rejection, TransactionDecision, TransactionFacts,
};

/// Counts of what a simulation decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimSummary {
    /// Events replayed.
    pub events: u64,
    /// Clients admitted.
    pub admitted: u64,
    /// Clients rejected.
    pub rejected: u64,
    /// Transactions and queries that proceeded.
    pub proceeded: u64,
    /// Transactions and queries rejected.
    pub tx_rejected: u64,
    /// Pressure actions returned.
    pub actions: u64,
}

#[derive(Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
enum Event {
    Connect {
        #[serde(default)]
        user: String,
        #[serde(default)]
        database: String,
        #[serde(default)]
        application_name: String,
        #[serde(default)]
        addr: Option<IpAddr>,
        #[serde(default)]
        port: u16,
        #[serde(default)]
        tls: bool,
        #[serde(default)]
        params: BTreeMap<String, String>,
    },
    Transaction(TxEvent),
    Query(TxEvent),
    Pressure(PressureFacts),
    Complete {
        client: usize,
        #[serde(default)]
        duration_us: u64,
        #[serde(default)]
        wait_us: u64,
        #[serde(default = "committed")]
        outcome: Outcome,
    },
    Disconnect {
        client: usize,
    },
}

fn committed() -> Outcome {
    Outcome::Committed
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxEvent {
    client: usize,
    query: String,
    #[serde(default)]
    in_transaction: bool,
    #[serde(default)]
    pool: Option<PoolJson>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct PoolJson {
    #[serde(default)]
    size: u32,
    #[serde(default)]
    active: u32,
    #[serde(default)]
    idle: u32,
    #[serde(default)]
    waiting: u32,
}

/// A connected client: its class and cookies, or None if it was rejected.
struct Client {
    admitted: Option<(String, Cookies)>,
}

fn rejection_json(r: &Rejection) -> Value {
    json!({"decision": "reject", "sqlstate": r.sqlstate.as_str(), "message": r.message})
}

/// Loads the plugins of `cfg` and replays `events` through them, writing one decision line per
/// event to `out`. Clients admitted without a class get `classes[0]` (or "default").
pub fn simulate(
    cfg: &PolicyConfig,
    classes: &[String],
    events: impl BufRead,
    mut out: impl Write,
) -> Result<SimSummary, PolicyError> {
    let engine = PolicyEngine::new(cfg, classes)?;
    let default_class = classes.first().cloned().unwrap_or_else(|| "default".into());
    let mut clients: Vec<Client> = Vec::new();
    let mut sum = SimSummary::default();
    for (n, line) in events.lines().enumerate() {
        let line = line?;
        let bad = |message: String| PolicyError::Event {
            line: n + 1,
            message,
        };
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let event: Event = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        sum.events += 1;
        let admitted = |client: usize| match clients.get(client) {
            Some(Client { admitted: Some(a) }) => Ok(a.clone()),
            Some(_) => Err(bad(format!("client {client} was rejected"))),
            None => Err(bad(format!(
                "no client {client} (clients are numbered by connect event from 0)"
            ))),
        };
        let result = match event {
            Event::Connect {
                user,
                database,
                application_name,
                addr,
                port,
                tls,
                params,
            } => {
                let params: Vec<(String, String)> = params.into_iter().collect();
                let facts = ClientFacts {
                    user: &user,
                    database: &database,
                    application_name: &application_name,
                    addr,
                    port,
                    tls,
                    params: &params,
                };
                let client = clients.len();
                let mut line = json!({"event": "connect", "client": client});
                let decision = match engine.on_connect(&facts) {
                    ConnectDecision::Admit(a) => {
                        sum.admitted += 1;
                        let class = a.class.clone().unwrap_or_else(|| default_class.clone());
                        clients.push(Client {
                            admitted: Some((class, a.cookies.clone())),
                        });
                        json!({
                            "decision": "admit", "class": a.class, "priority": a.priority,
                            "cookies": a.cookies.values().collect::<Vec<_>>(), "limit_key": a.limit_key,
                            "key_max_active": a.key_max_active,
                            "key_rate": a.key_rate.map(|r| json!({"per_sec": r.per_sec, "burst": r.burst})),
                            "key_max_clients": a.key_max_clients,
                        })
                    }
                    ConnectDecision::Reject(r) => {
                        sum.rejected += 1;
                        clients.push(Client { admitted: None });
                        rejection_json(&r)
                    }
                };
                merge_json(&mut line, decision);
                line
            }
            Event::Transaction(tx) => {
                tx_line(&engine, "transaction", &tx, admitted(tx.client)?, &mut sum)
            }
            Event::Query(tx) => tx_line(&engine, "query", &tx, admitted(tx.client)?, &mut sum),
            Event::Pressure(p) => {
                let actions = engine.on_pressure(&p);
                sum.actions += actions.len() as u64;
                json!({"event": "pressure", "pool": p.pool, "actions": actions})
            }
            Event::Complete {
                client,
                duration_us,
                wait_us,
                outcome,
            } => {
                let (class, cookies) = admitted(client)?;
                engine.on_complete(&CompletionFacts {
                    cookies: &cookies,
                    class: &class,
                    duration_us,
                    wait_us,
                    outcome,
                });
                json!({"event": "complete", "client": client})
            }
            Event::Disconnect { client } => {
                let (_, cookies) = admitted(client)?;
                engine.on_disconnect(&cookies);
                json!({"event": "disconnect", "client": client})
            }
        };
        serde_json::to_writer(&mut out, &result).map_err(std::io::Error::from)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(sum)
}

fn tx_line(
    engine: &PolicyEngine,
    event: &str,
    tx: &TxEvent,
    (class, cookies): (String, Cookies),
    sum: &mut SimSummary,
) -> Value {
    let pool = tx.pool.unwrap_or_default();
    let kind = statement_kind(&tx.query);
    let facts = TransactionFacts {
        cookies: &cookies,
        class: &class,
        kind,
        in_transaction: tx.in_transaction,
        query: &tx.query,
        pool: PoolSnapshot {
            size: pool.size,
            active: pool.active,
            idle: pool.idle,
            waiting: pool.waiting,
        },
    };
    let decision = if event == "query" {
        engine.on_query(&facts)
    } else {
        engine.on_transaction(&facts)
    };
    let mut line =
        json!({"event": event, "client": tx.client, "kind": format!("{kind:?}").to_lowercase()});
    let d = match decision {
        TransactionDecision::Proceed(p) => {
            sum.proceeded += 1;
            json!({"decision": "proceed", "priority": p.priority, "route": p.route, "timeout_ms": p.timeout_ms})
        }
        TransactionDecision::Reject(r) => {
            sum.tx_rejected += 1;
            rejection_json(&r)
        }
    };
    merge_json(&mut line, d);
    line
}

fn merge_json(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}
