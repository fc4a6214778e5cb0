//! Graceful shutdown, explicit as in mini-redis: one token that every long-lived task watches,
//! and one tracker that knows which session tasks are still running.
//!
//! On the first signal the binary calls [`Shutdown::trigger`]: the accept loop stops, every
//! WebSocket session sees the token and closes with 1001 "going away" after flushing what it
//! owes, and the binary waits for [`Shutdown::drained`] up to the grace period before closing
//! storage.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolves when shutdown has begun.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Runs a session task that shutdown waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Tracks a future that is spawned elsewhere (a WebSocket session started by the upgrade).
    pub fn track<F: Future>(&self, task: F) -> impl Future<Output = F::Output> {
        self.tracker.track_future(task)
    }

    pub fn trigger(&self) {
        self.token.cancel();
        self.tracker.close();
    }

    /// Waits until every tracked task has finished, or `grace` has passed. Returns whether
    /// everything finished in time.
    pub async fn drained(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait()).await.is_ok()
    }

    /// Sessions still running.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }
}
