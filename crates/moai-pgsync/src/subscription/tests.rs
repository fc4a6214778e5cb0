//! Subscription tests: a simulated `change_history` answers page queries, a simulated client
//! applies and acks; we check the client ends with every change exactly once, in order, in
//! whole transactions, for many page sizes and windows.

use super::*;
use crate::protocol::{Row, ShapeRequest, WelcomeMode};

/// A test's server: the subscription's limits and the replicator's state when it is ready.
#[derive(Clone)]
struct TestCfg {
    cfg: SubscriptionConfig,
    feed: FeedState,
}

impl std::ops::Deref for TestCfg {
    type Target = SubscriptionConfig;
    fn deref(&self) -> &SubscriptionConfig {
        &self.cfg
    }
}

impl std::ops::DerefMut for TestCfg {
    fn deref_mut(&mut self) -> &mut SubscriptionConfig {
        &mut self.cfg
    }
}

fn feed(watermark: u64) -> FeedState {
    FeedState { phase: Phase::Streaming, generation: 7, watermark: Lsn(watermark), horizon: Lsn(0x10), caught_up: true }
}

fn cfg(watermark: u64) -> TestCfg {
    TestCfg {
        cfg: SubscriptionConfig {
            tables: vec!["public.todos".into()],
            default_batch_rows: 1000,
            max_batch_rows: 5000,
            default_window: 4,
            max_shapes: 100,
            max_client_id_bytes: 256,
        },
        feed: feed(watermark),
    }
}

/// The columns of the catalog these tests answer with.
fn todos_columns() -> Vec<(String, Vec<String>)> {
    vec![("public.todos".into(), vec!["id".into(), "done".into(), "title".into(), "owner".into()])]
}

/// A subscription whose catalog lookups are answered at once with [`todos_columns`], as the
/// session task does; the lookups are left out of the returned actions.
struct Sub(Subscription);

