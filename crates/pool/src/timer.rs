//! Sleeps and timeouts for a runtime without tokio's time driver.
//!
//! A tokio runtime built with its time driver pays for it on every park, whether or not a timer
//! is pending: it locks the driver, scans the wheel's levels for the next expiry, and after the
//! wake-up reads the clock, locks again and processes the wheel. On Sluice's relay that is about
//! 240 instructions per select-only transaction and 1,700 per login, 4 % of each. Sluice's
//! deadlines are few and coarse (a queue wait, a connect, a cancel's wait), and nearly all of
//! them are cancelled long before they expire, so the binary builds its runtime with the IO
//! driver only and keeps its deadlines here. (The login and idle timeouts, one per connection
//! or per transaction, are cheaper still on the maintenance tick: `sluice_proxy::alarms`.)
//!
//! The deadlines of the whole process sit in one heap. A *driver* fires those that are due,
//! waking their tasks (a waker works from any thread, whatever runtime its task runs on):
//! - On Linux, [`drive_here`] spawns a task that waits on a `timerfd` armed for the earliest
//!   deadline. The runtime's IO driver watches it like a socket, so firing costs no thread and
//!   no wake-up beyond the runtime's own. Every runtime that calls it watches the same timer.
//! - Otherwise a thread sleeps until the earliest deadline. It starts with the first sleep that
//!   finds no driver (elsewhere than Linux, or in a runtime that never called `drive_here`).
//!   Sluice avoids it where it can: once a process has a second thread, glibc's `recv` and `send`
//!   take their multi-threaded path, which costs more than the timer saves.
//!
//! The costs fall where deadlines change, never on the runtime's parks:
//! - a [`Sleep`] registers on its first pending poll (a lock and a heap push), so a
//!   [`timeout`] whose future finishes at once registers nothing;
//! - moving a deadline later only writes the slot: the driver finds the later deadline when the
//!   old one comes due and queues it again;
//! - the driver is re-armed (a `timerfd_settime`, or a notify) only when a new deadline is
//!   earlier than the one it waits for;
//! - a dropped sleep frees its slot at once; its heap entry is skipped when it comes due, or
//!   swept out with the others when stale entries outnumber live ones. Removing it from the heap
//!   at once would cost a pop per sleep: a queue of waiters is served oldest first, so each
//!   dropped sleep would be the top. Deadlines usually come in increasing order, so a push costs
//!   one comparison, and a sweep a few instructions per entry.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::clock;

/// The error of a [`timeout`] whose deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline has elapsed")]
pub struct Elapsed;

/// Serves deadlines from the current runtime: on Linux, a task watching the process's timerfd;
/// elsewhere, outside a runtime, or if no timerfd can be made, the timer thread. Call it inside
/// the runtime, once, before the runtime's tasks sleep. An error means neither could be started.
pub fn drive_here() -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if let (Ok(runtime), Ok(fd)) = (tokio::runtime::Handle::try_current(), timerfd::shared()) {
        let watched = fd.try_clone().and_then(timerfd::watch);
        if let Ok(watched) = watched {
            let driver = Driver::new();
            runtime.spawn(async move {
                let _driver = driver;
                while timerfd::wait(&watched).await.is_ok() {
                    TIMERS.fire(Instant::now());
                }
            });
            // Deadlines queued while the thread served them: the timerfd takes them over.
            TIMERS.fire(Instant::now());
            return Ok(());
        }
    }
    start_thread()
}

/// Starts the timer thread if it is not running.
fn start_thread() -> io::Result<()> {
    if THREAD_STARTED.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut started = THREAD_SPAWN.lock();
    if !*started {
        std::thread::Builder::new()
            .name("sluice-timer".into())
            .spawn(|| TIMERS.run_thread())?;
        *started = true;
        THREAD_STARTED.store(true, Ordering::Release);
    }
    Ok(())
}

/// A running timerfd driver, counted in [`DRIVERS`] while it lives (until its runtime drops it).
struct Driver;

