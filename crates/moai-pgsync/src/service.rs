//! The engine as the server edge sees it: [`PgSync::start`] and [`PgSync::run_session`].
//!
//! The edge knows nothing about Postgres: it moves JSON text frames between a WebSocket and two
//! channels, runs [`PgSync::run_session`] as one tokio task per client and tells it when to
//! stop. That task is a `SessionTask`: it owns the client's sans-IO
//! [`Subscription`], feeds it events and performs its actions.
//! The subscription decides the protocol (what to answer, which page to read next, when a
//! client is up to date); the task does the I/O around it: the readiness gate, the token's
//! restriction of the shapes, catalog checks, the snapshot, page queries and shape filtering,
//! the registry and coalesced position writes, and the mid-session `must_refetch` for a new
//! generation or a changed table.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{pin_mut, TryStreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{IsolationLevel, SimpleQueryMessage};

use crate::access::Access;
use crate::change_history::{self, PageItem};
use crate::config::{Error, PgSyncConfig};
use crate::db::{self, ident, qualified_ident, SharedClient};
use crate::filter::filter_op;
use crate::lsn::Lsn;
use crate::pgoutput::RelationCache;
use crate::position::Position;
use crate::protocol::{
    ClientMessage, ColumnSchema, ErrorCode, ErrorMessage, Hello, RefetchReason, Row, ServerMessage, ServerState,
    ShapeRequest, ShapeSchema,
};
use crate::replicator::{FeedState, Phase, Replicator, MESSAGE_PREFIX};
use crate::shape::{Shape, Truth};
use crate::subscription::{Action, Event, HistoryRow, PageQuery, Stitch, Subscription, SubscriptionConfig};
use crate::value_mapping;

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
    /// The outbound channel closed or the engine stopped.
    Failed(String),
}

/// The running engine. Cheap to clone; all clones share one replicator.
#[derive(Clone)]
pub struct PgSync {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Arc<PgSyncConfig>,
    pg: tokio_postgres::Config,
    feed_tx: Arc<watch::Sender<FeedState>>,
    feed: watch::Receiver<FeedState>,
    shared: SharedClient,
    /// Page queries only, with planner settings that keep them on the ordered index scan
    /// ([`db::for_page_queries`]); also keeps pages from queueing behind registry writes.
    pages: SharedClient,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    snapshot_ids: AtomicU64,
    /// Snapshot connections: `max_snapshot_connections` slots, one per open connection.
    snapshots: Arc<SnapshotSlots>,
}

/// The cap on snapshot connections, shared by all sessions, and its gauges.
struct SnapshotSlots {
    /// The connection parameters of snapshot connections (`application_name` set apart).
    pg: tokio_postgres::Config,
    permits: Arc<Semaphore>,
    open: AtomicUsize,
    peak: AtomicUsize,
}

/// Snapshot connections now and at most so far; see [`PgSync::snapshot_connections`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotConnections {
    pub open: usize,
    pub peak: usize,
}

/// One snapshot slot, held from before the connection is opened until its socket is closed:
/// it lives in the connection's task, not in the session, so a slot is free only once the
/// connection (and with it the REPEATABLE READ snapshot and its xmin) is really gone.
struct SlotGuard {
    slots: Arc<SnapshotSlots>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A snapshot connection. Dropped before `finish` (the session ended mid-snapshot: client
/// gone, write deadline, task aborted), it aborts the connection task, which closes the
/// socket at once: Postgres ends the transaction and the slot is released, instead of the
/// connection reading the rest of a large result nobody wants.
struct SnapshotConn {
    client: tokio_postgres::Client,
    task: JoinHandle<()>,
    finished: bool,
}

impl SnapshotConn {
    /// Wait for a free slot, then connect.
    async fn open(slots: &Arc<SnapshotSlots>) -> Result<SnapshotConn, Error> {
        let permit =
            slots.permits.clone().acquire_owned().await.map_err(|_| Error::Other("snapshot slots closed".into()))?;
        let open = slots.open.fetch_add(1, Ordering::SeqCst) + 1;
        slots.peak.fetch_max(open, Ordering::SeqCst);
        let guard = SlotGuard { slots: slots.clone(), _permit: permit };
        let (client, connection) = slots.pg.connect(tokio_postgres::NoTls).await?;
        let task = tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "pgsync snapshot connection ended");
            }
        });
        Ok(SnapshotConn { client, task, finished: false })
    }
}

