//! The `/api/sync` wire protocol as the client sees it (docs/pgsync-protocol.md).
//!
//! Parsed by hand from `serde_json::Value` rather than reusing moai-pgsync's serde types: that
//! crate depends on tokio-postgres and the replication stack, which an app embedding this
//! client should not compile. The cost is this file; the benefits are a small dependency list
//! and tolerant parsing: unknown fields are ignored and unknown message types are surfaced as
//! [`ServerMessage::Unknown`] (and skipped), so a newer server does not break an older client.

use serde_json::{json, Map, Value};

use super::error::ProtocolError;
use super::position::{Lsn, Position};

/// A row or key: column name → JSON value.
pub type Row = Map<String, Value>;

/// What the client subscribes to. `where_` uses the server's shape predicate syntax
/// (`owner_id = 'u1' AND done = false`); `columns` projects rows (list the key columns too:
/// the client keys its store by the table's key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub id: String,
    /// `schema.table`.
    pub table: String,
    pub columns: Option<Vec<String>>,
    pub where_: Option<String>,
}

impl Shape {
    /// The whole table.
    pub fn table(id: impl Into<String>, table: impl Into<String>) -> Self {
        Shape { id: id.into(), table: table.into(), columns: None, where_: None }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({"id": self.id, "table": self.table});
        if let Some(c) = &self.columns {
            v["columns"] = json!(c);
        }
        if let Some(w) = &self.where_ {
            v["where"] = json!(w);
        }
        v
    }
}

/// One row change inside a transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Insert {
        table: String,
        key: Row,
        row: Row,
    },
    /// A patch: `row` holds the columns sent; others (e.g. unchanged TOAST) keep their value.
    /// `old_key` is set when the key itself changed.
    Update {
        table: String,
        key: Row,
        old_key: Option<Row>,
        row: Row,
    },
    Delete {
        table: String,
        key: Row,
    },
    Truncate {
        table: String,
    },
}

/// A transaction, or with `last == false` one part of a transaction split across frames.
#[derive(Debug, Clone, PartialEq)]
pub struct TxnPart {
    pub lsn: Lsn,
    pub xid: String,
    pub commit_time: String,
    pub last: bool,
    pub ops: Vec<Op>,
}

/// A complete transaction as the store applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    /// Commit LSN.
    pub lsn: Lsn,
    pub xid: String,
    pub commit_time: String,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Welcome {
        generation: u64,
        snapshot: bool,
        watermark: Lsn,
    },
    MustRefetch {
        reason: String,
        shape_ids: Vec<String>,
    },
    SnapshotBegin {
        snapshot_id: String,
        shape_id: String,
        key: Vec<String>,
    },
    SnapshotBatch {
        snapshot_id: String,
        rows: Vec<Row>,
    },
    SnapshotEnd {
        snapshot_id: String,
    },
    Changes {
        to: Position,
        txns: Vec<TxnPart>,
    },
    UpToDate {
        position: Position,
        watermark: Lsn,
    },
    Status {
        state: String,
    },
    Error {
        code: String,
        message: String,
        retry_after_ms: Option<u64>,
        fatal: bool,
    },
    Pong {
        t: u64,
    },
    /// A message type this client does not know (from a newer server); ignored.
    Unknown {
        kind: String,
    },
}

fn err(m: impl Into<String>) -> ProtocolError {
    ProtocolError::new(m)
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value, ProtocolError> {
    v.get(name).ok_or_else(|| err(format!("missing field {name:?}")))
}

fn string(v: &Value, name: &str) -> Result<String, ProtocolError> {
    field(v, name)?.as_str().map(str::to_owned).ok_or_else(|| err(format!("{name:?} is not a string")))
}

/// Move an object member out of `v` (rows are the bulk of every frame: no copies).
fn take_object(v: &mut Value, name: &str) -> Result<Row, ProtocolError> {
    match v.get_mut(name).map(Value::take) {
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(err(format!("{name:?} is not an object"))),
        None => Err(err(format!("missing field {name:?}"))),
    }
}

fn take_array(v: &mut Value, name: &str) -> Result<Vec<Value>, ProtocolError> {
    match v.get_mut(name).map(Value::take) {
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(err(format!("{name:?} is not an array"))),
        None => Err(err(format!("missing field {name:?}"))),
    }
}

fn strings(v: &Value, name: &str) -> Result<Vec<String>, ProtocolError> {
    field(v, name)?
        .as_array()
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| err(format!("{name:?} is not an array of strings")))
}

