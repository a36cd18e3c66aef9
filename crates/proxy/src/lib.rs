//! The Sluice proxy: listeners, client sessions, server connections, transaction pooling,
//! prepared-statement mapping, cancel forwarding, the admin console and metrics.
//!
//! [`Proxy::start`] binds every listener and returns a [`Running`] handle; the binary and the
//! integration tests drive it the same way.

pub mod admin;
pub mod alarms;
pub mod auth;
pub mod cancel;
pub mod clients;
pub mod counter;
pub mod io;
pub mod metrics;
pub mod params;
pub mod pools;
pub mod prepared;
mod readiness;
pub mod relay;
pub mod server;
pub mod session;
pub mod shared;
mod sockopt;
pub mod stream;
mod tick;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use sluice_config::Config;
use sluice_policy::Policy;
use sluice_wire::{backend, ErrorFields, SqlState};

pub use shared::Shared;

/// Why the proxy could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The new configuration was refused.
    #[error("reload refused: {0}")]
    Reload(String),
    /// Nothing could be started to serve Sluice's deadlines (see `sluice_pool::timer`).
    #[error("cannot start the timer: {0}")]
    Timer(#[source] std::io::Error),
}

/// How to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// SIGTERM: stop accepting, let transactions finish within `shutdown_timeout`, close idle
    /// clients with 57P01, exit.
    Graceful,
    /// SIGINT: the same, but without waiting for transactions.
    Fast,
}

/// Starts Sluice.
pub struct Proxy;

/// A running Sluice.
pub struct Running {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

impl Proxy {
    /// Binds every listener (port 0 allowed) and starts serving.
    pub async fn start(config: Config, policy: Arc<dyn Policy>) -> Result<Running, ProxyError> {
        sluice_pool::timer::drive_here().map_err(ProxyError::Timer)?;
        let g = config.sluice.clone();
        let shared = Arc::new(Shared::new(config, policy.clone()));
        policy.set_pool_state(Arc::new(PoolState(Arc::downgrade(&shared))));
        let permits = shared.client_permits.clone();
        let mut local_addr = None;
        let mut listeners = Vec::new();
        let mut port = g.listen_port;
        for ip in &g.listen_addr {
            let addr = SocketAddr::new(*ip, port);
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| ProxyError::Bind {
                addr: addr.to_string(),
                source,
            })?;
            if g.tcp_defer_accept {
                if let Err(e) = sockopt::defer_accept(&l) {
                    warn!(addr = %bound, error = %e, "tcp_defer_accept: cannot set TCP_DEFER_ACCEPT");
                }
            }
            // With port 0, every address shares the port the first one got.
            port = bound.port();
            local_addr.get_or_insert(bound);
            listeners.push(l);
        }
        let mut unix = None;
        if let Some(dir) = &g.unix_socket_dir {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path).map_err(|source| ProxyError::Bind {
                addr: path.display().to_string(),
                source,
            })?;
            unix = Some(l);
        }
        let local_addr = local_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)));
        for l in listeners {
            let tcp = TcpAcceptor::new(shared.clone(), l);
            let task = accept_loop(shared.clone(), permits.clone(), tcp);
            shared.tracker.spawn(task);
        }
        if let Some(l) = unix {
            let task = accept_loop(shared.clone(), permits.clone(), l);
            shared.tracker.spawn(task);
        }
        let metrics_addr = match g.metrics_addr {
            Some(a) => Some(metrics::serve(shared.clone(), a).await.map_err(|source| {
                ProxyError::Bind {
                    addr: a.to_string(),
                    source,
                }
            })?),
            None => None,
        };
        shared.clone().tracker.spawn(maintenance(shared.clone()));
        // Past the shutdown deadline every logged-in client goes (login watches it itself).
        let s = shared.clone();
        shared.tracker.spawn(async move {
            s.hard_stop.cancelled().await;
            s.clients.kill_all();
        });
        info!(addr = %local_addr, "sluice listening");
        Ok(Running {
            shared,
            local_addr,
            metrics_addr,
        })
    }
}

impl Running {
    /// The first TCP listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics endpoint's address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared state (for the admin console, tests and the binary).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Applies a new configuration without dropping clients.
    pub async fn reload(&self, config: Config) -> Result<(), ProxyError> {
        apply_config(&self.shared, config)
            .await
            .map_err(ProxyError::Reload)
    }

    /// Starts shutting down.
    pub fn shutdown(&self, mode: ShutdownMode) {
        begin_shutdown(&self.shared, mode);
    }

