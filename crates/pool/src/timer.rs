//! Sleeps and timeouts served by one timer thread instead of tokio's time driver.
//!
//! A tokio runtime built with its time driver pays for it on every park, whether or not a timer
//! is pending: it locks the driver, scans the wheel's levels for the next expiry, and after the
//! wake-up reads the clock, locks again and processes the wheel. On Sluice's relay that is about
//! 240 instructions per select-only transaction and 1,700 per login, 4 % of each. Sluice's
//! deadlines are few and coarse (a login, a queue wait, an idle transaction, a connect), and
//! nearly all of them are cancelled long before they expire, so the binary builds its runtime
//! with the IO driver only and keeps its deadlines here.
//!
//! One process-wide thread sleeps until the earliest deadline and wakes the tasks whose deadlines
//! passed; a task's waker works from any thread, whatever runtime the task runs on. The costs fall
//! where deadlines change, never on the runtime's parks:
//! - a [`Sleep`] registers on its first pending poll (a lock and a heap push), so a
//!   [`timeout`] whose future finishes at once registers nothing;
//! - moving a deadline later (an idle timer reset on every message) only writes the slot: the
//!   thread finds the later deadline when the old one comes due and queues it again;
//! - the thread is woken only when a new deadline is earlier than the one it sleeps until;
//! - a dropped sleep frees its slot at once, and its heap entry is skipped when it comes due, or
//!   removed when stale entries outnumber live ones.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::clock;

/// The error of a [`timeout`] whose deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline has elapsed")]
pub struct Elapsed;

/// Starts the timer thread if it is not running. Sluice calls this before it binds a port, so a
/// thread that cannot be spawned stops the start with an error; otherwise the first sleep starts
/// it.
pub fn start() -> io::Result<()> {
    if STARTED.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut started = SPAWN.lock();
    if !*started {
        std::thread::Builder::new()
            .name("sluice-timer".into())
            .spawn(|| TIMERS.run())?;
        *started = true;
        STARTED.store(true, Ordering::Release);
    }
    Ok(())
}

/// A sleep of `duration` from now (this wake-up's time, see [`clock::now`]).
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(clock::now() + duration)
}

/// A sleep until `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        slot: None,
    }
}

/// Runs `future` until it finishes or `duration` passes, whichever comes first.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    let mut future = std::pin::pin!(future);
    let mut sleep = sleep(duration);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        Pin::new(&mut sleep).poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// A future that completes at its deadline. It can be moved to a new deadline with
/// [`reset`](Self::reset) and polled again.
#[derive(Debug)]
#[must_use = "a sleep does nothing unless polled"]
pub struct Sleep {
    deadline: Instant,
    /// The registration, from the first pending poll on.
    slot: Option<SlotId>,
}

