//! Tests for the SQL prefix lexer.

use super::*;

fn set(name: &str, value: &str, local: bool) -> Option<SessionCommand<'static>> {
    Some(SessionCommand::Set {
        name: name.into(),
        value: value.into(),
        local,
    })
}

fn reset(name: &str) -> Option<SessionCommand<'static>> {
    Some(SessionCommand::Reset { name: name.into() })
}

#[test]
fn first_keyword_skips_comments() {
    assert_eq!(first_keyword("select 1"), Some("select"));
    assert_eq!(
        first_keyword("  -- hi\n /* a /* nested */ b */ INSERT into t"),
        Some("INSERT")
    );
    assert_eq!(first_keyword("/* unterminated"), None);
    assert_eq!(first_keyword("(select 1)"), None);
    assert_eq!(first_keyword(""), None);
    assert_eq!(first_keyword("'str'"), None);
    assert_eq!(first_keyword("With x as (select 1) select 1"), Some("With"));
    assert_eq!(first_keyword("\u{e9}t\u{e9} x"), Some("\u{e9}t\u{e9}"));
}

#[test]
fn statement_counting() {
    assert_eq!(statement_count(""), 0);
    assert_eq!(statement_count(" ; ;; -- x;\n"), 0);
    assert_eq!(statement_count("select 1"), 1);
    assert_eq!(statement_count("select 1;"), 1);
    assert_eq!(statement_count("select 1; select 2"), 2);
    assert_eq!(statement_count("select ';'; select \"a;b\""), 2);
    assert_eq!(statement_count("select $$ ; $$; select $x$ $$ ; $x$"), 2);
    assert_eq!(statement_count("select E'\\' ; '; select 2"), 2);
    assert_eq!(statement_count("select 'it''s;'"), 1);
    assert_eq!(statement_count("select 1 /* ; /* ; */ ; */ -- ;\n"), 1);
    assert_eq!(statement_count("select $1; select a$b; select 2"), 3);
    assert_eq!(statement_count("select 'unterminated; select 2"), 1);
    assert_eq!(statement_count("select $tag$ never closed; x"), 1);
}

#[test]
fn statements_are_split_outside_quotes_and_comments() {
    assert_eq!(statements(""), Some(vec![]));
    assert_eq!(statements(" ; ;; -- x;\n"), Some(vec![]));
    assert_eq!(
        statements("set a = 1; select ';' /* ; */ ;  select $$ ; $$ ;"),
        Some(vec!["set a = 1", "select ';'", "select $$ ; $$"])
    );
    assert_eq!(
        statements("-- lead\nset search_path = \"a;b\", public"),
        Some(vec!["set search_path = \"a;b\", public"])
    );
    assert_eq!(statements("set a = 1; select 'never closed"), None);
}

#[test]
fn deallocate_and_discard() {
    use SessionCommand::*;
    assert_eq!(session_command("DEALLOCATE ALL"), Some(DeallocateAll));
    assert_eq!(
        session_command("deallocate prepare all ;"),
        Some(DeallocateAll)
    );
    assert_eq!(session_command("DEALLOCATE s1"), Some(Deallocate("s1")));
    assert_eq!(
        session_command("DEALLOCATE PREPARE s_1;"),
        Some(Deallocate("s_1"))
    );
    assert_eq!(
        session_command("DEALLOCATE prepare"),
        Some(Deallocate("prepare"))
    );
    assert_eq!(
        session_command("DEALLOCATE \"Stmt;1\" -- done"),
        Some(Deallocate("Stmt;1"))
    );
    assert_eq!(
        session_command("DEALLOCATE \"ALL\""),
        Some(Deallocate("ALL"))
    );
    assert_eq!(session_command("DEALLOCATE Stmt"), None);
    assert_eq!(session_command("DEALLOCATE \"a\"\"b\""), None);
    assert_eq!(session_command("DEALLOCATE"), None);
    assert_eq!(session_command("DEALLOCATE a b"), None);
    assert_eq!(session_command("DEALLOCATE a; select 1"), None);
    assert_eq!(session_command("discard all"), Some(DiscardAll));
    assert_eq!(
        session_command("/* c */ DISCARD ALL ; -- bye"),
        Some(DiscardAll)
    );
    assert_eq!(session_command("DISCARD PLANS"), None);
    assert_eq!(session_command("DISCARD ALL; DISCARD ALL"), None);
    assert_eq!(session_command("DISCARD ALL;;"), None);
}

