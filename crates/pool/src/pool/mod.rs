//! The pool: idle server connections, a scheduler for waiters, connection opening and reaping.
//!
//! One mutex guards the whole state of a pool; every critical section is short and does no IO.
//! Connections are handed straight from a releasing guard to the chosen waiter, so a release
//! and the next grant are one step and no wake-up can be lost. Opening a connection runs in its
//! own task; the new connection goes to the best waiter at the time it is ready.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::limit::{Hungry, Permit, SharedLimit};
use crate::sched::{ClassOverride, ClassSnapshot, ClassSpec, Grant, Scheduler, Ticket};
use crate::stats::{Histogram, PoolStats};

use crate::clock::now;

/// A boxed future, as returned by [`Connector::connect`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the pool needs from a connection it holds.
pub trait Poolable: Send + 'static {
    /// Whether the connection may go back to the idle list: no open transaction, nothing unread.
    /// A guard dropped over a connection that is not reusable discards it.
    fn reusable(&self) -> bool;
    /// A cheap, non-blocking liveness check before reuse. `false` discards the connection.
    fn healthy(&mut self) -> bool;
}

/// Opens and closes connections for a pool. The pool never does IO itself.
pub trait Connector: Send + Sync + 'static {
    /// The connection type.
    type Conn: Poolable;
    /// The error an open attempt reports; waiters receive a clone.
    type Error: Clone + Send + Sync + std::fmt::Display + 'static;
    /// Opens one connection, bounded in time by the connector.
    fn connect(&self) -> BoxFuture<Result<Self::Conn, Self::Error>>;
    /// Closes a connection the pool no longer wants (politely, if the connector can).
    fn close(&self, conn: Self::Conn);
}

/// Settings of one pool. Replaced whole on reload.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Pool name for errors and stats, e.g. `appdb.app`.
    pub name: Arc<str>,
    /// Most server connections.
    pub size: u32,
    /// Connections kept open even when idle.
    pub min_size: u32,
    /// Close connections idle longer than this.
    pub idle_timeout: Option<Duration>,
    /// Close connections older than this when they are next released.
    pub lifetime: Option<Duration>,
    /// The pool-wide wait budget (`query_wait_timeout`), for classes without `max_wait`.
    pub wait_timeout: Option<Duration>,
    /// After a failed connect, fail waiters fast for this long instead of retrying.
    pub login_retry: Duration,
    /// Scheduling classes; class 0 is the default.
    pub classes: Vec<ClassSpec>,
    /// Priority points a waiter gains per second of waiting.
    pub aging_per_sec: f64,
}

/// Why a checkout failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckoutError<E: std::fmt::Display> {
    /// The class's wait budget ran out.
    #[error("no server connection in pool \"{pool}\" for class \"{class}\" within {waited:?}")]
    Shed {
        /// Pool name.
        pool: Arc<str>,
        /// Class name.
        class: Arc<str>,
        /// Time waited.
        waited: Duration,
    },
    /// The pool's `query_wait_timeout` ran out.
    #[error("query_wait_timeout: no server connection in pool \"{pool}\" within {waited:?}")]
    Timeout {
        /// Pool name.
        pool: Arc<str>,
        /// Time waited.
        waited: Duration,
    },
    /// Opening a server connection failed and none is available.
    #[error("server connection failed: {0}")]
    Connect(E),
    /// The pool is closed (shutdown or removed by reload).
    #[error("pool \"{0}\" is closed")]
    Closed(Arc<str>),
}

/// What a waiter is told: a connection, or why there is none.
type Answer<C, E> = Result<Handoff<C>, CheckoutError<E>>;
type Reply<C, E> = oneshot::Sender<Answer<C, E>>;
type Receipt<C, E> = oneshot::Receiver<Answer<C, E>>;

struct Slot<C> {
    /// Boxed: a slot moves in and out of the idle list and guards on every transaction.
    conn: Box<C>,
    created: Instant,
    generation: u64,
    _permits: Vec<Permit>,
}

struct Handoff<C> {
    slot: Slot<C>,
    grant: Grant,
    waited: Duration,
}

struct IdleConn<C> {
    slot: Slot<C>,
    since: Instant,
}

