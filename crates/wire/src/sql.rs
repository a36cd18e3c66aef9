//! A tiny SQL prefix lexer: enough to find the first keyword, recognise session commands
//! (`SET`, `RESET`, `DEALLOCATE`, `DISCARD ALL`) and count statements. It is not a parser.
//!
//! The lexer knows whitespace, `--` and nested `/* */` comments, `'strings'` (with `''`),
//! `E'strings'` (with backslash escapes), `"identifiers"`, `$tag$dollar quotes$tag$`, `$1`
//! parameters, numbers and single-character punctuation. It assumes
//! `standard_conforming_strings = on`, the default since PostgreSQL 9.1.

/// The kind of a lexed token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Unquoted identifier or keyword.
    Ident,
    /// `"quoted identifier"`.
    QuotedIdent,
    /// A string constant in any quoting style.
    Str,
    /// A numeric constant.
    Number,
    /// `$n`.
    Param,
    /// Any other single character.
    Punct(u8),
    /// `;`.
    Semicolon,
    /// A quote, identifier or dollar quote that runs to the end of the input.
    Unterminated,
}

/// A token: its kind and its byte span in the input. Spans always start and end on ASCII bytes
/// or at the ends of the input, so they are valid `str` boundaries.
#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Splits SQL text into tokens, skipping whitespace and comments.
struct Lexer<'a> {
    sql: &'a str,
    pos: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str) -> Self {
        Lexer { sql, pos: 0 }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.sql.as_bytes().get(self.pos + ahead).copied()
    }

    fn bump_while(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek(0).is_some_and(&f) {
            self.pos += 1;
        }
    }

    /// Skips whitespace and comments (an unterminated block comment runs to the end).
    fn skip_trivia(&mut self) {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c), _) => self.pos += 1,
                (Some(b'-'), Some(b'-')) => self.bump_while(|b| b != b'\n'),
                (Some(b'/'), Some(b'*')) => {
                    self.pos += 2;
                    let mut depth = 1usize;
                    while depth > 0 {
                        match (self.peek(0), self.peek(1)) {
                            (None, _) => return,
                            (Some(b'/'), Some(b'*')) => {
                                depth += 1;
                                self.pos += 2;
                            }
                            (Some(b'*'), Some(b'/')) => {
                                depth -= 1;
                                self.pos += 2;
                            }
                            _ => self.pos += 1,
                        }
                    }
                }
                _ => return,
            }
        }
    }

    /// Scans a quoted token whose opening `quote` is at `self.pos`. A doubled quote is an
    /// escaped quote; with `backslash`, a backslash escapes the next byte.
    fn quoted(&mut self, quote: u8, backslash: bool, kind: Kind) -> Kind {
        self.pos += 1;
        loop {
            match self.peek(0) {
                None => return Kind::Unterminated,
                Some(b'\\') if backslash => self.pos = (self.pos + 2).min(self.sql.len()),
                Some(b) if b == quote => {
                    self.pos += 1;
                    if self.peek(0) != Some(quote) {
                        return kind;
                    }
                    self.pos += 1;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// Scans what follows a `$`: a parameter, a dollar-quoted string, or a lone `$`.
    fn dollar(&mut self) -> Kind {
        let start = self.pos;
        self.pos += 1;
        if self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
            self.bump_while(|b| b.is_ascii_digit());
            return Kind::Param;
        }
        if self.peek(0).is_some_and(is_ident_start) {
            self.bump_while(|b| is_ident_start(b) || b.is_ascii_digit());
        }
        if self.peek(0) != Some(b'$') {
            self.pos = start + 1;
            return Kind::Punct(b'$');
        }
        self.pos += 1;
        let delim = self.sql.get(start..self.pos).unwrap_or("$$");
        match self.sql.get(self.pos..).and_then(|rest| rest.find(delim)) {
            Some(i) => {
                self.pos += i + delim.len();
                Kind::Str
            }
            None => {
                self.pos = self.sql.len();
                Kind::Unterminated
            }
        }
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        self.skip_trivia();
        let start = self.pos;
        let c = self.peek(0)?;
        let kind = match c {
            b';' => {
                self.pos += 1;
                Kind::Semicolon
            }
            b'\'' => self.quoted(b'\'', false, Kind::Str),
            b'"' => self.quoted(b'"', false, Kind::QuotedIdent),
            b'$' => self.dollar(),
            b'e' | b'E' if self.peek(1) == Some(b'\'') => {
                self.pos += 1;
                self.quoted(b'\'', true, Kind::Str)
            }
            c if is_ident_start(c) => {
                self.bump_while(is_ident_cont);
                Kind::Ident
            }
            c if c.is_ascii_digit()
                || (c == b'.' && self.peek(1).is_some_and(|b| b.is_ascii_digit())) =>
            {
                self.bump_while(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
                Kind::Number
            }
            c => {
                self.pos += 1;
                Kind::Punct(c)
            }
        };
        Some(Token {
            kind,
            start,
            end: self.pos,
        })
    }
}

/// Returns the first keyword of `sql`, as written, after whitespace and comments; `None` if
/// the first token is not a word (e.g. `(`, a string, or nothing). Callers compare it
/// ignoring ASCII case.
pub fn first_keyword(sql: &str) -> Option<&str> {
    let t = Lexer::new(sql).next()?;
    (t.kind == Kind::Ident).then(|| text(sql, t))
}

/// Counts the non-empty statements in `sql`, splitting on `;` outside quotes, dollar quotes and
/// comments. `"select 1; ; select 2;"` has 2. (`BEGIN ATOMIC` function bodies are not
/// understood; their inner statements count separately.)
pub fn statement_count(sql: &str) -> usize {
    let mut count = 0;
    for_each_statement(sql, |_, _| count += 1);
    count
}

/// The statements of `sql`, as slices of it from their first token to their last, split on `;`
/// outside quotes, dollar quotes and comments; empty statements are left out. `None` if a quote
/// or comment is unterminated. (`BEGIN ATOMIC` function bodies are split like the rest.)
pub fn statements(sql: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let terminated = for_each_statement(sql, |a, b| out.push(&sql[a..b]));
    terminated.then_some(out)
}

/// Calls `f` with the byte range of each non-empty statement of `sql` (first token to last);
/// false if a quote or comment is unterminated (its rest counts as part of the last statement).
fn for_each_statement(sql: &str, mut f: impl FnMut(usize, usize)) -> bool {
    let mut terminated = true;
    let mut current: Option<(usize, usize)> = None;
    for t in Lexer::new(sql) {
        match t.kind {
            Kind::Semicolon => {
                if let Some((a, b)) = current.take() {
                    f(a, b);
                }
            }
            kind => {
                terminated &= kind != Kind::Unterminated;
                current = Some((current.map_or(t.start, |(a, _)| a), t.end));
            }
        }
    }
    if let Some((a, b)) = current {
        f(a, b);
    }
    terminated
}

/// Whether running `sql` may leave state on the server session, beyond its transaction, that a
/// pooler does not replay for the client on its next server connection. That is:
/// - a `SET` other than `SET LOCAL`, `SET TRANSACTION` and `SET CONSTRAINTS` (so also `SET ROLE`,
///   `SET SESSION AUTHORIZATION`, `SET SESSION CHARACTERISTICS`), and any `RESET`;
/// - `LISTEN`, SQL-level `PREPARE`, `LOAD`, `CREATE TEMP ...`, `DECLARE ... WITH HOLD`;
/// - a call of `set_config` whose last argument is not the literal `true`, or of a session-level
///   advisory lock (`pg_advisory_lock`, `pg_try_advisory_lock` and their `_shared` forms).
///
/// Any statement of a multi-statement string counts. Callers that track a single session `SET`
/// themselves check for it first. State changed inside functions and `DO` blocks is not seen.
///
/// Ordinary queries cost a look at their first word and a SIMD search for `;` and `(`: the text
/// is lexed only for one of those first keywords, a second statement, or a call of a name with
/// `_config` or `_lock` in it.
pub fn leaves_session_state(sql: &[u8]) -> bool {
    leaves_session_state_after(sql, first_word(sql))
}

/// [`leaves_session_state`] for a caller that already has the text's [`first_word`].
pub fn leaves_session_state_after(sql: &[u8], first_word: Option<&[u8]>) -> bool {
    if !worth_lexing(sql, first_word) {
        return false;
    }
    let sql = String::from_utf8_lossy(sql);
    let toks: Vec<Token> = Lexer::new(&sql).collect();
    toks.split(|t| t.kind == Kind::Semicolon)
        .any(|stmt| statement_leaves_state(&sql, stmt))
}

/// First keywords of statements that can leave session state (see [`leaves_session_state`]).
const STATEFUL_FIRST: [&[u8]; 7] = [
    b"set", b"reset", b"listen", b"prepare", b"load", b"create", b"declare",
];

/// The first word of a statement's text, its letters after any blanks: `None` when the text
/// starts with a comment (only the lexer finds the word then). A cheap look before lexing.
#[inline]
pub fn first_word(sql: &[u8]) -> Option<&[u8]> {
    let t = sql.trim_ascii_start();
    if t.starts_with(b"--") || t.starts_with(b"/*") {
        return None;
    }
    let word = t.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    Some(&t[..word])
}

/// The byte pass of [`leaves_session_state`].
fn worth_lexing(sql: &[u8], first_word: Option<&[u8]>) -> bool {
    let stateful_first =
        first_word.is_none_or(|w| STATEFUL_FIRST.iter().any(|k| w.eq_ignore_ascii_case(k)));
    if stateful_first {
        return true;
    }
    // Separators, blanks and NULs at the end leave no second statement: cut them off, and a
    // `;` left in the text is a separator before more text (or inside a literal: the lexer
    // tells). The calls that matter take a `(`: one search finds both bytes, and an ordinary
    // query without parentheses costs a single pass.
    let end = sql
        .iter()
        .rposition(|b| !b.is_ascii_whitespace() && *b != b';' && *b != 0)
        .map_or(0, |i| i + 1);
    let sql = &sql[..end];
    memchr::memchr2_iter(b';', b'(', sql).any(|i| sql[i] == b';' || calls_stateful_name(&sql[..i]))
}

/// Whether the text before a `(` ends with a function name that has `_config` or `_lock` in it
/// (`set_config`, the session advisory locks), quoted or not and blanks allowed before the
/// parenthesis. A comment there (`/* */`, or a `--` on a line of its own before the `(`) is
/// left to the lexer.
fn calls_stateful_name(before: &[u8]) -> bool {
    let t = before.trim_ascii_end();
    if t.ends_with(b"*/") {
        return true;
    }
    if before[t.len()..].contains(&b'\n') {
        let line = t.rsplit(|b| *b == b'\n').next().unwrap_or(t);
        if line.windows(2).any(|w| w == b"--") {
            return true;
        }
    }
    let t = t.strip_suffix(b"\"").unwrap_or(t);
    let start = t
        .iter()
        .rposition(|b| !IDENTIFIER[usize::from(*b)])
        .map_or(0, |i| i + 1);
    let name = &t[start..];
    // Only at an underscore: TPC-B's INSERT has a `(` after `pgbench_history` and after `VALUES`,
    // and a case-insensitive compare at every offset cost it about 3 % of its instructions.
    memchr::memchr_iter(b'_', name).any(|i| {
        let rest = &name[i + 1..];
        [&b"config"[..], b"lock"].iter().any(|k| {
            rest.get(..k.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(k))
        })
    })
}

/// The bytes of an unquoted identifier: ASCII letters and digits, `_` and `$`.
static IDENTIFIER: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'$';
        b += 1;
    }
    table
};

/// One statement of [`leaves_session_state`].
fn statement_leaves_state(sql: &str, toks: &[Token]) -> bool {
    let kw = |i: usize, k: &str| toks.get(i).is_some_and(|t| is_kw(sql, *t, k));
    let stateful_start = if kw(0, "set") {
        !(kw(1, "local") || kw(1, "transaction") || kw(1, "constraints"))
    } else if kw(0, "create") {
        (1..4).any(|i| kw(i, "temp") || kw(i, "temporary"))
    } else if kw(0, "declare") {
        (1..toks.len()).any(|i| kw(i - 1, "with") && kw(i, "hold"))
    } else {
        ["reset", "listen", "prepare", "load"]
            .iter()
            .any(|k| kw(0, k))
    };
    if stateful_start {
        return true;
    }
    let called = |i: usize| toks.get(i + 1).is_some_and(|t| t.kind == Kind::Punct(b'('));
    let function = |i: usize, name: &str| toks.get(i).is_some_and(|t| is_function(sql, *t, name));
    (0..toks.len()).any(|i| {
        if !called(i) {
            return false;
        }
        if function(i, "set_config") {
            // The third argument is `is_local`: only a literal `true` keeps the change in the
            // transaction. Find the call's closing parenthesis and look just before it.
            let mut depth = 0usize;
            for (j, t) in toks.iter().enumerate().skip(i + 1) {
                match t.kind {
                    Kind::Punct(b'(') => depth += 1,
                    Kind::Punct(b')') => {
                        depth -= 1;
                        if depth == 0 {
                            return !kw(j - 1, "true");
                        }
                    }
                    _ => {}
                }
            }
            return true;
        }
        [
            "pg_advisory_lock",
            "pg_advisory_lock_shared",
            "pg_try_advisory_lock",
            "pg_try_advisory_lock_shared",
        ]
        .iter()
        .any(|f| function(i, f))
    })
}

/// A session-level command a pooler must track or emulate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionCommand<'a> {
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `DEALLOCATE [PREPARE] name`, with the statement name as PostgreSQL resolves it.
    Deallocate(&'a str),
    /// `DISCARD ALL`.
    DiscardAll,
    /// `SET [SESSION | LOCAL] name {TO | =} value`, or `SET [SESSION | LOCAL] TIME ZONE value`.
    Set {
        /// Parameter name, lowercased unless quoted; dotted parts joined with `.`;
        /// `TIME ZONE` becomes `timezone`.
        name: String,
        /// The value as written, e.g. `'$user', public`.
        value: String,
        /// `SET LOCAL`: lasts until the end of the transaction only.
        local: bool,
    },
    /// `RESET name`, or `SET [SESSION] name TO DEFAULT`.
    Reset {
        /// Parameter name, as for `Set`.
        name: String,
    },
    /// `RESET ALL`.
    ResetAll,
}

fn text(sql: &str, t: Token) -> &str {
    sql.get(t.start..t.end).unwrap_or("")
}

/// The content of a `"quoted identifier"` token, without the outer quotes.
fn quoted_inner(sql: &str, t: Token) -> &str {
    sql.get(t.start + 1..t.end.saturating_sub(1)).unwrap_or("")
}

/// Recognises a simple-query string that is exactly one session command.
///
/// Handles `DEALLOCATE [PREPARE] name|ALL`, `DISCARD ALL`, `SET [SESSION|LOCAL] name {TO|=}
/// value` (`TO DEFAULT` gives `Reset` unless `LOCAL`), `SET TIME ZONE value` and
/// `RESET name|ALL`. One trailing `;` and any whitespace or comments are allowed; anything
/// else (a second statement, unbalanced quotes, an invalid value) gives `None`, as does a
/// `DEALLOCATE` name that cannot be returned as a slice of `sql` (an unquoted name with
/// uppercase letters, which PostgreSQL folds, or a quoted name containing `""`).
pub fn session_command(sql: &str) -> Option<SessionCommand<'_>> {
    let mut toks: Vec<Token> = Vec::new();
    for t in Lexer::new(sql) {
        match t.kind {
            Kind::Unterminated => return None,
            // Only one trailing ';' may follow; anything after it fails below.
            _ if toks.last().is_some_and(|l| l.kind == Kind::Semicolon) => return None,
            _ => toks.push(t),
        }
        // No session command is long; stop early on big queries.
        if toks.len() > 64 && toks.first().is_some_and(|f| !is_kw(sql, *f, "set")) {
            return None;
        }
    }
    if toks.last().is_some_and(|l| l.kind == Kind::Semicolon) {
        toks.pop();
    }
    let (first, rest) = toks.split_first()?;
    let kw = |i: usize, k: &str| rest.get(i).is_some_and(|t| is_kw(sql, *t, k));
    if is_kw(sql, *first, "discard") {
        return (rest.len() == 1 && kw(0, "all")).then_some(SessionCommand::DiscardAll);
    }
    if is_kw(sql, *first, "deallocate") {
        let name = match rest {
            [name] => *name,
            [p, name] if is_kw(sql, *p, "prepare") => *name,
            _ => return None,
        };
        return deallocate(sql, name);
    }
    if is_kw(sql, *first, "reset") {
        if rest.len() == 1 && kw(0, "all") {
            return Some(SessionCommand::ResetAll);
        }
        let (name, used) = var_name(sql, rest)?;
        return (used == rest.len()).then_some(SessionCommand::Reset { name });
    }
    if is_kw(sql, *first, "set") {
        return set(sql, rest);
    }
    None
}

