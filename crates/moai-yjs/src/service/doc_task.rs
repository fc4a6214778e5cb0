//! The owner task of one document.
//!
//! It loads the document (snapshot + journal) before handling anything, then loops: take every
//! queued command (up to `max_batch`), run them through the [`Room`], append every resulting
//! update to the journal in ONE storage call, and only after that write is durable perform the
//! sends. That is the room's ordering contract with group commit: nobody ever sees an update
//! that a `kill -9` could lose, and a burst of edits costs one commit, not one per edit.
//!
//! In a cluster it also holds the document's bus topic: its own durable changes and its sockets'
//! presence are published after the commit (the room returns them as `Publish`, ordered like
//! sends), the other instances' arrive as commands of the same loop, every `cluster_exchange` it
//! publishes what it has so that a lost message is repaired, and a resync (the bus lost track)
//! reads the document back from the shared storage and applies what memory lacks.
//!
//! It also folds the journal into a snapshot in the background once it grows past the
//! configured size (off this task: the snapshot is rebuilt from storage on a blocking thread, so
//! the live document is never locked for O(document) work), and evicts the document after it
//! has had no connections for the idle period.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use moai_cluster::{BusEvent, Topic};
use moai_storage::{DocJournal, StorageError};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use super::compactor::Compactor;
use super::registry::RegistryRef;
use super::session::SessionFlags;
use super::stats::DocStats;
use super::{Outbound, ServiceError, Unavailable, YjsConfig, YjsSession};
use crate::room::{Action, RoomError};
use crate::{load_room, Access, ConnId, Dialect, LoadError, Room};

/// Close code for "the server could not serve this document" (load or storage failure).
const CLOSE_INTERNAL: u16 = 1011;

pub(crate) enum Reply<T> {
    Done(T),
    Failed(ServiceError),
    /// The task is ending; resolve the document again.
    Retry,
}

pub(crate) enum Command {
    Join {
        access: Access,
        dialect: Dialect,
        outbox: mpsc::Sender<Outbound>,
        outbound: Option<mpsc::Receiver<Outbound>>,
        reply: oneshot::Sender<Reply<YjsSession>>,
    },
    Frame {
        conn: ConnId,
        frame: Bytes,
        /// Its share of the document's inbound byte budget, given back when handled.
        budget: OwnedSemaphorePermit,
    },
    Leave {
        conn: ConnId,
    },
    ReadState {
        reply: oneshot::Sender<Reply<Vec<u8>>>,
    },
    ApplyUpdate {
        update: Vec<u8>,
        reply: oneshot::Sender<Reply<()>>,
    },
    /// From the document's cluster topic.
    Bus(BusEvent),
}

/// The pause after a failed compaction before the next is tried; it doubles with every further
/// failure up to [`COMPACT_RETRY_MAX`] and is forgotten after a success. A store that is down or
/// slow (object storage, a database server) is then tried a few times a minute, not after every
/// write, which would reload the whole journal each time and log a warning each time.
const COMPACT_RETRY_MIN: Duration = Duration::from_secs(1);
const COMPACT_RETRY_MAX: Duration = Duration::from_secs(60);

/// How often people present are counted for the dashboard (at most; also when connections change).
const PRESENT_REFRESH: Duration = Duration::from_millis(500);

/// Most permits a semaphore may hold is `u32::MAX >> 3`; the inbound budget stays under it.
pub(crate) const MAX_INBOUND_PERMITS: usize = 1 << 28;

struct Connection {
    outbox: mpsc::Sender<Outbound>,
    flags: Arc<SessionFlags>,
}

struct DocTask {
    doc_id: String,
    generation: u64,
    room: Room,
    conns: HashMap<ConnId, Connection>,
    next_conn: u64,
    commands: mpsc::Receiver<Command>,
    self_sender: mpsc::Sender<Command>,
    registry: RegistryRef,
    storage: Arc<dyn DocJournal>,
    compactor: Arc<Compactor>,
    config: YjsConfig,
    /// Journal bytes not yet folded into a snapshot.
    journal_bytes: usize,
    compaction: Option<JoinHandle<Result<usize, CompactionError>>>,
    /// After failed compactions: the current pause and when the next may start.
    compact_retry: Option<(Duration, Instant)>,
    /// What the dashboard reads about this document, refreshed every turn of the loop.
    stats: Arc<DocStats>,
    /// When people present were last counted for `stats`.
    present_counted: Instant,
    /// Inbound bytes queued for this document ([`YjsConfig::inbound_bytes`]).
    inbound: Arc<Semaphore>,
    /// yrs panicked while handling this batch: the room is unusable.
    poisoned: Option<String>,
    /// The document's cluster topic (when other instances serve it too).
    topic: Option<Topic>,
    /// When this instance next tells the others what it has.
    next_exchange: Instant,
    /// A resync reading the document back from storage: the update memory lacks.
    resync: Option<JoinHandle<Result<Vec<u8>, CompactionError>>>,
    /// Another resync was asked while one ran.
    resync_again: bool,
    /// When a socket or an HTTP request last used the document (eviction counts from here).
    last_local_use: Instant,
    /// Storage held nothing of this document when it was loaded: its first write creates it.
    stored_empty: bool,
}

