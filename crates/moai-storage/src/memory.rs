//! An in-memory backend with the same contracts as SQLite, for engine unit tests that should
//! not touch the disk. "Durable" here means "visible to the next load of this process".

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::covalue_store::check_append;
use crate::{
    AppendError, BytesSinceSignature, CoValueAppend, CoValueRecord, CoValueStore, DocJournal, Folded, Inventory,
    StorageError, StoredDoc, StoredKnownState, TrimJournal,
};

#[derive(Default)]
pub struct MemoryStorage {
    docs: Mutex<HashMap<String, StoredDoc>>,
    next_seq: Mutex<u64>,
    /// Snapshot versions handed out (unique per storage).
    next_version: std::sync::atomic::AtomicU64,
    covalues: Mutex<HashMap<String, MemoryCoValue>>,
}

/// A stored CoValue plus the per-session counter SQLite keeps in a column.
struct MemoryCoValue {
    record: CoValueRecord,
    /// `bytes_since_last_signature` per session, parallel to `record.sessions`.
    bytes_since_signature: Vec<u64>,
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl DocJournal for MemoryStorage {
    async fn append_many(&self, doc: &str, updates: Vec<Vec<u8>>) -> Result<Option<u64>, StorageError> {
        let mut next = self.next_seq.lock().map_err(|_| StorageError::Closed)?;
        let mut docs = self.docs.lock().map_err(|_| StorageError::Closed)?;
        let entry = docs.entry(doc.to_owned()).or_default();
        let mut last = None;
        for update in updates {
            *next += 1;
            entry.updates.push((*next, update));
            last = Some(*next);
        }
        Ok(last)
    }

    async fn load(&self, doc: &str) -> Result<StoredDoc, StorageError> {
        let docs = self.docs.lock().map_err(|_| StorageError::Closed)?;
        Ok(docs.get(doc).cloned().unwrap_or_default())
    }

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, folded: Folded) -> Result<(), StorageError> {
        let mut docs = self.docs.lock().map_err(|_| StorageError::Closed)?;
        let next_version = self.next_version.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let entry = docs.entry(doc.to_owned()).or_default();
        if entry.snapshot_version != folded.snapshot_version {
            return Err(StorageError::CompactionConflict { doc: doc.to_owned() });
        }
        entry.snapshot = Some(snapshot);
        entry.snapshot_version = Some(next_version.to_string());
        entry.updates.retain(|(seq, _)| !folded.seqs.contains(seq));
        Ok(())
    }
}

#[async_trait]
impl TrimJournal for MemoryStorage {
    async fn trim(&self, doc: &str, folded: Folded) -> Result<(), StorageError> {
        let mut docs = self.docs.lock().map_err(|_| StorageError::Closed)?;
        if let Some(entry) = docs.get_mut(doc) {
            entry.updates.retain(|(seq, _)| !folded.seqs.contains(seq));
            if folded.snapshot_version.is_some() && entry.snapshot_version == folded.snapshot_version {
                entry.snapshot = None;
                entry.snapshot_version = None;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl CoValueStore for MemoryStorage {
    async fn load_covalue(&self, id: &str) -> Result<Option<CoValueRecord>, StorageError> {
        let covalues = self.covalues.lock().map_err(|_| StorageError::Closed)?;
        Ok(covalues.get(id).map(|c| c.record.clone()))
    }

    async fn append_covalues(&self, appends: Vec<CoValueAppend>) -> Vec<Result<(), AppendError>> {
        let Ok(mut covalues) = self.covalues.lock() else {
            return appends.iter().map(|_| Err(StorageError::Closed.into())).collect();
        };
        // Checked before anything is applied, like SQLite's savepoint per append.
        appends.into_iter().map(|append| apply(&mut covalues, append)).collect()
    }

    async fn known_states(&self, ids: Vec<String>) -> Result<Vec<Option<StoredKnownState>>, StorageError> {
        let covalues = self.covalues.lock().map_err(|_| StorageError::Closed)?;
        Ok(ids
            .iter()
            .map(|id| {
                covalues.get(id).map(|c| StoredKnownState {
                    header: true,
                    sessions: c
                        .record
                        .sessions
                        .iter()
                        .map(|s| (s.session.clone(), s.transactions.len() as u64))
                        .collect(),
                    deleted: c.record.deleted,
                })
            })
            .collect())
    }
}

/// One page of `ids` in byte order: after `after`, at most `limit`.
fn page<'a>(ids: impl Iterator<Item = &'a String>, after: Option<&str>, limit: usize) -> Vec<String> {
    let mut ids: Vec<&String> = ids.filter(|id| after.is_none_or(|a| id.as_str() > a)).collect();
    ids.sort_unstable();
    ids.into_iter().take(limit).cloned().collect()
}

#[async_trait]
impl Inventory for MemoryStorage {
    async fn list_docs(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        let docs = self.docs.lock().map_err(|_| StorageError::Closed)?;
        // An empty append leaves an empty entry behind: that document holds nothing.
        let held = docs.iter().filter(|(_, d)| d.snapshot.is_some() || !d.updates.is_empty()).map(|(id, _)| id);
        Ok(page(held, after, limit))
    }

    async fn list_covalues(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StorageError> {
        let covalues = self.covalues.lock().map_err(|_| StorageError::Closed)?;
        Ok(page(covalues.keys(), after, limit))
    }
}

fn apply(covalues: &mut HashMap<String, MemoryCoValue>, append: CoValueAppend) -> Result<(), AppendError> {
    let existing = covalues.get(&append.id);
    check_append(&append, existing.is_some(), |session| {
        Ok(existing
            .and_then(|c| c.record.sessions.iter().find(|s| s.session == session))
            .map_or(0, |s| s.transactions.len() as u64))
    })?;
    let entry = covalues.entry(append.id).or_insert_with(|| MemoryCoValue {
        record: CoValueRecord { header: append.header.unwrap_or_default(), sessions: Vec::new(), deleted: false },
        bytes_since_signature: Vec::new(),
    });
    entry.record.deleted |= append.deleted;
    let erase = append.erase_sessions;
    for s in append.sessions {
        let index = match entry.record.sessions.iter().position(|r| r.session == s.session) {
            Some(i) => i,
            None => {
                entry.record.sessions.push(crate::SessionRecord {
                    session: s.session.clone(),
                    transactions: Vec::new(),
                    last_signature: String::new(),
                    checkpoints: Vec::new(),
                });
                entry.bytes_since_signature.push(0);
                entry.record.sessions.len() - 1
            }
        };
        let stored = &mut entry.record.sessions[index];
        stored.transactions.extend(s.transactions);
        stored.last_signature = s.last_signature;
        for (count, signature) in s.checkpoints {
            // Same as SQLite's INSERT OR REPLACE keyed by count; kept ascending.
            stored.checkpoints.retain(|(c, _)| *c != count);
            stored.checkpoints.push((count, signature));
        }
        stored.checkpoints.sort_by_key(|(c, _)| *c);
        if let Some(bytes) = entry.bytes_since_signature.get_mut(index) {
            *bytes = match s.bytes_since_signature {
                BytesSinceSignature::Add(b) => bytes.saturating_add(b),
                BytesSinceSignature::Reset(b) => b,
            };
        }
    }
    // Sessions and their byte counters are parallel vectors: remove from both.
    let mut i = 0;
    while i < entry.record.sessions.len() {
        if erase.contains(&entry.record.sessions[i].session) {
            entry.record.sessions.remove(i);
            if i < entry.bytes_since_signature.len() {
                entry.bytes_since_signature.remove(i);
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}