impl Drop for SnapshotConn {
    fn drop(&mut self) {
        if !self.finished {
            self.task.abort();
        }
    }
}

impl PgSync {
    /// Validate the config, connect, set up schema/publication/slot (or a new generation) and
    /// start streaming in the background. Fails on a bad config or an unreachable/unsuitable
    /// database; after that, connection losses are retried forever with backoff. Await
    /// [`wait_caught_up`](Self::wait_caught_up) before reporting ready.
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
            Err(_) => return Err(Error::Other("replicator ended during startup".into())),
        }
        let inner = Arc::new(Inner {
            // Registrations and acked positions, committed durably. (They used to share a
            // connection with page queries, with synchronous_commit off so that position
            // writes would not delay pages; pages have their own connection now.)
            shared: SharedClient::new(pg.clone()),
            pages: SharedClient::new(db::for_page_queries(pg.clone())),
            pg: pg.clone(),
            feed_tx,
            feed,
            stop,
            tasks: Mutex::new(vec![repl_task]),
            cfg: cfg.clone(),
            snapshot_ids: AtomicU64::new(1),
            snapshots: Arc::new(SnapshotSlots {
                pg: {
                    let mut c = pg.clone();
                    c.application_name("moai-pgsync-snapshot");
                    c
                },
                permits: Arc::new(Semaphore::new(cfg.max_snapshot_connections)),
                open: AtomicUsize::new(0),
                peak: AtomicUsize::new(0),
            }),
        });
        let maint = tokio::spawn(maintenance_loop(inner.clone(), stop_rx));
        inner.tasks.lock().await.push(maint);
        Ok(PgSync { inner })
    }

    /// Resolves once the replicator has consumed the WAL that existed when it started
    /// (docs/pgsync-protocol.md §1 and §9, docs/protocols/design.md §4); sessions answer `hello`
    /// only after that anyway.
    pub async fn wait_caught_up(&self) -> Result<(), Error> {
        let mut feed = self.inner.feed.clone();
        feed.wait_for(|s| s.caught_up || s.phase == Phase::Stopped)
            .await
            .map_err(|_| Error::Other("replicator stopped".into()))
            .and_then(|s| if s.caught_up { Ok(()) } else { Err(Error::Other("replicator stopped".into())) })
    }

    pub fn is_ready(&self) -> bool {
        self.inner.feed.borrow().caught_up
    }

    /// The replicator's state (phase, generation, watermark, horizon, readiness).
    pub fn feed(&self) -> watch::Receiver<FeedState> {
        self.inner.feed.clone()
    }

    /// Run retention and registry expiry now (they also run every `maintenance_interval`).
    pub async fn run_maintenance(&self) -> Result<(), Error> {
        maintenance_once(&self.inner).await
    }

    /// Snapshot connections open now (each holds a REPEATABLE READ snapshot) and the most that
    /// were ever open at once; never more than `max_snapshot_connections`.
    pub fn snapshot_connections(&self) -> SnapshotConnections {
        let s = &self.inner.snapshots;
        SnapshotConnections { open: s.open.load(Ordering::SeqCst), peak: s.peak.load(Ordering::SeqCst) }
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
        let mut task = SessionTask {
            inner: self.inner.clone(),
            out: outbound,
            feed: self.inner.feed.clone(),
            hello: None,
            shapes: Vec::new(),
            generation: 0,
            unpersisted: None,
            last_persist: None,
            prefetched: None,
            access,
            subject: subject.unwrap_or_default(),
        };
        pin_mut!(cancel);
        let end = tokio::select! {
            biased;
            _ = &mut cancel => SessionEnd::Cancelled,
            end = task.run(&mut inbound) => end,
        };
        // The last ack is written before the session reports its end, so whoever reacts to
        // the end (a test, a shutdown) sees the registry up to date.
        task.flush_position().await;
        end
    }
}

async fn maintenance_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.cfg.maintenance_interval) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = maintenance_once(&inner).await {
            tracing::warn!(error = %e, "pgsync maintenance failed");
        }
    }
}

