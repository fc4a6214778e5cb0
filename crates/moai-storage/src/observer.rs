//! A hook through which a backend reports how its writes perform, so the server edge can expose
//! them in /metrics without the storage room depending on a metrics library.

use std::time::Duration;

pub trait StorageObserver: Send + Sync + 'static {
    /// One group commit finished: `writes` jobs shared one transaction that took `latency` from
    /// BEGIN to durable COMMIT.
    fn batch_committed(&self, writes: usize, latency: Duration);
}

/// For tests and tools that do not export metrics.
pub struct NoopObserver;

impl StorageObserver for NoopObserver {
    fn batch_committed(&self, _writes: usize, _latency: Duration) {}
}
