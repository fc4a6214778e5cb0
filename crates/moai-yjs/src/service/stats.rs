//! What each loaded document's owner task publishes about itself, for the server's dashboard:
//! connections, people present, stored size, updates. Read without asking the task (it never
//! waits for a reader), and listed in a bounded overview ([`super::YjsService::documents`]).
//!
//! Relaxed atomics: each value is exact on its own; a snapshot is not one consistent instant.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One document's counters, shared by its registry entry and its owner task.
#[derive(Debug)]
pub(crate) struct DocStats {
    /// False while the document is being loaded from storage.
    pub(crate) loaded: AtomicBool,
    /// Sockets connected to this instance.
    pub(crate) connections: AtomicUsize,
    /// Awareness clients with a state (people present), other instances' included.
    pub(crate) present: AtomicUsize,
    /// Size of the stored snapshot, as of the last load or compaction.
    pub(crate) snapshot_bytes: AtomicU64,
    /// Journal bytes not yet folded into the snapshot.
    pub(crate) journal_bytes: AtomicU64,
    /// Updates persisted since the document was loaded.
    pub(crate) updates: AtomicU64,
    pub(crate) since: Instant,
}

impl DocStats {
    pub(crate) fn new() -> Self {
        Self {
            loaded: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            present: AtomicUsize::new(0),
            snapshot_bytes: AtomicU64::new(0),
            journal_bytes: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            since: Instant::now(),
        }
    }

    fn summary(&self, id: &str) -> DocSummary {
        DocSummary {
            id: id.to_owned(),
            loaded: self.loaded.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            present: self.present.load(Ordering::Relaxed),
            snapshot_bytes: self.snapshot_bytes.load(Ordering::Relaxed),
            journal_bytes: self.journal_bytes.load(Ordering::Relaxed),
            updates: self.updates.load(Ordering::Relaxed),
            open_for: self.since.elapsed(),
        }
    }

    /// The ordering of the overview: most connections first, then the largest.
    fn rank(&self) -> (usize, u64) {
        let stored = self.snapshot_bytes.load(Ordering::Relaxed) + self.journal_bytes.load(Ordering::Relaxed);
        (self.connections.load(Ordering::Relaxed), stored)
    }
}

/// One loaded document, as [`super::YjsService::documents`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocSummary {
    pub id: String,
    /// False while it is being loaded from storage.
    pub loaded: bool,
    /// Sockets connected to it on this instance.
    pub connections: usize,
    /// People present (awareness clients with a state), other instances' included.
    pub present: usize,
    /// Its stored snapshot, as of its last load or compaction.
    pub snapshot_bytes: u64,
    /// Its journal not yet folded into the snapshot.
    pub journal_bytes: u64,
    /// Updates stored since it was loaded.
    pub updates: u64,
    /// Since it was loaded (or started loading).
    pub open_for: Duration,
}

/// The documents held in memory: how many, and the first `limit` of them by connections, then
/// stored size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentsOverview {
    pub loaded: usize,
    pub top: Vec<DocSummary>,
}

/// Picks the `limit` highest-ranked of `entries` in O(n), copying only those.
pub(crate) fn overview<'a>(entries: impl Iterator<Item = (&'a str, &'a DocStats)>, limit: usize) -> DocumentsOverview {
    let mut all: Vec<((usize, u64), &str, &DocStats)> = entries.map(|(id, stats)| (stats.rank(), id, stats)).collect();
    let loaded = all.len();
    // Best first: by rank, descending; ties by id, so the list is stable from one second to the next.
    let order =
        |a: &((usize, u64), &str, &DocStats), b: &((usize, u64), &str, &DocStats)| b.0.cmp(&a.0).then(a.1.cmp(b.1));
    if all.len() > limit && limit > 0 {
        all.select_nth_unstable_by(limit - 1, order);
    }
    all.truncate(limit);
    all.sort_by(order);
    DocumentsOverview { loaded, top: all.into_iter().map(|(_, id, stats)| stats.summary(id)).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(connections: usize, bytes: u64) -> DocStats {
        let s = DocStats::new();
        s.connections.store(connections, Ordering::Relaxed);
        s.journal_bytes.store(bytes, Ordering::Relaxed);
        s
    }

    #[test]
    fn the_overview_keeps_the_busiest_documents_first_and_counts_all() {
        let docs = [("a", doc(1, 10)), ("b", doc(5, 1)), ("c", doc(1, 99)), ("d", doc(0, 1000)), ("e", doc(1, 10))];
        let o = overview(docs.iter().map(|(id, s)| (*id, s)), 3);
        assert_eq!(o.loaded, 5);
        let ids: Vec<_> = o.top.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "a"], "by connections, then size, then id");
        assert_eq!(overview(docs.iter().map(|(id, s)| (*id, s)), 0), DocumentsOverview { loaded: 5, top: vec![] });
        assert_eq!(overview(docs.iter().map(|(id, s)| (*id, s)), 10).top.len(), 5);
    }
}

#[cfg(test)]
mod service_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use moai_storage::MemoryStorage;
    use yrs::{Text, Transact};

    use crate::protocol::sync_update_frame;
    use crate::service::{YjsConfig, YjsService};

    /// The overview follows connections, stored bytes and updates, and loses a document when it
    /// is evicted.
    #[tokio::test(flavor = "current_thread")]
    async fn documents_show_connections_and_sizes_until_evicted() {
        let config = YjsConfig { idle_evict: Duration::from_millis(200), ..YjsConfig::default() };
        let svc = YjsService::new(Arc::new(MemoryStorage::new()), config);
        assert_eq!(svc.documents(10).loaded, 0);
        let a = svc.join("busy").await.unwrap();
        let b = svc.join("busy").await.unwrap();
        let quiet = svc.join("quiet").await.unwrap();
        let writer = yrs::Doc::new();
        let update = {
            let t = writer.get_or_insert_text("t");
            let mut txn = writer.transact_mut();
            t.insert(&mut txn, 0, "hello");
            txn.encode_update_v1()
        };
        assert!(a.receive(Bytes::from(sync_update_frame(&update))).await);
        svc.read_state("busy").await.unwrap(); // after the batch above is durable
        tokio::task::yield_now().await;

        let o = svc.documents(10);
        assert_eq!(o.loaded, 2);
        let busy = &o.top[0];
        assert_eq!((busy.id.as_str(), busy.loaded, busy.connections, busy.updates), ("busy", true, 2, 1));
        assert!(busy.journal_bytes >= update.len() as u64, "{busy:?}");
        assert_eq!((o.top[1].id.as_str(), o.top[1].connections), ("quiet", 1));
        assert_eq!(svc.documents(1).top.len(), 1, "bounded by the limit");

        quiet.leave().await;
        drop((a, b));
        // Eviction compacts first, on the compaction thread: wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while svc.documents(10).loaded > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(svc.documents(10), Default::default(), "evicted documents are gone");
    }
}
