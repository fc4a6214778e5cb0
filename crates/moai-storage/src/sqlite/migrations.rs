//! Versioned schema migrations, applied at open in one transaction each.
//!
//! Versions only ever grow. A database whose recorded version is higher than
//! [`SCHEMA_VERSION`] was written by a newer moai; we refuse to open it rather than guess.

use rusqlite::{params, Connection};

use crate::StorageError;

/// Each entry is `(version, SQL)`. Append new versions; never edit a released one.
pub(super) const MIGRATIONS: &[(i64, &str)] = &[
    (
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
    ),
    (
        2,
        // The CoJSON store (CoValueStore), modelled on cojson's own SQLite schema (coValues,
        // sessions, transactions, signatureAfter) so the data maps one to one onto what a
        // cojson server keeps. Prefixed because other engines share this database. Headers and
        // transactions are JSON text exactly as the engine serialised them. `last_idx` is the
        // transaction count (cojson's naming); `signature_after.tx_count` is the count at which
        // the checkpoint signature is valid. A deleted CoValue is a flag, not a separate table.
        "CREATE TABLE cojson_covalues (
             row_id  INTEGER PRIMARY KEY,
             id      TEXT NOT NULL UNIQUE,
             header  TEXT NOT NULL,
             deleted INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE cojson_sessions (
             row_id         INTEGER PRIMARY KEY,
             covalue        INTEGER NOT NULL REFERENCES cojson_covalues(row_id),
             session_id     TEXT NOT NULL,
             last_idx       INTEGER NOT NULL,
             last_signature TEXT NOT NULL,
             bytes_since_last_signature INTEGER NOT NULL,
             UNIQUE (covalue, session_id)
         );
         CREATE TABLE cojson_transactions (
             ses INTEGER NOT NULL REFERENCES cojson_sessions(row_id),
             idx INTEGER NOT NULL,
             tx  TEXT NOT NULL,
             PRIMARY KEY (ses, idx)
         ) WITHOUT ROWID;
         CREATE TABLE cojson_signature_after (
             ses       INTEGER NOT NULL REFERENCES cojson_sessions(row_id),
             tx_count  INTEGER NOT NULL,
             signature TEXT NOT NULL,
             PRIMARY KEY (ses, tx_count)
         ) WITHOUT ROWID;",
    ),
    (
        3,
        // Snapshots are written in chunks, one commit each, so compacting a large document never
        // holds the single writer (and every document's journal appends behind it) for one huge
        // transaction. `doc_snapshots.version` names the complete chunk set; NULL means the
        // snapshot is inline in `doc_snapshots.snapshot` (written before this migration).
        "CREATE TABLE doc_snapshot_chunks (
             doc     TEXT NOT NULL,
             version INTEGER NOT NULL,
             idx     INTEGER NOT NULL,
             data    BLOB NOT NULL,
             PRIMARY KEY (doc, version, idx)
         ) WITHOUT ROWID;
         ALTER TABLE doc_snapshots ADD COLUMN version INTEGER;",
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub(super) fn apply(conn: &mut Connection) -> Result<(), StorageError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at INTEGER NOT NULL DEFAULT (unixepoch())
         )",
    )?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0))?;
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