    /// Waits for a shutdown to be requested and then for it to finish: every client gone (or
    /// the deadline passed) and every task ended.
    pub async fn wait(self) {
        let s = &self.shared;
        s.shutdown.cancelled().await;
        tokio::select! {
            _ = s.clients.wait_empty() => {}
            _ = s.hard_stop.cancelled() => {}
        }
        s.hard_stop.cancel();
        s.tracker.close();
        s.tracker.wait().await;
    }
}

/// Starts a shutdown: stop accepting and close idle clients now; close the rest when their
/// transaction ends, or at the deadline.
pub fn begin_shutdown(shared: &Arc<Shared>, mode: ShutdownMode) {
    if shared.shutdown.is_cancelled() {
        // A second request means now.
        shared.hard_stop.cancel();
        return;
    }
    info!(?mode, "shutting down");
    shared.shutdown.cancel();
    // After the cancel: a client logging in now sees the token cancelled (login checks it).
    shared.clients.end_all_when_idle();
    let deadline = match mode {
        ShutdownMode::Graceful => shared.config().sluice.shutdown_timeout,
        ShutdownMode::Fast => Duration::ZERO,
    };
    let s = shared.clone();
    shared.tracker.spawn(async move {
        tokio::select! {
            _ = sluice_pool::timer::sleep(deadline) => s.hard_stop.cancel(),
            _ = s.hard_stop.cancelled() => {}
        }
    });
    for p in shared.pools.all() {
        p.pool.close();
    }
    shared.tracker.close();
}

/// Re-reads the config file the running config came from and applies it.
pub async fn reload_from_disk(shared: &Arc<Shared>) -> Result<(), String> {
    let Some(path) = shared.config().path.clone() else {
        return Err("the running configuration was not loaded from a file".into());
    };
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .map_err(|e| e.to_string())?;
    match loaded {
        Ok(cfg) => apply_config(shared, cfg).await,
        Err(e) => {
            shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "reload refused; the previous configuration stays");
            Err(e.to_string())
        }
    }
}

/// Applies a validated config: policies first (a bad plugin refuses the whole reload), then
/// pools and limits. Sessions keep running.
pub async fn apply_config(shared: &Arc<Shared>, cfg: Config) -> Result<(), String> {
    let old = shared.config();
    if old.sluice.listen_port != cfg.sluice.listen_port
        || old.sluice.listen_addr != cfg.sluice.listen_addr
    {
        warn!("listen_addr/listen_port changes need a restart; the other settings are applied");
    }
    let policy = shared.policy.clone();
    let pcfg = cfg.policy.clone();
    let classes: Vec<String> = cfg.classes.iter().map(|c| c.name.clone()).collect();
    let res = tokio::task::spawn_blocking(move || policy.reload(&pcfg, &classes))
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = res {
        shared.reloads_failed.fetch_add(1, Ordering::Relaxed);
        warn!(error = %e, "reload refused; the previous configuration stays");
        return Err(e.to_string());
    }
    shared.pools.reconfigure(&cfg);
    let (was, now) = (
        old.sluice.max_client_conn as usize,
        cfg.sluice.max_client_conn as usize,
    );
    if now > was {
        shared.client_permits.add_permits(now - was);
    } else if now < was {
        // Sessions holding permits keep them; the cap tightens as they leave.
        let shrink = shared.client_permits.forget_permits(was - now);
        if shrink < was - now {
            let s = shared.clone();
            let rest = was - now - shrink;
            shared.tracker.spawn(async move {
                if let Ok(p) = s.client_permits.acquire_many(rest as u32).await {
                    p.forget();
                }
            });
        }
    }
    shared.set_config(cfg);
    shared.reloads_ok.fetch_add(1, Ordering::Relaxed);
    info!("configuration reloaded");
    if let Some(hook) = shared.reload_hook() {
        let cfg = shared.config();
        // A hook may block (stopping a watcher thread joins it).
        let _ = tokio::task::spawn_blocking(move || hook(&cfg)).await;
    }
    Ok(())
}

struct PoolState(std::sync::Weak<Shared>);

impl sluice_policy::PoolStateProvider for PoolState {
    fn pool_state(&self, pool: &str) -> Option<sluice_policy::PoolSnapshot> {
        let shared = self.0.upgrade()?;
        let p = shared.pools.all().into_iter().find(|p| {
            let name = format!("{}.{}", p.db, p.user);
            name == pool || p.db == pool
        })?;
        let s = p.pool.stats();
        Some(sluice_policy::PoolSnapshot {
            size: s.size,
            active: s.active,
            idle: s.idle,
            waiting: s.waiting,
        })
    }
}

async fn refuse(mut stream: stream::Stream, msg: &str) {
    use tokio::io::AsyncWriteExt;
    let mut buf = bytes::BytesMut::new();
    backend::encode_error(
        &mut buf,
        &ErrorFields::fatal(SqlState::TOO_MANY_CONNECTIONS, msg),
    );
    let _ = sluice_pool::timer::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
}