async fn maintenance_once(inner: &Inner) -> Result<(), Error> {
    let mut client = db::connect(&inner.pg).await?;
    change_history::expire_clients(&client, &inner.cfg.schema, inner.cfg.client_ttl).await?;
    if let Some(max_age) = inner.cfg.retention {
        let generation = inner.feed.borrow().generation;
        if let Some(h) =
            change_history::apply_retention(&mut client, &inner.cfg.schema, generation, max_age, inner.cfg.client_ttl)
                .await?
        {
            inner.feed_tx.send_modify(|s| s.horizon = s.horizon.max(h));
        }
    }
    Ok(())
}

/// One client's session: owns its [`Subscription`] and everything the subscription asks the I/O
/// layer to hold (the hello, the resolved shapes, the pending position write, a prefetched page)
/// and runs, inside [`PgSync::run_session`], as one tokio task that the edge spawns. Nothing
/// else touches this state, so it needs no locks.
struct SessionTask {
    inner: Arc<Inner>,
    out: mpsc::Sender<String>,
    feed: watch::Receiver<FeedState>,
    hello: Option<Hello>,
    /// (shape id, shape) in hello order.
    shapes: Vec<(String, Shape)>,
    generation: u64,
    /// Acked position not yet written to the registry (writes are coalesced).
    unpersisted: Option<Position>,
    last_persist: Option<tokio::time::Instant>,
    /// The next page, already being read (see [`SessionTask::prefetch`]).
    prefetched: Option<Prefetch>,
    /// What the token lets this session read; applied to the hello's shapes.
    access: Access,
    /// The token's subject ("" without one): the first half of the registry key.
    subject: String,
}

/// A page query started ahead of its turn; aborted if the session ends first.
struct Prefetch {
    query: PageQuery,
    task: JoinHandle<Result<Vec<PageItem>, Error>>,
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Acked positions are written to the registry at most this often per session
/// (docs/pgsync-protocol.md §6). The registry only feeds retention and metrics (the
/// client's hello is authoritative), so a position that is up to this old costs nothing but
/// slightly more conservative retention, while writing every ack put two commits per
/// delivered transaction on the connection that also serves page queries, which showed up as
/// commit→client latency.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// The registry's `shapes` column holds the hello's shapes as JSON, or, when that is longer
/// than this, only their count: with rows bounded per subject, this bounds the registry.
const MAX_STORED_SHAPES_BYTES: usize = 64 * 1024;

fn stored_shapes(shapes: &[ShapeRequest]) -> Value {
    let v = serde_json::to_value(shapes).unwrap_or(Value::Null);
    if v.to_string().len() <= MAX_STORED_SHAPES_BYTES {
        v
    } else {
        serde_json::json!({ "omitted": "longer than 64 KiB", "count": shapes.len() })
    }
}

/// Control flow out of an action: keep going, or end the session.
type Flow = Result<(), SessionEnd>;

impl SessionTask {
    async fn send(&self, msg: &ServerMessage) -> Flow {
        self.out.send(msg.to_json()).await.map_err(|_| SessionEnd::Failed("outbound channel closed".into()))
    }

    async fn fatal(&self, code: ErrorCode, message: String) -> SessionEnd {
        let _ = self
            .send(&ServerMessage::Error(ErrorMessage { code, message, retry_after_ms: Some(1000), fatal: true }))
            .await;
        SessionEnd::Closed
    }

