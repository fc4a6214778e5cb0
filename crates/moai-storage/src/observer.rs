//! A hook through which a backend reports how its writes perform, so the server edge can expose
//! them in /metrics without the storage room depending on a metrics library.

use std::time::Duration;

pub trait StorageObserver: Send + Sync + 'static {
    /// One group commit finished: `writes` jobs shared one transaction that took `latency` from
    /// BEGIN to durable COMMIT.
    fn batch_committed(&self, writes: usize, latency: Duration);

    /// Writes failed because the storage did (disk full, I/O error, read-only file, …), not
    /// because of what they wrote. Reported on every such failure until [`storage_ok`].
    ///
    /// [`storage_ok`]: StorageObserver::storage_ok
    fn storage_failed(&self, _reason: &str) {}

    /// A commit went through with no storage failure: writes work (again).
    fn storage_ok(&self) {}
}

/// For tests and tools that do not export metrics.
pub struct NoopObserver;

impl StorageObserver for NoopObserver {
    fn batch_committed(&self, _writes: usize, _latency: Duration) {}
}
