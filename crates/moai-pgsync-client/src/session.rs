//! One connection's protocol state, sans-IO: server messages in, store writes and frames to
//! send out. The async loop in [`super::client`] only moves frames and decides about
//! reconnecting; every rule about what to apply, when, and what to ack lives here, where it can
//! be tested without sockets.
//!
//! Rules (docs/pgsync-protocol.md):
//! * `welcome{mode:"snapshot"}` and `must_refetch` reset the affected tables and the resume
//!   point: snapshot rows and the catch-up after them are not a consistent point until
//!   `up_to_date`, so an interruption restarts the snapshot instead of resuming over it.
//! * A transaction is applied only when its `last: true` part arrived, in one
//!   [`Store::apply`] together with its resume point.
//! * A transaction at or below the last applied position is skipped (it can be re-sent when an
//!   ack was lost before a reconnect); it is still acked.
//! * After a frame, the client acks the end of the last transaction it completed: the frame's
//!   `to` when the frame ends at a transaction boundary, else `(lsn, MAX)` of that transaction.
//!   Acks only ever name applied transaction ends.

use std::collections::BTreeMap;
use std::time::Duration;

use super::error::{ClientError, ProtocolError, StoreError};
use super::messages::{self, Row, ServerMessage, Shape, Transaction};
use super::position::{Position, ResumePoint};
use super::store::Store;

/// What the connection loop should do after a message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaction {
    /// Frames to send (acks).
    pub send: Vec<String>,
    /// Transactions applied to the store by this message (skipped duplicates not counted).
    pub applied: u64,
    /// The message was `up_to_date`: the store is at a consistent point.
    pub up_to_date: bool,
}

/// Why the connection must end.
#[derive(Debug)]
pub enum Halt {
    /// Reconnect after the backoff delay, but not sooner than `after`.
    Retry { reason: String, after: Option<Duration> },
    /// Stop the client.
    Stop(ClientError),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Stop(ClientError::Store(e))
    }
}

impl From<ProtocolError> for Halt {
    fn from(e: ProtocolError) -> Self {
        Halt::Retry { reason: e.to_string(), after: None }
    }
}

#[derive(Debug)]
pub struct Session {
    shapes: Vec<Shape>,
    /// Generation announced by `welcome`.
    generation: Option<u64>,
    /// Between `welcome{snapshot}` and `up_to_date`.
    snapshotting: bool,
    /// snapshot_id → (table, key columns).
    snapshots: BTreeMap<String, (String, Vec<String>)>,
    /// A transaction whose `last` part has not arrived.
    pending: Option<Transaction>,
    /// End of the last transaction applied (or consistent point), this connection or the store's.
    applied: Option<Position>,
    /// The resume point the hello carried.
    resumed_from: Option<ResumePoint>,
    pub server_state: Option<String>,
}

impl Session {
    /// A new connection; `resume` is what the hello sends (the store's resume point).
    pub fn new(shapes: Vec<Shape>, resume: Option<ResumePoint>) -> Self {
        Session {
            shapes,
            generation: None,
            snapshotting: false,
            snapshots: BTreeMap::new(),
            pending: None,
            applied: resume.map(|r| r.position),
            resumed_from: resume,
            server_state: None,
        }
    }

    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    pub fn applied(&self) -> Option<Position> {
        self.applied
    }

    fn tables(&self, shape_ids: Option<&[String]>) -> Vec<String> {
        let mut t: Vec<String> = self
            .shapes
            .iter()
            .filter(|s| shape_ids.is_none_or(|ids| ids.contains(&s.id)))
            .map(|s| s.table.clone())
            .collect();
        t.sort();
        t.dedup();
        t
    }

