//! The scheduler: who gets the next server connection.
//!
//! A pure state machine with no IO, no clock of its own and no async. The pool owns one per
//! server pool, under the pool's lock, and asks it two questions: "may this request take a
//! connection now?" and "which waiter gets the connection that just became free?".
//!
//! The rules, from the scheduling model:
//! - Each waiter belongs to a class. A class over its `max_active` quota is skipped.
//! - `reserved` connections of a class are held back from every other class.
//! - A waiter may carry a per-client key with its own `max_active`. A waiter whose key is at its
//!   quota is parked with the key and comes back when the key releases a connection.
//! - Among eligible waiters the highest effective priority wins; effective priority grows with
//!   the time waited (aging), so low classes never starve. Ties go first-in first-out.
//!
//! Aging with one rate for everyone keeps the order static: `priority + rate * (now - t)` sorts
//! like `priority - rate * t`, so each class queue is sorted once, at enqueue time.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Identifies a waiter inside one scheduler.
pub type WaiterId = u64;

/// Hashes a [`WaiterId`]: ids are handed out in sequence by the scheduler itself, so one
/// multiplication spreads them well and nobody outside can choose them. SipHash cost more than
/// the rest of a queue insert.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: consecutive ids differ in the low bits (the bucket) and in the
        // high bits (hashbrown's tag).
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type WaiterMap<W> = HashMap<WaiterId, Waiter<W>, BuildHasherDefault<IdHasher>>;

/// Where a queued waiter stands: (negated score, id), smallest first.
type Order = (i64, u64);

/// One class's waiters, sorted by [`Order`]. Waiters of one priority arrive in order (the score
/// only grows with the time of arrival), so an insert is nearly always a push at the back and
/// the grant a pop at the front: a sorted ring buffer does both in constant time, where an
/// ordered map paid a tree walk and node allocations on each. A waiter that outranks queued ones
/// (a higher priority) is inserted in place.
#[derive(Debug, Default)]
struct ClassQueue(VecDeque<(Order, WaiterId)>);

impl ClassQueue {
    fn insert(&mut self, order: Order, id: WaiterId) {
        match self.0.back() {
            Some((last, _)) if *last > order => {
                let at = self.0.partition_point(|(o, _)| *o < order);
                self.0.insert(at, (order, id));
            }
            _ => self.0.push_back((order, id)),
        }
    }

    fn remove(&mut self, order: &Order) {
        if self.0.front().is_some_and(|(o, _)| o == order) {
            self.0.pop_front();
        } else if let Ok(at) = self.0.binary_search_by(|(o, _)| o.cmp(order)) {
            self.0.remove(at);
        }
    }

    fn first(&self) -> Option<&(Order, WaiterId)> {
        self.0.front()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A class as the scheduler enforces it (static settings plus any live override).
#[derive(Debug, Clone)]
pub struct ClassSpec {
    /// The class name, for errors and stats.
    pub name: Arc<str>,
    /// Base priority: higher goes first.
    pub priority: i32,
    /// Most server connections the class may hold at once; `None` is unlimited.
    pub max_active: Option<u32>,
    /// Connections held back for this class: other classes may not use them.
    pub reserved: u32,
    /// Queue-wait budget; past it the waiter is shed. `None` uses the pool's wait timeout.
    pub max_wait: Option<Duration>,
}

impl ClassSpec {
    /// A class with no limits, used when the config names none.
    pub fn unlimited(name: &str) -> Self {
        ClassSpec {
            name: Arc::from(name),
            priority: 0,
            max_active: None,
            reserved: 0,
            max_wait: None,
        }
    }
}

/// A live override of a class's limits, set by the `on-pressure` hook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassOverride {
    /// Replaces `max_active` while set; `None` leaves it unchanged.
    pub max_active: Option<u32>,
    /// Replaces `max_wait` while set; `None` leaves it unchanged.
    pub max_wait: Option<Duration>,
}

/// A per-client key limit chosen by the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLimit {
    /// The key: an address, an application name, a tenant...
    pub key: Arc<str>,
    /// Most server connections this key may hold at once in this pool.
    pub max_active: u32,
}

/// What a waiter asks for.
#[derive(Debug, Clone)]
pub struct Ticket {
    /// Index of the class in the scheduler's class list.
    pub class: usize,
    /// Base priority for this request: `None` is the class's priority at the time of the wait
    /// (so a reload that changes it applies to clients already logged in); `Some` is the
    /// policy's choice.
    pub priority: Option<i32>,
    /// The per-client key limit, if any.
    pub key: Option<KeyLimit>,
}

