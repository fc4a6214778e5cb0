//! One client's subscription to the change feed: the sans-IO state machine behind an `/api/sync`
//! session. Events in (a client message, a watermark move, a finished snapshot, a loaded page),
//! actions out (send a frame, take a snapshot, read a page, wait for the watermark, register the
//! client, persist an acked position, close). The `SessionTask` in `service.rs` performs the
//! actions and feeds their results back. The subscription makes every decision that needs only
//! the protocol's state; those that need the database or the token are the task's (listed at
//! the end). Sections below are those of docs/pgsync-protocol.md.
//!
//! * **Limits first.** [`Subscription::refuse`] checks a message against the per-session limits
//!   (§12: shapes, `hello` and `subscribe` together; `client_id` length) so that the I/O layer
//!   can call it before it looks anything up for the message; a breach is a fatal
//!   `too_many_shapes` or `bad_request`. [`Subscription::handle`] applies the same check.
//! * **The hello.** An unknown protocol version is a fatal `bad_request`, a `where` that does not
//!   parse a fatal `shape_invalid`; `max_batch_rows` is clamped, `window` is at least 1. The
//!   position decides the mode (§2, §4 `welcome`, §7): none → snapshot; from another
//!   generation → `must_refetch{generation_changed}`, then snapshot; above the watermark → fatal
//!   `position_ahead` (§10 item 7); below the retention horizon →
//!   `must_refetch{position_too_old}`, then snapshot; otherwise catch-up from that position. A
//!   second hello, `subscribe` and `unsubscribe` get a non-fatal `bad_request`.
//! * **Registration (§8).** `Register` is emitted once the hello is decided, with the position
//!   accepted for catch-up or `None` for a client treated as new; never for a refused hello, so a
//!   position the subscription does not serve cannot hold retention back.
//! * **No gap, no duplicate (§5).** Every page query is keyset `(commit_lsn, seq) > after AND
//!   commit_lsn <= upto ORDER BY commit_lsn, seq LIMIT limit`, where `after` is exactly the last
//!   position sent. Positions only move forward, and each page is checked against its query
//!   (order, `upto`, `limit`): a violation is a fatal `internal`, never a gap.
//! * **Snapshot handoff (§5).** A new client first gets the snapshot (the I/O layer streams
//!   `snapshot_*` frames), then a catch-up up to a *fixed* watermark `W` that carries the
//!   snapshot's `Stitch` (so the query adds the xid-visibility filter), then `up_to_date` at
//!   `(W, MAX)`. Everything after uses the plain rule from `(W, MAX)`, i.e. `commit_lsn > W`, so
//!   the two ranges meet exactly, provided `W` is at or above the commit LSN of every
//!   transaction the snapshot sees. The snapshot can see transactions the replicator has not
//!   stored yet (they committed just before the hello), so the catch-up waits (`AwaitWatermark`)
//!   until the watermark reaches [`Stitch::handoff_watermark`]: with a lower `W`, such a
//!   transaction would come again after `up_to_date` as a live change, on top of the snapshot
//!   that already holds it, and `(W, MAX)` would be a resume point below data the client has.
//! * **Whole transactions (§4 `changes`).** A full page may end inside a transaction. If the page
//!   holds more than one transaction, the trailing one is held back and re-read by the next
//!   query; if the page is a single transaction it is sent with `last: false`, and the
//!   transaction is closed later, by its final part or, if it turns out to have ended exactly at
//!   the page boundary, by an empty `{"last": true, "ops": []}` part.
//! * **Consistent points (§4 `up_to_date`).** When a catch-up, or a live burst, has delivered
//!   everything up to `upto`, the client gets `up_to_date` at `(upto, MAX)` and the subscription
//!   is live: it reads the next page whenever the watermark moves past what was sent. A live
//!   subscription that finds nothing new stays silent.
//! * **Acks and backpressure (§3 `ack`, §6).** An ack must lie between the previous ack and the
//!   last position sent, else it gets a non-fatal `bad_request`; a new one becomes
//!   `PersistPosition` (positions are stored only from acks). At most `window` unacked
//!   `changes` frames that end at a transaction boundary are in flight (frames ending inside a
//!   transaction cannot be acked, see `on_page`).
//!
//! Left to the I/O layer, because they need the database or the token: the readiness gate; the
//! token's restriction of the shapes ([`crate::access`]) and the check of tables and columns
//! against the catalog; running the snapshot; shape filtering of change rows (it needs each
//! change's old row, which the subscription never sees: the I/O layer runs
//! [`crate::filter::filter_op`] on every loaded row and hands over `op: None` for a dropped one,
//! which keeps its position); a `must_refetch` in mid-session for a new generation or a changed
//! table, which ends the session; coalescing position writes; `status` messages.

