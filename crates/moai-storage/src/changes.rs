//! What became durable, as the engines see it: "this document or CoValue changed (and was just
//! created)". Engines report it after the write committed; the server edge turns it into
//! webhooks. Defined here because both engines write through storage and may not depend on the
//! server; the storage room itself never calls it.

use std::fmt;
use std::sync::Arc;

/// Which kind of stored thing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A Yjs document (`DocJournal`).
    YjsDocument,
    /// A CoJSON CoValue (`CoValueStore`).
    CoValue,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::YjsDocument => "yjs",
            ChangeKind::CoValue => "cojson",
        }
    }
}

/// Told about every durable change. Must not block: it is called on engine tasks.
pub trait ChangeObserver: Send + Sync + 'static {
    /// `id` changed durably; `created` when this write created it.
    fn changed(&self, kind: ChangeKind, id: &str, created: bool);
}

/// A shared [`ChangeObserver`] for engine configurations (cloneable, printable).
#[derive(Clone)]
pub struct ChangeSink(pub Arc<dyn ChangeObserver>);

impl ChangeSink {
    pub fn changed(&self, kind: ChangeKind, id: &str, created: bool) {
        self.0.changed(kind, id, created);
    }
}

impl fmt::Debug for ChangeSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChangeSink")
    }
}
