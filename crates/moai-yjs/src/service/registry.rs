//! The registry of loaded documents: document id → the command queue of its owner task.
//!
//! Creating the task and inserting its queue happen under one lock, so two connections that
//! arrive together for an unloaded document always get the same task (y-sweet split such
//! clients into two in-memory copies). A task that ends (evicted, or failed to load) removes
//! its own entry; a caller that raced with that gets `Retry` and simply asks again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use moai_storage::DocJournal;
use tokio::sync::{mpsc, oneshot};

use super::compactor::Compactor;
use super::doc_task::{self, Command, Reply};
use super::stats::{self, DocStats, DocumentsOverview};
use super::{ServiceError, Unavailable, YjsConfig, YjsSession};
use crate::{Access, Dialect};

/// How many times a caller re-resolves a document that was being evicted under it.
const RETRIES: usize = 8;
/// Commands queued for one document before senders wait.
const COMMAND_QUEUE: usize = 1024;

pub(crate) struct Registry {
    docs: Mutex<HashMap<String, Entry>>,
    next_generation: Mutex<u64>,
    pub(crate) storage: Arc<dyn DocJournal>,
    pub(crate) config: YjsConfig,
    pub(crate) compactor: Arc<Compactor>,
    /// The cluster bus, when other instances serve the same documents.
    pub(crate) bus: Option<moai_cluster::Bus>,
}

#[derive(Clone)]
struct Entry {
    generation: u64,
    commands: mpsc::Sender<Command>,
    /// What the owner task publishes about the document (for the server's dashboard).
    stats: Arc<DocStats>,
}

impl Registry {
    pub(crate) fn new(storage: Arc<dyn DocJournal>, config: YjsConfig, bus: Option<moai_cluster::Bus>) -> Arc<Self> {
        Arc::new(Self {
            docs: Mutex::default(),
            next_generation: Mutex::new(0),
            storage,
            config,
            compactor: Arc::new(Compactor::start()),
            bus,
        })
    }

    pub(crate) fn loaded(&self) -> usize {
        self.docs.lock().map(|d| d.len()).unwrap_or(0)
    }

    /// The loaded documents' count and the `limit` busiest. One pass over the map under its
    /// lock (no task is asked anything), copying only the `limit` listed.
    pub(crate) fn documents(&self, limit: usize) -> DocumentsOverview {
        let docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        stats::overview(docs.iter().map(|(id, e)| (id.as_str(), &*e.stats)), limit)
    }

    /// The command queue of `doc_id`'s owner task, starting the task if there is none.
    fn resolve(self: &Arc<Self>, doc_id: &str) -> mpsc::Sender<Command> {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = docs.get(doc_id) {
            if !entry.commands.is_closed() {
                return entry.commands.clone();
            }
        }
        let generation = {
            let mut g = self.next_generation.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let stats = Arc::new(DocStats::new());
        docs.insert(doc_id.to_owned(), Entry { generation, commands: tx.clone(), stats: stats.clone() });
        doc_task::spawn(doc_id.to_owned(), generation, rx, tx.clone(), Arc::downgrade(self), stats);
        tx
    }

    /// Called by a task that is about to end. Returns false (and keeps the entry) if commands
    /// are waiting, in which case the task must keep serving.
    pub(crate) fn try_remove(&self, doc_id: &str, generation: u64, pending: &mpsc::Receiver<Command>) -> bool {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            return false;
        }
        if docs.get(doc_id).is_some_and(|e| e.generation == generation) {
            docs.remove(doc_id);
        }
        true
    }

    /// Removes the entry unconditionally (load or storage failure).
    pub(crate) fn remove(&self, doc_id: &str, generation: u64) {
        let mut docs = self.docs.lock().unwrap_or_else(|p| p.into_inner());
        if docs.get(doc_id).is_some_and(|e| e.generation == generation) {
            docs.remove(doc_id);
        }
    }

    /// Sends a request to the document's task and waits for the reply, re-resolving the
    /// document if the task ended in between.
    async fn request<T>(
        self: &Arc<Self>,
        doc_id: &str,
        make: impl Fn(oneshot::Sender<Reply<T>>) -> Command,
    ) -> Result<T, ServiceError> {
        for _ in 0..RETRIES {
            let commands = self.resolve(doc_id);
            let (reply, answer) = oneshot::channel();
            if commands.send(make(reply)).await.is_err() {
                continue; // task ended between resolve and send
            }
            match answer.await {
                Ok(Reply::Done(value)) => return Ok(value),
                Ok(Reply::Failed(e)) => return Err(e),
                Ok(Reply::Retry) | Err(_) => continue,
            }
        }
        Err(ServiceError::Unavailable(Unavailable::KeptClosing(doc_id.to_owned())))
    }

    pub(crate) async fn join(
        self: &Arc<Self>,
        doc_id: &str,
        access: Access,
        dialect: Dialect,
    ) -> Result<YjsSession, ServiceError> {
        let outbox_frames = self.config.outbox_frames;
        let make = move |reply| {
            let (outbox, outbound) = mpsc::channel(outbox_frames);
            Command::Join { access, dialect, outbox, outbound: Some(outbound), reply }
        };
        self.request(doc_id, make).await
    }

    pub(crate) async fn read_state(self: &Arc<Self>, doc_id: &str) -> Result<Vec<u8>, ServiceError> {
        self.request(doc_id, |reply| Command::ReadState { reply }).await
    }

    pub(crate) async fn apply_update(self: &Arc<Self>, doc_id: &str, update: Vec<u8>) -> Result<(), ServiceError> {
        self.request(doc_id, |reply| Command::ApplyUpdate { update: update.clone(), reply }).await
    }
}

pub(crate) type RegistryRef = Weak<Registry>;
