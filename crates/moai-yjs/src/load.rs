//! Rebuilding a document from storage: one snapshot (a full v1 update) plus the journal of
//! updates persisted since. Any undecodable or unappliable piece fails the whole load — the
//! caller must then refuse the document, never fall back to an empty one, which would later
//! be persisted over the real data (hocuspocus#382, docs/protocols/yjs.md §8.3).

use thiserror::Error;
use yrs::updates::decoder::Decode;
use yrs::{Doc, Transact, Update};

use crate::room::Room;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("snapshot is not a valid v1 update: {0}")]
    SnapshotDecode(yrs::encoding::read::Error),
    #[error("snapshot could not be applied: {0}")]
    SnapshotApply(yrs::error::UpdateError),
    #[error("journal entry {index} is not a valid v1 update: {source}")]
    JournalDecode { index: usize, source: yrs::encoding::read::Error },
    #[error("journal entry {index} could not be applied: {source}")]
    JournalApply { index: usize, source: yrs::error::UpdateError },
    #[error("the Yjs library failed while loading: {0}")]
    Panicked(String),
}

/// Builds a document from an optional snapshot and the journal entries after it, in the order
/// they were persisted. Everything is applied in one transaction; the order matters little
/// (yrs parks out-of-order structs until their dependencies arrive) but is kept.
pub fn load_doc<'a, J>(snapshot: Option<&[u8]>, journal: J) -> Result<Doc, LoadError>
where
    J: IntoIterator<Item = &'a [u8]>,
{
    let doc = Doc::new();
    // A fresh doc has no other handle, so this cannot contend.
    let mut txn = doc.transact_mut();
    // As in `apply`: a panic must not unwind through the transaction (its commit could panic
    // again during unwinding and abort the process).
    let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), LoadError> {
        if let Some(snapshot) = snapshot {
            let update = Update::decode_v1(snapshot).map_err(LoadError::SnapshotDecode)?;
            txn.apply_update(update).map_err(LoadError::SnapshotApply)?;
        }
        for (index, entry) in journal.into_iter().enumerate() {
            let update = Update::decode_v1(entry).map_err(|source| LoadError::JournalDecode { index, source })?;
            txn.apply_update(update).map_err(|source| LoadError::JournalApply { index, source })?;
        }
        Ok(())
    }));
    match work {
        Ok(result) => {
            drop(txn);
            result?;
        }
        Err(payload) => {
            let _ = crate::apply::contain(move || drop(txn));
            return Err(LoadError::Panicked(crate::apply::panic_message(&*payload)));
        }
    }
    Ok(doc)
}

/// [`load_doc`] wrapped in a [`Room`].
pub fn load_room<'a, J>(doc_id: impl Into<String>, snapshot: Option<&[u8]>, journal: J) -> Result<Room, LoadError>
where
    J: IntoIterator<Item = &'a [u8]>,
{
    // A panic in yrs refuses this document (like any other load failure), not the process.
    let doc = crate::apply::contain(|| load_doc(snapshot, journal)).map_err(LoadError::Panicked)??;
    Ok(Room::from_doc(doc_id, doc))
}
