//! SCRAM-SHA-256 (RFC 5802, RFC 7677) on both legs, without channel binding.
//!
//! Toward clients Sluice is the server: it verifies a proof against a stored secret without
//! knowing the password, and recovers the client's `ClientKey` from the proof. Toward PostgreSQL
//! Sluice is the client: it proves itself with keys derived from a password, or with a
//! `ClientKey` recovered from a client's own exchange (pass-through, as PgBouncer does).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use sluice_config::ScramSecret;

type HmacSha256 = Hmac<Sha256>;

/// Why a SCRAM exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// A message did not follow the SCRAM grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// Channel binding was requested; Sluice offers none without TLS.
    #[error("channel binding is not supported")]
    ChannelBinding,
    /// The nonce did not continue ours.
    #[error("SCRAM nonce mismatch")]
    Nonce,
    /// The proof did not verify: wrong password.
    #[error("SCRAM proof does not match")]
    Proof,
    /// The server's signature did not verify.
    #[error("server signature does not match")]
    ServerSignature,
    /// The server uses another salt or iteration count than the secret Sluice holds.
    #[error("the server's SCRAM salt or iteration count differs from the configured secret")]
    SaltMismatch,
    /// The server reported an error in its final message.
    #[error("server rejected SCRAM: {0}")]
    Server(String),
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
        // HMAC accepts keys of any length; this branch cannot be taken.
        return [0; 32];
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = a[i] ^ b[i];
    }
    out
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// PBKDF2-HMAC-SHA256 for one 32-byte block: SCRAM's `Hi()`.
pub fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for i in 0..32 {
            out[i] ^= u[i];
        }
    }
    out
}

