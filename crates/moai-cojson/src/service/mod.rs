//! The async driver of the CoJSON engine: it runs the sans-IO [`Relay`](crate::relay::Relay)
//! against storage and the edge's sockets.
//!
//! One relay serves the whole server, owned by one task (see `relay_task.rs`), so there are no locks
//! around relay state and each peer's messages are handled in arrival order. Storage reads and
//! writes run in tasks that task spawns; writes of one CoValue reach storage in issue order and
//! everything ready at once shares one storage call (see `writes.rs`), which the storage
//! writer's group commit then shares with other writers. Idle CoValues are evicted on a timer
//! (see `eviction.rs`).
//!
//! What the edge sees: [`CojsonService::connect`] gives a [`CojsonSession`] for one socket. Its
//! text frames go in with [`CojsonSession::receive`]; what to write comes out of
//! [`CojsonSession::outbound`] ([`Outbound::Text`] or [`Outbound::Close`]); when the socket
//! ends, [`CojsonSession::leave`]. Pings ([`ping_frame`], right after accept and every
//! [`PING_INTERVAL`]), frame limits and shutdown stay at the edge.

mod cluster_link;
mod eviction;
mod participant_task;
mod ping;
mod records;
mod relay_task;
mod session;
mod stats;
mod writes;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moai_storage::CoValueStore;
use tokio::sync::mpsc;

pub use participant_task::{ParticipantService, ParticipantServiceError, ProfileView, Registration, SharedMap};
pub use ping::{ping_frame, PING_INTERVAL};
pub use session::{CojsonSession, Outbound, Received, ServiceStopped};
pub use stats::CojsonStats;

use crate::relay::{PeerId, RelayConfig};
use cluster_link::ClusterLink;
use relay_task::{Command, RelayTask};
use session::SessionShared;
use stats::Stats;

/// Close code when the peer's outbox overflowed (it could not keep up): "try again later". It
/// resyncs on reconnect.
pub const CLOSE_TOO_SLOW: u16 = 1013;
/// Close code when a write of a CoValue the peer synced failed: "internal error". Reconnecting
/// resyncs it against what storage really holds.
pub const CLOSE_STORAGE_FAILURE: u16 = 1011;
/// Close code when the peer parked too much content on dependencies it never sent: "policy".
pub const CLOSE_TOO_MUCH_PARKED: u16 = 1008;

/// Tunables of the CoJSON engine.
#[derive(Debug, Clone)]
pub struct CojsonConfig {
    pub relay: RelayConfig,
    /// Messages queued for one socket before it counts as too slow and is closed. Generous,
    /// because one `load` or `reconcile` legitimately produces a burst (dependencies, pieces).
    pub outbox_messages: usize,
    /// The same bound in bytes (a message larger than this still goes to an empty queue).
    pub outbox_bytes: usize,
    /// Commands (frames, connects, leaves) queued for the relay task before sessions wait.
    pub command_queue: usize,
    /// Eviction period: a CoValue idle (evictable) for a whole period leaves memory.
    pub evict_interval: Duration,
    /// Most commands and completions the relay task handles before it flushes writes.
    pub max_batch: usize,
    /// In a cluster: how often the durable known states of subscribed CoValues are announced
    /// to the other instances again (repairs a lost announcement).
    pub cluster_exchange: Duration,
    /// Told after every durable write of a CoValue (webhooks); never waited on.
    pub changes: Option<moai_storage::ChangeSink>,
}

impl Default for CojsonConfig {
    fn default() -> Self {
        CojsonConfig {
            relay: RelayConfig::default(),
            outbox_messages: 4096,
            outbox_bytes: 64 << 20,
            command_queue: 8192,
            evict_interval: Duration::from_secs(30),
            max_batch: 512,
            cluster_exchange: Duration::from_secs(10),
            changes: None,
        }
    }
}

/// Handle to the CoJSON engine. Cheap to clone; the relay task runs until the service and every
/// session are dropped.
#[derive(Clone)]
pub struct CojsonService {
    commands: mpsc::Sender<Command>,
    next_peer: Arc<AtomicU64>,
    stats: Arc<Stats>,
    outbox_messages: usize,
}

impl CojsonService {
    /// Starts the relay task. Must be called inside a tokio runtime.
    pub fn new(store: Arc<dyn CoValueStore>, config: CojsonConfig) -> Self {
        Self::start(store, config, None)
    }

    /// An engine that serves its CoValues together with other instances on `bus` sharing its
    /// storage (cluster; docs/cluster.md).
    pub fn clustered(store: Arc<dyn CoValueStore>, mut config: CojsonConfig, bus: moai_cluster::Bus) -> Self {
        config.relay.announce_durable = true;
        let link = ClusterLink::new(&bus, config.cluster_exchange.max(Duration::from_millis(10)));
        Self::start(store, config, Some(link))
    }

    fn start(store: Arc<dyn CoValueStore>, config: CojsonConfig, cluster: Option<ClusterLink>) -> Self {
        let (commands, rx) = mpsc::channel(config.command_queue.max(1));
        let stats = Arc::new(Stats::default());
        let outbox_messages = config.outbox_messages.max(1);
        tokio::spawn(RelayTask::new(store, config, rx, stats.clone(), cluster).run());
        CojsonService { commands, next_peer: Arc::new(AtomicU64::new(1)), stats, outbox_messages }
    }

    /// Connects a new socket. Nothing is sent to it until it sends something (cojson servers
    /// never speak first; the edge's first ping tells the client it is connected).
    pub async fn connect(&self) -> Result<CojsonSession, ServiceStopped> {
        self.connect_with(false).await
    }

    /// [`CojsonService::connect`] for a read-only session: it loads and receives like any
    /// other, but content it sends (new transactions, deletes) is dropped before the relay sees
    /// it: never verified, stored, acknowledged or forwarded. cojson has no message to refuse
    /// content, so the client is not told on the wire; its edits stay unacknowledged (unsynced).
    pub async fn connect_with(&self, read_only: bool) -> Result<CojsonSession, ServiceStopped> {
        let peer = PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed));
        let (outbox, rx) = mpsc::channel(self.outbox_messages);
        let shared = Arc::new(SessionShared::default());
        self.commands
            .send(Command::Connect { peer, outbox, shared: shared.clone() })
            .await
            .map_err(|_| ServiceStopped)?;
        Ok(CojsonSession {
            peer,
            commands: self.commands.clone(),
            outbox: rx,
            shared,
            inflight: Arc::new(tokio::sync::Semaphore::new(session::INFLIGHT_BYTES)),
            read_only,
            finished: false,
            left: false,
        })
    }

    /// The stored header of CoValue `id` (`None`: not stored, or unreadable). For Jazz auth
    /// tokens, whose signer is named in the account's header.
    pub async fn stored_header(&self, id: &str) -> Result<Option<serde_json::Value>, ServiceStopped> {
        let Ok(id) = crate::ids::CoId::parse(id) else { return Ok(None) };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Header { id, reply }).await.map_err(|_| ServiceStopped)?;
        answer.await.map_err(|_| ServiceStopped)
    }

    /// Counters for /metrics.
    pub fn stats(&self) -> CojsonStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod outbox_tests;
#[cfg(test)]
mod tests;
