//! Test harness for Sluice's integration tests: a real PostgreSQL started with `initdb` in a
//! temporary directory on a free port, and Sluice started in-process on `127.0.0.1:0` in front of it.
//!
//! Tests live in `tests/integration/` (one binary, one module per area) and use
//! [`harness::PgCluster::shared`] plus [`harness::SluiceHandle`].

pub mod harness;

pub use harness::*;