use std::collections::VecDeque;

use crate::lsn::Lsn;
use crate::position::Position;
use crate::protocol::{
    ClientMessage, ErrorCode, ErrorMessage, Hello, RefetchReason, ServerMessage, WelcomeMode, WireOp, WireTransaction,
    PROTOCOL_VERSION,
};
use crate::shape::Shape;

/// What a subscription starts from: the engine's history at session start and the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionConfig {
    pub generation: u64,
    /// Durable watermark at session start.
    pub watermark: Lsn,
    /// History below this has been deleted (retention).
    pub horizon: Lsn,
    pub default_batch_rows: u32,
    pub max_batch_rows: u32,
    pub default_window: u32,
    /// Shapes the session may hold, `hello` and `subscribe` together.
    pub max_shapes: usize,
    /// Longest `hello.client_id`, in bytes.
    pub max_client_id_bytes: usize,
}

/// The data snapshot's identity, needed to stitch (docs/pgsync-protocol.md §5, snapshot → stream
/// handoff): the `pg_current_snapshot()` text and the watermark `h` read in the same MVCC
/// snapshot, and the WAL insert position read right after the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stitch {
    pub snapshot: String,
    pub snapshot_watermark: Lsn,
    /// `pg_current_wal_insert_lsn()`, read in the snapshot's first statement (so after the
    /// snapshot was taken): a transaction becomes visible only after its commit record is in
    /// the WAL, so every transaction the snapshot sees has a commit LSN below this.
    pub wal_position: Lsn,
}

impl Stitch {
    /// The watermark the catch-up must reach before it may end: at or above the commit LSN of
    /// every transaction visible in the snapshot (all of them are below `wal_position`), so
    /// that `up_to_date` at `(W, MAX)` and the plain rule `commit_lsn > W` after it never hand
    /// the client a transaction its snapshot already holds.
    pub fn handoff_watermark(&self) -> Lsn {
        Lsn(self.wal_position.0.saturating_sub(1)).max(self.snapshot_watermark)
    }
}

/// One `change_history` row, already converted for the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub position: Position,
    pub xid: String,
    pub commit_time: String,
    /// `None`: the I/O layer's shape filter dropped the op (`filter::filter_op`); the row still
    /// holds its position, so pages, transactions and acks stay the same for every client.
    pub op: Option<WireOp>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    pub after: Option<Position>,
    pub upto: Lsn,
    pub limit: u32,
    /// Present only for a new client's catch-up: add the xid filter of the snapshot → stream
    /// handoff (docs/pgsync-protocol.md §5).
    pub stitch: Option<Stitch>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Client(ClientMessage),
    /// The replicator's durable watermark moved.
    WatermarkAdvanced(Lsn),
    /// The I/O layer finished streaming `snapshot_*` frames for all shapes.
    SnapshotFinished(Stitch),
    /// Result of the outstanding `QueryPage`.
    PageLoaded(Vec<HistoryRow>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(ServerMessage),
    /// Run the shapes' snapshot in a REPEATABLE READ transaction, stream `snapshot_*` frames,
    /// then report `SnapshotFinished`.
    TakeSnapshot {
        shapes: Vec<Shape>,
    },
    QueryPage(PageQuery),
    /// Durably store the client's acked position (monotonic).
    PersistPosition(Position),
    /// Register the client (registry row keyed by token subject and `client_id`) with the
    /// position the subscription *accepted* as its starting point: `Some` for a catch-up, `None`
    /// for a client treated as new. Emitted only once the hello was decided, never for a refused
    /// one, so a position the subscription does not serve can never hold retention back.
    Register(Option<Position>),
    /// The snapshot handoff waits for the replicator's watermark to reach this LSN (see
    /// [`Stitch::handoff_watermark`]). The I/O layer makes the replication stream get there
    /// promptly even when nothing else is written (a logical message) and reports the
    /// watermark's moves as `WatermarkAdvanced`, as always.
    AwaitWatermark(Lsn),
    /// Close the socket (after sending what precedes this action).
    Close,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    AwaitHello,
    Snapshotting,
    /// The snapshot is sent; the watermark has not reached `stitch.handoff_watermark()` yet:
    /// the replicator has still to store transactions the snapshot saw.
    AwaitingHandoff {
        stitch: Stitch,
    },
    /// Catching up to a fixed `upto`; `stitch` set for a new client's first catch-up.
    CatchingUp {
        upto: Lsn,
        stitch: Option<Stitch>,
    },
    Live,
    Closed,
}

