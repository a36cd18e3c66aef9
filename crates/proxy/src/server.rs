//! Server connections: opening and authenticating to PostgreSQL, and the state Sluice keeps
//! about each one between transactions (parameters, prepared statements, transaction status).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use sluice_config::ScramSecret;
use sluice_pool::{BoxFuture, Connector, Poolable};
use sluice_wire::backend::{self, Authentication, TransactionStatus};
use sluice_wire::frontend;
use sluice_wire::startup::{ProtocolVersion, StartupPacket};
use sluice_wire::{ErrorFields, SqlState};

use crate::auth::scram::{ClientExchange, ClientKeys, ScramError};
use crate::prepared::ServerStatements;
use crate::stream::Stream;

/// Largest message accepted from a server during login.
const MAX_LOGIN_MESSAGE: u32 = 1 << 20;

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// Where a server lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    /// Host name, IP address, or a unix socket directory (starting with `/`).
    pub host: String,
    /// Port (also names the unix socket file).
    pub port: u16,
}

impl ServerAddr {
    /// Opens a stream to the server.
    pub async fn connect(&self) -> std::io::Result<Stream> {
        if self.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", self.host, self.port);
            Ok(Stream::Unix(UnixStream::connect(path).await?))
        } else {
            let s = TcpStream::connect((self.host.as_str(), self.port)).await?;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// How Sluice proves itself to the server.
#[derive(Clone)]
pub enum Credential {
    /// No password configured (trust on the server side).
    None,
    /// A plaintext password: any method the server asks for.
    Password(String),
    /// Only an md5 secret: md5 logins only.
    Md5(String),
    /// Only a SCRAM secret: SCRAM logins with the key recovered from a client's own login.
    Scram(ScramSecret),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Credential::None => "none",
            Credential::Password(_) => "password",
            Credential::Md5(_) => "md5",
            Credential::Scram(_) => "scram",
        };
        write!(f, "Credential({kind}, <redacted>)")
    }
}

/// Why opening a server connection failed. Cloned to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be opened or broke during login.
    #[error("could not connect to server {addr}: {message}")]
    Io {
        /// The server.
        addr: String,
        /// The IO error.
        message: String,
    },
    /// The server did not finish login in time.
    #[error("server {0} did not answer within server_connect_timeout")]
    Timeout(String),
    /// The server refused the login; its own error is passed to clients.
    #[error("server refused login: {} ({})", .0.message, .0.code.as_str())]
    Refused(Box<ErrorFields>),
    /// Sluice cannot authenticate with what it holds.
    #[error("cannot log in to server: {0}")]
    Auth(String),
    /// The server broke the protocol.
    #[error("server protocol error: {0}")]
    Protocol(String),
}

impl ServerError {
    /// The error a client should see.
    pub fn to_client(&self) -> ErrorFields {
        match self {
            ServerError::Refused(fields) => {
                let mut f = (**fields).clone();
                f.severity = sluice_wire::Severity::Error;
                f
            }
            other => ErrorFields::error(SqlState::CONNECTION_FAILURE, other.to_string()),
        }
    }
}

/// Keys for SCRAM logins to the server, learned once and reused: derived from a plaintext
/// password (PBKDF2 paid once per salt), or recovered from a client's SCRAM proof.
#[derive(Default)]
pub struct KeyCache {
    keys: Mutex<Option<ClientKeys>>,
}

impl KeyCache {
    /// Stores keys recovered from a client's login.
    pub fn learn(&self, keys: ClientKeys) {
        *self.keys.lock() = Some(keys);
    }

    /// Whether pass-through keys are known.
    pub fn known(&self) -> bool {
        self.keys.lock().is_some()
    }

    fn get(&self, salt: &[u8], iterations: u32) -> Option<ClientKeys> {
        self.keys
            .lock()
            .as_ref()
            .filter(|k| k.salt == salt && k.iterations == iterations)
            .cloned()
    }
}

/// Everything needed to open server connections for one pool.
#[derive(Clone)]
pub struct ServerSpec {
    /// The server.
    pub addr: ServerAddr,
    /// Database name on the server.
    pub dbname: String,
    /// Role on the server.
    pub user: String,
    /// How to authenticate.
    pub credential: Credential,
    /// Cached SCRAM keys for this role.
    pub keys: Arc<KeyCache>,
    /// Bound on connect plus login.
    pub connect_timeout: Duration,
    /// Capacity of each connection's prepared-statement cache.
    pub max_prepared: usize,
    /// TCP keepalive on the connection (`tcp_keepalive`).
    pub keepalive: bool,
}

