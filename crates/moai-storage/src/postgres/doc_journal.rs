//! [`DocJournal`] on PostgreSQL: appends go through the group-commit writer; loads read the
//! snapshot and the journal in one REPEATABLE READ snapshot; a compaction runs on a pooled
//! connection of its own, so uploading a multi-megabyte snapshot never holds the writer (and
//! every document's appends behind it).
//!
//! The compaction race rule (several instances may compact one document): the replace is
//! conditional on the stored snapshot version being the one the compaction loaded, and it
//! deletes exactly the journal entries it folded, never a range of sequence numbers (a sequence
//! value taken by another connection may commit later than a higher one).

use async_trait::async_trait;
use deadpool_postgres::Object;
use tokio::sync::oneshot;
use tokio_postgres::IsolationLevel;

use super::jobs::{Job, Op, Reply};
use super::sql::Sql;
use super::PostgresStorage;
use crate::{DocJournal, Folded, StorageError, StoredDoc, TrimJournal};

#[async_trait]
impl DocJournal for PostgresStorage {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        if updates.is_empty() {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        self.submit(Job { op: Op::AppendDoc { doc: doc.to_owned(), updates }, reply: Reply::Seq(reply) }, answer).await
    }

    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        let (_open, mut conn) = self.connection().await?;
        let sql = &self.inner.shared.sql;
        let result = tokio::time::timeout(self.timeout(), load(&mut conn, sql, doc)).await;
        self.finish(conn, result)
    }

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        // A version this backend did not write can match no stored row: the compaction lost.
        let expected = match folded.snapshot_version.as_deref().map(str::parse::<i64>) {
            None => None,
            Some(Ok(version)) => Some(version),
            Some(Err(_)) => return Err(StorageError::CompactionConflict { doc: doc.to_owned() }),
        };
        // Sequence numbers beyond i64 cannot be stored, so cannot be folded either.
        let seqs: Vec<i64> = folded.seqs.iter().filter_map(|&s| i64::try_from(s).ok()).collect();
        let (_open, mut conn) = self.connection().await?;
        let sql = &self.inner.shared.sql;
        let result =
            tokio::time::timeout(self.timeout(), compact(&mut conn, sql, doc, &snapshot, expected, &seqs)).await;
        match self.finish(conn, result)? {
            true => {
                self.inner.shared.observer.storage_ok();
                Ok(())
            }
            false => Err(StorageError::CompactionConflict { doc: doc.to_owned() }),
        }
    }
}

#[async_trait]
impl TrimJournal for PostgresStorage {
    async fn trim(&self, doc: &str, folded: Folded) -> Result<(), StorageError> {
        // A version this backend did not write names no stored snapshot: only entries go.
        let snapshot = folded.snapshot_version.as_deref().and_then(|v| v.parse::<i64>().ok());
        let seqs: Vec<i64> = folded.seqs.iter().filter_map(|&s| i64::try_from(s).ok()).collect();
        let (_open, mut conn) = self.connection().await?;
        let sql = &self.inner.shared.sql;
        let result = tokio::time::timeout(self.timeout(), trim(&mut conn, sql, doc, &seqs, snapshot)).await;
        self.finish(conn, result)?;
        self.inner.shared.observer.storage_ok();
        Ok(())
    }
}

/// Deletes `seqs` and, if it is still `snapshot`, the stored snapshot, in one transaction.
async fn trim(
    conn: &mut Object,
    sql: &Sql,
    doc: &str,
    seqs: &[i64],
    snapshot: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    tx.execute(&tx.prepare_cached(&sql.delete_folded).await?, &[&doc, &seqs]).await?;
    if let Some(version) = snapshot {
        tx.execute(&tx.prepare_cached(&sql.delete_snapshot).await?, &[&doc, &version]).await?;
    }
    tx.commit().await
}

async fn load(conn: &mut Object, sql: &Sql, doc: &str) -> Result<StoredDoc, tokio_postgres::Error> {
    // One snapshot for both queries, so a compaction that commits between them is seen entirely
    // or not at all (never its new snapshot without the entries it deleted, or the reverse).
    let tx = conn.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?;
    let snapshot_row = tx.query_opt(&tx.prepare_cached(&sql.load_snapshot).await?, &[&doc]).await?;
    let rows = tx.query(&tx.prepare_cached(&sql.load_updates).await?, &[&doc]).await?;
    tx.commit().await?;
    let (snapshot, snapshot_version) = match snapshot_row {
        Some(row) => (Some(row.get::<_, Vec<u8>>(0)), Some(row.get::<_, i64>(1).to_string())),
        None => (None, None),
    };
    let updates = rows.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1))).collect();
    Ok(StoredDoc { snapshot, snapshot_version, updates })
}

/// Replaces the snapshot if it is still `expected` and deletes `seqs`, in one transaction.
/// Returns false (nothing changed) if another compaction replaced the snapshot first.
async fn compact(
    conn: &mut Object,
    sql: &Sql,
    doc: &str,
    snapshot: &[u8],
    expected: Option<i64>,
    seqs: &[i64],
) -> Result<bool, tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let replaced = match expected {
        None => tx.query_opt(&tx.prepare_cached(&sql.insert_first_snapshot).await?, &[&doc, &snapshot]).await?,
        Some(version) => {
            tx.query_opt(&tx.prepare_cached(&sql.replace_snapshot).await?, &[&doc, &snapshot, &version]).await?
        }
    };
    if replaced.is_none() {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.execute(&tx.prepare_cached(&sql.delete_folded).await?, &[&doc, &seqs]).await?;
    tx.commit().await?;
    Ok(true)
}