impl Sub {
    fn handle(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        for a in self.0.handle(ev) {
            if let Action::LookUpColumns(_) = a {
                out.extend(self.0.handle(Event::Columns(todos_columns())));
            } else {
                out.push(a);
            }
        }
        out
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn is_live(&self) -> bool {
        self.0.is_live()
    }
}

/// A subscription on a ready server (the replicator caught up, at `c.feed`).
fn sub(c: TestCfg) -> Sub {
    let mut s = Subscription::new(c.cfg, Access::all());
    assert!(s.handle(Event::Feed(c.feed)).is_empty());
    Sub(s)
}

/// The replicator's watermark moved to `w`.
fn watermark(w: Lsn) -> Event {
    Event::Feed(feed(w.0))
}

/// Rows as a page, each with the row before it as the history stores it (the tests' shapes
/// match every old row: `done` is false).
fn page(rows: Vec<HistoryRow>) -> Vec<PageItem> {
    rows.into_iter()
        .map(|r| {
            let mut old = match &r.op {
                Some(WireOp::Delete { key, .. }) => key.to_row(),
                _ => Row::new(),
            };
            old.insert("done".into(), false.into());
            PageItem::Row(r, Some(RawRow::from_row(&old)))
        })
        .collect()
}

fn hello(position: Option<Position>, generation: Option<u64>, batch: u32, window: u32) -> Event {
    Event::Client(ClientMessage::Hello(Hello {
        protocol: 1,
        client_id: "c1".into(),
        generation,
        position,
        shapes: vec![ShapeRequest {
            id: "todos".into(),
            table: "public.todos".into(),
            columns: None,
            where_: Some("done = false".into()),
        }],
        auth: None,
        max_batch_rows: Some(batch),
        window: Some(window),
    }))
}

/// History: transactions at commit LSNs 0x100, 0x200, ... with the given sizes.
fn history(sizes: &[u32]) -> Vec<HistoryRow> {
    let mut rows = Vec::new();
    for (t, &n) in sizes.iter().enumerate() {
        let lsn = Lsn(0x100 * (t as u64 + 1));
        for seq in 0..n {
            let mut key = Row::new();
            key.insert("id".into(), (t as u64 * 10_000 + u64::from(seq)).into());
            rows.push(HistoryRow {
                position: Position::new(lsn, seq),
                xid: format!("{}", 500 + t),
                commit_time: "2026-01-01T00:00:00.000Z".into(),
                op: Some(WireOp::Delete { seq, table: "public.todos".into(), key: key.into() }),
            });
        }
    }
    rows
}

fn answer(h: &[HistoryRow], q: &PageQuery) -> Vec<HistoryRow> {
    h.iter()
        .filter(|r| q.after.is_none_or(|a| r.position > a) && r.position.lsn <= q.upto)
        // The stitch filter itself runs in SQL; here "visible in snapshot" = committed below the
        // WAL position read in the snapshot.
        .filter(|r| q.stitch.as_ref().is_none_or(|s| r.position.lsn >= s.wal_position))
        .take(q.limit as usize)
        .cloned()
        .collect()
}

/// A client that applies `changes` only when a transaction's `last` part arrived.
#[derive(Default)]
struct Client {
    applied: Vec<(Position, u32)>, // (txn lsn + seq, op count of that txn)
    pending: Vec<(Lsn, Vec<WireOp>)>,
    up_to_date: Vec<Position>,
    acks: Vec<Position>,
}

impl Client {
    fn receive(&mut self, msg: &ServerMessage) {
        match msg {
            ServerMessage::Changes { to, txns, .. } => {
                for t in txns {
                    match self.pending.last_mut() {
                        Some((l, ops)) if *l == t.lsn => ops.extend(t.ops.iter().cloned()),
                        _ => {
                            assert!(self.pending.is_empty(), "a new txn started while {:?} was open", self.pending);
                            self.pending.push((t.lsn, t.ops.clone()));
                        }
                    }
                    if t.last {
                        let (lsn, ops) = self.pending.pop().unwrap();
                        let n = ops.len() as u32;
                        for op in ops {
                            self.applied.push((Position::new(lsn, op.seq()), n));
                        }
                    }
                }
                if self.pending.is_empty() {
                    self.acks.push(*to);
                }
            }
            ServerMessage::UpToDate { position, .. } => {
                assert!(self.pending.is_empty(), "up_to_date inside a transaction");
                self.up_to_date.push(*position);
                self.acks.push(*position);
            }
            _ => {}
        }
    }
}

/// The snapshot of [`drive`]: it sees the transactions up to 0x100, which the history holds.
fn stitch() -> Stitch {
    Stitch { snapshot: "500:510:".into(), snapshot_watermark: Lsn(0x100), wal_position: Lsn(0x101) }
}

/// Drive subscription + history + client until quiescent. Returns the actions seen.
fn drive(s: &mut Sub, first: Event, h: &[HistoryRow], c: &mut Client, ack: bool) -> Vec<Action> {
    drive_with(s, first, h, c, ack, &stitch())
}

/// [`drive`], with the snapshot a `TakeSnapshot` produces.
fn drive_with(
    s: &mut Sub,
    first: Event,
    h: &[HistoryRow],
    c: &mut Client,
    ack: bool,
    snapshot: &Stitch,
) -> Vec<Action> {
    let mut seen = Vec::new();
    let mut queue = VecDeque::from([first]);
    while let Some(ev) = queue.pop_front() {
        for a in s.handle(ev) {
            match &a {
                Action::QueryPage(q) => queue.push_back(Event::PageLoaded(page(answer(h, q)))),
                Action::Send(m) => c.receive(m),
                Action::TakeSnapshot { .. } => queue.push_back(Event::SnapshotFinished(snapshot.clone())),
                _ => {}
            }
            seen.push(a);
        }
        if ack && queue.is_empty() {
            for p in c.acks.drain(..) {
                queue.push_back(Event::Client(ClientMessage::Ack { position: p }));
            }
        }
    }
    seen
}

fn todos() -> Vec<String> {
    vec!["public.todos".into()]
}

fn sizes() -> Vec<u32> {
    vec![3, 1, 17, 2, 40, 1, 5]
}

#[test]
fn catchup_delivers_every_change_exactly_once_for_any_page_size() {
    let h = history(&sizes());
    for limit in [1, 2, 3, 4, 5, 16, 17, 18, 40, 41, 1000] {
        for window in [1, 2, 4] {
            let mut s = sub(cfg(0x700));
            let mut c = Client::default();
            let start = Position::new(Lsn(0x100), 2); // already has txn 0x100
            drive(&mut s, hello(Some(start), Some(7), limit, window), &h, &mut c, true);
            let want: Vec<Position> = h.iter().map(|r| r.position).filter(|p| *p > start).collect();
            let got: Vec<Position> = c.applied.iter().map(|(p, _)| *p).collect();
            assert_eq!(got, want, "limit {limit} window {window}");
            // Each transaction applied whole: the op count seen equals its real size.
            for (p, n) in &c.applied {
                let real = h.iter().filter(|r| r.position.lsn == p.lsn).count() as u32;
                assert_eq!(*n, real, "txn {} split, limit {limit}", p.lsn);
            }
            assert_eq!(c.up_to_date, vec![Position::end_of(Lsn(0x700))]);
            assert!(s.is_live());
        }
    }
}

#[test]
fn new_client_snapshot_then_stitched_catchup_then_live_without_gap() {
    let h = history(&sizes());
    let mut s = sub(cfg(0x400));
    let mut c = Client::default();
    let actions = drive(&mut s, hello(None, None, 4, 2), &h, &mut c, true);
    assert!(matches!(&actions[0], Action::Send(ServerMessage::Welcome { mode: WelcomeMode::Snapshot, .. })));
    assert!(matches!(&actions[1], Action::Register(r) if r.position.is_none()));
    assert!(matches!(&actions[2], Action::TakeSnapshot { shapes, .. } if shapes.len() == 1));
    let first_query = actions.iter().find_map(|a| match a {
        Action::QueryPage(q) => Some(q.clone()),
        _ => None,
    });
    assert_eq!(
        first_query,
        Some(PageQuery { after: None, upto: Lsn(0x400), limit: 4, stitch: Some(stitch()), tables: todos() })
    );
    // Stitched catch-up: everything after the snapshot's h up to W.
    let got: Vec<Position> = c.applied.iter().map(|(p, _)| *p).collect();
    let want: Vec<Position> =
        h.iter().map(|r| r.position).filter(|p| p.lsn > Lsn(0x100) && p.lsn <= Lsn(0x400)).collect();
    assert_eq!(got, want);
    assert_eq!(c.up_to_date, vec![Position::end_of(Lsn(0x400))]);

    // Live: the first plain query starts exactly after W, with no stitch.
    let actions = drive(&mut s, watermark(Lsn(0x700)), &h, &mut c, true);
    let q = actions.iter().find_map(|a| match a {
        Action::QueryPage(q) => Some(q.clone()),
        _ => None,
    });
    assert_eq!(
        q,
        Some(PageQuery {
            after: Some(Position::end_of(Lsn(0x400))),
            upto: Lsn(0x700),
            limit: 4,
            stitch: None,
            tables: todos()
        })
    );
    let got: Vec<Position> = c.applied.iter().map(|(p, _)| *p).collect();
    let want: Vec<Position> = h.iter().map(|r| r.position).filter(|p| p.lsn > Lsn(0x100)).collect();
    assert_eq!(got, want, "no gap and no duplicate across the handoff");
    assert_eq!(c.up_to_date.last(), Some(&Position::end_of(Lsn(0x700))));
}

/// The snapshot can see transactions the replicator has not stored yet: they committed just
/// before the hello. The catch-up must not end (`up_to_date`) below them, or they come again
/// as live changes after it, on top of the snapshot that holds them (seen as rows inserted
/// before the hello arriving in `changes` under load).
#[test]
fn handoff_waits_until_the_history_holds_what_the_snapshot_saw() {
    let h = history(&sizes());
    // The history holds up to 0x300; the snapshot sees every commit up to 0x500.
    let snapshot = Stitch { snapshot: "505:505:".into(), snapshot_watermark: Lsn(0x300), wal_position: Lsn(0x5a0) };
    assert_eq!(snapshot.handoff_watermark(), Lsn(0x59f));
    let mut s = sub(cfg(0x300));
    let mut c = Client::default();
    let actions = drive_with(&mut s, hello(None, None, 4, 2), &h, &mut c, true, &snapshot);
    assert!(actions.contains(&Action::AwaitWatermark(Lsn(0x59f))), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::QueryPage(_))), "no catch-up yet: {actions:?}");
    assert!(c.up_to_date.is_empty() && c.applied.is_empty());

    // The replicator stored 0x400: still below what the snapshot saw.
    let actions = drive_with(&mut s, watermark(Lsn(0x400)), &h, &mut c, true, &snapshot);
    assert!(actions.is_empty(), "{actions:?}");
    // Acks and pings are still answered while the subscription waits.
    let actions = drive_with(&mut s, Event::Client(ClientMessage::Ping { t: 3 }), &h, &mut c, true, &snapshot);
    assert_eq!(actions, vec![Action::Send(ServerMessage::Pong { t: 3 })]);

    // Past it (0x600 committed after the snapshot): the stitched catch-up runs up to there.
    let actions = drive_with(&mut s, watermark(Lsn(0x600)), &h, &mut c, true, &snapshot);
    let first_query = actions.iter().find_map(|a| match a {
        Action::QueryPage(q) => Some(q.clone()),
        _ => None,
    });
    assert_eq!(
        first_query,
        Some(PageQuery { after: None, upto: Lsn(0x600), limit: 4, stitch: Some(snapshot.clone()), tables: todos() })
    );
    assert_eq!(c.up_to_date, vec![Position::end_of(Lsn(0x600))]);

    // Live from there: every transaction the snapshot did not see, exactly once.
    drive_with(&mut s, watermark(Lsn(0x700)), &h, &mut c, true, &snapshot);
    let got: Vec<Position> = c.applied.iter().map(|(p, _)| *p).collect();
    let want: Vec<Position> = h.iter().map(|r| r.position).filter(|p| p.lsn >= Lsn(0x600)).collect();
    assert_eq!(got, want, "nothing the snapshot holds, nothing twice");
    assert_eq!(c.up_to_date.last(), Some(&Position::end_of(Lsn(0x700))));

    // A snapshot that saw nothing beyond the history hands off at once, without waiting.
    let mut s = sub(cfg(0x400));
    let mut c = Client::default();
    let actions = drive(&mut s, hello(None, None, 4, 2), &h, &mut c, true);
    assert!(!actions.iter().any(|a| matches!(a, Action::AwaitWatermark(_))), "{actions:?}");
    assert_eq!(c.up_to_date, vec![Position::end_of(Lsn(0x400))]);
}