#[test]
fn set_forms() {
    assert_eq!(
        session_command("SET search_path TO '$user', public"),
        set("search_path", "'$user', public", false)
    );
    assert_eq!(
        session_command("set Statement_Timeout = 5000;"),
        set("statement_timeout", "5000", false)
    );
    assert_eq!(
        session_command("SET SESSION work_mem TO '64MB'"),
        set("work_mem", "'64MB'", false)
    );
    assert_eq!(
        session_command("SET LOCAL lock_timeout = '1s'"),
        set("lock_timeout", "'1s'", true)
    );
    assert_eq!(
        session_command("SET \"MyApp\".Tenant = 'a;b'"),
        set("MyApp.tenant", "'a;b'", false)
    );
    assert_eq!(
        session_command("SET x.y TO -1.5"),
        set("x.y", "-1.5", false)
    );
    assert_eq!(
        session_command("SET datestyle TO iso, mdy"),
        set("datestyle", "iso, mdy", false)
    );
    assert_eq!(
        session_command("SET application_name = 'it''s; fine' ; /* trailing */"),
        set("application_name", "'it''s; fine'", false)
    );
    assert_eq!(
        session_command("SET a = $$x;y$$"),
        set("a", "$$x;y$$", false)
    );
    assert_eq!(
        session_command("SET a = E'\\';'"),
        set("a", "E'\\';'", false)
    );
    assert_eq!(
        session_command("SET TIME ZONE 'UTC'"),
        set("timezone", "'UTC'", false)
    );
    assert_eq!(
        session_command("SET LOCAL TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE"),
        set("timezone", "INTERVAL '+00:00' HOUR TO MINUTE", true)
    );
}

#[test]
fn set_to_default_and_reset() {
    use SessionCommand::*;
    assert_eq!(
        session_command("SET search_path TO DEFAULT"),
        reset("search_path")
    );
    assert_eq!(session_command("SET SESSION x = default;"), reset("x"));
    assert_eq!(
        session_command("SET LOCAL x = DEFAULT"),
        set("x", "DEFAULT", true)
    );
    assert_eq!(session_command("SET TIME ZONE LOCAL"), reset("timezone"));
    assert_eq!(session_command("RESET ALL"), Some(ResetAll));
    assert_eq!(session_command("reset Search_Path;"), reset("search_path"));
    assert_eq!(session_command("RESET \"Weird\".name"), reset("Weird.name"));
    assert_eq!(session_command("RESET TIME ZONE"), reset("timezone"));
    assert_eq!(
        session_command("RESET SESSION AUTHORIZATION"),
        reset("session_authorization")
    );
    assert_eq!(session_command("RESET"), None);
    assert_eq!(session_command("RESET a b"), None);
}

#[test]
fn things_that_are_not_session_commands() {
    for sql in [
        "",
        ";",
        "select 1",
        "SET",
        "SET x",
        "SET x TO",
        "SET x =",
        "SET x 1",
        "SET x = 1 2",
        "SET x = 1, ",
        "SET x = 1; SET y = 2",
        "SET x = 1; select 1",
        "SET x = 'unterminated",
        "SET x = 'a'; '",
        "SET x = 1 -- fine\n; garbage",
        "SET ROLE admin",
        "SET SESSION AUTHORIZATION bob",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL DEFERRED",
        "SET \"\" = 1",
        "set x = (select 1)",
        "PREPARE s AS select 1",
        "SETX = 1",
        "/* SET x = 1 */",
    ] {
        assert_eq!(session_command(sql), None, "{sql}");
    }
}

#[test]
fn tricky_quoting() {
    // A ';' inside a quoted identifier, a string, a dollar quote and a comment.
    assert_eq!(
        session_command("SET \"a;b\" = 'c;d' /* ; */ -- ;"),
        set("a;b", "'c;d'", false)
    );
    assert_eq!(
        session_command("SET x = $q$ ' \" ; $q$"),
        set("x", "$q$ ' \" ; $q$", false)
    );
    assert_eq!(
        session_command("SET x = \"Quoted\"\"Id\""),
        set("x", "\"Quoted\"\"Id\"", false)
    );
    // Comments between value items are part of the value as written.
    assert_eq!(
        session_command("SET x = a /* c */, b"),
        set("x", "a /* c */, b", false)
    );
}

