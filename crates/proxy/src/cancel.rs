//! Cancel requests: every client gets its own backend key, mapped to whichever server
//! connection serves it at that moment.
//!
//! A cancel is forwarded only while that server connection is attached to the client that sent
//! it. Attaching, detaching and the forwarding decision take the same lock, and the server
//! connection is not reused until forwarded cancels have finished, or at all if one could not be
//! confirmed, so a late cancel can never hit another client's query (the race PgBouncer fixed in
//! its PR #717).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::auth::scram::ct_eq;
use crate::server::ServerAddr;

/// Cancels in flight against one server backend.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Cancels in flight, plus [`LOST`] once one was lost.
    count: AtomicU32,
    done: Notify,
}

/// Set in [`InFlight::count`] when a forward failed or timed out. PostgreSQL may still act on
/// that cancel later (a slow postmaster reads the request after Sluice gave up), so the backend
/// must never serve another client: its connection is closed when it comes back.
const LOST: u32 = 1 << 31;

impl InFlight {
    /// Whether no cancel is in flight and none was lost: the backend is safe for another client.
    pub fn idle(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Waits until no cancel is in flight (a lost one may still have been).
    pub async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            if self.count.load(Ordering::Acquire) & !LOST == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The server backend a client is attached to.
#[derive(Debug, Clone)]
pub struct Attached {
    /// Server address.
    pub addr: ServerAddr,
    /// Backend pid.
    pub pid: u32,
    /// Backend cancel secret.
    pub secret: Vec<u8>,
    /// Cancels in flight against it.
    pub inflight: Arc<InFlight>,
}

/// One client's cancel key and where it points now.
#[derive(Debug)]
pub struct CancelTarget {
    /// The client's pid as Sluice told it.
    pub pid: u32,
    secret: [u8; 4],
    slot: Mutex<Option<Arc<Attached>>>,
    /// Cancels that arrived while the client had no server connection, and the client's task
    /// waiting for one (only that task waits, so no lock is needed).
    unattached_cancels: AtomicU64,
    waiter: AtomicWaker,
}

impl CancelTarget {
    /// The secret given to the client.
    pub fn secret(&self) -> [u8; 4] {
        self.secret
    }

    /// Points the key at a server backend.
    pub fn attach(&self, a: Arc<Attached>) {
        *self.slot.lock() = Some(a);
    }

    /// Detaches; cancels arriving from now on are dropped.
    pub fn detach(&self) {
        *self.slot.lock() = None;
    }

    /// Completes when a cancel arrives after this call, while the client has no server
    /// connection (it is waiting for one). Earlier cancels do not count.
    pub fn cancelled_while_waiting(&self) -> impl std::future::Future<Output = ()> + '_ {
        let seen = self.unattached_cancels.load(Ordering::SeqCst);
        std::future::poll_fn(move |cx| {
            if self.unattached_cancels.load(Ordering::SeqCst) != seen {
                return std::task::Poll::Ready(());
            }
            self.waiter.register(cx.waker());
            if self.unattached_cancels.load(Ordering::SeqCst) != seen {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    /// A cancel arrived with no server connection attached: wakes a wait for one.
    fn cancel_unattached(&self) {
        self.unattached_cancels.fetch_add(1, Ordering::SeqCst);
        self.waiter.wake();
    }
}

/// All clients' cancel keys.
#[derive(Debug, Default)]
pub struct CancelMap {
    map: DashMap<u32, Arc<CancelTarget>, foldhash::fast::RandomState>,
}

impl CancelMap {
    /// Issues a fresh, unique key for a new client.
    pub fn register(&self) -> Arc<CancelTarget> {
        let mut rng = rand::thread_rng();
        loop {
            let pid = rng.next_u32() & 0x7fff_ffff;
            if pid == 0 || self.map.contains_key(&pid) {
                continue;
            }
            let mut secret = [0u8; 4];
            rng.fill_bytes(&mut secret);
            let t = Arc::new(CancelTarget {
                pid,
                secret,
                slot: Mutex::new(None),
                unattached_cancels: AtomicU64::new(0),
                waiter: AtomicWaker::new(),
            });
            match self.map.entry(pid) {
                dashmap::Entry::Occupied(_) => continue,
                dashmap::Entry::Vacant(v) => {
                    v.insert(t.clone());
                    return t;
                }
            }
        }
    }

    /// Forgets a client's key.
    pub fn unregister(&self, pid: u32) {
        self.map.remove(&pid);
    }

    /// Handles a CancelRequest. Returns whether it was forwarded to a server.
    pub async fn cancel(&self, pid: u32, secret: &[u8], timeout: Duration) -> bool {
        let Some(target) = self.map.get(&pid).map(|t| t.clone()) else {
            return false;
        };
        if !ct_eq(secret, &target.secret) {
            return false;
        }
        let attached = {
            let slot = target.slot.lock();
            slot.as_ref().map(|a| {
                a.inflight.count.fetch_add(1, Ordering::AcqRel);
                a.clone()
            })
        };
        let Some(a) = attached else {
            // Wakes a client waiting for a server connection now; stores nothing for later.
            target.cancel_unattached();
            return false;
        };
        if !matches!(
            sluice_pool::timer::timeout(timeout, forward(&a)).await,
            Ok(Ok(()))
        ) {
            a.inflight.count.fetch_or(LOST, Ordering::AcqRel);
        }
        a.inflight.count.fetch_sub(1, Ordering::AcqRel);
        a.inflight.done.notify_waiters();
        true
    }
}

/// Sends a CancelRequest for `a`'s backend and waits until PostgreSQL has handled it.
pub async fn forward(a: &Attached) -> std::io::Result<()> {
    let mut s = a.addr.connect().await?;
    let mut buf = BytesMut::with_capacity(16);
    sluice_wire::frontend::encode_cancel_request(&mut buf, a.pid, &a.secret);
    s.write_all(&buf).await?;
    // PostgreSQL closes the connection once it has signalled the backend.
    let mut sink = [0u8; 64];
    while s.read(&mut sink).await? > 0 {}
    Ok(())
}