    pub fn handle<S: Store>(&mut self, msg: ServerMessage, store: &mut S) -> Result<Reaction, Halt> {
        let mut r = Reaction::default();
        match msg {
            ServerMessage::Welcome { generation, snapshot, .. } => {
                if snapshot {
                    store.reset(&self.tables(None))?;
                    self.applied = None;
                    self.snapshotting = true;
                } else if self.resumed_from.map(|p| p.generation) != Some(generation) {
                    return Err(ProtocolError::new("catch-up welcome for another generation").into());
                }
                self.generation = Some(generation);
            }
            ServerMessage::MustRefetch { reason, shape_ids } => {
                tracing::info!(%reason, ?shape_ids, "pgsync client: must refetch");
                let ids = if shape_ids.is_empty() { None } else { Some(shape_ids.as_slice()) };
                store.reset(&self.tables(ids))?;
                self.applied = None;
                self.pending = None;
            }
            ServerMessage::SnapshotBegin { snapshot_id, shape_id, key } => {
                let shape = self
                    .shapes
                    .iter()
                    .find(|s| s.id == shape_id)
                    .ok_or_else(|| ProtocolError::new(format!("snapshot of unknown shape {shape_id:?}")))?;
                if let Some(cols) = &shape.columns {
                    if let Some(k) = key.iter().find(|k| !cols.contains(k)) {
                        return Err(Halt::Stop(ClientError::Config(format!(
                            "shape {shape_id:?}: columns must include the key column {k:?}"
                        ))));
                    }
                }
                self.snapshots.insert(snapshot_id, (shape.table.clone(), key));
            }
            ServerMessage::SnapshotBatch { snapshot_id, rows } => {
                let (table, key) = self
                    .snapshots
                    .get(&snapshot_id)
                    .ok_or_else(|| ProtocolError::new(format!("batch of unknown snapshot {snapshot_id:?}")))?;
                let mut items = Vec::with_capacity(rows.len());
                for row in rows {
                    let k: Row = key
                        .iter()
                        .map(|c| row.get(c).cloned().map(|v| (c.clone(), v)))
                        .collect::<Option<Row>>()
                        .ok_or_else(|| ProtocolError::new(format!("snapshot row of {table} without its key")))?;
                    items.push((k, row));
                }
                store.upsert_snapshot(table, items)?;
            }
            ServerMessage::SnapshotEnd { snapshot_id } => {
                self.snapshots.remove(&snapshot_id);
            }
            ServerMessage::Changes { to, txns } => self.on_changes(to, txns, store, &mut r)?,
            ServerMessage::UpToDate { position, .. } => {
                let generation = self.generation.ok_or_else(|| ProtocolError::new("up_to_date before welcome"))?;
                if self.pending.is_some() {
                    return Err(ProtocolError::new("up_to_date inside an open transaction").into());
                }
                store.set_resume_point(ResumePoint { generation, position })?;
                self.applied = Some(position);
                self.snapshotting = false;
                r.up_to_date = true;
                r.send.push(messages::ack(position));
            }
            ServerMessage::Status { state } => self.server_state = Some(state),
            ServerMessage::Error { code, message, retry_after_ms, fatal } => {
                let after = retry_after_ms.map(Duration::from_millis);
                if !fatal {
                    tracing::warn!(%code, %message, "pgsync client: server error");
                    return Ok(r);
                }
                return Err(match code.as_str() {
                    "unauthorized" => Halt::Stop(ClientError::Unauthorized(message)),
                    "bad_request" | "shape_invalid" | "forbidden" => {
                        Halt::Stop(ClientError::Rejected { code, message })
                    }
                    // Our position is not from this history: start over with a snapshot.
                    "position_ahead" => {
                        store.reset(&self.tables(None))?;
                        self.applied = None;
                        Halt::Retry { reason: message, after }
                    }
                    _ => Halt::Retry { reason: format!("{code}: {message}"), after },
                });
            }
            ServerMessage::Pong { .. } | ServerMessage::Unknown { .. } => {}
        }
        Ok(r)
    }

