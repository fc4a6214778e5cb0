//! The cojson sync wire messages, and the text-frame framing around them.
//!
//! Decoding is done by hand from a `serde_json::Value` rather than by derived
//! `Deserialize`, for three reasons:
//! * every failure becomes a typed [`MessageError`] naming the field, and no
//!   input can panic;
//! * unknown fields must survive: each message keeps them in `extra` and
//!   writes them back, so a forwarded message loses nothing;
//! * payloads the relay must not reinterpret stay `Value`s: the header and
//!   each transaction. With serde_json's `preserve_order` and
//!   `arbitrary_precision` features, re-serializing such a `Value` keeps key
//!   order and the exact number text, i.e. every field value as received.
//!   Signatures cover only the canonical projection of a transaction
//!   ([`crate::transaction_hash`]), so byte-exact forwarding is not needed for
//!   validity — but preserving values exactly is what keeps that projection
//!   identical on the receiving client, and it keeps `madeAt` etc. untouched.
//!
//! Structural checks only: IDs must look like IDs (as cojson checks them),
//! counts must be non-negative integers. Signatures, hashes and transaction
//! shapes are checked by verification, because a bad one there has a protocol
//! answer (mark the CoValue errored for that peer), not "drop the frame".

use crate::canonical_json::js_number_value;
use crate::ids::{CoId, IdError, SessionId};
use crate::known_state::{KnownState, SessionCounts};
use serde_json::{Map, Number, Value};
use std::sync::{Arc, OnceLock};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("message is not a JSON object")]
    NotAnObject,
    #[error("unknown action {0:?}")]
    UnknownAction(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}`: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error(transparent)]
    Id(#[from] IdError),
}

/// A message failed to decode; `line` is its 0-based position in the frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {error}")]
pub struct LineError {
    pub line: usize,
    pub error: MessageError,
}

/// `{"action":"known", …}`, optionally a correction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownMessage {
    pub state: KnownState,
    /// `isCorrection: true`: "your assumption about me was wrong; resend from
    /// this state". Absent and `false` are the same.
    pub is_correction: bool,
    /// Declared by cojson, never acted on; kept for round-tripping.
    pub as_dependency_of: Option<CoId>,
    pub extra: Map<String, Value>,
}

/// New transactions of one session in a `content` message.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionNewContent {
    /// How many transactions of this session the sender assumes the receiver
    /// already has; `new_transactions[0]` has index `after`.
    pub after: u64,
    /// Opaque transaction objects, exactly as received.
    pub new_transactions: Vec<Value>,
    /// `signature_z…` after the last transaction; checked by verification.
    pub last_signature: String,
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ContentMessage {
    pub id: CoId,
    /// The header object as received (insertion order kept).
    pub header: Option<Value>,
    /// 0, 3 or 6 in practice. Optional because it carries no meaning for a
    /// relay that recomputes priority from the header.
    pub priority: Option<u8>,
    /// Session keys stay strings here: an invalid one is a verification
    /// failure with a protocol answer, not a framing error.
    pub new: Vec<(String, SessionNewContent)>,
    pub expect_content_until: Option<SessionCounts>,
    pub extra: Map<String, Value>,
}

impl ContentMessage {
    /// About how many bytes this message takes (its strings and numbers, as on the wire): what
    /// holding it costs, for the relay's per-peer bounds. Linear in the message, no allocation.
    pub fn approx_bytes(&self) -> usize {
        fn value(v: &Value) -> usize {
            match v {
                Value::String(s) => s.len() + 2,
                Value::Array(a) => 2 + a.iter().map(value).sum::<usize>(),
                Value::Object(o) => 2 + o.iter().map(|(k, v)| k.len() + 3 + value(v)).sum::<usize>(),
                _ => 8,
            }
        }
        let header = self.header.as_ref().map_or(0, value);
        let sessions: usize = self
            .new
            .iter()
            .map(|(key, s)| key.len() + s.last_signature.len() + s.new_transactions.iter().map(value).sum::<usize>())
            .sum();
        64 + self.id.as_str().len() + header + sessions
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileMessage {
    /// Batch ID, echoed back in `reconcile-ack`.
    pub id: String,
    /// `(coID, shortHash of the sender's sessions)`.
    pub values: Vec<(CoId, String)>,
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SyncMessage {
    /// `load`: "I am interested; this is what I have". `extra` is kept.
    Load(KnownState, Map<String, Value>),
    Known(KnownMessage),
    Content(ContentMessage),
    /// Legacy; ignored on receive.
    Done(CoId),
    Reconcile(ReconcileMessage),
    ReconcileAck(String),
}

/// Server keepalive `{"type":"ping","time":<epoch ms>,"dc":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub time: u64,
    pub dc: String,
}

