//! [`CoValueStore`] on SQLite (schema version 2).
//!
//! Appends go through the group-commit writer: one `append_covalues` call is one writer job, and
//! each append inside it runs in its own nested SAVEPOINT, so a refused or failing append rolls
//! back alone while its neighbours commit. Each append is checked completely (counts, header,
//! checkpoints) before its first row is written. Loads and known states run on the read pool,
//! inside one read transaction so a concurrent commit is seen entirely or not at all.

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStorage;
use crate::covalue_store::check_append;
use crate::{
    AppendError, BytesSinceSignature, CoValueAppend, CoValueRecord, CoValueStore, SessionRecord, StorageError,
    StoredKnownState,
};

/// Counts are `u64` on our side and `INTEGER` (i64) in SQLite. Protocol counts are bounded by
/// 2^53, so this never fails on real input; a value that does not fit is an error, never a wrap.
fn to_sql(n: u64) -> rusqlite::Result<i64> {
    i64::try_from(n).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn from_sql(n: i64) -> u64 {
    // Only non-negative values are ever written.
    u64::try_from(n).unwrap_or(0)
}

/// What an append must fail with: a refusal (nothing written) or an SQL error (rolled back).
enum Failure {
    Refused(AppendError),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sql(e)
    }
}

fn covalue_row(conn: &Connection, id: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT row_id FROM cojson_covalues WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()
}

/// Checks and applies one append. Runs inside the caller's savepoint.
fn apply_append(conn: &Connection, append: &CoValueAppend) -> Result<(), Failure> {
    let existing = covalue_row(conn, &append.id)?;
    let mut session_count =
        conn.prepare_cached("SELECT last_idx FROM cojson_sessions WHERE covalue = ?1 AND session_id = ?2")?;
    check_append(append, existing.is_some(), |session| {
        let row = existing.unwrap_or(-1);
        let count: Option<i64> =
            session_count.query_row(params![row, session], |r| r.get(0)).optional().map_err(StorageError::from)?;
        Ok(count.map_or(0, from_sql))
    })
    .map_err(Failure::Refused)?;

    let covalue = match existing {
        Some(row) => row,
        None => {
            // check_append guarantees a header when the CoValue is new.
            let header = append.header.as_deref().unwrap_or_default();
            conn.prepare_cached("INSERT INTO cojson_covalues(id, header) VALUES (?1, ?2) RETURNING row_id")?
                .query_row(params![append.id, header], |r| r.get(0))?
        }
    };
    if append.deleted {
        conn.prepare_cached("UPDATE cojson_covalues SET deleted = 1 WHERE row_id = ?1")?.execute(params![covalue])?;
    }

    let mut upsert_session = conn.prepare_cached(
        "INSERT INTO cojson_sessions(covalue, session_id, last_idx, last_signature, bytes_since_last_signature)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(covalue, session_id) DO UPDATE SET
             last_idx = excluded.last_idx,
             last_signature = excluded.last_signature,
             bytes_since_last_signature = CASE WHEN ?6 THEN excluded.bytes_since_last_signature
                 ELSE cojson_sessions.bytes_since_last_signature + excluded.bytes_since_last_signature END
         RETURNING row_id",
    )?;
    let mut insert_tx = conn.prepare_cached("INSERT INTO cojson_transactions(ses, idx, tx) VALUES (?1, ?2, ?3)")?;
    let mut insert_sig = conn.prepare_cached(
        "INSERT OR REPLACE INTO cojson_signature_after(ses, tx_count, signature) VALUES (?1, ?2, ?3)",
    )?;
    for s in &append.sessions {
        let new_count = s.after.saturating_add(s.transactions.len() as u64);
        let (reset, bytes) = match s.bytes_since_signature {
            BytesSinceSignature::Add(b) => (false, b),
            BytesSinceSignature::Reset(b) => (true, b),
        };
        let ses: i64 = upsert_session.query_row(
            params![covalue, s.session, to_sql(new_count)?, s.last_signature, to_sql(bytes)?, reset],
            |r| r.get(0),
        )?;
        for (i, tx) in s.transactions.iter().enumerate() {
            insert_tx.execute(params![ses, to_sql(s.after.saturating_add(i as u64))?, tx])?;
        }
        for (count, signature) in &s.checkpoints {
            insert_sig.execute(params![ses, to_sql(*count)?, signature])?;
        }
    }
    if !append.erase_sessions.is_empty() {
        let mut find =
            conn.prepare_cached("SELECT row_id FROM cojson_sessions WHERE covalue = ?1 AND session_id = ?2")?;
        let mut erase_txs = conn.prepare_cached("DELETE FROM cojson_transactions WHERE ses = ?1")?;
        let mut erase_sigs = conn.prepare_cached("DELETE FROM cojson_signature_after WHERE ses = ?1")?;
        let mut erase_session = conn.prepare_cached("DELETE FROM cojson_sessions WHERE row_id = ?1")?;
        for session in &append.erase_sessions {
            let Some(ses) = find.query_row(params![covalue, session], |r| r.get::<_, i64>(0)).optional()? else {
                continue;
            };
            erase_txs.execute(params![ses])?;
            erase_sigs.execute(params![ses])?;
            erase_session.execute(params![ses])?;
        }
    }
    Ok(())
}

