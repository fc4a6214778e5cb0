//! The owner task of the relay: the only code that touches the [`Relay`].
//!
//! One relay serves the whole server (its state is per server: CoValues in memory and each
//! peer's known states), so one task owns it and handles, in order: commands from sessions
//! (connect, messages, leave), completions of the storage work it started (loads, known-state
//! reads, writes), and eviction ticks. It never awaits storage or a socket: reads and writes run in tasks it spawns,
//! whose results come back as completions; sends go to bounded per-socket queues with
//! `try_send`, and a socket whose queue is full is closed (a skipped message would leave that
//! client diverged without knowing it; on reconnect it resyncs).
//!
//! Durability is the relay's contract (acks wait for `Persisted`); this task only keeps its side
//! of it: `Persisted` strictly after the append is durable, writes of one CoValue handed to
//! storage in issue order ([`WriteQueue`]), `PeerDisconnected` after every close it performs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use moai_storage::{AppendError, CoValueStore};
use thiserror::Error;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::{interval_at, Instant, MissedTickBehavior};

use super::cluster_link::ClusterLink;
use super::eviction::Eviction;
use super::records::{from_record, known_state_from_record, to_append};
use super::session::SessionShared;
use super::stats::Stats;
use super::writes::WriteQueue;
use super::{CojsonConfig, CLOSE_STORAGE_FAILURE, CLOSE_TOO_MUCH_PARKED, CLOSE_TOO_SLOW};
use crate::ids::CoId;
use crate::message::{Outgoing, SyncMessage};
use crate::persistence::{PersistRequest, PersistToken, StoredCoValue, StoredKnown};
use crate::relay::{Action, CloseReason, Diagnostic, Event, PeerId, Relay};

/// From sessions to the relay task. One queue for all of a peer's commands, so connect,
/// messages and leave are handled in the order the session issued them.
pub(crate) enum Command {
    Connect {
        peer: PeerId,
        outbox: mpsc::Sender<Outgoing>,
        shared: Arc<SessionShared>,
    },
    /// The permit is the frame's part of the session's share of this queue; it is released
    /// once the messages are handled.
    Messages {
        peer: PeerId,
        messages: Vec<SyncMessage>,
        _inflight: OwnedSemaphorePermit,
    },
    Leave {
        peer: PeerId,
    },
    /// The stored header of a CoValue (Jazz auth tokens need an account's).
    Header {
        id: CoId,
        reply: tokio::sync::oneshot::Sender<Option<serde_json::Value>>,
    },
}

/// From storage tasks back to the relay task.
enum Completion {
    /// Bus topics joined before a read (cluster).
    Joined(Vec<(CoId, moai_cluster::Membership)>),
    /// The answer to a refresh (another instance changed the CoValue).
    Refreshed {
        id: CoId,
        stored: Option<StoredCoValue>,
    },
    Loaded {
        id: CoId,
        stored: Option<StoredCoValue>,
    },
    /// One known-state read: per CoValue, what storage holds of it.
    KnownLoaded(Vec<(CoId, StoredKnown)>),
    /// One write batch: per write, its token, CoValue, whether it created the CoValue, and
    /// outcome.
    Written(Vec<(PersistToken, CoId, bool, Result<(), WriteError>)>),
}

/// Why one write of a batch is not durable.
#[derive(Debug, Error)]
enum WriteError {
    /// Storage refused the append or failed to commit it.
    #[error(transparent)]
    Append(AppendError),
    /// Storage answered fewer results than the batch had writes (a backend bug).
    #[error("storage returned no result for this write")]
    NoResult,
}

struct PeerConn {
    outbox: mpsc::Sender<Outgoing>,
    shared: Arc<SessionShared>,
}

pub(crate) struct RelayTask {
    relay: Relay,
    store: Arc<dyn CoValueStore>,
    config: CojsonConfig,
    peers: HashMap<PeerId, PeerConn>,
    commands: mpsc::Receiver<Command>,
    completions: mpsc::UnboundedReceiver<Completion>,
    /// Cloned into every storage task. Unbounded on purpose: its length is bounded by the
    /// storage work in flight, and a storage task must never wait on the relay task (which may
    /// itself be waiting for nothing but completions).
    completion_sender: mpsc::UnboundedSender<Completion>,
    writes: WriteQueue,
    /// Loads asked for during this cycle, in issue order (see [`RelayTask::flush_loads`]).
    loads: Vec<CoId>,
    /// Known-state reads asked for during this cycle (see [`RelayTask::flush_known_loads`]).
    known_loads: Vec<CoId>,
    eviction: Eviction,
    stats: Arc<Stats>,
    /// The other instances, in a cluster.
    cluster: Option<ClusterLink>,
}