/// One decoded line of a frame, classified like cojson-transport-ws does:
/// an object with `action` is a sync message, else one with `time` is a ping,
/// anything else is ignored.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // transient per-line value; boxing buys nothing
pub enum Incoming {
    Sync(SyncMessage),
    Ping { time: Option<f64> },
    Ignored,
}

// ---------- decoding ----------

fn field<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a Value, MessageError> {
    obj.get(name).ok_or(MessageError::MissingField(name))
}

fn bad(field: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError::BadField { field, reason: reason.into() }
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, MessageError> {
    field(obj, name)?.as_str().ok_or_else(|| bad(name, "expected a string"))
}

/// A non-negative integer as JS sees it (`2.0` is 2), limited to 2^53 so the
/// value means the same to every peer.
pub(crate) fn js_count(v: &Value) -> Option<u64> {
    let n = v.as_number()?;
    let x = js_number_value(n);
    if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x <= 9_007_199_254_740_992.0 {
        Some(x as u64)
    } else {
        None
    }
}

fn counts(v: &Value, name: &'static str) -> Result<SessionCounts, MessageError> {
    let obj = v.as_object().ok_or_else(|| bad(name, "expected an object"))?;
    let mut out = SessionCounts::new();
    for (k, c) in obj {
        let session = SessionId::parse(k)?;
        let count = js_count(c).ok_or_else(|| bad(name, format!("count for {k} is not a non-negative integer")))?;
        out.insert(session, count);
    }
    Ok(out)
}

fn co_id(obj: &Map<String, Value>) -> Result<CoId, MessageError> {
    Ok(CoId::parse(str_field(obj, "id")?)?)
}

fn rest(obj: &Map<String, Value>, known: &[&str]) -> Map<String, Value> {
    obj.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn known_state(obj: &Map<String, Value>) -> Result<KnownState, MessageError> {
    let id = co_id(obj)?;
    let header = field(obj, "header")?.as_bool().ok_or_else(|| bad("header", "expected a boolean"))?;
    let sessions = counts(field(obj, "sessions")?, "sessions")?;
    Ok(KnownState { id, header, sessions })
}

const KNOWN_STATE_FIELDS: [&str; 4] = ["action", "id", "header", "sessions"];

fn session_content(v: &Value) -> Result<SessionNewContent, MessageError> {
    let obj = v.as_object().ok_or_else(|| bad("new", "session entry is not an object"))?;
    let after = js_count(field(obj, "after")?).ok_or_else(|| bad("after", "not a non-negative integer"))?;
    let new_transactions =
        field(obj, "newTransactions")?.as_array().ok_or_else(|| bad("newTransactions", "expected an array"))?.clone();
    let last_signature = str_field(obj, "lastSignature")?.to_string();
    Ok(SessionNewContent {
        after,
        new_transactions,
        last_signature,
        extra: rest(obj, &["after", "newTransactions", "lastSignature"]),
    })
}

fn content(obj: &Map<String, Value>) -> Result<ContentMessage, MessageError> {
    let id = co_id(obj)?;
    let header = match obj.get("header") {
        None | Some(Value::Null) => None,
        Some(h @ Value::Object(_)) => Some(h.clone()),
        Some(_) => return Err(bad("header", "expected an object")),
    };
    let priority = match obj.get("priority") {
        None => None,
        Some(p) => Some(
            js_count(p)
                .and_then(|p| u8::try_from(p).ok())
                .ok_or_else(|| bad("priority", "expected a small integer"))?,
        ),
    };
    let new_obj = field(obj, "new")?.as_object().ok_or_else(|| bad("new", "expected an object"))?;
    let mut new = Vec::with_capacity(new_obj.len());
    for (session, entry) in new_obj {
        new.push((session.clone(), session_content(entry)?));
    }
    let expect_content_until = match obj.get("expectContentUntil") {
        None | Some(Value::Null) => None,
        Some(v) => Some(counts(v, "expectContentUntil")?),
    };
    Ok(ContentMessage {
        id,
        header,
        priority,
        new,
        expect_content_until,
        extra: rest(obj, &["action", "id", "header", "priority", "new", "expectContentUntil"]),
    })
}

fn reconcile(obj: &Map<String, Value>) -> Result<ReconcileMessage, MessageError> {
    let id = str_field(obj, "id")?.to_string();
    let arr = field(obj, "values")?.as_array().ok_or_else(|| bad("values", "expected an array"))?;
    let mut values = Vec::with_capacity(arr.len());
    for pair in arr {
        match pair.as_array().map(Vec::as_slice) {
            Some([Value::String(co), Value::String(hash)]) => values.push((CoId::parse(co)?, hash.clone())),
            _ => return Err(bad("values", "entries must be [coID, sessionsHash]")),
        }
    }
    Ok(ReconcileMessage { id, values, extra: rest(obj, &["action", "id", "values"]) })
}

impl SyncMessage {
    /// Decodes a message object (one with an `action` key).
    pub fn from_value(v: &Value) -> Result<SyncMessage, MessageError> {
        let obj = v.as_object().ok_or(MessageError::NotAnObject)?;
        let action = str_field(obj, "action")?;
        match action {
            "load" => Ok(SyncMessage::Load(known_state(obj)?, rest(obj, &KNOWN_STATE_FIELDS))),
            "known" => {
                let state = known_state(obj)?;
                let is_correction = match obj.get("isCorrection") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(bad("isCorrection", "expected a boolean")),
                };
                let as_dependency_of = match obj.get("asDependencyOf") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(CoId::parse(s)?),
                    Some(_) => return Err(bad("asDependencyOf", "expected a string")),
                };
                Ok(SyncMessage::Known(KnownMessage {
                    state,
                    is_correction,
                    as_dependency_of,
                    extra: rest(obj, &["action", "id", "header", "sessions", "isCorrection", "asDependencyOf"]),
                }))
            }
            "content" => Ok(SyncMessage::Content(content(obj)?)),
            "done" => Ok(SyncMessage::Done(co_id(obj)?)),
            "reconcile" => Ok(SyncMessage::Reconcile(reconcile(obj)?)),
            "reconcile-ack" => Ok(SyncMessage::ReconcileAck(str_field(obj, "id")?.to_string())),
            other => Err(MessageError::UnknownAction(other.to_string())),
        }
    }

    /// Decodes one JSON text holding one message.
    pub fn from_json(text: &str) -> Result<SyncMessage, MessageError> {
        let v: Value = serde_json::from_str(text).map_err(|e| MessageError::Json(e.to_string()))?;
        Self::from_value(&v)
    }
}