/// Where a granted connection is accounted, so its release can be undone exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Class index.
    pub class: usize,
    /// Key, if the ticket had one.
    pub key: Option<Arc<str>>,
}

#[derive(Debug)]
struct ClassState {
    spec: ClassSpec,
    over: ClassOverride,
    active: u32,
    /// Ordered by (-score, seq): the first entry is the best waiter.
    queue: ClassQueue,
    shed_total: u64,
    served_total: u64,
    /// Gone from the config: no new grants; connections it holds still release against it.
    retired: bool,
}

impl ClassState {
    fn new(spec: ClassSpec) -> Self {
        ClassState {
            spec,
            over: ClassOverride::default(),
            active: 0,
            queue: ClassQueue::default(),
            shed_total: 0,
            served_total: 0,
            retired: false,
        }
    }

    fn max_active(&self) -> Option<u32> {
        self.over.max_active.or(self.spec.max_active)
    }

    fn under_quota(&self) -> bool {
        self.max_active().is_none_or(|m| self.active < m)
    }

    fn room(&self) -> u32 {
        self.max_active()
            .map_or(u32::MAX, |m| m.saturating_sub(self.active))
    }

    fn max_wait(&self) -> Option<Duration> {
        self.over.max_wait.or(self.spec.max_wait)
    }
}

#[derive(Debug, Default)]
struct KeyState {
    active: u32,
    max_active: u32,
    parked: VecDeque<WaiterId>,
}

#[derive(Debug)]
struct Waiter<W> {
    payload: W,
    ticket: Ticket,
    order: (i64, u64),
    enqueued: Instant,
    parked: bool,
}

/// Stats of one class at one moment.
#[derive(Debug, Clone)]
pub struct ClassSnapshot {
    /// Class name.
    pub name: Arc<str>,
    /// Effective base priority.
    pub priority: i32,
    /// Connections held now.
    pub active: u32,
    /// Waiters queued or parked.
    pub waiting: u32,
    /// How long the oldest waiter has waited.
    pub oldest_wait: Duration,
    /// Effective quota.
    pub max_active: Option<u32>,
    /// Effective wait budget.
    pub max_wait: Option<Duration>,
    /// Reserved connections.
    pub reserved: u32,
    /// Waiters shed since start.
    pub shed_total: u64,
    /// Connections granted since start.
    pub served_total: u64,
}

/// A waiter removed because its budget ran out.
#[derive(Debug)]
pub struct Expired<W> {
    /// The waiter's payload.
    pub payload: W,
    /// Its class name.
    pub class: Arc<str>,
    /// How long it waited.
    pub waited: Duration,
    /// The budget was the pool's wait timeout (the class sets none): a timeout, not a shed.
    pub pool_timeout: bool,
}

/// The scheduler of one pool. `W` is the waiter's payload (a channel sender in the pool).
#[derive(Debug)]
pub struct Scheduler<W> {
    /// Append-only, so the class indexes that sessions, waiters and grants hold stay valid
    /// across reloads: a class that leaves the config is retired in place.
    classes: Vec<ClassState>,
    /// Index of the default class, where unknown and retired classes go.
    default: usize,
    keys: HashMap<Arc<str>, KeyState>,
    waiters: WaiterMap<W>,
    next_id: WaiterId,
    size: u32,
    active: u32,
    aging_per_sec: f64,
    epoch: Instant,
}

impl<W> Scheduler<W> {
    /// A scheduler for a pool of `size` connections.
    pub fn new(size: u32, classes: Vec<ClassSpec>, aging_per_sec: f64, epoch: Instant) -> Self {
        let classes = if classes.is_empty() {
            vec![ClassSpec::unlimited("default")]
        } else {
            classes
        };
        Scheduler {
            classes: classes.into_iter().map(ClassState::new).collect(),
            default: 0,
            keys: HashMap::new(),
            waiters: WaiterMap::default(),
            next_id: 0,
            size,
            active: 0,
            aging_per_sec,
            epoch,
        }
    }

