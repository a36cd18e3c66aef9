//! SQLSTATE codes, ErrorResponse/NoticeResponse fields, and the codec's error type.

use std::fmt;

/// A five-character SQLSTATE code such as `08P01`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

impl SqlState {
    /// `00000` successful_completion.
    pub const SUCCESSFUL_COMPLETION: SqlState = SqlState::new(b"00000");
    /// `08006` connection_failure.
    pub const CONNECTION_FAILURE: SqlState = SqlState::new(b"08006");
    /// `08P01` protocol_violation.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState::new(b"08P01");
    /// `0A000` feature_not_supported.
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState::new(b"0A000");
    /// `22023` invalid_parameter_value.
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState::new(b"22023");
    /// `25P02` in_failed_sql_transaction.
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState::new(b"25P02");
    /// `25P03` idle_in_transaction_session_timeout.
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: SqlState = SqlState::new(b"25P03");
    /// `26000` invalid_sql_statement_name (unknown prepared statement).
    pub const INVALID_SQL_STATEMENT_NAME: SqlState = SqlState::new(b"26000");
    /// `28000` invalid_authorization_specification.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState::new(b"28000");
    /// `28P01` invalid_password.
    pub const INVALID_PASSWORD: SqlState = SqlState::new(b"28P01");
    /// `3D000` invalid_catalog_name (unknown database).
    pub const INVALID_CATALOG_NAME: SqlState = SqlState::new(b"3D000");
    /// `42501` insufficient_privilege.
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState::new(b"42501");
    /// `42601` syntax_error.
    pub const SYNTAX_ERROR: SqlState = SqlState::new(b"42601");
    /// `42P05` duplicate_prepared_statement.
    pub const DUPLICATE_PREPARED_STATEMENT: SqlState = SqlState::new(b"42P05");
    /// `55000` object_not_in_prerequisite_state.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState::new(b"55000");
    /// `53300` too_many_connections.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState::new(b"53300");
    /// `54000` program_limit_exceeded.
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState::new(b"54000");
    /// `57014` query_canceled.
    pub const QUERY_CANCELED: SqlState = SqlState::new(b"57014");
    /// `57P01` admin_shutdown.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState::new(b"57P01");
    /// `57P03` cannot_connect_now.
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState::new(b"57P03");
    /// `57P05` idle_session_timeout.
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState::new(b"57P05");
    /// `58000` system_error.
    pub const SYSTEM_ERROR: SqlState = SqlState::new(b"58000");
    /// `XX000` internal_error.
    pub const INTERNAL_ERROR: SqlState = SqlState::new(b"XX000");

    /// Wraps a code. Use [`SqlState::parse`] for untrusted text; a code built here from bytes
    /// that are not ASCII shows as `XX000`.
    pub const fn new(code: &[u8; 5]) -> Self {
        SqlState(*code)
    }

    /// The code as text, e.g. `"08P01"`.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    /// Parses exactly five characters of `[0-9A-Z]`.
    pub fn parse(s: &str) -> Option<SqlState> {
        let code: [u8; 5] = s.as_bytes().try_into().ok()?;
        code.iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            .then_some(SqlState(code))
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The severity of an ErrorResponse or NoticeResponse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    /// `ERROR`: the current command failed.
    Error,
    /// `FATAL`: the session ends.
    Fatal,
    /// `PANIC`: every session ends.
    Panic,
    /// `WARNING` (notice).
    Warning,
    /// `NOTICE` (notice).
    Notice,
    /// `DEBUG` (notice).
    Debug,
    /// `INFO` (notice).
    Info,
    /// `LOG` (notice).
    Log,
}

impl Severity {
    /// The non-localised name, e.g. `"ERROR"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }

    /// Parses a non-localised name as sent in the `V` field (`"ERROR"`, ...).
    pub fn parse(s: &str) -> Option<Severity> {
        Some(match s {
            "ERROR" => Severity::Error,
            "FATAL" => Severity::Fatal,
            "PANIC" => Severity::Panic,
            "WARNING" => Severity::Warning,
            "NOTICE" => Severity::Notice,
            "DEBUG" => Severity::Debug,
            "INFO" => Severity::Info,
            "LOG" => Severity::Log,
            _ => return None,
        })
    }
}

/// The fields of an ErrorResponse or NoticeResponse.
///
/// Encoding writes `S` and `V` (both from `severity`), `C`, `M`, `D` and `H` when present, then
/// `other` in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S`/`V`: the severity.
    pub severity: Severity,
    /// `C`: the SQLSTATE.
    pub code: SqlState,
    /// `M`: the primary message.
    pub message: String,
    /// `D`: an optional detail message.
    pub detail: Option<String>,
    /// `H`: an optional hint.
    pub hint: Option<String>,
    /// Every other field (position, where, schema, file, line, ...), as (field type, value).
    pub other: Vec<(u8, String)>,
}

impl ErrorFields {
    fn new(severity: Severity, code: SqlState, message: String) -> Self {
        ErrorFields {
            severity,
            code,
            message,
            detail: None,
            hint: None,
            other: Vec::new(),
        }
    }