fn lsn(v: &Value, name: &str) -> Result<Lsn, ProtocolError> {
    string(v, name)?.parse()
}

fn op(mut v: Value) -> Result<Op, ProtocolError> {
    let table = string(&v, "table")?;
    let kind = field(&v, "op")?.as_str().map(str::to_owned);
    Ok(match kind.as_deref() {
        Some("insert") => Op::Insert { table, key: take_object(&mut v, "key")?, row: take_object(&mut v, "row")? },
        Some("update") => Op::Update {
            table,
            key: take_object(&mut v, "key")?,
            old_key: match v.get_mut("old_key").map(Value::take) {
                Some(Value::Object(m)) => Some(m),
                _ => None,
            },
            row: take_object(&mut v, "row")?,
        },
        Some("delete") => Op::Delete { table, key: take_object(&mut v, "key")? },
        Some("truncate") => Op::Truncate { table },
        other => return Err(err(format!("unknown op {other:?}"))),
    })
}

fn txn_part(mut v: Value) -> Result<TxnPart, ProtocolError> {
    Ok(TxnPart {
        lsn: lsn(&v, "lsn")?,
        xid: v.get("xid").and_then(Value::as_str).unwrap_or_default().to_owned(),
        commit_time: v.get("commit_time").and_then(Value::as_str).unwrap_or_default().to_owned(),
        last: field(&v, "last")?.as_bool().ok_or_else(|| err("\"last\" is not a bool"))?,
        ops: take_array(&mut v, "ops")?.into_iter().map(op).collect::<Result<_, _>>()?,
    })
}

/// `changes` frames are the bulk of a catch-up (up to `max_batch_rows` rows each), so they are
/// decoded straight into these types instead of through a `Value` tree that is then taken
/// apart; that tree was most of the client's CPU per row. Same tolerance as the general path:
/// unknown fields are ignored, and the result is identical (a test compares both).
mod fast {
    use std::borrow::Cow;

    use serde::Deserialize;

    use super::Row;

    #[derive(Deserialize)]
    pub(super) struct Changes<'a> {
        #[serde(borrow)]
        pub to: Pos<'a>,
        #[serde(borrow)]
        pub txns: Vec<Txn<'a>>,
    }

    #[derive(Deserialize)]
    pub(super) struct Pos<'a> {
        #[serde(borrow)]
        pub lsn: Cow<'a, str>,
        pub seq: u32,
    }

    #[derive(Deserialize)]
    pub(super) struct Txn<'a> {
        #[serde(borrow)]
        pub lsn: Cow<'a, str>,
        #[serde(default)]
        pub xid: String,
        #[serde(default)]
        pub commit_time: String,
        pub last: bool,
        #[serde(borrow)]
        pub ops: Vec<Op<'a>>,
    }

    #[derive(Deserialize)]
    pub(super) struct Op<'a> {
        #[serde(borrow)]
        pub op: Cow<'a, str>,
        pub table: String,
        pub key: Option<Row>,
        pub old_key: Option<Row>,
        pub row: Option<Row>,
    }
}

fn changes_fast(text: &str) -> Result<ServerMessage, ProtocolError> {
    let c: fast::Changes = serde_json::from_str(text).map_err(|e| err(format!("bad changes frame: {e}")))?;
    let missing = |name: &str| err(format!("missing field {name:?}"));
    let mut txns = Vec::with_capacity(c.txns.len());
    for t in c.txns {
        let mut ops = Vec::with_capacity(t.ops.len());
        for o in t.ops {
            let table = o.table;
            ops.push(match &*o.op {
                "insert" => Op::Insert {
                    table,
                    key: o.key.ok_or_else(|| missing("key"))?,
                    row: o.row.ok_or_else(|| missing("row"))?,
                },
                "update" => Op::Update {
                    table,
                    key: o.key.ok_or_else(|| missing("key"))?,
                    old_key: o.old_key,
                    row: o.row.ok_or_else(|| missing("row"))?,
                },
                "delete" => Op::Delete { table, key: o.key.ok_or_else(|| missing("key"))? },
                "truncate" => Op::Truncate { table },
                other => return Err(err(format!("unknown op {other:?}"))),
            });
        }
        txns.push(TxnPart { lsn: t.lsn.parse()?, xid: t.xid, commit_time: t.commit_time, last: t.last, ops });
    }
    Ok(ServerMessage::Changes { to: Position { lsn: c.to.lsn.parse()?, seq: c.to.seq }, txns })
}