    async fn run(&mut self, inbound: &mut mpsc::Receiver<String>) -> SessionEnd {
        // Readiness gate (docs/pgsync-protocol.md §9): buffer frames until the replicator
        // caught up.
        let mut early: VecDeque<String> = VecDeque::new();
        if !self.feed.borrow().caught_up {
            if let Err(e) = self.send(&ServerMessage::Status { state: ServerState::Starting }).await {
                return e;
            }
            loop {
                tokio::select! {
                    msg = inbound.recv() => match msg {
                        Some(m) => early.push_back(m),
                        None => return SessionEnd::ClientClosed,
                    },
                    r = self.feed.changed() => {
                        if r.is_err() {
                            return SessionEnd::Failed("engine stopped".into());
                        }
                        let s = self.feed.borrow_and_update().clone();
                        if s.caught_up {
                            break;
                        }
                        if s.phase == Phase::Stopped {
                            return SessionEnd::Failed("engine stopped".into());
                        }
                    }
                }
            }
        }
        let f = self.feed.borrow_and_update().clone();
        self.generation = f.generation;
        let mut phase = f.phase.clone();
        let mut subscription = Subscription::new(SubscriptionConfig {
            generation: f.generation,
            watermark: f.watermark,
            horizon: f.horizon,
            default_batch_rows: self.inner.cfg.default_batch_rows,
            max_batch_rows: self.inner.cfg.max_batch_rows,
            default_window: self.inner.cfg.default_window,
            max_shapes: self.inner.cfg.max_shapes_per_session,
            max_client_id_bytes: self.inner.cfg.max_client_id_bytes,
        });
        let mut last_watermark = f.watermark;
        let mut events: VecDeque<Event> = VecDeque::new();
        loop {
            while let Some(ev) = events.pop_front() {
                let actions = subscription.handle(ev);
                if let Some(q) = actions.iter().find_map(|a| match a {
                    Action::QueryPage(q) => Some(q),
                    _ => None,
                }) {
                    self.prefetch(q.clone());
                }
                for action in actions {
                    if let Err(end) = self.exec(action, &mut events).await {
                        return end;
                    }
                }
            }
            let text = if let Some(t) = early.pop_front() {
                t
            } else {
                let persist_at = self.persist_deadline();
                tokio::select! {
                    _ = tokio::time::sleep_until(persist_at.unwrap_or_else(tokio::time::Instant::now)), if persist_at.is_some() => {
                        self.persist_soon(true);
                        continue;
                    }
                    msg = inbound.recv() => match msg {
                        Some(t) => t,
                        None => return SessionEnd::ClientClosed,
                    },
                    r = self.feed.changed() => {
                        if r.is_err() {
                            return SessionEnd::Failed("engine stopped".into());
                        }
                        let s = self.feed.borrow_and_update().clone();
                        if s.generation != self.generation && s.generation != 0 {
                            let shape_ids = self.shapes.iter().map(|(id, _)| id.clone()).collect();
                            let _ = self.send(&ServerMessage::MustRefetch { reason: RefetchReason::GenerationChanged, shape_ids }).await;
                            return SessionEnd::Closed;
                        }
                        if s.phase != phase {
                            let state = match (&phase, &s.phase) {
                                (_, Phase::Reconnecting { .. }) => Some(ServerState::ReplicationReconnecting),
                                (Phase::Reconnecting { .. }, Phase::Streaming) => Some(ServerState::Ok),
                                _ => None,
                            };
                            phase = s.phase.clone();
                            if let Some(state) = state {
                                if let Err(e) = self.send(&ServerMessage::Status { state }).await {
                                    return e;
                                }
                            }
                            if s.phase == Phase::Stopped {
                                return SessionEnd::Failed("engine stopped".into());
                            }
                        }
                        if s.watermark > last_watermark {
                            last_watermark = s.watermark;
                            events.push_back(Event::WatermarkAdvanced(s.watermark));
                        }
                        continue;
                    }
                }
            };
            let parsed = ClientMessage::from_json(&text);
            // Limits first (shape count, client_id length), before any work for the message.
            if let Some(refused) = parsed.as_ref().ok().and_then(|m| subscription.refuse(m)) {
                for action in refused {
                    if let Err(end) = self.exec(action, &mut events).await {
                        return end;
                    }
                }
                return SessionEnd::Closed;
            }
            match parsed {
                Ok(ClientMessage::Hello(h)) if self.hello.is_none() => {
                    // The token's tables and row predicates become part of the shapes, so the
                    // subscription serves exactly what the token allows. Every way a shape can
                    // enter a session must pass here (`subscribe`, not implemented yet, too).
                    let h = match self.access.restrict_hello(h) {
                        Ok(h) => h,
                        Err(why) => return self.fatal(ErrorCode::Forbidden, why).await,
                    };
                    if let Err(end) = self.accept_hello(&h).await {
                        return end;
                    }
                    events.push_back(Event::Client(ClientMessage::Hello(h)));
                }
                Ok(m) => events.push_back(Event::Client(m)),
                // Nothing can happen before a valid hello, so a bad one ends the session with
                // a message naming the offending field instead of leaving the client waiting.
                Err(e) if self.hello.is_none() => {
                    let message = match crate::protocol::explain_bad_hello(&text) {
                        Some(detail) => format!("invalid hello: {detail}"),
                        None => format!("expected a hello first: {e}"),
                    };
                    let msg = ServerMessage::Error(ErrorMessage {
                        code: ErrorCode::BadRequest,
                        message,
                        retry_after_ms: None,
                        fatal: true,
                    });
                    let _ = self.send(&msg).await;
                    return SessionEnd::Closed;
                }
                Err(e) => {
                    let msg = ServerMessage::Error(ErrorMessage {
                        code: ErrorCode::BadRequest,
                        message: e.to_string(),
                        retry_after_ms: None,
                        fatal: false,
                    });
                    if let Err(end) = self.send(&msg).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Check the shapes against the published tables and the catalog; register the client.
    async fn accept_hello(&mut self, h: &Hello) -> Flow {
        let mut shapes = Vec::new();
        for req in &h.shapes {
            let shape = match Shape::from_request(req) {
                Ok(s) => s,
                // The subscription answers invalid syntax itself.
                Err(_) => return Ok(()),
            };
            if !self.inner.cfg.tables.contains(&shape.table) {
                return Err(self.fatal(ErrorCode::ShapeInvalid, format!("table {} is not synced", shape.table)).await);
            }
            let cols = match self.table_columns(&shape.table).await {
                Ok(c) => c,
                Err(e) => return Err(self.fatal(ErrorCode::Internal, e.to_string()).await),
            };
            let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
            if let Err(e) = shape.validate_columns(&names) {
                return Err(self.fatal(ErrorCode::ShapeInvalid, format!("shape {}: {e}", req.id)).await);
            }
            shapes.push((req.id.clone(), shape));
        }
        self.shapes = shapes;
        // Registration waits for the subscription's decision on the position
        // (`Action::Register`): a refused or too old position must never reach the registry,
        // where it would hold retention back.
        self.hello = Some(h.clone());
        Ok(())
    }

    /// Register the client under (token subject, client_id) with the position the subscription
    /// accepted, then keep at most `max_clients_per_subject` rows for the subject (the least
    /// recently seen go first).
    async fn register(&self, position: Option<Position>) -> Result<(), Error> {
        let Some(h) = self.hello.as_ref() else { return Ok(()) };
        let client = self.inner.shared.get().await?;
        let s = ident(&self.inner.cfg.schema);
        let lsn = position.map(|p| PgLsn::from(p.lsn.0));
        let seq = position.map(|p| i64::from(p.seq));
        let shapes = stored_shapes(&h.shapes);
        client
            .execute(
                &format!(
                    "INSERT INTO {s}.clients (subject, client_id, generation, pos_lsn, pos_seq, shapes, last_seen) \
                     VALUES ($1, $2, $3, $4, $5, $6, now()) ON CONFLICT (subject, client_id) DO UPDATE \
                     SET generation = $3, pos_lsn = $4, pos_seq = $5, shapes = $6, last_seen = now()"
                ),
                &[&self.subject, &h.client_id, &(self.generation as i64), &lsn, &seq, &shapes],
            )
            .await?;
        let keep = i64::from(self.inner.cfg.max_clients_per_subject);
        client
            .execute(
                &format!(
                    "DELETE FROM {s}.clients WHERE subject = $1 AND client_id IN ( \
                       SELECT client_id FROM {s}.clients WHERE subject = $1 \
                       ORDER BY last_seen DESC, client_id OFFSET $2)"
                ),
                &[&self.subject, &keep],
            )
            .await?;
        Ok(())
    }

    /// The registry write for an acked position. Monotonic in SQL, so writes that overlap or
    /// complete out of order never move a position backwards.
    fn persist_write(&self, p: Position) -> Option<impl Future<Output = ()> + Send + 'static> {
        let client_id = self.hello.as_ref()?.client_id.clone();
        let subject = self.subject.clone();
        let inner = self.inner.clone();
        let generation = self.generation as i64;
        Some(async move {
            let res = async {
                let client = inner.shared.get().await?;
                client
                    .execute(
                        &format!(
                            "UPDATE {}.clients SET pos_lsn = $2, pos_seq = $3, generation = $4, last_seen = now() \
                             WHERE subject = $5 AND client_id = $1 \
                               AND (pos_lsn IS NULL OR generation <> $4 OR (pos_lsn, pos_seq) < ($2, $3))",
                            ident(&inner.cfg.schema)
                        ),
                        &[&client_id, &PgLsn::from(p.lsn.0), &i64::from(p.seq), &generation, &subject],
                    )
                    .await?;
                Ok::<(), Error>(())
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "pgsync: persisting client position failed");
            }
        })
    }

    /// Write the pending position in the background if the interval allows (or `force`).
    fn persist_soon(&mut self, force: bool) {
        let due = force || self.last_persist.is_none_or(|t| t.elapsed() >= PERSIST_INTERVAL);
        if !due {
            return;
        }
        if let Some(p) = self.unpersisted.take() {
            if let Some(write) = self.persist_write(p) {
                tokio::spawn(write);
            }
            self.last_persist = Some(tokio::time::Instant::now());
        }
    }

    /// When the pending position must be written by (`None`: nothing pending).
    fn persist_deadline(&self) -> Option<tokio::time::Instant> {
        self.unpersisted?;
        Some(self.last_persist.map_or_else(tokio::time::Instant::now, |t| t + PERSIST_INTERVAL))
    }

    /// Write the pending position now and wait for it (session end).
    async fn flush_position(&mut self) {
        if let Some(p) = self.unpersisted.take() {
            if let Some(write) = self.persist_write(p) {
                write.await;
            }
        }
    }

    async fn exec(&mut self, action: Action, events: &mut VecDeque<Event>) -> Flow {
        match action {
            Action::Send(msg) => self.send(&msg).await,
            Action::Close => Err(SessionEnd::Closed),
            Action::AwaitWatermark(needed) => {
                // The watermark reaches `needed` once the replicator stored what the snapshot
                // saw and then meets a commit or an idle point at or above it. With nothing
                // else written, that idle point would be the walsender's next keepalive; a
                // non-transactional logical message, written after the snapshot, is one now.
                if self.feed.borrow().watermark < needed {
                    tokio::spawn(nudge_replication(self.inner.clone()));
                }
                Ok(())
            }
            Action::PersistPosition(p) => {
                self.unpersisted = Some(p);
                self.persist_soon(false);
                Ok(())
            }
            Action::Register(p) => {
                if let Err(e) = self.register(p).await {
                    tracing::warn!(error = %e, "pgsync: client registration failed");
                }
                Ok(())
            }
            Action::TakeSnapshot { shapes } => match self.snapshot(&shapes).await {
                Ok(Ok(stitch)) => {
                    // The catch-up must reach at least h (docs/pgsync-protocol.md §5); the
                    // subscription waits for the watermark to pass everything the snapshot saw
                    // (`Action::AwaitWatermark`).
                    let w = self.feed.borrow().watermark.max(stitch.snapshot_watermark);
                    events.push_back(Event::WatermarkAdvanced(w));
                    events.push_back(Event::SnapshotFinished(stitch));
                    Ok(())
                }
                Ok(Err(end)) => Err(end),
                Err(e) => Err(self.fatal(ErrorCode::Internal, format!("snapshot failed: {e}")).await),
            },
            Action::QueryPage(q) => {
                let items = match self.prefetched.take() {
                    Some(mut p) if p.query == q => match (&mut p.task).await {
                        Ok(r) => r,
                        Err(e) => Err(Error::Other(format!("page query task: {e}"))),
                    },
                    _ => load_page(self.inner.clone(), self.tables(), q).await,
                };
                let items = match items {
                    Ok(items) => items,
                    Err(e) => {
                        return Err(self.fatal(ErrorCode::Internal, format!("reading history failed: {e}")).await)
                    }
                };
                let mut rows: Vec<HistoryRow> = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        // Shape filtering (docs/pgsync-protocol.md §10 item 5) with the row
                        // before the change; a dropped op keeps its position in the subscription
                        // (see `filter`).
                        PageItem::Row(mut r, old) => {
                            r.op = r.op.and_then(|op| filter_op(&self.shapes, op, old.as_ref()));
                            rows.push(r);
                        }
                        PageItem::SchemaChanged { table, .. } => {
                            let shape_ids = self
                                .shapes
                                .iter()
                                .filter(|(_, s)| s.table == table)
                                .map(|(id, _)| id.clone())
                                .collect();
                            let _ = self
                                .send(&ServerMessage::MustRefetch { reason: RefetchReason::SchemaChanged, shape_ids })
                                .await;
                            return Err(SessionEnd::Closed);
                        }
                    }
                }
                events.push_back(Event::PageLoaded(rows));
                Ok(())
            }
        }
    }

