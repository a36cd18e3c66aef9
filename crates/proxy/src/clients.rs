//! Connected clients: their public state for the admin console, client-connection limits
//! (global, per database, user, address, application and policy key), and KILL_CLIENT.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;

use sluice_config::Config;

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// What a client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Between transactions.
    Idle = 0,
    /// Waiting for a server connection.
    Waiting = 1,
    /// Running a transaction on a server connection.
    Active = 2,
}

impl ClientState {
    /// PgBouncer's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// One client as the admin console sees it.
#[derive(Debug)]
pub struct ClientInfo {
    /// Sluice's id for the client (KILL_CLIENT takes it).
    pub id: u64,
    /// User name.
    pub user: String,
    /// Database name.
    pub db: String,
    /// application_name at login.
    pub app: String,
    /// Peer address (None for unix sockets).
    pub addr: Option<SocketAddr>,
    /// The pid Sluice gave the client.
    pub pid: u32,
    /// Scheduling class.
    pub class: String,
    /// Login time.
    pub connected_at: SystemTime,
    state: AtomicU8,
    /// The pid of the server backend serving it now, 0 if none.
    pub server_pid: AtomicU32,
    /// Flipped to disconnect the client: KILL_CLIENT, or the shutdown deadline.
    pub kill: KillSwitch,
}

/// A client's kill switch. Only the client's own task waits on it, so a flag and one waker
/// do: waiting costs two atomic operations, where a `CancellationToken` takes two locks on
/// every wait of every transaction.
#[derive(Debug, Default)]
pub struct KillSwitch {
    flipped: AtomicBool,
    waker: AtomicWaker,
}

impl KillSwitch {
    /// Disconnects the client at its next wait.
    pub fn flip(&self) {
        self.flipped.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Whether the switch was flipped.
    pub fn is_flipped(&self) -> bool {
        self.flipped.load(Ordering::SeqCst)
    }

    /// Completes once the switch is flipped (at once if it already was).
    pub fn flipped(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_flipped() {
                return std::task::Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.is_flipped() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

impl ClientInfo {
    /// A new client record.
    pub fn new(
        user: &str,
        db: &str,
        app: &str,
        addr: Option<SocketAddr>,
        pid: u32,
        class: &str,
    ) -> Self {
        ClientInfo {
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            user: user.to_string(),
            db: db.to_string(),
            app: app.to_string(),
            addr,
            pid,
            class: class.to_string(),
            connected_at: SystemTime::now(),
            state: AtomicU8::new(0),
            server_pid: AtomicU32::new(0),
            kill: KillSwitch::default(),
        }
    }

    /// Current state.
    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// Sets the state.
    pub fn set_state(&self, s: ClientState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }
}

/// All clients and their counters.
#[derive(Default)]
pub struct Clients {
    by_id: DashMap<u64, Arc<ClientInfo>>,
    counts: DashMap<String, u32>,
    left: tokio::sync::Notify,
}

/// Counter slots held by one client; released on drop.
pub struct Counted {
    clients: Arc<Clients>,
    keys: Vec<String>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        for k in &self.keys {
            self.clients.decrement(k);
        }
    }
}

/// The message for a client refused by the limit `setting` on counted `key` ("db:NAME", ...).
fn refusal(key: &str, max: u32, setting: &str) -> String {
    let (kind, subject) = key.split_once(':').unwrap_or(("", key));
    match kind {
        "db" => format!("{setting} ({max}) reached for database \"{subject}\""),
        "user" => format!("{setting} ({max}) reached for user \"{subject}\""),
        "app" => format!("{setting} ({max}) reached for application \"{subject}\""),
        "addr" => format!("{setting} ({max}) reached for address {subject}"),
        _ => format!("too many client connections for \"{subject}\" (policy limit {max})"),
    }
}

impl Clients {
    fn decrement(&self, key: &str) {
        if let Some(mut c) = self.counts.get_mut(key) {
            *c = c.saturating_sub(1);
        }
        self.counts.remove_if(key, |_, v| *v == 0);
    }

    /// Count of clients under a counter key (e.g. `addr:10.0.0.1`).
    pub fn count(&self, key: &str) -> u32 {
        self.counts.get(key).map_or(0, |c| *c)
    }

    /// Takes one slot under every applicable limit, or says which limit is full.
    #[allow(clippy::too_many_arguments)]
    pub fn admit(
        self: &Arc<Self>,
        cfg: &Config,
        user: &str,
        db: &str,
        app: &str,
        addr: Option<SocketAddr>,
        policy_key: Option<&str>,
        policy_max: Option<u32>,
    ) -> Result<Counted, String> {
        let g = &cfg.sluice;
        let db_max = cfg
            .databases
            .get(db)
            .and_then(|d| d.max_db_client_connections)
            .unwrap_or(g.max_db_client_connections);
        let user_max = cfg
            .users
            .get(user)
            .and_then(|u| u.max_user_client_connections)
            .unwrap_or(g.max_user_client_connections);
        // (counted key, limit, what the limit is called); refusal messages are built only
        // when a limit is hit.
        let mut wanted: Vec<(String, u32, &str)> = vec![
            (format!("db:{db}"), db_max, "max_db_client_connections"),
            (
                format!("user:{user}"),
                user_max,
                "max_user_client_connections",
            ),
            (
                format!("app:{app}"),
                g.max_app_client_connections,
                "max_app_client_connections",
            ),
        ];
        if let Some(a) = addr {
            wanted.push((
                format!("addr:{}", a.ip()),
                g.max_addr_client_connections,
                "max_addr_client_connections",
            ));
        }
        if let Some(k) = policy_key {
            wanted.push((format!("key:{k}"), policy_max.unwrap_or(0), "policy"));
        }
        let mut taken = Counted {
            clients: self.clone(),
            keys: Vec::new(),
        };
        for (key, max, setting) in wanted {
            let mut c = self.counts.entry(key.clone()).or_insert(0);
            if max != 0 && *c >= max {
                drop(c);
                return Err(refusal(&key, max, setting));
            }
            *c += 1;
            drop(c);
            taken.keys.push(key);
        }
        Ok(taken)
    }

    /// Adds a logged-in client.
    pub fn register(&self, info: ClientInfo) -> Arc<ClientInfo> {
        let info = Arc::new(info);
        self.by_id.insert(info.id, info.clone());
        info
    }

    /// Removes a client.
    pub fn unregister(&self, id: u64) {
        self.by_id.remove(&id);
        self.left.notify_waiters();
    }

    /// Waits until no client is logged in.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.left.notified();
            if self.by_id.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// Every client.
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.by_id.iter().map(|e| e.value().clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Disconnects every client (the shutdown deadline passed).
    pub fn kill_all(&self) {
        for c in self.by_id.iter() {
            c.kill.flip();
        }
    }

    /// Disconnects a client; false if unknown.
    pub fn kill(&self, id: u64) -> bool {
        match self.by_id.get(&id) {
            Some(c) => {
                c.kill.flip();
                true
            }
            None => false,
        }
    }

    /// Number of logged-in clients.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no client is logged in.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
