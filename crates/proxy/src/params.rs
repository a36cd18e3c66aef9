//! Session parameters that follow a client from one server connection to the next.
//!
//! A client's parameters come from its startup packet (including `options=-c ...`), from the
//! ParameterStatus messages its own `SET`s produce, and from session-level `SET`/`RESET` of
//! settings the server does not report. Before a transaction runs on a server connection,
//! Sluice compares the client's wishes with what that connection has and sends only the
//! difference, as one `SET ...; RESET ...` query.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A parameter value as Sluice will send it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ParamValue {
    /// A plain string (from a startup packet or a ParameterStatus): sent quoted.
    Literal(String),
    /// SQL value text as the client wrote it in `SET name = <value>`: sent verbatim.
    Sql(String),
}

impl ParamValue {
    /// The value as SQL text.
    pub fn to_sql(&self) -> String {
        match self {
            ParamValue::Literal(s) => quote_literal(s),
            ParamValue::Sql(s) => s.clone(),
        }
    }
}

/// Parameters whose list values `SET name = '...'` would take as one item (PostgreSQL quotes a
/// string constant as one element for them): `SET search_path = 'app, public'` names a single
/// schema "app, public". A plain value for one of them goes through `set_config`, which parses it
/// as the startup packet does.
const LIST_QUOTED: [&str; 3] = [
    "search_path",
    "temp_tablespaces",
    "session_preload_libraries",
];

/// The SQL that sets `name` to `value` for the session, `;`-terminated.
pub fn set_sql(name: &str, value: &ParamValue) -> String {
    match value {
        ParamValue::Literal(v) if LIST_QUOTED.iter().any(|l| name.eq_ignore_ascii_case(l)) => {
            format!(
                "SELECT pg_catalog.set_config({}, {}, false);",
                quote_literal(name),
                quote_literal(v)
            )
        }
        _ => format!("SET {name} = {};", value.to_sql()),
    }
}

/// Quotes a string literal, doubling quotes (standard_conforming_strings is assumed on; a
/// backslash gets the E'' form so it is safe either way).
pub fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// Whether a parameter name can be sent unquoted in SET.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Reported parameters Sluice tracks per client (others, like is_superuser, belong to the server).
pub const TRACKED_REPORTED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "timezone",
    "standard_conforming_strings",
    "search_path",
];

/// Startup keys that are not parameters.
const NOT_PARAMS: [&str; 4] = ["user", "database", "options", "replication"];

/// The parameters one client wants on whatever server connection serves it.
#[derive(Debug, Clone, Default)]
pub struct ClientParams {
    /// Values from the startup packet, by lowercase name: what RESET returns to.
    startup: BTreeMap<String, (String, ParamValue)>,
    /// Current wishes, by lowercase name, with the name as written. Shared with the server
    /// connections that match them (copied on change), so a match is usually a pointer compare.
    desired: Arc<Wishes>,
}

/// A set of parameter wishes: lowercase name to (name as written, value).
pub type Wishes = BTreeMap<String, (String, ParamValue)>;

/// Whose parameter wishes a server session matches. The wishes stay referenced while the
/// session is out with a client, only marked unknown: handing the session back to a client
/// with the same (interned) wishes then costs a pointer compare, not two reference counts.
#[derive(Debug, Default)]
pub struct MatchedWishes {
    wishes: Option<Arc<Wishes>>,
    known: bool,
}

impl MatchedWishes {
    /// Whether the session matches `params`, forgetting it until [`Self::set`]: until a
    /// transaction ends well, the session matches nobody's wishes (an abandoned transaction
    /// may have applied a SET).
    pub fn take_matches(&mut self, params: &ClientParams) -> bool {
        std::mem::replace(&mut self.known, false)
            && self.wishes.as_ref().is_some_and(|w| params.matches(w))
    }

    /// The session now matches `wishes`.
    pub fn set(&mut self, wishes: &Arc<Wishes>) {
        if !self.wishes.as_ref().is_some_and(|w| Arc::ptr_eq(w, wishes)) {
            self.wishes = Some(wishes.clone());
        }
        self.known = true;
    }

    /// The session matches nobody's wishes known so far: compare in full.
    pub fn forget(&mut self) {
        self.known = false;
    }
}

impl ClientParams {
    /// Builds the wishes from startup parameters. Errors name the bad `options` text.
    pub fn from_startup(params: &[(String, String)]) -> Result<Self, String> {
        let mut p = ClientParams::default();
        for (k, v) in params {
            let lk = k.to_ascii_lowercase();
            if NOT_PARAMS.contains(&lk.as_str()) || lk.starts_with("_pq_.") {
                if lk == "options" {
                    for (name, value) in parse_options(v)? {
                        p.set_startup(&name, ParamValue::Literal(value));
                    }
                }
                continue;
            }
            p.set_startup(k, ParamValue::Literal(v.clone()));
        }
        Ok(p)
    }