    /// An `ERROR` with the given code and message.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message.into())
    }

    /// A `FATAL` error with the given code and message (the session ends after it).
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message.into())
    }

    /// A `NOTICE` with code `00000`.
    pub fn notice(message: impl Into<String>) -> Self {
        Self::new(
            Severity::Notice,
            SqlState::SUCCESSFUL_COMPLETION,
            message.into(),
        )
    }

    /// Sets the detail (`D`) field.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the hint (`H`) field.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// Malformed or unsupported input found by a decoder.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A startup packet length outside 8..=10000.
    #[error("invalid length of startup packet: {0}")]
    InvalidStartupLength(u32),
    /// A startup packet asking for a protocol this codec cannot speak.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2")]
    UnsupportedProtocol {
        /// The requested major version (1234 for an unknown special request code).
        major: u16,
        /// The requested minor version.
        minor: u16,
    },
    /// The client began a TLS handshake directly (sslnegotiation=direct).
    #[error("direct TLS connection without SSLRequest")]
    DirectTls,
    /// The startup packet has no (or an empty) `user` parameter.
    #[error("no PostgreSQL user name specified in startup packet")]
    MissingUser,
    /// A message length field below 4.
    #[error("invalid message length {len} for message type {:?}", char::from(*tag))]
    InvalidMessageLength {
        /// The message type byte.
        tag: u8,
        /// The length field.
        len: u32,
    },
    /// A message longer than the configured maximum.
    #[error("message type {:?} of length {len} exceeds the maximum of {max}", char::from(*tag))]
    MessageTooLarge {
        /// The message type byte.
        tag: u8,
        /// The length field.
        len: u32,
        /// The maximum allowed.
        max: u32,
    },
    /// A message whose body does not match its type's layout.
    #[error("invalid message format for message type {:?}: {what}", char::from(*tag))]
    Malformed {
        /// The message type byte (0 for startup packets).
        tag: u8,
        /// Which part was wrong.
        what: &'static str,
    },
    /// A string that had to be UTF-8 was not.
    #[error("invalid UTF-8 in {what}")]
    InvalidUtf8 {
        /// Which string.
        what: &'static str,
    },
}

impl WireError {
    /// The SQLSTATE to report this error with, as PostgreSQL would: `0A000` for an unsupported
    /// protocol or direct TLS, `28000` for a missing user, and `08P01` (protocol_violation) for
    /// everything else, including oversized messages.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            WireError::UnsupportedProtocol { .. } | WireError::DirectTls => {
                SqlState::FEATURE_NOT_SUPPORTED
            }
            WireError::MissingUser => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            WireError::InvalidStartupLength(_)
            | WireError::MessageTooLarge { .. }
            | WireError::InvalidMessageLength { .. }
            | WireError::Malformed { .. }
            | WireError::InvalidUtf8 { .. } => SqlState::PROTOCOL_VIOLATION,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_parse_and_display() {
        assert_eq!(SqlState::parse("08P01"), Some(SqlState::PROTOCOL_VIOLATION));
        assert_eq!(SqlState::PROTOCOL_VIOLATION.as_str(), "08P01");
        assert_eq!(SqlState::INTERNAL_ERROR.to_string(), "XX000");
        for bad in ["", "0800", "08p01", "08P011", "08P0!", "é8P0"] {
            assert_eq!(SqlState::parse(bad), None, "{bad}");
        }
        assert_eq!(SqlState::new(&[0xff; 5]).as_str(), "XX000");
    }

    #[test]
    fn severity_names_round_trip() {
        for s in [
            Severity::Error,
            Severity::Fatal,
            Severity::Panic,
            Severity::Warning,
            Severity::Notice,
            Severity::Debug,
            Severity::Info,
            Severity::Log,
        ] {
            assert_eq!(Severity::parse(s.as_str()), Some(s));
        }
        assert_eq!(Severity::parse("FEHLER"), None);
    }

    #[test]
    fn builders_set_fields() {
        let e = ErrorFields::fatal(SqlState::INVALID_PASSWORD, "nope")
            .with_detail("d")
            .with_hint("h");
        assert_eq!(e.severity, Severity::Fatal);
        assert_eq!(e.code, SqlState::INVALID_PASSWORD);
        assert_eq!(e.detail.as_deref(), Some("d"));
        assert_eq!(e.hint.as_deref(), Some("h"));
        let n = ErrorFields::notice("hi");
        assert_eq!(n.code, SqlState::SUCCESSFUL_COMPLETION);
        assert_eq!(n.severity, Severity::Notice);
    }

    #[test]
    fn error_sqlstates() {
        assert_eq!(
            WireError::UnsupportedProtocol { major: 5, minor: 0 }.sqlstate(),
            SqlState::FEATURE_NOT_SUPPORTED
        );
        assert_eq!(
            WireError::InvalidStartupLength(3).sqlstate(),
            SqlState::PROTOCOL_VIOLATION
        );
        assert_eq!(
            WireError::MissingUser.sqlstate(),
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        );
    }
}