pub(crate) fn spawn(
    doc_id: String,
    generation: u64,
    commands: mpsc::Receiver<Command>,
    self_sender: mpsc::Sender<Command>,
    registry: RegistryRef,
    stats: Arc<DocStats>,
) {
    tokio::spawn(async move {
        let Some((storage, config, compactor, bus)) =
            registry.upgrade().map(|r| (r.storage.clone(), r.config.clone(), r.compactor.clone(), r.bus.clone()))
        else {
            return;
        };
        // Join before loading: what is published from now on arrives as messages, everything
        // before is durable and in the load.
        let topic = match &bus {
            Some(bus) => Some(bus.join(&topic_name(&doc_id)).await),
            None => None,
        };
        match load(&doc_id, storage.as_ref(), &stats, config.compact_journal_bytes).await {
            Ok((mut room, journal_bytes, stored_empty, load_compaction)) => {
                stats.loaded.store(true, Ordering::Relaxed);
                room.set_policy(config.policy);
                if topic.is_some() {
                    room.set_clustered();
                }
                let next_exchange = Instant::now() + jittered(config.cluster_exchange, &doc_id);
                let inbound = Arc::new(Semaphore::new(config.inbound_bytes.clamp(1, MAX_INBOUND_PERMITS)));
                tracing::debug!(doc = %doc_id, journal_bytes, "document loaded");
                let mut task = DocTask {
                    doc_id,
                    generation,
                    room,
                    conns: HashMap::new(),
                    next_conn: 0,
                    commands,
                    self_sender,
                    registry,
                    storage,
                    compactor,
                    config,
                    journal_bytes,
                    compaction: None,
                    compact_retry: None,
                    stats,
                    present_counted: Instant::now(),
                    inbound,
                    poisoned: None,
                    topic,
                    next_exchange,
                    resync: None,
                    resync_again: false,
                    last_local_use: Instant::now(),
                    stored_empty,
                };
                if let Some(c) = load_compaction {
                    task.compaction = Some(spawn_write_back(&task.doc_id, task.storage.clone(), task.stats.clone(), c));
                }
                let joined = task.room.cluster_joined();
                task.perform(joined.into());
                task.run().await;
            }
            Err(reason) => {
                tracing::error!(doc = %doc_id, error = %reason, "document failed to load; refusing it");
                if let Some(r) = registry.upgrade() {
                    r.remove(&doc_id, generation);
                }
                fail_all(commands, ServiceError::LoadFailed(Arc::new(reason)));
            }
        }
    });
}

/// Writes the snapshot made at load over the journal it covers, in the background (a
/// compaction like the others: the task waits for it before it is evicted or compacts again).
fn spawn_write_back(
    doc_id: &str,
    storage: Arc<dyn DocJournal>,
    stats: Arc<DocStats>,
    c: LoadCompaction,
) -> JoinHandle<Result<usize, CompactionError>> {
    let doc_id = doc_id.to_owned();
    tokio::spawn(async move {
        let bytes = c.snapshot.len() as u64;
        storage.compact(&doc_id, c.snapshot, c.folded).await?;
        stats.snapshot_bytes.store(bytes, Ordering::Relaxed);
        tracing::debug!(doc = %doc_id, folded = c.folded_bytes, "long journal compacted at load");
        Ok(c.folded_bytes)
    })
}

