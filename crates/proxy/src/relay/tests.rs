//! Relay tests without PostgreSQL: client messages in, bytes to the server and client out.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use sluice_wire::backend::{self, TransactionStatus};
use sluice_wire::frontend::{self, FrontendMessage};
use sluice_wire::{ErrorFields, SqlState};

use super::*;
use crate::params::ClientParams;
use crate::prepared::{ClientStatements, Registry};
use crate::server::{ServerAddr, ServerConn};
use crate::stream::Stream;

fn server(cap: usize) -> ServerConn {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt.block_on(async { tokio::net::UnixStream::from_std(a).unwrap() });
    std::mem::forget(rt);
    ServerConn::new(
        Stream::Unix(stream),
        BytesMut::new(),
        ServerAddr {
            host: "/tmp".into(),
            port: 5432,
        },
        (1, vec![0; 4]),
        HashMap::new(),
        cap,
        ("db".into(), "u".into()),
    )
}

struct Client {
    statements: ClientStatements,
    params: ClientParams,
}

/// Feeds client messages; returns (bytes to server, bytes to client).
fn send(
    relay: &mut Relay,
    c: &mut Client,
    reg: &Registry,
    s: &mut ServerConn,
    msgs: &[FrontendMessage],
) -> (Vec<u8>, Vec<u8>) {
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    for m in msgs {
        let mut raw = BytesMut::new();
        m.encode(&mut raw);
        let header = frontend::peek_header(&raw).unwrap().unwrap();
        let mut side = ClientSide {
            statements: &mut c.statements,
            params: &mut c.params,
            registry: reg,
        };
        let status = s.status;
        relay.client_message(
            header,
            &raw,
            &mut side,
            s,
            &mut to_server,
            &mut to_client,
            status,
        );
    }
    (to_server.to_vec(), to_client.to_vec())
}

/// Feeds server output; returns bytes to the client.
fn answer(
    relay: &mut Relay,
    c: &mut Client,
    reg: &Registry,
    s: &mut ServerConn,
    out: BytesMut,
) -> Vec<u8> {
    s.rbuf.extend_from_slice(&out);
    let mut to_client = BytesMut::new();
    let mut side = ClientSide {
        statements: &mut c.statements,
        params: &mut c.params,
        registry: reg,
    };
    relay
        .server_output(&mut side, s, &mut to_client, 1 << 20)
        .unwrap();
    to_client.to_vec()
}

/// The message tags in a byte stream.
fn tags(mut b: &[u8]) -> String {
    let mut t = String::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        t.push(b[0] as char);
        b = &b[1 + len..];
    }
    t
}

fn parse(name: &str, q: &str) -> FrontendMessage {
    FrontendMessage::Parse {
        name: Bytes::from(name.to_string()),
        query: Bytes::from(q.to_string()),
        param_types: vec![],
    }
}

fn bind(stmt: &str) -> FrontendMessage {
    FrontendMessage::Bind {
        portal: Bytes::new(),
        statement: Bytes::from(stmt.to_string()),
        rest: Bytes::from_static(&[0, 0, 0, 0, 0, 0]),
    }
}

fn exec() -> FrontendMessage {
    FrontendMessage::Execute {
        portal: Bytes::new(),
        max_rows: 0,
    }
}

/// What the server answers to the DO block Sluice sends at a Sync to raise `code`: the
/// injected Parse and Bind complete, the block raises, and the Sync ends the batch.
fn raised(code: SqlState, message: &str, status: TransactionStatus) -> BytesMut {
    let mut out = BytesMut::new();
    backend::encode_parse_complete(&mut out);
    backend::encode_bind_complete(&mut out);
    backend::encode_error(&mut out, &ErrorFields::error(code, message));
    out.extend_from_slice(&z(status));
    out
}

fn z(status: TransactionStatus) -> BytesMut {
    let mut b = BytesMut::new();
    backend::encode_ready_for_query(&mut b, status);
    b
}

fn client() -> Client {
    Client {
        statements: ClientStatements::default(),
        params: ClientParams::default(),
    }
}

