//! The engine as the server edge sees it: [`PgSync::start`] and [`PgSync::run_session`].
//!
//! The edge knows nothing about Postgres: it moves JSON text frames between a WebSocket and two
//! channels, runs [`PgSync::run_session`] as one tokio task per client and tells it when to
//! stop. That task is a `SessionTask` (`session_task.rs`), which drives the client's sans-IO
//! [`crate::subscription::Subscription`]. One replicator (`replicator.rs`) per engine fills
//! `change_history` and publishes its state on a `watch` channel that every session follows.
//! While another instance holds the replication slot, the replicator waits for it and a
//! follower (`follower.rs`) publishes on the same channel what that instance commits: sessions
//! are served from the shared history either way (docs/pgsync-protocol.md §14).

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use futures_util::pin_mut;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;

use crate::access::Access;
use crate::config::PgSyncConfig;
use crate::db::{self, SharedClient};
use crate::error::Error;
use crate::lsn::Lsn;
use crate::maintenance::{maintenance_loop, maintenance_once};
use crate::replicator::{FeedState, Phase, Replicator};
use crate::session_task::SessionTask;
use crate::snapshot::{SnapshotConnections, SnapshotSlots};

/// Why [`PgSync::run_session`] returned. The edge closes the socket in every case (normal
/// close for `ClientClosed`/`Cancelled`/`Closed`, 1011 for `Failed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The inbound channel closed (the client went away).
    ClientClosed,
    /// The cancel future resolved (server shutdown).
    Cancelled,
    /// The session closed itself after telling the client why (fatal error, must_refetch).
    Closed,
    /// The session could not go on.
    Failed(SessionFailure),
}

/// Why a session could not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionFailure {
    #[error("the change feed engine stopped")]
    EngineStopped,
    #[error("the session's outbound channel closed")]
    OutboundClosed,
}

/// What [`PgSync::status`] reads from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedStatus {
    /// The end of the WAL (`pg_current_wal_lsn()`).
    pub wal_end: Lsn,
    /// WAL bytes between the feed's durable watermark and the end of the WAL: how far behind the
    /// database the feed is (a little WAL of other databases or idle records counts too).
    pub lag_bytes: u64,
    /// Clients in the registry (one per token subject and `client_id`; they expire).
    pub registered_clients: u64,
    /// The lowest position a registered client acked (what holds retention back).
    pub oldest_client_position: Option<Lsn>,
}

/// The running engine. Cheap to clone; all clones share one replicator.
#[derive(Clone)]
pub struct PgSync {
    inner: Arc<Inner>,
}

/// What every session and background task of one engine shares.
pub(crate) struct Inner {
    pub cfg: Arc<PgSyncConfig>,
    pub pg: tokio_postgres::Config,
    pub feed_tx: Arc<watch::Sender<FeedState>>,
    pub feed: watch::Receiver<FeedState>,
    /// Registrations and acked positions, committed durably.
    pub shared: SharedClient,
    /// Page queries only, with planner settings that keep them on the ordered index scan
    /// ([`db::for_page_queries`]); also keeps pages from queueing behind registry writes.
    pub pages: SharedClient,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    pub snapshot_ids: AtomicU64,
    /// Snapshot connections: `max_snapshot_connections` slots, one per open connection.
    pub snapshots: Arc<SnapshotSlots>,
}

