//! The maintenance tick.
//!
//! The maintenance loop is the one deadline that is always pending. On Linux it ticks from a
//! `timerfd`, which the IO driver watches like a socket: no thread is woken to wake the runtime.
//! Elsewhere, or without a timerfd, it sleeps on [`sluice_pool::timer`]. Sluice's runtime has no
//! tokio time driver (see that module), so nothing here may use `tokio::time`.

use std::time::Duration;

use sluice_pool::timer::{self, Sleep};
use tracing::warn;

/// A periodic wake-up for the maintenance loop. The first tick comes one period after creation;
/// ticks missed while nobody waited are merged into one.
pub struct Ticker {
    period: Duration,
    source: Source,
}

enum Source {
    #[cfg(target_os = "linux")]
    TimerFd(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>),
    Sleep(Sleep),
}

impl Ticker {
    /// A ticker firing every `period`. It must be created inside the runtime that polls it.
    pub fn new(period: Duration) -> Self {
        #[cfg(target_os = "linux")]
        match timerfd::create(period) {
            Ok(fd) => {
                return Self {
                    period,
                    source: Source::TimerFd(fd),
                }
            }
            Err(e) => warn!(error = %e, "no timerfd for the maintenance tick; using a timer"),
        }
        Self {
            period,
            source: Source::Sleep(timer::sleep(period)),
        }
    }

    /// Waits for the next tick.
    pub async fn tick(&mut self) {
        match &mut self.source {
            #[cfg(target_os = "linux")]
            Source::TimerFd(fd) => {
                if let Err(e) = timerfd::wait(fd).await {
                    warn!(error = %e, "the maintenance timerfd failed; using a timer");
                    self.source = Source::Sleep(timer::sleep(self.period));
                }
            }
            Source::Sleep(sleep) => {
                (&mut *sleep).await;
                // Ticks missed while nobody waited merge into this one.
                sleep.reset(sluice_pool::clock::now() + self.period);
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod timerfd {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    use sluice_pool::timer::timerfd;
    use tokio::io::unix::AsyncFd;

    pub(super) fn create(period: Duration) -> io::Result<AsyncFd<OwnedFd>> {
        let fd = timerfd::create()?;
        timerfd::set(&fd, period, Some(period))?;
        timerfd::watch(fd)
    }

    pub(super) use timerfd::wait;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `make`'s ticker in a runtime built without a time driver, where any tokio timer
    /// would panic (failing the thread, so no message arrives): it must fire repeatedly.
    fn ticks_repeatedly_without_tokio_timers(make: fn() -> Ticker) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("runtime: {e}"),
        };
        let (done, ticked) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut t = make();
                for _ in 0..3 {
                    t.tick().await;
                }
            });
            let _ = done.send(());
        });
        if let Err(e) = ticked.recv_timeout(Duration::from_secs(10)) {
            panic!("no three ticks within 10 s: {e}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_timerfd_ticks() {
        ticks_repeatedly_without_tokio_timers(|| {
            let t = Ticker::new(Duration::from_millis(5));
            assert!(matches!(t.source, Source::TimerFd(_)));
            t
        });
    }

    #[test]
    fn the_fallback_sleep_ticks() {
        ticks_repeatedly_without_tokio_timers(|| {
            let period = Duration::from_millis(5);
            Ticker {
                period,
                source: Source::Sleep(timer::sleep(period)),
            }
        });
    }
}
