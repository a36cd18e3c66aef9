//! The crate's error type.

use std::path::PathBuf;

/// Why a plugin could not be loaded (or a simulation could not run). Hook calls never fail: their
/// failures are handled inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The plugin file could not be read.
    #[error("policy plugin {plugin:?}: cannot read {}: {source}", path.display())]
    Read {
        /// Plugin name.
        plugin: String,
        /// File.
        path: PathBuf,
        /// IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid component of the `sluice:policy/policy` world, or `init` failed.
    #[error("policy plugin {plugin:?} ({}): {cause}", path.display())]
    Load {
        /// Plugin name.
        plugin: String,
        /// File.
        path: PathBuf,
        /// What went wrong.
        cause: String,
    },
    /// Two plugins share a name.
    #[error("policy plugin {0:?} is configured twice")]
    DuplicateName(String),
    /// The wasmtime engine could not be created.
    #[error("policy engine: {0}")]
    Engine(String),
    /// A simulation input line is malformed.
    #[error("events line {line}: {message}")]
    Event {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Writing simulation output failed.
    #[error("writing simulation output: {0}")]
    Io(#[from] std::io::Error),
}
