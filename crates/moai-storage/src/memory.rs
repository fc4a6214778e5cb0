//! An in-memory backend with the same contracts as SQLite, for engine unit tests that should
//! not touch the disk. "Durable" here means "visible to the next load of this process".

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{DocJournal, StorageError, StoredDoc};

#[derive(Default)]
pub struct MemoryStorage {
    docs: Mutex<HashMap<String, StoredDoc>>,
    next_seq: Mutex<u64>,
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

    async fn compact(&self, doc: &str, snapshot: Vec<u8>, through_seq: u64) -> Result<(), StorageError> {
        let mut docs = self.docs.lock().map_err(|_| StorageError::Closed)?;
        let entry = docs.entry(doc.to_owned()).or_default();
        entry.snapshot = Some(snapshot);
        entry.updates.retain(|(seq, _)| *seq > through_seq);
        Ok(())
    }
}