struct State<C, E: std::fmt::Display> {
    settings: PoolSettings,
    sched: Scheduler<Reply<C, E>>,
    idle: Vec<IdleConn<C>>,
    connecting: u32,
    generation: u64,
    paused: bool,
    closed: bool,
    last_connect_error: Option<(Instant, E)>,
    waits: Vec<Histogram>,
    checkouts: u64,
    connects: u64,
    connect_errors: u64,
}

struct Inner<K: Connector> {
    connector: K,
    state: Mutex<State<K::Conn, K::Error>>,
    limits: Vec<Arc<SharedLimit>>,
    idle_notify: Notify,
    runtime: tokio::runtime::Handle,
    me: Weak<Inner<K>>,
}

/// A pool of server connections. Cheap to clone.
pub struct Pool<K: Connector> {
    inner: Arc<Inner<K>>,
}

impl<K: Connector> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

/// Connections to close once the lock is released.
type Closing<C> = Vec<Slot<C>>;

impl<K: Connector> Pool<K> {
    /// Creates a pool. Must be called inside a tokio runtime. `limits` are shared caps such as
    /// `max_db_connections` that this pool's connections count against.
    pub fn new(settings: PoolSettings, connector: K, limits: Vec<Arc<SharedLimit>>) -> Self {
        let now = now();
        let classes = settings.classes.clone();
        let waits = classes.iter().map(|_| Histogram::default()).collect();
        let sched = Scheduler::new(settings.size, classes, settings.aging_per_sec, now);
        let inner = Arc::new_cyclic(|me| Inner {
            connector,
            state: Mutex::new(State {
                settings,
                sched,
                idle: Vec::new(),
                connecting: 0,
                generation: 0,
                paused: false,
                closed: false,
                last_connect_error: None,
                waits,
                checkouts: 0,
                connects: 0,
                connect_errors: 0,
            }),
            limits,
            idle_notify: Notify::new(),
            runtime: tokio::runtime::Handle::current(),
            me: me.clone(),
        });
        for limit in &inner.limits {
            let me: Arc<dyn Hungry> = inner.clone();
            limit.register_member(Arc::downgrade(&me));
        }
        Pool { inner }
    }

    /// The pool's name.
    pub fn name(&self) -> Arc<str> {
        self.inner.state.lock().settings.name.clone()
    }

    /// The connector.
    pub fn connector(&self) -> &K {
        &self.inner.connector
    }

