//! Sluice started in-process on `127.0.0.1:0` in front of a [`PgCluster`].
//!
//! [`ConfigBuilder`] renders a TOML config with test defaults, parsed by
//! `sluice_config::Config::parse` exactly as the binary parses a file, so tests exercise the real
//! config path. [`SluiceHandle`] owns the running proxy and hands out clients.
//!
//! Each Sluice runs as the binary runs it: on a runtime of its own, on its own thread, with
//! tokio's IO driver only and the clock hook installed. A tokio timer left anywhere in Sluice
//! panics there, and any panic on that thread fails the test at shutdown.
//!
//! ```ignore
//! let pg = PgCluster::shared();
//! let sluice = SluiceHandle::start(ConfigBuilder::new(pg).pool_size(2)).await;
//! let client = sluice.connect("app", "appdb").await;
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use sluice_config::Config;
use sluice_policy::PolicyEngine;
use sluice_proxy::{Proxy, Running, ShutdownMode};

use super::postgres::PgCluster;
use super::raw::RawClient;
use super::roles::{self, Auth, Login};

/// How long a graceful [`SluiceHandle::shutdown`] may take before the test fails.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Renders a Sluice TOML config for tests.
///
/// Defaults: listen on `127.0.0.1:0`, `default_pool_size = 5`, `max_client_conn = 1000`;
/// databases `appdb` and `otherdb` on the cluster; users `app` (scram-sha-256), `md5user` (md5),
/// `trusted` (trust) and `scram_only` (scram-sha-256) with the passwords of [`roles`].
///
/// Values given to [`set`](Self::set) and friends are raw TOML (`"5"`, `"\"30s\""`, `"[\"a\"]"`);
/// the `*_str` variants quote a string for you. [`append`](Self::append) adds whole tables
/// (`[classes.web]`, `[policy]`, `[[policy.plugins]]`) after the generated ones.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    general: BTreeMap<String, String>,
    databases: BTreeMap<String, BTreeMap<String, String>>,
    users: BTreeMap<String, BTreeMap<String, String>>,
    /// Clear-text passwords clients use to log in through Sluice, by user.
    client_passwords: BTreeMap<String, Option<String>>,
    extra: String,
}

impl ConfigBuilder {
    /// Test defaults pointing at `cluster`.
    pub fn new(cluster: &PgCluster) -> Self {
        Self::for_server(cluster.host(), cluster.port())
    }

    /// Test defaults pointing at a PostgreSQL server at `host:port` with the harness's roles.
    pub fn for_server(host: &str, port: u16) -> Self {
        let mut b = ConfigBuilder {
            general: BTreeMap::new(),
            databases: BTreeMap::new(),
            users: BTreeMap::new(),
            client_passwords: BTreeMap::new(),
            extra: String::new(),
        };
        b = b
            .set("listen_addr", "[\"127.0.0.1\"]")
            .set("listen_port", "0")
            .set("default_pool_size", "5")
            .set("max_client_conn", "1000");
        for db in roles::DATABASES {
            b = b
                .database_set(db, "host", &toml_str(host))
                .database_set(db, "port", &port.to_string())
                .database_set(db, "dbname", &toml_str(db));
        }
        for login in roles::ALL {
            b = b.login(login);
        }
        b
    }

    /// Sets a key of `[sluice]` to a raw TOML value.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.general.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets a key of `[sluice]` to a string.
    pub fn set_str(self, key: &str, value: &str) -> Self {
        self.set(key, &toml_str(value))
    }

    /// Removes a key of `[sluice]` (back to Sluice's own default).
    pub fn unset(mut self, key: &str) -> Self {
        self.general.remove(key);
        self
    }

    /// `default_pool_size`.
    pub fn pool_size(self, n: u32) -> Self {
        self.set("default_pool_size", &n.to_string())
    }

    /// Adds (or keeps) database `name` routed to `dbname` on the same server as `appdb`.
    pub fn database(mut self, name: &str, dbname: &str) -> Self {
        let template = self.databases.get("appdb").cloned().unwrap_or_default();
        let entry = self.databases.entry(name.to_owned()).or_insert(template);
        entry.insert("dbname".to_owned(), toml_str(dbname));
        self
    }