/// One server connection and what Sluice knows of its session state.
pub struct ServerConn {
    /// Process-unique id, for stats and logs.
    pub id: u64,
    /// The socket.
    pub stream: Stream,
    /// Bytes read from the server and not yet processed.
    pub rbuf: BytesMut,
    /// The server's address, for cancel requests.
    pub addr: ServerAddr,
    /// The backend's process id.
    pub pid: u32,
    /// The backend's cancel secret.
    pub secret: Vec<u8>,
    /// Reported parameters as the server last said (ParameterStatus).
    pub params: HashMap<String, String>,
    /// Parameters Sluice set on this session for a client, by name.
    pub applied: HashMap<String, crate::params::ParamValue>,
    /// Prepared statements that exist on this connection.
    pub statements: ServerStatements,
    /// Status from the last ReadyForQuery.
    pub status: TransactionStatus,
    /// Set when the connection's state is unknown: it is closed instead of reused.
    pub broken: bool,
    /// Set when a client ran something that leaves session state Sluice does not replay (see
    /// `sluice_wire::sql::leaves_session_state`): the session is reset before the next client.
    pub dirty: bool,
    /// Cancel requests in flight against this backend; it is not reused until they finish.
    pub cancels: Arc<crate::cancel::InFlight>,
    /// When the connection was opened.
    pub created: Instant,
    /// The cancel route to this backend, built on first use.
    pub cancel_target: Option<Arc<crate::cancel::Attached>>,
    /// The parameter wishes this session matches now.
    pub params_for: crate::params::MatchedWishes,
    /// Nothing in flight on this connection (kept current by the session while relaying).
    pub quiet: bool,
    /// The FATAL message the server sent before closing, if any.
    pub fatal: Option<String>,
    /// Database and user, for SHOW SERVERS.
    pub dbname: String,
    /// Role name.
    pub user: String,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}

impl ServerConn {
    /// A logged-in connection: `key` is the backend's (pid, cancel secret), `params` its
    /// reported parameters by lowercase name, `who` the (database, role) it serves.
    pub fn new(
        stream: Stream,
        rbuf: BytesMut,
        addr: ServerAddr,
        key: (u32, Vec<u8>),
        params: HashMap<String, String>,
        max_prepared: usize,
        who: (String, String),
    ) -> Self {
        ServerConn {
            id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            rbuf,
            addr,
            pid: key.0,
            secret: key.1,
            params,
            applied: HashMap::new(),
            statements: ServerStatements::new(max_prepared),
            status: TransactionStatus::Idle,
            broken: false,
            dirty: false,
            cancels: Arc::default(),
            created: Instant::now(),
            cancel_target: None,
            params_for: Default::default(),
            quiet: true,
            fatal: None,
            dbname: who.0,
            user: who.1,
        }
    }

    /// Forgets what a `DISCARD ALL` just dropped: the prepared statements, the settings Sluice
    /// applied for clients, and the record of whose wishes the session matches. The reported
    /// parameters are current already (the reset's ParameterStatus messages updated them).
    pub fn forget_session_state(&mut self) {
        self.statements.clear();
        self.applied.clear();
        self.params_for.forget();
        self.dirty = false;
    }

    /// Where a cancel for this backend goes (built once per connection).
    pub fn cancel_target(&mut self) -> Arc<crate::cancel::Attached> {
        self.cancel_target
            .get_or_insert_with(|| {
                Arc::new(crate::cancel::Attached {
                    addr: self.addr.clone(),
                    pid: self.pid,
                    secret: self.secret.clone(),
                    inflight: self.cancels.clone(),
                })
            })
            .clone()
    }
}

impl Poolable for ServerConn {
    fn reusable(&self) -> bool {
        // A dirty session is reset before it goes back; one that comes back dirty all the
        // same (its client's task was stopped half-way) is closed.
        !self.broken
            && !self.dirty
            && self.status == TransactionStatus::Idle
            && self.rbuf.is_empty()
            && self.cancels.idle()
    }