    /// Index of a class by name.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.inner.state.lock().sched.class_index(name)
    }

    /// Index of the class clients go to when theirs is unknown.
    pub fn default_class(&self) -> usize {
        self.inner.state.lock().sched.default_class()
    }

    /// Takes a connection, waiting in the scheduler's queue if none is free. The wait is bounded
    /// by the class's `max_wait`, else the pool's `query_wait_timeout`.
    pub async fn checkout(&self, ticket: Ticket) -> Result<Guard<K>, CheckoutError<K::Error>> {
        self.checkout_notify(ticket, None, || {}).await
    }

    /// [`Self::checkout`], calling `on_notice` once if the wait lasts `notice_after`. One timer
    /// serves both the notice and the wait budget, and it is only built when either is set.
    pub async fn checkout_notify(
        &self,
        ticket: Ticket,
        notice_after: Option<Duration>,
        mut on_notice: impl FnMut(),
    ) -> Result<Guard<K>, CheckoutError<K::Error>> {
        let started = now();
        let mut notice_at = notice_after.map(|d| started + d);
        loop {
            let mut guard = self
                .checkout_once(&ticket, started, &mut notice_at, &mut on_notice)
                .await?;
            if guard.conn_mut().healthy() {
                return Ok(guard);
            }
            // Died while idle: drop it and try again within the same budget.
            guard.discard();
        }
    }

    /// Takes an idle connection at once if one is free for this ticket, without queueing.
    /// The caller checks [`Poolable::healthy`] itself (see [`Guard::check`]).
    pub fn try_checkout(&self, ticket: &Ticket) -> Option<Guard<K>> {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        if st.closed || st.paused || !st.sched.eligible(ticket) {
            return None;
        }
        let idle = st.idle.pop()?;
        let grant = st.sched.grant_now(ticket);
        st.checkouts += 1;
        if let Some(h) = st.waits.get_mut(grant.class) {
            h.record(Duration::ZERO);
        }
        drop(st);
        Some(Guard {
            slot: Some(idle.slot),
            grant,
            pool: inner.clone(),
            waited: Duration::ZERO,
        })
    }

    async fn checkout_once(
        &self,
        ticket: &Ticket,
        started: Instant,
        notice_at: &mut Option<Instant>,
        on_notice: &mut impl FnMut(),
    ) -> Result<Guard<K>, CheckoutError<K::Error>> {
        let inner = &self.inner;
        let (rx, id, budget, class, timeout_kind) = {
            let mut closing = Vec::new();
            let mut st = inner.state.lock();
            if st.closed {
                return Err(CheckoutError::Closed(st.settings.name.clone()));
            }
            if !st.paused && st.sched.eligible(ticket) {
                if let Some(idle) = st.idle.pop() {
                    let grant = st.sched.grant_now(ticket);
                    st.checkouts += 1;
                    let waited = now().saturating_duration_since(started);
                    if let Some(h) = st.waits.get_mut(grant.class) {
                        h.record(waited);
                    }
                    drop(st);
                    return Ok(Guard {
                        slot: Some(idle.slot),
                        grant,
                        pool: inner.clone(),
                        waited,
                    });
                }
            }
            // Fail fast while the server keeps refusing logins and nothing is open.
            if let Some(err) = st.fast_fail() {
                return Err(CheckoutError::Connect(err));
            }
            let (tx, rx) = oneshot::channel();
            let class = st.sched.resolve_class(ticket.class);
            let class_wait = st.sched.class_max_wait(class);
            let (budget, timeout_kind) = match class_wait {
                Some(w) => (Some(w), false),
                None => (st.settings.wait_timeout, true),
            };
            // Queued as of the checkout's start: a retry after a dead connection keeps its place
            // in the aging order and its budget.
            let id = st.sched.enqueue(ticket.clone(), tx, started);
            inner.fill(&mut st, &mut closing, started);
            drop(st);
            drop(closing);
            (rx, id, budget, class, timeout_kind)
        };
        let mut wait = Waiting {
            pool: inner.clone(),
            id,
            rx: Some(rx),
        };
        let deadline = budget.map(|b| started + b);
        let next_wake = |notice_at: Option<Instant>| match (notice_at, deadline) {
            (Some(n), Some(d)) => Some(n.min(d)),
            (n, d) => n.or(d),
        };
        let mut timer = next_wake(*notice_at).map(crate::timer::sleep_until);
        let answer = loop {
            let handoff = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = wait.poll_recv(cx) {
                    return Poll::Ready(Some(r));
                }
                match timer.as_mut().map(|t| Pin::new(t).poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(None),
                    _ => Poll::Pending,
                }
            })
            .await;
            if let Some(answer) = handoff {
                break answer;
            }
            let at = now();
            if notice_at.is_some_and(|n| at >= n) {
                *notice_at = None;
                on_notice();
            }
            if deadline.is_some_and(|d| at >= d) {
                break wait.give_up(class, at.saturating_duration_since(started), timeout_kind);
            }
            match (next_wake(*notice_at), timer.as_mut()) {
                (Some(t), Some(sleep)) => sleep.reset(t),
                _ => timer = None,
            }
        };
        let handoff = answer?;
        Ok(Guard {
            slot: Some(handoff.slot),
            grant: handoff.grant,
            pool: inner.clone(),
            waited: handoff.waited,
        })
    }

    /// Runs periodic upkeep: reaps idle and old connections, sheds waiters past a live budget,
    /// and opens connections up to `min_size`. Call about once a second.
    pub fn maintain(&self) {
        let now = now();
        let mut closing = Vec::new();
        let mut shed = Vec::new();
        {
            let mut st = self.inner.state.lock();
            let name = st.settings.name.clone();
            let fallback = st.settings.wait_timeout;
            for e in st.sched.expire(now, fallback) {
                let err = if e.pool_timeout {
                    CheckoutError::Timeout {
                        pool: name.clone(),
                        waited: e.waited,
                    }
                } else {
                    CheckoutError::Shed {
                        pool: name.clone(),
                        class: e.class,
                        waited: e.waited,
                    }
                };
                shed.push((e.payload, err));
            }
            let min = st.settings.min_size as usize;
            let idle_timeout = st.settings.idle_timeout;
            let lifetime = st.settings.lifetime;
            let generation = st.generation;
            let mut keep = Vec::with_capacity(st.idle.len());
            let total_open = st.sched.active() as usize + st.idle.len();
            let mut open = total_open;
            // Oldest idle first (the list is LIFO: index 0 idled first).
            for mut c in std::mem::take(&mut st.idle) {
                let too_idle = idle_timeout.is_some_and(|t| now - c.since >= t) && open > min;
                let too_old = lifetime.is_some_and(|t| now - c.slot.created >= t);
                let stale = c.slot.generation != generation;
                if too_idle || too_old || stale || !c.slot.conn.healthy() {
                    open -= 1;
                    closing.push(c.slot);
                } else {
                    keep.push(c);
                }
            }
            st.idle = keep;
            for (tx, err) in shed {
                let _ = tx.send(Err(err));
            }
            self.inner.fill(&mut st, &mut closing, now);
        }
        self.inner.close_all(closing);
    }

    /// Holds new checkouts until [`Self::resume`]; running transactions go on.
    pub fn pause(&self) {
        self.inner.state.lock().paused = true;
    }

    /// Lets checkouts through again.
    pub fn resume(&self) {
        let mut closing = Vec::new();
        {
            let mut st = self.inner.state.lock();
            st.paused = false;
            self.inner.fill(&mut st, &mut closing, now());
        }
        self.inner.close_all(closing);
    }

    /// Whether the pool is paused.
    pub fn is_paused(&self) -> bool {
        self.inner.state.lock().paused
    }

    /// Waits until no connection is checked out.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle_notify.notified();
            if self.inner.state.lock().sched.active() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Closes idle connections now and every checked-out one when it is released.
    pub fn reconnect(&self) {
        let closing = {
            let mut st = self.inner.state.lock();
            st.generation += 1;
            std::mem::take(&mut st.idle)
                .into_iter()
                .map(|c| c.slot)
                .collect::<Vec<_>>()
        };
        self.inner.close_all(closing);
    }

    /// Closes the pool: waiters fail, idle connections close, the rest close on release.
    pub fn close(&self) {
        let (waiters, closing, name) = {
            let mut st = self.inner.state.lock();
            st.closed = true;
            st.generation += 1;
            let idle = std::mem::take(&mut st.idle)
                .into_iter()
                .map(|c| c.slot)
                .collect::<Vec<_>>();
            (st.sched.drain(), idle, st.settings.name.clone())
        };
        for tx in waiters {
            let _ = tx.send(Err(CheckoutError::Closed(name.clone())));
        }
        self.inner.close_all(closing);
    }

    /// Applies new settings (reload). Waiters and connections stay; a smaller pool shrinks as
    /// connections are released.
    pub fn reconfigure(&self, settings: PoolSettings) {
        let mut closing = Vec::new();
        {
            let mut st = self.inner.state.lock();
            st.sched.reconfigure(
                settings.size,
                settings.classes.clone(),
                settings.aging_per_sec,
            );
            // Class indexes are stable (new classes are appended): keep every histogram.
            let classes = st.sched.class_count();
            st.waits.resize_with(classes, Histogram::default);
            while st.idle.len() as u32 + st.sched.active() > settings.size {
                match st.idle.pop() {
                    Some(c) => closing.push(c.slot),
                    None => break,
                }
            }
            st.settings = settings;
            self.inner.fill(&mut st, &mut closing, now());
        }
        self.inner.close_all(closing);
    }

    /// Sets live class overrides from the `on-pressure` hook (`None` clears them all).
    pub fn set_overrides(&self, overrides: Option<&[(usize, ClassOverride)]>) {
        let mut closing = Vec::new();
        {
            let mut st = self.inner.state.lock();
            match overrides {
                None => st.sched.clear_overrides(),
                Some(list) => {
                    for (class, over) in list {
                        st.sched.set_override(*class, *over);
                    }
                }
            }
            self.inner.fill(&mut st, &mut closing, now());
        }
        self.inner.close_all(closing);
    }

    /// Size, active, idle and waiting counts: a cheap subset of [`Self::stats`] for per-
    /// transaction policy facts.
    pub fn load(&self) -> (u32, u32, u32, u32) {
        let st = self.inner.state.lock();
        (
            st.settings.size,
            st.sched.active(),
            st.idle.len() as u32,
            st.sched.waiting(),
        )
    }

    /// Maps every idle connection through `f` (for SHOW SERVERS).
    pub fn idle_map<T>(&self, f: impl Fn(&K::Conn) -> T) -> Vec<T> {
        let st = self.inner.state.lock();
        st.idle.iter().map(|c| f(&c.slot.conn)).collect()
    }

    /// A snapshot of the pool for stats, the admin console and policies.
    pub fn stats(&self) -> PoolStats {
        let st = self.inner.state.lock();
        let now = now();
        let classes: Vec<ClassSnapshot> = st.sched.snapshot(now);
        PoolStats {
            name: st.settings.name.clone(),
            size: st.settings.size,
            active: st.sched.active(),
            idle: st.idle.len() as u32,
            connecting: st.connecting,
            waiting: st.sched.waiting(),
            paused: st.paused,
            checkouts: st.checkouts,
            connects: st.connects,
            connect_errors: st.connect_errors,
            waits: st
                .sched
                .live_classes()
                .map(|i| st.waits.get(i).cloned().unwrap_or_default())
                .collect(),
            classes,
        }
    }
}

