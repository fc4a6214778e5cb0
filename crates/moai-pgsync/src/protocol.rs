//! The `/api/sync` client wire protocol (docs/pgsync-protocol.md §3 and §4) as serde types.
//!
//! Frames are JSON text, internally tagged by `"type"`. Types here are plain data: the session
//! state machine produces and consumes them and the WebSocket edge only (de)serialises. Unknown
//! fields are ignored so newer clients can add optional fields without breaking older servers;
//! unknown `type`s are rejected.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lsn::Lsn;
use crate::position::Position;
use crate::raw_row::RawRow;

/// The protocol major version this crate speaks (`hello.protocol`).
pub const PROTOCOL_VERSION: u32 = 1;

/// A row as JSON: column name → value.
pub type Row = Map<String, Value>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Hello(Hello),
    /// Durably applied through here; always a transaction end (docs/pgsync-protocol.md §3, `ack`).
    Ack {
        position: Position,
    },
    Subscribe {
        shapes: Vec<ShapeRequest>,
    },
    Unsubscribe {
        shape_ids: Vec<String>,
    },
    Ping {
        t: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub client_id: String,
    /// History generation the position belongs to; `None` for a new client.
    #[serde(default)]
    pub generation: Option<u64>,
    /// `None` (JSON `null`) = new client, needs a snapshot.
    #[serde(default)]
    pub position: Option<Position>,
    pub shapes: Vec<ShapeRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_rows: Option<u32>,
    /// Max unacked `changes` messages in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeRequest {
    pub id: String,
    /// `schema.table`.
    pub table: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// Predicate in the shape syntax of [`crate::shape`], e.g. `owner_id = 'u1' AND done = false`.
    #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
    pub where_: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome { generation: u64, mode: WelcomeMode, watermark: Lsn },
    MustRefetch { reason: RefetchReason, shape_ids: Vec<String> },
    SnapshotBegin { snapshot_id: String, shape_id: String, schema: ShapeSchema },
    SnapshotBatch { snapshot_id: String, rows: Vec<Row> },
    SnapshotEnd { snapshot_id: String },
    Changes { from: Option<Position>, to: Position, txns: Vec<WireTransaction> },
    UpToDate { position: Position, watermark: Lsn },
    Status { state: ServerState },
    Error(ErrorMessage),
    Pong { t: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WelcomeMode {
    Catchup,
    Snapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefetchReason {
    GenerationChanged,
    PositionTooOld,
    SchemaChanged,
    ShapeChanged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    Starting,
    ReplicationReconnecting,
    Ok,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeSchema {
    pub key: Vec<String>,
    pub columns: Vec<ColumnSchema>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
}

/// One transaction (or, with `last: false`, one page of a transaction bigger than a page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTransaction {
    /// Commit LSN.
    pub lsn: Lsn,
    /// Decimal text: xid8 exceeds JavaScript's safe integers.
    pub xid: String,
    pub commit_time: String,
    /// The client applies the transaction atomically once it has the part with `last: true`.
    pub last: bool,
    pub ops: Vec<WireOp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WireOp {
    Insert {
        seq: u32,
        table: String,
        key: RawRow,
        row: RawRow,
    },
    /// Patch semantics: `row` holds the sent columns, `unchanged` those left out (TOAST).
    Update {
        seq: u32,
        table: String,
        key: RawRow,
        /// The key before the update when it changed, else `null`.
        old_key: Option<RawRow>,
        row: RawRow,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unchanged: Vec<String>,
    },
    Delete {
        seq: u32,
        table: String,
        key: RawRow,
    },
    Truncate {
        seq: u32,
        table: String,
    },
}

impl WireOp {
    pub fn seq(&self) -> u32 {
        match self {
            WireOp::Insert { seq, .. }
            | WireOp::Update { seq, .. }
            | WireOp::Delete { seq, .. }
            | WireOp::Truncate { seq, .. } => *seq,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The server closes the socket after a fatal error.
    pub fatal: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    BadRequest,
    ShapeInvalid,
    Overloaded,
    Internal,
    /// Added by moai (docs/pgsync-protocol.md §10 item 7): the hello's position is above the
    /// server's watermark, i.e. it was not issued by this history (a client talking to a
    /// restored or different database). Fatal; the client must drop its data and reconnect with
    /// `position: null`.
    PositionAhead,
    /// Added by moai (docs/pgsync-protocol.md §10 item 10): the token is valid but does not open
    /// a table the hello asks for (see [`crate::access`]). Fatal; retrying with the same token
    /// cannot help.
    Forbidden,
    /// Added by moai (docs/pgsync-protocol.md §10 item 13): the hello (and any `subscribe` after
    /// it) asked for more shapes than the server lets one session hold
    /// (`PgSyncConfig::max_shapes_per_session`). Fatal.
    TooManyShapes,
}

/// Failure to read a client frame; the session answers with `error{bad_request}`.
#[derive(Debug, thiserror::Error)]
#[error("invalid client frame: {0}")]
pub struct FrameError(#[from] serde_json::Error);

impl ClientMessage {
    pub fn from_json(text: &str) -> Result<Self, FrameError> {
        Ok(serde_json::from_str(text)?)
    }
}

/// Why a frame that claims to be a hello does not parse, naming the field (serde's own error
/// for internally tagged enums has no path). `None` if the frame is not a hello object at all.
pub fn explain_bad_hello(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    let obj = v.as_object()?;
    if obj.get("type").and_then(Value::as_str) != Some("hello") {
        return None;
    }
    fn check<T: serde::de::DeserializeOwned>(obj: &Map<String, Value>, field: &str, required: bool) -> Option<String> {
        match obj.get(field) {
            None if required => Some(format!("{field}: missing")),
            None => None,
            Some(v) => serde_json::from_value::<T>(v.clone()).err().map(|e| format!("{field}: {e} (got {v})")),
        }
    }
    check::<u32>(obj, "protocol", true)
        .or_else(|| check::<String>(obj, "client_id", true))
        .or_else(|| check::<Option<u64>>(obj, "generation", false))
        .or_else(|| check::<Option<Position>>(obj, "position", false))
        .or_else(|| check::<Vec<ShapeRequest>>(obj, "shapes", true))
        .or_else(|| check::<Option<String>>(obj, "auth", false))
        .or_else(|| check::<Option<u32>>(obj, "max_batch_rows", false))
        .or_else(|| check::<Option<u32>>(obj, "window", false))
        .or_else(|| serde_json::from_value::<Hello>(v.clone()).err().map(|e| e.to_string()))
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: all map keys are strings and there are no
        // non-finite floats (serde_json::Value cannot hold them).
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"type":"error","code":"internal","message":"encode: {e}","fatal":true}}"#))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pos(lsn: &str, seq: u32) -> Position {
        Position::new(lsn.parse().unwrap(), seq)
    }

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn raw(v: Value) -> RawRow {
        RawRow::from_row(&row(v))
    }

    #[test]
    fn documented_hello_parses_ignoring_unknown_fields_and_round_trips() {
        let text = r#"{"type":"hello","protocol":1,"client_id":"5d1","generation":7,
            "position":{"lsn":"0/16B3748","seq":12},
            "shapes":[{"id":"todos","table":"public.todos","columns":["id","title"],
                       "where":"owner_id = 'u1'"}],
            "auth":"tok","max_batch_rows":1000,"window":4,"future_field":true}"#;
        let ClientMessage::Hello(h) = ClientMessage::from_json(text).unwrap() else { panic!() };
        assert_eq!(h.generation, Some(7));
        assert_eq!(h.position, Some(pos("0/16B3748", 12)));
        assert_eq!(h.shapes[0].where_.as_deref(), Some("owner_id = 'u1'"));
        assert_eq!(h.window, Some(4));
        let back = ClientMessage::from_json(&serde_json::to_string(&ClientMessage::Hello(h.clone())).unwrap()).unwrap();
        assert_eq!(back, ClientMessage::Hello(h));
    }

    #[test]
    fn new_client_hello_has_null_position() {
        let text = r#"{"type":"hello","protocol":1,"client_id":"c","position":null,"shapes":[]}"#;
        let ClientMessage::Hello(h) = ClientMessage::from_json(text).unwrap() else { panic!() };
        assert_eq!((h.position, h.generation), (None, None));
    }

    #[test]
    fn client_messages_round_trip_and_garbage_is_rejected() {
        for m in [
            ClientMessage::Ack { position: pos("0/16C0000", 3) },
            ClientMessage::Ping { t: 123 },
            ClientMessage::Unsubscribe { shape_ids: vec!["todos".into()] },
            ClientMessage::Subscribe {
                shapes: vec![ShapeRequest { id: "a".into(), table: "public.a".into(), columns: None, where_: None }],
            },
        ] {
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(ClientMessage::from_json(&text).unwrap(), m, "{text}");
        }
        assert_eq!(
            serde_json::to_value(ClientMessage::Ack { position: pos("0/16C0000", 3) }).unwrap(),
            json!({"type":"ack","position":{"lsn":"0/16C0000","seq":3}})
        );
        for bad in [
            r#"{"type":"launch_missiles"}"#,
            r#"{"type":"ack","position":{"lsn":"nope","seq":3}}"#,
            r#"{"type":"ack"}"#,
            r#"{"position":{"lsn":"0/1","seq":3}}"#,
            "not json",
        ] {
            assert!(ClientMessage::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_hellos_are_explained_by_field() {
        let base = r#"{"type":"hello","protocol":1,"client_id":"c","shapes":[]"#;
        for (extra, want) in [
            (r#","position":{"lsn":"zz","seq":1}}"#, "position: LSN must have the form X/Y"),
            // The exact serde text differs when serde_json's arbitrary_precision feature is on
            // (moai-cojson enables it for the whole binary), so only the field is pinned here.
            (r#","position":{"lsn":"0/1","seq":-1}}"#, "position: invalid"),
            (r#","position":"0/1"}"#, "position: invalid type: string"),
            (r#","generation":"7"}"#, "generation: invalid type: string"),
            (r#","window":1.5}"#, "window: invalid"),
        ] {
            let text = format!("{base}{extra}");
            assert!(ClientMessage::from_json(&text).is_err(), "{text}");
            let why = explain_bad_hello(&text).expect("explained");
            assert!(why.starts_with(want), "{why} should start with {want}");
        }
        assert_eq!(explain_bad_hello(r#"{"type":"hello"}"#).as_deref(), Some("protocol: missing"));
        assert_eq!(explain_bad_hello(r#"{"type":"ack"}"#), None);
        assert_eq!(explain_bad_hello("garbage"), None);
    }

    #[test]
    fn changes_message_serializes_ops_as_documented_and_round_trips() {
        let m = ServerMessage::Changes {
            from: Some(pos("0/16B3748", 12)),
            to: pos("0/16C0000", 3),
            txns: vec![WireTransaction {
                lsn: "0/16BFF10".parse().unwrap(),
                xid: "7431".into(),
                commit_time: "2026-11-22T03:04:05.123Z".into(),
                last: true,
                ops: vec![
                    WireOp::Insert {
                        seq: 0,
                        table: "public.todos".into(),
                        key: raw(json!({"id":9})),
                        row: raw(json!({"id":9,"title":"a"})),
                    },
                    WireOp::Update {
                        seq: 1,
                        table: "public.todos".into(),
                        key: raw(json!({"id":3})),
                        old_key: None,
                        row: raw(json!({"id":3,"done":true})),
                        unchanged: vec!["body".into()],
                    },
                    WireOp::Delete { seq: 2, table: "public.todos".into(), key: raw(json!({"id":4})) },
                    WireOp::Truncate { seq: 3, table: "public.todos".into() },
                ],
            }],
        };
        let v: Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["type"], "changes");
        assert_eq!(v["to"], json!({"lsn":"0/16C0000","seq":3}));
        let ops = &v["txns"][0]["ops"];
        assert_eq!(
            ops[1],
            json!({"seq":1,"op":"update","table":"public.todos","key":{"id":3},
            "old_key":null,"row":{"id":3,"done":true},"unchanged":["body"]})
        );
        assert_eq!(ops[3], json!({"seq":3,"op":"truncate","table":"public.todos"}));
        let back: ServerMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn server_messages_round_trip() {
        let lsn: Lsn = "0/1700000".parse().unwrap();
        let all = vec![
            ServerMessage::Welcome { generation: 7, mode: WelcomeMode::Catchup, watermark: lsn },
            ServerMessage::MustRefetch { reason: RefetchReason::GenerationChanged, shape_ids: vec!["todos".into()] },
            ServerMessage::SnapshotBegin {
                snapshot_id: "s-81".into(),
                shape_id: "todos".into(),
                schema: ShapeSchema {
                    key: vec!["id".into()],
                    columns: vec![ColumnSchema { name: "id".into(), type_name: "int8".into() }],
                },
            },
            ServerMessage::SnapshotBatch { snapshot_id: "s-81".into(), rows: vec![row(json!({"id":1,"title":"a"}))] },
            ServerMessage::SnapshotEnd { snapshot_id: "s-81".into() },
            ServerMessage::UpToDate { position: Position::end_of(lsn), watermark: lsn },
            ServerMessage::Status { state: ServerState::ReplicationReconnecting },
            ServerMessage::Error(ErrorMessage {
                code: ErrorCode::Overloaded,
                message: "busy".into(),
                retry_after_ms: Some(2000),
                fatal: false,
            }),
            ServerMessage::Pong { t: 123 },
        ];
        for m in all {
            let text = m.to_json();
            assert_eq!(serde_json::from_str::<ServerMessage>(&text).unwrap(), m, "{text}");
        }
        let err: Value = serde_json::from_str(
            &ServerMessage::Error(ErrorMessage {
                code: ErrorCode::Unauthorized,
                message: "expired".into(),
                retry_after_ms: None,
                fatal: true,
            })
            .to_json(),
        )
        .unwrap();
        assert_eq!(err, json!({"type":"error","code":"unauthorized","message":"expired","fatal":true}));
        let welcome: Value =
            serde_json::to_value(ServerMessage::Welcome { generation: 7, mode: WelcomeMode::Snapshot, watermark: lsn })
                .unwrap();
        assert_eq!(welcome, json!({"type":"welcome","generation":7,"mode":"snapshot","watermark":"0/1700000"}));
        let status = ServerMessage::Status { state: ServerState::ReplicationReconnecting }.to_json();
        assert_eq!(status, r#"{"type":"status","state":"replication_reconnecting"}"#);
    }
}
