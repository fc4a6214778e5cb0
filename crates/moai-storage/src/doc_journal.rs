//! The per-document update journal: the storage contract of an engine whose state is a
//! sequence of opaque updates that can be merged into a snapshot (Yjs documents).
//!
//! Why a journal and not snapshots alone: an update must be durable before it is broadcast,
//! and rewriting a whole document per keystroke is O(document). Appending the update is
//! O(update); compaction folds the journal into a snapshot in the background.

use async_trait::async_trait;

use crate::StorageError;

/// What a document looks like on disk: the latest snapshot (if any) and the updates appended
/// after it, in append order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredDoc {
    pub snapshot: Option<Vec<u8>>,
    /// Identifies the stored snapshot (`None`: there is none). A compaction names the version it
    /// started from, so it can never replace a snapshot written since (by another compaction,
    /// perhaps on another instance) with older state.
    pub snapshot_version: Option<String>,
    /// `(seq, update)` pairs, ascending by `seq`.
    pub updates: Vec<(u64, Vec<u8>)>,
}

/// What a compaction folded into its snapshot: the stored state it loaded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Folded {
    /// The snapshot it started from ([`StoredDoc::snapshot_version`]).
    pub snapshot_version: Option<String>,
    /// The journal entries it merged; exactly these are deleted. Entries appended since (on this
    /// instance or another, whatever their sequence numbers) are kept.
    pub seqs: Vec<u64>,
}

impl StoredDoc {
    /// The sequence number of the last journal entry.
    pub fn last_seq(&self) -> Option<u64> {
        self.updates.last().map(|(seq, _)| *seq)
    }

    /// Everything this load holds, as a compaction of it names it.
    pub fn folded(&self) -> Folded {
        Folded {
            snapshot_version: self.snapshot_version.clone(),
            seqs: self.updates.iter().map(|(seq, _)| *seq).collect(),
        }
    }

    /// Total bytes held in the journal (not counting the snapshot).
    pub fn journal_bytes(&self) -> usize {
        self.updates.iter().map(|(_, u)| u.len()).sum()
    }
}

#[async_trait]
pub trait DocJournal: Send + Sync + 'static {
    /// Appends updates to `doc`'s journal, in order, atomically. When this returns `Ok`, they
    /// are durable (they survive `kill -9` of the process). Returns the sequence number of the
    /// last one (`None` when `updates` is empty).
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError>;

    /// Appends one update; see [`DocJournal::append_many`]. Returns its sequence number.
    async fn append(&self, doc: &str, update: Vec<u8>) -> Result<u64, StorageError> {
        let seq = self.append_many(doc, vec![update]).await?;
        // append_many returns Some for a non-empty batch; a backend that breaks this is a bug.
        seq.ok_or(StorageError::CommitFailed("append returned no sequence number".into()))
    }

    /// Loads the snapshot and every journal entry of `doc`. An unknown document is an empty
    /// [`StoredDoc`], not an error.
    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError>;

    /// Replaces `doc`'s snapshot with `snapshot` and deletes the journal entries `folded.seqs`,
    /// atomically, provided the stored snapshot is still `folded.snapshot_version`. Otherwise
    /// (another compaction got there first) nothing changes and the result is
    /// [`StorageError::CompactionConflict`]: the caller loads again and retries later. Entries
    /// not in `folded.seqs` are always kept.
    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError>;
}

/// A [`DocJournal`] whose snapshots may be kept elsewhere ([`crate::ObjectSnapshots`] keeps them
/// in object storage): what such a wrapper needs from the database under it. Its sequence
/// numbers start at 1.
#[async_trait]
pub trait TrimJournal: DocJournal {
    /// Deletes `doc`'s journal entries `folded.seqs` (a snapshot kept elsewhere now holds them)
    /// and, if `folded.snapshot_version` is `Some` and still names the snapshot stored here,
    /// that snapshot (merged into the one kept elsewhere), in one transaction. A snapshot
    /// replaced since is kept, and so are entries not named.
    async fn trim(&self, doc: &str, folded: Folded) -> Result<(), StorageError>;
}

/// A shared handle is the journal it points to.
#[async_trait]
impl<T: DocJournal + ?Sized> DocJournal for std::sync::Arc<T> {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        (**self).append_many(doc, updates).await
    }

    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        (**self).load(doc).await
    }

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        (**self).compact(doc, snapshot, folded).await
    }
}

#[async_trait]
impl<T: TrimJournal + ?Sized> TrimJournal for std::sync::Arc<T> {
    async fn trim(&self, doc: &str, folded: Folded) -> Result<(), StorageError> {
        (**self).trim(doc, folded).await
    }
}