fn is_kw(sql: &str, t: Token, kw: &str) -> bool {
    t.kind == Kind::Ident && text(sql, t).eq_ignore_ascii_case(kw)
}

/// Whether a token names the built-in function `name` (lowercase): unquoted in any case, or
/// quoted exactly.
fn is_function(sql: &str, t: Token, name: &str) -> bool {
    is_kw(sql, t, name) || (t.kind == Kind::QuotedIdent && quoted_inner(sql, t) == name)
}

fn deallocate(sql: &str, name: Token) -> Option<SessionCommand<'_>> {
    match name.kind {
        Kind::Ident if is_kw(sql, name, "all") => Some(SessionCommand::DeallocateAll),
        Kind::Ident => {
            let n = text(sql, name);
            (!n.bytes().any(|b| b.is_ascii_uppercase())).then_some(SessionCommand::Deallocate(n))
        }
        Kind::QuotedIdent => {
            let n = quoted_inner(sql, name);
            (!n.is_empty() && !n.contains('"')).then_some(SessionCommand::Deallocate(n))
        }
        _ => None,
    }
}

/// Parses a (possibly dotted) parameter name at the start of `toks`, with the `TIME ZONE` and
/// `SESSION AUTHORIZATION` special forms. Returns the name and the tokens used.
fn var_name(sql: &str, toks: &[Token]) -> Option<(String, usize)> {
    let kw = |i: usize, k: &str| toks.get(i).is_some_and(|t| is_kw(sql, *t, k));
    if kw(0, "time") && kw(1, "zone") {
        return Some(("timezone".into(), 2));
    }
    if kw(0, "session") && kw(1, "authorization") {
        return Some(("session_authorization".into(), 2));
    }
    let mut name = String::new();
    let mut i = 0;
    loop {
        let t = toks.get(i)?;
        match t.kind {
            Kind::Ident => name.push_str(&text(sql, *t).to_ascii_lowercase()),
            Kind::QuotedIdent => {
                let inner = quoted_inner(sql, *t);
                if inner.is_empty() {
                    return None;
                }
                name.push_str(&inner.replace("\"\"", "\""));
            }
            _ => return None,
        }
        i += 1;
        match toks.get(i) {
            Some(t) if t.kind == Kind::Punct(b'.') => {
                name.push('.');
                i += 1;
            }
            _ => return Some((name, i)),
        }
    }
}