/// A client connection and its peer address (none for a Unix socket).
type Accepted = (stream::Stream, Option<SocketAddr>);

/// A listener as [`accept_loop`] uses it: the next client connection, its socket readied.
trait Acceptor: Send {
    fn next(&mut self) -> impl std::future::Future<Output = std::io::Result<Accepted>> + Send;
}

/// A TCP listener, and the socket options its connections get.
struct TcpAcceptor {
    listener: TcpListener,
    sockets: sockopt::ClientSockets,
    shared: Arc<Shared>,
}

impl TcpAcceptor {
    fn new(shared: Arc<Shared>, listener: TcpListener) -> Self {
        let sockets = sockopt::ClientSockets::new(&listener, shared.config().sluice.tcp_keepalive);
        TcpAcceptor {
            listener,
            sockets,
            shared,
        }
    }
}

impl Acceptor for TcpAcceptor {
    async fn next(&mut self) -> std::io::Result<Accepted> {
        let (sock, peer) = self.listener.accept().await?;
        let keepalive = self.shared.config().sluice.tcp_keepalive;
        self.sockets.accepted(&self.listener, &sock, keepalive);
        Ok((stream::Stream::Tcp(sock), Some(peer)))
    }
}

impl Acceptor for UnixListener {
    async fn next(&mut self) -> std::io::Result<Accepted> {
        let (sock, _) = self.accept().await?;
        Ok((stream::Stream::Unix(sock), None))
    }
}

/// Hands each connection that `listener` accepts to [`dispatch`], until shutdown.
async fn accept_loop(shared: Arc<Shared>, permits: Arc<Semaphore>, mut listener: impl Acceptor) {
    // One shutdown future for the listener's life: made anew per accept, it would join and
    // leave the token's waiter list every time.
    let shutdown = shared.shutdown.clone();
    let stop = shutdown.cancelled();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => return,
            r = listener.next() => r,
        };
        match accepted {
            Ok((stream, peer)) => dispatch(&shared, stream, peer, &permits),
            Err(e) => {
                error!(error = %e, "accept failed");
                sluice_pool::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    stream: stream::Stream,
    peer: Option<SocketAddr>,
    permits: &Arc<Semaphore>,
) {
    match permits.clone().try_acquire_owned() {
        Ok(permit) => {
            // Counted here, so accepted and refused connections add up to all that arrived.
            shared.stats.accepted.add(1);
            let s = shared.clone();
            // Boxed, so the task itself stays small: tokio moves a task's future by value
            // between its stages, and a session's is several kilobytes.
            shared.tracker.spawn(Box::pin(async move {
                session::run(s, stream, peer).await;
                drop(permit);
            }));
        }
        Err(_) => {
            shared.stats.refused.add(1);
            let cfg = shared.config();
            let msg = format!(
                "no more connections allowed (max_client_conn = {})",
                cfg.sluice.max_client_conn
            );
            if cfg.sluice.log_pooler_errors {
                warn!(peer = %session::Peer(peer), code = SqlState::TOO_MANY_CONNECTIONS.as_str(), "connection refused: {msg}");
            }
            shared.tracker.spawn(async move {
                refuse(stream, &msg).await;
            });
        }
    }
}

async fn maintenance(shared: Arc<Shared>) {
    let mut tick = tick::Ticker::new(alarms::TICK);
    let mut n: u64 = 0;
    let mut last_stats = std::time::Instant::now();
    let mut last_pressure = last_stats;
    loop {
        tokio::select! {
            () = tick.tick() => {}
            _ = shared.hard_stop.cancelled() => return,
        }
        n += 1;
        if shared.shutdown.is_cancelled() && shared.clients.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        shared.alarms.fire_due(now);
        shared.clients.flag_idle(shared.coarse_clock.set(now));
        if n.is_multiple_of(10) {
            shared.pools.maintain();
        }
        if n.is_multiple_of(600) {
            shared.registry.collect_garbage();
        }
        // On the tick: a pressure_interval under the tick's 100 ms acts as 100 ms.
        if last_pressure.elapsed() >= shared.config().policy.pressure_interval {
            last_pressure = std::time::Instant::now();
            metrics::pressure_tick(&shared);
        }
        if let Some(period) = shared.config().sluice.stats_period {
            if last_stats.elapsed() >= period {
                last_stats = std::time::Instant::now();
                let s = &shared.stats;
                info!(
                    clients = shared.clients.len(),
                    transactions = s.transactions.get(),
                    queries = s.queries.get(),
                    wait_us = s.wait_us.get(),
                    checkout_errors = s.checkout_errors.get(),
                    "stats"
                );
            }
        }
    }
}