/// Runs one append in its own savepoint: refused or failed, it leaves no trace.
fn append_in_savepoint(conn: &Connection, append: &CoValueAppend) -> rusqlite::Result<Result<(), Failure>> {
    conn.execute_batch("SAVEPOINT covalue_append")?;
    let outcome = apply_append(conn, append);
    match &outcome {
        Ok(()) => conn.execute_batch("RELEASE covalue_append")?,
        Err(_) => conn.execute_batch("ROLLBACK TO covalue_append; RELEASE covalue_append")?,
    }
    Ok(outcome)
}

fn load(conn: &Connection, id: &str) -> rusqlite::Result<Option<CoValueRecord>> {
    let Some((row, header, deleted)) = conn
        .prepare_cached("SELECT row_id, header, deleted FROM cojson_covalues WHERE id = ?1")?
        .query_row(params![id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?)))
        .optional()?
    else {
        return Ok(None);
    };
    let mut sessions_stmt = conn.prepare_cached(
        "SELECT row_id, session_id, last_signature FROM cojson_sessions WHERE covalue = ?1 ORDER BY row_id",
    )?;
    let heads = sessions_stmt
        .query_map(params![row], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut txs = conn.prepare_cached("SELECT tx FROM cojson_transactions WHERE ses = ?1 ORDER BY idx")?;
    let mut sigs =
        conn.prepare_cached("SELECT tx_count, signature FROM cojson_signature_after WHERE ses = ?1 ORDER BY tx_count")?;
    let mut sessions = Vec::with_capacity(heads.len());
    for (ses, session, last_signature) in heads {
        let transactions = txs.query_map(params![ses], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        let checkpoints = sigs
            .query_map(params![ses], |r| Ok((from_sql(r.get::<_, i64>(0)?), r.get::<_, String>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        sessions.push(SessionRecord { session, transactions, last_signature, checkpoints });
    }
    Ok(Some(CoValueRecord { header, sessions, deleted }))
}

fn known_states(conn: &Connection, ids: &[String]) -> rusqlite::Result<Vec<Option<StoredKnownState>>> {
    let mut covalue = conn.prepare_cached("SELECT row_id, deleted FROM cojson_covalues WHERE id = ?1")?;
    let mut sessions =
        conn.prepare_cached("SELECT session_id, last_idx FROM cojson_sessions WHERE covalue = ?1 ORDER BY row_id")?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let Some((row, deleted)) =
            covalue.query_row(params![id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, bool>(1)?))).optional()?
        else {
            out.push(None);
            continue;
        };
        let sessions = sessions
            .query_map(params![row], |r| Ok((r.get::<_, String>(0)?, from_sql(r.get::<_, i64>(1)?))))?
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Some(StoredKnownState { header: true, sessions, deleted }));
    }
    Ok(out)
}

/// Runs `f` in one read transaction, so it sees one committed state of the database.
fn in_read_transaction<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.execute_batch("BEGIN")?;
    let result = f(conn);
    let _ = conn.execute_batch("COMMIT");
    result
}

#[async_trait]
impl CoValueStore for SqliteStorage {
    async fn load_covalue(&self, id: &str) -> Result<Option<CoValueRecord>, StorageError> {
        let id = id.to_owned();
        self.read(move |conn| in_read_transaction(conn, |c| load(c, &id))).await
    }

    async fn append_covalues(&self, appends: Vec<CoValueAppend>) -> Vec<Result<(), AppendError>> {
        if appends.is_empty() {
            return Vec::new();
        }
        let count = appends.len();
        let outcome = self
            .write(move |conn| {
                let mut results = Vec::with_capacity(appends.len());
                for append in &appends {
                    results.push(append_in_savepoint(conn, append)?);
                }
                Ok(results)
            })
            .await;
        match outcome {
            Ok(results) => results
                .into_iter()
                .map(|r| match r {
                    Ok(()) => Ok(()),
                    Err(Failure::Refused(e)) => Err(e),
                    Err(Failure::Sql(e)) => Err(AppendError::Storage(StorageError::Sqlite(e))),
                })
                .collect(),
            // The whole job failed (savepoint handling, commit, or the writer is gone): nothing
            // of it is stored. StorageError is not Clone; every append gets the same message.
            Err(e) => {
                let message = e.to_string();
                let closed = matches!(e, StorageError::Closed);
                (0..count)
                    .map(|_| {
                        Err(AppendError::Storage(if closed {
                            StorageError::Closed
                        } else {
                            StorageError::CommitFailed(message.clone())
                        }))
                    })
                    .collect()
            }
        }
    }