/// The keys that prove an identity to a SCRAM server.
#[derive(Clone)]
pub struct ClientKeys {
    /// `HMAC(SaltedPassword, "Client Key")`.
    pub client_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`, to check the server's signature.
    pub server_key: [u8; 32],
    /// The salt these keys were derived with.
    pub salt: Vec<u8>,
    /// The iteration count these keys were derived with.
    pub iterations: u32,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(<redacted>)")
    }
}

impl ClientKeys {
    /// Derives keys from a password (PBKDF2: milliseconds of CPU).
    pub fn from_password(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        ClientKeys {
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
            salt: salt.to_vec(),
            iterations,
        }
    }
}

fn nonce() -> String {
    let mut raw = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

fn attr(part: &str, key: char) -> Result<&str, ScramError> {
    part.strip_prefix(key)
        .and_then(|r| r.strip_prefix('='))
        .ok_or(ScramError::Malformed("unexpected attribute"))
}

/// Sluice as the SCRAM server, verifying a client against a stored secret.
pub struct ServerExchange {
    secret: ScramSecret,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    gs2_header: String,
}

impl ServerExchange {
    /// Reads client-first-message and returns the exchange plus server-first-message.
    pub fn start(secret: ScramSecret, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("utf-8"))?;
        let mut parts = msg.splitn(3, ',');
        let cb = parts.next().ok_or(ScramError::Malformed("gs2 header"))?;
        match cb {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("gs2 flag")),
        }
        let authzid = parts.next().ok_or(ScramError::Malformed("gs2 header"))?;
        let bare = parts
            .next()
            .ok_or(ScramError::Malformed("client-first-bare"))?;
        let gs2_header = format!("{cb},{authzid},");
        let mut client_nonce = None;
        for p in bare.split(',') {
            if let Ok(r) = attr(p, 'r') {
                client_nonce = Some(r);
            }
        }
        let client_nonce = client_nonce.ok_or(ScramError::Malformed("nonce"))?;
        if client_nonce.is_empty() || client_nonce.contains(',') {
            return Err(ScramError::Malformed("nonce"));
        }
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        Ok((
            ServerExchange {
                secret,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
                gs2_header,
            },
            server_first,
        ))
    }

    /// Verifies client-final-message. Returns server-final-message and the client's ClientKey.
    pub fn finish(self, client_final: &[u8]) -> Result<(String, [u8; 32]), ScramError> {
        let msg = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("utf-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof"))?;
        let mut parts = without_proof.split(',');
        let cb = attr(parts.next().unwrap_or(""), 'c')?;
        let cb = B64
            .decode(cb)
            .map_err(|_| ScramError::Malformed("channel binding"))?;
        if cb != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBinding);
        }
        let nonce = attr(parts.next().unwrap_or(""), 'r')?;
        if !ct_eq(nonce.as_bytes(), self.nonce.as_bytes()) {
            return Err(ScramError::Nonce);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof"))?;
        let proof: [u8; 32] = proof
            .try_into()
            .map_err(|_| ScramError::Malformed("proof length"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        if !ct_eq(&sha256(&client_key), &self.secret.stored_key) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

/// A fake secret for unknown users, so that their exchange looks like a real one and fails only
/// at the proof, as PostgreSQL does ("mock authentication").
pub fn mock_secret(user: &str, mock_key: &[u8; 32]) -> ScramSecret {
    let salt = hmac(mock_key, user.as_bytes())[..16].to_vec();
    ScramSecret {
        iterations: 4096,
        salt,
        stored_key: hmac(mock_key, b"stored"),
        server_key: hmac(mock_key, b"server"),
    }
}

/// Sluice as the SCRAM client of a PostgreSQL server.
pub struct ClientExchange {
    client_first_bare: String,
    nonce: String,
}

impl ClientExchange {
    /// Starts an exchange; returns it and client-first-message.
    pub fn start() -> (Self, String) {
        let nonce = nonce();
        let bare = format!("n=,r={nonce}");
        (
            ClientExchange {
                client_first_bare: bare.clone(),
                nonce,
            },
            format!("n,,{bare}"),
        )
    }

    /// Reads server-first-message. `keys` gives the keys for the server's salt and iterations.
    /// Returns client-final-message and what is needed to check the server's final message.
    pub fn respond(
        self,
        server_first: &[u8],
        keys: impl FnOnce(&[u8], u32) -> Result<ClientKeys, ScramError>,
    ) -> Result<(String, [u8; 32]), ScramError> {
        let msg = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("utf-8"))?;
        let mut parts = msg.split(',');
        let nonce = attr(parts.next().unwrap_or(""), 'r')?;
        let salt = attr(parts.next().unwrap_or(""), 's')?;
        let iterations = attr(parts.next().unwrap_or(""), 'i')?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::Malformed("iterations"))?;
        let keys = keys(&salt, iterations)?;
        if keys.salt != salt || keys.iterations != iterations {
            return Err(ScramError::SaltMismatch);
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{},{}", self.client_first_bare, msg, without_proof);
        let stored_key = sha256(&keys.client_key);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof = xor(&keys.client_key, &client_signature);
        let expected_server = hmac(&keys.server_key, auth_message.as_bytes());
        Ok((
            format!("{without_proof},p={}", B64.encode(proof)),
            expected_server,
        ))
    }

    /// Checks server-final-message against the expected signature.
    pub fn verify_final(server_final: &[u8], expected: &[u8; 32]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("utf-8"))?;
        if let Ok(e) = attr(msg, 'e') {
            return Err(ScramError::Server(e.to_string()));
        }
        let v = attr(msg.split(',').next().unwrap_or(""), 'v')?;
        let v = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("verifier"))?;
        if ct_eq(&v, expected) {
            Ok(())
        } else {
            Err(ScramError::ServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_for(password: &str) -> ScramSecret {
        let salt = b"0123456789abcdef".to_vec();
        let keys = ClientKeys::from_password(password.as_bytes(), &salt, 4096);
        ScramSecret {
            iterations: 4096,
            salt,
            stored_key: sha256(&keys.client_key),
            server_key: keys.server_key,
        }
    }

    fn run(secret: ScramSecret, password: &str) -> Result<[u8; 32], ScramError> {
        let (client, first) = ClientExchange::start();
        let (server, server_first) = ServerExchange::start(secret, first.as_bytes())?;
        let (client_final, expected) = client.respond(server_first.as_bytes(), |salt, i| {
            Ok(ClientKeys::from_password(password.as_bytes(), salt, i))
        })?;
        let (server_final, key) = server.finish(client_final.as_bytes())?;
        ClientExchange::verify_final(server_final.as_bytes(), &expected)?;
        Ok(key)
    }

    #[test]
    fn both_sides_agree_and_the_client_key_is_recovered() {
        let key = run(secret_for("secret"), "secret").unwrap();
        let expected = ClientKeys::from_password(b"secret", b"0123456789abcdef", 4096);
        assert_eq!(key, expected.client_key);
    }

    #[test]
    fn a_wrong_password_fails_at_the_proof() {
        assert_eq!(run(secret_for("secret"), "nope"), Err(ScramError::Proof));
    }

    #[test]
    fn channel_binding_is_refused() {
        let r = ServerExchange::start(secret_for("x"), b"p=tls-server-end-point,,n=,r=abc");
        assert!(matches!(r, Err(ScramError::ChannelBinding)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for junk in [
            &b""[..],
            b",,,",
            b"n,,",
            b"n,,r=",
            b"\xff\xfe",
            b"n,,n=,r=a,b",
        ] {
            let _ = ServerExchange::start(secret_for("x"), junk);
        }
        let (s, _) = ServerExchange::start(secret_for("x"), b"n,,n=,r=abc").unwrap();
        assert!(s.finish(b"c=biws,r=zz,p=AAAA").is_err());
    }

    #[test]
    fn a_client_key_alone_logs_in() {
        let secret = secret_for("secret");
        let key = run(secret.clone(), "secret").unwrap();
        let keys = ClientKeys {
            client_key: key,
            server_key: secret.server_key,
            salt: secret.salt.clone(),
            iterations: 4096,
        };
        let (client, first) = ClientExchange::start();
        let (server, sf) = ServerExchange::start(secret, first.as_bytes()).unwrap();
        let (cf, _) = client.respond(sf.as_bytes(), |_, _| Ok(keys)).unwrap();
        assert!(server.finish(cf.as_bytes()).is_ok());
    }
}