/// Checks `toks` is a value list: items separated by `,`, each a word, a string, a quoted
/// identifier or an optionally signed number.
fn is_value_list(toks: &[Token]) -> bool {
    let mut i = 0;
    loop {
        if let Some(Kind::Punct(b'+' | b'-')) = toks.get(i).map(|t| t.kind) {
            if toks.get(i + 1).map(|t| t.kind) != Some(Kind::Number) {
                return false;
            }
            i += 1;
        }
        match toks.get(i).map(|t| t.kind) {
            Some(Kind::Ident | Kind::QuotedIdent | Kind::Str | Kind::Number) => i += 1,
            _ => return false,
        }
        match toks.get(i).map(|t| t.kind) {
            None => return true,
            Some(Kind::Punct(b',')) => i += 1,
            Some(_) => return false,
        }
    }
}

fn set<'a>(sql: &'a str, toks: &[Token]) -> Option<SessionCommand<'a>> {
    let kw = |i: usize, k: &str| toks.get(i).is_some_and(|t| is_kw(sql, *t, k));
    let (local, mut i) = if kw(0, "local") {
        (true, 1)
    } else if kw(0, "session") && !kw(1, "authorization") && !kw(1, "characteristics") {
        (false, 1)
    } else {
        (false, 0)
    };
    let time_zone = kw(i, "time") && kw(i + 1, "zone");
    let (name, used) = var_name(sql, toks.get(i..)?)?;
    if name == "session_authorization" && !time_zone {
        // SET SESSION AUTHORIZATION has its own grammar (no TO); leave it to the server.
        return None;
    }
    i += used;
    if !time_zone {
        match toks.get(i) {
            Some(t) if is_kw(sql, *t, "to") || t.kind == Kind::Punct(b'=') => i += 1,
            _ => return None,
        }
    }
    let value = toks.get(i..)?;
    let (first, last) = (value.first()?, value.last()?);
    // SET TIME ZONE also takes INTERVAL forms, so only check the generic syntax.
    if !time_zone && !is_value_list(value) {
        return None;
    }
    let is_default = value.len() == 1
        && (is_kw(sql, *first, "default") || (time_zone && is_kw(sql, *first, "local")));
    if is_default && !local {
        return Some(SessionCommand::Reset { name });
    }
    let value = sql.get(first.start..last.end)?.to_owned();
    Some(SessionCommand::Set { name, value, local })
}

#[cfg(test)]
mod tests;
