//! PostgreSQL v3 wire-protocol codec for Sluice, with no IO.
//!
//! Decoders take a buffer and return `Ok(None)` while a message is incomplete, `Err(WireError)`
//! for malformed input, and never panic or allocate from an untrusted length. Encoders append a
//! whole message to a [`bytes::BytesMut`].
//!
//! - [`startup`]: the untagged first packet (StartupMessage, SSLRequest, CancelRequest, ...).
//! - [`frontend`]: client-to-server messages, message framing and client-side encoders.
//! - [`backend`]: server-to-client encoders and the decoders Sluice needs to inspect replies.
//! - [`error`]: SQLSTATEs, ErrorResponse fields and the crate's error type.
//! - [`sql`]: a tiny SQL prefix lexer for recognising session commands.

pub mod backend;
pub mod error;
pub mod frontend;
pub mod sql;
pub mod startup;

mod buf;

pub use backend::TransactionStatus;
pub use error::{ErrorFields, Severity, SqlState, WireError};
pub use frontend::{FrontendMessage, Header};
pub use sql::SessionCommand;
pub use startup::{ProtocolVersion, StartupPacket};

/// The largest startup packet accepted, in bytes (length field included), as in PostgreSQL.
pub const MAX_STARTUP_PACKET: usize = 10_000;
