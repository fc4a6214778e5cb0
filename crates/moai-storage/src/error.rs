//! Typed storage errors. The edge turns them into log lines and close codes; engines decide
//! whether an error is fatal for a document or only for one write.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    /// The database file could not be opened or created (permissions, missing directory, not a
    /// database).
    #[error("cannot open database at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer moai whose schema this binary does not know. Refusing
    /// to run protects that data from being misread or downgraded.
    #[error("database schema version {found} is newer than this binary supports ({supported}); upgrade moai")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("migration to schema version {version} failed: {source}")]
    Migration {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The group commit that carried this write failed; nothing of that batch was persisted.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// A compaction found a different snapshot stored than the one it started from: another
    /// compaction replaced it meanwhile. Nothing was changed; load again and retry.
    #[error("compaction of {doc} lost a race: the stored snapshot changed since it was loaded")]
    CompactionConflict { doc: String },
    /// The writer thread is gone (storage was closed, or it died). Nothing submitted after this
    /// point was persisted.
    #[error("storage is closed")]
    Closed,
}
