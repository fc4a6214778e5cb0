//! Listing what a store holds. The engines never need it (they address documents and CoValues by
//! id); tools that copy or check a whole store do (`moai migrate`).

use async_trait::async_trait;

use crate::StorageError;

/// The ids a store holds, in pages (keyset pagination: pass the last id of a page as `after` to
/// get the next one; an empty page is the end).
///
/// Ids come in ascending order *of that store* (byte order on SQLite and in memory, the
/// database's collation on PostgreSQL), each once. Do not compare the order of two stores. An id
/// written while a caller pages appears if it sorts after the caller's cursor.
#[async_trait]
pub trait Inventory: Send + Sync + 'static {
    /// Documents ([`crate::DocJournal`]) that have a snapshot or at least one journal entry,
    /// after `after` (exclusive; `None`: from the first), at most `limit`.
    async fn list_docs(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError>;

    /// Stored CoValues ([`crate::CoValueStore`]), the same way.
    async fn list_covalues(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError>;
}