/// Why a document could not be loaded. It is then refused, never served empty.
#[derive(Debug, Error)]
pub enum DocLoadError {
    /// Storage could not read the snapshot and journal.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// What storage holds does not rebuild a document.
    #[error(transparent)]
    Rebuild(#[from] LoadError),
    /// The blocking task that rebuilds the document ended without an answer.
    #[error("load task failed: {0}")]
    Task(#[from] JoinError),
}

/// Journal entries found at load from which the loaded state is written back as a snapshot at
/// once. The byte threshold ([`YjsConfig::compact_journal_bytes`]) is only checked after a
/// write, so a server that is restarted (or killed) often never reaches it within one life, and
/// every load replayed the whole journal: the crash soak's loads grew with every cycle
/// (docs/soak.md). Many small entries cost more to replay than their bytes suggest.
const COMPACT_AT_LOAD_ENTRIES: usize = 1000;

/// A snapshot of the state just loaded, to replace the journal it was built from.
struct LoadCompaction {
    snapshot: Vec<u8>,
    folded: moai_storage::Folded,
    folded_bytes: usize,
}

/// The room, its journal bytes, whether storage held nothing of it, and the compaction to start
/// when the journal was long.
async fn load(
    doc_id: &str,
    storage: &dyn DocJournal,
    stats: &DocStats,
    compact_bytes: usize,
) -> Result<(Room, usize, bool, Option<LoadCompaction>), DocLoadError> {
    let stored = storage.load(doc_id).await?;
    let journal_bytes = stored.journal_bytes();
    let empty = stored.snapshot.is_none() && stored.updates.is_empty();
    stats.snapshot_bytes.store(stored.snapshot.as_ref().map_or(0, |s| s.len() as u64), Ordering::Relaxed);
    let long = stored.updates.len() >= COMPACT_AT_LOAD_ENTRIES || journal_bytes >= compact_bytes.max(1);
    let folded = long.then(|| stored.folded());
    let id = doc_id.to_owned();
    // Applying a large snapshot is O(document): keep it off the async workers. The snapshot of
    // a long journal is encoded here too, from exactly what storage held (nothing else has been
    // applied yet), so it covers the folded entries and nothing more.
    let (room, snapshot) = tokio::task::spawn_blocking(move || {
        let room = load_room(id, stored.snapshot.as_deref(), stored.updates.iter().map(|(_, u)| u.as_slice()))?;
        let snapshot = if long { room.encode_state_as_update().ok() } else { None };
        Ok::<_, LoadError>((room, snapshot))
    })
    .await??;
    let compaction = match (snapshot, folded) {
        (Some(snapshot), Some(folded)) => Some(LoadCompaction { snapshot, folded, folded_bytes: journal_bytes }),
        _ => None,
    };
    Ok((room, journal_bytes, empty, compaction))
}

/// Answers every queued and future command with `error` (the document could not be served).
fn fail_all(mut commands: mpsc::Receiver<Command>, error: ServiceError) {
    commands.close();
    while let Ok(cmd) = commands.try_recv() {
        match cmd {
            Command::Join { reply, .. } => drop(reply.send(Reply::Failed(error.clone()))),
            Command::ReadState { reply } => drop(reply.send(Reply::Failed(error.clone()))),
            Command::ApplyUpdate { reply, .. } => drop(reply.send(Reply::Failed(error.clone()))),
            Command::Frame { .. } | Command::Leave { .. } | Command::Bus(_) => {}
        }
    }
}

/// A period between half and one and a half `period`, different each time: documents opened
/// together (a benchmark's, a popular page's) must not all exchange state in the same instant,
/// which showed as a burst of late deliveries every period.
fn jittered(period: Duration, doc_id: &str) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(doc_id.as_bytes());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let fraction = (h.finish() % 1000) as u32; // 0..999
    period / 2 + period * fraction / 1000
}

/// The bus topic of a Yjs document.
fn topic_name(doc_id: &str) -> String {
    format!("y:{doc_id}")
}

/// Replies that may only be sent after the batch's updates are durable.
enum Deferred {
    State(oneshot::Sender<Reply<Vec<u8>>>, Reply<Vec<u8>>),
    Applied(oneshot::Sender<Reply<()>>),
    Rejected(oneshot::Sender<Reply<()>>, ServiceError),
}

impl DocTask {
    async fn run(mut self) {
        loop {
            self.publish_stats();
            let idle = self.conns.is_empty() && self.compaction.is_none() && self.resync.is_none();
            // Cluster traffic does not count as use: a document nobody here uses is evicted.
            let idle_deadline = self.last_local_use + self.config.idle_evict;
            let first = tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => return, // cannot happen while we hold self_sender; be safe
                },
                result = async { self.compaction.as_mut().expect("guarded").await }, if self.compaction.is_some() => {
                    self.compaction = None;
                    self.compaction_finished(result.unwrap_or_else(|e| Err(CompactionError::Task(e))));
                    continue;
                }
                event = async { self.topic.as_mut().expect("guarded").recv().await }, if self.topic.is_some() => match event {
                    Some(event) => Command::Bus(event),
                    None => { self.topic = None; continue; }
                },
                _ = tokio::time::sleep_until(self.next_exchange), if self.topic.is_some() => {
                    self.next_exchange = Instant::now() + jittered(self.config.cluster_exchange, &self.doc_id);
                    if !self.exchange_state() {
                        return;
                    }
                    continue;
                }
                result = async { self.resync.as_mut().expect("guarded").await }, if self.resync.is_some() => {
                    self.resync = None;
                    if !self.resync_finished(result.unwrap_or_else(|e| Err(CompactionError::Task(e)))).await {
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(idle_deadline), if idle => {
                    if self.evict().await {
                        return;
                    }
                    self.last_local_use = Instant::now();
                    continue;
                }
            };
            if !matches!(first, Command::Bus(_)) {
                self.last_local_use = Instant::now();
            }
            let mut batch = vec![first];
            while batch.len() < self.config.max_batch {
                match self.commands.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            if !self.handle_batch(batch).await {
                return;
            }
        }
    }

    /// Refreshes what the dashboard reads: a few relaxed stores; people present (a count over
    /// the awareness clients) at most every [`PRESENT_REFRESH`] or when connections change.
    fn publish_stats(&mut self) {
        let connections = self.conns.len();
        let changed = self.stats.connections.swap(connections, Ordering::Relaxed) != connections;
        self.stats.journal_bytes.store(self.journal_bytes as u64, Ordering::Relaxed);
        if changed || self.present_counted.elapsed() >= PRESENT_REFRESH {
            self.present_counted = Instant::now();
            self.stats.present.store(self.room.awareness().present_count(), Ordering::Relaxed);
        }
    }

    /// Returns false when the task must end (storage failed).
    async fn handle_batch(&mut self, batch: Vec<Command>) -> bool {
        let mut actions = Vec::new();
        let mut deferred = Vec::new();
        for cmd in batch {
            self.handle(cmd, &mut actions, &mut deferred);
            if self.poisoned.is_some() {
                break;
            }
        }
        if let Some(why) = self.poisoned.take() {
            // Nothing of this batch was persisted or sent; its writers were not acknowledged
            // and re-send on reconnect. Memory may be half-changed: drop it, reload from storage.
            tracing::error!(doc = %self.doc_id, error = %why, "the Yjs library panicked; closing the document to reload it from storage");
            let error = ServiceError::Unavailable(Unavailable::Failed(why));
            self.fail_document(error, "document failed; reconnect", deferred);
            return false;
        }

        // Group commit: every update of the batch in one durable append, before any send.
        let mut updates = Vec::new();
        let mut rest = VecDeque::with_capacity(actions.len());
        for action in actions {
            match action {
                Action::Persist { update } => updates.push(update),
                other => rest.push_back(other),
            }
        }
        if !updates.is_empty() {
            let bytes: usize = updates.iter().map(Vec::len).sum();
            let count = updates.len() as u64;
            if let Err(e) = self.storage.append_many(&self.doc_id, updates).await {
                self.storage_failed(e, deferred);
                return false;
            }
            self.journal_bytes += bytes;
            if let Some(changes) = &self.config.changes {
                let created = std::mem::take(&mut self.stored_empty);
                changes.changed(moai_storage::ChangeKind::YjsDocument, &self.doc_id, created);
            }
            self.stats.updates.fetch_add(count, Ordering::Relaxed);
        }

        self.perform(rest);
        for d in deferred {
            match d {
                Deferred::State(reply, answer) => drop(reply.send(answer)),
                Deferred::Applied(reply) => drop(reply.send(Reply::Done(()))),
                Deferred::Rejected(reply, error) => drop(reply.send(Reply::Failed(error))),
            }
        }
        self.maybe_compact();
        true
    }

    fn handle(&mut self, cmd: Command, actions: &mut Vec<Action>, deferred: &mut Vec<Deferred>) {
        match cmd {
            Command::Join { access, dialect, outbox, outbound, reply } => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                let Some(outbound) = outbound else { return };
                match self.room.connect_as(conn, access, dialect) {
                    Ok(connect_actions) => {
                        let flags = Arc::new(SessionFlags::default());
                        self.conns.insert(conn, Connection { outbox, flags: flags.clone() });
                        let session = YjsSession {
                            conn,
                            commands: self.self_sender.clone(),
                            outbound,
                            flags,
                            inbound: self.inbound.clone(),
                            left: false,
                        };
                        if reply.send(Reply::Done(session)).is_err() {
                            // The joiner went away; the session's drop queued a Leave.
                        }
                        actions.extend(connect_actions);
                    }
                    Err(e) => {
                        if let RoomError::Poisoned(why) = &e {
                            self.poisoned = Some(why.clone());
                        }
                        drop(reply.send(Reply::Failed(ServiceError::Unavailable(Unavailable::Room(Arc::new(e))))))
                    }
                }
            }
            Command::Frame { conn, frame, budget: _budget } => {
                if !self.conns.contains_key(&conn) {
                    return; // dropped earlier (too slow, closed); late frames are ignored
                }
                match self.room.receive(conn, &frame) {
                    Ok(a) => actions.extend(a),
                    Err(RoomError::UnknownConnection(_)) => {}
                    Err(RoomError::Poisoned(why)) => self.poisoned = Some(why),
                    Err(e) => actions.push(Action::Close { conn, code: CLOSE_INTERNAL, reason: e.to_string() }),
                }
            }
            Command::Leave { conn } => {
                if self.conns.remove(&conn).is_some() {
                    actions.extend(self.room.disconnect(conn));
                }
            }
            Command::ReadState { reply } => {
                let answer = match self.room.encode_state_as_update() {
                    Ok(update) => Reply::Done(update),
                    Err(e) => {
                        if let RoomError::Poisoned(why) = &e {
                            self.poisoned = Some(why.clone());
                        }
                        Reply::Failed(ServiceError::Unavailable(Unavailable::Room(Arc::new(e))))
                    }
                };
                // Memory may hold updates of this batch that are not durable yet: answer after
                // the batch's commit, like every other send.
                deferred.push(Deferred::State(reply, answer));
            }
            Command::Bus(event) => self.handle_bus(event, actions),
            Command::ApplyUpdate { update, reply } => match self.room.apply_http_update(&update) {
                Ok(a) => {
                    actions.extend(a);
                    deferred.push(Deferred::Applied(reply));
                }
                Err(RoomError::InvalidUpdate { reason, actions: partial }) => {
                    actions.extend(partial);
                    deferred.push(Deferred::Rejected(reply, ServiceError::InvalidUpdate(reason)));
                }
                Err(RoomError::MissingDependencies { actions: partial }) => {
                    actions.extend(partial);
                    deferred.push(Deferred::Rejected(reply, ServiceError::MissingDependencies));
                }
                Err(RoomError::Poisoned(why)) => {
                    self.poisoned = Some(why.clone());
                    drop(reply.send(Reply::Failed(ServiceError::Unavailable(Unavailable::Failed(why)))));
                }
                Err(e) => drop(reply.send(Reply::Failed(ServiceError::Unavailable(Unavailable::Room(Arc::new(e)))))),
            },
        }
    }