    /// Sets a key of `[databases.NAME]` to a raw TOML value (creating the table if needed).
    pub fn database_set(mut self, name: &str, key: &str, value: &str) -> Self {
        self.databases
            .entry(name.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Removes `[databases.NAME]`.
    pub fn without_database(mut self, name: &str) -> Self {
        self.databases.remove(name);
        self
    }

    /// Adds user `name` whose config `password` is its clear-text password (if any).
    pub fn user(self, name: &str, password: Option<&str>, auth: Auth) -> Self {
        let mut b = self.user_set(name, "auth_type", &toml_str(auth.toml_name()));
        if let Some(pw) = password {
            b = b.user_set(name, "password", &toml_str(pw));
        }
        b.client_passwords
            .insert(name.to_owned(), password.map(str::to_owned));
        b
    }

    /// Adds user `name` whose config `password` is a stored verifier (`SCRAM-SHA-256$...` or
    /// `md5...`, e.g. from [`PgCluster::scram_secret`]), while clients log in with
    /// `client_password`.
    pub fn user_with_secret(
        self,
        name: &str,
        secret: &str,
        client_password: &str,
        auth: Auth,
    ) -> Self {
        let mut b = self
            .user_set(name, "auth_type", &toml_str(auth.toml_name()))
            .user_set(name, "password", &toml_str(secret));
        b.client_passwords
            .insert(name.to_owned(), Some(client_password.to_owned()));
        b
    }

    /// Adds one of the harness's roles with its password and auth type.
    pub fn login(self, login: Login) -> Self {
        self.user(login.user, login.password, login.auth)
    }

    /// Sets a key of `[users.NAME]` to a raw TOML value (creating the table if needed).
    pub fn user_set(mut self, name: &str, key: &str, value: &str) -> Self {
        self.users
            .entry(name.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_owned());
        self
    }

    /// Removes `[users.NAME]`.
    pub fn without_user(mut self, name: &str) -> Self {
        self.users.remove(name);
        self.client_passwords.remove(name);
        self
    }

    /// Appends raw TOML after the generated tables.
    pub fn append(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// The clear-text password a client uses for `user` (falls back to the harness's roles).
    pub fn client_password(&self, user: &str) -> Option<String> {
        match self.client_passwords.get(user) {
            Some(pw) => pw.clone(),
            None => roles::password_for(user).map(str::to_owned),
        }
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("[sluice]\n");
        for (k, v) in &self.general {
            out.push_str(&format!("{k} = {v}\n"));
        }
        for (section, tables) in [("databases", &self.databases), ("users", &self.users)] {
            for (name, keys) in tables {
                out.push_str(&format!("\n[{section}.{}]\n", toml_key(name)));
                for (k, v) in keys {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
        }
        out.push_str(&self.extra);
        out
    }

    /// Parses the rendered TOML with `Config::parse`, as the binary does.
    pub fn build(&self) -> Result<Config> {
        let text = self.to_toml();
        Config::parse(&text, None)
            .map_err(|e| anyhow!("config rejected: {e}\n--- config ---\n{text}"))
    }
}

/// Sluice running in-process. Dropping it without [`shutdown`](Self::shutdown) asks for a fast
/// shutdown; its tasks end with the test's runtime at the latest.
pub struct SluiceHandle {
    running: Option<Running>,
    addr: SocketAddr,
    builder: Option<ConfigBuilder>,
    /// The name of the thread Sluice runs on, to look for its panics.
    thread: String,
}

impl std::fmt::Debug for SluiceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SluiceHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SluiceHandle {
    /// Starts Sluice with `builder`'s config; panics (failing the test) if it can't.
    pub async fn start(builder: ConfigBuilder) -> SluiceHandle {
        match Self::try_start(builder).await {
            Ok(h) => h,
            Err(e) => panic!("could not start Sluice: {e:#}"),
        }
    }

    /// Starts Sluice with the default config in front of the shared cluster.
    pub async fn start_default() -> SluiceHandle {
        Self::start(ConfigBuilder::new(PgCluster::shared())).await
    }

    /// Starts Sluice with `builder`'s config.
    pub async fn try_start(builder: ConfigBuilder) -> Result<SluiceHandle> {
        let config = builder.build()?;
        let mut handle = Self::try_start_config(config).await?;
        handle.builder = Some(builder);
        Ok(handle)
    }

    /// Starts Sluice with an already-built config. [`connect`](Self::connect) then knows only
    /// the passwords of the harness's roles.
    pub async fn try_start_config(config: Config) -> Result<SluiceHandle> {
        super::init_tracing();
        let policy = policy_for(&config)?;
        let (running, thread) = start_on_own_runtime(config, policy).await?;
        let addr = running.local_addr();
        Ok(SluiceHandle {
            running: Some(running),
            addr,
            builder: None,
            thread,
        })
    }

    /// Where Sluice listens (`127.0.0.1:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port Sluice listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The running proxy, for APIs the handle doesn't wrap (e.g. `metrics_addr`).
    pub fn running(&self) -> &Running {
        match self.running.as_ref() {
            Some(r) => r,
            None => panic!("Sluice has been shut down"),
        }
    }

    /// The builder this instance was started (or last reloaded) with, if any.
    pub fn builder(&self) -> Option<&ConfigBuilder> {
        self.builder.as_ref()
    }

    fn password(&self, user: &str) -> Option<String> {
        match &self.builder {
            Some(b) => b.client_password(user),
            None => roles::password_for(user).map(str::to_owned),
        }
    }

    /// A tokio-postgres config for `user`@`db` through Sluice, with the user's known password.
    pub fn pg_config(&self, user: &str, db: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.port())
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        if let Some(pw) = self.password(user) {
            cfg.password(pw);
        }
        cfg
    }

    /// A `postgres://` URL for `user`@`db` through Sluice (for drivers and psql).
    pub fn url(&self, user: &str, db: &str) -> String {
        match self.password(user) {
            Some(pw) => format!("postgres://{user}:{pw}@127.0.0.1:{}/{db}", self.port()),
            None => format!("postgres://{user}@127.0.0.1:{}/{db}", self.port()),
        }
    }

    /// The `SLUICE_*` environment the programs in `tests/drivers/` read.
    pub fn driver_env(&self, user: &str, db: &str) -> Vec<(String, String)> {
        vec![
            ("SLUICE_HOST".into(), "127.0.0.1".into()),
            ("SLUICE_PORT".into(), self.port().to_string()),
            ("SLUICE_USER".into(), user.into()),
            (
                "SLUICE_PASSWORD".into(),
                self.password(user).unwrap_or_default(),
            ),
            ("SLUICE_DB".into(), db.into()),
        ]
    }

    /// Connects through Sluice with tokio-postgres and spawns the connection task.
    /// Panics (failing the test) if the login fails.
    pub async fn connect(&self, user: &str, db: &str) -> tokio_postgres::Client {
        match self.try_connect_with(self.pg_config(user, db)).await {
            Ok(c) => c,
            Err(e) => panic!(
                "connect as {user} to {db} through Sluice at {}: {e:#}",
                self.addr
            ),
        }
    }

    /// Connects with an explicit password (`None`: none), returning the driver's error.
    pub async fn try_connect(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.port())
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        if let Some(pw) = password {
            cfg.password(pw);
        }
        self.try_connect_with(cfg).await
    }

    /// Connects with a custom config (application_name, options...).
    pub async fn try_connect_with(
        &self,
        cfg: tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            // Errors surface on the client's next call.
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A raw TCP connection to Sluice for wire-level tests (nothing sent yet).
    pub async fn raw(&self) -> RawClient {
        match RawClient::connect(self.addr).await {
            Ok(c) => c,
            Err(e) => panic!("raw connect to {}: {e:#}", self.addr),
        }
    }

    /// Reloads with a new builder's config (as SIGHUP would).
    pub async fn reload(&mut self, builder: ConfigBuilder) -> Result<()> {
        let config = builder.build()?;
        self.reload_config(config).await?;
        self.builder = Some(builder);
        Ok(())
    }

    /// Reloads with raw TOML text.
    pub async fn reload_toml(&self, toml: &str) -> Result<()> {
        let config = Config::parse(toml, None).map_err(|e| anyhow!("config rejected: {e}"))?;
        self.reload_config(config).await
    }

    /// Reloads with an already-built config.
    pub async fn reload_config(&self, config: Config) -> Result<()> {
        self.running()
            .reload(config)
            .await
            .map_err(|e| anyhow!("reload: {e}"))
    }

    /// Takes the running proxy out of the handle, for tests that start a shutdown, keep using
    /// clients while it drains, and then await [`Running::wait`] themselves.
    pub fn into_running(mut self) -> Running {
        match self.running.take() {
            Some(r) => r,
            None => panic!("Sluice has been shut down"),
        }
    }

    /// Graceful shutdown (as SIGTERM): stop accepting, drain, and wait for every task, bounded.
    pub async fn shutdown(self) {
        self.shutdown_with(ShutdownMode::Graceful).await;
    }

    /// Shutdown in the given mode, waiting (bounded) until every task has finished.
    pub async fn shutdown_with(mut self, mode: ShutdownMode) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.shutdown(mode);
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, running.wait())
            .await
            .is_err()
        {
            panic!("Sluice did not finish within {SHUTDOWN_TIMEOUT:?} of shutdown");
        }
        self.assert_no_panic();
    }

    /// Fails the test if code on Sluice's thread panicked. Tokio catches a task's panic and
    /// the runtime goes on, so a client may not notice; the panic hook does.
    pub fn assert_no_panic(&self) {
        let panicked = PANICKED.lock().map(|p| p.contains(&self.thread));
        assert!(
            matches!(panicked, Ok(false)),
            "Sluice panicked (on thread {}; its message is above)",
            self.thread
        );
    }
}

impl Drop for SluiceHandle {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown(ShutdownMode::Fast);
        }
        if !std::thread::panicking() {
            self.assert_no_panic();
        }
    }
}