    /// Replaces pool size and class settings (on reload); counts and waiters stay.
    ///
    /// Classes are matched by name and keep their index; new ones are appended. A class gone
    /// from `classes` is retired: its waiters move to the default class (the first of
    /// `classes`), and the connections it holds release against it. A class that comes back
    /// is revived at its old index. Live overrides from `on-pressure` end: the new config is
    /// the starting point.
    pub fn reconfigure(&mut self, size: u32, classes: Vec<ClassSpec>, aging_per_sec: f64) {
        self.size = size;
        self.aging_per_sec = aging_per_sec;
        let classes = if classes.is_empty() {
            vec![ClassSpec::unlimited("default")]
        } else {
            classes
        };
        self.clear_overrides();
        let mut present = vec![false; self.classes.len()];
        for (n, spec) in classes.into_iter().enumerate() {
            let i = match self.classes.iter().position(|c| c.spec.name == spec.name) {
                Some(i) => {
                    let c = &mut self.classes[i];
                    c.spec = spec;
                    c.retired = false;
                    present[i] = true;
                    i
                }
                None => {
                    self.classes.push(ClassState::new(spec));
                    self.classes.len() - 1
                }
            };
            if n == 0 {
                self.default = i;
            }
        }
        for (i, keep) in present.into_iter().enumerate() {
            if keep || i == self.default {
                continue;
            }
            let c = &mut self.classes[i];
            c.retired = true;
            let moved = std::mem::take(&mut c.queue);
            for (order, id) in moved.0 {
                self.classes[self.default].queue.insert(order, id);
            }
        }
        let default = self.default;
        for w in self.waiters.values_mut() {
            if self.classes[w.ticket.class].retired {
                w.ticket.class = default;
            }
        }
    }

    /// The class a ticket for class `i` is served in: `i` itself, or the default class when
    /// `i` is unknown or retired.
    pub fn resolve_class(&self, i: usize) -> usize {
        match self.classes.get(i) {
            Some(c) if !c.retired => i,
            _ => self.default,
        }
    }

    /// Index of the default class.
    pub fn default_class(&self) -> usize {
        self.default
    }

