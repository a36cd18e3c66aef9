//! A raw PostgreSQL v3 client for wire-level tests: exact frontend bytes out, whole backend
//! messages in, every read bounded by a timeout.
//!
//! It deliberately has its own tiny encoder and decoder, independent of `sluice-wire`, so a bug
//! in Sluice's codec can't hide itself in the tests. Log in with a trust user (`trusted`) or a
//! clear-text password; for SCRAM/md5 logins use tokio-postgres ([`super::SluiceHandle::connect`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Default bound on a single read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages longer than this are treated as a protocol error rather than allocated.
const MAX_MESSAGE: usize = 64 << 20;

/// One backend message: its type byte and its body (without the length word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendMessage {
    /// Message type, e.g. `b'Z'`, `b'E'`, `b'R'`.
    pub tag: u8,
    /// Body after the 4-byte length.
    pub body: Bytes,
}

impl BackendMessage {
    /// The type byte as a char, for readable assertions.
    pub fn kind(&self) -> char {
        char::from(self.tag)
    }

    /// Fields of an ErrorResponse (`E`) or NoticeResponse (`N`): (field code, value).
    pub fn fields(&self) -> Vec<(u8, String)> {
        let mut out = Vec::new();
        if self.tag != b'E' && self.tag != b'N' {
            return out;
        }
        let mut rest = &self.body[..];
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            out.push((code, String::from_utf8_lossy(&tail[..end]).into_owned()));
            rest = tail.get(end + 1..).unwrap_or_default();
        }
        out
    }

    /// One field of an ErrorResponse/NoticeResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        self.fields()
            .into_iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v)
    }

    /// SQLSTATE (`C` field) of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    /// Message (`M` field) of an ErrorResponse.
    pub fn message(&self) -> Option<String> {
        self.field(b'M')
    }

    /// The request code of an Authentication message (`R`): 0 ok, 3 clear text, 5 md5, 10 SASL.
    pub fn auth_code(&self) -> Option<i32> {
        (self.tag == b'R' && self.body.len() >= 4).then(|| (&self.body[..4]).get_i32())
    }

    /// Transaction status of ReadyForQuery (`Z`): `b'I'`, `b'T'` or `b'E'`.
    pub fn ready_status(&self) -> Option<u8> {
        (self.tag == b'Z')
            .then(|| self.body.first().copied())
            .flatten()
    }

    /// (process id, secret key) of BackendKeyData (`K`).
    pub fn backend_key(&self) -> Option<(i32, i32)> {
        if self.tag != b'K' || self.body.len() < 8 {
            return None;
        }
        let mut b = &self.body[..];
        Some((b.get_i32(), b.get_i32()))
    }

    /// (name, value) of ParameterStatus (`S`).
    pub fn parameter(&self) -> Option<(String, String)> {
        if self.tag != b'S' {
            return None;
        }
        let mut parts = self.body.split(|&b| b == 0);
        let name = String::from_utf8_lossy(parts.next()?).into_owned();
        let value = String::from_utf8_lossy(parts.next()?).into_owned();
        Some((name, value))
    }

    /// Columns of a DataRow (`D`) as text (`None` for NULL).
    pub fn data_row(&self) -> Option<Vec<Option<String>>> {
        if self.tag != b'D' || self.body.len() < 2 {
            return None;
        }
        let mut b = &self.body[..];
        let n = b.get_i16();
        let mut cols = Vec::new();
        for _ in 0..n {
            if b.remaining() < 4 {
                return None;
            }
            let len = b.get_i32();
            if len < 0 {
                cols.push(None);
                continue;
            }
            let len = usize::try_from(len).ok()?;
            if b.remaining() < len {
                return None;
            }
            cols.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b.advance(len);
        }
        Some(cols)
    }

    /// Command tag of CommandComplete (`C`).
    pub fn command_tag(&self) -> Option<String> {
        (self.tag == b'C').then(|| {
            String::from_utf8_lossy(self.body.strip_suffix(&[0]).unwrap_or(&self.body)).into_owned()
        })
    }
}

/// Encoders for frontend messages. Each returns the complete bytes of one message, so tests can
/// concatenate several into one write (pipelining) or split one across writes.
pub mod frontend {
    use bytes::{BufMut, BytesMut};

    /// Protocol 3.0.
    pub const PROTOCOL_3: i32 = 196_608;
    /// SSLRequest code.
    pub const SSL_REQUEST: i32 = 80_877_103;
    /// GSSENCRequest code.
    pub const GSSENC_REQUEST: i32 = 80_877_104;
    /// CancelRequest code.
    pub const CANCEL_REQUEST: i32 = 80_877_102;

