//! sluice-pool