/// The threads of in-process Sluices on which a panic happened.
static PANICKED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// The prefix of the names of the threads Sluice runs on.
const THREAD_PREFIX: &str = "sluice-under-test-";

/// Starts Sluice on a new thread with a current-thread runtime built as the binary builds its
/// runtime (no time driver). The thread runs until Sluice's tasks have all ended after a
/// shutdown. Returns the running proxy and the thread's name.
async fn start_on_own_runtime(
    config: Config,
    policy: Arc<PolicyEngine>,
) -> Result<(Running, String)> {
    static HOOK: Once = Once::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(name) = std::thread::current().name() {
                if name.starts_with(THREAD_PREFIX) {
                    if let Ok(mut p) = PANICKED.lock() {
                        p.insert(name.to_owned());
                    }
                }
            }
            previous(info);
        }));
    });
    let name = format!("{THREAD_PREFIX}{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .on_thread_unpark(sluice_pool::clock::on_unpark)
                .build();
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow!("Sluice's runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                match Proxy::start(config, policy).await {
                    Ok(running) => {
                        let shared = running.shared().clone();
                        if tx.send(Ok(running)).is_ok() {
                            shared.tracker.wait().await;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!("Proxy::start: {e}")));
                    }
                }
            });
        })
        .context("spawning Sluice's thread")?;
    let running = rx
        .await
        .map_err(|_| anyhow!("Sluice's thread ended before Sluice started"))??;
    Ok((running, name))
}