impl<C: Poolable, E: Clone + std::fmt::Display> State<C, E> {
    fn fast_fail(&self) -> Option<E> {
        let (at, err) = self.last_connect_error.as_ref()?;
        let nothing_open = self.sched.active() == 0 && self.idle.is_empty() && self.connecting == 0;
        (nothing_open && now().saturating_duration_since(*at) < self.settings.login_retry)
            .then(|| err.clone())
    }
}

impl<K: Connector> Inner<K> {
    /// Gives idle connections to eligible waiters, then opens connections for the rest.
    fn fill(
        &self,
        st: &mut State<K::Conn, K::Error>,
        closing: &mut Closing<K::Conn>,
        now: Instant,
    ) {
        if st.closed || st.paused {
            return;
        }
        let open = st.sched.active() + st.idle.len() as u32 + st.connecting;
        if st.sched.waiting() == 0 && open >= st.settings.min_size {
            // The common case at checkin: nobody to serve, nothing to open.
            return;
        }
        while !st.idle.is_empty() {
            let Some((tx, grant, waited)) = st.sched.pick(now) else {
                break;
            };
            let Some(idle) = st.idle.pop() else { break };
            self.hand(st, tx, idle.slot, grant, waited, closing);
        }
        let need = st.sched.eligible_waiting().saturating_sub(st.connecting);
        let open = st.sched.active() + st.idle.len() as u32 + st.connecting;
        let want = need.max(st.settings.min_size.saturating_sub(open));
        let room = st.settings.size.saturating_sub(open);
        if st
            .last_connect_error
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < st.settings.login_retry)
            && st.connecting > 0
        {
            // One attempt at a time while the server is refusing us.
            return;
        }
        for _ in 0..want.min(room) {
            let Some(permits) = self.acquire_limits() else {
                break;
            };
            st.connecting += 1;
            self.spawn_connect(permits);
        }
    }

    fn acquire_limits(&self) -> Option<Vec<Permit>> {
        let mut permits = Vec::with_capacity(self.limits.len());
        for limit in &self.limits {
            match limit.try_acquire() {
                Some(p) => permits.push(p),
                None => {
                    if let Some(me) = self.me.upgrade() {
                        let hungry: Arc<dyn Hungry> = me;
                        let weak = Arc::downgrade(&hungry);
                        limit.register_hungry(weak.clone());
                        // Ask the other pools for an idle connection, outside our lock.
                        let limit = limit.clone();
                        self.runtime.spawn(async move { limit.evict_for(&weak) });
                    }
                    return None;
                }
            }
        }
        Some(permits)
    }

    fn spawn_connect(&self, permits: Vec<Permit>) {
        let Some(me) = self.me.upgrade() else { return };
        let fut = self.connector.connect();
        self.runtime.spawn(async move {
            let result = fut.await;
            me.connected(result, permits);
        });
    }

    fn connected(&self, result: Result<K::Conn, K::Error>, permits: Vec<Permit>) {
        let mut closing = Vec::new();
        let mut failed = Vec::new();
        {
            let mut st = self.state.lock();
            st.connecting = st.connecting.saturating_sub(1);
            match result {
                Ok(conn) => {
                    st.connects += 1;
                    st.last_connect_error = None;
                    let slot = Slot {
                        conn: Box::new(conn),
                        created: now(),
                        generation: st.generation,
                        _permits: permits,
                    };
                    if st.closed {
                        closing.push(slot);
                    } else {
                        self.place(&mut st, slot, &mut closing, now());
                    }
                }
                Err(e) => {
                    drop(permits);
                    st.connect_errors += 1;
                    st.last_connect_error = Some((now(), e.clone()));
                    if st.sched.active() == 0 && st.idle.is_empty() && st.connecting == 0 {
                        // Nothing will free up: tell every waiter now instead of at its timeout.
                        failed = st.sched.drain();
                    }
                }
            }
            if failed.is_empty() {
                self.fill(&mut st, &mut closing, now());
            }
            let err = st.last_connect_error.as_ref().map(|(_, e)| e.clone());
            drop(st);
            if let Some(err) = err {
                for tx in failed {
                    let _ = tx.send(Err(CheckoutError::Connect(err.clone())));
                }
            }
        }
        self.close_all(closing);
    }

    /// Gives a free connection to the best waiter, or puts it on the idle list.
    fn place(
        &self,
        st: &mut State<K::Conn, K::Error>,
        slot: Slot<K::Conn>,
        closing: &mut Closing<K::Conn>,
        now: Instant,
    ) {
        if !st.paused {
            if let Some((tx, grant, waited)) = st.sched.pick(now) {
                self.hand(st, tx, slot, grant, waited, closing);
                return;
            }
        }
        if self.limits.iter().any(|l| l.has_hungry()) {
            // Another pool needs the shared slot more than we need an idle connection.
            closing.push(slot);
            return;
        }
        st.idle.push(IdleConn { slot, since: now });
    }

    fn hand(
        &self,
        st: &mut State<K::Conn, K::Error>,
        tx: Reply<K::Conn, K::Error>,
        slot: Slot<K::Conn>,
        grant: Grant,
        waited: Duration,
        closing: &mut Closing<K::Conn>,
    ) {
        st.checkouts += 1;
        if let Some(h) = st.waits.get_mut(grant.class) {
            h.record(waited);
        }
        if let Err(Ok(h)) = tx.send(Ok(Handoff {
            slot,
            grant,
            waited,
        })) {
            // The waiter vanished between pick and send: undo and keep the connection.
            st.sched.release(&h.grant);
            st.checkouts -= 1;
            self.place(st, h.slot, closing, now());
        }
    }

    fn checkin(&self, slot: Slot<K::Conn>, grant: &Grant, reusable: bool) {
        let mut closing = Vec::new();
        {
            let mut st = self.state.lock();
            st.sched.release(grant);
            let now = now();
            let expired = st
                .settings
                .lifetime
                .is_some_and(|t| now.saturating_duration_since(slot.created) >= t);
            let oversize =
                st.sched.active() + st.idle.len() as u32 + st.connecting > st.settings.size;
            if !reusable || expired || oversize || st.closed || slot.generation != st.generation {
                closing.push(slot);
            } else {
                self.place(&mut st, slot, &mut closing, now);
            }
            self.fill(&mut st, &mut closing, now);
            if st.sched.active() == 0 {
                self.idle_notify.notify_waiters();
            }
        }
        self.close_all(closing);
    }

    /// Closes connections taken out under the lock. Inline: at most checkins there are none.
    #[inline]
    fn close_all(&self, closing: Closing<K::Conn>) {
        if !closing.is_empty() {
            self.close_slots(closing);
        }
    }

    #[inline(never)]
    fn close_slots(&self, closing: Closing<K::Conn>) {
        for slot in closing {
            let Slot { conn, _permits, .. } = slot;
            self.connector.close(*conn);
            drop(_permits);
        }
    }
}

impl<K: Connector> Hungry for Inner<K> {
    fn shed_idle(&self) -> bool {
        let slot = {
            let mut st = self.state.lock();
            if st.idle.is_empty() {
                return false;
            }
            // The oldest idle connection goes.
            st.idle.remove(0).slot
        };
        self.close_all(vec![slot]);
        true
    }

    fn wake(&self) {
        let mut closing = Vec::new();
        {
            let mut st = self.state.lock();
            self.fill(&mut st, &mut closing, now());
        }
        self.close_all(closing);
    }
}

mod guard;

pub use guard::Guard;
use guard::Waiting;
