//! Loopback helpers: free ports and bounded polling.
//!
//! Readiness is always polled against a deadline. The short pause between two attempts is only
//! back-off; nothing relies on a sleep being long enough.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Pause between two polling attempts.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A TCP port on 127.0.0.1 that was free a moment ago: bind port 0, read it, close.
///
/// Another process may take it before the caller binds it; callers that can retry
/// (see [`PgCluster`](super::PgCluster)) do so.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local_addr")?.port())
}

/// Calls `probe` until it returns `Ok(Some(value))`, or fails once `timeout` has passed.
/// `Ok(None)` means "not yet"; `Err` aborts at once.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async [`wait_until`]: awaits `probe` until it yields `Some`, bounded by `timeout`.
/// For assertions on state that settles eventually (pool sizes, pg_stat_activity, metrics).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether something accepts TCP connections at `addr` right now.
pub fn accepts(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}