#[test]
fn a_simple_query_holds_the_server_until_ready_for_query_idle() {
    let (reg, mut c, mut s, mut r) = (Registry::default(), client(), server(10), Relay::default());
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[FrontendMessage::Query {
            sql: Bytes::from_static(b"begin"),
        }],
    );
    assert_eq!(tags(&up), "Q");
    assert!(!r.done(&s));
    let mut out = BytesMut::new();
    backend::encode_command_complete(&mut out, "BEGIN");
    out.extend_from_slice(&z(TransactionStatus::InBlock));
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "CZ");
    assert!(!r.done(&s), "an open transaction keeps the server");
    send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[FrontendMessage::Query {
            sql: Bytes::from_static(b"commit"),
        }],
    );
    answer(&mut r, &mut c, &reg, &mut s, z(TransactionStatus::Idle));
    assert!(r.done(&s));
}

#[test]
fn named_statements_are_renamed_and_prepared_once_per_server() {
    let (reg, mut c, mut s, mut r) = (Registry::default(), client(), server(10), Relay::default());
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[
            parse("s1", "select 1"),
            bind("s1"),
            exec(),
            FrontendMessage::Sync,
        ],
    );
    assert_eq!(tags(&up), "PBES");
    assert!(
        up.windows(9).any(|w| w == b"__sluice_"),
        "renamed on the wire"
    );
    let mut out = BytesMut::new();
    backend::encode_parse_complete(&mut out);
    backend::encode_bind_complete(&mut out);
    backend::encode_command_complete(&mut out, "SELECT 1");
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "12CZ");
    assert!(r.done(&s));
    // Another client preparing the same text on the same server: ParseComplete comes from Sluice.
    let mut c2 = client();
    let mut r2 = Relay::default();
    let (up, down) = send(
        &mut r2,
        &mut c2,
        &reg,
        &mut s,
        &[
            parse("other", "select 1"),
            bind("other"),
            exec(),
            FrontendMessage::Sync,
        ],
    );
    assert_eq!(tags(&up), "BES");
    assert_eq!(
        tags(&down),
        "1",
        "synthesised at once: nothing was outstanding"
    );
}

#[test]
fn a_statement_missing_on_this_server_is_prepared_silently() {
    let reg = Registry::default();
    let mut c = client();
    let stmt = reg.get(&Bytes::from_static(b"select 2"), &[]);
    c.statements.insert(Bytes::from_static(b"s1"), stmt);
    let (mut s, mut r) = (server(10), Relay::default());
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[bind("s1"), exec(), FrontendMessage::Sync],
    );
    assert_eq!(tags(&up), "PBES", "Parse injected before Bind");
    let mut out = BytesMut::new();
    backend::encode_parse_complete(&mut out);
    backend::encode_bind_complete(&mut out);
    backend::encode_command_complete(&mut out, "SELECT 1");
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(
        tags(&answer(&mut r, &mut c, &reg, &mut s, out)),
        "2CZ",
        "the injected ParseComplete is swallowed"
    );
}

#[test]
fn an_error_skips_to_sync_and_undoes_the_skipped_parse() {
    let (reg, mut c, mut s, mut r) = (Registry::default(), client(), server(10), Relay::default());
    send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[
            parse("bad", "selec oops"),
            bind("bad"),
            exec(),
            FrontendMessage::Sync,
        ],
    );
    let mut out = BytesMut::new();
    backend::encode_error(
        &mut out,
        &ErrorFields::error(SqlState::SYNTAX_ERROR, "syntax error"),
    );
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "EZ");
    assert!(
        !c.statements.contains(b"bad"),
        "a failed Parse leaves no mapping"
    );
    assert_eq!(s.statements.len(), 0);
    assert!(r.done(&s));
}

