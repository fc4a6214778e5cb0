//! The subscription's delivery: acks and the window, the snapshot handoff, page queries, and
//! turning a loaded page into whole-transaction `changes` frames (docs/pgsync-protocol.md §4,
//! §5, §6).

use super::*;
use crate::filter::filter_op;

impl Subscription {
    pub(super) fn on_ack(&mut self, position: Position, out: &mut Vec<Action>) {
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
    pub(super) fn maybe_hand_off(&mut self) {
        if let State::AwaitingHandoff { stitch } = &self.state {
            if self.watermark >= stitch.handoff_watermark() {
                self.state = State::CatchingUp { upto: self.watermark, stitch: Some(stitch.clone()) };
            }
        }
    }

    /// Issue the next page query if the state wants one and the window allows it.
    pub(super) fn maybe_query(&mut self, out: &mut Vec<Action>) {
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
        let q = PageQuery { after: self.sent, upto, limit: self.limit, stitch, tables: self.tables() };
        self.outstanding = Some(q.clone());
        out.push(Action::QueryPage(q));
    }

    /// The subscribed tables, each once, sorted.
    pub(super) fn tables(&self) -> Vec<String> {
        let mut tables: Vec<String> = self.shapes.iter().map(|(_, s)| s.table.clone()).collect();
        tables.sort();
        tables.dedup();
        tables
    }

    pub(super) fn on_page(&mut self, items: Vec<PageItem>, out: &mut Vec<Action>) {
        let Some(q) = self.outstanding.take() else {
            out.extend(self.fail(ErrorCode::Internal, "page without a query", true));
            return;
        };
        let mut rows: Vec<HistoryRow> = Vec::with_capacity(items.len());
        for item in items {
            match item {
                // Shape filtering with the row before the change; a dropped op keeps its
                // position (see `filter`).
                PageItem::Row(mut r, old) => {
                    r.op = r.op.and_then(|op| filter_op(&self.shapes, op, old.as_ref()));
                    rows.push(r);
                }
                // The client's rows of that table may no longer match its schema: it refetches.
                PageItem::SchemaChanged { table } => {
                    let shape_ids =
                        self.shapes.iter().filter(|(_, s)| s.table == table).map(|(id, _)| id.clone()).collect();
                    out.push(Action::Send(ServerMessage::MustRefetch {
                        reason: RefetchReason::SchemaChanged,
                        shape_ids,
                    }));
                    self.state = State::Closed;
                    out.push(Action::Close);
                    return;
                }
            }
        }
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
