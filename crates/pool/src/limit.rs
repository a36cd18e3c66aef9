//! Caps shared by several pools, such as `max_db_connections` and `max_user_connections`.
//!
//! A pool takes a [`Permit`] for every connection it opens. When a cap is reached the pool
//! registers as hungry; a permit returned later wakes the hungry pools so they can open the
//! connection they were denied, and pools with idle connections give them up while anyone is
//! hungry. Wakes run with no pool lock held.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Something that wants to be told when a shared slot frees up.
pub trait Hungry: Send + Sync {
    /// A slot may be free now: try again.
    fn wake(&self);
    /// Closes one idle connection, if there is one, to free a shared slot. Returns whether it did.
    fn shed_idle(&self) -> bool;
}

/// A cap on connections shared by several pools. `max == 0` means unlimited.
pub struct SharedLimit {
    name: String,
    max: AtomicU32,
    used: AtomicU32,
    hungry: Mutex<Vec<Weak<dyn Hungry>>>,
    /// Whether `hungry` has anyone, kept under its lock: every checkin asks, and a load is
    /// cheaper than the lock.
    any_hungry: AtomicBool,
    members: Mutex<Vec<Weak<dyn Hungry>>>,
}

impl std::fmt::Debug for SharedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimit")
            .field("name", &self.name)
            .field("max", &self.max.load(Ordering::Relaxed))
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish()
    }
}

impl SharedLimit {
    /// A new cap.
    pub fn new(name: impl Into<String>, max: u32) -> Arc<Self> {
        Arc::new(SharedLimit {
            name: name.into(),
            max: AtomicU32::new(max),
            used: AtomicU32::new(0),
            hungry: Mutex::new(Vec::new()),
            any_hungry: AtomicBool::new(false),
            members: Mutex::new(Vec::new()),
        })
    }

    /// Changes the cap (reload). Connections over a lowered cap close as they are released.
    pub fn set_max(self: &Arc<Self>, max: u32) {
        self.max.store(max, Ordering::Relaxed);
        self.wake_hungry();
    }

    /// Connections currently counted.
    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes a slot, or `None` at the cap.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let max = self.max.load(Ordering::Relaxed);
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if max != 0 && cur >= max {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Permit {
                        limit: self.clone(),
                    })
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Registers a pool that counts its connections here.
    pub fn register_member(&self, who: Weak<dyn Hungry>) {
        let mut list = self.members.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(who);
    }

    /// Asks the pools counted here, other than `except`, to close one idle connection so a
    /// hungry pool can open its own (PgBouncer does the same for `max_db_connections`). Must
    /// be called with no pool lock held.
    pub fn evict_for(&self, except: &Weak<dyn Hungry>) {
        let members: Vec<_> = self.members.lock().clone();
        for m in members {
            if m.ptr_eq(except) {
                continue;
            }
            if let Some(p) = m.upgrade() {
                if p.shed_idle() {
                    return;
                }
            }
        }
    }

    /// Registers a pool to wake when a slot frees.
    pub fn register_hungry(&self, who: Weak<dyn Hungry>) {
        let mut list = self.hungry.lock();
        if !list.iter().any(|w| w.ptr_eq(&who)) {
            list.push(who);
        }
        self.any_hungry.store(true, Ordering::Release);
    }

    /// Whether any pool is waiting for a slot.
    pub fn has_hungry(&self) -> bool {
        self.any_hungry.load(Ordering::Acquire)
    }

    fn wake_hungry(&self) {
        let list = {
            let mut hungry = self.hungry.lock();
            self.any_hungry.store(false, Ordering::Release);
            std::mem::take(&mut *hungry)
        };
        for w in list {
            if let Some(h) = w.upgrade() {
                h.wake();
            }
        }
    }
}

/// One connection counted against a [`SharedLimit`]. Dropping it frees the slot.
pub struct Permit {
    limit: Arc<SharedLimit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.used.fetch_sub(1, Ordering::AcqRel);
        self.limit.wake_hungry();
    }
}
