//! The engine as the server edge sees it: [`PgSync::start`] and [`PgSync::run_session`].
//!
//! The edge knows nothing about Postgres: it moves JSON text frames between a WebSocket and two
//! channels and tells the session when to stop. Everything else (readiness gate, snapshot,
//! keyset paging, shape filtering, positions, registry) happens here, driven by the sans-IO
//! [`crate::session::Session`].

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{pin_mut, TryStreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;
use tokio_postgres::IsolationLevel;

use crate::access::Access;
use crate::change_history::{self, PageItem};
use crate::config::{Error, PgSyncConfig};
use crate::db::{self, ident, qualified_ident, SharedClient};
use crate::lsn::Lsn;
use crate::pgoutput::RelationCache;
use crate::position::Position;
use crate::protocol::{
    ClientMessage, ColumnSchema, ErrorCode, ErrorMessage, Hello, RefetchReason, Row, ServerMessage, ServerState,
    ShapeRequest, ShapeSchema,
};
use crate::replicator::{FeedState, Phase, Replicator};
use crate::session::{Action, Event, HistoryRow, PageQuery, Session, SessionConfig, Stitch};
use crate::filter::filter_op;
use crate::shape::{Shape, Truth};
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
            cfg,
            pg,
            feed_tx,
            feed,
            stop,
            tasks: Mutex::new(vec![repl_task]),
            snapshot_ids: AtomicU64::new(1),
        });
        let maint = tokio::spawn(maintenance_loop(inner.clone(), stop_rx));
        inner.tasks.lock().await.push(maint);
        Ok(PgSync { inner })
    }

    /// Resolves once the replicator has consumed the WAL that existed when it started
    /// (spec 4.7); sessions answer `hello` only after that anyway.
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
    pub async fn run_session<C>(
        &self,
        mut inbound: mpsc::Receiver<String>,
        outbound: mpsc::Sender<String>,
        access: Access,
        cancel: C,
    ) -> SessionEnd
    where
        C: Future<Output = ()>,
    {
        let mut driver = Driver {
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
        };
        pin_mut!(cancel);
        let end = tokio::select! {
            biased;
            _ = &mut cancel => SessionEnd::Cancelled,
            end = driver.run(&mut inbound) => end,
        };
        // The last ack is written before the session reports its end, so whoever reacts to
        // the end (a test, a shutdown) sees the registry up to date.
        driver.flush_position().await;
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
            change_history::apply_retention(&mut client, &inner.cfg.schema, generation, max_age, inner.cfg.client_ttl).await?
        {
            inner.feed_tx.send_modify(|s| s.horizon = s.horizon.max(h));
        }
    }
    Ok(())
}