#[test]
fn window_blocks_queries_until_ack_and_acks_are_persisted() {
    let h = history(&sizes());
    let mut s = sub(cfg(0x700));
    let mut c = Client::default();
    let actions = drive(&mut s, hello(Some(Position::end_of(Lsn(0x100))), Some(7), 2, 1), &h, &mut c, false);
    let queries = actions.iter().filter(|a| matches!(a, Action::QueryPage(_))).count();
    let changes = actions.iter().filter(|a| matches!(a, Action::Send(ServerMessage::Changes { .. }))).count();
    assert_eq!((queries, changes), (1, 1), "window 1 without acks: one frame in flight");
    let to = c.acks[0];
    let out = s.handle(Event::Client(ClientMessage::Ack { position: to }));
    assert_eq!(out[0], Action::PersistPosition(to));
    assert!(matches!(out[1], Action::QueryPage(PageQuery { after: Some(p), .. }) if p == to));
    // Acking the same position again persists nothing.
    let page = s.handle(Event::PageLoaded(vec![]));
    assert!(page.iter().all(|a| !matches!(a, Action::PersistPosition(_))));
}

#[test]
fn bad_acks_are_rejected_without_moving_the_position() {
    let h = history(&[2]);
    let mut s = sub(cfg(0x100));
    let mut c = Client::default();
    drive(&mut s, hello(Some(Position::new(Lsn(0x10), 0)), Some(7), 10, 4), &h, &mut c, false);
    let beyond = Position::new(Lsn(0x900), 0);
    let out = s.handle(Event::Client(ClientMessage::Ack { position: beyond }));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.code == ErrorCode::BadRequest && !e.fatal));
    assert!(!out.iter().any(|a| matches!(a, Action::PersistPosition(_))));
    let backwards = Position::new(Lsn(0x1), 0);
    let out = s.handle(Event::Client(ClientMessage::Ack { position: backwards }));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(_))));
    let ok = s.handle(Event::Client(ClientMessage::Ack { position: Position::end_of(Lsn(0x100)) }));
    assert_eq!(ok, vec![Action::PersistPosition(Position::end_of(Lsn(0x100)))]);
}

