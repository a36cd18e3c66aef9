//! The set of server pools, one per (database, user), created on first use and reconfigured on
//! reload. Shared caps (`max_db_connections`, `max_user_connections`) span the pools.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use foldhash::fast::RandomState;
use parking_lot::{Mutex, RwLock};

use sluice_config::{Config, Secret};
use sluice_pool::{ClassSpec, Pool, PoolSettings, SharedLimit};

use sluice_wire::backend;

use crate::params::{ClientParams, Wishes};
use crate::server::{Credential, KeyCache, ServerAddr, ServerConnector, ServerSpec};

/// A pool of server connections.
pub type ServerPool = Pool<ServerConnector>;

/// The server's ParameterStatus values (canonical name, value), sorted, as sent to a new client.
pub type Welcome = Vec<(String, String)>;

/// One pool with what clients need to log in through it.
pub struct PoolEntry {
    /// The pool.
    pub pool: ServerPool,
    /// Database name (config key).
    pub db: String,
    /// Client user name.
    pub user: String,
    /// ParameterStatus values of the server, shown to clients at login.
    pub welcome: RwLock<Option<Arc<Welcome>>>,
    /// Startup parameter values the server already accepted: (lowercase name, raw) -> normalised.
    pub validated: Mutex<HashMap<(String, String), Option<String>>>,
    /// The last ParameterStatus block sent at login, for the next client with the same
    /// wishes: clients of one application log in with equal (shared) parameters.
    greeting: Mutex<Option<Greeting>>,
}

/// ParameterStatus messages for one welcome and one set of client wishes.
struct Greeting {
    welcome: Arc<Welcome>,
    wishes: Arc<Wishes>,
    encoded: Bytes,
}

impl PoolEntry {
    /// Appends the ParameterStatus messages a client with `params` sees at login: the server's
    /// values, with the client's own where it asked for one.
    pub fn encode_parameter_status(&self, params: &ClientParams, out: &mut BytesMut) {
        let Some(welcome) = self.welcome.read().clone() else {
            return;
        };
        let mut greeting = self.greeting.lock();
        if let Some(g) = &*greeting {
            if Arc::ptr_eq(&g.welcome, &welcome) && Arc::ptr_eq(&g.wishes, params.wishes()) {
                out.extend_from_slice(&g.encoded);
                return;
            }
        }
        let mut encoded = BytesMut::new();
        for (k, v) in welcome.iter() {
            let mine = params.get(k);
            let value = if k == "application_name" {
                mine.unwrap_or("")
            } else {
                mine.unwrap_or(v)
            };
            backend::encode_parameter_status(&mut encoded, k, value);
        }
        out.extend_from_slice(&encoded);
        *greeting = Some(Greeting {
            welcome,
            wishes: params.wishes().clone(),
            encoded: encoded.freeze(),
        });
    }
}

/// All pools.
#[derive(Default)]
pub struct PoolSet {
    pools: DashMap<(String, String), Arc<PoolEntry>, RandomState>,
    db_limits: DashMap<String, Arc<SharedLimit>, RandomState>,
    user_limits: DashMap<String, Arc<SharedLimit>, RandomState>,
    keys: DashMap<String, Arc<KeyCache>, RandomState>,
}

/// The scheduling classes of a config, in config order.
pub fn class_specs(cfg: &Config) -> Vec<ClassSpec> {
    let mut v: Vec<ClassSpec> = cfg
        .classes
        .iter()
        .map(|c| ClassSpec {
            name: Arc::from(c.name.as_str()),
            priority: c.priority,
            max_active: c.max_active,
            reserved: c.reserved,
            max_wait: c.max_wait,
        })
        .collect();
    // The default class first: unknown class indexes fall back to index 0.
    if let Some(pos) = v
        .iter()
        .position(|c| *c.name == *cfg.scheduler.default_class)
    {
        let d = v.remove(pos);
        v.insert(0, d);
    }
    v
}

fn settings(cfg: &Config, db: &str, user: &str) -> PoolSettings {
    let g = &cfg.sluice;
    let d = cfg.databases.get(db);
    PoolSettings {
        name: Arc::from(format!("{db}.{user}")),
        size: cfg.pool_size(db, user),
        min_size: d.and_then(|d| d.min_pool_size).unwrap_or(g.min_pool_size),
        idle_timeout: g.server_idle_timeout,
        lifetime: d
            .and_then(|d| d.server_lifetime)
            .unwrap_or(g.server_lifetime),
        wait_timeout: cfg.query_wait_timeout(db, user),
        login_retry: g.server_login_retry,
        classes: class_specs(cfg),
        aging_per_sec: cfg.scheduler.aging_per_sec,
    }
}

impl PoolSet {
    /// The SCRAM key cache of a server role.
    pub fn keys(&self, role: &str) -> Arc<KeyCache> {
        self.keys.entry(role.to_string()).or_default().clone()
    }