struct Driver {
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
    /// The next page, already being read (see [`Driver::prefetch`]).
    prefetched: Option<Prefetch>,
    /// What the token lets this session read; applied to the hello's shapes.
    access: Access,
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

/// Acked positions are written to the registry at most this often per session (spec 4.5:
/// "about 1 per second per client"). The registry only feeds retention and metrics (the
/// client's hello is authoritative), so a position that is up to this old costs nothing but
/// slightly more conservative retention, while writing every ack put two commits per
/// delivered transaction on the connection that also serves page queries, which showed up as
/// commit→client latency.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Control flow out of an action: keep going, or end the session.
type Flow = Result<(), SessionEnd>;

impl Driver {
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
        // Readiness gate (spec 4.7): buffer frames until the replicator caught up.
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
        let mut session = Session::new(SessionConfig {
            generation: f.generation,
            watermark: f.watermark,
            horizon: f.horizon,
            default_batch_rows: self.inner.cfg.default_batch_rows,
            max_batch_rows: self.inner.cfg.max_batch_rows,
            default_window: self.inner.cfg.default_window,
        });
        let mut last_watermark = f.watermark;
        let mut events: VecDeque<Event> = VecDeque::new();
        loop {
            while let Some(ev) = events.pop_front() {
                let actions = session.handle(ev);
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
            match ClientMessage::from_json(&text) {
                Ok(ClientMessage::Hello(h)) if self.hello.is_none() => {
                    // The token's tables and row predicates become part of the shapes, so the
                    // session core serves exactly what the token allows. Every way a shape can
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
                // The session answers invalid syntax itself.
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
        self.hello = Some(h.clone());
        // A position ahead of the watermark is rejected by the session: don't register it.
        let watermark = self.feed.borrow().watermark;
        let same_generation = h.generation == Some(self.generation);
        if same_generation && h.position.is_some_and(|p| p.lsn > watermark) {
            return Ok(());
        }
        let position = if same_generation { h.position } else { None };
        if let Err(e) = self.register(&h.client_id, position, &h.shapes).await {
            tracing::warn!(error = %e, "pgsync: client registration failed");
        }
        Ok(())
    }

    async fn register(&self, client_id: &str, position: Option<Position>, shapes: &[ShapeRequest]) -> Result<(), Error> {
        let client = self.inner.shared.get().await?;
        let lsn = position.map(|p| PgLsn::from(p.lsn.0));
        let seq = position.map(|p| i64::from(p.seq));
        let shapes = serde_json::to_value(shapes).unwrap_or(Value::Null);
        client
            .execute(
                &format!(
                    "INSERT INTO {}.clients (client_id, generation, pos_lsn, pos_seq, shapes, last_seen) \
                     VALUES ($1, $2, $3, $4, $5, now()) ON CONFLICT (client_id) DO UPDATE \
                     SET generation = $2, pos_lsn = $3, pos_seq = $4, shapes = $5, last_seen = now()",
                    ident(&self.inner.cfg.schema)
                ),
                &[&client_id, &(self.generation as i64), &lsn, &seq, &shapes],
            )
            .await?;
        Ok(())
    }

    /// The registry write for an acked position. Monotonic in SQL, so writes that overlap or
    /// complete out of order never move a position backwards.
    fn persist_write(&self, p: Position) -> Option<impl Future<Output = ()> + Send + 'static> {
        let client_id = self.hello.as_ref()?.client_id.clone();
        let inner = self.inner.clone();
        let generation = self.generation as i64;
        Some(async move {
            let res = async {
                let client = inner.shared.get().await?;
                client
                    .execute(
                        &format!(
                            "UPDATE {}.clients SET pos_lsn = $2, pos_seq = $3, generation = $4, last_seen = now() \
                             WHERE client_id = $1 AND (pos_lsn IS NULL OR generation <> $4 OR (pos_lsn, pos_seq) < ($2, $3))",
                            ident(&inner.cfg.schema)
                        ),
                        &[&client_id, &PgLsn::from(p.lsn.0), &i64::from(p.seq), &generation],
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
            Action::PersistPosition(p) => {
                self.unpersisted = Some(p);
                self.persist_soon(false);
                Ok(())
            }
            Action::TakeSnapshot { shapes } => match self.snapshot(&shapes).await {
                Ok(Ok(stitch)) => {
                    // The catch-up must reach at least h (spec 4.3 step 3-4).
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
                    Err(e) => return Err(self.fatal(ErrorCode::Internal, format!("reading history failed: {e}")).await),
                };
                let mut rows: Vec<HistoryRow> = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        // Shape filtering (spec 4.8) with the row before the change; a
                        // dropped op keeps its position in the session (see `filter`).
                        PageItem::Row(mut r, old) => {
                            r.op = r.op.and_then(|op| filter_op(&self.shapes, op, old.as_ref()));
                            rows.push(r);
                        }
                        PageItem::SchemaChanged { table, .. } => {
                            let shape_ids = self.shapes.iter().filter(|(_, s)| s.table == table).map(|(id, _)| id.clone()).collect();
                            let _ = self.send(&ServerMessage::MustRefetch { reason: RefetchReason::SchemaChanged, shape_ids }).await;
                            return Err(SessionEnd::Closed);
                        }
                    }
                }
                events.push_back(Event::PageLoaded(rows));
                Ok(())
            }
        }
    }

    /// Start reading the page the session just asked for, before the actions queued ahead of
    /// it (typically encoding and sending the previous page) run: PostgreSQL produces the next
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
        let mut client = db::connect(&self.inner.pg).await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let row = tx
            .query_one(
                &format!(
                    "SELECT pg_current_snapshot()::text, (SELECT watermark FROM {}.replication_state WHERE id = 1)",
                    ident(&self.inner.cfg.schema)
                ),
                &[],
            )
            .await?;
        let snapshot: String = row.get(0);
        let h = Lsn(u64::from(row.get::<_, PgLsn>(1)));
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
            let select = cols.iter().map(|c| format!("{}::text", ident(&c.name))).collect::<Vec<_>>().join(", ");
            let sql = format!("SELECT {select} FROM {}", qualified_ident(&shape.table));
            let stream = tx.query_raw(&sql, std::iter::empty::<i32>()).await?;
            pin_mut!(stream);
            let mut batch: Vec<Row> = Vec::with_capacity(limit.min(4096));
            while let Some(r) = stream.try_next().await? {
                let mut row = Row::new();
                for (j, c) in cols.iter().enumerate() {
                    let v: Option<&str> = r.try_get(j)?;
                    row.insert(c.name.clone(), v.map_or(Value::Null, |t| value_mapping::text_to_json(c.type_oid, t)));
                }
                if shape.evaluate(&row) != Truth::True {
                    continue;
                }
                batch.push(shape.project(&row));
                if batch.len() >= limit {
                    let rows = std::mem::take(&mut batch);
                    if let Err(end) = self.send(&ServerMessage::SnapshotBatch { snapshot_id: snapshot_id.clone(), rows }).await {
                        return Ok(Err(end));
                    }
                }
            }
            if !batch.is_empty() {
                if let Err(end) = self.send(&ServerMessage::SnapshotBatch { snapshot_id: snapshot_id.clone(), rows: batch }).await {
                    return Ok(Err(end));
                }
            }
            if let Err(end) = self.send(&ServerMessage::SnapshotEnd { snapshot_id }).await {
                return Ok(Err(end));
            }
        }
        tx.commit().await?;
        Ok(Ok(Stitch { snapshot, snapshot_watermark: h }))
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
    type_oid: u32,
    type_name: String,
}

async fn table_columns<C: tokio_postgres::GenericClient>(client: &C, table: &str) -> Result<Vec<ColumnInfo>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, t.typnamespace::regnamespace::text || '.' || t.typname::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&qualified_ident(table)],
        )
        .await?;
    let empty = RelationCache::new();
    Ok(rows
        .iter()
        .map(|r| {
            let oid: u32 = r.get(1);
            let builtin = value_mapping::type_name(oid, &empty);
            let type_name = if builtin.starts_with("oid:") { r.get(2) } else { builtin };
            ColumnInfo { name: r.get(0), type_oid: oid, type_name }
        })
        .collect())
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
        is_send(async move { p.run_session(irx, otx, Access::all(), std::future::pending::<()>()).await });
    }
}
