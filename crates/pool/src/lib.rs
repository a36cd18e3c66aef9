//! Server-connection pools for Sluice, generic over the connection type.
//!
//! A [`Pool`] holds idle connections, opens new ones through a [`Connector`], and queues
//! requests in a [`sched::Scheduler`]: a priority queue with aging, class quotas, reserved
//! connections and per-client keys. A [`Guard`] returns its connection on drop, or closes it when
//! the connection says it is not reusable. Nothing here knows about SQL or WebAssembly.

pub mod clock;
pub mod limit;
mod pool;
pub mod sched;
pub mod stats;
pub mod timer;

pub use limit::{Permit, SharedLimit};
pub use pool::{BoxFuture, CheckoutError, Connector, Guard, Pool, PoolSettings, Poolable};
pub use sched::{ClassOverride, ClassSnapshot, ClassSpec, Grant, KeyLimit, Ticket};
pub use stats::{Histogram, PoolStats, WAIT_BUCKETS};

#[cfg(test)]
mod tests;