    fn spec(&self, cfg: &Config, db: &str, user: &str) -> Option<ServerSpec> {
        let d = cfg.databases.get(db)?;
        let u = cfg.users.get(user);
        let (role, credential) = match (&d.user, &d.password) {
            (Some(forced), Some(p)) => (forced.clone(), Credential::Password(p.clone())),
            (Some(forced), None) => {
                let cred = cfg
                    .users
                    .get(forced)
                    .and_then(|fu| fu.password.as_ref())
                    .map_or(Credential::None, credential_of);
                (forced.clone(), cred)
            }
            (None, _) => (
                user.to_string(),
                u.and_then(|u| u.password.as_ref())
                    .map_or(Credential::None, credential_of),
            ),
        };
        Some(ServerSpec {
            addr: ServerAddr {
                host: d.host.clone(),
                port: d.port,
            },
            dbname: d.dbname.clone(),
            keys: self.keys(&role),
            user: role,
            credential,
            connect_timeout: cfg.sluice.server_connect_timeout,
            max_prepared: cfg.sluice.max_prepared_statements.max(1) as usize,
            keepalive: cfg.sluice.tcp_keepalive,
        })
    }

    fn limits(&self, cfg: &Config, db: &str, user: &str) -> Vec<Arc<SharedLimit>> {
        let mut v = Vec::new();
        let dmax = cfg
            .databases
            .get(db)
            .and_then(|d| d.max_db_connections)
            .unwrap_or(cfg.sluice.max_db_connections);
        let umax = cfg
            .users
            .get(user)
            .and_then(|u| u.max_user_connections)
            .unwrap_or(cfg.sluice.max_user_connections);
        let dl = self
            .db_limits
            .entry(db.to_string())
            .or_insert_with(|| SharedLimit::new(format!("db {db}"), dmax))
            .clone();
        dl.set_max(dmax);
        v.push(dl);
        let ul = self
            .user_limits
            .entry(user.to_string())
            .or_insert_with(|| SharedLimit::new(format!("user {user}"), umax))
            .clone();
        ul.set_max(umax);
        v.push(ul);
        v
    }

    /// The pool for (db, user), created if needed. `None` if the database is not configured.
    pub fn get(&self, cfg: &Config, db: &str, user: &str) -> Option<Arc<PoolEntry>> {
        let key = (db.to_string(), user.to_string());
        if let Some(p) = self.pools.get(&key) {
            return Some(p.clone());
        }
        let spec = self.spec(cfg, db, user)?;
        let limits = self.limits(cfg, db, user);
        let entry = self.pools.entry(key).or_insert_with(|| {
            Arc::new(PoolEntry {
                pool: Pool::new(settings(cfg, db, user), ServerConnector::new(spec), limits),
                db: db.to_string(),
                user: user.to_string(),
                welcome: RwLock::new(None),
                validated: Mutex::new(HashMap::new()),
                greeting: Mutex::new(None),
            })
        });
        Some(entry.clone())
    }

    /// Every pool.
    pub fn all(&self) -> Vec<Arc<PoolEntry>> {
        self.pools.iter().map(|e| e.value().clone()).collect()
    }

    /// Applies a new config: pools of removed databases or users close, the rest get new
    /// settings and server specs (new connections use them; a changed server closes old ones).
    pub fn reconfigure(&self, cfg: &Config) {
        let mut gone = Vec::new();
        for e in self.pools.iter() {
            let (db, user) = e.key();
            match self.spec(cfg, db, user) {
                Some(spec)
                    if cfg.users.contains_key(user)
                        || cfg.sluice.auth_type == sluice_config::AuthType::Trust =>
                {
                    let old = e.pool.connector().spec();
                    let moved =
                        old.addr != spec.addr || old.dbname != spec.dbname || old.user != spec.user;
                    e.pool.connector().set_spec(spec);
                    e.pool.reconfigure(settings(cfg, db, user));
                    self.limits(cfg, db, user);
                    if moved {
                        e.pool.reconnect();
                        *e.welcome.write() = None;
                    }
                }
                _ => gone.push(e.key().clone()),
            }
        }
        for key in gone {
            if let Some((_, e)) = self.pools.remove(&key) {
                e.pool.close();
            }
        }
    }

    /// Runs periodic upkeep on every pool.
    pub fn maintain(&self) {
        for e in self.pools.iter() {
            e.pool.maintain();
        }
    }
}

fn credential_of(s: &Secret) -> Credential {
    if let Some(p) = s.plaintext() {
        return Credential::Password(p.to_string());
    }
    if let Some(scram) = s.scram() {
        return Credential::Scram(scram.clone());
    }
    match s.md5_hash("") {
        Some(h) => Credential::Md5(h.into_owned()),
        None => Credential::None,
    }
}