    /// Performs sends, broadcasts and closes in order. Dropping a connection (closed, or too
    /// slow) produces awareness removals, which are performed in turn.
    fn perform(&mut self, mut queue: VecDeque<Action>) {
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Persist { .. } => {
                    // Only produced together with sends by input handling, never by disconnect;
                    // handle_batch has already extracted them.
                    debug_assert!(false, "persist after the commit point");
                }
                Action::Send { conn, frame } => {
                    let frame = Bytes::from(frame);
                    self.deliver(conn, frame, &mut queue);
                }
                Action::Broadcast { except, frame } => {
                    let frame = Bytes::from(frame);
                    let targets: Vec<ConnId> = self.conns.keys().copied().filter(|c| Some(*c) != except).collect();
                    for conn in targets {
                        self.deliver(conn, frame.clone(), &mut queue);
                    }
                }
                Action::Close { conn, code, reason } => {
                    if let Some(c) = self.conns.remove(&conn) {
                        let _ = c.outbox.try_send(Outbound::Close { code, reason });
                        queue.extend(self.room.disconnect(conn));
                    }
                }
                Action::Publish { kind, payload } => {
                    if let Some(topic) = &self.topic {
                        topic.publish(kind, Bytes::from(payload));
                    }
                }
            }
        }
    }

    /// One event of the document's cluster topic.
    fn handle_bus(&mut self, event: BusEvent, actions: &mut Vec<Action>) {
        let result = match event {
            BusEvent::Message { from, kind, payload } => {
                if kind == crate::cluster::UPDATE {
                    // It exists in storage now (another instance wrote it): not ours to create.
                    self.stored_empty = false;
                }
                self.room.receive_from_instance(from.0, kind, &payload)
            }
            BusEvent::InstanceGone(instance) => Ok(self.room.instance_gone(instance.0)),
            BusEvent::Resync => {
                self.start_resync();
                Ok(Vec::new())
            }
        };
        match result {
            Ok(a) => actions.extend(a),
            Err(RoomError::Poisoned(why)) => self.poisoned = Some(why),
            Err(e) => tracing::warn!(doc = %self.doc_id, error = %e, "a cluster message could not be handled"),
        }
    }

    /// Reads the document back from storage (where every instance's changes are) on a blocking
    /// thread and computes what memory lacks; [`DocTask::resync_finished`] applies it.
    fn start_resync(&mut self) {
        if self.resync.is_some() {
            self.resync_again = true;
            return;
        }
        let state_vector = match self.room.state_vector() {
            Ok(sv) => sv,
            Err(e) => {
                tracing::warn!(doc = %self.doc_id, error = %e, "cannot resync now");
                self.resync_again = true;
                return;
            }
        };
        let storage = self.storage.clone();
        let doc_id = self.doc_id.clone();
        self.resync = Some(tokio::spawn(async move {
            let stored = storage.load(&doc_id).await?;
            tokio::task::spawn_blocking(move || -> Result<Vec<u8>, CompactionError> {
                use yrs::updates::decoder::Decode;
                use yrs::{ReadTxn, Transact};
                let room =
                    load_room(doc_id, stored.snapshot.as_deref(), stored.updates.iter().map(|(_, u)| u.as_slice()))?;
                let sv = yrs::StateVector::decode_v1(&state_vector).map_err(|e| RoomError::Poisoned(e.to_string()))?;
                let txn = room.doc().try_transact().map_err(|_| RoomError::Busy)?;
                Ok(txn.encode_state_as_update_v1(&sv))
            })
            .await
            .map_err(CompactionError::Task)?
        }));
    }

    /// Applies what a resync found, then re-announces presence and exchanges state. Returns
    /// false when the task must end.
    async fn resync_finished(&mut self, result: Result<Vec<u8>, CompactionError>) -> bool {
        let mut actions = Vec::new();
        if result.is_ok() {
            // What storage holds now was written by others too: not ours to create.
            self.stored_empty = false;
        }
        match result {
            Ok(update) => match self.room.apply_durable(&update) {
                Ok(a) => actions.extend(a),
                Err(RoomError::Poisoned(why)) => self.poisoned = Some(why),
                Err(e) => tracing::warn!(doc = %self.doc_id, error = %e, "resync could not be applied"),
            },
            Err(e) => {
                // The periodic exchange still repairs from the other instances; try again later.
                tracing::warn!(doc = %self.doc_id, error = %e, "resync from storage failed");
                self.resync_again = true;
            }
        }
        match self.room.cluster_resync() {
            Ok(a) => actions.extend(a),
            Err(RoomError::Poisoned(why)) => self.poisoned = Some(why),
            Err(_) => {}
        }
        if let Some(why) = self.poisoned.take() {
            tracing::error!(doc = %self.doc_id, error = %why, "the Yjs library panicked; closing the document to reload it from storage");
            self.fail_document(
                ServiceError::Unavailable(Unavailable::Failed(why)),
                "document failed; reconnect",
                Vec::new(),
            );
            return false;
        }
        self.perform(actions.into());
        if std::mem::take(&mut self.resync_again) {
            self.start_resync();
        }
        true
    }

    /// Publishes what this instance has of the document (the periodic exchange). Returns false
    /// when the task must end.
    fn exchange_state(&mut self) -> bool {
        match self.room.state_for_cluster() {
            Ok(action) => {
                self.perform(VecDeque::from([action]));
                true
            }
            Err(RoomError::Poisoned(why)) => {
                tracing::error!(doc = %self.doc_id, error = %why, "the Yjs library panicked; closing the document to reload it from storage");
                self.fail_document(
                    ServiceError::Unavailable(Unavailable::Failed(why)),
                    "document failed; reconnect",
                    Vec::new(),
                );
                false
            }
            Err(_) => true,
        }
    }

    fn deliver(&mut self, conn: ConnId, frame: Bytes, queue: &mut VecDeque<Action>) {
        let Some(c) = self.conns.get(&conn) else { return };
        let len = frame.len();
        let queued = c.flags.queued_bytes.fetch_add(len, Ordering::Relaxed);
        let over_bytes = queued > 0 && queued + len > self.config.outbox_bytes;
        let sent = if over_bytes {
            Err(mpsc::error::TrySendError::Full(Outbound::Frame(frame)))
        } else {
            c.outbox.try_send(Outbound::Frame(frame))
        };
        if sent.is_err() {
            c.flags.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Never skip an update silently: drop the session; it resyncs on reconnect.
                c.flags.too_slow.store(true, Ordering::Relaxed);
                tracing::warn!(doc = %self.doc_id, conn = conn.0, "client too slow: outbox full, closing it");
                self.conns.remove(&conn);
                queue.extend(self.room.disconnect(conn));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The socket is gone and its Leave is on the way; forget it now.
                self.conns.remove(&conn);
                queue.extend(self.room.disconnect(conn));
            }
        }
    }

    /// Memory is ahead of storage: close everyone (they keep their edits and re-upload them on
    /// reconnect) and end this task so the next use reloads from storage.
    fn storage_failed(&mut self, error: StorageError, deferred: Vec<Deferred>) {
        tracing::error!(doc = %self.doc_id, error = %error, "persisting updates failed; closing the document");
        self.fail_document(ServiceError::Storage(Arc::new(error)), "storage failure", deferred);
    }

    /// Memory can no longer be trusted (a failed write, a panic in yrs): close every
    /// connection with 1011, answer every waiting request with `error`, and end this task so the
    /// next use reloads the document from storage.
    fn fail_document(&mut self, error: ServiceError, close_reason: &str, deferred: Vec<Deferred>) {
        for (_, c) in self.conns.drain() {
            let _ = c.outbox.try_send(Outbound::Close { code: CLOSE_INTERNAL, reason: close_reason.into() });
        }
        for d in deferred {
            let failed = error.clone();
            match d {
                Deferred::State(reply, _) => drop(reply.send(Reply::Failed(failed))),
                Deferred::Applied(reply) | Deferred::Rejected(reply, _) => drop(reply.send(Reply::Failed(failed))),
            }
        }
        if let Some(r) = self.registry.upgrade() {
            r.remove(&self.doc_id, self.generation);
        }
        let (_, dummy) = mpsc::channel(1);
        let commands = std::mem::replace(&mut self.commands, dummy);
        fail_all(commands, error);
    }

    fn maybe_compact(&mut self) {
        if self.compact_retry.is_some_and(|(_, not_before)| Instant::now() < not_before) {
            return;
        }
        if self.compaction.is_none() && self.journal_bytes >= self.config.compact_journal_bytes {
            let storage = self.storage.clone();
            let compactor = self.compactor.clone();
            let doc_id = self.doc_id.clone();
            let stats = self.stats.clone();
            self.compaction =
                Some(tokio::spawn(async move { compact(&doc_id, storage.as_ref(), &compactor, &stats).await }));
        }
    }

    fn compaction_finished(&mut self, result: Result<usize, CompactionError>) {
        match result {
            Ok(folded) => {
                self.journal_bytes = self.journal_bytes.saturating_sub(folded);
                self.compact_retry = None;
                tracing::debug!(doc = %self.doc_id, folded, "journal compacted");
            }
            // Another compaction (another instance's, on shared storage) replaced the snapshot
            // first; ours is discarded and the journal intact. The next one starts from theirs.
            Err(CompactionError::Storage(e @ StorageError::CompactionConflict { .. })) => {
                tracing::debug!(doc = %self.doc_id, error = %e, "compaction lost a race; retried later")
            }
            // The journal is intact; we try again after a write, once the pause is over.
            Err(e) => {
                let pause = self.compact_retry.map_or(COMPACT_RETRY_MIN, |(p, _)| (p * 2).min(COMPACT_RETRY_MAX));
                self.compact_retry = Some((pause, Instant::now() + pause));
                tracing::warn!(doc = %self.doc_id, error = %e, retry_after = ?pause, "compaction failed");
            }
        }
    }

    /// Compacts (if anything is in the journal) and ends the task, unless commands arrived
    /// meanwhile. Returns whether the task ended.
    async fn evict(&mut self) -> bool {
        if self.journal_bytes > 0 {
            match compact(&self.doc_id, self.storage.as_ref(), &self.compactor, &self.stats).await {
                Ok(folded) => self.journal_bytes = self.journal_bytes.saturating_sub(folded),
                Err(e) => tracing::warn!(doc = %self.doc_id, error = %e, "compaction before eviction failed"),
            }
        }
        let Some(registry) = self.registry.upgrade() else { return true };
        if !registry.try_remove(&self.doc_id, self.generation, &self.commands) {
            return false;
        }
        // Anyone who resolved us just before removal gets Retry and reloads from storage.
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Join { reply, .. } => drop(reply.send(Reply::Retry)),
                Command::ReadState { reply } => drop(reply.send(Reply::Retry)),
                Command::ApplyUpdate { reply, .. } => drop(reply.send(Reply::Retry)),
                Command::Frame { .. } | Command::Leave { .. } | Command::Bus(_) => {}
            }
        }
        tracing::debug!(doc = %self.doc_id, "document evicted");
        true
    }
}

