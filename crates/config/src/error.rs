//! The one error type of this crate: which file, which key, what is wrong.

use std::fmt;
use std::path::PathBuf;

/// A configuration file that cannot be used, and why.
///
/// Displayed as `FILE: KEY: MESSAGE`. The file part is left out when the text did not come from a
/// file, and the key part is left out when the problem is not tied to one key (an unreadable file,
/// a TOML syntax error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the configuration came from, if any.
    pub file: Option<PathBuf>,
    /// Dotted path of the offending key, e.g. `databases.appdb.port`; empty when there is none.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl ConfigError {
    /// An error about `key` (no file yet: [`crate::Config::parse`] fills it in).
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}
