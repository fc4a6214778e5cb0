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
    /// PostgreSQL refused or failed a statement. Shown with the server's message and SQLSTATE:
    /// tokio-postgres' own Display says only "db error", which would hide e.g. "permission
    /// denied for schema" from the operator.
    #[error("postgres: {}", pg_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection to PostgreSQL could be had (refused, authentication, pool timeout).
    /// `target` names the server without its password.
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    PostgresConnect { target: String, reason: String },
    /// The `--storage` URL or the backend's options are not usable (never includes a password).
    #[error("invalid PostgreSQL storage configuration: {0}")]
    PostgresConfig(String),
    #[error("PostgreSQL migration to schema version {version} failed: {}", pg_detail(.source))]
    PostgresMigration {
        version: i64,
        #[source]
        source: tokio_postgres::Error,
    },
    /// An operation did not finish in time (a server that stopped answering); its connection is
    /// dropped, so nothing of it commits later.
    #[error("storage operation timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The object store that holds Yjs snapshots refused or failed a request, could not be
    /// reached, or did not answer in time. `target` is `s3://bucket/key`; never a credential.
    #[error("object storage {operation} {target}: {reason}")]
    ObjectStore { operation: &'static str, target: String, reason: String },
    /// The object storage settings are not usable (never includes a credential).
    #[error("invalid object storage configuration: {0}")]
    ObjectStoreConfig(String),
    /// A count does not fit in a database integer (never true of real input: protocol counts are
    /// bounded by 2^53). Refused, never wrapped.
    #[error("{what} {value} does not fit in a 64-bit signed integer")]
    OutOfRange { what: &'static str, value: u64 },
}

/// A PostgreSQL error as an operator needs to read it: severity, message and SQLSTATE of a server
/// error, the client's own text otherwise (connection refused, closed, I/O).
pub(crate) fn pg_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}