#[test]
fn unknown_and_duplicate_names_get_postgres_errors_in_order() {
    let (reg, mut c, mut s, mut r) = (Registry::default(), client(), server(10), Relay::default());
    let (up, down) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[bind("nope"), exec(), FrontendMessage::Sync],
    );
    // The messages after the error are dropped; the server raises it at the Sync, so the
    // batch fails there as it would have in PostgreSQL.
    assert_eq!(tags(&up), "PBES");
    assert!(String::from_utf8_lossy(&up).contains("26000"));
    assert!(down.is_empty(), "the error comes from the server, in order");
    let back = raised(
        SqlState::INVALID_SQL_STATEMENT_NAME,
        "prepared statement \"nope\" does not exist",
        TransactionStatus::Idle,
    );
    assert_eq!(
        tags(&answer(&mut r, &mut c, &reg, &mut s, back)),
        "EZ",
        "the injected ParseComplete and BindComplete are swallowed"
    );
    assert!(r.done(&s));
    let mut r = Relay::default();
    send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[parse("s1", "select 1"), FrontendMessage::Sync],
    );
    let mut out = BytesMut::new();
    backend::encode_parse_complete(&mut out);
    out.extend_from_slice(&z(TransactionStatus::Idle));
    answer(&mut r, &mut c, &reg, &mut s, out);
    let mut r = Relay::default();
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[parse("s1", "select 2"), FrontendMessage::Sync],
    );
    assert!(String::from_utf8_lossy(&up).contains("42P05"));
}

#[test]
fn close_and_deallocate_change_only_the_client_view() {
    let reg = Registry::default();
    let mut c = client();
    c.statements.insert(
        Bytes::from_static(b"s1"),
        reg.get(&Bytes::from_static(b"select 1"), &[]),
    );
    c.statements.insert(
        Bytes::from_static(b"s2"),
        reg.get(&Bytes::from_static(b"select 2"), &[]),
    );
    let (mut s, mut r) = (server(10), Relay::default());
    let (up, down) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[FrontendMessage::Close {
            kind: b'S',
            name: Bytes::from_static(b"s1"),
        }],
    );
    assert_eq!((tags(&up).as_str(), tags(&down).as_str()), ("", "3"));
    assert!(!c.statements.contains(b"s1"));
    let (up, down) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[FrontendMessage::Query {
            sql: Bytes::from_static(b"DEALLOCATE ALL"),
        }],
    );
    assert_eq!((tags(&up).as_str(), tags(&down).as_str()), ("", "CZ"));
    assert!(c.statements.is_empty());
}

#[test]
fn the_server_cache_evicts_with_an_injected_close() {
    let (reg, mut c, mut s, mut r) = (Registry::default(), client(), server(1), Relay::default());
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[
            parse("a", "select 1"),
            parse("b", "select 2"),
            FrontendMessage::Sync,
        ],
    );
    assert_eq!(
        tags(&up),
        "PPCS",
        "the second Parse evicts the first with a Close"
    );
    let mut out = BytesMut::new();
    backend::encode_parse_complete(&mut out);
    backend::encode_parse_complete(&mut out);
    backend::encode_close_complete(&mut out);
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "11Z");
    assert_eq!(s.statements.len(), 1);
}

#[test]
fn a_stale_cached_plan_is_reprepared_and_retried_when_the_client_describes() {
    let reg = Registry::default();
    let mut c = client();
    let stmt = reg.get(&Bytes::from_static(b"select * from t"), &[]);
    c.statements.insert(Bytes::from_static(b"s1"), stmt.clone());
    let mut s = server(10);
    s.statements.insert(stmt.id, stmt.server_name.clone());
    let mut r = Relay::default();
    let describe = FrontendMessage::Describe {
        kind: b'P',
        name: Bytes::new(),
    };
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[bind("s1"), describe, exec(), FrontendMessage::Sync],
    );
    assert_eq!(tags(&up), "BDES");
    let mut out = BytesMut::new();
    backend::encode_error(
        &mut out,
        &ErrorFields::error(
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        ),
    );
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(
        tags(&answer(&mut r, &mut c, &reg, &mut s, out)),
        "",
        "the client sees nothing of the failure"
    );
    // Close the stale statement, prepare a fresh one, replay Bind/Describe/Execute/Sync.
    assert_eq!(tags(&r.upstream), "CSPBDES");
    let fresh = c.statements.resolve(b"s1").unwrap();
    assert_ne!(fresh.id, stmt.id);
    let mut out = BytesMut::new();
    backend::encode_close_complete(&mut out);
    out.extend_from_slice(&z(TransactionStatus::Idle));
    backend::encode_parse_complete(&mut out);
    backend::encode_bind_complete(&mut out);
    backend::encode_row_description(&mut out, &["a", "b"]);
    backend::encode_data_row(&mut out, &[Some(b"1"), Some(b"2")]);
    backend::encode_command_complete(&mut out, "SELECT 1");
    out.extend_from_slice(&z(TransactionStatus::Idle));
    r.upstream.clear();
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "2TDCZ");
    assert!(r.done(&s));
}