#[test]
fn statements_that_leave_session_state() {
    for sql in [
        "SET ROLE reporting",
        "set session authorization bob",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET search_path = app",
        "select 1; set work_mem = '64MB'",
        "RESET ALL",
        "LISTEN jobs",
        "PREPARE q AS select 1",
        "LOAD 'auto_explain'",
        "CREATE TEMP TABLE t (x int)",
        "create local temporary table t (x int)",
        "DECLARE c CURSOR WITH HOLD FOR select 1",
        "select set_config('app.user', '42', false)",
        "SELECT pg_catalog.SET_CONFIG('app.user', $1, $2)",
        "select set_config('a', 'b', true), set_config('c', 'd', false)",
        "select pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock_shared(7) FROM t",
        "/* app */ set role admin",
        "select set_config ('a', 'b', false)",
        "select \"set_config\"('a', 'b', false)",
        "select set_config/* why */('a', 'b', false)",
        "select set_config -- why\n ('a', 'b', false)",
        "select pg_advisory_lock -- one\n -- two\r\n(1)",
        "select 1 ;; set x = 1",
        "select 1; /* then */ listen jobs",
    ] {
        assert!(leaves_session_state(sql.as_bytes()), "{sql}");
    }
}

#[test]
fn statements_that_do_not_leave_session_state() {
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
        "SET LOCAL work_mem = '64MB'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "set constraints all deferred",
        "select set_config('app.user', '42', true)",
        "select set_config('app.user', lower($1), TRUE) ;  ",
        "select pg_advisory_xact_lock(1)",
        "select pg_try_advisory_xact_lock(1)",
        "DECLARE c CURSOR WITHOUT HOLD FOR select 1",
        "DECLARE c CURSOR FOR select 1",
        "CREATE TABLE temp_values (x int)",
        "update t set x = 1 where note = 'SET ROLE x; LISTEN y'",
        "select 'pg_advisory_lock(1)', \"set_config\"",
        "insert into t values ('a;b')",
        "select lower(name), count(*) from t group by 1 ;; \n\0",
        "INSERT INTO pgbench_history (tid, bid, aid) VALUES (1, 2, 3);",
        "select lock_timeout_ms(1), my_configured(2)",
        "select count -- all of them\n(*) from t",
        "",
    ] {
        assert!(!leaves_session_state(sql.as_bytes()), "{sql}");
    }
}

#[test]
fn a_stateful_name_is_found_as_a_case_insensitive_search_finds_it() {
    // The search before a `(` looks only at underscores; it must agree with a plain search for
    // `_config` or `_lock` at every offset of the name.
    let reference = |name: &[u8]| {
        [&b"_config"[..], b"_lock"]
            .iter()
            .any(|k| name.windows(k.len()).any(|w| w.eq_ignore_ascii_case(k)))
    };
    let parts: [&[u8]; 10] = [
        b"_", b"config", b"CONFIG", b"lock", b"_LoCk", b"pg", b"$1", b"set", b"x_confi", b"_loc",
    ];
    for a in parts {
        for b in parts {
            for c in parts {
                let name = [a, b, c].concat();
                let sql = [&b"select "[..], &name, b"(1)"].concat();
                assert_eq!(
                    calls_stateful_name(&sql[..sql.len() - 3]),
                    reference(&name),
                    "{}",
                    String::from_utf8_lossy(&sql)
                );
            }
        }
    }
}

#[test]
fn markers_are_found_at_every_offset() {
    // The byte search works in vector-sized blocks: a marker at any offset is found.
    for pad in 0..20 {
        let pad = "x".repeat(pad);
        let call = format!("select {pad}, set_config('a', 'b', false)");
        assert!(leaves_session_state(call.as_bytes()), "{call}");
        let two = format!("select {pad};set x = 1");
        assert!(leaves_session_state(two.as_bytes()), "{two}");
        let plain = format!("select {pad}_x, y;  ");
        assert!(!leaves_session_state(plain.as_bytes()), "{plain}");
        let lock = format!("select {pad}, pg_advisory_lock(1)");
        assert!(leaves_session_state(lock.as_bytes()), "{lock}");
    }
}
