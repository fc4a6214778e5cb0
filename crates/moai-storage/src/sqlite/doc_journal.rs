//! [`DocJournal`] on SQLite: appends are single-row inserts batched by the group-commit writer;
//! snapshots are written in chunks of [`SNAPSHOT_CHUNK_BYTES`], each its own commit, and a last
//! small commit switches the document to the new chunk set and trims the journal. A crash in
//! between leaves an unreferenced chunk set, ignored by loads and removed by the next compaction.

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

use super::SqliteStorage;
use crate::{DocJournal, Folded, StorageError, StoredDoc, TrimJournal};

/// The version of a snapshot stored inline, before snapshots were chunked.
const INLINE: &str = "inline";

#[async_trait]
impl DocJournal for SqliteStorage {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        if updates.is_empty() {
            return Ok(None);
        }
        let doc = doc.to_owned();
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached("INSERT INTO doc_updates(doc, data) VALUES (?1, ?2) RETURNING seq")?;
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
                let row = conn
                    .prepare_cached("SELECT snapshot, version FROM doc_snapshots WHERE doc = ?1")?
                    .query_row(params![doc], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<i64>>(1)?)))
                    .optional()?;
                let snapshot_version =
                    row.as_ref().map(|(_, v)| v.map_or_else(|| INLINE.to_owned(), |v| v.to_string()));
                let snapshot = match row {
                    None => None,
                    Some((inline, None)) => Some(inline),
                    Some((_, Some(version))) => {
                        let mut chunks = conn.prepare_cached(
                            "SELECT data FROM doc_snapshot_chunks WHERE doc = ?1 AND version = ?2 ORDER BY idx",
                        )?;
                        let mut whole = Vec::new();
                        for chunk in chunks.query_map(params![doc, version], |r| r.get::<_, Vec<u8>>(0))? {
                            whole.extend_from_slice(&chunk?);
                        }
                        Some(whole)
                    }
                };
                let mut stmt = conn.prepare_cached("SELECT seq, data FROM doc_updates WHERE doc = ?1 ORDER BY seq")?;
                let updates = stmt
                    .query_map(params![doc], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(StoredDoc { snapshot, snapshot_version, updates })
            })();
            let _ = conn.execute_batch("COMMIT");
            result
        })
        .await
    }

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        // `through_seq` is informational (the highest entry folded); what is deleted is exactly
        // `folded.seqs`, as the contract says, by primary key in the last small commit.
        let through_seq = folded.seqs.iter().copied().max().unwrap_or(0);
        let seqs = folded.seqs;
        let snapshot = bytes_chunks(snapshot);
        let mut chunks = snapshot.into_iter().enumerate();
        // First chunk: pick a version no chunk set of this document uses, and drop chunk sets
        // left by compactions that crashed half-way.
        let (_, first) = chunks.next().unwrap_or((0, Vec::new()));
        let id = doc.to_owned();
        let version = self
            .write(move |conn| {
                let version: i64 = conn.query_row(
                    "SELECT MAX(COALESCE((SELECT MAX(version) FROM doc_snapshot_chunks WHERE doc = ?1), 0),
                                COALESCE((SELECT version FROM doc_snapshots WHERE doc = ?1), 0)) + 1",
                    params![id],
                    |r| r.get(0),
                )?;
                conn.prepare_cached(
                    "DELETE FROM doc_snapshot_chunks WHERE doc = ?1 AND version IS NOT
                         (SELECT version FROM doc_snapshots WHERE doc = ?1)",
                )?
                .execute(params![id])?;
                insert_chunk(conn, &id, version, 0, &first)?;
                Ok(version)
            })
            .await?;
        for (idx, chunk) in chunks {
            let id = doc.to_owned();
            self.write(move |conn| insert_chunk(conn, &id, version, idx as i64, &chunk)).await?;
        }
        // Switch to the new chunk set and trim the journal, atomically, if the snapshot is still
        // the one the compaction started from.
        let id = doc.to_owned();
        let expected = folded.snapshot_version;
        let switched = self
            .write(move |conn| {
                let stored: Option<Option<i64>> = conn
                    .prepare_cached("SELECT version FROM doc_snapshots WHERE doc = ?1")?
                    .query_row(params![id], |r| r.get(0))
                    .optional()?;
                let stored = stored.map(|v| v.map_or_else(|| INLINE.to_owned(), |v| v.to_string()));
                if stored != expected {
                    return Ok(false);
                }
                conn.prepare_cached(
                    "INSERT INTO doc_snapshots(doc, snapshot, through_seq, version) VALUES (?1, X'', ?2, ?3)
                 ON CONFLICT(doc) DO UPDATE SET snapshot = X'', through_seq = excluded.through_seq,
                     version = excluded.version, updated_at = unixepoch()",
                )?
                .execute(params![id, through_seq as i64, version])?;
                conn.prepare_cached("DELETE FROM doc_snapshot_chunks WHERE doc = ?1 AND version <> ?2")?
                    .execute(params![id, version])?;
                let mut delete = conn.prepare_cached("DELETE FROM doc_updates WHERE seq = ?1 AND doc = ?2")?;
                for seq in seqs.iter().filter_map(|&s| i64::try_from(s).ok()) {
                    delete.execute(params![seq, id])?;
                }
                Ok(true)
            })
            .await?;
        if switched {
            Ok(())
        } else {
            Err(StorageError::CompactionConflict { doc: doc.to_owned() })
        }
    }
}