#[test]
fn a_stale_cached_plan_without_describe_is_reported_and_invalidated() {
    let reg = Registry::default();
    let mut c = client();
    let stmt = reg.get(&Bytes::from_static(b"select * from t"), &[]);
    c.statements.insert(Bytes::from_static(b"s1"), stmt.clone());
    let mut s = server(10);
    s.statements.insert(stmt.id, stmt.server_name.clone());
    let mut r = Relay::default();
    send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[bind("s1"), exec(), FrontendMessage::Sync],
    );
    let mut out = BytesMut::new();
    backend::encode_error(
        &mut out,
        &ErrorFields::error(
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        ),
    );
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "EZ");
    assert_eq!(s.statements.orphans.len(), 1);
    // Binding the old name again fails as in PostgreSQL; preparing the text again works, on a
    // fresh server-side statement.
    let mut r = Relay::default();
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[bind("s1"), exec(), FrontendMessage::Sync],
    );
    assert!(
        String::from_utf8_lossy(&up).contains("0A000"),
        "raised by the server"
    );
    assert!(
        String::from_utf8_lossy(&up).contains("prepare the statement again"),
        "with the hint"
    );
    let mut r = Relay::default();
    let (up, _) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[parse("s2", "select * from t"), FrontendMessage::Sync],
    );
    assert_eq!(tags(&up), "PS", "a fresh server-side statement is prepared");
    assert_eq!(
        s.statements.orphans.len(),
        1,
        "the stale one closes at the next transaction"
    );
}

#[test]
fn a_stale_statement_describe_is_retried_for_a_new_client() {
    let reg = Registry::default();
    let stmt = reg.get(&Bytes::from_static(b"select * from t"), &[]);
    let mut s = server(10);
    s.statements.insert(stmt.id, stmt.server_name.clone());
    let mut c = client();
    let mut r = Relay::default();
    let describe = FrontendMessage::Describe {
        kind: b'S',
        name: Bytes::from_static(b"s0"),
    };
    let (up, down) = send(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        &[
            parse("s0", "select * from t"),
            describe,
            FrontendMessage::Sync,
        ],
    );
    assert_eq!((tags(&up).as_str(), tags(&down).as_str()), ("DS", "1"));
    // PostgreSQL sends ParameterDescription before it finds the plan stale.
    let mut out = BytesMut::new();
    out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
    backend::encode_error(
        &mut out,
        &ErrorFields::error(
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        ),
    );
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(tags(&answer(&mut r, &mut c, &reg, &mut s, out)), "t");
    assert_eq!(tags(&r.upstream), "CSPDS");
    r.upstream.clear();
    let mut out = BytesMut::new();
    backend::encode_close_complete(&mut out);
    out.extend_from_slice(&z(TransactionStatus::Idle));
    backend::encode_parse_complete(&mut out);
    out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
    backend::encode_row_description(&mut out, &["a", "b", "c"]);
    out.extend_from_slice(&z(TransactionStatus::Idle));
    assert_eq!(
        tags(&answer(&mut r, &mut c, &reg, &mut s, out)),
        "TZ",
        "no second ParameterDescription"
    );
    assert!(r.done(&s));
}

/// Runs one simple query through the relay with the server's answers; returns client tags.
fn simple(
    r: &mut Relay,
    c: &mut Client,
    reg: &Registry,
    s: &mut ServerConn,
    sql: &'static str,
    tag: &str,
    status: TransactionStatus,
) -> String {
    send(
        r,
        c,
        reg,
        s,
        &[FrontendMessage::Query {
            sql: Bytes::from_static(sql.as_bytes()),
        }],
    );
    let mut out = BytesMut::new();
    backend::encode_command_complete(&mut out, tag);
    out.extend_from_slice(&z(status));
    tags(&answer(r, c, reg, s, out))
}