    fn healthy(&mut self) -> bool {
        if self.broken {
            return false;
        }
        // Drain anything the server sent while idle: notices and parameter changes are
        // harmless; EOF or an error (e.g. terminated by an administrator) means it is dead.
        loop {
            self.rbuf.reserve(4096);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        if self.rbuf.is_empty() {
            // The common case: the server sent nothing while the connection was idle.
            return true;
        }
        while let Ok(Some((h, body))) = frontend::split_message(&mut self.rbuf, MAX_LOGIN_MESSAGE) {
            match h.tag {
                b'E' => return false,
                b'S' => {
                    if let Ok((k, v)) = backend::decode_parameter_status(&body) {
                        self.params.insert(k.to_ascii_lowercase(), v.to_string());
                        self.params_for.forget();
                    }
                }
                b'N' | b'A' => {}
                _ => return false,
            }
        }
        self.rbuf.is_empty()
    }
}

/// Opens server connections for a pool.
pub struct ServerConnector {
    spec: parking_lot::RwLock<ServerSpec>,
}

impl ServerConnector {
    /// A connector for `spec`.
    pub fn new(spec: ServerSpec) -> Self {
        ServerConnector {
            spec: parking_lot::RwLock::new(spec),
        }
    }

    /// Replaces the spec (reload); new connections use it.
    pub fn set_spec(&self, spec: ServerSpec) {
        *self.spec.write() = spec;
    }

    /// The current spec.
    pub fn spec(&self) -> ServerSpec {
        self.spec.read().clone()
    }
}

impl Connector for ServerConnector {
    type Conn = ServerConn;
    type Error = ServerError;

    fn connect(&self) -> BoxFuture<Result<ServerConn, ServerError>> {
        let spec = self.spec();
        Box::pin(async move {
            let addr = spec.addr.to_string();
            match sluice_pool::timer::timeout(spec.connect_timeout, login(&spec)).await {
                Ok(r) => r,
                Err(_) => Err(ServerError::Timeout(addr)),
            }
        })
    }

