//! The roles and databases every [`PgCluster`](super::PgCluster) is created with, and the
//! credentials tests use to log in through Sluice.
//!
//! | role         | server auth (pg_hba)  | password       | notes                                   |
//! |--------------|-----------------------|----------------|-----------------------------------------|
//! | `postgres`   | scram-sha-256         | `superpw`      | superuser, used by the harness itself   |
//! | `app`        | scram-sha-256         | `secret`       | owns `appdb`                            |
//! | `md5user`    | md5                   | `secret-md5`   | stored as an md5 hash                   |
//! | `trusted`    | trust                 | none           |                                         |
//! | `scram_only` | scram-sha-256         | `scramsecret`  | for SCRAM pass-through (secret in Sluice's config) |
//!
//! Databases: `appdb` (owned by `app`, holds the fixture table [`FIXTURE_TABLE`]) and `otherdb`.

/// How a role authenticates, both to PostgreSQL (pg_hba) and, by default, to Sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// SCRAM-SHA-256.
    Scram,
    /// MD5 password hash.
    Md5,
    /// No password.
    Trust,
}

impl Auth {
    /// The value of `auth_type` in Sluice's TOML config.
    pub fn toml_name(self) -> &'static str {
        match self {
            Auth::Scram => "scram-sha-256",
            Auth::Md5 => "md5",
            Auth::Trust => "trust",
        }
    }
}

/// A role's name, its password and how it authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Login {
    /// Role name.
    pub user: &'static str,
    /// Password in clear text, `None` for trust.
    pub password: Option<&'static str>,
    /// Authentication method.
    pub auth: Auth,
}

/// The superuser the harness uses for setup and inspection.
pub const SUPERUSER: Login = Login {
    user: "postgres",
    password: Some("superpw"),
    auth: Auth::Scram,
};
/// The ordinary application role; owns `appdb`.
pub const APP: Login = Login {
    user: "app",
    password: Some("secret"),
    auth: Auth::Scram,
};
/// A role whose password is stored as md5 and which pg_hba authenticates with md5.
/// (Its password must not start with `md5`: Sluice's config reads such a value as an md5 hash.)
pub const MD5USER: Login = Login {
    user: "md5user",
    password: Some("secret-md5"),
    auth: Auth::Md5,
};
/// A role pg_hba lets in without a password.
pub const TRUSTED: Login = Login {
    user: "trusted",
    password: None,
    auth: Auth::Trust,
};
/// A SCRAM role for pass-through tests: give Sluice its secret from
/// [`PgCluster::scram_secret`](super::PgCluster::scram_secret), not its password.
pub const SCRAM_ONLY: Login = Login {
    user: "scram_only",
    password: Some("scramsecret"),
    auth: Auth::Scram,
};

/// Every non-superuser role, in creation order.
pub const ALL: [Login; 4] = [APP, MD5USER, TRUSTED, SCRAM_ONLY];

/// Databases created besides `postgres`.
pub const DATABASES: [&str; 2] = ["appdb", "otherdb"];

/// A table in `appdb`: `id int primary key` from 1 to [`FIXTURE_ROWS`], `label text` = `'item-' || id`.
/// Readable by every role. The driver programs in `tests/drivers/` read it.
pub const FIXTURE_TABLE: &str = "sluice_fixture";
/// Number of rows in [`FIXTURE_TABLE`].
pub const FIXTURE_ROWS: i32 = 1000;

/// The clear-text password of a known role, if it has one.
pub fn password_for(user: &str) -> Option<&'static str> {
    std::iter::once(SUPERUSER)
        .chain(ALL)
        .find(|l| l.user == user)
        .and_then(|l| l.password)
}
