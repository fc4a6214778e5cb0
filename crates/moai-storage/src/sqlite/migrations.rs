//! Versioned schema migrations, applied at open in one transaction each.
//!
//! Versions only ever grow. A database whose recorded version is higher than
//! [`SCHEMA_VERSION`] was written by a newer moai; we refuse to open it rather than guess.

use rusqlite::{params, Connection};

use crate::StorageError;

/// Each entry is `(version, SQL)`. Append new versions; never edit a released one.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    // The per-document journal (DocJournal). `seq` is global and monotonic so that a compaction
    // can name "everything up to here" even while appends continue.
    "CREATE TABLE doc_snapshots (
         doc        TEXT PRIMARY KEY,
         snapshot   BLOB NOT NULL,
         through_seq INTEGER NOT NULL,
         updated_at INTEGER NOT NULL DEFAULT (unixepoch())
     ) WITHOUT ROWID;
     CREATE TABLE doc_updates (
         seq  INTEGER PRIMARY KEY AUTOINCREMENT,
         doc  TEXT NOT NULL,
         data BLOB NOT NULL
     );
     CREATE INDEX doc_updates_by_doc ON doc_updates(doc, seq);",
)];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub(super) fn apply(conn: &mut Connection) -> Result<(), StorageError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at INTEGER NOT NULL DEFAULT (unixepoch())
         )",
    )?;
    let current: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(StorageError::SchemaTooNew { found: current, supported: SCHEMA_VERSION });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let wrap = |source| StorageError::Migration { version, source };
        let tx = conn.transaction().map_err(wrap)?;
        tx.execute_batch(sql).map_err(wrap)?;
        tx.execute("INSERT INTO schema_migrations(version) VALUES (?1)", params![version]).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        tracing::info!(version, "applied storage migration");
    }
    Ok(())
}
