//! Counters the relay task publishes for /metrics and tests, read without asking the task.
//!
//! Relaxed atomics: each value is exact on its own; a snapshot is not one consistent instant.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Default, Debug)]
pub(crate) struct Stats {
    pub(crate) peers: AtomicUsize,
    pub(crate) resident: AtomicUsize,
    pub(crate) writes_pending: AtomicUsize,
    pub(crate) evicted: AtomicU64,
    pub(crate) rejected_sessions: AtomicU64,
    pub(crate) invalid_headers: AtomicU64,
    pub(crate) slow_peers_closed: AtomicU64,
    pub(crate) storage_failures: AtomicU64,
    pub(crate) full_loads: AtomicU64,
    pub(crate) known_state_loads: AtomicU64,
    pub(crate) known_state_reads: AtomicU64,
    pub(crate) refreshes: AtomicU64,
}

/// A snapshot of [`super::CojsonService::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CojsonStats {
    /// Connected peers.
    pub peers: usize,
    /// CoValues held in memory, as of the last eviction tick.
    pub resident_covalues: usize,
    /// Writes waiting for or inside storage (CoValues with a batch in flight count once).
    pub writes_pending: usize,
    /// CoValues evicted from memory since start.
    pub evicted_total: u64,
    /// Sessions that failed verification (forged or broken content) since start.
    pub rejected_sessions_total: u64,
    /// Headers that did not hash to their id since start.
    pub invalid_headers_total: u64,
    /// Peers closed because their outbox was full since start.
    pub slow_peers_closed_total: u64,
    /// Failed writes, failed loads and unreadable stored CoValues since start.
    pub storage_failures_total: u64,
    /// CoValues read whole from storage (`load_covalue`: header and every transaction) since
    /// start.
    pub full_loads_total: u64,
    /// CoValues whose stored known state alone was read (`known_states`: header and session
    /// counts, no transactions) since start: the cheap path of `load` and `reconcile`.
    pub known_state_loads_total: u64,
    /// Storage calls that read those known states (one per cycle and up to 1000 CoValues)
    /// since start.
    pub known_state_reads_total: u64,
    /// CoValues read again from storage because another instance changed them (cluster).
    pub refreshes_total: u64,
}

impl Stats {
    pub(crate) fn snapshot(&self) -> CojsonStats {
        CojsonStats {
            peers: self.peers.load(Ordering::Relaxed),
            resident_covalues: self.resident.load(Ordering::Relaxed),
            writes_pending: self.writes_pending.load(Ordering::Relaxed),
            evicted_total: self.evicted.load(Ordering::Relaxed),
            rejected_sessions_total: self.rejected_sessions.load(Ordering::Relaxed),
            invalid_headers_total: self.invalid_headers.load(Ordering::Relaxed),
            slow_peers_closed_total: self.slow_peers_closed.load(Ordering::Relaxed),
            storage_failures_total: self.storage_failures.load(Ordering::Relaxed),
            full_loads_total: self.full_loads.load(Ordering::Relaxed),
            known_state_loads_total: self.known_state_loads.load(Ordering::Relaxed),
            known_state_reads_total: self.known_state_reads.load(Ordering::Relaxed),
            refreshes_total: self.refreshes.load(Ordering::Relaxed),
        }
    }
}
