//! Password secrets: parsing, derivation, md5, and the auth_type rules.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{parse, parse_err};
use crate::{AuthType, Config, ScramSecret, Secret};

/// A SCRAM secret for the password "secret" with salt 0..16 and 4096 iterations (from Python's
/// hashlib, independently of the code under test).
const SCRAM_OF_SECRET: &str = "SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$THoPhoTAuqyoQsK4dUHncUzgfD8fdmhsgKZhWVqNP5U=:7YiHMMi2OcXGRogub03Ek06JRZ9bkhTOdCzHa5iPLiQ=";
/// md5("secret" + "app").
const MD5_OF_SECRET_APP: &str = "md56a422f785c9e20873908ce25d1736ae2";

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The StoredKey and ServerKey of `password` under `secret`'s salt and iteration count (RFC 5802).
fn keys_for(password: &str, secret: &ScramSecret) -> ([u8; 32], [u8; 32]) {
    let mut salt = secret.salt.clone();
    salt.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password.as_bytes(), &salt);
    let mut salted = u;
    for _ in 1..secret.iterations {
        u = hmac(password.as_bytes(), &u);
        salted.iter_mut().zip(u).for_each(|(s, x)| *s ^= x);
    }
    let stored: [u8; 32] = Sha256::digest(hmac(&salted, b"Client Key")).into();
    (stored, hmac(&salted, b"Server Key"))
}

#[test]
fn scram_secret_parses() {
    let Ok(Secret::Scram(s)) = Secret::parse(SCRAM_OF_SECRET) else {
        panic!("a SCRAM secret")
    };
    assert_eq!(s.iterations, 4096);
    assert_eq!(s.salt, (0u8..16).collect::<Vec<_>>());
    assert_eq!(s.stored_key[..4], [76, 122, 15, 134]);
    assert_eq!(s.server_key[..4], [237, 136, 135, 48]);
    assert_eq!(
        keys_for("secret", &s),
        (s.stored_key, s.server_key),
        "the test's RFC 5802 helper agrees"
    );
}

#[test]
fn plaintext_derives_a_matching_scram_secret_once() {
    let secret = Secret::parse("pässwörd").expect("plaintext");
    assert_eq!(secret.plaintext(), Some("pässwörd"));
    let Secret::Plain { scram, .. } = &secret else {
        panic!("plaintext")
    };
    assert_eq!((scram.iterations, scram.salt.len()), (4096, 16));
    // ASCII-only password, so SASLprep leaves it alone and the helper can check the keys.
    let secret = Secret::parse("secret").expect("plaintext");
    let scram = secret.scram().expect("derived");
    assert_eq!(
        keys_for("secret", scram),
        (scram.stored_key, scram.server_key)
    );
}

#[test]
fn md5_hashes() {
    let plain = Secret::parse("secret").expect("plaintext");
    assert_eq!(plain.md5_hash("app").as_deref(), Some(MD5_OF_SECRET_APP));
    // The first user's hash is kept; another user's is computed for it, not mixed up.
    assert_eq!(plain.md5_hash("app").as_deref(), Some(MD5_OF_SECRET_APP));
    assert_eq!(
        plain.md5_hash("other").as_deref(),
        Some("md5cd4d83dd461991e90309457c89673e8a")
    );
    // The answer to a password request with salt 1,2,3,4 (as libpq computes it).
    let stored = MD5_OF_SECRET_APP.strip_prefix("md5").expect("prefix");
    assert_eq!(
        &crate::md5_text(&[stored.as_bytes(), &[1, 2, 3, 4]]),
        b"md5911f527656472583a006e7727877b33e"
    );
    let md5 = Secret::parse(MD5_OF_SECRET_APP).expect("md5 secret");
    assert_eq!(md5.md5_hash("anyone").as_deref(), Some(MD5_OF_SECRET_APP));
    assert!(md5.plaintext().is_none() && md5.scram().is_none());
    let scram = Secret::parse(SCRAM_OF_SECRET).expect("scram secret");
    assert!(scram.md5_hash("app").is_none() && scram.plaintext().is_none());
}

#[test]
fn passwords_that_only_look_like_md5_are_plaintext() {
    // As in PostgreSQL: only "md5" + 32 lowercase hex digits is an md5 secret.
    for pw in ["md5secret", "md56A422F785C9E20873908CE25D1736AE2"] {
        let cfg = Config::parse(&format!("[users.app]\npassword = \"{pw}\""), None).unwrap();
        let secret = cfg.users["app"].password.as_ref().unwrap();
        assert_eq!(secret.plaintext(), Some(pw));
    }
}

