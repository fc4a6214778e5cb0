//! One client's subscription to the change feed: the sans-IO state machine behind an `/api/sync`
//! session. Events in (a client's text frame, the replicator's published state, the catalog's
//! answer, a finished snapshot, a loaded page, a failed I/O step), actions out (send a frame,
//! look up columns, take a snapshot, read a page, wait for the watermark, register the client,
//! persist an acked position, close, abort). The `SessionTask` (`session_task.rs`) performs the
//! actions and feeds their results back; it decides nothing about the protocol. Sections below
//! are those of docs/pgsync-protocol.md.
//!
//! * **Readiness (§9).** Until the replicator has caught up ([`FeedState::caught_up`]) the
//!   client gets `status: starting` and its frames wait, at most [`MAX_EARLY_MESSAGES`] of them
//!   and [`MAX_EARLY_BYTES`] together (more is a fatal `bad_request`: nothing legitimate sends
//!   that much before its hello is answered). A replicator that stops ends the session
//!   ([`Action::Abort`]).
//! * **The replicator in mid-session.** A new history generation ends the session with
//!   `must_refetch{generation_changed}`; a lost replication connection is reported as
//!   `status: replication_reconnecting`, its return as `status: ok`; the retention horizon and
//!   the watermark are tracked from every [`Event::Feed`].
//! * **Frames.** A frame that does not parse before the hello ends the session with a fatal
//!   `bad_request` naming the offending field ([`crate::protocol::explain_bad_hello`]); after
//!   the hello it gets a non-fatal `bad_request`.
//! * **Limits first.** The per-session limits (§12: shapes, `hello` and `subscribe` together;
//!   `client_id` length) are checked before anything is done for a message; a breach is a fatal
//!   `too_many_shapes` or `bad_request`.
//! * **The hello** (`hello.rs`). The token's [`Access`] is ANDed into its shapes (a table the
//!   token does not open is a fatal `forbidden`); an unknown protocol version is a fatal
//!   `bad_request`; a `where` that does not parse, a table that is not synced or a column the
//!   table does not have (asked of the catalog with [`Action::LookUpColumns`]) is a fatal
//!   `shape_invalid`; `max_batch_rows` is clamped, `window` is at least 1. The position decides
//!   the mode (§2, §4 `welcome`, §7): none → snapshot; from another generation →
//!   `must_refetch{generation_changed}`, then snapshot; above the watermark → fatal
//!   `position_ahead` (§10 item 7); below the retention horizon →
//!   `must_refetch{position_too_old}`, then snapshot; otherwise catch-up from that position. A
//!   second hello, `subscribe` and `unsubscribe` get a non-fatal `bad_request`.
//! * **Registration (§8).** `Register` is emitted once the hello is decided, with the position
//!   accepted for catch-up or `None` for a client treated as new; never for a refused hello, so a
//!   position the subscription does not serve cannot hold retention back.
//! * **No gap, no duplicate (§5)** (`pages.rs`). Every page query is keyset `(commit_lsn, seq) >
//!   after AND commit_lsn <= upto ORDER BY commit_lsn, seq LIMIT limit`, where `after` is exactly
//!   the last position sent. Positions only move forward, and each page is checked against its
//!   query (order, `upto`, `limit`): a violation is a fatal `internal`, never a gap.
//! * **Shape filtering (§10 item 5).** Each loaded change goes through [`crate::filter::filter_op`] with the row
//!   before it; a dropped op keeps its position, so pages, transactions and acks are the same for
//!   every client. A schema change of a subscribed table in a page ends the session with
//!   `must_refetch{schema_changed}` for the shapes on that table.
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
//!   `PersistPosition` (positions are stored only from acks; the task coalesces the writes). At
//!   most `window` unacked `changes` frames that end at a transaction boundary are in flight
//!   (frames ending inside a transaction cannot be acked, see `on_page`).
//! * **Failed I/O.** A catalog lookup, snapshot or page query that failed
//!   ([`Event::Failed`]) ends the session with a fatal `internal` that says which step failed.

