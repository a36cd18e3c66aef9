//! The relay's prepared-statement handling: renaming client statements to shared
//! server-side ones, preparing them lazily, and PostgreSQL's errors for bad names.

use super::*;

impl Relay {
    /// The queue entry for a Parse/Bind/Describe/Close that names no prepared statement, which
    /// Sluice forwards untouched; `None` when the message needs decoding.
    pub(super) fn unnamed_passthrough(&mut self, tag: u8, raw: &[u8]) -> Option<Entry> {
        let body = raw.get(5..)?;
        match tag {
            b'P' if body.first() == Some(&0) => Some(Entry::Parse {
                swallow: false,
                server_stmt: None,
                undo: None,
            }),
            b'B' => {
                let portal_end = body.iter().position(|b| *b == 0)?;
                if body.get(portal_end + 1) != Some(&0) {
                    return None;
                }
                self.last_bind = None;
                self.bound_change = self.last_unnamed.as_ref().and_then(|u| u.change.clone());
                let at = self.batch.len().saturating_sub(1);
                Some(Entry::Bind { stmt: None, at })
            }
            b'D' if body.first() == Some(&b'P') || body.get(1) == Some(&0) => {
                let stmt = if body.first() == Some(&b'P') {
                    self.last_bind.clone()
                } else {
                    None
                };
                Some(Entry::Describe {
                    stmt,
                    at: usize::MAX,
                })
            }
            b'C' if body.first() == Some(&b'P') => Some(Entry::Close {
                swallow: false,
                evicted: None,
            }),
            _ => None,
        }
    }

    /// Makes sure `stmt` exists on the server, injecting a Parse (and an eviction Close).
    pub(super) fn ensure_prepared(
        &mut self,
        stmt: &Arc<Statement>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
    ) {
        if server.statements.touch(stmt.id) {
            return;
        }
        frontend::encode_parse(to_server, &stmt.server_name, &stmt.query, &stmt.param_types);
        self.queue.push_back(Entry::Parse {
            swallow: true,
            server_stmt: Some(stmt.id),
            undo: None,
        });
        self.record_prepared(stmt, server, to_server);
    }

    pub(super) fn record_prepared(
        &mut self,
        stmt: &Arc<Statement>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
    ) {
        if let Some((id, name)) = server.statements.insert(stmt.id, stmt.server_name.clone()) {
            frontend::encode_close(to_server, b'S', &name);
            self.queue.push_back(Entry::Close {
                swallow: true,
                evicted: Some((id, name)),
            });
        }
    }

    pub(super) fn extended(
        &mut self,
        msg: FrontendMessage,
        client: &mut ClientSide<'_>,
        server: &mut ServerConn,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) {
        match msg {
            FrontendMessage::Parse {
                name,
                query,
                param_types,
            } => {
                if name.is_empty() {
                    frontend::encode_parse(to_server, b"", &query, &param_types);
                    self.queue.push_back(Entry::Parse {
                        swallow: false,
                        server_stmt: None,
                        undo: None,
                    });
                    return;
                }
                if client.statements.contains(&name) {
                    let err = ErrorFields::error(
                        SqlState::DUPLICATE_PREPARED_STATEMENT,
                        format!(
                            "prepared statement \"{}\" already exists",
                            String::from_utf8_lossy(&name)
                        ),
                    );
                    self.fail_batch(err);
                    return;
                }
                let stmt = client.registry.get(&query, &param_types);
                let previous = client.statements.insert(name.clone(), stmt.clone());
                let undo = Some(NameUndo { name, previous });
                if server.statements.touch(stmt.id) {
                    self.push_synth(Synth::ParseComplete, undo, to_client);
                } else {
                    frontend::encode_parse(
                        to_server,
                        &stmt.server_name,
                        &stmt.query,
                        &stmt.param_types,
                    );
                    self.queue.push_back(Entry::Parse {
                        swallow: false,
                        server_stmt: Some(stmt.id),
                        undo,
                    });
                    self.record_prepared(&stmt, server, to_server);
                }
            }
            FrontendMessage::Bind {
                portal,
                statement,
                rest,
            } => {
                if statement.is_empty() {
                    frontend::encode_bind_renamed(to_server, &portal, b"", &rest);
                    self.last_bind = None;
                    let at = self.batch.len().saturating_sub(1);
                    self.queue.push_back(Entry::Bind { stmt: None, at });
                    return;
                }
                let Some(stmt) = client.statements.resolve(&statement) else {
                    self.unknown_statement(&statement);
                    return;
                };
                if stmt.is_stale() {
                    self.stale_statement();
                    return;
                }
                self.ensure_prepared(&stmt, server, to_server);
                server.dirty |= stmt.leaves_state;
                self.bound_change = stmt.session_change.clone();
                frontend::encode_bind_renamed(to_server, &portal, &stmt.server_name, &rest);
                self.last_bind = Some(stmt.clone());
                let at = self.batch.len().saturating_sub(1);
                self.queue.push_back(Entry::Bind {
                    stmt: Some(stmt),
                    at,
                });
            }
            FrontendMessage::Describe { kind, name } => {
                if kind == b'S' && !name.is_empty() {
                    let Some(stmt) = client.statements.resolve(&name) else {
                        self.unknown_statement(&name);
                        return;
                    };
                    if stmt.is_stale() {
                        self.stale_statement();
                        return;
                    }
                    self.ensure_prepared(&stmt, server, to_server);
                    frontend::encode_describe(to_server, b'S', &stmt.server_name);
                    let at = self.batch.len().saturating_sub(1);
                    self.queue.push_back(Entry::Describe {
                        stmt: Some(stmt),
                        at,
                    });
                } else {
                    frontend::encode_describe(to_server, kind, &name);
                    self.queue.push_back(Entry::Describe {
                        stmt: if kind == b'P' {
                            self.last_bind.clone()
                        } else {
                            None
                        },
                        at: usize::MAX,
                    });
                }
            }
            FrontendMessage::Close { kind, name } => {
                if kind == b'S' && !name.is_empty() {
                    // Only this client's view changes; the shared statement stays on the server.
                    let previous = client.statements.remove(&name);
                    let undo = previous.map(|p| NameUndo {
                        name,
                        previous: Some(p),
                    });
                    self.push_synth(Synth::CloseComplete, undo, to_client);
                } else {
                    frontend::encode_close(to_server, kind, &name);
                    self.queue.push_back(Entry::Close {
                        swallow: false,
                        evicted: None,
                    });
                }
            }
            other => other.encode(to_server),
        }
    }

    /// The client's statement was prepared before DDL changed its result: PostgreSQL's error,
    /// until the client prepares it again.
    pub(super) fn stale_statement(&mut self) {
        let err = ErrorFields::error(
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        )
        .with_hint("prepare the statement again");
        self.fail_batch(err);
    }

    pub(super) fn unknown_statement(&mut self, name: &[u8]) {
        let err = ErrorFields::error(
            SqlState::INVALID_SQL_STATEMENT_NAME,
            format!(
                "prepared statement \"{}\" does not exist",
                String::from_utf8_lossy(name)
            ),
        );
        self.fail_batch(err);
    }
}
