//! Client passwords in the forms PostgreSQL stores them: plaintext, a SCRAM-SHA-256 secret, or an
//! md5 hash. Parsed once at load; `Debug` never shows a password, hash or key.

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use md5::{Digest as _, Md5};

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";
const MD5_PREFIX: &str = "md5";

/// A user's password as given in `[users.NAME] password`.
#[derive(Clone)]
pub enum Secret {
    /// A plaintext password. Verifies SCRAM-SHA-256 (through `scram`) and md5 logins.
    Plain {
        /// The password itself.
        password: String,
        /// The SCRAM secret derived from `password` once, at load (random salt, 4096 iterations).
        scram: ScramSecret,
        /// The md5 secret of the first user that asked for one (the user this password belongs
        /// to), kept so an md5 login hashes only the salted answer: `(user, "md5" + hex)`.
        md5: OnceLock<(String, String)>,
    },
    /// A `SCRAM-SHA-256$...` secret as in `pg_authid.rolpassword`. Verifies SCRAM logins only.
    Scram(ScramSecret),
    /// An md5 secret as in `pg_authid.rolpassword`. Verifies md5 logins only.
    Md5 {
        /// `"md5"` followed by 32 lowercase hex digits: md5(password + user name).
        hash: String,
    },
}

/// The parts of a SCRAM-SHA-256 secret (RFC 5802, RFC 7677) that a server needs.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count sent to the client.
    pub iterations: u32,
    /// Salt sent to the client.
    pub salt: Vec<u8>,
    /// H(ClientKey): checks the client's proof.
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key"): signs the server's final message.
    pub server_key: [u8; 32],
}

impl Secret {
    /// Parses a password setting: a `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// secret, an `md5` + 32 lowercase hex digit secret, or else a plaintext password (whose SCRAM
    /// secret is derived here, which takes a few milliseconds).
    ///
    /// The error message never contains the password.
    pub fn parse(text: &str) -> Result<Secret, String> {
        if text.is_empty() {
            return Err("the password is empty; leave the key out for a user without one".into());
        }
        if text.contains('\0') {
            return Err("a password cannot contain a NUL character".into());
        }
        if text.starts_with(SCRAM_PREFIX) {
            return ScramSecret::parse(text).map(Secret::Scram);
        }
        if let Some(hex) = text.strip_prefix(MD5_PREFIX) {
            if hex.len() == 32
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Ok(Secret::Md5 {
                    hash: text.to_owned(),
                });
            }
            // Anything else starting with "md5" is a plaintext password, as in PostgreSQL.
        }
        let derived = postgres_protocol::password::scram_sha_256(text.as_bytes());
        let scram = ScramSecret::parse(&derived)
            .map_err(|e| format!("cannot derive a SCRAM secret from the password: {e}"))?;
        Ok(Secret::Plain {
            password: text.to_owned(),
            scram,
            md5: OnceLock::new(),
        })
    }

    /// The plaintext password, if the configuration gave one.
    pub fn plaintext(&self) -> Option<&str> {
        match self {
            Secret::Plain { password, .. } => Some(password),
            Secret::Scram(_) | Secret::Md5 { .. } => None,
        }
    }

    /// The md5 secret for `user` (`"md5"` + md5(password + user)), or `None` for a SCRAM secret,
    /// which cannot verify md5 logins.
    pub fn md5_hash(&self, user: &str) -> Option<Cow<'_, str>> {
        match self {
            Secret::Plain { password, md5, .. } => {
                let (of, hash) = md5.get_or_init(|| (user.to_owned(), md5_secret(password, user)));
                Some(if of == user {
                    Cow::Borrowed(hash)
                } else {
                    Cow::Owned(md5_secret(password, user))
                })
            }
            Secret::Md5 { hash } => Some(Cow::Borrowed(hash)),
            Secret::Scram(_) => None,
        }
    }

    /// The SCRAM secret, or `None` for an md5 secret, which cannot verify SCRAM logins.
    pub fn scram(&self) -> Option<&ScramSecret> {
        match self {
            Secret::Plain { scram, .. } | Secret::Scram(scram) => Some(scram),
            Secret::Md5 { .. } => None,
        }
    }
}

/// `"md5"` + hex(md5(password + user)), as PostgreSQL stores md5 passwords.
pub fn md5_secret(password: &str, user: &str) -> String {
    let text = md5_text(&[password.as_bytes(), user.as_bytes()]);
    // ASCII by construction.
    String::from_utf8_lossy(&text).into_owned()
}

/// `"md5"` + hex(md5(the parts, one after the other)): the form of md5 secrets and of the
/// answer to an md5 password request, which hashes a secret's hex digits and the salt.
pub fn md5_text(parts: &[&[u8]]) -> [u8; 35] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut md5 = Md5::new();
    for p in parts {
        md5.update(p);
    }
    let mut out = [0u8; 35];
    out[..3].copy_from_slice(MD5_PREFIX.as_bytes());
    for (i, b) in md5.finalize().into_iter().enumerate() {
        out[3 + 2 * i] = HEX[usize::from(b >> 4)];
        out[4 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    out
}

/// Two plaintext secrets are equal when their passwords are: the derived SCRAM secret has a random
/// salt, and reloading an unchanged file must not look like a change.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Secret::Plain { password: a, .. }, Secret::Plain { password: b, .. }) => a == b,
            (Secret::Scram(a), Secret::Scram(b)) => a == b,
            (Secret::Md5 { hash: a }, Secret::Md5 { hash: b }) => a == b,
            _ => false,
        }
    }
}

impl Eq for Secret {}

impl ScramSecret {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>`.
    pub fn parse(text: &str) -> Result<ScramSecret, String> {
        const FORM: &str = "expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>";
        let bad = |what: &str| format!("malformed SCRAM-SHA-256 secret: {what} ({FORM})");
        let rest = text
            .strip_prefix(SCRAM_PREFIX)
            .ok_or_else(|| bad("wrong prefix"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or_else(|| bad("no '$' before the keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or_else(|| bad("no ':' after the iterations"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or_else(|| bad("no ':' between the keys"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("the iteration count is not a positive integer"))?;
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| bad("the salt is not base64"))?;
        if salt.is_empty() {
            return Err(bad("the salt is empty"));
        }
        let key = |b64: &str, name: &str| -> Result<[u8; 32], String> {
            let bytes = STANDARD
                .decode(b64)
                .map_err(|_| bad(&format!("the {name} is not base64")))?;
            <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| bad(&format!("the {name} is not 32 bytes long")))
        };
        Ok(ScramSecret {
            iterations,
            salt,
            stored_key: key(stored, "StoredKey")?,
            server_key: key(server, "ServerKey")?,
        })
    }
}

/// Prints `<redacted>` in place of a secret value.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Secret::Plain { .. } => "Plain",
            Secret::Scram(_) => "Scram",
            Secret::Md5 { .. } => "Md5",
        };
        f.debug_tuple(kind).field(&Redacted).finish()
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt", &Redacted)
            .field("stored_key", &Redacted)
            .field("server_key", &Redacted)
            .finish()
    }
}
