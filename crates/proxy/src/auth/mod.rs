//! Client authentication: SCRAM-SHA-256, md5 or trust, per user, answering failures with the
//! same SQLSTATEs and message shapes as PostgreSQL. An unknown user gets a full mock exchange
//! and the same 28P01 as a wrong password, so roles cannot be probed.

pub mod scram;

use bytes::Bytes;
use rand::RngCore;

use sluice_config::{AuthType, Secret};
use sluice_wire::{backend, frontend, ErrorFields, SqlState};

use crate::io::{ClientIo, ReadError};
use crate::server::md5_answer;
use scram::{ClientKeys, ServerExchange};

/// Largest authentication message accepted from a client.
const MAX_AUTH_MESSAGE: u32 = 16 * 1024;

/// The result of authenticating a client.
pub enum Outcome {
    /// Authenticated; with the SCRAM keys recovered from the proof, for pass-through.
    Ok(Option<ClientKeys>),
    /// Refused with this FATAL error.
    Refused(ErrorFields),
}

fn password_failed(user: &str) -> ErrorFields {
    ErrorFields::fatal(
        SqlState::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

async fn password_message(io: &mut ClientIo) -> Result<Bytes, ReadError> {
    let (h, body) = io.message(MAX_AUTH_MESSAGE).await?;
    if h.tag != b'p' {
        return Err(ReadError::Wire(sluice_wire::WireError::Malformed {
            tag: h.tag,
            what: "expected a password message",
        }));
    }
    Ok(body)
}

/// Authenticates `user` with `method`. `secret` is `None` for unknown users.
pub async fn authenticate(
    io: &mut ClientIo,
    user: &str,
    known: bool,
    method: AuthType,
    secret: Option<&Secret>,
    mock_key: &[u8; 32],
) -> Result<Outcome, ReadError> {
    match method {
        AuthType::Trust => {
            if known {
                Ok(Outcome::Ok(None))
            } else {
                Ok(Outcome::Refused(ErrorFields::fatal(
                    SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("role \"{user}\" does not exist"),
                )))
            }
        }
        AuthType::Md5
            if secret.and_then(|s| s.scram()).is_none()
                || secret.and_then(|s| s.plaintext()).is_some() =>
        {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            backend::encode_auth_md5(&mut io.wbuf, salt);
            io.flush().await?;
            let body = password_message(io).await?;
            let given = frontend::parse_password_message(&body)?;
            let ok = known
                && secret
                    .and_then(|s| s.md5_hash(user))
                    .is_some_and(|stored| scram::ct_eq(given, &md5_answer(&stored, salt)));
            Ok(if ok {
                Outcome::Ok(None)
            } else {
                Outcome::Refused(password_failed(user))
            })
        }
        // SCRAM, and md5 over a SCRAM-only secret (upgraded, as PostgreSQL and PgBouncer do).
        _ => {
            let real = if known {
                secret.and_then(|s| s.scram()).cloned()
            } else {
                None
            };
            let is_real = real.is_some();
            let stored = real.unwrap_or_else(|| scram::mock_secret(user, mock_key));
            backend::encode_auth_sasl(&mut io.wbuf, &["SCRAM-SHA-256"]);
            io.flush().await?;
            let body = password_message(io).await?;
            let (mechanism, data) = frontend::parse_sasl_initial_response(&body)?;
            if mechanism != "SCRAM-SHA-256" {
                return Ok(Outcome::Refused(ErrorFields::fatal(
                    SqlState::PROTOCOL_VIOLATION,
                    "client selected an invalid SASL authentication mechanism",
                )));
            }
            let (exchange, server_first) = match ServerExchange::start(stored.clone(), &data) {
                Ok(x) => x,
                Err(e) => {
                    return Ok(Outcome::Refused(ErrorFields::fatal(
                        SqlState::PROTOCOL_VIOLATION,
                        format!("malformed SCRAM message: {e}"),
                    )))
                }
            };
            backend::encode_auth_sasl_continue(&mut io.wbuf, server_first.as_bytes());
            io.flush().await?;
            let body = password_message(io).await?;
            match exchange.finish(&body) {
                Ok((server_final, client_key)) if is_real => {
                    backend::encode_auth_sasl_final(&mut io.wbuf, server_final.as_bytes());
                    Ok(Outcome::Ok(Some(ClientKeys {
                        client_key,
                        server_key: stored.server_key,
                        salt: stored.salt.clone(),
                        iterations: stored.iterations,
                    })))
                }
                _ => Ok(Outcome::Refused(password_failed(user))),
            }
        }
    }
}
