//! moai's storage room.
//!
//! Everything moai acknowledges goes through here before the acknowledgement is sent. The
//! crate offers async traits shaped by what the engines need to keep (the per-document update
//! journal of [`DocJournal`] for Yjs, the per-session signed logs of [`CoValueStore`] for
//! CoJSON), and backends that implement them:
//!
//! - [`SqliteStorage`]: the embedded default. One writer thread owns the connection and commits
//!   many small writes in one transaction (group commit), so engines can await durability per
//!   update without paying one fsync each.
//! - [`PostgresStorage`]: the shared backend, for several instances serving one database. The
//!   same group commit on one writer task per instance, reads on pooled connections, and a
//!   compaction rule that stays correct when other instances write the same documents.
//! - [`MemoryStorage`]: the same contracts without a disk, for unit tests of engines.
//! - [`ObjectSnapshots`]: wraps any of them to keep Yjs snapshots in S3-compatible object storage
//!   (one object per document) while the journal tail stays in the database.
//!
//! Dependency rule: storage never imports an engine. Traits speak in documents, byte strings
//! and sequence numbers, never in Yjs or CoJSON types, so the backends are interchangeable
//! without touching the engines.

mod changes;
mod covalue_store;
mod doc_journal;
mod error;
mod inventory;
mod memory;
mod object_snapshots;
mod observer;
mod postgres;
mod sqlite;

pub use changes::{ChangeKind, ChangeObserver, ChangeSink};
pub use covalue_store::{
    AppendError, BytesSinceSignature, CoValueAppend, CoValueRecord, CoValueStore, SessionAppendRecord, SessionRecord,
    StoredKnownState,
};
pub use doc_journal::{DocJournal, Folded, StoredDoc, TrimJournal};
pub use error::StorageError;
pub use inventory::Inventory;
pub use memory::MemoryStorage;
pub use object_snapshots::{
    encode_doc_id, install_tls_provider, ObjectSnapshots, ObjectStoreOptions, SnapshotObjects, LEGACY_SNAPSHOT_SEQ,
};
/// The object storage client, for [`SnapshotObjects::new`] with a store of one's own.
pub use object_store;
pub use observer::{NoopObserver, StorageObserver};
pub use postgres::{redact_url, PostgresOptions, PostgresStorage, POSTGRES_SCHEMA_VERSION};
pub use sqlite::{
    backup_sqlite, check_sqlite_backup, restore_sqlite, BackupInfo, CopyProgress, SqliteOptions, SqliteStorage,
    BACKUP_PAGES_PER_STEP, SCHEMA_VERSION,
};