#[test]
fn a_set_inside_a_rolled_back_block_does_not_follow_the_client() {
    let (reg, mut c, mut s) = (Registry::default(), client(), server(10));
    let block = |end: &'static str, c: &mut Client, s: &mut ServerConn| {
        let mut r = Relay::default();
        let steps = [
            ("begin", "BEGIN", TransactionStatus::InBlock),
            ("set search_path = audit", "SET", TransactionStatus::InBlock),
            (end, end, TransactionStatus::Idle),
        ];
        for (sql, tag, status) in steps {
            simple(&mut r, c, &reg, s, sql, tag, status);
        }
    };
    block("ROLLBACK", &mut c, &mut s);
    assert_eq!(
        c.params.desired().count(),
        0,
        "rolled back: nothing to re-apply"
    );
    block("COMMIT", &mut c, &mut s);
    let wishes: Vec<_> = c
        .params
        .desired()
        .map(|(k, _, v)| (k.to_string(), v.clone()))
        .collect();
    assert_eq!(
        wishes,
        vec![(
            "search_path".to_string(),
            crate::params::ParamValue::Sql("audit".into())
        )]
    );
}

#[test]
fn the_sets_of_a_multi_statement_query_are_tracked_together() {
    let names = |c: Option<SessionChange>| match c {
        Some(SessionChange::Several(v)) => v
            .iter()
            .map(|c| match c {
                SessionChange::Set(n, v) => format!("{n}={v}"),
                SessionChange::Reset(n) => format!("reset {n}"),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        other => panic!("expected several changes, got {other:?}"),
    };
    assert_eq!(
        names(several_changes(
            "set search_path = app, public; select 1; reset work_mem; set local lock_timeout = 1"
        )),
        ["search_path=app, public", "reset work_mem"]
    );
    // Untracked state, transaction control or commands on Sluice's view: reset instead.
    for sql in [
        "set work_mem = '1MB'; select set_config('a.b', '1', false)",
        "set role nobody; select 1",
        "begin; set work_mem = '1MB'; commit",
        "set work_mem = '1MB'; discard all",
        "set work_mem = '1MB'; prepare p as select 1",
        "set work_mem = '1MB'; select 'unterminated",
        "select 1; select 2",
    ] {
        assert!(several_changes(sql).is_none(), "{sql}");
    }
}

#[test]
fn a_multi_statement_set_follows_the_client_unless_its_transaction_fails() {
    let (reg, mut c, mut s) = (Registry::default(), client(), server(10));
    let mut r = Relay::default();
    let sql = "set search_path = audit; set work_mem = '5MB'; select 1";
    simple(
        &mut r,
        &mut c,
        &reg,
        &mut s,
        sql,
        "SELECT 1",
        TransactionStatus::Idle,
    );
    assert!(!s.dirty, "tracked, not reset");
    let mut wishes: Vec<_> = c.params.desired().map(|(k, _, _)| k.to_string()).collect();
    wishes.sort();
    assert_eq!(wishes, ["search_path", "work_mem"]);
    // The same string with a failing statement: its implicit transaction rolls the SETs back.
    let (mut c2, mut s2, mut r2) = (client(), server(10), Relay::default());
    let (up, _) = send(
        &mut r2,
        &mut c2,
        &reg,
        &mut s2,
        &[FrontendMessage::Query {
            sql: Bytes::from_static(b"set work_mem = '5MB'; select 1/0"),
        }],
    );
    assert_eq!(tags(&up), "Q");
    let mut out = BytesMut::new();
    backend::encode_command_complete(&mut out, "SET");
    let division = SqlState::parse("22012").expect("a SQLSTATE");
    backend::encode_error(&mut out, &ErrorFields::error(division, "division by zero"));
    out.extend_from_slice(&z(TransactionStatus::Idle));
    answer(&mut r2, &mut c2, &reg, &mut s2, out);
    assert_eq!(
        c2.params.desired().count(),
        0,
        "rolled back with its transaction"
    );
    assert!(!s2.dirty);
}

#[test]
fn only_what_sluice_may_answer_itself_waits_for_earlier_answers() {
    for sql in [
        "discard all",
        "  DEALLOCATE s1",
        "/* app */ discard all",
        "-- x\ndeallocate all",
    ] {
        assert!(may_be_answered_here(sql.as_bytes()), "{sql}");
    }
    for sql in ["select 1", "/* discard */ select 1", "set x = 1", ""] {
        assert!(!may_be_answered_here(sql.as_bytes()), "{sql}");
    }
}