    fn untyped(body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::with_capacity(body.len() + 4);
        b.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
        b.put_slice(body);
        b.to_vec()
    }

    /// A typed message: tag, length, body.
    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::with_capacity(body.len() + 5);
        b.put_u8(tag);
        b.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
        b.put_slice(body);
        b.to_vec()
    }

    fn cstr(b: &mut BytesMut, s: &str) {
        b.put_slice(s.as_bytes());
        b.put_u8(0);
    }

    /// StartupMessage with `user`, `database` and extra parameters.
    pub fn startup(user: &str, database: &str, params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i32(PROTOCOL_3);
        cstr(&mut b, "user");
        cstr(&mut b, user);
        cstr(&mut b, "database");
        cstr(&mut b, database);
        for (k, v) in params {
            cstr(&mut b, k);
            cstr(&mut b, v);
        }
        b.put_u8(0);
        untyped(&b)
    }

    /// SSLRequest.
    pub fn ssl_request() -> Vec<u8> {
        untyped(&SSL_REQUEST.to_be_bytes())
    }

    /// GSSENCRequest.
    pub fn gssenc_request() -> Vec<u8> {
        untyped(&GSSENC_REQUEST.to_be_bytes())
    }

    /// CancelRequest for a (process id, secret key) from BackendKeyData.
    pub fn cancel(pid: i32, secret: i32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i32(CANCEL_REQUEST);
        b.put_i32(pid);
        b.put_i32(secret);
        untyped(&b)
    }

    /// PasswordMessage with a clear-text password.
    pub fn password(pw: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, pw);
        message(b'p', &b)
    }

    /// Query (simple protocol).
    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, sql);
        message(b'Q', &b)
    }

    /// Parse: statement name (empty = unnamed), SQL, parameter type OIDs (0 = unspecified).
    pub fn parse(name: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.put_i16(i16::try_from(param_types.len()).unwrap_or(i16::MAX));
        for t in param_types {
            b.put_u32(*t);
        }
        message(b'P', &b)
    }

    /// Bind with text-format parameters (`None` = NULL) and text-format results.
    pub fn bind(portal: &str, statement: &str, params: &[Option<&str>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, portal);
        cstr(&mut b, statement);
        b.put_i16(0); // all parameters in text format
        b.put_i16(i16::try_from(params.len()).unwrap_or(i16::MAX));
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0); // all results in text format
        message(b'B', &b)
    }

    /// Describe a statement (`b'S'`) or portal (`b'P'`).
    pub fn describe(kind: u8, name: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        cstr(&mut b, name);
        message(b'D', &b)
    }

    /// Execute a portal (`max_rows` 0 = all).
    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = BytesMut::new();
        cstr(&mut b, portal);
        b.put_i32(max_rows);
        message(b'E', &b)
    }

    /// Close a statement (`b'S'`) or portal (`b'P'`).
    pub fn close(kind: u8, name: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(kind);
        cstr(&mut b, name);
        message(b'C', &b)
    }

    /// Sync.
    pub fn sync() -> Vec<u8> {
        message(b'S', &[])
    }

    /// Flush.
    pub fn flush() -> Vec<u8> {
        message(b'H', &[])
    }

    /// Terminate.
    pub fn terminate() -> Vec<u8> {
        message(b'X', &[])
    }
}

/// A raw TCP connection speaking the PostgreSQL v3 protocol.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// BackendKeyData from the last successful login.
    pub backend_key: Option<(i32, i32)>,
}

