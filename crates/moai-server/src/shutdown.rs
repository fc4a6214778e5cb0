//! Graceful shutdown, explicit as in mini-redis: one token that every long-lived task watches,
//! and one tracker that knows which session tasks are still running.
//!
//! On the first signal the binary marks the server draining (/health 503, sync endpoints 503)
//! and calls [`Shutdown::trigger`]: every WebSocket session sees the token and closes with 1001
//! "going away" after flushing what it owes. The listener keeps answering while sessions drain,
//! so a load balancer polling /health sees the 503 it needs to take the instance out; the binary
//! waits for [`Shutdown::drained`] up to the grace period, then calls
//! [`Shutdown::stop_accepting`] and closes storage.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    /// Stops the accept loop; cancelled after the sessions have drained.
    accepting: CancellationToken,
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

    /// Resolves when the listener should stop accepting connections.
    pub fn stop_accepting_token(&self) -> &CancellationToken {
        &self.accepting
    }

    /// Stops the accept loop (after the sessions have drained, or at once on a failed start).
    pub fn stop_accepting(&self) {
        self.accepting.cancel();
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