    fn set_startup(&mut self, name: &str, value: ParamValue) {
        let key = name.to_ascii_lowercase();
        self.startup
            .insert(key.clone(), (name.to_string(), value.clone()));
        Arc::make_mut(&mut self.desired).insert(key, (name.to_string(), value));
    }

    /// The current wishes, to remember on the server session that now matches them.
    pub fn wishes(&self) -> &Arc<Wishes> {
        &self.desired
    }

    /// Shares the wishes with every other client that has equal ones (call once they are
    /// settled, after login), so matching a server session is usually a pointer compare.
    pub fn intern(&mut self) {
        self.desired = intern(&self.desired);
    }

    /// Whether a server session that matched `other` already matches these wishes: the same
    /// set (the usual case, a pointer compare) or an equal one (another client's).
    pub fn matches(&self, other: &Arc<Wishes>) -> bool {
        Arc::ptr_eq(&self.desired, other) || *self.desired == **other
    }

    /// The current wishes.
    pub fn desired(&self) -> impl Iterator<Item = (&str, &str, &ParamValue)> {
        self.desired
            .iter()
            .map(|(k, (n, v))| (k.as_str(), n.as_str(), v))
    }

    /// A literal wish by name.
    pub fn get(&self, name: &str) -> Option<&str> {
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.desired.get(&name.to_ascii_lowercase())
        } else {
            self.desired.get(name)
        };
        match found {
            Some((_, ParamValue::Literal(v))) => Some(v),
            _ => None,
        }
    }

    /// Records a value (a tracked ParameterStatus or a session-level SET).
    pub fn set(&mut self, name: &str, value: ParamValue) {
        Arc::make_mut(&mut self.desired)
            .insert(name.to_ascii_lowercase(), (name.to_string(), value));
    }

    /// Replaces a startup value with its normalised form (after the server accepted it).
    pub fn normalise(&mut self, name: &str, value: &str) {
        let key = name.to_ascii_lowercase();
        if let Some(e) = self.startup.get_mut(&key) {
            e.1 = ParamValue::Literal(value.to_string());
        }
        if let Some(e) = Arc::make_mut(&mut self.desired).get_mut(&key) {
            e.1 = ParamValue::Literal(value.to_string());
        }
    }

    /// RESET name: back to the startup value, or the server default.
    pub fn reset(&mut self, name: &str) {
        let key = name.to_ascii_lowercase();
        let desired = Arc::make_mut(&mut self.desired);
        match self.startup.get(&key) {
            Some(v) => {
                desired.insert(key, v.clone());
            }
            None => {
                desired.remove(&key);
            }
        }
    }

    /// RESET ALL / DISCARD ALL.
    pub fn reset_all(&mut self) {
        self.desired = Arc::new(self.startup.clone());
    }

    /// The SQL that makes a server session match these wishes, updating `applied` (what Sluice
    /// set on that session) and assuming success. `reported` holds the server's ParameterStatus
    /// values by lowercase name. `None` when nothing differs.
    pub fn diff(
        &self,
        reported: &HashMap<String, String>,
        applied: &mut HashMap<String, ParamValue>,
    ) -> Option<String> {
        let mut sql = String::new();
        for (key, (name, value)) in self.desired.iter() {
            if !valid_name(name) {
                continue;
            }
            let same = match (reported.get(key), value) {
                (Some(cur), ParamValue::Literal(v)) => cur == v,
                _ => applied.get(key) == Some(value),
            };
            if !same {
                sql.push_str(&set_sql(name, value));
                applied.insert(key.clone(), value.clone());
            }
        }
        let stale: Vec<String> = applied
            .keys()
            .filter(|k| !self.desired.contains_key(*k))
            .cloned()
            .collect();
        for key in stale {
            applied.remove(&key);
            if valid_name(&key) {
                sql.push_str(&format!("RESET {key};"));
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

/// The one shared copy of each set of wishes in use, by content hash. Dead entries are swept
/// whenever the table has doubled since the last sweep.
fn intern(wishes: &Arc<Wishes>) -> Arc<Wishes> {
    use std::hash::BuildHasher;
    use std::sync::{OnceLock, Weak};
    struct Table {
        sets: HashMap<u64, Vec<Weak<Wishes>>>,
        entries: usize,
        sweep_at: usize,
        hasher: foldhash::fast::RandomState,
    }
    static TABLE: OnceLock<parking_lot::Mutex<Table>> = OnceLock::new();
    let mut t = TABLE
        .get_or_init(|| {
            parking_lot::Mutex::new(Table {
                sets: HashMap::new(),
                entries: 0,
                sweep_at: 64,
                hasher: foldhash::fast::RandomState::default(),
            })
        })
        .lock();
    let key = t.hasher.hash_one(&**wishes);
    if let Some(same) = t
        .sets
        .get(&key)
        .into_iter()
        .flatten()
        .filter_map(Weak::upgrade)
        .find(|w| **w == **wishes)
    {
        return same;
    }
    t.sets.entry(key).or_default().push(Arc::downgrade(wishes));
    t.entries += 1;
    if t.entries >= t.sweep_at {
        t.sets.retain(|_, v| {
            v.retain(|w| w.strong_count() > 0);
            !v.is_empty()
        });
        t.entries = t.sets.values().map(Vec::len).sum();
        t.sweep_at = (2 * t.entries).max(64);
    }
    wishes.clone()
}

/// Parses the startup `options` value: `-c name=value`, `--name=value`, backslash escapes.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| "\"-c\" needs a name=value".to_string())?
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(format!("unsupported option \"{w}\" in startup options"));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("option \"{setting}\" needs name=value"))?;
        out.push((name.replace('-', "_"), value.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server session matches the wishes it was last set to, once: out with a client it
    /// matches nobody until that transaction ends well and sets them again.
    #[test]
    fn matched_wishes_hold_until_taken_and_compare_by_value() {
        let params = |tz: &str| {
            ClientParams::from_startup(&[("TimeZone".into(), tz.into())]).expect("params")
        };
        let (utc, also_utc, paris) = (params("UTC"), params("UTC"), params("Europe/Paris"));
        let mut m = MatchedWishes::default();
        assert!(!m.take_matches(&utc), "a new session matches nobody");
        m.set(utc.wishes());
        assert!(m.take_matches(&also_utc), "equal wishes match");
        assert!(!m.take_matches(&utc), "taken: unknown until set again");
        m.set(utc.wishes());
        assert!(!m.take_matches(&paris));
        m.set(utc.wishes());
        m.forget();
        assert!(!m.take_matches(&utc));
    }

    #[test]
    fn equal_wishes_are_shared_and_a_change_unshares_them() {
        let startup = |app: &str| {
            let mut p = ClientParams::from_startup(&[
                ("application_name".into(), app.into()),
                ("DateStyle".into(), "ISO".into()),
            ])
            .unwrap();
            p.intern();
            p
        };
        let (a, mut b, c) = (startup("web"), startup("web"), startup("scraper"));
        assert!(Arc::ptr_eq(a.wishes(), b.wishes()));
        assert!(!Arc::ptr_eq(a.wishes(), c.wishes()));
        assert!(b.matches(a.wishes()) && !c.matches(a.wishes()));
        b.set("search_path", ParamValue::Sql("app".into()));
        assert!(!b.matches(a.wishes()));
        assert_eq!(a.get("search_path"), None);
    }

    #[test]
    fn options_are_parsed_like_postgres() {
        let o = parse_options(
            r"-c search_path=app,public --statement-timeout=5s -cwork_mem=64MB -c x=a\ b",
        )
        .unwrap();
        assert_eq!(
            o,
            vec![
                ("search_path".into(), "app,public".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert!(parse_options("-x").is_err());
        assert!(parse_options("-c").is_err());
    }

    #[test]
    fn only_differences_are_sent_and_stale_settings_are_reset() {
        let mut p = ClientParams::from_startup(&[
            ("user".into(), "app".into()),
            ("application_name".into(), "web".into()),
            ("options".into(), "-c statement_timeout=5s".into()),
        ])
        .unwrap();
        let mut reported = HashMap::new();
        reported.insert("application_name".to_string(), "web".to_string());
        let mut applied = HashMap::new();
        applied.insert("search_path".to_string(), ParamValue::Literal("x".into()));
        let sql = p.diff(&reported, &mut applied).unwrap();
        assert_eq!(sql, "SET statement_timeout = '5s';RESET search_path;");
        assert!(p.diff(&reported, &mut applied).is_none());
        p.set("search_path", ParamValue::Sql("'$user', public".into()));
        assert_eq!(
            p.diff(&reported, &mut applied).unwrap(),
            "SET search_path = '$user', public;"
        );
        p.reset_all();
        assert_eq!(
            p.diff(&reported, &mut applied).unwrap(),
            "RESET search_path;"
        );
    }

    #[test]
    fn list_values_from_the_startup_packet_are_set_as_lists() {
        let plain = ParamValue::Literal("app,public".into());
        assert_eq!(
            set_sql("search_path", &plain),
            "SELECT pg_catalog.set_config('search_path', 'app,public', false);"
        );
        // What the client wrote in its own SET is replayed as written.
        let written = ParamValue::Sql("app, public".into());
        assert_eq!(
            set_sql("search_path", &written),
            "SET search_path = app, public;"
        );
        assert_eq!(
            set_sql("TimeZone", &ParamValue::Literal("UTC".into())),
            "SET TimeZone = 'UTC';"
        );
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
    }
}