/// The policy engine for `config`: empty without plugins, else the configured plugins.
fn policy_for(config: &Config) -> Result<Arc<PolicyEngine>> {
    if config.policy.plugins.is_empty() {
        return Ok(PolicyEngine::empty());
    }
    let classes: Vec<String> = config.classes.iter().map(|c| c.name.clone()).collect();
    PolicyEngine::new(&config.policy, &classes).map_err(|e| anyhow!("load policy plugins: {e}"))
}

/// Where a plugin built by `scripts/test.sh` lives:
/// `$SLUICE_PLUGINS_DIR/NAME.wasm`, else `plugins/target/wasm32-wasip2/release/NAME.wasm`.
/// Fails with a hint when it hasn't been built.
pub fn plugin_path(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("SLUICE_PLUGINS_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("plugins/target/wasm32-wasip2/release"),
    };
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    if !path.exists() {
        return Err(anyhow!(
            "plugin {} not built; run `cd plugins && cargo build --release --target wasm32-wasip2`",
            path.display()
        ))
        .context("plugin_path");
    }
    Ok(path)
}

/// This crate's directory, read at run time (cargo sets it for tests): the compile-time value
/// is stale when a shared target dir holds a binary built from another checkout.
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .into()
}

/// The repository root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let tests = crate_dir();
    tests.parent().map(PathBuf::from).unwrap_or(tests)
}

/// A TOML basic string. JSON's string escapes are a subset of TOML's.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{}\"", s.escape_default()))
}

/// A TOML key: bare when it can be, quoted otherwise.
fn toml_key(s: &str) -> String {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        s.to_owned()
    } else {
        toml_str(s)
    }
}