mod hello;
mod pages;

use std::collections::VecDeque;

use crate::access::Access;
use crate::lsn::Lsn;
use crate::position::Position;
use crate::protocol::{
    ClientMessage, ErrorCode, ErrorMessage, Hello, RefetchReason, ServerMessage, ServerState, ShapeRequest, WireOp,
    WireTransaction,
};
use crate::raw_row::RawRow;
use crate::replicator::{FeedState, Phase};
use crate::shape::Shape;

/// Frames a client may send before the server is ready (they are answered once it is).
pub const MAX_EARLY_MESSAGES: usize = 16;
/// Bytes those early frames may hold together (a hello with 100 shapes fits many times over).
pub const MAX_EARLY_BYTES: usize = 1 << 20;

/// Fixed limits and the server's synced tables; the replicator's state arrives as events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// Tables the server syncs (`schema.table`); a shape on any other is `shape_invalid`.
    pub tables: Vec<String>,
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
    /// `None`: the shape filter dropped the op; the row still holds its position, so pages,
    /// transactions and acks stay the same for every client.
    pub op: Option<WireOp>,
}

/// One item of a loaded page.
#[derive(Debug, Clone, PartialEq)]
pub enum PageItem {
    /// A change, with the complete row before it (`old`, stored for UPDATE/DELETE under
    /// REPLICA IDENTITY FULL): the shape filter needs it (see [`crate::filter`]).
    Row(HistoryRow, Option<RawRow>),
    /// A schema change of a subscribed table.
    SchemaChanged { table: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageQuery {
    pub after: Option<Position>,
    pub upto: Lsn,
    pub limit: u32,
    /// Present only for a new client's catch-up: add the xid filter of the snapshot → stream
    /// handoff (docs/pgsync-protocol.md §5).
    pub stitch: Option<Stitch>,
    /// The subscribed tables: rows of others are not read.
    pub tables: Vec<String>,
}

/// What the registry keeps of a client (docs/pgsync-protocol.md §8).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub client_id: String,
    pub generation: u64,
    /// The hello's shapes (after the token's restriction), as the client asked for them.
    pub shapes: Vec<ShapeRequest>,
    /// The position the subscription *accepted* as its starting point: `Some` for a catch-up,
    /// `None` for a client treated as new.
    pub position: Option<Position>,
}

/// An I/O step the subscription asked for, and that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoStep {
    Catalog,
    Snapshot,
    History,
    /// [`Action::ProbeWal`].
    Wal,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A text frame from the client, as received: the subscription parses it.
    ClientText(String),
    /// A parsed client message (what `ClientText` becomes once it parses).
    Client(ClientMessage),
    /// The replicator's published state; the task sends it at the start and on every change.
    Feed(FeedState),
    /// The answer to [`Action::LookUpColumns`]: each asked table's column names.
    Columns(Vec<(String, Vec<String>)>),
    /// The answer to [`Action::ProbeWal`]: the end of the WAL when the probe ran.
    WalPosition(Lsn),
    /// The I/O layer finished streaming `snapshot_*` frames for all shapes.
    SnapshotFinished(Stitch),
    /// Result of the outstanding `QueryPage`.
    PageLoaded(Vec<PageItem>),
    /// An action's I/O failed; `detail` is told to the client.
    Failed { step: IoStep, detail: String },
}