fn classify(v: &Value) -> Result<Incoming, MessageError> {
    let Some(obj) = v.as_object() else { return Ok(Incoming::Ignored) };
    if obj.contains_key("action") {
        return SyncMessage::from_value(v).map(Incoming::Sync);
    }
    if let Some(time) = obj.get("time") {
        return Ok(Incoming::Ping { time: time.as_number().map(js_number_value) });
    }
    Ok(Incoming::Ignored)
}

/// The shape of almost every line a client sends a relay: a plain `known` (the ack of each
/// content message). Decoded straight from the text, without building a `Value` tree. Anything
/// else (other fields, escapes in strings, counts written as floats, bad IDs, duplicate
/// fields…) fails here and takes the general path, which then decides exactly as before.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainKnown<'a> {
    action: &'a str,
    id: &'a str,
    header: bool,
    #[serde(borrow)]
    sessions: std::collections::BTreeMap<&'a str, u64>,
    #[serde(rename = "isCorrection", default)]
    is_correction: Option<bool>,
    #[serde(rename = "asDependencyOf", default, borrow)]
    as_dependency_of: Option<&'a str>,
}

fn plain_known(text: &str) -> Option<SyncMessage> {
    let k: PlainKnown<'_> = serde_json::from_str(text).ok()?;
    if k.action != "known" {
        return None;
    }
    let id = CoId::parse(k.id).ok()?;
    let mut sessions = SessionCounts::new();
    for (session, count) in k.sessions {
        if count > 9_007_199_254_740_992 {
            return None;
        }
        sessions.insert(SessionId::parse(session).ok()?, count);
    }
    let as_dependency_of = match k.as_dependency_of {
        None => None,
        Some(dep) => Some(CoId::parse(dep).ok()?),
    };
    Some(SyncMessage::Known(KnownMessage {
        state: KnownState { id, header: k.header, sessions },
        is_correction: k.is_correction.unwrap_or(false),
        as_dependency_of,
        extra: Map::new(),
    }))
}