#[async_trait]
impl TrimJournal for SqliteStorage {
    async fn trim(&self, doc: &str, folded: Folded) -> Result<(), StorageError> {
        let id = doc.to_owned();
        self.write(move |conn| {
            let mut delete = conn.prepare_cached("DELETE FROM doc_updates WHERE seq = ?1 AND doc = ?2")?;
            for seq in folded.seqs.iter().filter_map(|&s| i64::try_from(s).ok()) {
                delete.execute(params![seq, id])?;
            }
            let Some(expected) = folded.snapshot_version else { return Ok(()) };
            let stored: Option<Option<i64>> = conn
                .prepare_cached("SELECT version FROM doc_snapshots WHERE doc = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            let Some(stored) = stored else { return Ok(()) };
            if stored.map_or_else(|| INLINE.to_owned(), |v| v.to_string()) != expected {
                return Ok(());
            }
            conn.prepare_cached("DELETE FROM doc_snapshots WHERE doc = ?1")?.execute(params![id])?;
            if let Some(version) = stored {
                conn.prepare_cached("DELETE FROM doc_snapshot_chunks WHERE doc = ?1 AND version = ?2")?
                    .execute(params![id, version])?;
            }
            Ok(())
        })
        .await
    }
}

/// Size of one snapshot chunk: big enough that a 10 MB document is ten commits, small enough
/// that a journal append waiting behind one is delayed by about a millisecond of copying.
pub(crate) const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

fn bytes_chunks(mut bytes: Vec<u8>) -> Vec<Vec<u8>> {
    if bytes.len() <= SNAPSHOT_CHUNK_BYTES {
        return vec![bytes];
    }
    let mut out = Vec::with_capacity(bytes.len().div_ceil(SNAPSHOT_CHUNK_BYTES));
    while bytes.len() > SNAPSHOT_CHUNK_BYTES {
        let rest = bytes.split_off(SNAPSHOT_CHUNK_BYTES);
        out.push(std::mem::replace(&mut bytes, rest));
    }
    out.push(bytes);
    out
}

fn insert_chunk(conn: &rusqlite::Connection, doc: &str, version: i64, idx: i64, data: &[u8]) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO doc_snapshot_chunks(doc, version, idx, data) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![doc, version, idx, data])?;
    Ok(())
}
