//! Integration tests: one binary, one module per area. Each test starts Sluice in-process on
//! `127.0.0.1:0` in front of the shared PostgreSQL cluster (see `sluice_tests::harness`).

mod admin;
mod auth;
mod badinput;
mod cancel;
mod core;
mod drivers;
mod lifecycle;
mod limits;
mod listen;
mod metrics;
mod params;
mod policy;
mod prepared;
mod protocol;
mod reload;
mod reset;
mod scheduler;
mod shutdown;
mod smoke;
mod state;
mod util;