impl Sleep {
    /// When this sleep completes.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Moves the deadline. A sleep that had completed can complete again at the new one.
    pub fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        if let Some(id) = self.slot {
            TIMERS.reset(id, deadline);
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        match this.slot {
            Some(id) => TIMERS.poll(id, cx.waker()),
            None if this.deadline <= clock::now() => Poll::Ready(()),
            None => {
                if start().is_err() {
                    // No thread, no wake-up: completing now turns a deadline into an early
                    // timeout instead of a wait that never ends. `start` failed loudly earlier.
                    return Poll::Ready(());
                }
                this.slot = Some(TIMERS.insert(this.deadline, cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.slot.take() {
            TIMERS.remove(id);
        }
    }
}

static TIMERS: Timers = Timers {
    state: Mutex::new(State {
        slots: Vec::new(),
        free: Vec::new(),
        heap: BinaryHeap::new(),
        armed: None,
    }),
    wake: Condvar::new(),
};
static STARTED: AtomicBool = AtomicBool::new(false);
static SPAWN: Mutex<bool> = Mutex::new(false);

/// Heap entries kept before stale ones are swept out, whatever the number of live sleeps.
const MIN_SWEEP: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotId {
    index: u32,
    generation: u32,
}

struct Timers {
    state: Mutex<State>,
    /// The timer thread waits here; it is notified when a deadline earlier than
    /// [`State::armed`] arrives.
    wake: Condvar,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    heap: BinaryHeap<Reverse<Queued>>,
    /// The deadline the thread sleeps until; `None` while it sleeps with nothing queued or is
    /// busy waking tasks (it looks at the heap again before it sleeps).
    armed: Option<Instant>,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    live: bool,
    deadline: Option<Instant>,
    /// The deadline of this slot's valid heap entry, if it has one.
    queued: Option<Instant>,
    fired: bool,
    waker: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    at: Instant,
    index: u32,
    generation: u32,
}

impl Timers {
    fn insert(&self, deadline: Instant, waker: Waker) -> SlotId {
        let mut st = self.state.lock();
        let index = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(Slot::default());
                // Slots are never shrunk; four billion live sleeps are out of reach.
                u32::try_from(st.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let slot = &mut st.slots[index as usize];
        slot.live = true;
        slot.deadline = Some(deadline);
        slot.fired = false;
        slot.waker = Some(waker);
        let id = SlotId {
            index,
            generation: slot.generation,
        };
        st.enqueue(id, deadline, &self.wake);
        id
    }

    fn reset(&self, id: SlotId, deadline: Instant) {
        let mut st = self.state.lock();
        let Some(slot) = st.slot_mut(id) else { return };
        slot.deadline = Some(deadline);
        slot.fired = false;
        // A later deadline waits for the queued entry to come due; an earlier one (or none
        // queued) needs its own entry.
        if slot.queued.is_none_or(|q| deadline < q) {
            st.enqueue(id, deadline, &self.wake);
        }
    }

    fn poll(&self, id: SlotId, waker: &Waker) -> Poll<()> {
        let mut st = self.state.lock();
        match st.slot_mut(id) {
            Some(slot) if !slot.fired => {
                match &mut slot.waker {
                    Some(w) if w.will_wake(waker) => {}
                    w => *w = Some(waker.clone()),
                }
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }

    fn remove(&self, id: SlotId) {
        let mut st = self.state.lock();
        if let Some(slot) = st.slot_mut(id) {
            let waker = slot.waker.take();
            *slot = Slot {
                generation: slot.generation.wrapping_add(1),
                ..Slot::default()
            };
            st.free.push(id.index);
            drop(st);
            drop(waker);
        }
    }

    /// The timer thread: wakes the tasks whose deadlines passed, then sleeps until the next one.
    fn run(&self) {
        let mut due = Vec::new();
        let mut st = self.state.lock();
        loop {
            st.expire(Instant::now(), &mut due);
            if !due.is_empty() {
                st.armed = None;
                // Wake outside the lock: a woken task on another thread may register at once.
                parking_lot::MutexGuard::unlocked(&mut st, || due.drain(..).for_each(Waker::wake));
                continue;
            }
            st.armed = st.heap.peek().map(|Reverse(q)| q.at);
            match st.armed {
                Some(at) => {
                    self.wake.wait_until(&mut st, at);
                }
                None => self.wake.wait(&mut st),
            }
        }
    }
}

impl State {
    fn slot_mut(&mut self, id: SlotId) -> Option<&mut Slot> {
        self.slots
            .get_mut(id.index as usize)
            .filter(|s| s.live && s.generation == id.generation)
    }

    fn enqueue(&mut self, id: SlotId, at: Instant, wake: &Condvar) {
        if let Some(slot) = self.slot_mut(id) {
            slot.queued = Some(at);
        }
        self.heap.push(Reverse(Queued {
            at,
            index: id.index,
            generation: id.generation,
        }));
        if self.heap.len() > MIN_SWEEP && self.heap.len() > 2 * self.live() {
            self.sweep();
        }
        if self.armed.is_none_or(|armed| at < armed) {
            wake.notify_one();
        }
    }

    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether `q` is its slot's current entry (not left by a dropped sleep or a moved deadline).
    fn current(&self, q: &Queued) -> bool {
        self.slots
            .get(q.index as usize)
            .is_some_and(|s| s.live && s.generation == q.generation && s.queued == Some(q.at))
    }

    fn sweep(&mut self) {
        let heap = std::mem::take(&mut self.heap);
        self.heap = heap
            .into_iter()
            .filter(|Reverse(q)| self.current(q))
            .collect();
    }

    /// Pops the entries due at `now`: a slot whose deadline moved later is queued again, and the
    /// others fire, their wakers collected into `due`.
    fn expire(&mut self, now: Instant, due: &mut Vec<Waker>) {
        while let Some(Reverse(q)) = self.heap.peek().copied() {
            if q.at > now {
                break;
            }
            self.heap.pop();
            if !self.current(&q) {
                continue;
            }
            let slot = &mut self.slots[q.index as usize];
            slot.queued = None;
            match slot.deadline {
                Some(later) if later > now => {
                    slot.queued = Some(later);
                    self.heap.push(Reverse(Queued { at: later, ..q }));
                }
                _ => {
                    slot.fired = true;
                    due.extend(slot.waker.take());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn runtime() -> tokio::runtime::Runtime {
        match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("runtime: {e}"),
        }
    }

    #[test]
    fn a_sleep_completes_at_its_deadline_in_a_runtime_without_timers() {
        runtime().block_on(async {
            let start = Instant::now();
            sleep(Duration::from_millis(30)).await;
            assert!(start.elapsed() >= Duration::from_millis(30));
        });
    }

    #[test]
    fn a_timeout_returns_the_output_or_elapsed() {
        runtime().block_on(async {
            assert_eq!(timeout(Duration::from_secs(60), async { 7 }).await, Ok(7));
            let start = Instant::now();
            let never = std::future::pending::<()>();
            assert_eq!(
                timeout(Duration::from_millis(20), never).await,
                Err(Elapsed)
            );
            assert!(start.elapsed() >= Duration::from_millis(20));
        });
    }

    #[test]
    fn reset_moves_the_deadline_both_ways() {
        runtime().block_on(async {
            // Later: the queued entry comes due first and is queued again.
            let start = Instant::now();
            let mut s = sleep(Duration::from_millis(10));
            assert!(futures_poll_once(&mut s).is_pending());
            s.reset(start + Duration::from_millis(60));
            (&mut s).await;
            assert!(start.elapsed() >= Duration::from_millis(60));
            // Earlier, after having completed: it completes again.
            let far = Instant::now() + Duration::from_secs(3600);
            s.reset(far);
            assert!(futures_poll_once(&mut s).is_pending());
            let again = Instant::now();
            s.reset(again + Duration::from_millis(10));
            (&mut s).await;
            assert!(again.elapsed() >= Duration::from_millis(10));
        });
    }

    #[test]
    fn dropped_sleeps_free_their_slots_and_their_entries() {
        runtime().block_on(async {
            let far = Duration::from_secs(3600);
            for _ in 0..(MIN_SWEEP * 8) {
                let mut s = sleep(far);
                assert!(futures_poll_once(&mut s).is_pending());
            }
            let st = TIMERS.state.lock();
            // Other tests' sleeps may be live at the same time; these left little behind.
            assert!(st.live() < 64, "live slots {}", st.live());
            assert!(
                st.heap.len() <= 2 * MIN_SWEEP + 64,
                "heap {}",
                st.heap.len()
            );
        });
    }

    #[test]
    fn many_sleeps_on_several_threads_all_complete() {
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let done = done.clone();
                std::thread::spawn(move || {
                    runtime().block_on(async {
                        let mut set = tokio::task::JoinSet::new();
                        for i in 0..50u64 {
                            set.spawn(async move {
                                let d = Duration::from_millis((i * 7 + t) % 40);
                                let start = Instant::now();
                                sleep(d).await;
                                assert!(start.elapsed() >= d);
                            });
                        }
                        while let Some(r) = set.join_next().await {
                            if let Err(e) = r {
                                panic!("sleep task: {e}");
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            if t.join().is_err() {
                panic!("a sleeping thread failed");
            }
        }
        assert_eq!(done.load(Ordering::Relaxed), 200);
    }

    /// Polls `s` once with a no-op waker.
    fn futures_poll_once(s: &mut Sleep) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(s).poll(&mut cx)
    }
}