#[test]
fn refetch_cases_and_protocol_errors() {
    let mut s = sub(cfg(0x100));
    let out = s.handle(hello(Some(Position::new(Lsn(0x50), 0)), Some(6), 10, 4));
    assert!(
        matches!(&out[0], Action::Send(ServerMessage::MustRefetch { reason: RefetchReason::GenerationChanged, shape_ids }) if shape_ids == &vec!["todos".to_string()])
    );
    assert!(matches!(out.last(), Some(Action::TakeSnapshot { .. })));

    let mut s = sub(cfg(0x100));
    let out = s.handle(hello(Some(Position::new(Lsn(0x5), 0)), Some(7), 10, 4));
    assert!(matches!(&out[0], Action::Send(ServerMessage::MustRefetch { reason: RefetchReason::PositionTooOld, .. })));

    let mut s = sub(cfg(0x100));
    let mut h = match hello(None, None, 1, 1) {
        Event::Client(ClientMessage::Hello(h)) => h,
        _ => unreachable!(),
    };
    h.protocol = 2;
    let out = s.handle(Event::Client(ClientMessage::Hello(h.clone())));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.fatal && e.code == ErrorCode::BadRequest));
    assert_eq!(out.last(), Some(&Action::Close));
    assert!(s.is_closed());
    assert!(s.handle(watermark(Lsn(0x200))).is_empty());

    let mut s = sub(cfg(0x100));
    h.protocol = 1;
    h.shapes[0].where_ = Some("a = 1 OR b = 2".into());
    let out = s.handle(Event::Client(ClientMessage::Hello(h)));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.code == ErrorCode::ShapeInvalid));

    let mut s = sub(cfg(0x100));
    assert_eq!(s.handle(Event::Client(ClientMessage::Ping { t: 5 })), vec![Action::Send(ServerMessage::Pong { t: 5 })]);
    let out = s.handle(Event::Client(ClientMessage::Ack { position: Position::new(Lsn(1), 0) }));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(_))), "ack before hello");
}

#[test]
fn a_position_at_or_beyond_the_end_of_the_wal_is_a_fatal_error() {
    // At the watermark (even with any seq) is fine: it is the end of what was served.
    let mut s = sub(cfg(0x100));
    let out = s.handle(hello(Some(Position::end_of(Lsn(0x100))), Some(7), 10, 4));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Welcome { mode: WelcomeMode::Catchup, .. })), "{out:?}");

    // Above the watermark: the I/O layer is asked where the WAL ends before anything is decided.
    let mut s = sub(cfg(0x100));
    let out = s.handle(hello(Some(Position::new(Lsn(0x101), 0)), Some(7), 10, 4));
    assert_eq!(out, vec![Action::ProbeWal]);
    assert!(!s.is_closed());
    // At the end of the WAL: never issued.
    let out = s.handle(Event::WalPosition(Lsn(0x101)));
    match &out[..] {
        [Action::Send(ServerMessage::Error(e)), Action::Close] => {
            assert_eq!(e.code, ErrorCode::PositionAhead);
            assert!(e.fatal);
            assert!(
                e.message.contains("0/101")
                    && e.message.contains("watermark 0/100")
                    && e.message.contains("end of WAL 0/101"),
                "{}",
                e.message
            );
        }
        other => panic!("expected error + close, got {other:?}"),
    }
    assert!(s.is_closed());

    // Once the watermark has moved past it, the same position is served at once.
    let mut s = sub(cfg(0x100));
    s.handle(watermark(Lsn(0x200)));
    let out = s.handle(hello(Some(Position::new(Lsn(0x101), 0)), Some(7), 10, 4));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Welcome { .. })), "{out:?}");

    // Another generation's position is a refetch, not an error, however high it is.
    let mut s = sub(cfg(0x100));
    let out = s.handle(hello(Some(Position::new(Lsn(u64::MAX), 0)), Some(6), 10, 4));
    assert!(matches!(
        &out[0],
        Action::Send(ServerMessage::MustRefetch { reason: RefetchReason::GenerationChanged, .. })
    ));
}

/// A client that moves from an instance whose watermark is ahead (a replicator's idle watermark,
/// kept in memory) to one whose watermark trails it (a follower's): its position is served once
/// the watermark gets there, exactly from that position, never refused and never refetched.
#[test]
fn a_position_below_the_end_of_the_wal_waits_for_the_watermark() {
    let p = Position::end_of(Lsn(0x150));
    let mut s = sub(cfg(0x100));
    assert_eq!(s.handle(hello(Some(p), Some(7), 10, 4)), vec![Action::ProbeWal]);
    // The WAL ends above the position: it may have been issued; wait for the watermark.
    assert!(s.handle(Event::WalPosition(Lsn(0x400))).is_empty());
    // A watermark move that does not reach the position changes nothing for the client.
    assert!(s.handle(watermark(Lsn(0x140))).is_empty());
    assert!(!s.is_closed());
    // The follower's watermark passes the position: welcome, registered, catch-up from it.
    let out = s.handle(watermark(Lsn(0x300)));
    match &out[..] {
        [Action::Send(ServerMessage::Welcome { mode: WelcomeMode::Catchup, watermark, .. }), Action::Register(r), Action::QueryPage(q)] =>
        {
            assert_eq!(*watermark, Lsn(0x300));
            assert_eq!(r.position, Some(p));
            assert_eq!((q.after, q.upto), (Some(p), Lsn(0x300)));
        }
        other => panic!("expected welcome, register and a page query, got {other:?}"),
    }

    // The watermark may also arrive before the probe's answer; the late answer changes nothing.
    let mut s = sub(cfg(0x100));
    assert_eq!(s.handle(hello(Some(p), Some(7), 10, 4)), vec![Action::ProbeWal]);
    let out = s.handle(watermark(Lsn(0x200)));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Welcome { mode: WelcomeMode::Catchup, .. })), "{out:?}");
    assert!(s.handle(Event::WalPosition(Lsn(0x100))).is_empty());
    assert!(!s.is_closed());

    // A failed probe is the server's trouble: retry later.
    let mut s = sub(cfg(0x100));
    s.handle(hello(Some(p), Some(7), 10, 4));
    let out = s.handle(Event::Failed { step: IoStep::Wal, detail: "connection refused".into() });
    let e = errors(&out);
    assert!(e[0].fatal && e[0].code == ErrorCode::Internal && e[0].retry_after_ms.is_some(), "{out:?}");
    assert!(e[0].message.contains("WAL position"), "{}", e[0].message);
}

