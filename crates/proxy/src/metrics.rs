//! The Prometheus text endpoint (`GET /metrics` on its own address) and the pressure tick that
//! feeds the `on-pressure` policy hook while a pool is saturated.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use sluice_policy::{ClassPressure, Hook, PluginStats, PressureFacts};
use sluice_pool::{ClassOverride, ClassSnapshot, PoolStats, WAIT_BUCKETS};

use crate::clients::ClientState;
use crate::shared::Shared;

/// Binds the metrics listener and serves it until shutdown. Returns the bound address.
pub async fn serve(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let s = shared.clone();
    shared.tracker.spawn(async move {
        loop {
            let (mut sock, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = s.hard_stop.cancelled() => return,
            };
            let s = s.clone();
            tokio::spawn(async move {
                let mut req = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                let read = sluice_pool::timer::timeout(Duration::from_secs(5), async {
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    true
                })
                .await;
                if !matches!(read, Ok(true)) {
                    return;
                }
                let line = String::from_utf8_lossy(&req);
                let resp = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
                    let body = render(&s);
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(bound)
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the `# HELP` and `# TYPE` lines of one metric family; its samples must follow at once.
fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One per-(pool, class) metric family.
fn class_family(
    o: &mut String,
    stats: &[PoolStats],
    name: &str,
    kind: &str,
    help: &str,
    value: fn(&ClassSnapshot) -> u64,
) {
    header(o, name, kind, help);
    for ps in stats {
        for c in &ps.classes {
            let _ = writeln!(
                o,
                "{name}{{pool=\"{}\",class=\"{}\"}} {}",
                esc(&ps.name),
                esc(&c.name),
                value(c)
            );
        }
    }
}

/// Renders every metric in Prometheus text format: each family is its HELP and TYPE lines
/// followed by all of its samples.
pub fn render(shared: &Shared) -> String {
    let mut o = String::with_capacity(8192);
    let s = &shared.stats;
    let counter = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    let _ = writeln!(
        o,
        "# HELP sluice_up Whether Sluice is serving.\n# TYPE sluice_up gauge\nsluice_up 1"
    );
    let _ = writeln!(o, "# HELP sluice_uptime_seconds Seconds since start.\n# TYPE sluice_uptime_seconds gauge\nsluice_uptime_seconds {}", shared.started.elapsed().as_secs());
    for (name, help, value) in [
        (
            "sluice_transactions_total",
            "Transactions relayed.",
            &s.transactions,
        ),
        ("sluice_queries_total", "Queries relayed.", &s.queries),
        (
            "sluice_policy_rejections_total",
            "Transactions rejected by policy.",
            &s.rejected,
        ),
        (
            "sluice_abandoned_transactions_total",
            "Transactions whose client vanished.",
            &s.abandoned,
        ),
        (
            "sluice_server_resets_total",
            "Server sessions reset (DISCARD ALL) because a client left session state on them.",
            &s.server_resets,
        ),
        (
            "sluice_checkout_errors_total",
            "Checkouts that failed (shed, timeout, connect).",
            &s.checkout_errors,
        ),
        (
            "sluice_client_connections_total",
            "Client connections accepted.",
            &s.accepted,
        ),
        (
            "sluice_client_connections_refused_total",
            "Client connections refused by max_client_conn.",
            &s.refused,
        ),
    ] {
        counter(&mut o, name, help, value.get());
    }
    let _ = writeln!(o, "# HELP sluice_reloads_total Configuration reloads by outcome.\n# TYPE sluice_reloads_total counter");
    let _ = writeln!(
        o,
        "sluice_reloads_total{{outcome=\"ok\"}} {}",
        shared.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "sluice_reloads_total{{outcome=\"failed\"}} {}",
        shared.reloads_failed.load(Ordering::Relaxed)
    );
    let (pok, pfail) = shared.policy.reload_counts();
    let _ = writeln!(o, "# HELP sluice_policy_reloads_total Policy reloads by outcome.\n# TYPE sluice_policy_reloads_total counter");
    let _ = writeln!(o, "sluice_policy_reloads_total{{outcome=\"ok\"}} {pok}\nsluice_policy_reloads_total{{outcome=\"failed\"}} {pfail}");

    let mut by_state = [0u64; 3];
    for c in shared.clients.all() {
        by_state[c.state() as usize] += 1;
    }
    let _ = writeln!(
        o,
        "# HELP sluice_clients Client connections by state.\n# TYPE sluice_clients gauge"
    );
    for st in [ClientState::Idle, ClientState::Waiting, ClientState::Active] {
        let _ = writeln!(
            o,
            "sluice_clients{{state=\"{}\"}} {}",
            st.as_str(),
            by_state[st as usize]
        );
    }

    let pools = shared.pools.all();
    let _ = writeln!(o, "# HELP sluice_pool_servers Server connections by pool and state.\n# TYPE sluice_pool_servers gauge");
    let stats: Vec<_> = pools.iter().map(|p| p.pool.stats()).collect();
    for ps in &stats {
        let p = esc(&ps.name);
        let _ = writeln!(
            o,
            "sluice_pool_servers{{pool=\"{p}\",state=\"active\"}} {}",
            ps.active
        );
        let _ = writeln!(
            o,
            "sluice_pool_servers{{pool=\"{p}\",state=\"idle\"}} {}",
            ps.idle
        );
        let _ = writeln!(
            o,
            "sluice_pool_servers{{pool=\"{p}\",state=\"connecting\"}} {}",
            ps.connecting
        );
    }
    let _ = writeln!(
        o,
        "# HELP sluice_pool_size Configured pool size.\n# TYPE sluice_pool_size gauge"
    );
    for ps in &stats {
        let _ = writeln!(
            o,
            "sluice_pool_size{{pool=\"{}\"}} {}",
            esc(&ps.name),
            ps.size
        );
    }
    let _ = writeln!(o, "# HELP sluice_pool_waiting Clients waiting for a server connection.\n# TYPE sluice_pool_waiting gauge");
    for ps in &stats {
        let _ = writeln!(
            o,
            "sluice_pool_waiting{{pool=\"{}\"}} {}",
            esc(&ps.name),
            ps.waiting
        );
    }
    header(
        &mut o,
        "sluice_server_connects_total",
        "counter",
        "Server connections opened.",
    );
    for ps in &stats {
        let _ = writeln!(
            o,
            "sluice_server_connects_total{{pool=\"{}\"}} {}",
            esc(&ps.name),
            ps.connects
        );
    }
    header(
        &mut o,
        "sluice_server_connect_errors_total",
        "counter",
        "Server connections or logins that failed.",
    );
    for ps in &stats {
        let _ = writeln!(
            o,
            "sluice_server_connect_errors_total{{pool=\"{}\"}} {}",
            esc(&ps.name),
            ps.connect_errors
        );
    }
    class_family(
        &mut o,
        &stats,
        "sluice_class_active",
        "gauge",
        "Server connections held per class.",
        |c| u64::from(c.active),
    );
    class_family(
        &mut o,
        &stats,
        "sluice_class_waiting",
        "gauge",
        "Transactions of a class waiting for a server connection.",
        |c| u64::from(c.waiting),
    );
    class_family(
        &mut o,
        &stats,
        "sluice_class_shed_total",
        "counter",
        "Waiters of a class shed (class max_wait exceeded).",
        |c| c.shed_total,
    );
    let _ = writeln!(o, "# HELP sluice_queue_wait_seconds Time waited for a server connection, by class.\n# TYPE sluice_queue_wait_seconds histogram");
    for ps in &stats {
        for (c, h) in ps.classes.iter().zip(&ps.waits) {
            let labels = format!("pool=\"{}\",class=\"{}\"", esc(&ps.name), esc(&c.name));
            let mut cum = 0u64;
            for (i, b) in WAIT_BUCKETS.iter().enumerate() {
                cum += h.buckets[i];
                let _ = writeln!(
                    o,
                    "sluice_queue_wait_seconds_bucket{{{labels},le=\"{b}\"}} {cum}"
                );
            }
            let _ = writeln!(
                o,
                "sluice_queue_wait_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                o,
                "sluice_queue_wait_seconds_sum{{{labels}}} {}",
                h.sum_us as f64 / 1e6
            );
            let _ = writeln!(o, "sluice_queue_wait_seconds_count{{{labels}}} {}", h.count);
        }
    }
    let plugins = shared.policy.stats();
    let _ = writeln!(o, "# HELP sluice_policy_calls_total Policy hook calls.\n# TYPE sluice_policy_calls_total counter");
    let hooks = [
        Hook::Connect,
        Hook::Transaction,
        Hook::Query,
        Hook::Pressure,
        Hook::Complete,
        Hook::Disconnect,
    ];
    for p in &plugins {
        for (i, h) in hooks.iter().enumerate() {
            let _ = writeln!(
                o,
                "sluice_policy_calls_total{{plugin=\"{}\",hook=\"{}\"}} {}",
                esc(&p.name),
                h.name(),
                p.calls[i]
            );
        }
    }
    header(
        &mut o,
        "sluice_policy_call_seconds_total",
        "counter",
        "Time spent in policy calls.",
    );
    for p in &plugins {
        let _ = writeln!(
            o,
            "sluice_policy_call_seconds_total{{plugin=\"{}\"}} {}",
            esc(&p.name),
            p.call_ns_total as f64 / 1e9
        );
    }
    for (name, kind, help, value) in [
        (
            "sluice_policy_traps_total",
            "counter",
            "Plugin traps (crashes).",
            (|p| p.traps) as fn(&PluginStats) -> u64,
        ),
        (
            "sluice_policy_timeouts_total",
            "counter",
            "Policy calls interrupted by the deadline.",
            |p| p.timeouts,
        ),
        (
            "sluice_policy_invalid_decisions_total",
            "counter",
            "Plugin decisions Sluice could not accept.",
            |p| p.invalid,
        ),
        (
            "sluice_policy_breaker_open",
            "gauge",
            "1 while the plugin's circuit breaker is open.",
            |p| u64::from(p.breaker_open),
        ),
    ] {
        header(&mut o, name, kind, help);
        for p in &plugins {
            let _ = writeln!(o, "{name}{{plugin=\"{}\"}} {}", esc(&p.name), value(p));
        }
    }
    header(
        &mut o,
        "sluice_policy_generation",
        "gauge",
        "Plugin load generation; digest is the sha256 of the loaded file.",
    );
    for p in &plugins {
        let _ = writeln!(
            o,
            "sluice_policy_generation{{plugin=\"{}\",digest=\"{}\"}} {}",
            esc(&p.name),
            esc(&p.digest),
            p.generation
        );
    }
    header(
        &mut o,
        "sluice_policy_decisions_total",
        "counter",
        "Policy decisions by outcome.",
    );
    for p in &plugins {
        let n = esc(&p.name);
        for (d, v) in &p.decisions {
            let _ = writeln!(
                o,
                "sluice_policy_decisions_total{{plugin=\"{n}\",decision=\"{}\"}} {v}",
                esc(d)
            );
        }
    }
    o
}

/// Runs `on-pressure` for saturated pools (at most once per `pressure_interval` each) and
/// applies the returned class overrides; clears them once a pool has no waiters.
pub fn pressure_tick(shared: &Shared) {
    let policy = &shared.policy;
    let wants = policy.wants(Hook::Pressure);
    for p in shared.pools.all() {
        let s = p.pool.stats();
        if s.waiting == 0 {
            if wants {
                p.pool.set_overrides(None);
            }
            continue;
        }
        // Waiters past a (possibly lowered) class budget are shed now, not at their own timer.
        p.pool.maintain();
        if !wants {
            continue;
        }
        let facts = PressureFacts {
            pool: s.name.to_string(),
            size: s.size,
            active: s.active,
            idle: s.idle,
            waiting: s.waiting,
            classes: s
                .classes
                .iter()
                .map(|c| ClassPressure {
                    name: c.name.to_string(),
                    active: c.active,
                    waiting: c.waiting,
                    oldest_wait_ms: c.oldest_wait.as_millis() as u64,
                    max_active: c.max_active,
                    max_wait_ms: c.max_wait.map(|d| d.as_millis() as u64),
                    shed_total: c.shed_total,
                })
                .collect(),
        };
        let actions = policy.on_pressure(&facts);
        let list: Vec<(usize, ClassOverride)> = actions
            .iter()
            .filter_map(|a| {
                let i = p.pool.class_index(&a.class)?;
                Some((
                    i,
                    ClassOverride {
                        max_active: a.max_active,
                        max_wait: a.max_wait_ms.map(Duration::from_millis),
                    },
                ))
            })
            .collect();
        if !list.is_empty() {
            debug!(pool = %s.name, actions = list.len(), "pressure overrides");
            p.pool.set_overrides(Some(&list));
        }
    }
}