    async fn known_states(&self, ids: Vec<String>) -> Result<Vec<Option<StoredKnownState>>, StorageError> {
        self.read(move |conn| in_read_transaction(conn, |c| known_states(c, &ids))).await
    }
}

#[cfg(test)]
mod tests {
    //! What only SQLite has (the byte counter column, migrating an existing database). The
    //! CoValueStore contract itself runs against every backend in tests/contract.rs.

    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::{DocJournal, NoopObserver, SessionAppendRecord, SqliteOptions, SCHEMA_VERSION};

    const ID: &str = "co_zMap";
    // Key order and number text that a re-serialisation could change: stored as given.
    const HEADER: &str = r#"{"type":"comap","ruleset":{"type":"unsafeAllowAll"},"meta":null,"uniqueness":1e21}"#;

    fn open(path: &Path) -> SqliteStorage {
        SqliteStorage::open(path, SqliteOptions::default(), Arc::new(NoopObserver)).expect("open")
    }

    fn tx(n: u64) -> String {
        format!(r#"{{"privacy":"trusting","madeAt":{n},"changes":"[{{\"z\":1,\"a\":0.10000000000000001}}]"}}"#)
    }

    fn session(name: &str, after: u64, n: u64, checkpoints: Vec<u64>) -> SessionAppendRecord {
        SessionAppendRecord {
            session: name.into(),
            after,
            transactions: (after..after + n).map(tx).collect(),
            last_signature: format!("signature_z{name}{}", after + n),
            checkpoints: checkpoints.into_iter().map(|c| (c, format!("signature_z{name}{c}"))).collect(),
            bytes_since_signature: BytesSinceSignature::Add(10 * n),
        }
    }

    fn append(id: &str, header: Option<&str>, sessions: Vec<SessionAppendRecord>) -> CoValueAppend {
        CoValueAppend {
            id: id.into(),
            header: header.map(Into::into),
            sessions,
            deleted: false,
            erase_sessions: vec![],
        }
    }

    #[tokio::test]
    async fn the_byte_counter_follows_checkpoints_and_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moai.db");
        let store = open(&path);
        let mut first = session("s1_session_zA", 0, 2, vec![]);
        first.bytes_since_signature = BytesSinceSignature::Add(30);
        let mut second = session("s1_session_zA", 2, 1, vec![]);
        second.bytes_since_signature = BytesSinceSignature::Add(12);
        store.append_covalue(append(ID, Some(HEADER), vec![first])).await.unwrap();
        store.append_covalue(append(ID, None, vec![second])).await.unwrap();
        let bytes = || {
            let path = path.clone();
            move || -> i64 {
                let c = rusqlite::Connection::open(path).unwrap();
                c.query_row("SELECT bytes_since_last_signature FROM cojson_sessions", [], |r| r.get(0)).unwrap()
            }
        };
        assert_eq!(tokio::task::spawn_blocking(bytes()).await.unwrap(), 42);
        let mut third = session("s1_session_zA", 3, 1, vec![4]);
        third.bytes_since_signature = BytesSinceSignature::Reset(0);
        store.append_covalue(append(ID, None, vec![third])).await.unwrap();
        assert_eq!(tokio::task::spawn_blocking(bytes()).await.unwrap(), 0);
        let written = store.load_covalue(ID).await.unwrap();
        store.close().await.unwrap();

        let reopened = open(&path);
        assert_eq!(reopened.load_covalue(ID).await.unwrap(), written);
        assert_eq!(written.unwrap().sessions[0].transactions.len(), 4);
    }

    #[tokio::test]
    async fn version_2_is_applied_to_an_existing_version_1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moai.db");
        {
            // A database exactly as a version-1 moai left it, with a Yjs document in it.
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,
                     applied_at INTEGER NOT NULL DEFAULT (unixepoch()));",
            )
            .unwrap();
            let (version, sql) = super::super::migrations::MIGRATIONS[0];
            assert_eq!(version, 1);
            conn.execute_batch(sql).unwrap();
            conn.execute("INSERT INTO schema_migrations(version) VALUES (1)", []).unwrap();
            conn.execute("INSERT INTO doc_updates(doc, data) VALUES ('d', x'0102')", []).unwrap();
        }
        let store = open(&path);
        assert_eq!(store.load("d").await.unwrap().updates.len(), 1, "version-1 data intact");
        store.append_covalue(append(ID, Some(HEADER), vec![session("s1_session_zA", 0, 1, vec![])])).await.unwrap();
        assert!(store.load_covalue(ID).await.unwrap().is_some());
        store.close().await.unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        const { assert!(SCHEMA_VERSION >= 2, "migration 2 is among those applied") };
    }
}