    fn on_changes<S: Store>(
        &mut self,
        to: Position,
        txns: Vec<messages::TxnPart>,
        store: &mut S,
        r: &mut Reaction,
    ) -> Result<(), Halt> {
        let generation = self.generation.ok_or_else(|| ProtocolError::new("changes before welcome"))?;
        let n = txns.len();
        let mut ack = None;
        for (i, part) in txns.into_iter().enumerate() {
            let txn = match self.pending.take() {
                Some(mut open) if open.lsn == part.lsn => {
                    open.ops.extend(part.ops);
                    open
                }
                Some(open) => {
                    return Err(ProtocolError::new(format!("transaction {} left open by {}", open.lsn, part.lsn)).into())
                }
                None => Transaction { lsn: part.lsn, xid: part.xid, commit_time: part.commit_time, ops: part.ops },
            };
            if !part.last {
                self.pending = Some(txn);
                continue;
            }
            let end = if i + 1 == n { to } else { Position::end_of(txn.lsn) };
            if end.lsn != txn.lsn {
                return Err(ProtocolError::new(format!("frame end {to} is not inside transaction {}", txn.lsn)).into());
            }
            if self.applied.is_some_and(|a| txn.lsn <= a.lsn) {
                tracing::debug!(lsn = %txn.lsn, "pgsync client: skipping a transaction applied before");
            } else {
                let resume = (!self.snapshotting).then_some(ResumePoint { generation, position: end });
                store.apply(txn, resume)?;
                r.applied += 1;
                self.applied = Some(end);
            }
            ack = Some(end);
        }
        if let Some(p) = ack {
            r.send.push(messages::ack(p));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::position::Lsn;
    use super::super::store::MemoryStore;
    use super::*;
    use serde_json::{json, Value};

    fn msg(v: Value) -> ServerMessage {
        ServerMessage::parse(&v.to_string()).unwrap()
    }

    fn shapes() -> Vec<Shape> {
        vec![Shape::table("items", "public.items")]
    }

    fn ins(id: i64) -> Value {
        json!({"seq":0,"op":"insert","table":"public.items","key":{"id":id},"row":{"id":id,"v":id}})
    }

    fn changes(to: (&str, u32), txns: Value) -> ServerMessage {
        msg(json!({"type":"changes","from":null,"to":{"lsn":to.0,"seq":to.1},"txns":txns}))
    }

    fn acks(r: &Reaction) -> Vec<Value> {
        r.send.iter().map(|s| serde_json::from_str::<Value>(s).unwrap()["position"].clone()).collect()
    }

    #[test]
    fn snapshot_then_catchup_then_up_to_date_sets_the_resume_point_only_at_the_end() {
        let mut store = MemoryStore::with_journal();
        let mut s = Session::new(shapes(), None);
        s.handle(msg(json!({"type":"welcome","generation":7,"mode":"snapshot","watermark":"0/100"})), &mut store)
            .unwrap();
        s.handle(
            msg(json!({"type":"snapshot_begin","snapshot_id":"s-1","shape_id":"items",
            "schema":{"key":["id"],"columns":[{"name":"id","type":"int8"}]}})),
            &mut store,
        )
        .unwrap();
        s.handle(
            msg(json!({"type":"snapshot_batch","snapshot_id":"s-1","rows":[{"id":1,"v":1},{"id":2,"v":2}]})),
            &mut store,
        )
        .unwrap();
        s.handle(msg(json!({"type":"snapshot_end","snapshot_id":"s-1"})), &mut store).unwrap();
        let r = s
            .handle(
                changes(("0/150", 0), json!([{"lsn":"0/150","xid":"1","commit_time":"t","last":true,"ops":[ins(3)]}])),
                &mut store,
            )
            .unwrap();
        assert_eq!(r.applied, 1);
        assert_eq!(acks(&r), vec![json!({"lsn":"0/150","seq":0})]);
        assert_eq!(store.resume_point(), None, "catch-up after a snapshot is not a consistent point");
        let r = s
            .handle(
                msg(json!({"type":"up_to_date","position":{"lsn":"0/200","seq":4294967295u64},"watermark":"0/200"})),
                &mut store,
            )
            .unwrap();
        assert!(r.up_to_date);
        assert_eq!(store.resume_point(), Some(ResumePoint { generation: 7, position: Position::end_of(Lsn(0x200)) }));
        assert_eq!(store.table("public.items").len(), 3);
    }

    #[test]
    fn split_transactions_apply_once_at_last_and_duplicates_are_skipped_but_acked() {
        let resume = ResumePoint { generation: 7, position: Position::end_of(Lsn(0x100)) };
        let mut store = MemoryStore::with_journal();
        let mut s = Session::new(shapes(), Some(resume));
        s.handle(msg(json!({"type":"welcome","generation":7,"mode":"catchup","watermark":"0/300"})), &mut store)
            .unwrap();
        // A re-sent transaction at the resume point: skipped, acked.
        let r = s
            .handle(
                changes(("0/100", 0), json!([{"lsn":"0/100","xid":"1","commit_time":"t","last":true,"ops":[ins(1)]}])),
                &mut store,
            )
            .unwrap();
        assert_eq!((r.applied, acks(&r)), (0, vec![json!({"lsn":"0/100","seq":0})]));
        // One transaction in two parts: nothing applied (and nothing acked) until the last one.
        let r = s
            .handle(
                changes(("0/200", 0), json!([{"lsn":"0/200","xid":"2","commit_time":"t","last":false,"ops":[ins(2)]}])),
                &mut store,
            )
            .unwrap();
        assert_eq!(r, Reaction::default());
        assert!(store.table("public.items").is_empty());
        // The closing part plus a whole next transaction in the same frame.
        let r = s
            .handle(
                changes(
                    ("0/300", 0),
                    json!([
                    {"lsn":"0/200","xid":"2","commit_time":"t","last":true,"ops":[ins(3)]},
                    {"lsn":"0/300","xid":"3","commit_time":"t","last":true,"ops":[ins(4)]}]),
                ),
                &mut store,
            )
            .unwrap();
        assert_eq!(r.applied, 2);
        assert_eq!(acks(&r), vec![json!({"lsn":"0/300","seq":0})]);
        assert_eq!(store.journal(), &[Lsn(0x200), Lsn(0x300)]);
        assert_eq!(store.resume_point().unwrap().position, Position::new(Lsn(0x300), 0));
        // A frame ending inside a transaction acks the transaction it completed.
        let r = s
            .handle(
                changes(
                    ("0/400", 9),
                    json!([
                    {"lsn":"0/350","xid":"4","commit_time":"t","last":true,"ops":[]},
                    {"lsn":"0/400","xid":"5","commit_time":"t","last":false,"ops":[ins(5)]}]),
                ),
                &mut store,
            )
            .unwrap();
        assert_eq!(acks(&r), vec![Position::end_of(Lsn(0x350)).to_json()]);
    }

    #[test]
    fn refetch_and_errors_decide_how_the_connection_ends() {
        let resume = ResumePoint { generation: 7, position: Position::end_of(Lsn(0x100)) };
        let mut store = MemoryStore::new();
        store.set_resume_point(resume).unwrap();
        store
            .upsert_snapshot("public.items", vec![(json!({"id":1}).as_object().unwrap().clone(), Row::new())])
            .unwrap();
        let mut s = Session::new(shapes(), Some(resume));
        s.handle(msg(json!({"type":"must_refetch","reason":"schema_changed","shape_ids":["items"]})), &mut store)
            .unwrap();
        assert_eq!(store.resume_point(), None);
        assert!(store.table("public.items").is_empty());

        let fatal =
            |code: &str| msg(json!({"type":"error","code":code,"message":"m","retry_after_ms":1500,"fatal":true}));
        assert!(matches!(s.handle(fatal("unauthorized"), &mut store), Err(Halt::Stop(ClientError::Unauthorized(_)))));
        assert!(matches!(s.handle(fatal("shape_invalid"), &mut store), Err(Halt::Stop(ClientError::Rejected { .. }))));
        assert!(matches!(s.handle(fatal("forbidden"), &mut store), Err(Halt::Stop(ClientError::Rejected { .. }))));
        match s.handle(fatal("overloaded"), &mut store) {
            Err(Halt::Retry { after, .. }) => assert_eq!(after, Some(Duration::from_millis(1500))),
            other => panic!("{other:?}"),
        }
        store.set_resume_point(resume).unwrap();
        assert!(matches!(s.handle(fatal("position_ahead"), &mut store), Err(Halt::Retry { .. })));
        assert_eq!(store.resume_point(), None, "position_ahead starts over");
        let soft = msg(json!({"type":"error","code":"bad_request","message":"ack outside","fatal":false}));
        assert_eq!(s.handle(soft, &mut store).unwrap(), Reaction::default());
    }

    #[test]
    fn protocol_violations_end_the_connection_for_a_retry() {
        let mut store = MemoryStore::new();
        let mut s = Session::new(shapes(), None);
        let c = changes(("0/1", 0), json!([{"lsn":"0/1","xid":"1","commit_time":"t","last":true,"ops":[ins(1)]}]));
        assert!(matches!(s.handle(c, &mut store), Err(Halt::Retry { .. })), "changes before welcome");
        s.handle(msg(json!({"type":"welcome","generation":7,"mode":"snapshot","watermark":"0/100"})), &mut store)
            .unwrap();
        let open = changes(("0/1", 0), json!([{"lsn":"0/1","xid":"1","commit_time":"t","last":false,"ops":[ins(1)]}]));
        s.handle(open, &mut store).unwrap();
        let other = changes(("0/2", 0), json!([{"lsn":"0/2","xid":"1","commit_time":"t","last":true,"ops":[ins(1)]}]));
        assert!(matches!(s.handle(other, &mut store), Err(Halt::Retry { .. })), "interleaved transaction");
        let mut s = Session::new(
            vec![Shape { columns: Some(vec!["v".into()]), ..Shape::table("items", "public.items") }],
            None,
        );
        s.handle(msg(json!({"type":"welcome","generation":7,"mode":"snapshot","watermark":"0/100"})), &mut store)
            .unwrap();
        let begin = msg(
            json!({"type":"snapshot_begin","snapshot_id":"s","shape_id":"items","schema":{"key":["id"],"columns":[]}}),
        );
        assert!(matches!(s.handle(begin, &mut store), Err(Halt::Stop(ClientError::Config(_)))));
    }
}