    /// Index of a class by name.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.classes
            .iter()
            .position(|c| !c.retired && &*c.spec.name == name)
    }

    /// Number of class indexes ever used, retired classes included.
    pub fn class_count(&self) -> usize {
        self.classes.len()
    }

    /// Name of the class a ticket for class `i` is served in.
    pub fn class_name(&self, i: usize) -> Arc<str> {
        self.classes[self.resolve_class(i)].spec.name.clone()
    }

    /// Base priority of the class a ticket for class `i` is served in.
    pub fn class_priority(&self, i: usize) -> i32 {
        self.classes[self.resolve_class(i)].spec.priority
    }

    /// Effective wait budget of the class a ticket for class `i` is served in.
    pub fn class_max_wait(&self, i: usize) -> Option<Duration> {
        self.classes[self.resolve_class(i)].max_wait()
    }

    /// Applies a live change to class `i`: each limit `over` sets replaces the current one;
    /// a limit it leaves `None` stays as it is (pressure actions are changes, and several
    /// plugins may each change a different limit of the same class). [`Self::clear_overrides`]
    /// ends them all.
    pub fn set_override(&mut self, i: usize, over: ClassOverride) {
        if let Some(c) = self.classes.get_mut(i) {
            if over.max_active.is_some() {
                c.over.max_active = over.max_active;
            }
            if over.max_wait.is_some() {
                c.over.max_wait = over.max_wait;
            }
        }
    }

    /// Clears every live override.
    pub fn clear_overrides(&mut self) {
        for c in &mut self.classes {
            c.over = ClassOverride::default();
        }
    }

    /// Connections granted and not yet released.
    pub fn active(&self) -> u32 {
        self.active
    }

    /// Waiters queued or parked.
    pub fn waiting(&self) -> u32 {
        self.waiters.len() as u32
    }

    fn reserved_ok(&self, class: usize) -> bool {
        let held_back: u32 = self
            .classes
            .iter()
            .enumerate()
            .filter(|(i, c)| *i != class && !c.retired)
            .map(|(_, c)| c.spec.reserved.saturating_sub(c.active))
            .sum();
        self.active + 1 + held_back <= self.size
    }

    fn key_ok(&self, key: &Option<KeyLimit>) -> bool {
        match key {
            None => true,
            Some(k) => {
                let active = self.keys.get(&k.key).map_or(0, |s| s.active);
                active < k.max_active
            }
        }
    }

    /// Whether a new request could be granted a connection right now, ignoring waiters.
    pub fn eligible(&self, ticket: &Ticket) -> bool {
        let class = self.resolve_class(ticket.class);
        self.classes[class].under_quota() && self.reserved_ok(class) && self.key_ok(&ticket.key)
    }

    /// Accounts a grant made without queueing. The caller checked [`Self::eligible`].
    pub fn grant_now(&mut self, ticket: &Ticket) -> Grant {
        let class = self.resolve_class(ticket.class);
        self.account(class, ticket.key.as_ref())
    }

    fn account(&mut self, class: usize, key: Option<&KeyLimit>) -> Grant {
        self.active += 1;
        let c = &mut self.classes[class];
        c.active += 1;
        c.served_total += 1;
        let key = key.map(|k| {
            let s = self.keys.entry(k.key.clone()).or_default();
            s.active += 1;
            s.max_active = k.max_active;
            k.key.clone()
        });
        Grant { class, key }
    }

    fn score(&self, priority: i32, at: Instant) -> i64 {
        let micros = at.saturating_duration_since(self.epoch).as_micros() as f64;
        let base = f64::from(priority) * 1_000_000.0;
        // Higher score is better; store the negation so the queue's first entry is best.
        -(base - self.aging_per_sec * micros) as i64
    }

    /// Queues a waiter. It is parked at once if its key is at quota.
    pub fn enqueue(&mut self, mut ticket: Ticket, payload: W, now: Instant) -> WaiterId {
        ticket.class = self.resolve_class(ticket.class);
        let id = self.next_id;
        self.next_id += 1;
        let priority = ticket
            .priority
            .unwrap_or(self.classes[ticket.class].spec.priority);
        let order = (self.score(priority, now), id);
        let parked = !self.key_ok(&ticket.key);
        if parked {
            if let Some(k) = &ticket.key {
                let s = self.keys.entry(k.key.clone()).or_default();
                s.max_active = k.max_active;
                s.parked.push_back(id);
            }
        } else {
            self.classes[ticket.class].queue.insert(order, id);
        }
        self.waiters.insert(
            id,
            Waiter {
                payload,
                ticket,
                order,
                enqueued: now,
                parked,
            },
        );
        id
    }

    /// Removes a waiter (it gave up or was cancelled). `None` if it was already granted or shed.
    pub fn remove(&mut self, id: WaiterId) -> Option<W> {
        let w = self.waiters.remove(&id)?;
        if w.parked {
            if let Some(k) = &w.ticket.key {
                if let Some(s) = self.keys.get_mut(&k.key) {
                    s.parked.retain(|p| *p != id);
                }
            }
        } else {
            self.classes[w.ticket.class].queue.remove(&w.order);
        }
        self.gc_key(w.ticket.key.as_ref().map(|k| &k.key));
        Some(w.payload)
    }

    fn gc_key(&mut self, key: Option<&Arc<str>>) {
        if let Some(k) = key {
            if self
                .keys
                .get(k)
                .is_some_and(|s| s.active == 0 && s.parked.is_empty())
            {
                self.keys.remove(k);
            }
        }
    }

    /// Picks the best eligible waiter for one free connection and accounts the grant.
    #[inline]
    pub fn pick(&mut self, now: Instant) -> Option<(W, Grant, Duration)> {
        if self.waiters.is_empty() {
            // The common case at checkin: nobody waits, no class to scan.
            return None;
        }
        self.pick_waiter(now)
    }

    #[inline(never)]
    fn pick_waiter(&mut self, now: Instant) -> Option<(W, Grant, Duration)> {
        loop {
            let mut best: Option<(usize, (i64, u64), WaiterId)> = None;
            for (i, c) in self.classes.iter().enumerate() {
                if !c.under_quota() || !self.reserved_ok(i) {
                    continue;
                }
                if let Some((order, id)) = c.queue.first() {
                    if best.as_ref().is_none_or(|(_, o, _)| order < o) {
                        best = Some((i, *order, *id));
                    }
                }
            }
            let (class, order, id) = best?;
            self.classes[class].queue.remove(&order);
            let key_ok = self
                .waiters
                .get(&id)
                .is_some_and(|w| self.key_ok(&w.ticket.key));
            if !key_ok {
                // Its key is at quota: park it with the key and look again.
                if let Some(w) = self.waiters.get_mut(&id) {
                    w.parked = true;
                    if let Some(k) = &w.ticket.key {
                        let s = self.keys.entry(k.key.clone()).or_default();
                        s.max_active = k.max_active;
                        s.parked.push_back(id);
                    }
                }
                continue;
            }
            let w = self.waiters.remove(&id)?;
            let grant = self.account(class, w.ticket.key.as_ref());
            let waited = now.saturating_duration_since(w.enqueued);
            return Some((w.payload, grant, waited));
        }
    }

    /// Releases a grant. Waiters parked on its key return to their queues.
    #[inline]
    pub fn release(&mut self, grant: &Grant) {
        self.active = self.active.saturating_sub(1);
        if let Some(c) = self.classes.get_mut(grant.class) {
            c.active = c.active.saturating_sub(1);
        }
        if let Some(k) = &grant.key {
            self.release_key(k);
        }
    }

    #[inline(never)]
    fn release_key(&mut self, k: &Arc<str>) {
        let mut unparked = Vec::new();
        if let Some(s) = self.keys.get_mut(k) {
            s.active = s.active.saturating_sub(1);
            if s.active < s.max_active {
                unparked.extend(s.parked.drain(..));
            }
        }
        for id in unparked {
            if let Some(w) = self.waiters.get_mut(&id) {
                w.parked = false;
                self.classes[w.ticket.class].queue.insert(w.order, id);
            }
        }
        self.gc_key(Some(k));
    }

    /// How many queued waiters could use a connection now: each class's queue, capped by its
    /// remaining quota. Parked waiters are not counted. Used to decide how many to open.
    pub fn eligible_waiting(&self) -> u32 {
        if self.waiters.is_empty() {
            return 0;
        }
        self.classes
            .iter()
            .enumerate()
            .filter(|(i, _)| self.reserved_ok(*i))
            .map(|(_, c)| (c.queue.len() as u32).min(c.room()))
            .sum()
    }

    /// Removes every waiter whose class budget (or `fallback` budget) ran out by `now`. Only
    /// class budgets count as sheds.
    pub fn expire(&mut self, now: Instant, fallback: Option<Duration>) -> Vec<Expired<W>> {
        let mut gone = Vec::new();
        let ids: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, w)| {
                let budget = self.classes[w.ticket.class].max_wait().or(fallback);
                budget.is_some_and(|b| now.saturating_duration_since(w.enqueued) >= b)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(w) = self.waiters.get(&id) {
                let class = w.ticket.class;
                let waited = now.saturating_duration_since(w.enqueued);
                let pool_timeout = self.classes[class].max_wait().is_none();
                if let Some(payload) = self.remove(id) {
                    if !pool_timeout {
                        self.classes[class].shed_total += 1;
                    }
                    gone.push(Expired {
                        payload,
                        class: self.classes[class].spec.name.clone(),
                        waited,
                        pool_timeout,
                    });
                }
            }
        }
        gone
    }

    /// Counts a waiter shed by its own timer (it removed itself).
    pub fn count_shed(&mut self, class: usize) {
        if let Some(c) = self.classes.get_mut(class) {
            c.shed_total += 1;
        }
    }

    /// Removes every waiter, for shutdown.
    pub fn drain(&mut self) -> Vec<W> {
        for c in &mut self.classes {
            c.queue.clear();
        }
        for k in self.keys.values_mut() {
            k.parked.clear();
        }
        self.waiters.drain().map(|(_, w)| w.payload).collect()
    }

    /// Indexes of the classes in the config (not retired), in the order of [`Self::snapshot`].
    pub fn live_classes(&self) -> impl Iterator<Item = usize> + '_ {
        self.classes
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.retired)
            .map(|(i, _)| i)
    }

    /// Per-class stats at `now`, for the classes in the config.
    pub fn snapshot(&self, now: Instant) -> Vec<ClassSnapshot> {
        let mut oldest = vec![None::<Instant>; self.classes.len()];
        let mut waiting = vec![0u32; self.classes.len()];
        for w in self.waiters.values() {
            let c = w.ticket.class;
            waiting[c] += 1;
            oldest[c] = Some(oldest[c].map_or(w.enqueued, |o: Instant| o.min(w.enqueued)));
        }
        self.classes
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.retired)
            .map(|(i, c)| ClassSnapshot {
                name: c.spec.name.clone(),
                priority: c.spec.priority,
                active: c.active,
                waiting: waiting[i],
                oldest_wait: oldest[i].map_or(Duration::ZERO, |o| now.saturating_duration_since(o)),
                max_active: c.max_active(),
                max_wait: c.max_wait(),
                reserved: c.spec.reserved,
                shed_total: c.shed_total,
                served_total: c.served_total,
            })
            .collect()
    }

    /// Checks the invariants the property tests rely on. Panics in tests only via the caller.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let sum: u32 = self.classes.iter().map(|c| c.active).sum();
        if sum != self.active {
            return Err(format!("class actives {sum} != active {}", self.active));
        }
        for c in &self.classes {
            if let Some(m) = c.max_active() {
                if c.over.max_active.is_none() && c.active > m {
                    return Err(format!(
                        "class {} over quota: {} > {m}",
                        c.spec.name, c.active
                    ));
                }
            }
        }
        for (k, s) in &self.keys {
            if s.active > s.max_active && s.max_active > 0 {
                return Err(format!("key {k} over quota"));
            }
        }
        let queued: usize = self.classes.iter().map(|c| c.queue.len()).sum::<usize>()
            + self.keys.values().map(|k| k.parked.len()).sum::<usize>();
        if queued != self.waiters.len() {
            return Err(format!("queued {queued} != waiters {}", self.waiters.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "sched_tests.rs"]
mod tests;
