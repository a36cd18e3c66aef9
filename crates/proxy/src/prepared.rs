//! Prepared statements in transaction mode.
//!
//! A client names statements as it likes; Sluice shares one server-side statement per distinct
//! query text and parameter types across all clients (`__sluice_<id>`), prepares it lazily on
//! whichever server connection a client lands on, and keeps a bounded LRU per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;

/// One server-side statement, shared by every client that prepared the same text and types.
#[derive(Debug)]
pub struct Statement {
    /// Process-unique id.
    pub id: u64,
    /// The name used on server connections.
    pub server_name: Bytes,
    /// Query text.
    pub query: Bytes,
    /// Parameter type OIDs as the client gave them.
    pub param_types: Vec<u32>,
    /// Running it leaves session state that Sluice does not track: the session is reset
    /// afterwards (`sluice_wire::sql::leaves_session_state`).
    pub leaves_state: bool,
    /// It is one session SET, which Sluice tracks for the client that runs it.
    pub session_change: Option<crate::relay::SessionChange>,
    /// Set when the server said its cached plan is invalid: clients move to a fresh statement.
    stale: AtomicBool,
}

impl Statement {
    /// Whether this statement was invalidated.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }
}

type ContentKey = (Bytes, Vec<u32>);

/// The process-wide map from statement content to server-side statement.
#[derive(Debug, Default)]
pub struct Registry {
    by_content: DashMap<ContentKey, Arc<Statement>>,
    next_id: AtomicU64,
}

impl Registry {
    /// The statement for this content, created on first use.
    pub fn get(&self, query: &Bytes, param_types: &[u32]) -> Arc<Statement> {
        let key = (query.clone(), param_types.to_vec());
        if let Some(s) = self.by_content.get(&key) {
            if !s.is_stale() {
                return s.clone();
            }
        }
        let mut entry = self
            .by_content
            .entry(key)
            .or_insert_with(|| self.fresh(query, param_types));
        if entry.is_stale() {
            *entry = self.fresh(query, param_types);
        }
        entry.clone()
    }

    fn fresh(&self, query: &Bytes, param_types: &[u32]) -> Arc<Statement> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (leaves_state, session_change) = crate::relay::scan_statement(query);
        Arc::new(Statement {
            id,
            server_name: Bytes::from(format!("__sluice_{id}")),
            query: query.clone(),
            param_types: param_types.to_vec(),
            leaves_state,
            session_change,
            stale: AtomicBool::new(false),
        })
    }

    /// Marks a statement invalid: its next user gets a fresh server-side statement.
    pub fn invalidate(&self, stmt: &Statement) {
        stmt.stale.store(true, Ordering::Relaxed);
    }

    /// Drops statements no client refers to any more.
    pub fn collect_garbage(&self) {
        self.by_content
            .retain(|_, s| Arc::strong_count(s) > 1 && !s.is_stale());
    }

    /// Number of distinct statements known.
    pub fn len(&self) -> usize {
        self.by_content.len()
    }

    /// Whether no statement is known.
    pub fn is_empty(&self) -> bool {
        self.by_content.is_empty()
    }
}

/// One client's statement names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    names: HashMap<Bytes, Arc<Statement>>,
}

impl ClientStatements {
    /// Looks a name up. The statement may be stale: the caller reports that as PostgreSQL does.
    pub fn resolve(&self, name: &[u8]) -> Option<Arc<Statement>> {
        self.names.get(name).cloned()
    }

    /// Points every name bound to `stale` at a fresh statement of the same content (the client
    /// is about to learn the new result shape).
    pub fn refresh(&mut self, stale: &Statement, registry: &Registry) {
        let mut fresh = None;
        for s in self.names.values_mut() {
            if s.id == stale.id {
                let f = fresh.get_or_insert_with(|| registry.get(&stale.query, &stale.param_types));
                *s = f.clone();
            }
        }
    }

    /// Whether the client has this name.
    pub fn contains(&self, name: &[u8]) -> bool {
        self.names.contains_key(name)
    }

    /// Binds a name; returns what it replaced.
    pub fn insert(&mut self, name: Bytes, stmt: Arc<Statement>) -> Option<Arc<Statement>> {
        self.names.insert(name, stmt)
    }

    /// Unbinds a name; returns what it was.
    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.names.remove(name)
    }

    /// Unbinds everything (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        self.names.clear();
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the client has no statements.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The statements prepared on one server connection, as a bounded LRU.
#[derive(Debug)]
pub struct ServerStatements {
    cap: usize,
    tick: u64,
    live: HashMap<u64, (u64, Bytes)>,
    /// Server-side names to close at the next chance (invalidated statements).
    pub orphans: Vec<Bytes>,
}

impl ServerStatements {
    /// An empty cache of capacity `cap` (at least 1).
    pub fn new(cap: usize) -> Self {
        ServerStatements {
            cap: cap.max(1),
            tick: 0,
            live: HashMap::new(),
            orphans: Vec::new(),
        }
    }

    /// Whether `id` is prepared here; marks it recently used.
    pub fn touch(&mut self, id: u64) -> bool {
        self.tick += 1;
        match self.live.get_mut(&id) {
            Some(e) => {
                e.0 = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `id` as prepared; returns the least recently used entry to close if over capacity.
    pub fn insert(&mut self, id: u64, name: Bytes) -> Option<(u64, Bytes)> {
        self.tick += 1;
        self.live.insert(id, (self.tick, name));
        if self.live.len() <= self.cap {
            return None;
        }
        let (&victim, _) = self.live.iter().min_by_key(|(_, (t, _))| *t)?;
        self.live.remove(&victim).map(|(_, n)| (victim, n))
    }

    /// Forgets `id` (its Parse failed or it was closed).
    pub fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }

    /// Re-adds an entry whose Close was skipped by an error.
    pub fn restore(&mut self, id: u64, name: Bytes) {
        self.live.insert(id, (0, name));
    }

    /// Forgets every statement (the server session was reset).
    pub fn clear(&mut self) {
        self.live.clear();
        self.orphans.clear();
    }

    /// Number of statements prepared here.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether nothing is prepared here.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_content_shares_one_server_statement() {
        let r = Registry::default();
        let a = r.get(&Bytes::from_static(b"select 1"), &[]);
        let b = r.get(&Bytes::from_static(b"select 1"), &[]);
        let c = r.get(&Bytes::from_static(b"select 1"), &[23]);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn an_invalidated_statement_is_replaced_for_its_clients() {
        let r = Registry::default();
        let mut client = ClientStatements::default();
        let s = r.get(&Bytes::from_static(b"select * from t"), &[]);
        client.insert(Bytes::from_static(b"s1"), s.clone());
        r.invalidate(&s);
        assert!(
            client.resolve(b"s1").unwrap().is_stale(),
            "the client keeps its stale view"
        );
        client.refresh(&s, &r);
        let fresh = client.resolve(b"s1").unwrap();
        assert_ne!(fresh.id, s.id);
        assert_ne!(fresh.server_name, s.server_name);
        assert_eq!(
            r.get(&s.query, &[]).id,
            fresh.id,
            "new clients share the fresh one"
        );
    }

    #[test]
    fn the_server_lru_evicts_the_least_recently_used() {
        let mut s = ServerStatements::new(2);
        assert!(s.insert(1, Bytes::from_static(b"a")).is_none());
        assert!(s.insert(2, Bytes::from_static(b"b")).is_none());
        assert!(s.touch(1));
        let evicted = s.insert(3, Bytes::from_static(b"c")).unwrap();
        assert_eq!(evicted.0, 2);
        assert!(s.touch(1) && s.touch(3) && !s.touch(2));
    }
}
