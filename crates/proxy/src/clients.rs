//! Connected clients: their public state for the admin console, client-connection limits
//! (global, per database, user, address, application and policy key), and KILL_CLIENT.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::SystemTime;

use dashmap::DashMap;
use foldhash::fast::RandomState;
use parking_lot::Mutex;

use sluice_config::Config;

use crate::alarms::IdleDeadline;

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
    /// When the client's wait for its own next message times out (see [`crate::alarms`]).
    pub idle: IdleDeadline,
}

/// A client's kill switch. Only the client's own task waits on it, and a tokio task's waker
/// never changes, so the session registers that waker once ([`KillSwitch::watch`]) and every
/// later wait is a load of the flags: no atomic read-modify-write per transaction, where an
/// `AtomicWaker` took two on every poll and a `CancellationToken` two locks.
///
/// The same switch carries the graceful shutdown's "leave when idle" and the maintenance tick's
/// "your idle deadline passed", so a session waiting for its client's next transaction watches
/// a few flags and one waker.
#[derive(Debug, Default)]
pub struct KillSwitch {
    flipped: AtomicBool,
    idle_end: AtomicBool,
    /// The maintenance tick saw the client's idle deadline pass (see [`crate::alarms`]).
    idle_flag: AtomicBool,
    /// The waker of the task watching the switch. Woken by reference, so it stays registered
    /// after a wake-up: the shutdown's "leave when idle" may come before the flip.
    task: Mutex<Option<Waker>>,
}

impl KillSwitch {
    /// Disconnects the client at its next wait.
    pub fn flip(&self) {
        self.flipped.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Disconnects the client once it is between transactions (graceful shutdown).
    pub fn end_when_idle(&self) {
        self.idle_end.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Tells the session its idle deadline passed, unless it was told already and has not
    /// looked yet.
    pub fn flag_idle(&self) {
        if !self.idle_flag.swap(true, Ordering::SeqCst) {
            self.wake();
        }
    }

    /// Takes the flag [`Self::flag_idle`] raised: a load while it is down.
    #[inline]
    pub fn take_idle_flag(&self) -> bool {
        self.idle_flag.load(Ordering::Relaxed) && self.idle_flag.swap(false, Ordering::SeqCst)
    }

    /// The flag is stored before the lock is taken, and the watcher checks flags after it
    /// registered under the same lock: either the watcher sees the flag or it gets the wake-up.
    fn wake(&self) {
        if let Some(w) = &*self.task.lock() {
            w.wake_by_ref();
        }
    }

    /// Registers `waker` to be woken by [`Self::flip`] and [`Self::end_when_idle`]. A waker
    /// that wakes the same task as the one registered is not stored again.
    pub fn watch(&self, waker: &Waker) {
        let mut task = self.task.lock();
        if !task.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }

    /// Whether the switch was flipped.
    pub fn is_flipped(&self) -> bool {
        self.flipped.load(Ordering::SeqCst)
    }

    /// Whether a client between transactions should be disconnected.
    pub fn idle_should_end(&self) -> bool {
        self.is_flipped() || self.idle_end.load(Ordering::SeqCst)
    }

    /// Completes once the switch is flipped (at once if it already was). It registers the
    /// polling task on every poll: for waits off the hot path; the relay checks
    /// [`Self::is_flipped`] after one [`Self::watch`].
    pub fn flipped(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.is_flipped() {
                self.watch(cx.waker());
                if !self.is_flipped() {
                    return std::task::Poll::Pending;
                }
            }
            std::task::Poll::Ready(())
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
            idle: IdleDeadline::default(),
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
    by_id: DashMap<u64, Arc<ClientInfo>, RandomState>,
    counts: Mutex<Counts>,
    left: tokio::sync::Notify,
}

/// What a client-connection limit counts by name.
#[derive(Clone, Copy)]
enum Scope {
    Db = 0,
    User = 1,
    App = 2,
    Policy = 3,
}

/// Logged-in clients per database, user, application, policy key and address. One lock
/// covers them all, so a login checks every limit and takes its slots in one step.
#[derive(Default)]
struct Counts {
    /// By [`Scope`].
    named: [NameCounts; 4],
    addr: HashMap<IpAddr, u32, RandomState>,
}

impl Counts {
    fn named(&self, scope: Scope, name: &str) -> u32 {
        self.named[scope as usize].get(name).map_or(0, |e| e.0)
    }

    /// Counts one more client under `name`; returns the shared name to release it with.
    fn take(&mut self, scope: Scope, name: &str) -> Arc<str> {
        let map = &mut self.named[scope as usize];
        if let Some((n, key)) = map.get_mut(name) {
            *n += 1;
            return key.clone();
        }
        let key: Arc<str> = Arc::from(name);
        map.insert(key.clone(), (1, key.clone()));
        key
    }

    fn release(&mut self, scope: Scope, name: &str) {
        let map = &mut self.named[scope as usize];
        if let Some((n, _)) = map.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                map.remove(name);
            }
        }
    }
}

/// Name to (count, the shared name the holders keep).
type NameCounts = HashMap<Arc<str>, (u32, Arc<str>), RandomState>;

/// Counter slots held by one client; released on drop.
pub struct Counted {
    clients: Arc<Clients>,
    /// By [`Scope`].
    names: [Option<Arc<str>>; 4],
    addr: Option<IpAddr>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = self.clients.counts.lock();
        for (scope, name) in [Scope::Db, Scope::User, Scope::App, Scope::Policy]
            .into_iter()
            .zip(&self.names)
        {
            if let Some(name) = name {
                counts.release(scope, name);
            }
        }
        if let Some(ip) = self.addr {
            if let Some(n) = counts.addr.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    counts.addr.remove(&ip);
                }
            }
        }
    }
}

