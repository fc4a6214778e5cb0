//! Versioned schema migrations of the PostgreSQL backend, applied at open.
//!
//! Several instances may start at once against one database: all pending migrations run in one
//! transaction that first takes a transaction-scoped advisory lock (per schema), so exactly one
//! instance migrates and the others, once they get the lock, find nothing left to do. DDL is
//! transactional in PostgreSQL: a failed migration leaves the schema as it was.
//!
//! Versions only ever grow. A schema whose recorded version is higher than [`SCHEMA_VERSION`]
//! was written by a newer moai; it is refused rather than guessed at. These versions are the
//! PostgreSQL backend's own (they do not follow SQLite's numbering).

use deadpool_postgres::Object;

use super::sql::Sql;
use crate::StorageError;

/// Each entry is `(version, SQL)` with `{s}` for the schema. Append new versions; never edit a
/// released one.
pub(super) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        // The per-document journal (DocJournal). `seq` comes from a sequence: unique, but on a
        // database shared by several connections not committed in order, which is why a
        // compaction deletes exactly the entries it folded (`seq = ANY(...)`) and never a range.
        // `version` names the stored snapshot; it grows by one on every replace, so it is
        // unique per document (rows are never deleted).
        "CREATE TABLE {s}.doc_updates (
             seq  bigserial PRIMARY KEY,
             doc  text NOT NULL,
             data bytea NOT NULL
         );
         CREATE INDEX doc_updates_by_doc ON {s}.doc_updates (doc, seq);
         CREATE TABLE {s}.doc_snapshots (
             doc        text PRIMARY KEY,
             snapshot   bytea NOT NULL,
             version    bigint NOT NULL,
             updated_at timestamptz NOT NULL DEFAULT now()
         );",
    ),
    (
        2,
        // The CoJSON store (CoValueStore), the same tables as SQLite's migration 2 (modelled on
        // cojson's own schema). Headers and transactions are JSON text exactly as the engine
        // serialised it (text, not jsonb, which would reorder keys and reformat numbers).
        "CREATE TABLE {s}.cojson_covalues (
             row_id  bigserial PRIMARY KEY,
             id      text NOT NULL UNIQUE,
             header  text NOT NULL,
             deleted boolean NOT NULL DEFAULT false
         );
         CREATE TABLE {s}.cojson_sessions (
             row_id         bigserial PRIMARY KEY,
             covalue        bigint NOT NULL REFERENCES {s}.cojson_covalues (row_id),
             session_id     text NOT NULL,
             last_idx       bigint NOT NULL,
             last_signature text NOT NULL,
             bytes_since_last_signature bigint NOT NULL,
             UNIQUE (covalue, session_id)
         );
         CREATE TABLE {s}.cojson_transactions (
             ses bigint NOT NULL REFERENCES {s}.cojson_sessions (row_id),
             idx bigint NOT NULL,
             tx  text NOT NULL,
             PRIMARY KEY (ses, idx)
         );
         CREATE TABLE {s}.cojson_signature_after (
             ses       bigint NOT NULL REFERENCES {s}.cojson_sessions (row_id),
             tx_count  bigint NOT NULL,
             signature text NOT NULL,
             PRIMARY KEY (ses, tx_count)
         );",
    ),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The first key of the advisory lock ("moai" in ASCII); the second is a hash of the schema.
const LOCK_CLASS: i32 = 0x6d6f_6169;

pub(super) async fn apply(conn: &mut Object, sql: &Sql) -> Result<(), StorageError> {
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&LOCK_CLASS, &sql.schema]).await?;
    // Create only what is missing: CREATE … IF NOT EXISTS would still need the CREATE privilege
    // on the database, which a role given an existing schema may not have.
    let schema_exists = tx.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&sql.schema]).await?;
    if schema_exists.is_none() {
        tx.batch_execute(&sql.qualify("CREATE SCHEMA {s}")).await?;
    }
    let table = sql.qualify("{s}.schema_migrations");
    let table_exists: bool = tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await?.get(0);
    if !table_exists {
        tx.batch_execute(&sql.qualify(
            "CREATE TABLE {s}.schema_migrations (
                 version    bigint PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        ))
        .await?;
    }
    let current: i64 = tx
        .query_one(&sql.qualify("SELECT COALESCE(MAX(version), 0)::bigint FROM {s}.schema_migrations"), &[])
        .await?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StorageError::SchemaTooNew { found: current, supported: SCHEMA_VERSION });
    }
    for &(version, text) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let wrap = |source| StorageError::PostgresMigration { version, source };
        tx.batch_execute(&sql.qualify(text)).await.map_err(wrap)?;
        tx.execute(&sql.qualify("INSERT INTO {s}.schema_migrations (version) VALUES ($1)"), &[&version])
            .await
            .map_err(wrap)?;
        tracing::info!(version, schema = %sql.schema, "applied PostgreSQL storage migration");
    }
    tx.commit().await?;
    Ok(())
}