#[test]
fn pages_that_break_the_keyset_contract_are_fatal() {
    let h = history(&[3]);
    for bad in [
        vec![h[1].clone(), h[0].clone()],                           // out of order
        vec![h[0].clone(), h[0].clone()],                           // duplicate
        history(&[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])[10..].to_vec(), // beyond upto
    ] {
        let mut s = sub(cfg(0x100));
        s.handle(hello(Some(Position::new(Lsn(0x10), 0)), Some(7), 10, 4));
        let out = s.handle(Event::PageLoaded(page(bad)));
        assert!(matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.fatal && e.code == ErrorCode::Internal));
        assert!(s.is_closed());
    }
    let mut s = sub(cfg(0x100));
    s.handle(hello(None, None, 10, 4));
    let out = s.handle(Event::PageLoaded(vec![]));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.fatal), "page with no query");
}

#[test]
fn transaction_ending_exactly_at_page_boundary_is_closed_with_empty_part() {
    // One txn of 4 rows, limit 4: page is full and single-txn, so it is sent with last=false;
    // the next (empty) page closes it with an empty last part.
    let h = history(&[4]);
    let mut s = sub(cfg(0x100));
    let mut c = Client::default();
    let actions = drive(&mut s, hello(Some(Position::new(Lsn(0x10), 0)), Some(7), 4, 4), &h, &mut c, true);
    let parts: Vec<(bool, usize)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(ServerMessage::Changes { txns, .. }) => {
                Some(txns.iter().map(|t| (t.last, t.ops.len())).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(parts, vec![(false, 4), (true, 0)]);
    assert_eq!(c.applied.len(), 4);
}

#[test]
fn live_subscription_stays_quiet_when_the_watermark_moves_over_nothing() {
    // Keepalive-proven watermark advances with no new rows must not produce frames: a client
    // ack would write its position, whose WAL would advance the watermark again, forever.
    let h = history(&sizes());
    let mut s = sub(cfg(0x700));
    let mut c = Client::default();
    drive(&mut s, hello(Some(Position::new(Lsn(0x100), 2)), Some(7), 1000, 4), &h, &mut c, true);
    assert!(s.is_live());
    let frames_before = c.up_to_date.len();
    let actions = drive(&mut s, watermark(Lsn(0x7FF)), &h, &mut c, true);
    assert!(actions.iter().any(|a| matches!(a, Action::QueryPage(_))), "it still looks");
    assert!(!actions.iter().any(|a| matches!(a, Action::Send(_))), "but sends nothing: {actions:?}");
    assert_eq!(c.up_to_date.len(), frames_before);
    // A later real change is still delivered, followed by up_to_date.
    let mut h2 = h.clone();
    let mut key = Row::new();
    key.insert("id".into(), 1.into());
    h2.push(HistoryRow {
        position: Position::new(Lsn(0x900), 0),
        xid: "999".into(),
        commit_time: "2026-01-01T00:00:00.000Z".into(),
        op: Some(WireOp::Delete { seq: 0, table: "public.todos".into(), key: key.into() }),
    });
    drive(&mut s, watermark(Lsn(0x900)), &h2, &mut c, true);
    assert_eq!(c.applied.last().map(|(p, _)| *p), Some(Position::new(Lsn(0x900), 0)));
    assert_eq!(c.up_to_date.len(), frames_before + 1);
}

fn hello_with(client_id: &str, shapes: usize, position: Option<Position>) -> ClientMessage {
    ClientMessage::Hello(Hello {
        protocol: 1,
        client_id: client_id.into(),
        generation: Some(7),
        position,
        shapes: (0..shapes)
            .map(|i| ShapeRequest { id: format!("s{i}"), table: "public.todos".into(), columns: None, where_: None })
            .collect(),
        auth: None,
        max_batch_rows: None,
        window: None,
    })
}

fn registrations(out: &[Action]) -> Vec<Option<Position>> {
    out.iter().filter_map(|a| if let Action::Register(r) = a { Some(r.position) } else { None }).collect()
}

#[test]
fn too_many_shapes_in_a_hello_is_fatal_before_anything_is_served() {
    let mut c = cfg(0x400);
    c.max_shapes = 3;
    let mut s = sub(c.clone());
    let out = s.handle(Event::Client(hello_with("c1", 3, None)));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Welcome { .. })), "{out:?}");

    let mut s = sub(c);
    let msg = hello_with("c1", 4, None);
    let refused = s.handle(Event::Client(msg.clone()));
    match &refused[..] {
        [Action::Send(ServerMessage::Error(e)), Action::Close] => {
            assert_eq!(e.code, ErrorCode::TooManyShapes);
            assert!(e.fatal);
            assert!(e.message.contains("at most 3"), "{}", e.message);
        }
        other => panic!("expected error + close, got {other:?}"),
    }
    assert!(s.is_closed());
    // The core applies the same limit on its own.
    let mut c = cfg(0x400);
    c.max_shapes = 3;
    let mut s = sub(c);
    let out = s.handle(Event::Client(msg));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.code == ErrorCode::TooManyShapes && e.fatal));
    assert_eq!(out.last(), Some(&Action::Close));
    assert!(registrations(&out).is_empty() && !out.iter().any(|a| matches!(a, Action::TakeSnapshot { .. })));
}