impl ServerMessage {
    pub fn parse(text: &str) -> Result<ServerMessage, ProtocolError> {
        // moai writes `type` first; a frame laid out differently takes the general path.
        if text.starts_with(r#"{"type":"changes","#) {
            return changes_fast(text);
        }
        let mut v: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let kind = string(&v, "type")?;
        Ok(match kind.as_str() {
            "welcome" => ServerMessage::Welcome {
                generation: field(&v, "generation")?.as_u64().ok_or_else(|| err("generation is not a u64"))?,
                snapshot: string(&v, "mode")? == "snapshot",
                watermark: lsn(&v, "watermark")?,
            },
            "must_refetch" => {
                ServerMessage::MustRefetch { reason: string(&v, "reason")?, shape_ids: strings(&v, "shape_ids")? }
            }
            "snapshot_begin" => ServerMessage::SnapshotBegin {
                snapshot_id: string(&v, "snapshot_id")?,
                shape_id: string(&v, "shape_id")?,
                key: strings(field(&v, "schema")?, "key")?,
            },
            "snapshot_batch" => ServerMessage::SnapshotBatch {
                snapshot_id: string(&v, "snapshot_id")?,
                rows: take_array(&mut v, "rows")?
                    .into_iter()
                    .map(|r| match r {
                        Value::Object(m) => Ok(m),
                        _ => Err(err("\"rows\" is not an array of objects")),
                    })
                    .collect::<Result<_, _>>()?,
            },
            "snapshot_end" => ServerMessage::SnapshotEnd { snapshot_id: string(&v, "snapshot_id")? },
            "changes" => ServerMessage::Changes {
                to: Position::from_json(field(&v, "to")?)?,
                txns: take_array(&mut v, "txns")?.into_iter().map(txn_part).collect::<Result<_, _>>()?,
            },
            "up_to_date" => ServerMessage::UpToDate {
                position: Position::from_json(field(&v, "position")?)?,
                watermark: lsn(&v, "watermark")?,
            },
            "status" => ServerMessage::Status { state: string(&v, "state")? },
            "error" => ServerMessage::Error {
                code: string(&v, "code")?,
                message: v.get("message").and_then(Value::as_str).unwrap_or_default().to_owned(),
                retry_after_ms: v.get("retry_after_ms").and_then(Value::as_u64),
                fatal: v.get("fatal").and_then(Value::as_bool).unwrap_or(false),
            },
            "pong" => ServerMessage::Pong { t: v.get("t").and_then(Value::as_u64).unwrap_or(0) },
            _ => ServerMessage::Unknown { kind },
        })
    }
}

/// The `hello` frame. `resume` is `None` for a new client (or after `must_refetch`).
pub fn hello(
    client_id: &str,
    shapes: &[Shape],
    resume: Option<super::position::ResumePoint>,
    max_batch_rows: Option<u32>,
    window: Option<u32>,
) -> String {
    let mut v = json!({
        "type": "hello",
        "protocol": 1,
        "client_id": client_id,
        "generation": resume.map(|r| r.generation),
        "position": resume.map(|r| r.position.to_json()),
        "shapes": shapes.iter().map(Shape::to_json).collect::<Vec<_>>(),
    });
    if let Some(n) = max_batch_rows {
        v["max_batch_rows"] = json!(n);
    }
    if let Some(w) = window {
        v["window"] = json!(w);
    }
    v.to_string()
}

pub fn ack(position: Position) -> String {
    json!({"type": "ack", "position": position.to_json()}).to_string()
}