/// One client's subscription: see the module documentation.
#[derive(Debug)]
pub struct Subscription {
    cfg: SubscriptionConfig,
    state: State,
    watermark: Lsn,
    limit: u32,
    window: u32,
    shapes: Vec<Shape>,
    /// Last position sent to the client (or its starting position).
    sent: Option<Position>,
    /// Commit LSN of a transaction sent with `last: false` and not yet closed.
    open_partial: Option<Lsn>,
    /// `to` of each unacked `changes` frame.
    inflight: VecDeque<Position>,
    acked: Option<Position>,
    outstanding: Option<PageQuery>,
}

impl Subscription {
    pub fn new(cfg: SubscriptionConfig) -> Self {
        Subscription {
            watermark: cfg.watermark,
            limit: cfg.default_batch_rows.max(1),
            window: cfg.default_window.max(1),
            cfg,
            state: State::AwaitHello,
            shapes: Vec::new(),
            sent: None,
            open_partial: None,
            inflight: VecDeque::new(),
            acked: None,
            outstanding: None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn is_live(&self) -> bool {
        self.state == State::Live
    }

    /// The limits on what a client may make the server hold, checked before any work is done
    /// for a message: `Some(actions)` (a fatal error, then `Close`) if `msg` breaks one. The I/O
    /// layer calls this before it looks at a hello's shapes (catalog lookups); [`Self::handle`]
    /// applies it too, so the core never accepts what it refuses here.
    pub fn refuse(&mut self, msg: &ClientMessage) -> Option<Vec<Action>> {
        if self.state == State::Closed {
            return None;
        }
        let (code, message) = self.limit_violation(msg)?;
        Some(self.fail(code, &message, true))
    }

    fn limit_violation(&self, msg: &ClientMessage) -> Option<(ErrorCode, String)> {
        let (held, asked) = match msg {
            ClientMessage::Hello(h) => {
                if h.client_id.len() > self.cfg.max_client_id_bytes {
                    return Some((
                        ErrorCode::BadRequest,
                        format!(
                            "invalid hello: client_id is {} bytes, at most {} are allowed",
                            h.client_id.len(),
                            self.cfg.max_client_id_bytes
                        ),
                    ));
                }
                // A duplicate hello is refused anyway (non-fatal); it adds no shapes.
                if self.state != State::AwaitHello {
                    return None;
                }
                (0, h.shapes.len())
            }
            ClientMessage::Subscribe { shapes } => (self.shapes.len(), shapes.len()),
            _ => return None,
        };
        (held.saturating_add(asked) > self.cfg.max_shapes).then(|| {
            (
                ErrorCode::TooManyShapes,
                format!(
                    "{} shapes asked for ({held} held + {asked} new); this server allows at most {} per session",
                    held + asked,
                    self.cfg.max_shapes
                ),
            )
        })
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::Closed {
            return out;
        }
        match event {
            Event::Client(msg) => {
                if let Some(refused) = self.refuse(&msg) {
                    return refused;
                }
                self.on_client(msg, &mut out)
            }
            Event::WatermarkAdvanced(w) => {
                self.watermark = self.watermark.max(w);
                self.maybe_hand_off();
                self.maybe_query(&mut out);
            }
            Event::SnapshotFinished(stitch) => {
                if self.state != State::Snapshotting {
                    return self.fail(ErrorCode::Internal, "snapshot finished in wrong state", true);
                }
                let needed = stitch.handoff_watermark();
                self.state = State::AwaitingHandoff { stitch };
                self.maybe_hand_off();
                if matches!(self.state, State::AwaitingHandoff { .. }) {
                    out.push(Action::AwaitWatermark(needed));
                }
                self.maybe_query(&mut out);
            }
            Event::PageLoaded(rows) => self.on_page(rows, &mut out),
        }
        out
    }

    fn fail(&mut self, code: ErrorCode, message: &str, fatal: bool) -> Vec<Action> {
        let mut out = vec![Action::Send(ServerMessage::Error(ErrorMessage {
            code,
            message: message.to_owned(),
            retry_after_ms: None,
            fatal,
        }))];
        if fatal {
            self.state = State::Closed;
            out.push(Action::Close);
        }
        out
    }

    fn on_client(&mut self, msg: ClientMessage, out: &mut Vec<Action>) {
        match msg {
            ClientMessage::Hello(h) => {
                if self.state != State::AwaitHello {
                    out.extend(self.fail(ErrorCode::BadRequest, "duplicate hello", false));
                } else {
                    self.on_hello(h, out);
                }
            }
            ClientMessage::Ping { t } => out.push(Action::Send(ServerMessage::Pong { t })),
            ClientMessage::Ack { position } => self.on_ack(position, out),
            ClientMessage::Subscribe { .. } | ClientMessage::Unsubscribe { .. } => {
                out.extend(self.fail(ErrorCode::BadRequest, "subscribe/unsubscribe not supported yet", false))
            }
        }
    }

    fn on_hello(&mut self, h: Hello, out: &mut Vec<Action>) {
        if h.protocol != PROTOCOL_VERSION {
            out.extend(self.fail(ErrorCode::BadRequest, "unsupported protocol version", true));
            return;
        }
        let shapes: Result<Vec<Shape>, _> = h.shapes.iter().map(Shape::from_request).collect();
        self.shapes = match shapes {
            Ok(s) => s,
            Err(e) => {
                out.extend(self.fail(ErrorCode::ShapeInvalid, &e.to_string(), true));
                return;
            }
        };
        if let Some(rows) = h.max_batch_rows {
            self.limit = rows.clamp(1, self.cfg.max_batch_rows.max(1));
        }
        if let Some(w) = h.window {
            self.window = w.max(1);
        }
        let shape_ids: Vec<String> = h.shapes.iter().map(|s| s.id.clone()).collect();
        let refetch = match (h.position, h.generation) {
            (None, _) => None,
            (Some(_), g) if g != Some(self.cfg.generation) => Some(RefetchReason::GenerationChanged),
            // Every position this server hands out is at or below its watermark, and the
            // watermark never moves back within a generation (after a restart, sessions are
            // served only once the watermark passed the WAL end seen at start-up, which is
            // above anything issued before). A position above it was not issued by this
            // history: serving it would move the client's position backwards or skip changes.
            (Some(p), _) if p.lsn > self.watermark => {
                let message = format!(
                    "position (lsn {}, seq {}) is ahead of this server's history (watermark {}, generation {}): it was not \
                     issued by this server; drop local data and reconnect with position null",
                    p.lsn, p.seq, self.watermark, self.cfg.generation
                );
                out.extend(self.fail(ErrorCode::PositionAhead, &message, true));
                return;
            }
            // A position at the horizon is still fine: rows above it are all retained.
            (Some(p), _) if p.lsn < self.cfg.horizon => Some(RefetchReason::PositionTooOld),
            (Some(p), _) => {
                self.sent = Some(p);
                self.acked = Some(p);
                out.push(Action::Send(ServerMessage::Welcome {
                    generation: self.cfg.generation,
                    mode: WelcomeMode::Catchup,
                    watermark: self.watermark,
                }));
                // Accepted: only now may the position hold retention back.
                out.push(Action::Register(Some(p)));
                self.state = State::CatchingUp { upto: self.watermark, stitch: None };
                self.maybe_query(out);
                return;
            }
        };
        if let Some(reason) = refetch {
            out.push(Action::Send(ServerMessage::MustRefetch { reason, shape_ids }));
        }
        out.push(Action::Send(ServerMessage::Welcome {
            generation: self.cfg.generation,
            mode: WelcomeMode::Snapshot,
            watermark: self.watermark,
        }));
        // Treated as new: whatever position it sent (too old, another generation) is not kept.
        out.push(Action::Register(None));
        self.state = State::Snapshotting;
        out.push(Action::TakeSnapshot { shapes: self.shapes.clone() });
    }

    fn on_ack(&mut self, position: Position, out: &mut Vec<Action>) {
        let in_range = self.sent.is_some_and(|s| position <= s) && self.acked.is_none_or(|a| position >= a);
        if !in_range {
            out.extend(self.fail(ErrorCode::BadRequest, "ack outside the delivered range", false));
            return;
        }
        while self.inflight.front().is_some_and(|p| *p <= position) {
            self.inflight.pop_front();
        }
        if self.acked != Some(position) {
            self.acked = Some(position);
            out.push(Action::PersistPosition(position));
        }
        self.maybe_query(out);
    }

    /// Start the stitched catch-up once the watermark covers every transaction the snapshot
    /// saw. Its `upto` is the watermark at that moment: the stitch filter is exact on any range,
    /// and `upto` must be at or above the handoff watermark (see [`Stitch::handoff_watermark`]).
    fn maybe_hand_off(&mut self) {
        if let State::AwaitingHandoff { stitch } = &self.state {
            if self.watermark >= stitch.handoff_watermark() {
                self.state = State::CatchingUp { upto: self.watermark, stitch: Some(stitch.clone()) };
            }
        }
    }

    /// Issue the next page query if the state wants one and the window allows it.
    fn maybe_query(&mut self, out: &mut Vec<Action>) {
        if self.outstanding.is_some() || self.inflight.len() >= self.window as usize {
            return;
        }
        let (upto, stitch) = match &self.state {
            State::CatchingUp { upto, stitch } => (*upto, stitch.clone()),
            State::Live if self.sent.is_some_and(|s| s.lsn < self.watermark) || self.open_partial.is_some() => {
                (self.watermark, None)
            }
            _ => return,
        };
        let q = PageQuery { after: self.sent, upto, limit: self.limit, stitch };
        self.outstanding = Some(q.clone());
        out.push(Action::QueryPage(q));
    }

    fn on_page(&mut self, rows: Vec<HistoryRow>, out: &mut Vec<Action>) {
        let Some(q) = self.outstanding.take() else {
            out.extend(self.fail(ErrorCode::Internal, "page without a query", true));
            return;
        };
        // The query result must honour the keyset contract; otherwise we would gap or duplicate.
        let mut prev = q.after;
        for r in &rows {
            let ordered = prev.is_none_or(|p| r.position > p);
            if !ordered || r.position.lsn > q.upto || r.op.as_ref().is_some_and(|op| op.seq() != r.position.seq) {
                out.extend(self.fail(ErrorCode::Internal, "page violates keyset order", true));
                return;
            }
            prev = Some(r.position);
        }
        if rows.len() > q.limit as usize {
            out.extend(self.fail(ErrorCode::Internal, "page larger than its limit", true));
            return;
        }
        let full = rows.len() == q.limit as usize;

        // Group rows into transactions (consecutive rows with the same commit LSN).
        let mut groups: Vec<Vec<HistoryRow>> = Vec::new();
        for r in rows {
            match groups.last_mut() {
                Some(g) if g[0].position.lsn == r.position.lsn => g.push(r),
                _ => groups.push(vec![r]),
            }
        }
        let mut txns: Vec<WireTransaction> = Vec::new();
        if let Some(open) = self.open_partial {
            if groups.first().is_none_or(|g| g[0].position.lsn != open) {
                // The partial transaction ended exactly at the previous page boundary.
                txns.push(WireTransaction {
                    lsn: open,
                    xid: String::new(),
                    commit_time: String::new(),
                    last: true,
                    ops: vec![],
                });
                self.open_partial = None;
            }
        }
        let mut trailing_partial = false;
        if full {
            if groups.len() > 1 {
                groups.pop(); // held back, re-read by the next query
            } else {
                trailing_partial = true;
            }
        }
        let n = groups.len();
        let mut to = self.sent;
        for (i, g) in groups.into_iter().enumerate() {
            let last = !(trailing_partial && i + 1 == n);
            let head = &g[0];
            let (lsn, xid, commit_time) = (head.position.lsn, head.xid.clone(), head.commit_time.clone());
            to = g.last().map(|r| r.position);
            txns.push(WireTransaction {
                lsn,
                xid,
                commit_time,
                last,
                ops: g.into_iter().filter_map(|r| r.op).collect(),
            });
            self.open_partial = if last { None } else { Some(lsn) };
        }
        let sent_any = !txns.is_empty();
        if sent_any {
            if let Some(to) = to {
                out.push(Action::Send(ServerMessage::Changes { from: self.sent, to, txns }));
                self.sent = Some(to);
                // Acks name transaction ends, so a frame ending inside a transaction cannot be
                // acked until the transaction's last part: counting it against the window would
                // deadlock any transaction larger than window × page. The client has to buffer
                // the whole transaction anyway to apply it atomically.
                if self.open_partial.is_none() {
                    self.inflight.push_back(to);
                }
            }
        }
        if !full && self.open_partial.is_none() {
            // Everything up to `upto` is delivered: a consistent point.
            let position = Position::end_of(q.upto);
            self.sent = Some(position);
            // A live subscription that found nothing new moves on silently: answering every empty
            // watermark advance with `up_to_date` would make clients ack, the position write
            // would produce WAL, the walsender's keepalive would advance the watermark again,
            // and so on forever.
            let silent = self.state == State::Live && !sent_any;
            if !silent {
                out.push(Action::Send(ServerMessage::UpToDate { position, watermark: q.upto }));
            }
            self.state = State::Live;
        }
        self.maybe_query(out);
    }
}

#[cfg(test)]
#[path = "subscription_tests.rs"]
mod tests;