    /// Start reading the page the subscription just asked for, before the actions queued ahead
    /// of it (typically encoding and sending the previous page) run: PostgreSQL produces the next
    /// page while this task encodes the current one. Without it the two took turns, and a
    /// catch-up ran at the speed of their sum.
    fn prefetch(&mut self, query: PageQuery) {
        let task = tokio::spawn(load_page(self.inner.clone(), self.tables(), query.clone()));
        self.prefetched = Some(Prefetch { query, task });
    }

    fn tables(&self) -> Vec<String> {
        self.shapes.iter().map(|(_, s)| s.table.clone()).collect()
    }

    async fn table_columns(&self, table: &str) -> Result<Vec<ColumnInfo>, Error> {
        let client = self.inner.shared.get().await?;
        table_columns(&*client, table).await
    }

    /// Stream the shapes' rows from one REPEATABLE READ snapshot; returns its stitch.
    async fn snapshot(&self, shapes: &[Shape]) -> Result<Result<Stitch, SessionEnd>, Error> {
        let limit = self
            .hello
            .as_ref()
            .and_then(|h| h.max_batch_rows)
            .unwrap_or(self.inner.cfg.default_batch_rows)
            .clamp(1, self.inner.cfg.max_batch_rows.max(1)) as usize;
        // At most `max_snapshot_connections` at once: wait for a slot. `conn` is declared
        // before `tx`, so if this future is dropped midway the transaction goes first, then the
        // connection (socket closed, see `SnapshotConn`), and with it the slot.
        let mut conn = SnapshotConn::open(&self.inner.snapshots).await?;
        let tx = conn
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        // The first statement takes the transaction's snapshot; the WAL insert position read in
        // it is therefore above the commit record of every transaction the snapshot sees, also
        // of those the replicator has not stored yet (see `Stitch::handoff_watermark`).
        let row = tx
            .query_one(
                &format!(
                    "SELECT pg_current_snapshot()::text, (SELECT watermark FROM {}.replication_state WHERE id = 1), \
                     pg_current_wal_insert_lsn()",
                    ident(&self.inner.cfg.schema)
                ),
                &[],
            )
            .await?;
        let snapshot: String = row.get(0);
        let h = Lsn(u64::from(row.get::<_, PgLsn>(1)));
        let wal_position = Lsn(u64::from(row.get::<_, PgLsn>(2)));
        for (i, shape) in shapes.iter().enumerate() {
            let shape_id = self.shapes.get(i).map(|(id, _)| id.clone()).unwrap_or_else(|| format!("shape-{i}"));
            let snapshot_id = format!("s-{}", self.inner.snapshot_ids.fetch_add(1, Ordering::Relaxed));
            let cols = table_columns(&tx, &shape.table).await?;
            let key = table_key(&tx, &shape.table).await?;
            let schema = ShapeSchema {
                key,
                columns: cols
                    .iter()
                    .filter(|c| shape.columns.as_ref().is_none_or(|l| l.contains(&c.name)))
                    .map(|c| ColumnSchema { name: c.name.clone(), type_name: c.type_name.clone() })
                    .collect(),
            };
            let begin = ServerMessage::SnapshotBegin { snapshot_id: snapshot_id.clone(), shape_id, schema };
            if let Err(end) = self.send(&begin).await {
                return Ok(Err(end));
            }
            // The simple-query protocol returns every value as its type's output-function text,
            // the same text pgoutput sends: one `value_mapping` for snapshot, stream and history.
            // (Not `::text` casts: `bool::text` is `true`, not `t`; `char(n)::text` trims.)
            let select = cols.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
            let sql = format!("SELECT {select} FROM {}", qualified_ident(&shape.table));
            let stream = tx.client().simple_query_raw(&sql).await?;
            pin_mut!(stream);
            let mut batch: Vec<Row> = Vec::with_capacity(limit.min(4096));
            while let Some(msg) = stream.try_next().await? {
                let SimpleQueryMessage::Row(r) = msg else { continue };
                let mut row = Row::new();
                for (j, c) in cols.iter().enumerate() {
                    let v: Option<&str> = r.try_get(j)?;
                    row.insert(c.name.clone(), v.map_or(Value::Null, |t| value_mapping::map_text(&c.mapping, t)));
                }
                if shape.evaluate(&row) != Truth::True {
                    continue;
                }
                batch.push(shape.project(&row));
                if batch.len() >= limit {
                    let rows = std::mem::take(&mut batch);
                    if let Err(end) =
                        self.send(&ServerMessage::SnapshotBatch { snapshot_id: snapshot_id.clone(), rows }).await
                    {
                        return Ok(Err(end));
                    }
                }
            }
            if !batch.is_empty() {
                if let Err(end) =
                    self.send(&ServerMessage::SnapshotBatch { snapshot_id: snapshot_id.clone(), rows: batch }).await
                {
                    return Ok(Err(end));
                }
            }
            if let Err(end) = self.send(&ServerMessage::SnapshotEnd { snapshot_id }).await {
                return Ok(Err(end));
            }
        }
        tx.commit().await?;
        // Done: let the connection end gracefully (Terminate); its task then frees the slot.
        conn.finished = true;
        Ok(Ok(Stitch { snapshot, snapshot_watermark: h, wal_position }))
    }
}

/// Write a non-transactional logical message: when the replicator reads it between
/// transactions, its watermark moves up to the message's LSN (an idle point). Best effort: if
/// the role may not write one, keepalives move the watermark later.
async fn nudge_replication(inner: Arc<Inner>) {
    let res = async {
        let client = inner.shared.get().await?;
        client.query_one("SELECT pg_logical_emit_message(false, $1, 'snapshot_handoff')", &[&MESSAGE_PREFIX]).await?;
        Ok::<(), Error>(())
    }
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "pgsync: logical message for a snapshot handoff failed; waiting for keepalives");
    }
}

