//! The two handles a checkout produces: [`Waiting`], a waiter's place in the queue, and
//! [`Guard`], a granted connection that goes back to the pool (or is closed) on drop.

use super::*;

/// A waiter's side of the queue. Dropping it (the client went away) leaves the queue cleanly
/// and returns a connection that was handed over in the meantime.
pub(super) struct Waiting<K: Connector> {
    pub(super) pool: Arc<Inner<K>>,
    pub(super) id: u64,
    pub(super) rx: Option<Receipt<K::Conn, K::Error>>,
}

impl<K: Connector> Waiting<K> {
    /// The pool's answer, once it came.
    pub(super) fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Answer<K::Conn, K::Error>> {
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(Err(CheckoutError::Closed(self.pool_name())));
        };
        let r = std::task::ready!(Pin::new(rx).poll(cx));
        self.rx = None;
        Poll::Ready(r.unwrap_or_else(|_| Err(CheckoutError::Closed(self.pool_name()))))
    }

    fn pool_name(&self) -> Arc<str> {
        self.pool.state.lock().settings.name.clone()
    }

    pub(super) fn give_up(
        &mut self,
        class: usize,
        waited: Duration,
        pool_timeout: bool,
    ) -> Answer<K::Conn, K::Error> {
        let mut st = self.pool.state.lock();
        if st.sched.remove(self.id).is_some() {
            if !pool_timeout {
                st.sched.count_shed(class);
            }
            let pool = st.settings.name.clone();
            let class = st.sched.class_name(class);
            self.rx = None;
            return Err(if pool_timeout {
                CheckoutError::Timeout { pool, waited }
            } else {
                CheckoutError::Shed {
                    pool,
                    class,
                    waited,
                }
            });
        }
        drop(st);
        // Already granted (or failed) just before the timer fired: take what was sent.
        match self.rx.take().map(|mut rx| rx.try_recv()) {
            Some(Ok(r)) => r,
            _ => Err(CheckoutError::Closed(self.pool_name())),
        }
    }
}

impl<K: Connector> Drop for Waiting<K> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let removed = self.pool.state.lock().sched.remove(self.id).is_some();
        if removed {
            return;
        }
        if let Ok(Ok(h)) = rx.try_recv() {
            let reusable = h.slot.conn.reusable();
            self.pool.checkin(h.slot, &h.grant, reusable);
        }
    }
}

/// A checked-out server connection. Dropping it returns the connection to the pool if it is
/// reusable, and closes it otherwise.
pub struct Guard<K: Connector> {
    pub(super) slot: Option<Slot<K::Conn>>,
    pub(super) grant: Grant,
    pub(super) pool: Arc<Inner<K>>,
    /// Time spent waiting in the queue for this connection.
    pub waited: Duration,
}

impl<K: Connector> Guard<K> {
    /// Runs the liveness check; a dead connection is discarded and `None` returned.
    pub fn check(mut self) -> Option<Self> {
        if self.conn_mut().healthy() {
            Some(self)
        } else {
            self.discard();
            None
        }
    }

    pub(super) fn conn_mut(&mut self) -> &mut K::Conn {
        match self.slot.as_mut() {
            Some(s) => &mut s.conn,
            None => unreachable!("a guard holds its slot until dropped"),
        }
    }

    /// Closes the connection instead of returning it.
    pub fn discard(mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.checkin(slot, &self.grant, false);
        }
    }

    /// The class index this connection was granted to.
    pub fn class(&self) -> usize {
        self.grant.class
    }

    /// How long ago the server connection was opened.
    pub fn age(&self) -> Duration {
        self.slot.as_ref().map_or(Duration::ZERO, |s| {
            now().saturating_duration_since(s.created)
        })
    }
}

impl<K: Connector> Deref for Guard<K> {
    type Target = K::Conn;
    fn deref(&self) -> &K::Conn {
        match self.slot.as_ref() {
            Some(s) => &s.conn,
            None => unreachable!("a guard holds its slot until dropped"),
        }
    }
}

impl<K: Connector> DerefMut for Guard<K> {
    fn deref_mut(&mut self) -> &mut K::Conn {
        self.conn_mut()
    }
}

impl<K: Connector> Drop for Guard<K> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let reusable = slot.conn.reusable();
            self.pool.checkin(slot, &self.grant, reusable);
        }
    }
}