pub fn ping(t: u64) -> String {
    json!({"type": "ping", "t": t}).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::position::ResumePoint;
    use super::*;

    #[test]
    fn parses_every_server_message() {
        let m = ServerMessage::parse(
            r#"{"type":"changes","from":null,"to":{"lsn":"0/16C0000","seq":3},"txns":[{"lsn":"0/16BFF10","xid":"7431",
            "commit_time":"2026-11-22T03:04:05.123Z","last":true,"ops":[
              {"seq":0,"op":"insert","table":"public.todos","key":{"id":9},"row":{"id":9,"t":"a"}},
              {"seq":1,"op":"update","table":"public.todos","key":{"id":3},"old_key":null,"row":{"id":3,"done":true},"unchanged":["body"]},
              {"seq":2,"op":"delete","table":"public.todos","key":{"id":4}},
              {"seq":3,"op":"truncate","table":"public.todos"}]}]}"#,
        )
        .unwrap();
        let ServerMessage::Changes { to, txns } = m else { panic!() };
        assert_eq!(to.seq, 3);
        assert_eq!(txns[0].ops.len(), 4);
        assert!(matches!(&txns[0].ops[1], Op::Update { old_key: None, .. }));
        assert_eq!(
            ServerMessage::parse(r#"{"type":"welcome","generation":7,"mode":"catchup","watermark":"0/1700000"}"#)
                .unwrap(),
            ServerMessage::Welcome { generation: 7, snapshot: false, watermark: "0/1700000".parse().unwrap() }
        );
        assert_eq!(
            ServerMessage::parse(
                r#"{"type":"error","code":"overloaded","message":"busy","retry_after_ms":2000,"fatal":true}"#
            )
            .unwrap(),
            ServerMessage::Error {
                code: "overloaded".into(),
                message: "busy".into(),
                retry_after_ms: Some(2000),
                fatal: true
            }
        );
        assert_eq!(
            ServerMessage::parse(r#"{"type":"hibernate","x":1}"#).unwrap(),
            ServerMessage::Unknown { kind: "hibernate".into() }
        );
        for bad in ["nope", r#"{"no":"type"}"#, r#"{"type":"changes","to":{"lsn":"x","seq":1},"txns":[]}"#] {
            assert!(ServerMessage::parse(bad).is_err(), "{bad}");
        }
    }

    /// The typed `changes` decoder and the general one agree, field by field, including
    /// escapes, nested JSON values, unknown fields and errors.
    #[test]
    fn changes_fast_path_matches_general_path() {
        let frame = r#"{"type":"changes","from":null,"to":{"lsn":"0/16C0000","seq":3},"extra":[1,{"a":2}],"txns":[
            {"lsn":"0/16BFF10","xid":"7431","commit_time":"2026-11-22T03:04:05.123Z","last":false,"future":true,"ops":[
              {"seq":0,"op":"insert","table":"public.t\u00e9","key":{"id":9},"row":{"id":9,"t":"a\"b\n","j":{"x":[1,2.5,null]},"big":12345678901234567890}},
              {"seq":1,"op":"update","table":"public.todos","key":{"id":3},"old_key":{"id":2},"row":{"id":3,"done":true},"unchanged":["body"]},
              {"seq":2,"op":"delete","table":"public.todos","key":{"id":4}},
              {"seq":3,"op":"truncate","table":"public.todos"}]},
            {"lsn":"0/16BFF20","last":true,"ops":[]}]}"#;
        assert!(frame.starts_with(r#"{"type":"changes","#));
        let fast = ServerMessage::parse(frame).unwrap();
        // The general path, reached by moving `type` away from the front.
        let general =
            ServerMessage::parse(&frame.replacen(r#"{"type":"changes","#, r#"{"from":null,"type":"changes","#, 1))
                .unwrap();
        assert_eq!(fast, general);
        let ServerMessage::Changes { txns, .. } = &fast else { panic!() };
        assert!(
            matches!(&txns[0].ops[0], Op::Insert { table, row, .. } if table == "public.t\u{e9}" && row["t"] == "a\"b\n")
        );
        for bad in [
            r#"{"type":"changes","to":{"lsn":"x","seq":1},"txns":[]}"#,
            r#"{"type":"changes","to":{"lsn":"0/1","seq":1},"txns":[{"lsn":"0/1","last":true,"ops":[{"op":"insert","table":"t","key":{}}]}]}"#,
            r#"{"type":"changes","to":{"lsn":"0/1","seq":1},"txns":[{"lsn":"0/1","last":true,"ops":[{"op":"merge","table":"t"}]}]}"#,
            r#"{"type":"changes","to":{"lsn":"0/1","seq":-1},"txns":[]}"#,
            r#"{"type":"changes","#,
        ] {
            assert!(ServerMessage::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hello_carries_resume_point_or_nulls() {
        let shapes = [Shape::table("items", "public.items")];
        let v: Value = serde_json::from_str(&hello("c1", &shapes, None, Some(500), None)).unwrap();
        assert_eq!(v["position"], Value::Null);
        assert_eq!(v["generation"], Value::Null);
        assert_eq!(v["max_batch_rows"], 500);
        assert!(v.get("window").is_none());
        let r = ResumePoint { generation: 9, position: Position::new("0/10".parse().unwrap(), 2) };
        let v: Value = serde_json::from_str(&hello("c1", &shapes, Some(r), None, Some(8))).unwrap();
        assert_eq!(v["position"], json!({"lsn":"0/10","seq":2}));
        assert_eq!(v["generation"], 9);
        assert_eq!(v["shapes"], json!([{"id":"items","table":"public.items"}]));
    }
}