/// Page query with retries across connection loss (Postgres restarts).
async fn load_page(inner: Arc<Inner>, tables: Vec<String>, q: PageQuery) -> Result<Vec<PageItem>, Error> {
    let mut delay = Duration::from_millis(50);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let res = async {
            let client = inner.pages.get().await?;
            change_history::load_page(&client, &inner.cfg.schema, &q, &tables).await
        }
        .await;
        match res {
            Ok(items) => return Ok(items),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "pgsync: page query failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

struct ColumnInfo {
    name: String,
    type_name: String,
    /// How the column's values map to JSON (domains by their base type, arrays by element).
    mapping: value_mapping::Mapping,
}

async fn table_columns<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    table: &str,
) -> Result<Vec<ColumnInfo>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, t.typnamespace::regnamespace::text || '.' || t.typname::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&qualified_ident(table)],
        )
        .await?;
    let empty = RelationCache::new();
    let mut cols = Vec::with_capacity(rows.len());
    for r in &rows {
        let oid: u32 = r.get(1);
        let builtin = value_mapping::type_name(oid, &empty);
        let type_name = if builtin.starts_with("oid:") { r.get(2) } else { builtin };
        let mapping = match value_mapping::builtin_mapping(oid) {
            Some(m) => m,
            None => value_mapping::resolve(client, oid).await?,
        };
        cols.push(ColumnInfo { name: r.get(0), type_name, mapping });
    }
    Ok(cols)
}

/// Primary key columns (else the replica identity index), in index order.
async fn table_key<C: tokio_postgres::GenericClient>(client: &C, table: &str) -> Result<Vec<String>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indexrelid = ( \
               SELECT i2.indexrelid FROM pg_index i2 WHERE i2.indrelid = $1::text::regclass \
               AND (i2.indisprimary OR i2.indisreplident) ORDER BY i2.indisprimary DESC LIMIT 1) \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&qualified_ident(table)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
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