/// Most CoValues in one `known_states` call (one read transaction).
const KNOWN_STATES_PER_READ: usize = 1000;

/// Pauses between attempts of a failing storage read.
const LOAD_RETRIES: [Duration; 3] = [Duration::from_millis(50), Duration::from_millis(250), Duration::from_secs(1)];

impl RelayTask {
    pub(crate) fn new(
        store: Arc<dyn CoValueStore>,
        config: CojsonConfig,
        commands: mpsc::Receiver<Command>,
        stats: Arc<Stats>,
        cluster: Option<ClusterLink>,
    ) -> Self {
        let (completion_sender, completions) = mpsc::unbounded_channel();
        RelayTask {
            relay: Relay::new(config.relay.clone()),
            store,
            config,
            peers: HashMap::new(),
            commands,
            completions,
            completion_sender,
            writes: WriteQueue::default(),
            loads: Vec::new(),
            known_loads: Vec::new(),
            eviction: Eviction::default(),
            stats,
            cluster,
        }
    }

    /// Runs until every handle to the service (the service and all sessions) is gone.
    pub(crate) async fn run(mut self) {
        let period = self.config.evict_interval.max(Duration::from_millis(1));
        let mut evict = interval_at(Instant::now() + period, period);
        evict.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let exchange_period = self.cluster.as_ref().map_or(Duration::from_secs(3600), |c| c.exchange);
        let mut exchange = interval_at(Instant::now() + exchange_period, exchange_period);
        exchange.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Completions first: they unblock acks and parked work, and free memory.
                biased;
                Some(done) = self.completions.recv() => self.on_completion(done),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                Some((topic, event)) = async { self.cluster.as_mut().expect("guarded").inbox.recv().await }, if self.cluster.is_some() => {
                    if let Some(event) = ClusterLink::event(&topic, event) {
                        self.run_event(event);
                    }
                }
                _ = exchange.tick(), if self.cluster.is_some() => self.exchange(),
                _ = evict.tick() => self.evict(),
            }
            // Take what else is queued right now, so a burst shares one storage batch.
            for _ in 1..self.config.max_batch.max(1) {
                if let Ok(done) = self.completions.try_recv() {
                    self.on_completion(done);
                } else if let Ok(cmd) = self.commands.try_recv() {
                    self.on_command(cmd);
                } else {
                    break;
                }
            }
            self.flush_known_loads();
            self.flush_loads();
            self.flush_writes();
            self.stats.peers.store(self.peers.len(), Ordering::Relaxed);
            self.stats.writes_pending.store(self.writes.pending(), Ordering::Relaxed);
        }
        // Everyone is gone, but writes may still wait behind a batch in flight: finish them, so
        // what the relay accepted reaches storage (nobody is left to ack; peers that reconnect
        // find it there).
        while self.writes.pending() > 0 {
            let Some(done) = self.completions.recv().await else { break };
            self.on_completion(done);
            self.flush_writes();
        }
        tracing::debug!("cojson relay task ended");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { peer, outbox, shared } => {
                self.peers.insert(peer, PeerConn { outbox, shared });
                self.run_event(Event::PeerConnected(peer));
            }
            Command::Messages { peer, messages, .. } => {
                for msg in messages {
                    // A peer this task closed is gone for the relay; its late messages are not.
                    if !self.peers.contains_key(&peer) {
                        return;
                    }
                    self.run_event(Event::Message(peer, msg));
                }
            }
            Command::Leave { peer } => {
                if self.peers.remove(&peer).is_some() {
                    self.run_event(Event::PeerDisconnected(peer));
                }
            }
            Command::Header { id, reply } => {
                // Off the relay task, like every storage read; nothing of the relay changes.
                let store = self.store.clone();
                tokio::spawn(async move {
                    let header = match store.load_covalue(id.as_str()).await {
                        Ok(Some(record)) => serde_json::from_str(&record.header).ok(),
                        Ok(None) => None,
                        Err(e) => {
                            tracing::warn!(covalue = %id, error = %e, "reading a stored header failed");
                            None
                        }
                    };
                    let _ = reply.send(header);
                });
            }
        }
    }

    fn on_completion(&mut self, done: Completion) {
        match done {
            Completion::Loaded { id, stored } => self.run_event(Event::Loaded { id, stored }),
            Completion::Joined(joined) => {
                if let Some(cluster) = &mut self.cluster {
                    for (id, membership) in joined {
                        cluster.joined(id, membership);
                    }
                }
            }
            Completion::Refreshed { id, stored } => self.run_event(Event::Refreshed { id, stored }),
            Completion::KnownLoaded(answers) => self.run_event(Event::KnownLoaded(answers)),
            Completion::Written(outcomes) => {
                self.writes.finished(outcomes.iter().map(|(_, id, _, _)| id));
                for (token, id, created, outcome) in outcomes {
                    match outcome {
                        Ok(()) => {
                            if let Some(changes) = &self.config.changes {
                                changes.changed(moai_storage::ChangeKind::CoValue, id.as_str(), created);
                            }
                            self.run_event(Event::Persisted(token))
                        }
                        Err(error) => {
                            let dropped = self.writes.discard(&id);
                            self.stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(covalue = %id, %error, dropped_writes = dropped,
                                "cojson write failed; closing its peers, the CoValue reloads from storage");
                            self.run_event(Event::PersistFailed(token));
                        }
                    }
                }
            }
        }
    }

    /// Hands one event to the relay and performs what it asks, including the events those
    /// actions cause in turn (a close becomes a disconnect). Iterative, never recursive.
    fn run_event(&mut self, event: Event) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            for action in self.relay.handle(event) {
                self.perform(action, &mut events);
            }
        }
    }

    fn perform(&mut self, action: Action, events: &mut VecDeque<Event>) {
        match action {
            Action::Send(peer, msg) => {
                let Some(conn) = self.peers.get(&peer) else { return };
                let bytes = msg.approx_bytes();
                let queued = conn.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
                let sent = if queued > 0 && queued + bytes > self.config.outbox_bytes {
                    Err(mpsc::error::TrySendError::Full(msg))
                } else {
                    conn.outbox.try_send(msg)
                };
                if sent.is_err() {
                    conn.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                }
                match sent {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.stats.slow_peers_closed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = peer.0, "cojson peer too slow: outbox full, closing it");
                        self.close(peer, CLOSE_TOO_SLOW, "too slow: outbox full".into(), events);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        // The session is gone and its leave is on the way; forget it now.
                        self.peers.remove(&peer);
                        events.push_back(Event::PeerDisconnected(peer));
                    }
                }
            }
            Action::Load(id) => self.loads.push(id),
            Action::LoadKnown(ids) => self.known_loads.extend(ids),
            Action::Persist(req) => self.writes.push(req),
            Action::Close(peer, reason) => {
                let (code, text) = match &reason {
                    CloseReason::TooMuchParkedContent => {
                        (CLOSE_TOO_MUCH_PARKED, "too much content waiting for dependencies")
                    }
                    CloseReason::StorageFailure(_) => (CLOSE_STORAGE_FAILURE, "storage failure, reconnect to resync"),
                    CloseReason::TooManyCoValues => (CLOSE_TOO_MUCH_PARKED, "too many CoValues for one connection"),
                };
                tracing::info!(peer = peer.0, ?reason, code, "cojson relay closes peer");
                self.close(peer, code, text.into(), events);
            }
            Action::Diagnostic(d) => self.diagnostic(d),
            Action::Announce { id, known } => {
                if let Some(cluster) = &self.cluster {
                    cluster.announce(&id, known);
                }
            }
            Action::Refresh(id) => {
                self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                let (store, stats, done) = (self.store.clone(), self.stats.clone(), self.completion_sender.clone());
                tokio::spawn(async move {
                    let stored = load(store, id.clone(), stats).await;
                    let _ = done.send(Completion::Refreshed { id, stored });
                });
            }
        }
    }

    /// Announces the durable known state of every subscribed CoValue in memory (cluster), so
    /// that an announcement the bus lost is repaired within one period.
    fn exchange(&mut self) {
        let Some(cluster) = &self.cluster else { return };
        for (id, known) in self.relay.announcements() {
            cluster.announce(&id, known);
        }
    }

    /// Records the close for the session, drops our end of its queue (which wakes the edge) and
    /// tells the relay the peer is gone.
    fn close(&mut self, peer: PeerId, code: u16, reason: String, events: &mut VecDeque<Event>) {
        if let Some(conn) = self.peers.remove(&peer) {
            conn.shared.set_close(code, reason);
            drop(conn.outbox);
            events.push_back(Event::PeerDisconnected(peer));
        }
    }

    fn diagnostic(&self, d: Diagnostic) {
        match d {
            Diagnostic::InvalidHeader { peer, id, error } => {
                self.stats.invalid_headers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = peer.0, covalue = %id, %error, "cojson header rejected");
            }
            Diagnostic::RejectedSession { peer, id, session, error } => {
                self.stats.rejected_sessions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = peer.0, covalue = %id, session, %error, "cojson session rejected");
            }
            Diagnostic::IgnoredErrored { peer, id } => {
                tracing::debug!(peer = peer.0, covalue = %id, "message about an errored CoValue ignored");
            }
            Diagnostic::UnknownPeer(peer) => tracing::debug!(peer = peer.0, "cojson event for an unknown peer"),
            // Normal after a failed write (its later tokens were abandoned).
            Diagnostic::Unexpected(what) => tracing::debug!(what, "unexpected cojson completion"),
            Diagnostic::StorageCorrupt { id, error } => {
                self.stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(covalue = %id, %error, "stored CoValue cannot be rebuilt; treated as absent");
            }
        }
    }

    /// Reads the CoValues asked for during this cycle, off the relay task: concurrently, but
    /// answered in the order they were asked for. Order matters: a frame carrying an account, its
    /// group and a map asks for all three; answered out of order, the relay would process the
    /// map before the group and ask the client for a group that is in the same frame.
    fn flush_loads(&mut self) {
        if self.loads.is_empty() {
            return;
        }
        self.stats.full_loads.fetch_add(self.loads.len() as u64, Ordering::Relaxed);
        let reads: Vec<_> = std::mem::take(&mut self.loads)
            .into_iter()
            .map(|id| {
                let join = self.cluster.as_ref().and_then(|c| c.join_before_read(&id));
                let (store, stats, key) = (self.store.clone(), self.stats.clone(), id.clone());
                let read = tokio::spawn(async move {
                    // Joined first: a change committed after this read is announced to us.
                    let joined = match join {
                        Some(join) => Some(join.join().await),
                        None => None,
                    };
                    (joined, load(store, key, stats).await)
                });
                (id, read)
            })
            .collect();
        let done = self.completion_sender.clone();
        tokio::spawn(async move {
            for (id, read) in reads {
                // A read task that panicked (it cannot, but) answers "not stored" like a failure.
                let (joined, stored) = read.await.unwrap_or((None, None));
                if let Some(joined) = joined {
                    let _ = done.send(Completion::Joined(vec![joined]));
                }
                let _ = done.send(Completion::Loaded { id, stored });
            }
        });
    }

    /// Reads the known states asked for during this cycle (a reconnect storm's `load`s and
    /// `reconcile` entries) off the relay task, in as few storage calls as possible: one per
    /// [`KNOWN_STATES_PER_READ`] CoValues, each one short read transaction without transactions.
    fn flush_known_loads(&mut self) {
        if self.known_loads.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.known_loads);
        for chunk in ids.chunks(KNOWN_STATES_PER_READ) {
            self.stats.known_state_reads.fetch_add(1, Ordering::Relaxed);
            self.stats.known_state_loads.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let (store, stats, done) = (self.store.clone(), self.stats.clone(), self.completion_sender.clone());
            let chunk = chunk.to_vec();
            let joins: Vec<_> = match &self.cluster {
                Some(c) => chunk.iter().filter_map(|id| c.join_before_read(id)).collect(),
                None => Vec::new(),
            };
            tokio::spawn(async move {
                let mut joined = Vec::with_capacity(joins.len());
                for join in joins {
                    joined.push(join.join().await);
                }
                if !joined.is_empty() {
                    let _ = done.send(Completion::Joined(joined));
                }
                let answers = load_known(store, chunk, stats).await;
                let _ = done.send(Completion::KnownLoaded(answers));
            });
        }
    }

    /// Sends every write that may go now to storage in one call, off the relay task.
    fn flush_writes(&mut self) {
        let batch: Vec<PersistRequest> = self.writes.take_ready();
        if batch.is_empty() {
            return;
        }
        let store = self.store.clone();
        let done = self.completion_sender.clone();
        tokio::spawn(async move {
            // Serialising the JSON happens here, not on the relay task.
            let appends = batch.iter().map(to_append).collect();
            let mut results = store.append_covalues(appends).await.into_iter();
            let outcomes = batch
                .into_iter()
                .map(|req| {
                    let outcome = match results.next() {
                        Some(Ok(())) => Ok(()),
                        Some(Err(e)) => Err(WriteError::Append(e)),
                        None => Err(WriteError::NoResult),
                    };
                    (req.token, req.id, req.header.is_some(), outcome)
                })
                .collect();
            let _ = done.send(Completion::Written(outcomes));
        });
    }

    fn evict(&mut self) {
        let evicted_ids = self.eviction.tick(&mut self.relay);
        if let Some(cluster) = &mut self.cluster {
            for id in &evicted_ids {
                cluster.leave(id);
            }
        }
        let evicted = evicted_ids.len();
        if evicted > 0 {
            self.stats.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
            tracing::debug!(evicted, "cojson CoValues evicted from memory");
        }
        self.stats.resident.store(self.relay.resident_count(), Ordering::Relaxed);
    }
}

