//! Socket options of client connections.
//!
//! Every client socket gets `TCP_NODELAY` (the protocol's small messages go out at once) and,
//! with `tcp_keepalive`, `SO_KEEPALIVE`. Linux copies both from a listening socket to each
//! connection it accepts (with the keepalive timer started), so there they are set once on the
//! listener, and again only when a reload changes `tcp_keepalive`: two system calls fewer per
//! login. The first connection accepted is checked for them; where they did not come through, and
//! on other systems, each accepted socket gets them.

use std::io;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};

/// Whether accepted sockets inherit the listener's options (checked by this module's test).
const INHERITED: bool = cfg!(target_os = "linux");

/// The client socket options of one TCP listener.
pub(crate) struct ClientSockets {
    /// The `tcp_keepalive` the listener carries for its connections to inherit, or `None` where
    /// they do not inherit it (or setting it on the listener failed): then each socket gets it.
    on_listener: Option<bool>,
    /// Whether an accepted socket was seen to carry the listener's options. The first one is
    /// checked (one `getsockopt`), so a kernel that did not copy them costs a system call per
    /// login, not Nagle's delays.
    confirmed: bool,
}

impl ClientSockets {
    /// Sets the options on `listener` where connections inherit them.
    pub(crate) fn new(listener: &TcpListener, keepalive: bool) -> ClientSockets {
        let on_listener = (INHERITED && set(listener, keepalive).is_ok()).then_some(keepalive);
        ClientSockets {
            on_listener,
            confirmed: false,
        }
    }

    /// Gives a socket just accepted from `listener` its options, with `tcp_keepalive` as now
    /// configured. Failures are ignored: the connection works without them.
    pub(crate) fn accepted(&mut self, listener: &TcpListener, sock: &TcpStream, keepalive: bool) {
        if !self.confirmed && self.on_listener.is_some() {
            self.confirmed = true;
            if !SockRef::from(sock).nodelay().unwrap_or(false) {
                self.on_listener = None;
            }
        }
        match self.on_listener {
            Some(k) if k == keepalive => {}
            Some(_) => {
                // A reload changed tcp_keepalive: the listener carries the new value from now on,
                // and this socket, which inherited the old one, gets it too.
                self.on_listener = set(listener, keepalive).is_ok().then_some(keepalive);
                let _ = set(sock, keepalive);
            }
            None => {
                let _ = set(sock, keepalive);
            }
        }
    }
}

fn set<'s>(sock: impl Into<SockRef<'s>>, keepalive: bool) -> io::Result<()> {
    let s = sock.into();
    s.set_nodelay(true)?;
    s.set_keepalive(keepalive)
}

/// How long the kernel holds a connection that has sent nothing, as PgBouncer sets it.
const DEFER_ACCEPT_SECS: libc::c_int = 45;

/// Accept a client only once its first bytes arrived: every PostgreSQL client speaks first
/// (SSLRequest or StartupMessage), so the accept and the first read come in one wakeup and a
/// connection that never speaks costs Sluice nothing. Linux only; elsewhere a no-op.
#[allow(unsafe_code)] // one setsockopt that neither socket2 nor tokio offers
pub(crate) fn defer_accept(listener: &TcpListener) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let secs = DEFER_ACCEPT_SECS;
        // SAFETY: a valid socket descriptor, and a pointer to a c_int of the length given.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_ref(&secs).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = listener;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accept_one(listener: &TcpListener) -> TcpStream {
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        drop(client.expect("connect"));
        accepted.expect("accept").0
    }

    fn options(sock: &TcpStream) -> (bool, bool) {
        let s = SockRef::from(sock);
        (
            s.nodelay().expect("nodelay"),
            s.keepalive().expect("keepalive"),
        )
    }

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_and_the_configured_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut opts = ClientSockets::new(&listener, true);
        assert_eq!(opts.on_listener.is_some(), INHERITED);

        // Keepalive as configured, then a reload turns it off (the socket accepted at the switch
        // and the ones after it go without), then on again.
        for keepalive in [true, false, false, true] {
            let sock = accept_one(&listener).await;
            opts.accepted(&listener, &sock, keepalive);
            assert_eq!(options(&sock), (true, keepalive));
        }
    }

    #[tokio::test]
    async fn a_listener_without_the_options_falls_back_to_setting_each_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        // As if the kernel had not copied them: the listener believes it set them, but did not.
        let mut opts = ClientSockets {
            on_listener: Some(true),
            confirmed: false,
        };
        for _ in 0..2 {
            let sock = accept_one(&listener).await;
            opts.accepted(&listener, &sock, true);
            assert_eq!(options(&sock), (true, true));
            assert_eq!(opts.on_listener, None);
        }
    }

    /// What the listener path relies on: the kernel copies both options to accepted sockets.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn linux_copies_the_listeners_options_to_accepted_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        set(&listener, true).expect("set");
        assert_eq!(options(&accept_one(&listener).await), (true, true));
        set(&listener, false).expect("set");
        assert_eq!(options(&accept_one(&listener).await), (true, false));
    }
}