#[test]
fn malformed_secrets_are_rejected_without_echoing_them() {
    let bad = [
        ("SCRAM-SHA-256$4096:AAEC", "no '$'"),
        ("SCRAM-SHA-256$x:AAECAwQFBgcICQoLDA0ODw==$THoPhoTAuqyoQsK4dUHncUzgfD8fdmhsgKZhWVqNP5U=:7YiHMMi2OcXGRogub03Ek06JRZ9bkhTOdCzHa5iPLiQ=", "iteration"),
        ("SCRAM-SHA-256$0:AAECAwQFBgcICQoLDA0ODw==$THoPhoTAuqyoQsK4dUHncUzgfD8fdmhsgKZhWVqNP5U=:7YiHMMi2OcXGRogub03Ek06JRZ9bkhTOdCzHa5iPLiQ=", "iteration"),
        ("SCRAM-SHA-256$4096:!!!$THoPhoTAuqyoQsK4dUHncUzgfD8fdmhsgKZhWVqNP5U=:7YiHMMi2OcXGRogub03Ek06JRZ9bkhTOdCzHa5iPLiQ=", "salt"),
        ("SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$QUJD:7YiHMMi2OcXGRogub03Ek06JRZ9bkhTOdCzHa5iPLiQ=", "32 bytes"),
        ("SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$THoPhoTAuqyoQsK4dUHncUzgfD8fdmhsgKZhWVqNP5U=", "no ':' between"),
        ("", "empty"),
        ("a\0b", "NUL"),
    ];
    for (secret, needle) in bad {
        let toml_string = secret.replace('\0', "\\u0000");
        let text = format!("[users.app]\npassword = \"{toml_string}\"\nauth_type = \"md5\"");
        let e = parse_err(&text);
        assert_eq!(e.key, "users.app.password", "{e}");
        assert!(
            e.message.contains(needle),
            "{e:?} should mention {needle:?}"
        );
        if secret.len() > 8 {
            assert!(
                !e.to_string().contains(&secret[8..]),
                "the secret leaked: {e}"
            );
        }
    }
}

#[test]
fn md5_secret_cannot_serve_scram() {
    let e = parse_err(&format!("[users.app]\npassword = \"{MD5_OF_SECRET_APP}\""));
    assert_eq!(e.key, "users.app.password");
    assert_eq!(
        e.message,
        "an md5 secret cannot verify SCRAM-SHA-256 logins; give the plaintext password or a SCRAM secret"
    );
    let e = parse_err(&format!(
        "[sluice]\nauth_type = \"md5\"\n[users.app]\npassword = \"{MD5_OF_SECRET_APP}\"\nauth_type = \"scram-sha-256\""
    ));
    assert_eq!(e.key, "users.app.password");
    let c = parse(&format!(
        "[sluice]\nauth_type = \"md5\"\n[users.app]\npassword = \"{MD5_OF_SECRET_APP}\""
    ));
    assert_eq!(c.auth_type("app"), AuthType::Md5);
    let c = parse(&format!(
        "[users.app]\npassword = \"{MD5_OF_SECRET_APP}\"\nauth_type = \"trust\""
    ));
    assert_eq!(c.auth_type("app"), AuthType::Trust);
}

#[test]
fn effective_auth_type() {
    let c = parse(&format!(
        "[sluice]\nauth_type = \"md5\"\n\
         [users.scram]\npassword = \"{SCRAM_OF_SECRET}\"\n\
         [users.plain]\npassword = \"secret\"\n\
         [users.trusted]\nauth_type = \"trust\"\n\
         [users.strict]\npassword = \"secret\"\nauth_type = \"scram-sha-256\"\n"
    ));
    assert_eq!(
        c.auth_type("scram"),
        AuthType::ScramSha256,
        "md5 upgrades for a SCRAM secret"
    );
    assert_eq!(c.auth_type("plain"), AuthType::Md5);
    assert_eq!(c.auth_type("trusted"), AuthType::Trust);
    assert_eq!(c.auth_type("strict"), AuthType::ScramSha256);
    assert_eq!(c.auth_type("unknown"), AuthType::Md5);
}

#[test]
fn secret_debug_is_redacted() {
    for text in ["hunter2", MD5_OF_SECRET_APP, SCRAM_OF_SECRET] {
        let secret = Secret::parse(text).expect("valid");
        let debug = format!("{secret:?} {:?}", secret.scram());
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("6a422f") && !debug.contains("THoPho"),
            "{debug}"
        );
    }
}
