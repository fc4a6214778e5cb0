//! What the bus tells the server about itself: connected or degraded (and why), and counters
//! for /metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// The link to the rest of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusStatus {
    /// Not connected yet since start.
    Connecting,
    /// Publishing, reading and heartbeating work.
    Connected,
    /// Redis cannot be reached: each instance keeps serving its own clients; what they write is
    /// durable and reaches the other instances' clients once the link is back (resync).
    Degraded(String),
}

impl BusStatus {
    pub fn is_degraded(&self) -> bool {
        !matches!(self, BusStatus::Connected)
    }
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Messages written to Redis.
    pub published: AtomicU64,
    /// Publications dropped: the queue was full, Redis was unreachable, or (tests) the drop marker.
    pub publish_dropped: AtomicU64,
    /// Messages from other instances delivered to a topic.
    pub received: AtomicU64,
    /// Received messages dropped because a topic's queue was full (the topic resyncs).
    pub receive_dropped: AtomicU64,
    /// Resyncs asked of topics (reconnects, gaps, overflows).
    pub resyncs: AtomicU64,
    /// Instances declared gone after their heartbeat expired.
    pub instances_gone: AtomicU64,
    /// Times the link to Redis was lost.
    pub disconnects: AtomicU64,
}

impl BusStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