    fn close(&self, conn: ServerConn) {
        let mut stream = conn.stream;
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let mut buf = BytesMut::with_capacity(5);
            frontend::encode_terminate(&mut buf);
            let _ = sluice_pool::timer::timeout(Duration::from_secs(1), async {
                let _ = stream.write_all(&buf).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

async fn read_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
    addr: &str,
) -> Result<(u8, bytes::Bytes), ServerError> {
    loop {
        match frontend::split_message(buf, MAX_LOGIN_MESSAGE) {
            Ok(Some((h, body))) => return Ok((h.tag, body)),
            Ok(None) => {}
            Err(e) => return Err(ServerError::Protocol(e.to_string())),
        }
        let n = stream.read_buf(buf).await.map_err(|e| ServerError::Io {
            addr: addr.to_string(),
            message: e.to_string(),
        })?;
        if n == 0 {
            return Err(ServerError::Io {
                addr: addr.to_string(),
                message: "server closed the connection during login".into(),
            });
        }
    }
}

fn refused(body: &[u8]) -> ServerError {
    match backend::decode_error_fields(body) {
        Ok(f) => ServerError::Refused(Box::new(f)),
        Err(e) => ServerError::Protocol(e.to_string()),
    }
}

/// The answer to an md5 password request: `"md5"` + hex(md5(the stored hash's hex digits +
/// the salt)), where the stored hash is `"md5"` + hex(md5(password + user)).
pub fn md5_answer(stored: &str, salt: [u8; 4]) -> [u8; 35] {
    let hex = stored.strip_prefix("md5").unwrap_or(stored);
    sluice_config::md5_text(&[hex.as_bytes(), &salt])
}

async fn login(spec: &ServerSpec) -> Result<ServerConn, ServerError> {
    let addr = spec.addr.to_string();
    let io = |e: std::io::Error| ServerError::Io {
        addr: addr.clone(),
        message: e.to_string(),
    };
    let mut stream = spec.addr.connect().await.map_err(io)?;
    if let (true, Stream::Tcp(s)) = (spec.keepalive, &stream) {
        socket2::SockRef::from(s).set_keepalive(true).map_err(io)?;
    }
    let mut out = BytesMut::with_capacity(256);
    StartupPacket::Startup {
        version: ProtocolVersion { major: 3, minor: 0 },
        params: vec![
            ("user".into(), spec.user.clone()),
            ("database".into(), spec.dbname.clone()),
        ],
        unrecognized_protocol_options: vec![],
    }
    .encode(&mut out);
    stream.write_all(&out).await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut scram: Option<(ClientExchange, Option<[u8; 32]>)> = None;
    let mut expected_final: Option<[u8; 32]> = None;
    let mut params = HashMap::new();
    let mut key = None;
    loop {
        let (tag, body) = read_message(&mut stream, &mut buf, &addr).await?;
        match tag {
            b'R' => {
                let auth = backend::decode_authentication(&body)
                    .map_err(|e| ServerError::Protocol(e.to_string()))?;
                out.clear();
                match auth {
                    Authentication::Ok => continue,
                    Authentication::Cleartext => match &spec.credential {
                        Credential::Password(p) => password_message(&mut out, p.as_bytes()),
                        _ => {
                            return Err(ServerError::Auth(
                                "the server asks for a cleartext password; configure the plaintext password".into(),
                            ))
                        }
                    },
                    Authentication::Md5 { salt } => {
                        let stored = match &spec.credential {
                            Credential::Password(p) => {
                                sluice_config::md5_secret(p, &spec.user)
                            }
                            Credential::Md5(h) => h.clone(),
                            _ => {
                                return Err(ServerError::Auth(
                                    "the server asks for md5; configure the plaintext password or its md5 secret".into(),
                                ))
                            }
                        };
                        password_message(&mut out, &md5_answer(&stored, salt));
                    }
                    Authentication::Sasl { mechanisms } => {
                        if !mechanisms.contains(&"SCRAM-SHA-256") {
                            return Err(ServerError::Auth(format!(
                                "the server offers no supported SASL mechanism ({mechanisms:?})"
                            )));
                        }
                        let (exchange, first) = ClientExchange::start();
                        frontend::encode_sasl_initial_response(
                            &mut out,
                            "SCRAM-SHA-256",
                            first.as_bytes(),
                        );
                        scram = Some((exchange, None));
                    }
                    Authentication::SaslContinue(data) => {
                        let Some((exchange, _)) = scram.take() else {
                            return Err(ServerError::Protocol("SASL continue out of order".into()));
                        };
                        let (final_msg, expected) = exchange
                            .respond(data, |salt, iterations| scram_keys(spec, salt, iterations))
                            .map_err(|e| ServerError::Auth(e.to_string()))?;
                        expected_final = Some(expected);
                        sasl_response(&mut out, final_msg.as_bytes());
                    }
                    Authentication::SaslFinal(data) => {
                        let expected = expected_final
                            .ok_or_else(|| ServerError::Protocol("SASL final out of order".into()))?;
                        ClientExchange::verify_final(data, &expected)
                            .map_err(|e| ServerError::Auth(e.to_string()))?;
                        continue;
                    }
                    Authentication::Other { code, .. } => {
                        return Err(ServerError::Auth(format!(
                            "unsupported authentication method {code}"
                        )))
                    }
                }
                stream.write_all(&out).await.map_err(io)?;
            }
            b'E' => return Err(refused(&body)),
            b'S' => {
                if let Ok((k, v)) = backend::decode_parameter_status(&body) {
                    params.insert(k.to_ascii_lowercase(), v.to_string());
                }
            }
            b'K' => {
                let (pid, secret) = backend::decode_backend_key_data(&body)
                    .map_err(|e| ServerError::Protocol(e.to_string()))?;
                key = Some((pid, secret.to_vec()));
            }
            b'N' | b'v' => {}
            b'Z' => break,
            other => {
                return Err(ServerError::Protocol(format!(
                    "unexpected message '{}' during login",
                    other as char
                )))
            }
        }
    }
    let (pid, secret) = key.unwrap_or((0, Vec::new()));
    Ok(ServerConn::new(
        stream,
        buf,
        spec.addr.clone(),
        (pid, secret),
        params,
        spec.max_prepared,
        (spec.dbname.clone(), spec.user.clone()),
    ))
}

fn scram_keys(spec: &ServerSpec, salt: &[u8], iterations: u32) -> Result<ClientKeys, ScramError> {
    if let Some(k) = spec.keys.get(salt, iterations) {
        return Ok(k);
    }
    match &spec.credential {
        Credential::Password(p) => {
            let keys = ClientKeys::from_password(p.as_bytes(), salt, iterations);
            spec.keys.learn(keys.clone());
            Ok(keys)
        }
        Credential::Scram(secret) => {
            if secret.salt != salt || secret.iterations != iterations {
                Err(ScramError::SaltMismatch)
            } else {
                Err(ScramError::Server(
                    "no client has logged in yet, so the SCRAM key for pass-through is unknown"
                        .into(),
                ))
            }
        }
        _ => Err(ScramError::Server(
            "the server asks for SCRAM; configure a password or SCRAM secret".into(),
        )),
    }
}

fn sasl_response(out: &mut BytesMut, data: &[u8]) {
    use bytes::BufMut;
    out.put_u8(b'p');
    out.put_u32((4 + data.len()) as u32);
    out.extend_from_slice(data);
}

fn password_message(out: &mut BytesMut, data: &[u8]) {
    use bytes::BufMut;
    out.put_u8(b'p');
    out.put_u32((4 + data.len() + 1) as u32);
    out.extend_from_slice(data);
    out.put_u8(0);
}
