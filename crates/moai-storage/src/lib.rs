//! moai's storage room.
//!
//! Everything moai acknowledges goes through here before the acknowledgement is sent. The
//! crate offers async traits shaped by what the engines need to keep (for now the
//! per-document update journal of [`DocJournal`]), and backends that implement them:
//!
//! - [`SqliteStorage`]: the embedded default. One writer thread owns the connection and commits
//!   many small writes in one transaction (group commit), so engines can await durability per
//!   update without paying one fsync each.
//! - [`MemoryStorage`]: the same contracts without a disk, for unit tests of engines.
//!
//! Dependency rule: storage never imports an engine. Traits speak in documents, byte strings
//! and sequence numbers, never in Yjs or CoJSON types, so a PostgreSQL backend shared by several
//! instances can be added beside SQLite without touching the engines.

mod doc_journal;
mod error;
mod memory;
mod observer;
mod sqlite;

pub use doc_journal::{DocJournal, StoredDoc};
pub use error::StorageError;
pub use memory::MemoryStorage;
pub use observer::{NoopObserver, StorageObserver};
pub use sqlite::{SqliteOptions, SqliteStorage, SCHEMA_VERSION};