/// Why the subscription ends a session without a message to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Abort {
    #[error("the change feed engine stopped")]
    EngineStopped,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Send(ServerMessage),
    /// Read these tables' columns from the catalog and answer with [`Event::Columns`].
    LookUpColumns(Vec<String>),
    /// Run the shapes' snapshot in a REPEATABLE READ transaction, stream `snapshot_*` frames
    /// (at most `batch_rows` rows each), then report `SnapshotFinished`.
    TakeSnapshot {
        /// (shape id, shape), in hello order.
        shapes: Vec<(String, Shape)>,
        batch_rows: u32,
    },
    QueryPage(PageQuery),
    /// Durably store the client's acked position (monotonic).
    PersistPosition(Position),
    /// Register the client (registry row keyed by token subject and `client_id`). Emitted only
    /// once the hello was decided, never for a refused one, so a position the subscription does
    /// not serve can never hold retention back.
    Register(Registration),
    /// The snapshot handoff waits for the replicator's watermark to reach this LSN (see
    /// [`Stitch::handoff_watermark`]). The I/O layer makes the replication stream get there
    /// promptly even when nothing else is written (a logical message) and reports the
    /// watermark's moves as `Feed`, as always.
    AwaitWatermark(Lsn),
    /// The hello's position is above the watermark. Write a logical message (so the watermark,
    /// wherever the replicator runs, passes it promptly) and answer with [`Event::WalPosition`]:
    /// the message's LSN, or the WAL insert position if no message may be written. A position
    /// at or above it was never issued; one below it is served once the watermark reaches it.
    ProbeWal,
    /// Close the socket (after sending what precedes this action).
    Close,
    /// End the session without telling the client anything more (the edge closes with 1011).
    Abort(Abort),
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// The replicator has not caught up yet: client frames wait in `early`.
    Starting,
    AwaitHello,
    /// The hello is accepted so far; its tables' columns are being looked up.
    CheckingColumns {
        hello: Hello,
    },
    /// The hello's position is above the watermark (it may come from an instance whose
    /// watermark is ahead of this one's, docs/pgsync-protocol.md §14): decided again when the
    /// watermark moves; `wal_end` is the answer to [`Action::ProbeWal`] once it arrived.
    AwaitingPosition {
        hello: Hello,
        wal_end: Option<Lsn>,
    },
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
    /// What the token lets this client read; applied to the hello's shapes.
    access: Access,
    state: State,
    /// Client frames that arrived while `Starting`, and their bytes.
    early: VecDeque<String>,
    early_bytes: usize,
    /// `status: starting` was sent.
    told_starting: bool,
    /// The replicator's phase as last reported to the client.
    phase: Phase,
    /// The history generation this session serves (fixed once ready).
    generation: u64,
    horizon: Lsn,
    watermark: Lsn,
    limit: u32,
    window: u32,
    /// (shape id, shape) in hello order, after the token's restriction.
    shapes: Vec<(String, Shape)>,
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
    /// A subscription that waits for the replicator's state ([`Event::Feed`]) before it serves.
    pub fn new(cfg: SubscriptionConfig, access: Access) -> Self {
        Subscription {
            limit: cfg.default_batch_rows.max(1),
            window: cfg.default_window.max(1),
            cfg,
            access,
            state: State::Starting,
            early: VecDeque::new(),
            early_bytes: 0,
            told_starting: false,
            phase: Phase::Starting,
            generation: 0,
            horizon: Lsn::ZERO,
            watermark: Lsn::ZERO,
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

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.state == State::Closed {
            return out;
        }
        match event {
            Event::ClientText(text) => self.on_text(text, &mut out),
            Event::Client(msg) => self.on_client(msg, &mut out),
            Event::Feed(feed) => self.on_feed(feed, &mut out),
            Event::Columns(columns) => self.on_columns(columns, &mut out),
            Event::WalPosition(end) => {
                if let State::AwaitingPosition { hello, wal_end: None } = &self.state {
                    let hello = hello.clone();
                    self.decide_position(hello, Some(end), &mut out);
                }
            }
            Event::SnapshotFinished(stitch) => {
                if self.state != State::Snapshotting {
                    return self.fail(ErrorCode::Internal, "snapshot finished in wrong state", true);
                }
                // The catch-up must reach at least h (docs/pgsync-protocol.md §5).
                self.watermark = self.watermark.max(stitch.snapshot_watermark);
                let needed = stitch.handoff_watermark();
                self.state = State::AwaitingHandoff { stitch };
                self.maybe_hand_off();
                if matches!(self.state, State::AwaitingHandoff { .. }) {
                    out.push(Action::AwaitWatermark(needed));
                }
                self.maybe_query(&mut out);
            }
            Event::PageLoaded(items) => self.on_page(items, &mut out),
            Event::Failed { step, detail } => {
                let what = match step {
                    IoStep::Catalog => "reading the catalog failed",
                    IoStep::Snapshot => "snapshot failed",
                    IoStep::History => "reading history failed",
                    IoStep::Wal => "reading the WAL position failed",
                };
                out.extend(self.fail_retry(ErrorCode::Internal, &format!("{what}: {detail}")));
            }
        }
        out
    }

    /// The replicator's state: readiness, then its phase, generation, horizon and watermark.
    fn on_feed(&mut self, feed: FeedState, out: &mut Vec<Action>) {
        if self.state == State::Starting {
            if feed.phase == Phase::Stopped {
                self.abort(Abort::EngineStopped, out);
                return;
            }
            if !feed.caught_up {
                if !self.told_starting {
                    self.told_starting = true;
                    out.push(Action::Send(ServerMessage::Status { state: ServerState::Starting }));
                }
                return;
            }
            self.generation = feed.generation;
            self.horizon = feed.horizon;
            self.watermark = feed.watermark;
            self.phase = feed.phase;
            self.state = State::AwaitHello;
            while let Some(text) = self.early.pop_front() {
                self.on_text(text, out);
                if self.state == State::Closed {
                    return;
                }
            }
            self.early_bytes = 0;
            return;
        }
        if feed.generation != self.generation && feed.generation != 0 {
            let shape_ids = self.shapes.iter().map(|(id, _)| id.clone()).collect();
            out.push(Action::Send(ServerMessage::MustRefetch { reason: RefetchReason::GenerationChanged, shape_ids }));
            self.state = State::Closed;
            out.push(Action::Close);
            return;
        }
        if feed.phase != self.phase {
            // Following another instance and replicating are the same for a client: a takeover
            // is silent, only a lost connection (either role's) and its return are told.
            let status = match (&self.phase, &feed.phase) {
                (_, Phase::Reconnecting { .. }) => Some(ServerState::ReplicationReconnecting),
                (Phase::Reconnecting { .. }, Phase::Streaming | Phase::Following) => Some(ServerState::Ok),
                _ => None,
            };
            // A new error text while reconnecting is the same state for the client.
            let repeated =
                matches!((&self.phase, &feed.phase), (Phase::Reconnecting { .. }, Phase::Reconnecting { .. }));
            self.phase = feed.phase.clone();
            if let Some(state) = status.filter(|_| !repeated) {
                out.push(Action::Send(ServerMessage::Status { state }));
            }
            if feed.phase == Phase::Stopped {
                self.abort(Abort::EngineStopped, out);
                return;
            }
        }
        self.horizon = self.horizon.max(feed.horizon);
        if feed.watermark > self.watermark {
            self.watermark = feed.watermark;
            if let State::AwaitingPosition { hello, wal_end } = &self.state {
                let (hello, wal_end) = (hello.clone(), *wal_end);
                self.decide_position(hello, wal_end, out);
                return;
            }
            self.maybe_hand_off();
            self.maybe_query(out);
        }
    }

    fn abort(&mut self, why: Abort, out: &mut Vec<Action>) {
        self.state = State::Closed;
        out.push(Action::Abort(why));
    }

    fn fail(&mut self, code: ErrorCode, message: &str, fatal: bool) -> Vec<Action> {
        self.fail_with(code, message, fatal, None)
    }

    /// A fatal error the client may retry after a second (the server's own trouble).
    fn fail_retry(&mut self, code: ErrorCode, message: &str) -> Vec<Action> {
        self.fail_with(code, message, true, Some(1000))
    }

    fn fail_with(&mut self, code: ErrorCode, message: &str, fatal: bool, retry_after_ms: Option<u64>) -> Vec<Action> {
        let mut out = vec![Action::Send(ServerMessage::Error(ErrorMessage {
            code,
            message: message.to_owned(),
            retry_after_ms,
            fatal,
        }))];
        if fatal {
            self.state = State::Closed;
            out.push(Action::Close);
        }
        out
    }
}

#[cfg(test)]
mod tests;