impl PgSync {
    /// Validate the config, connect, set up schema/publication/slot (or a new generation) and
    /// start streaming in the background, or, if another instance holds the slot, follow the
    /// history it writes (and take the slot over when it is released). Fails on a bad config or
    /// an unreachable/unsuitable database; after that, connection losses are retried forever
    /// with backoff. Await [`wait_caught_up`](Self::wait_caught_up) before reporting ready.
    pub async fn start(cfg: PgSyncConfig) -> Result<PgSync, Error> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        let pg = db::parse_url(&cfg.url)?;
        let (feed_tx, feed) = watch::channel(FeedState {
            phase: Phase::Starting,
            generation: 0,
            watermark: Lsn::ZERO,
            horizon: Lsn::ZERO,
            caught_up: false,
        });
        let feed_tx = Arc::new(feed_tx);
        let (stop, stop_rx) = watch::channel(false);
        let (first_tx, first_rx) = oneshot::channel();
        let replicator = Replicator::new(cfg.clone(), pg.clone(), feed_tx.clone());
        let repl_task = tokio::spawn(replicator.run(first_tx, stop_rx.clone()));
        match first_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::ReplicatorEndedDuringStartup),
        }
        let inner = Arc::new(Inner {
            // Registrations and acked positions, committed durably. (They used to share a
            // connection with page queries, with synchronous_commit off so that position
            // writes would not delay pages; pages have their own connection now.)
            shared: SharedClient::new(pg.clone()),
            pages: SharedClient::new(db::for_page_queries(pg.clone())),
            snapshots: Arc::new(SnapshotSlots::new(&pg, cfg.max_snapshot_connections)),
            pg,
            feed_tx,
            feed,
            stop,
            tasks: Mutex::new(vec![repl_task]),
            cfg,
            snapshot_ids: AtomicU64::new(1),
        });
        let maint = tokio::spawn(maintenance_loop(inner.clone(), stop_rx));
        inner.tasks.lock().await.push(maint);
        Ok(PgSync { inner })
    }

    /// Resolves once the watermark (this instance's replicator's, or the one it follows) has
    /// passed the WAL that existed when the engine started (docs/pgsync-protocol.md §1, §9 and
    /// §14, docs/protocols/design.md §4); sessions answer `hello` only after that anyway.
    pub async fn wait_caught_up(&self) -> Result<(), Error> {
        let mut feed = self.inner.feed.clone();
        let s =
            feed.wait_for(|s| s.caught_up || s.phase == Phase::Stopped).await.map_err(|_| Error::ReplicatorStopped)?;
        if s.caught_up {
            Ok(())
        } else {
            Err(Error::ReplicatorStopped)
        }
    }

    pub fn is_ready(&self) -> bool {
        self.inner.feed.borrow().caught_up
    }

    /// The replicator's state (phase, generation, watermark, horizon, readiness).
    pub fn feed(&self) -> watch::Receiver<FeedState> {
        self.inner.feed.clone()
    }

    /// This instance's part in the change feed: `replicating` (it holds the slot), `following`
    /// (another instance does), `reconnecting`, `starting` or `stopped` ([`Phase::role`]).
    pub fn role(&self) -> &'static str {
        self.inner.feed.borrow().phase.role()
    }

    /// How far the change feed is behind the database and who is registered, for the server's
    /// dashboard: one small query on the registry's connection (the WAL's end, the registry's
    /// row count and its oldest acked position). The caller bounds how long it waits.
    pub async fn status(&self) -> Result<FeedStatus, Error> {
        let client = self.inner.shared.get().await?;
        let s = crate::db::ident(&self.inner.cfg.schema);
        let row = client
            .query_one(
                &format!("SELECT pg_current_wal_lsn(), (SELECT count(*) FROM {s}.clients), (SELECT min(pos_lsn) FROM {s}.clients)"),
                &[],
            )
            .await?;
        let wal_end = Lsn(u64::from(row.get::<_, tokio_postgres::types::PgLsn>(0)));
        let oldest: Option<tokio_postgres::types::PgLsn> = row.get(2);
        let watermark = self.inner.feed.borrow().watermark;
        Ok(FeedStatus {
            wal_end,
            lag_bytes: wal_end.0.saturating_sub(watermark.0),
            registered_clients: row.get::<_, i64>(1).max(0) as u64,
            oldest_client_position: oldest.map(|l| Lsn(u64::from(l))),
        })
    }

    /// Run retention and registry expiry now (they also run every `maintenance_interval`).
    pub async fn run_maintenance(&self) -> Result<(), Error> {
        maintenance_once(&self.inner).await
    }

    /// Snapshot connections open now (each holds a REPEATABLE READ snapshot) and the most that
    /// were ever open at once; never more than `max_snapshot_connections`.
    pub fn snapshot_connections(&self) -> SnapshotConnections {
        self.inner.snapshots.gauges()
    }

    /// Stop the replicator and background tasks. Running sessions end with `Failed`.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().await);
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Serve one `/api/sync` client. `inbound` carries the client's text frames, `outbound`
    /// receives the server's; the session ends when `inbound` closes, `cancel` resolves, the
    /// client must be disconnected (fatal error, must_refetch), or `outbound` is closed.
    /// `subject` is the verified token's subject (`None` on open servers): the client's
    /// registry row is keyed by it and `client_id`, so a client can only ever overwrite rows of
    /// its own subject.
    pub async fn run_session<C>(
        &self,
        mut inbound: mpsc::Receiver<String>,
        outbound: mpsc::Sender<String>,
        access: Access,
        subject: Option<String>,
        cancel: C,
    ) -> SessionEnd
    where
        C: Future<Output = ()>,
    {
        let mut task = SessionTask::new(self.inner.clone(), outbound, access, subject.unwrap_or_default());
        pin_mut!(cancel);
        let end = tokio::select! {
            biased;
            _ = &mut cancel => SessionEnd::Cancelled,
            end = task.run(&mut inbound) => end,
        };
        // The last ack is written before the session reports its end, so whoever reacts to
        // the end (a test, a shutdown) sees the registry up to date.
        task.finish().await;
        end
    }
}

/// Compile-time check: the edge can `tokio::spawn` a session.
#[allow(dead_code)]
fn _session_future_is_send() {
    fn is_send<T: Send>(_: T) {}
    let (_itx, irx) = mpsc::channel::<String>(1);
    let (otx, _orx) = mpsc::channel::<String>(1);
    let p: Option<PgSync> = None;
    if let Some(p) = p {
        is_send(async move { p.run_session(irx, otx, Access::all(), None, std::future::pending::<()>()).await });
    }
}