#[test]
fn subscribe_counts_against_the_same_shape_limit() {
    let mut c = cfg(0x400);
    c.max_shapes = 3;
    let mut s = sub(c);
    s.handle(Event::Client(hello_with("c1", 2, None)));
    let one = ShapeRequest { id: "x".into(), table: "public.todos".into(), columns: None, where_: None };
    // Within the limit: still the (non-fatal) "not supported yet".
    assert!(s
        .handle(Event::Client(ClientMessage::Subscribe { shapes: vec![one.clone()] }))
        .iter()
        .all(|a| matches!(a, Action::Send(ServerMessage::Error(e)) if !e.fatal)));
    let out = s.handle(Event::Client(ClientMessage::Subscribe { shapes: vec![one.clone(), one] }));
    assert!(
        matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.code == ErrorCode::TooManyShapes && e.fatal),
        "{out:?}"
    );
    assert!(s.is_closed());
}

#[test]
fn an_over_long_client_id_is_refused() {
    let mut s = sub(cfg(0x400));
    assert!(matches!(
        &s.handle(Event::Client(hello_with(&"x".repeat(256), 1, None)))[0],
        Action::Send(ServerMessage::Welcome { .. })
    ));
    let mut s = sub(cfg(0x400));
    let out = s.handle(Event::Client(hello_with(&"x".repeat(257), 1, None)));
    assert!(
        matches!(&out[0], Action::Send(ServerMessage::Error(e)) if e.code == ErrorCode::BadRequest && e.fatal && e.message.contains("client_id"))
    );
    assert!(s.is_closed());
}

/// Only a position the subscription accepted is registered (it holds retention back); a refused,
/// too old or foreign one never is.
#[test]
fn only_an_accepted_position_is_registered() {
    let p = Position::new(Lsn(0x200), 3);
    // Accepted: catch-up from p.
    let mut s = sub(cfg(0x400));
    assert_eq!(registrations(&s.handle(Event::Client(hello_with("c1", 1, Some(p))))), vec![Some(p)]);
    // Below the horizon (0x10): refetch, registered as new.
    let mut s = sub(cfg(0x400));
    let out = s.handle(Event::Client(hello_with("c1", 1, Some(Position::new(Lsn(0), 0)))));
    assert!(matches!(&out[0], Action::Send(ServerMessage::MustRefetch { reason: RefetchReason::PositionTooOld, .. })));
    assert_eq!(registrations(&out), vec![None]);
    // Ahead of the watermark and of the WAL: refused, not registered at all.
    let mut s = sub(cfg(0x400));
    assert!(registrations(&s.handle(Event::Client(hello_with("c1", 1, Some(Position::new(Lsn(0x401), 0)))))).is_empty());
    assert!(registrations(&s.handle(Event::WalPosition(Lsn(0x401)))).is_empty());
    assert!(s.is_closed());
    // Another generation: new client.
    let mut s = sub(cfg(0x400));
    let ClientMessage::Hello(mut h) = hello_with("c1", 1, Some(p)) else { unreachable!() };
    h.generation = Some(6);
    assert_eq!(registrations(&s.handle(Event::Client(ClientMessage::Hello(h)))), vec![None]);
    // Invalid shape: refused, not registered.
    let mut s = sub(cfg(0x400));
    let ClientMessage::Hello(mut h) = hello_with("c1", 1, Some(p)) else { unreachable!() };
    h.shapes[0].where_ = Some("done ==".into());
    assert!(registrations(&s.handle(Event::Client(ClientMessage::Hello(h)))).is_empty());
}

// ---- Decisions that used to live in the session task: readiness, the replicator's state,
// ---- frames, the token, the catalog, schema changes, filtering.

fn errors(out: &[Action]) -> Vec<&ErrorMessage> {
    out.iter().filter_map(|a| if let Action::Send(ServerMessage::Error(e)) = a { Some(e) } else { None }).collect()
}

fn hello_text(position: Option<Position>) -> String {
    let Event::Client(msg) = hello(position, Some(7), 10, 4) else { unreachable!() };
    serde_json::to_string(&msg).unwrap()
}

