//! Which socket woke a session, so a wake-up re-polls only the socket that has news.
//!
//! A session waits on two sockets at once: its client and, inside a transaction, its server.
//! tokio wakes the task without saying which socket is ready, so every wake-up used to poll both,
//! and a socket that had nothing to say was polled again only to re-register the same waker
//! (the readiness check, the lock and the budget: about 200 instructions). Each round trip of a
//! multi-statement transaction paid that three times.
//!
//! An [`ArmedRead`] registers its own waker for one socket: a flag plus the task's waker. A read
//! that returned `Pending` leaves the socket *armed*: its waker stays registered with tokio until
//! the socket becomes ready, which sets the flag and wakes the task. While armed and not flagged,
//! the socket has nothing new, and the poll is skipped.
//!
//! Whoever reads the socket with another waker (a plain `read_buf().await`) must call
//! [`ArmedRead::disarm`], since tokio keeps only the last waker registered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};

/// The waker registered for one socket: marks the socket, then wakes the task.
#[derive(Default)]
struct Signal {
    fired: AtomicBool,
    /// The waker of the task that owns the socket: set once, as a tokio task's never changes.
    task: OnceLock<Waker>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        if let Some(task) = self.task.get() {
            task.wake_by_ref();
        }
    }
}

/// Reads of one socket through its own waker, skipped while nothing new arrived.
pub struct ArmedRead {
    signal: Arc<Signal>,
    waker: Waker,
    armed: bool,
}

impl Default for ArmedRead {
    fn default() -> Self {
        let signal = Arc::new(Signal::default());
        ArmedRead {
            waker: Waker::from(signal.clone()),
            signal,
            armed: false,
        }
    }
}

impl std::fmt::Debug for ArmedRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmedRead")
            .field("armed", &self.armed)
            .finish()
    }
}

impl ArmedRead {
    /// Forgets the registration: the next poll reads the socket. For a socket just attached,
    /// or one read with another waker since.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Runs `read` (a `poll_read` of the socket) with this socket's waker, unless the socket is
    /// armed and has not become ready since: then it is `Pending` without touching the socket.
    #[inline]
    pub fn poll<R>(
        &mut self,
        cx: &mut Context<'_>,
        read: impl FnOnce(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        let task = self.signal.task.get_or_init(|| cx.waker().clone());
        if !task.will_wake(cx.waker()) {
            // Polled from another task (never, as sessions run): read with its waker.
            self.armed = false;
            return read(cx);
        }
        // Clear the flag before reading: a readiness that comes after the read registered the
        // waker sets it again and wakes the task. A load first, and a store only when it was
        // set, not a swap: a wake-up landing between the two is not lost, as the read that
        // follows sees its readiness.
        let fired = self.signal.fired.load(Ordering::Acquire);
        if fired {
            self.signal.fired.store(false, Ordering::Relaxed);
        }
        if self.armed && !fired {
            return Poll::Pending;
        }
        let r = read(&mut Context::from_waker(&self.waker));
        self.armed = r.is_pending();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::io::poll_read_buf;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    /// Polls `sock` through `armed` once, counting the reads that reached the socket.
    fn poll_once(
        armed: &mut ArmedRead,
        sock: &mut TcpStream,
        buf: &mut bytes::BytesMut,
        reads: &mut u32,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        armed.poll(cx, |cx| {
            *reads += 1;
            poll_read_buf(Pin::new(sock), cx, buf)
        })
    }

    /// Waits, bounded, until a poll through `armed` reads bytes or the end of the stream.
    async fn read_when_woken(
        armed: &mut ArmedRead,
        sock: &mut TcpStream,
        buf: &mut bytes::BytesMut,
        reads: &mut u32,
    ) -> usize {
        sluice_pool::timer::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| poll_once(armed, sock, buf, reads, cx)),
        )
        .await
        .expect("the task is woken")
        .expect("read")
    }

    #[tokio::test]
    async fn an_armed_socket_is_read_again_only_after_it_fired() {
        let (mut ours, mut peer) = pair().await;
        let mut armed = ArmedRead::default();
        let mut buf = bytes::BytesMut::with_capacity(64);
        let mut reads = 0;
        // Nothing sent: the first poll reads and arms, the next ones do not touch the socket.
        std::future::poll_fn(|cx| {
            for _ in 0..3 {
                assert!(poll_once(&mut armed, &mut ours, &mut buf, &mut reads, cx).is_pending());
            }
            Poll::Ready(())
        })
        .await;
        assert_eq!(reads, 1);
        // The peer speaks: the registered waker fires, the task wakes and the read gets it.
        peer.write_all(b"hello").await.expect("write");
        let n = read_when_woken(&mut armed, &mut ours, &mut buf, &mut reads).await;
        assert_eq!((n, &buf[..]), (5, &b"hello"[..]));
        assert_eq!(reads, 2);
        // After a read with another waker, the socket is polled again whatever the flag says.
        armed.disarm();
        std::future::poll_fn(|cx| {
            assert!(poll_once(&mut armed, &mut ours, &mut buf, &mut reads, cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(reads, 3);
        // The peer closes: the armed socket fires and the read sees the end.
        drop(peer);
        let n = read_when_woken(&mut armed, &mut ours, &mut buf, &mut reads).await;
        assert_eq!(n, 0);
    }
}
