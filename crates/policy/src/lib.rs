//! sluice-policy
