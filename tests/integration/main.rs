//! Integration tests: one binary, one module per area. Each test starts Sluice in-process on
//! `127.0.0.1:0` in front of the shared PostgreSQL cluster (see `sluice_tests::harness`).

mod smoke;