#[test]
fn frames_wait_until_the_replicator_is_ready_then_are_answered_in_order() {
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    let mut starting = feed(0);
    starting.caught_up = false;
    starting.phase = Phase::Starting;
    assert_eq!(
        s.handle(Event::Feed(starting.clone())),
        vec![Action::Send(ServerMessage::Status { state: ServerState::Starting })]
    );
    // Told once, however often the state changes before readiness.
    assert!(s.handle(Event::Feed(starting)).is_empty());
    assert!(s.handle(Event::ClientText(hello_text(None))).is_empty(), "the hello waits");
    assert!(s.handle(Event::ClientText(r#"{"type":"ping","t":9}"#.into())).is_empty());
    let out = s.handle(Event::Feed(feed(0x400)));
    assert_eq!(
        out,
        vec![Action::LookUpColumns(todos()), Action::Send(ServerMessage::Pong { t: 9 })],
        "in order of arrival: the hello is taken up, the ping answered"
    );
    let out = s.handle(Event::Columns(todos_columns()));
    assert!(
        matches!(&out[0], Action::Send(ServerMessage::Welcome { mode: WelcomeMode::Snapshot, watermark, .. }) if *watermark == Lsn(0x400)),
        "{out:?}"
    );
    assert!(out.iter().any(|a| matches!(a, Action::TakeSnapshot { .. })));
}

#[test]
fn a_flood_before_readiness_is_refused_with_a_bounded_buffer() {
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    let mut starting = feed(0);
    starting.caught_up = false;
    s.handle(Event::Feed(starting.clone()));
    for i in 0..MAX_EARLY_MESSAGES {
        assert!(s.handle(Event::ClientText(format!(r#"{{"type":"ping","t":{i}}}"#))).is_empty());
    }
    let out = s.handle(Event::ClientText(r#"{"type":"ping","t":99}"#.into()));
    let e = errors(&out);
    assert!(e.len() == 1 && e[0].fatal && e[0].code == ErrorCode::BadRequest, "{out:?}");
    assert_eq!(out.last(), Some(&Action::Close));
    assert!(s.is_closed());
    // By bytes too: one huge frame.
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    s.handle(Event::Feed(starting));
    let out = s.handle(Event::ClientText(" ".repeat(MAX_EARLY_BYTES + 1)));
    assert!(errors(&out).iter().any(|e| e.fatal), "{out:?}");
}

#[test]
fn an_engine_that_stops_ends_the_session_before_and_after_readiness() {
    let mut stopped = feed(0);
    stopped.phase = Phase::Stopped;
    stopped.caught_up = false;
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    assert_eq!(s.handle(Event::Feed(stopped.clone())), vec![Action::Abort(Abort::EngineStopped)]);
    assert!(s.is_closed());
    let mut s = sub(cfg(0x400));
    stopped.caught_up = true;
    assert_eq!(s.handle(Event::Feed(stopped)), vec![Action::Abort(Abort::EngineStopped)]);
}

#[test]
fn a_new_generation_in_mid_session_makes_the_client_refetch_every_shape() {
    let h = history(&sizes());
    let mut s = sub(cfg(0x700));
    let mut c = Client::default();
    drive(&mut s, hello(Some(Position::new(Lsn(0x100), 2)), Some(7), 100, 4), &h, &mut c, true);
    let mut next = feed(0x700);
    next.generation = 8;
    let out = s.handle(Event::Feed(next));
    assert_eq!(
        out,
        vec![
            Action::Send(ServerMessage::MustRefetch {
                reason: RefetchReason::GenerationChanged,
                shape_ids: vec!["todos".into()]
            }),
            Action::Close
        ]
    );
    assert!(s.is_closed());
}

#[test]
fn replication_trouble_is_reported_once_and_its_end_too() {
    let mut s = sub(cfg(0x400));
    let reconnecting = |e: &str| {
        let mut f = feed(0x400);
        f.phase = Phase::Reconnecting { error: e.into() };
        Event::Feed(f)
    };
    let status = |state| vec![Action::Send(ServerMessage::Status { state })];
    assert_eq!(s.handle(reconnecting("connection refused")), status(ServerState::ReplicationReconnecting));
    assert!(s.handle(reconnecting("timed out")).is_empty(), "a new error text is the same state");
    assert_eq!(s.handle(Event::Feed(feed(0x400))), status(ServerState::Ok));
    assert!(!s.is_closed());
}

/// A standby's sessions follow the shared history (phase `Following`); the takeover, when the
/// standby starts replicating, is silent; a follower's lost connection is reported like the
/// replicator's.
#[test]
fn following_and_taking_over_are_silent_and_a_followers_trouble_is_reported() {
    let following = |w: u64| {
        let mut f = feed(w);
        f.phase = Phase::Following;
        Event::Feed(f)
    };
    let mut c = cfg(0x400);
    c.feed.phase = Phase::Following;
    let mut s = sub(c);
    let status = |state| vec![Action::Send(ServerMessage::Status { state })];
    let mut lost = feed(0x400);
    lost.phase = Phase::Reconnecting { error: "connection reset".into() };
    assert_eq!(s.handle(Event::Feed(lost)), status(ServerState::ReplicationReconnecting));
    assert_eq!(s.handle(following(0x400)), status(ServerState::Ok));
    // Live on the follower: a watermark move is a page query, as on the replicator.
    let out = s.handle(hello(Some(Position::end_of(Lsn(0x400))), Some(7), 10, 4));
    assert!(matches!(&out[0], Action::Send(ServerMessage::Welcome { mode: WelcomeMode::Catchup, .. })), "{out:?}");
    let out = s.handle(Event::PageLoaded(vec![]));
    assert!(matches!(&out[0], Action::Send(ServerMessage::UpToDate { .. })), "{out:?}");
    assert!(s.is_live());
    let out = s.handle(following(0x500));
    assert!(matches!(out.last(), Some(Action::QueryPage(_))), "{out:?}");
    // The takeover: nothing to tell.
    assert!(s.handle(Event::Feed(feed(0x500))).is_empty());
    assert!(!s.is_closed());
}

#[test]
fn a_frame_that_does_not_parse_is_fatal_before_the_hello_and_not_after() {
    let mut s = sub(cfg(0x400));
    let out = s.handle(Event::ClientText(r#"{"type":"hello","protocol":1,"client_id":5,"shapes":[]}"#.into()));
    let e = errors(&out);
    assert!(e[0].fatal && e[0].code == ErrorCode::BadRequest && e[0].message.contains("client_id"), "{out:?}");
    assert_eq!(out.last(), Some(&Action::Close));

    let mut s = sub(cfg(0x400));
    let out = s.handle(Event::ClientText("not json".into()));
    assert!(errors(&out)[0].message.starts_with("expected a hello first"), "{out:?}");

    let h = history(&[1]);
    let mut s = sub(cfg(0x100));
    let mut c = Client::default();
    drive(&mut s, Event::ClientText(hello_text(Some(Position::new(Lsn(0x10), 0)))), &h, &mut c, true);
    let out = s.handle(Event::ClientText("{\"type\":\"nope\"}".into()));
    let e = errors(&out);
    assert!(e.len() == 1 && !e[0].fatal && e[0].code == ErrorCode::BadRequest, "{out:?}");
    assert!(!s.is_closed());
}

#[test]
fn the_token_and_the_catalog_decide_before_anything_is_served() {
    let Event::Client(ClientMessage::Hello(base)) = hello(None, None, 10, 4) else { unreachable!() };
    // A table the token does not open: forbidden, nothing looked up, nothing registered.
    let access = Access::tables([("public.other".to_string(), None)].into());
    let mut s = Subscription::new(cfg(0x400).cfg, access);
    s.handle(Event::Feed(feed(0x400)));
    let out = s.handle(Event::Client(ClientMessage::Hello(base.clone())));
    assert!(
        matches!(&out[..], [Action::Send(ServerMessage::Error(e)), Action::Close] if e.code == ErrorCode::Forbidden && e.fatal),
        "{out:?}"
    );

    // The token's predicate is ANDed into the shape the subscription serves.
    let access = Access::tables([("public.todos".to_string(), Some("owner = 'u1'".to_string()))].into());
    let mut s = Subscription::new(cfg(0x400).cfg, access);
    s.handle(Event::Feed(feed(0x400)));
    assert_eq!(s.handle(Event::Client(ClientMessage::Hello(base.clone()))), vec![Action::LookUpColumns(todos())]);
    let out = s.handle(Event::Columns(todos_columns()));
    let Some(Action::TakeSnapshot { shapes, batch_rows }) = out.last() else { panic!("{out:?}") };
    assert_eq!(*batch_rows, 10);
    assert_eq!(shapes[0].1.conditions.len(), 2, "the client's where and the token's: {shapes:?}");

    // A table the server does not sync: shape_invalid without a lookup.
    let mut h = base.clone();
    h.shapes[0].table = "public.secret".into();
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    s.handle(Event::Feed(feed(0x400)));
    let out = s.handle(Event::Client(ClientMessage::Hello(h)));
    assert!(
        matches!(&out[..], [Action::Send(ServerMessage::Error(e)), Action::Close] if e.code == ErrorCode::ShapeInvalid && e.message.contains("not synced")),
        "{out:?}"
    );

    // A column the table does not have: shape_invalid once the catalog answered.
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    s.handle(Event::Feed(feed(0x400)));
    s.handle(Event::Client(ClientMessage::Hello(base.clone())));
    let out = s.handle(Event::Columns(vec![("public.todos".into(), vec!["id".into()])]));
    assert!(
        matches!(&out[..], [Action::Send(ServerMessage::Error(e)), Action::Close] if e.code == ErrorCode::ShapeInvalid && e.message.contains("todos")),
        "{out:?}"
    );
    assert!(registrations(&out).is_empty());

    // The catalog could not be read: internal, with a retry hint.
    let mut s = Subscription::new(cfg(0x400).cfg, Access::all());
    s.handle(Event::Feed(feed(0x400)));
    s.handle(Event::Client(ClientMessage::Hello(base)));
    let out = s.handle(Event::Failed { step: IoStep::Catalog, detail: "connection reset".into() });
    let e = errors(&out);
    assert!(e[0].code == ErrorCode::Internal && e[0].fatal && e[0].retry_after_ms == Some(1000), "{out:?}");
    assert!(e[0].message.contains("catalog") && e[0].message.contains("connection reset"));
}

#[test]
fn a_schema_change_in_a_page_makes_the_shapes_on_that_table_refetch() {
    let h = history(&[2]);
    let mut s = sub(cfg(0x100));
    let out = s.handle(hello(Some(Position::new(Lsn(0x10), 0)), Some(7), 10, 4));
    assert!(out.iter().any(|a| matches!(a, Action::QueryPage(_))));
    let mut items = page(h);
    items.insert(1, PageItem::SchemaChanged { table: "public.todos".into() });
    let out = s.handle(Event::PageLoaded(items));
    assert_eq!(
        out,
        vec![
            Action::Send(ServerMessage::MustRefetch {
                reason: RefetchReason::SchemaChanged,
                shape_ids: vec!["todos".into()]
            }),
            Action::Close
        ]
    );
}

#[test]
fn rows_outside_the_shape_keep_their_position_but_are_not_sent() {
    let h = history(&[1, 1]);
    let mut s = sub(cfg(0x200));
    let out = s.handle(hello(Some(Position::new(Lsn(0x10), 0)), Some(7), 10, 4));
    assert!(out.iter().any(|a| matches!(a, Action::QueryPage(_))));
    // The first delete's row was never in the shape (done = true before it): not even its key
    // goes out. The second was.
    let mut items = page(h.clone());
    let outside = {
        let mut old = Row::new();
        old.insert("id".into(), 0.into());
        old.insert("done".into(), true.into());
        RawRow::from_row(&old)
    };
    items[0] = PageItem::Row(h[0].clone(), Some(outside));
    let out = s.handle(Event::PageLoaded(items));
    let Some(Action::Send(ServerMessage::Changes { to, txns, .. })) = out.first() else { panic!("{out:?}") };
    assert_eq!(*to, h[1].position, "the position covers both");
    let ops: Vec<usize> = txns.iter().map(|t| t.ops.len()).collect();
    assert_eq!(ops, vec![0, 1], "the outside row's transaction is sent empty");
}

#[test]
fn the_horizon_follows_the_feed() {
    let mut s = sub(cfg(0x400));
    let mut f = feed(0x400);
    f.horizon = Lsn(0x300);
    assert!(s.handle(Event::Feed(f)).is_empty());
    let out = s.handle(hello(Some(Position::new(Lsn(0x200), 0)), Some(7), 10, 4));
    assert!(
        matches!(&out[0], Action::Send(ServerMessage::MustRefetch { reason: RefetchReason::PositionTooOld, .. })),
        "{out:?}"
    );
}
