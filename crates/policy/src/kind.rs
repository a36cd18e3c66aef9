//! Statement classification by first keyword.

use crate::StatementKind;

/// The kind of `sql`, from its first keyword after whitespace, `-- line` and `/* block */`
/// comments (nested block comments included). Case-insensitive. An empty or unknown statement
/// is [`StatementKind::Other`].
pub fn statement_kind(sql: &str) -> StatementKind {
    let word = first_word(sql);
    let mut buf = [0u8; 12];
    if word.len() > buf.len() {
        return StatementKind::Other;
    }
    for (dst, src) in buf.iter_mut().zip(word.bytes()) {
        *dst = src.to_ascii_uppercase();
    }
    match &buf[..word.len()] {
        b"SELECT" | b"WITH" | b"VALUES" | b"TABLE" | b"SHOW" | b"EXPLAIN" => StatementKind::Select,
        b"INSERT" => StatementKind::Insert,
        b"UPDATE" => StatementKind::Update,
        b"DELETE" => StatementKind::Delete,
        b"CREATE" | b"ALTER" | b"DROP" | b"TRUNCATE" | b"COMMENT" | b"GRANT" | b"REVOKE"
        | b"REINDEX" | b"CLUSTER" | b"VACUUM" | b"ANALYZE" | b"ANALYSE" => StatementKind::Ddl,
        b"BEGIN" | b"START" => StatementKind::Begin,
        b"COMMIT" | b"END" => StatementKind::Commit,
        b"ROLLBACK" | b"ABORT" => StatementKind::Rollback,
        b"SET" | b"RESET" => StatementKind::Set,
        b"COPY" => StatementKind::Copy,
        _ => StatementKind::Other,
    }
}

/// The first word of `sql` after whitespace and comments.
pub(crate) fn first_word(sql: &str) -> &str {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if s.starts_with("/*") {
            s = skip_block_comment(s);
        } else if let Some(rest) = s.strip_prefix('(') {
            // "(SELECT 1) UNION ..." starts with a parenthesis.
            s = rest;
        } else {
            break;
        }
    }
    let end = s
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(s.len());
    &s[..end]
}

/// Skips one (possibly nested) block comment at the start of `s`.
fn skip_block_comment(s: &str) -> &str {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return &s[i..];
                }
            }
            _ => i += 1,
        }
    }
    ""
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(statement_kind("select 1"), StatementKind::Select);
        assert_eq!(
            statement_kind("  -- hi\n /* a /* nested */ b */ INSERT into t"),
            StatementKind::Insert
        );
        assert_eq!(statement_kind("truncate t"), StatementKind::Ddl);
        assert_eq!(statement_kind("Create table t()"), StatementKind::Ddl);
        assert_eq!(
            statement_kind("with x as (select 1) select * from x"),
            StatementKind::Select
        );
        assert_eq!(statement_kind("(select 1)"), StatementKind::Select);
        assert_eq!(statement_kind("begin"), StatementKind::Begin);
        assert_eq!(statement_kind("START TRANSACTION"), StatementKind::Begin);
        assert_eq!(statement_kind("end"), StatementKind::Commit);
        assert_eq!(statement_kind("abort"), StatementKind::Rollback);
        assert_eq!(statement_kind("reset all"), StatementKind::Set);
        assert_eq!(statement_kind("copy t from stdin"), StatementKind::Copy);
        assert_eq!(statement_kind(""), StatementKind::Other);
        assert_eq!(statement_kind("/* unterminated"), StatementKind::Other);
        assert_eq!(statement_kind("listen x"), StatementKind::Other);
        assert_eq!(statement_kind("sélect"), StatementKind::Other);
    }
}