/// Why a compaction failed. The journal is intact either way; it is tried again later.
#[derive(Debug, Error)]
enum CompactionError {
    /// Reading the document, or replacing the journal prefix with the snapshot, failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// What storage holds does not rebuild a document.
    #[error(transparent)]
    Rebuild(#[from] LoadError),
    /// The rebuilt document could not be encoded as a snapshot.
    #[error(transparent)]
    Encode(#[from] RoomError),
    /// The compaction thread did not run the job (it is gone, or the job panicked).
    #[error("the compaction thread is gone")]
    ThreadGone,
    /// The task running the compaction panicked or was cancelled.
    #[error(transparent)]
    Task(JoinError),
}

/// Rebuilds the document from storage on the low-priority compaction thread and replaces the
/// journal prefix it covers with one snapshot. Returns the journal bytes folded.
/// The new snapshot's size goes to `stats`.
async fn compact(
    doc_id: &str,
    storage: &dyn DocJournal,
    compactor: &Compactor,
    stats: &DocStats,
) -> Result<usize, CompactionError> {
    let stored = storage.load(doc_id).await?;
    if stored.updates.is_empty() {
        return Ok(0);
    }
    let folded = stored.folded();
    let folded_bytes = stored.journal_bytes();
    let id = doc_id.to_owned();
    let snapshot = compactor
        .run(move || -> Result<Vec<u8>, CompactionError> {
            let room = load_room(id, stored.snapshot.as_deref(), stored.updates.iter().map(|(_, u)| u.as_slice()))?;
            Ok(room.encode_state_as_update()?)
        })
        .await
        .ok_or(CompactionError::ThreadGone)??;
    let snapshot_bytes = snapshot.len() as u64;
    storage.compact(doc_id, snapshot, folded).await?;
    stats.snapshot_bytes.store(snapshot_bytes, Ordering::Relaxed);
    Ok(folded_bytes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use moai_storage::MemoryStorage;
    use yrs::{GetString, Text, Transact};

    use crate::protocol::sync_update_frame;
    use crate::service::{Outbound, YjsConfig, YjsService};

    fn edit(doc: &yrs::Doc, s: &str) -> Bytes {
        let t = doc.get_or_insert_text("t");
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, s);
        Bytes::from(sync_update_frame(&txn.encode_update_v1()))
    }

    fn text(update: &[u8]) -> String {
        use yrs::updates::decoder::Decode;
        let doc = yrs::Doc::new();
        doc.transact_mut().apply_update(yrs::Update::decode_v1(update).unwrap()).unwrap();
        let t = doc.get_or_insert_text("t");
        let s = t.get_string(&doc.transact());
        s
    }

    /// A journal of many small entries (a server restarted or killed before the byte threshold
    /// was ever reached after a write) is folded into a snapshot when the document loads, from
    /// exactly what was loaded; a short one is left alone.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_journal_is_compacted_when_the_document_loads() {
        use moai_storage::DocJournal;
        let storage = Arc::new(MemoryStorage::new());
        let writer = yrs::Doc::new();
        let t = writer.get_or_insert_text("t");
        let entry = |s: &str| {
            let mut txn = writer.transact_mut();
            let len = yrs::Text::len(&t, &txn);
            t.insert(&mut txn, len, s);
            txn.encode_update_v1()
        };
        for i in 0..super::COMPACT_AT_LOAD_ENTRIES {
            storage.append("long", entry(&format!("{}", i % 10))).await.unwrap();
        }
        for _ in 0..10 {
            storage.append("short", yrs::Doc::new().transact_mut().encode_update_v1()).await.unwrap();
        }
        let expected: String = (0..super::COMPACT_AT_LOAD_ENTRIES).map(|i| format!("{}", i % 10)).collect();

        let svc = YjsService::new(storage.clone(), YjsConfig::default());
        let _long = svc.join("long").await.unwrap();
        let _short = svc.join("short").await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let stored = loop {
            let stored = storage.load("long").await.unwrap();
            if stored.updates.is_empty() {
                break stored;
            }
            assert!(std::time::Instant::now() < deadline, "still {} journal entries", stored.updates.len());
            tokio::task::yield_now().await;
        };
        assert_eq!(text(stored.snapshot.as_deref().expect("a snapshot")), expected, "the snapshot holds everything");
        assert_eq!(text(&svc.read_state("long").await.unwrap()), expected);
        assert_eq!(storage.load("short").await.unwrap().updates.len(), 10, "a short journal is left alone");
    }

    /// A panic in yrs closes the document's connections (1011) and drops its memory; the next
    /// use reloads it from storage with everything that was durable.
    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_in_yrs_refuses_the_document_and_it_reloads_from_storage() {
        let svc = YjsService::new(Arc::new(MemoryStorage::new()), YjsConfig::default());
        let mut a = svc.join("d").await.unwrap();
        let b = svc.join("d").await.unwrap();
        let writer = yrs::Doc::new();
        assert!(a.receive(edit(&writer, "kept")).await);
        assert_eq!(text(&svc.read_state("d").await.unwrap()), "kept", "durable and readable");

        crate::apply::INJECT_PANIC.with(|p| p.set(true));
        assert!(b.receive(edit(&yrs::Doc::new(), "boom")).await);
        loop {
            match a.outbound().await {
                Some(Outbound::Close { code, reason }) => {
                    assert_eq!((code, reason.as_str()), (1011, "document failed; reconnect"));
                    break;
                }
                Some(Outbound::Frame(_)) => {}
                None => panic!("closed without a reason"),
            }
        }
        // Reloaded from storage: what was durable is there, the failed update is not.
        assert_eq!(text(&svc.read_state("d").await.unwrap()), "kept");
    }
}