impl RawClient {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<RawClient> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        Ok(RawClient {
            stream,
            buf: BytesMut::with_capacity(8192),
            backend_key: None,
        })
    }

    /// Writes bytes as they are.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream
            .write_all(bytes)
            .await
            .context("write to server")
    }

    /// Sends a StartupMessage.
    pub async fn startup(&mut self, user: &str, db: &str, params: &[(&str, &str)]) -> Result<()> {
        self.send(&frontend::startup(user, db, params)).await
    }

    /// Sends SSLRequest and returns the single answer byte (`b'S'` or `b'N'`).
    pub async fn ssl_request(&mut self) -> Result<u8> {
        self.send(&frontend::ssl_request()).await?;
        self.read_byte().await
    }

    /// Sends GSSENCRequest and returns the single answer byte (`b'G'` or `b'N'`).
    pub async fn gssenc_request(&mut self) -> Result<u8> {
        self.send(&frontend::gssenc_request()).await?;
        self.read_byte().await
    }

    async fn read_byte(&mut self) -> Result<u8> {
        if let Some(&b) = self.buf.first() {
            self.buf.advance(1);
            return Ok(b);
        }
        let mut one = [0u8; 1];
        let n = tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut one))
            .await
            .context("timed out reading one byte")??;
        if n == 0 {
            bail!("connection closed before the one-byte answer");
        }
        Ok(one[0])
    }

    /// Sends a simple Query.
    pub async fn query(&mut self, sql: &str) -> Result<()> {
        self.send(&frontend::query(sql)).await
    }

    /// Sends Terminate.
    pub async fn terminate(&mut self) -> Result<()> {
        self.send(&frontend::terminate()).await
    }

    /// Reads the next backend message, bounded by 10 s.
    pub async fn recv(&mut self) -> Result<BackendMessage> {
        self.recv_timeout(READ_TIMEOUT).await
    }

    /// Reads the next backend message, bounded by `timeout`.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<BackendMessage> {
        tokio::time::timeout(timeout, self.recv_inner())
            .await
            .with_context(|| format!("no backend message within {timeout:?}"))?
    }

    async fn recv_inner(&mut self) -> Result<BackendMessage> {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_i32();
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| (4..=MAX_MESSAGE).contains(l));
                let Some(len) = len else {
                    bail!("bad message length in {:?}", &self.buf[..5])
                };
                if self.buf.len() > len {
                    let mut msg = self.buf.split_to(len + 1);
                    let tag = msg.get_u8();
                    msg.advance(4);
                    return Ok(BackendMessage {
                        tag,
                        body: msg.freeze(),
                    });
                }
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .context("read from server")?;
            if n == 0 {
                bail!(
                    "connection closed (EOF) with {} unparsed bytes",
                    self.buf.len()
                );
            }
        }
    }

    /// Reads messages up to and including ReadyForQuery.
    pub async fn recv_until_ready(&mut self) -> Result<Vec<BackendMessage>> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await?;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Reads messages until one with `tag` arrives; returns all of them (it last).
    pub async fn recv_until(&mut self, tag: u8) -> Result<Vec<BackendMessage>> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await?;
            let done = m.tag == tag;
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Succeeds if the peer closes the connection within `timeout`, after at most a few messages
    /// (returned, e.g. a final ErrorResponse).
    pub async fn expect_closed(&mut self, timeout: Duration) -> Result<Vec<BackendMessage>> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.recv_inner()).await {
                Err(_) => bail!("connection still open after {timeout:?}; got {seen:?}"),
                Ok(Ok(m)) => seen.push(m),
                Ok(Err(_)) => return Ok(seen), // EOF or reset
            }
        }
    }

    /// Startup plus authentication (trust or clear-text password) up to ReadyForQuery.
    /// Returns every message received; fails on an ErrorResponse or an auth method it can't do.
    pub async fn login(
        &mut self,
        user: &str,
        db: &str,
        password: Option<&str>,
        params: &[(&str, &str)],
    ) -> Result<Vec<BackendMessage>> {
        self.startup(user, db, params).await?;
        let mut seen = Vec::new();
        loop {
            let m = self.recv().await?;
            match (m.tag, m.auth_code()) {
                (b'R', Some(0)) => {}
                (b'R', Some(3)) => {
                    let pw = password.context("server asked for a password, none given")?;
                    self.send(&frontend::password(pw)).await?;
                }
                (b'R', Some(code)) => {
                    bail!("raw client can't do auth method {code}; use a trust user or tokio-postgres")
                }
                (b'E', _) => bail!(
                    "login failed: {} {}",
                    m.sqlstate().unwrap_or_default(),
                    m.message().unwrap_or_default()
                ),
                (b'K', _) => self.backend_key = m.backend_key(),
                _ => {}
            }
            let done = m.tag == b'Z';
            seen.push(m);
            if done {
                return Ok(seen);
            }
        }
    }

    /// Runs one simple query and returns its rows as text; fails on ErrorResponse.
    pub async fn simple_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.query(sql).await?;
        let msgs = self.recv_until_ready().await?;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            bail!(
                "{}: {}",
                e.sqlstate().unwrap_or_default(),
                e.message().unwrap_or_default()
            );
        }
        Ok(msgs.iter().filter_map(BackendMessage::data_row).collect())
    }

    /// Opens a new connection to `addr` and sends a CancelRequest for `key`, then waits for the
    /// peer to close it (bounded).
    pub async fn cancel(addr: SocketAddr, key: (i32, i32)) -> Result<()> {
        let mut c = RawClient::connect(addr).await?;
        c.send(&frontend::cancel(key.0, key.1)).await?;
        c.expect_closed(READ_TIMEOUT).await.map(|_| ())
    }
}

/// Builds a message body quickly for ad-hoc malformed-input tests.
pub fn body(parts: &[&[u8]]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for p in parts {
        b.put_slice(p);
    }
    b.to_vec()
}
