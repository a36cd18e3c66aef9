//! Building blocks for integration tests.
//!
//! - [`PgCluster`]: a throwaway PostgreSQL cluster with known roles and databases ([`roles`]).
//! - [`SluiceHandle`] and [`ConfigBuilder`]: Sluice running in-process in front of a cluster.
//! - [`RawClient`]: a wire-level client for tests that need exact bytes and messages.
//! - [`net`]: free ports and bounded polling (never a bare sleep as synchronisation).
//! - [`drivers`]: locating and running the driver check programs in `tests/drivers/`.

pub mod drivers;
pub mod net;
pub mod ops;
pub mod postgres;
mod process;
pub mod raw;
pub mod roles;
pub mod sluice;

pub use net::{eventually, free_port, wait_until};
pub use postgres::{PgCluster, PgOptions};
pub use raw::{BackendMessage, RawClient};
pub use roles::{Auth, Login, APP, MD5USER, SCRAM_ONLY, SUPERUSER, TRUSTED};
pub use sluice::{ConfigBuilder, SluiceHandle};

use std::sync::Once;

/// Installs a tracing subscriber once per test binary. `RUST_LOG` selects what is shown
/// (default `warn`); output goes through the test writer, so it is captured per test.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // A second global subscriber (another harness in the same process) is not an error here.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
