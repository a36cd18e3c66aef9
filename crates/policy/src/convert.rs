//! Conversions between the public Rust types and the WIT types, and validation of plugin
//! decisions (an invalid decision is a plugin failure).

use crate::runtime::{wit, Failure};
use crate::{
    ClientFacts, CompletionFacts, Outcome, PoolSnapshot, PressureAction, PressureFacts, Proceed,
    Rate, Rejection, SqlState, StatementKind, TransactionFacts,
};

/// Longest rejection message passed on to a client.
const MAX_MESSAGE: usize = 1024;
/// Longest limit key / route name accepted from a plugin.
const MAX_NAME: usize = 256;

/// Cuts `s` to at most `max` bytes, on a character boundary.
pub(crate) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = floor_char_boundary(s, max);
        s.truncate(cut);
    }
}

/// The largest index `<= max` that is a character boundary of `s`.
pub(crate) fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

pub(crate) fn client_facts(f: &ClientFacts<'_>) -> wit::ClientFacts {
    wit::ClientFacts {
        user: f.user.to_string(),
        database: f.database.to_string(),
        application_name: f.application_name.to_string(),
        addr: f.addr.map(|a| a.to_string()),
        port: f.port,
        tls: f.tls,
        params: f.params.to_vec(),
    }
}

pub(crate) fn pool(p: PoolSnapshot) -> wit::PoolSnapshot {
    wit::PoolSnapshot {
        size: p.size,
        active: p.active,
        idle: p.idle,
        waiting: p.waiting,
    }
}

fn kind(k: StatementKind) -> wit::StatementKind {
    match k {
        StatementKind::Select => wit::StatementKind::Select,
        StatementKind::Insert => wit::StatementKind::Insert,
        StatementKind::Update => wit::StatementKind::Update,
        StatementKind::Delete => wit::StatementKind::Delete,
        StatementKind::Ddl => wit::StatementKind::Ddl,
        StatementKind::Begin => wit::StatementKind::Begin,
        StatementKind::Commit => wit::StatementKind::Commit,
        StatementKind::Rollback => wit::StatementKind::Rollback,
        StatementKind::Set => wit::StatementKind::Set,
        StatementKind::Copy => wit::StatementKind::Copy,
        StatementKind::Other => wit::StatementKind::Other,
    }
}

pub(crate) fn tx_facts(f: &TransactionFacts<'_>, max_query_len: usize) -> wit::TxFacts {
    let q = &f.query[..floor_char_boundary(f.query, max_query_len)];
    wit::TxFacts {
        cookie: 0,
        class: f.class.to_string(),
        kind: kind(f.kind),
        in_transaction: f.in_transaction,
        query: q.to_string(),
        pool: pool(f.pool),
    }
}

pub(crate) fn pressure_facts(f: &PressureFacts) -> wit::PressureFacts {
    wit::PressureFacts {
        pool: f.pool.clone(),
        size: f.size,
        active: f.active,
        idle: f.idle,
        waiting: f.waiting,
        classes: f
            .classes
            .iter()
            .map(|c| wit::ClassPressure {
                name: c.name.clone(),
                active: c.active,
                waiting: c.waiting,
                oldest_wait_ms: c.oldest_wait_ms,
                max_active: c.max_active,
                max_wait_ms: c.max_wait_ms,
                shed_total: c.shed_total,
            })
            .collect(),
    }
}

pub(crate) fn completion_facts(f: &CompletionFacts<'_>) -> wit::CompletionFacts {
    wit::CompletionFacts {
        cookie: 0,
        class: f.class.to_string(),
        duration_us: f.duration_us,
        wait_us: f.wait_us,
        outcome: match f.outcome {
            Outcome::Committed => wit::Outcome::Committed,
            Outcome::RolledBack => wit::Outcome::RolledBack,
            Outcome::Failed => wit::Outcome::Failed,
            Outcome::Aborted => wit::Outcome::Aborted,
        },
    }
}

fn invalid(msg: String) -> Failure {
    Failure::Invalid(msg)
}

pub(crate) fn rejection(r: wit::Rejection) -> Result<Rejection, Failure> {
    let sqlstate = SqlState::parse(&r.sqlstate).ok_or_else(|| {
        invalid(format!(
            "SQLSTATE {:?} is not 5 characters of [0-9A-Z]",
            r.sqlstate
        ))
    })?;
    let mut message = r.message;
    if message.trim().is_empty() {
        return Err(invalid("empty rejection message".into()));
    }
    truncate(&mut message, MAX_MESSAGE);
    Ok(Rejection { sqlstate, message })
}

