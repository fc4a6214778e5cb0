//! [`DocJournal`] on SQLite: appends are single-row inserts batched by the group-commit writer.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::SqliteStorage;
use crate::{DocJournal, StorageError, StoredDoc};

#[async_trait]
impl DocJournal for SqliteStorage {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        if updates.is_empty() {
            return Ok(None);
        }
        let doc = doc.to_owned();
        self.write(move |conn| {
            let mut stmt =
                conn.prepare_cached("INSERT INTO doc_updates(doc, data) VALUES (?1, ?2) RETURNING seq")?;
            let mut last = None;
            for update in updates {
                last = Some(stmt.query_row(params![doc, update], |r| r.get::<_, i64>(0))? as u64);
            }
            Ok(last)
        })
        .await
    }

    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        let doc = doc.to_owned();
        self.read(move |conn| {
            // One read transaction so the snapshot and the journal are a consistent pair even
            // if a compaction commits between the two queries.
            conn.execute_batch("BEGIN")?;
            let result = (|| {
                let snapshot = conn
                    .prepare_cached("SELECT snapshot FROM doc_snapshots WHERE doc = ?1")?
                    .query_row(params![doc], |r| r.get::<_, Vec<u8>>(0))
                    .optional()?;
                let mut stmt =
                    conn.prepare_cached("SELECT seq, data FROM doc_updates WHERE doc = ?1 ORDER BY seq")?;
                let updates = stmt
                    .query_map(params![doc], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(StoredDoc { snapshot, updates })
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
        .await
    }

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, through_seq: u64) -> Result<(), StorageError> {
        let doc = doc.to_owned();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO doc_snapshots(doc, snapshot, through_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT(doc) DO UPDATE SET snapshot = excluded.snapshot,
                     through_seq = excluded.through_seq, updated_at = unixepoch()",
            )?
            .execute(params![doc, snapshot, through_seq as i64])?;
            conn.prepare_cached("DELETE FROM doc_updates WHERE doc = ?1 AND seq <= ?2")?
                .execute(params![doc, through_seq as i64])?;
            Ok(())
        })
        .await
    }
}