/// Reads and decodes one CoValue. A read that keeps failing, or a row that does not decode, is
/// answered as "not stored" (the relay contract has no error answer): peers then see `known
/// header:false` and upload what they have, and storage refuses any write that does not continue
/// what it really holds, so nothing stored is overwritten.
async fn load(store: Arc<dyn CoValueStore>, id: CoId, stats: Arc<Stats>) -> Option<StoredCoValue> {
    let mut attempt = 0;
    let record = loop {
        match store.load_covalue(id.as_str()).await {
            Ok(record) => break record,
            Err(error) => match LOAD_RETRIES.get(attempt) {
                Some(pause) => {
                    tracing::warn!(covalue = %id, %error, attempt, "cojson load failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(*pause).await;
                }
                None => {
                    stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(covalue = %id, %error, "cojson load failed; answering as not stored");
                    break None;
                }
            },
        }
    }?;
    match from_record(record) {
        Ok(stored) => Some(stored),
        Err(error) => {
            stats.storage_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(covalue = %id, %error, "stored CoValue does not decode; treated as absent");
            None
        }
    }
}

/// Reads the stored known states of `ids` in one call. A read that keeps failing answers every id
/// as [`StoredKnown::Unreadable`], and a row that does not decode answers its id so: the relay
/// then falls back to a full load (with its own failure rule), never to "not stored".
async fn load_known(store: Arc<dyn CoValueStore>, ids: Vec<CoId>, stats: Arc<Stats>) -> Vec<(CoId, StoredKnown)> {
    let keys: Vec<String> = ids.iter().map(|id| id.as_str().to_owned()).collect();
    let mut attempt = 0;
    let rows = loop {
        match store.known_states(keys.clone()).await {
            Ok(rows) if rows.len() == ids.len() => break Some(rows),
            Ok(rows) => {
                stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(asked = ids.len(), got = rows.len(), "known_states returned the wrong number of rows");
                break None;
            }
            Err(error) => match LOAD_RETRIES.get(attempt) {
                Some(pause) => {
                    tracing::warn!(covalues = ids.len(), %error, attempt, "cojson known-state read failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(*pause).await;
                }
                None => {
                    stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(covalues = ids.len(), %error,
                        "cojson known-state read failed; loading whole instead");
                    break None;
                }
            },
        }
    };
    let Some(rows) = rows else {
        return ids.into_iter().map(|id| (id, StoredKnown::Unreadable)).collect();
    };
    ids.into_iter()
        .zip(rows)
        .map(|(id, row)| {
            let answer = match row {
                None => StoredKnown::NotStored,
                Some(row) => {
                    let deleted = row.deleted;
                    match known_state_from_record(id.clone(), row) {
                        Ok(state) => StoredKnown::Stored { state, deleted },
                        Err(error) => {
                            stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(covalue = %id, %error,
                                "stored known state does not decode; loading whole instead");
                            StoredKnown::Unreadable
                        }
                    }
                }
            };
            (id, answer)
        })
        .collect()
}