fn known_class(class: &str, classes: &[String]) -> Result<(), Failure> {
    if classes.iter().any(|c| c == class) {
        Ok(())
    } else {
        Err(invalid(format!("unknown class {class:?}")))
    }
}

fn name(what: &str, s: &str) -> Result<(), Failure> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(invalid(format!("{what} must be 1 to {MAX_NAME} bytes")));
    }
    Ok(())
}

/// A validated admission of one plugin.
pub(crate) fn admission(a: &wit::Admission, classes: &[String]) -> Result<Option<Rate>, Failure> {
    if let Some(c) = &a.class {
        known_class(c, classes)?;
    }
    if let Some(k) = &a.limit_key {
        name("limit-key", k)?;
    }
    // 0 would mean "no client may connect" / "no transaction may run": never what a plugin
    // wants, and 0 used to be read as unlimited by one limit and as a wait forever by the other.
    if a.key_max_clients == Some(0) {
        return Err(invalid(
            "key-max-clients must be at least 1 (none = no limit)".into(),
        ));
    }
    if a.key_max_active == Some(0) {
        return Err(invalid(
            "key-max-active must be at least 1 (none = no limit)".into(),
        ));
    }
    match a.key_rate {
        Some(r) if !(r.per_sec.is_finite() && r.per_sec > 0.0) || r.burst == 0 => {
            Err(invalid(format!(
                "key-rate needs a finite per-sec > 0 and burst >= 1, got {} / {}",
                r.per_sec, r.burst
            )))
        }
        Some(r) => Ok(Some(Rate {
            per_sec: r.per_sec,
            burst: r.burst,
        })),
        None => Ok(None),
    }
}

pub(crate) fn proceed(p: wit::Proceed) -> Result<Proceed, Failure> {
    if let Some(r) = &p.route {
        name("route", r)?;
    }
    Ok(Proceed {
        priority: p.priority,
        route: p.route,
        timeout_ms: p.timeout_ms,
    })
}

pub(crate) fn actions(
    list: Vec<wit::PressureAction>,
    classes: &[String],
) -> Result<Vec<PressureAction>, Failure> {
    list.into_iter()
        .map(|a| {
            known_class(&a.class, classes)?;
            Ok(PressureAction {
                class: a.class,
                max_active: a.max_active,
                max_wait_ms: a.max_wait_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut s = "ééé".to_string();
        truncate(&mut s, 3);
        assert_eq!(s, "é");
        assert_eq!(floor_char_boundary("abc", 10), 3);
    }

    #[test]
    fn rejections_are_validated() {
        let r = |s: &str, m: &str| {
            rejection(wit::Rejection {
                sqlstate: s.into(),
                message: m.into(),
            })
        };
        assert!(r("42501", "no").is_ok());
        assert!(r("4250", "no").is_err());
        assert!(r("4250a", "no").is_err());
        assert!(r("42501", " ").is_err());
        assert_eq!(SqlState::parse("58000"), Some(SqlState::SYSTEM_ERROR));
    }

    fn adm() -> wit::Admission {
        wit::Admission {
            class: None,
            priority: None,
            cookie: 0,
            limit_key: Some("app:x".into()),
            key_max_active: None,
            key_rate: None,
            key_max_clients: None,
        }
    }

    fn invalid_message(a: &wit::Admission) -> String {
        match admission(a, &[]) {
            Err(Failure::Invalid(m)) => m,
            other => panic!("expected an invalid decision, got {other:?}"),
        }
    }

    #[test]
    fn zero_key_limits_are_invalid() {
        assert!(admission(&adm(), &[]).is_ok());
        let ok = wit::Admission {
            key_max_active: Some(1),
            key_max_clients: Some(1),
            ..adm()
        };
        assert!(admission(&ok, &[]).is_ok());
        let clients = wit::Admission {
            key_max_clients: Some(0),
            ..adm()
        };
        assert_eq!(
            invalid_message(&clients),
            "key-max-clients must be at least 1 (none = no limit)"
        );
        let active = wit::Admission {
            key_max_active: Some(0),
            ..adm()
        };
        assert_eq!(
            invalid_message(&active),
            "key-max-active must be at least 1 (none = no limit)"
        );
    }
}