impl Driver {
    fn new() -> Self {
        DRIVERS.fetch_add(1, Ordering::AcqRel);
        Driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if DRIVERS.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last driver is gone (its runtime shut down): the thread takes over whatever
            // other runtimes still wait for.
            let st = TIMERS.state.lock();
            if !st.heap.is_empty() {
                let _ = start_thread();
            }
            TIMERS.wake.notify_one();
        }
    }
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
                if DRIVERS.load(Ordering::Acquire) == 0 && start_thread().is_err() {
                    // Nothing would ever fire it: completing now turns the deadline into an
                    // early timeout instead of a wait that never ends.
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
        timerfd_failed: false,
    }),
    wake: Condvar::new(),
};
/// How many timerfd drivers run (see [`drive_here`]).
static DRIVERS: AtomicUsize = AtomicUsize::new(0);
static THREAD_STARTED: AtomicBool = AtomicBool::new(false);
static THREAD_SPAWN: Mutex<bool> = Mutex::new(false);

/// Heap entries kept before stale ones are swept out, whatever the number of live sleeps.
const MIN_SWEEP: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotId {
    index: u32,
    generation: u32,
}

struct Timers {
    state: Mutex<State>,
    /// The timer thread, if it runs, waits here; it is notified when a deadline earlier than
    /// [`State::armed`] arrives.
    wake: Condvar,
}

struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    heap: BinaryHeap<Reverse<Queued>>,
    /// When the drivers look at the heap next; `None` while nothing is queued or a driver is
    /// firing (it looks again before it waits).
    armed: Option<Instant>,
    /// The shared timerfd could not be set: the thread serves every deadline from now on.
    timerfd_failed: bool,
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

    /// A driver's turn: wakes the tasks whose deadlines passed by `now` and arms the drivers
    /// for the next deadline.
    fn fire(&self, now: Instant) {
        let mut due = Vec::new();
        let mut st = self.state.lock();
        st.expire(now, &mut due);
        st.armed = None;
        if let Some(next) = st.drop_stale_top() {
            st.arm(next, &self.wake);
        }
        drop(st);
        due.into_iter().for_each(Waker::wake);
    }

    /// The timer thread: fires what is due, then sleeps until the next deadline or a notify.
    /// While timerfd drivers run, it leaves the deadlines to them.
    fn run_thread(&self) {
        loop {
            let mut st = self.state.lock();
            if st.timerfd_serves() {
                // Woken when the last driver goes (see `Driver`'s drop) or the timerfd fails.
                self.wake.wait(&mut st);
                continue;
            }
            drop(st);
            self.fire(Instant::now());
            let mut st = self.state.lock();
            if st.timerfd_serves() {
                continue;
            }
            match st.armed {
                Some(at) if at > Instant::now() => {
                    self.wake.wait_until(&mut st, at);
                }
                Some(_) => {}
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
            self.arm(at, wake);
        }
    }

    /// Whether timerfd drivers serve the deadlines (else the thread does).
    fn timerfd_serves(&self) -> bool {
        !self.timerfd_failed && DRIVERS.load(Ordering::Acquire) > 0
    }

    /// Has the driver look at the heap at `at`: sets the shared timerfd, or wakes the thread.
    fn arm(&mut self, at: Instant, wake: &Condvar) {
        self.armed = Some(at);
        #[cfg(target_os = "linux")]
        if self.timerfd_serves() {
            let after = at.saturating_duration_since(Instant::now());
            match timerfd::shared().and_then(|fd| timerfd::set(fd, after, None)) {
                Ok(()) => return,
                Err(_) => self.timerfd_failed = true,
            }
        }
        if start_thread().is_ok() {
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

    /// Pops stale entries off the top of the heap; returns the time of the first current one.
    fn drop_stale_top(&mut self) -> Option<Instant> {
        while let Some(Reverse(q)) = self.heap.peek() {
            if self.current(q) {
                return Some(q.at);
            }
            self.heap.pop();
        }
        None
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

/// The Linux timerfd: Sluice's maintenance tick and the deadlines' driver. The IO driver of the
/// runtime watches it like a socket.
#[cfg(target_os = "linux")]
pub mod timerfd {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::sync::OnceLock;
    use std::time::Duration;

    use rustix::time::{
        timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags,
        TimerfdTimerFlags, Timespec,
    };
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    /// A new timerfd on the monotonic clock, disarmed.
    pub fn create() -> io::Result<OwnedFd> {
        Ok(timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?)
    }

    /// The process's timerfd for deadlines, made on first use.
    pub(super) fn shared() -> io::Result<&'static OwnedFd> {
        static SHARED: OnceLock<Option<OwnedFd>> = OnceLock::new();
        SHARED
            .get_or_init(|| create().ok())
            .as_ref()
            .ok_or_else(|| io::Error::other("no timerfd"))
    }

    /// Arms `fd` to expire `after` from now (at once for zero), then every `every` if given.
    pub fn set(fd: &OwnedFd, after: Duration, every: Option<Duration>) -> io::Result<()> {
        let spec = |d: Duration| {
            Timespec::try_from(d)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "duration too long"))
        };
        // A zero first expiry would disarm the timer.
        let first = spec(after.max(Duration::from_nanos(1)))?;
        let interval = spec(every.unwrap_or(Duration::ZERO))?;
        timerfd_settime(
            fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: interval,
                it_value: first,
            },
        )?;
        Ok(())
    }

    /// Registers `fd` with the current runtime's IO driver.
    #[allow(unsafe_code)] // registering a raw fd with tokio's reactor is `unsafe` since tokio 1.52
    pub fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: the OwnedFd is a timerfd that the AsyncFd owns: nothing else can close or
        // replace it while it is registered, and AsyncFd deregisters it before dropping it.
        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(Into::into)
    }

    /// Waits until the timer has expired at least once since the last wait.
    pub async fn wait(fd: &AsyncFd<OwnedFd>) -> io::Result<()> {
        loop {
            let mut ready = fd.readable().await?;
            // The read takes the count of expirations and clears readiness; EAGAIN means the
            // wake-up was spurious, or another runtime watching the same timer read it first.
            let mut expirations = [0u8; 8];
            match ready.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut expirations)?)) {
                Ok(read) => return read.map(drop),
                Err(_would_block) => continue,
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
    fn a_runtime_that_drives_its_deadlines_fires_them() {
        runtime().block_on(async {
            if let Err(e) = drive_here() {
                panic!("drive_here: {e}");
            }
            drop(registered_then_moved_later(20, 40).await);
            let never = std::future::pending::<()>();
            assert_eq!(
                timeout(Duration::from_millis(10), never).await,
                Err(Elapsed)
            );
        });
    }

    #[test]
    fn outside_a_runtime_the_thread_drives() {
        if let Err(e) = drive_here() {
            panic!("drive_here: {e}");
        }
        assert!(THREAD_STARTED.load(Ordering::Acquire));
    }

    #[test]
    fn deadlines_queued_before_a_driver_starts_still_fire() {
        // A sleep queued while no runtime drives deadlines...
        let (registered, is_registered) = std::sync::mpsc::channel();
        let (ended, has_ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut s = sleep(Duration::from_millis(200));
                assert!(futures_poll_once(&mut s).is_pending());
                let _ = registered.send(());
                s.await;
                let _ = ended.send(());
            });
        });
        if is_registered.recv_timeout(Duration::from_secs(10)).is_err() {
            panic!("the sleeper did not start");
        }
        // ...then a runtime starts driving, and stays until told: it takes that deadline over.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            runtime().block_on(async {
                if let Err(e) = drive_here() {
                    panic!("drive_here: {e}");
                }
                let _ = stopped.await;
            });
        });
        // Bounded by the std clock, not by the timer under test.
        let fired = has_ended.recv_timeout(Duration::from_secs(10));
        let _ = stop.send(());
        assert!(fired.is_ok(), "the queued sleep did not fire within 10 s");
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
            let mut s = registered_then_moved_later(10, 60).await;
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

    /// A sleep of `first` ms, registered, then moved to `later` ms and awaited: it completes no
    /// earlier than `later`. Returns the sleep, completed.
    async fn registered_then_moved_later(first: u64, later: u64) -> Sleep {
        let start = Instant::now();
        let mut s = sleep(Duration::from_millis(first));
        assert!(futures_poll_once(&mut s).is_pending());
        s.reset(start + Duration::from_millis(later));
        (&mut s).await;
        assert!(start.elapsed() >= Duration::from_millis(later));
        s
    }

    /// Polls `s` once with a no-op waker.
    fn futures_poll_once(s: &mut Sleep) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(s).poll(&mut cx)
    }
}