impl Clients {
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
        let full = |count: u32, max: u32| max != 0 && count >= max;
        let mut counts = self.counts.lock();
        // Every limit is checked before any slot is taken; the message is built only for
        // the limit that refuses.
        if full(counts.named(Scope::Db, db), db_max) {
            return Err(format!(
                "max_db_client_connections ({db_max}) reached for database \"{db}\""
            ));
        }
        if full(counts.named(Scope::User, user), user_max) {
            return Err(format!(
                "max_user_client_connections ({user_max}) reached for user \"{user}\""
            ));
        }
        let app_max = g.max_app_client_connections;
        if full(counts.named(Scope::App, app), app_max) {
            return Err(format!(
                "max_app_client_connections ({app_max}) reached for application \"{app}\""
            ));
        }
        let ip = addr.map(|a| a.ip());
        let addr_max = g.max_addr_client_connections;
        if let Some(ip) = ip {
            if full(counts.addr.get(&ip).copied().unwrap_or(0), addr_max) {
                return Err(format!(
                    "max_addr_client_connections ({addr_max}) reached for address {ip}"
                ));
            }
        }
        if let Some(k) = policy_key {
            let max = policy_max.unwrap_or(0);
            if full(counts.named(Scope::Policy, k), max) {
                return Err(format!(
                    "too many client connections for \"{k}\" (policy limit {max})"
                ));
            }
        }
        let names = [
            Some(counts.take(Scope::Db, db)),
            Some(counts.take(Scope::User, user)),
            Some(counts.take(Scope::App, app)),
            policy_key.map(|k| counts.take(Scope::Policy, k)),
        ];
        if let Some(ip) = ip {
            *counts.addr.entry(ip).or_insert(0) += 1;
        }
        Ok(Counted {
            clients: self.clone(),
            names,
            addr: ip,
        })
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

    /// Disconnects every client once it is between transactions (graceful shutdown).
    pub fn end_all_when_idle(&self) {
        for c in self.by_id.iter() {
            c.kill.end_when_idle();
        }
    }

    /// Flags every client whose idle deadline is past `now_ms` (the maintenance tick's
    /// [`crate::alarms::CoarseClock`] time) and wakes it; the session decides.
    pub fn flag_idle(&self, now_ms: u64) {
        for c in self.by_id.iter() {
            if c.idle.passed(now_ms) {
                c.kill.flag_idle();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicU32);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// One registration serves every later wake-up: the shutdown's "leave when idle" does not
    /// use it up, so the hard stop's flip that follows still wakes the session.
    #[test]
    fn a_watched_switch_wakes_its_task_for_the_idle_end_and_again_for_the_flip() {
        let switch = KillSwitch::default();
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        switch.watch(&waker);
        // Watching again with the same task's waker changes nothing.
        switch.watch(&waker.clone());
        assert!(!switch.idle_should_end());
        switch.end_when_idle();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(switch.idle_should_end() && !switch.is_flipped());
        switch.flip();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(switch.is_flipped());
    }

    #[test]
    fn limits_count_each_scope_and_slots_come_back_on_drop() {
        let cfg = Config::parse(
            "[sluice]\nmax_user_client_connections = 2\nmax_addr_client_connections = 3\n\
             [databases.appdb]\nhost = \"127.0.0.1\"\n[users.app]\npassword = \"x\"\n",
            None,
        )
        .expect("config");
        let clients = Arc::new(Clients::default());
        let addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let admit = |app: &str, key: Option<&str>| {
            clients.admit(&cfg, "app", "appdb", app, Some(addr), key, Some(1))
        };
        let a = admit("web", Some("k1")).expect("first");
        let err = admit("web", Some("k1"))
            .err()
            .expect("policy key k1 is full");
        assert_eq!(
            err,
            "too many client connections for \"k1\" (policy limit 1)"
        );
        let b = admit("web", Some("k2")).expect("second");
        let err = admit("cron", None).err().expect("user is full");
        assert_eq!(
            err,
            "max_user_client_connections (2) reached for user \"app\""
        );
        drop(a);
        let c = admit("cron", Some("k1")).expect("a slot came back");
        drop((b, c));
        let counts = clients.counts.lock();
        assert!(counts.named.iter().all(HashMap::is_empty));
        assert!(counts.addr.is_empty());
    }
}
