//! The async driver of the Yjs engine: it runs [`Room`](crate::Room)s against storage.
//!
//! One owner task per loaded document holds the `Room` and is the only code that touches it, so
//! there are no locks around documents and every document's messages are handled in arrival
//! order. The registry creates that task on first use and every later connection to the same
//! document joins the same task: loading is single-flight by construction (simultaneous first
//! connections always share one in-memory document).
//!
//! What the edge sees: [`YjsService::join`] gives a [`YjsSession`] for one socket (its inbound
//! frames go in with [`YjsSession::receive`]; its outbound frames come out of
//! [`YjsSession::outbound`]), and [`YjsService::read_state`] / [`YjsService::apply_update`] serve
//! the HTTP API. Sockets, heartbeats and auth stay at the edge.

mod compactor;
mod doc_task;
mod registry;
mod session;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use moai_storage::{DocJournal, StorageError};

use crate::{Access, Dialect};
use thiserror::Error;

pub use doc_task::DocLoadError;
pub use session::{Outbound, YjsInlet, YjsSession};
pub use stats::{DocSummary, DocumentsOverview};

use crate::room::RoomError;

use registry::Registry;

/// Tunables of the Yjs engine.
#[derive(Debug, Clone)]
pub struct YjsConfig {
    /// Frames queued for one socket before it counts as too slow and is closed (it resyncs on
    /// reconnect). Never silently skipped: a skipped update would leave a client diverged.
    pub outbox_frames: usize,
    /// Bytes queued for one socket before it counts as too slow and is closed. One frame larger
    /// than this still goes to an empty queue (a big document's first SyncStep2).
    pub outbox_bytes: usize,
    /// Bytes of inbound frames queued for one document; a socket whose frame does not fit
    /// waits (its reads slow down) instead of growing memory.
    pub inbound_bytes: usize,
    /// A document with no connections for this long is compacted and evicted from memory.
    pub idle_evict: Duration,
    /// Journal bytes after which the journal is folded into a snapshot in the background.
    pub compact_journal_bytes: usize,
    /// Most commands one document task handles per group commit.
    pub max_batch: usize,
    /// What updates may hold beyond the basics (subdocuments: off by default, see
    /// [`crate::plausible::Policy`]).
    pub policy: crate::plausible::Policy,
    /// In a cluster: how often each open document tells the other instances what it has, so
    /// that any difference (a lost message) is repaired (docs/cluster.md).
    pub cluster_exchange: Duration,
    /// Told after every durable change of a document (webhooks); never waited on.
    pub changes: Option<moai_storage::ChangeSink>,
}

impl Default for YjsConfig {
    fn default() -> Self {
        Self {
            outbox_frames: 1024,
            outbox_bytes: 32 << 20,
            inbound_bytes: 64 << 20,
            idle_evict: Duration::from_secs(30),
            compact_journal_bytes: 1 << 20,
            max_batch: 256,
            policy: crate::plausible::Policy::default(),
            cluster_exchange: Duration::from_secs(10),
            changes: None,
        }
    }
}

/// Why the engine could not serve a request. Cloned to every waiter of a failed document, so
/// the underlying errors are shared (`Arc`).
#[derive(Debug, Error, Clone)]
pub enum ServiceError {
    /// The stored document could not be read or decoded. The document is refused rather than
    /// served empty, which could later overwrite the real data.
    #[error("document could not be loaded: {0}")]
    LoadFailed(Arc<DocLoadError>),
    /// Storage failed while persisting; the document was closed and will reload on next use.
    #[error("storage failed: {0}")]
    Storage(Arc<StorageError>),
    /// The update is not a valid Yjs update (HTTP API); the reason is told to the client.
    #[error("invalid update: {0}")]
    InvalidUpdate(String),
    /// The update builds on changes the document does not have (HTTP API); it was not applied.
    #[error("the update depends on changes this document does not have; send those first (or a full-state update)")]
    MissingDependencies,
    /// The engine is shutting down or the document is being closed.
    #[error("document unavailable: {0}")]
    Unavailable(Unavailable),
}

/// Why a document could not be reached.
#[derive(Debug, Error, Clone)]
pub enum Unavailable {
    /// The Yjs library failed on this document (the panic's message): it is closed and reloads
    /// from storage on next use.
    #[error("document failed: {0}")]
    Failed(String),
    /// The document answered with an error of its room.
    #[error(transparent)]
    Room(Arc<RoomError>),
    /// The document kept closing (it failed, or was evicted) while we tried to reach it.
    #[error("document {0} kept closing while we tried to reach it")]
    KeptClosing(String),
}

/// Handle to the Yjs engine. Cheap to clone.
#[derive(Clone)]
pub struct YjsService {
    registry: Arc<Registry>,
}

impl YjsService {
    pub fn new(storage: Arc<dyn DocJournal>, config: YjsConfig) -> Self {
        Self { registry: Registry::new(storage, config, None) }
    }

    /// An engine that serves its documents together with other instances on `bus` (cluster):
    /// every open document joins its topic, publishes its durable changes and its sockets'
    /// presence, and applies the other instances' (docs/cluster.md).
    pub fn clustered(storage: Arc<dyn DocJournal>, config: YjsConfig, bus: moai_cluster::Bus) -> Self {
        Self { registry: Registry::new(storage, config, Some(bus)) }
    }

    /// Connects a new socket to `doc_id`, loading the document if needed. The session's
    /// outbound queue already holds the server's SyncStep1 (and awareness states, if any).
    pub async fn join(&self, doc_id: &str) -> Result<YjsSession, ServiceError> {
        self.registry.join(doc_id, Access::ReadWrite, Dialect::YWebsocket).await
    }

    /// [`YjsService::join`] with the connection's access: a read-only session loads, receives
    /// updates and shows presence, but its document updates are dropped ([`crate::Room::connect_with`]).
    pub async fn join_as(&self, doc_id: &str, access: Access) -> Result<YjsSession, ServiceError> {
        self.registry.join(doc_id, access, Dialect::YWebsocket).await
    }

    /// [`YjsService::join_as`] for a socket that speaks `dialect` ([`crate::Room::connect_as`]):
    /// a Hocuspocus session shares the document, its updates and its presence with y-websocket
    /// sessions, but its outbound queue starts without the server's SyncStep1 (its client asks
    /// first) and its updates are acknowledged once durable.
    pub async fn join_with(&self, doc_id: &str, access: Access, dialect: Dialect) -> Result<YjsSession, ServiceError> {
        self.registry.join(doc_id, access, dialect).await
    }

    /// The whole document as one Yjs v1 update.
    pub async fn read_state(&self, doc_id: &str) -> Result<Vec<u8>, ServiceError> {
        self.registry.read_state(doc_id).await
    }

    /// Applies a v1 update from the HTTP API: persisted, then broadcast to connected clients.
    pub async fn apply_update(&self, doc_id: &str, update: Vec<u8>) -> Result<(), ServiceError> {
        self.registry.apply_update(doc_id, update).await
    }

    /// Documents currently held in memory.
    pub fn loaded_documents(&self) -> usize {
        self.registry.loaded()
    }

    /// How many documents are held in memory and the `limit` busiest of them (most
    /// connections, then largest): connections, people present, stored size, updates. Cheap
    /// and bounded: it reads counters the documents' tasks publish, never waits for a task, and
    /// copies only `limit` entries (the server's dashboard asks once a second).
    pub fn documents(&self, limit: usize) -> DocumentsOverview {
        self.registry.documents(limit)
    }
}