/// Splits a text frame on `"\n"` and decodes each part independently: a bad
/// line yields an error for that line only. (cojson-transport-ws drops the
/// whole frame if any part fails to `JSON.parse`; per-line results let the
/// edge choose either policy — see `frame_is_clean`.) An empty frame holds
/// no messages. Trailing `\r` is not stripped, as in cojson.
pub fn parse_frame(frame: &str) -> Vec<Result<Incoming, LineError>> {
    if frame.is_empty() {
        return Vec::new();
    }
    frame
        .split('\n')
        .enumerate()
        .map(|(line, text)| {
            if let Some(msg) = plain_known(text) {
                return Ok(Incoming::Sync(msg));
            }
            serde_json::from_str::<Value>(text)
                .map_err(|e| MessageError::Json(e.to_string()))
                .and_then(|v| classify(&v))
                .map_err(|error| LineError { line, error })
        })
        .collect()
}

/// True if every line of a parsed frame was at least valid JSON, i.e. the
/// frame is one cojson would not have dropped as a whole.
pub fn frame_is_clean(lines: &[Result<Incoming, LineError>]) -> bool {
    lines.iter().all(|l| !matches!(l, Err(LineError { error: MessageError::Json(_), .. })))
}

// ---------- encoding ----------

fn counts_value(c: &SessionCounts) -> Value {
    Value::Object(c.iter().map(|(s, n)| (s.as_str().to_string(), Value::Number(Number::from(*n)))).collect())
}

fn put_known_state(obj: &mut Map<String, Value>, s: &KnownState) {
    obj.insert("id".into(), Value::String(s.id.as_str().to_string()));
    obj.insert("header".into(), Value::Bool(s.header));
    obj.insert("sessions".into(), counts_value(&s.sessions));
}

fn put_extra(obj: &mut Map<String, Value>, extra: &Map<String, Value>) {
    for (k, v) in extra {
        // Never let an unknown field shadow one we wrote.
        if !obj.contains_key(k) {
            obj.insert(k.clone(), v.clone());
        }
    }
}

impl SyncMessage {
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        match self {
            SyncMessage::Load(state, extra) => {
                obj.insert("action".into(), "load".into());
                put_known_state(&mut obj, state);
                put_extra(&mut obj, extra);
            }
            SyncMessage::Known(k) => {
                obj.insert("action".into(), "known".into());
                if k.is_correction {
                    obj.insert("isCorrection".into(), Value::Bool(true));
                }
                if let Some(dep) = &k.as_dependency_of {
                    obj.insert("asDependencyOf".into(), dep.as_str().into());
                }
                put_known_state(&mut obj, &k.state);
                put_extra(&mut obj, &k.extra);
            }
            SyncMessage::Content(c) => {
                obj.insert("action".into(), "content".into());
                obj.insert("id".into(), c.id.as_str().into());
                if let Some(h) = &c.header {
                    obj.insert("header".into(), h.clone());
                }
                if let Some(p) = c.priority {
                    obj.insert("priority".into(), Value::Number(Number::from(p)));
                }
                let mut new = Map::new();
                for (session, entry) in &c.new {
                    let mut e = Map::new();
                    e.insert("after".into(), Value::Number(Number::from(entry.after)));
                    e.insert("newTransactions".into(), Value::Array(entry.new_transactions.clone()));
                    e.insert("lastSignature".into(), entry.last_signature.clone().into());
                    put_extra(&mut e, &entry.extra);
                    new.insert(session.clone(), Value::Object(e));
                }
                obj.insert("new".into(), Value::Object(new));
                if let Some(until) = &c.expect_content_until {
                    obj.insert("expectContentUntil".into(), counts_value(until));
                }
                put_extra(&mut obj, &c.extra);
            }
            SyncMessage::Done(id) => {
                obj.insert("action".into(), "done".into());
                obj.insert("id".into(), id.as_str().into());
            }
            SyncMessage::Reconcile(r) => {
                obj.insert("action".into(), "reconcile".into());
                obj.insert("id".into(), r.id.clone().into());
                let values =
                    r.values.iter().map(|(co, h)| Value::Array(vec![co.as_str().into(), h.clone().into()])).collect();
                obj.insert("values".into(), Value::Array(values));
                put_extra(&mut obj, &r.extra);
            }
            SyncMessage::ReconcileAck(id) => {
                obj.insert("action".into(), "reconcile-ack".into());
                obj.insert("id".into(), id.clone().into());
            }
        }
        Value::Object(obj)
    }

    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }
}

impl Ping {
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        obj.insert("type".into(), "ping".into());
        obj.insert("time".into(), Value::Number(Number::from(self.time)));
        obj.insert("dc".into(), self.dc.clone().into());
        Value::Object(obj).to_string()
    }
}

/// A message on its way out, cheap to clone and shareable between recipients: when the same
/// content goes to many peers, the relay builds it once and every peer's queue gets the same
/// `Outgoing`. Its JSON text is made once, by whichever socket writes it first.
#[derive(Clone)]
pub struct Outgoing(Arc<OutgoingInner>);

struct OutgoingInner {
    msg: SyncMessage,
    json: OnceLock<String>,
    bytes: OnceLock<usize>,
}

impl Outgoing {
    pub fn new(msg: SyncMessage) -> Self {
        Outgoing(Arc::new(OutgoingInner { msg, json: OnceLock::new(), bytes: OnceLock::new() }))
    }

    pub fn message(&self) -> &SyncMessage {
        &self.0.msg
    }

    /// The message as one JSON line ([`SyncMessage::to_json`]), encoded on first use.
    pub fn json(&self) -> &str {
        self.0.json.get_or_init(|| self.0.msg.to_json())
    }

    /// About how many bytes the message takes, computed once however many peers it goes to:
    /// what the per-socket outbox bound counts.
    pub fn approx_bytes(&self) -> usize {
        *self.0.bytes.get_or_init(|| match &self.0.msg {
            SyncMessage::Content(c) => c.approx_bytes(),
            _ => 256,
        })
    }

    /// Whether both are the same shared message (not just equal ones).
    pub fn ptr_eq(a: &Outgoing, b: &Outgoing) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl From<SyncMessage> for Outgoing {
    fn from(msg: SyncMessage) -> Self {
        Outgoing::new(msg)
    }
}

impl std::ops::Deref for Outgoing {
    type Target = SyncMessage;
    fn deref(&self) -> &SyncMessage {
        &self.0.msg
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.msg.fmt(f)
    }
}

impl PartialEq for Outgoing {
    fn eq(&self, other: &Self) -> bool {
        Outgoing::ptr_eq(self, other) || self.0.msg == other.0.msg
    }
}

/// Joins messages into one frame with `"\n"`, as cojson's batching does.
/// (One message per frame is always accepted too.) Tests build client frames with it; a session
/// joins its already encoded outgoing messages itself.
#[cfg(test)]
pub fn encode_frame(messages: &[SyncMessage]) -> String {
    messages.iter().map(SyncMessage::to_json).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
