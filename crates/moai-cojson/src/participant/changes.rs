//! CoMap change ops and the exact text of a transaction's `changes`.
//!
//! cojson writes `changes` with `JSON.stringify`: keys in insertion order (`op`, `key`, `value`),
//! numbers as JavaScript prints them, strings escaped like JSON. The text is both what a trusting
//! transaction carries and the plaintext a private one encrypts, so it must match byte for byte
//! (docs/protocols/cojson-participant.md §4). Reading goes the other way: parse the text (or the
//! decrypted bytes) into ops, tolerating anything a foreign writer may have put there.

use crate::canonical_json::{js_number_text, write_json_string};
use serde_json::{json, Value};

/// Largest `changes` text a writer may produce (`MAX_TX_SIZE_BYTES`).
pub const MAX_CHANGES_BYTES: usize = 1024 * 1024;

/// `JSON.stringify(value)` for a JSON value: insertion order, JavaScript number text.
pub fn json_stringify(value: &Value) -> String {
    let mut out = String::new();
    write(&mut out, value);
    out
}

fn write(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&js_number_text(n)),
        Value::String(s) => write_json_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, k);
                out.push(':');
                write(out, v);
            }
            out.push('}');
        }
    }
}

/// `{"op":"set","key":…,"value":…}`.
pub fn set_op(key: &str, value: Value) -> Value {
    json!({"op": "set", "key": key, "value": value})
}

/// `{"op":"del","key":…}`.
pub fn del_op(key: &str) -> Value {
    json!({"op": "del", "key": key})
}

/// `{"op":"pre","value":…,"before":"end"}`: a CoList item inserted before the list's end, which
/// cojson's list order puts after every item inserted relative to the start or to other items,
/// and after earlier end-insertions (what `RawCoList.prepend` writes into an empty list).
pub fn append_at_end_op(value: Value) -> Value {
    json!({"op": "pre", "value": value, "before": "end"})
}

/// One op of a CoMap transaction, as a reader sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum MapOp {
    Set { key: String, value: Value },
    Del { key: String },
}

/// Parses a `changes` text (or decrypted plaintext) into a JSON array; `None` if it is not one.
pub fn parse_changes(text: &[u8]) -> Option<Vec<Value>> {
    match serde_json::from_slice(text).ok()? {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

/// A change as a CoMap op; anything else (no string key, unknown op) is `None`. A `set` without
/// `value` sets `null`.
pub fn map_op(change: &Value) -> Option<MapOp> {
    let key = change.get("key")?.as_str()?.to_string();
    match change.get("op")?.as_str()? {
        "set" => Some(MapOp::Set { key, value: change.get("value").cloned().unwrap_or(Value::Null) }),
        "del" => Some(MapOp::Del { key }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stringify_keeps_insertion_order_and_js_numbers() {
        let v: Value =
            serde_json::from_str(r#"[{"op":"set","key":"k","value":{"z":1.0,"a":[1e21,"é\n\u0001"]}}]"#).unwrap();
        assert_eq!(json_stringify(&v), r#"[{"op":"set","key":"k","value":{"z":1,"a":[1e+21,"é\n\u0001"]}}]"#);
        assert_eq!(json_stringify(&set_op("a", json!(true))), r#"{"op":"set","key":"a","value":true}"#);
        assert_eq!(json_stringify(&del_op("a")), r#"{"op":"del","key":"a"}"#);
    }

    #[test]
    fn parsing_is_tolerant() {
        assert_eq!(parse_changes(b"[1]"), Some(vec![json!(1)]));
        assert_eq!(parse_changes(b"{}"), None);
        assert_eq!(parse_changes(b"\xff"), None);
        assert_eq!(map_op(&json!({"op":"set","key":"a"})), Some(MapOp::Set { key: "a".into(), value: Value::Null }));
        assert_eq!(map_op(&json!({"op":"del","key":"a"})), Some(MapOp::Del { key: "a".into() }));
        assert_eq!(map_op(&json!({"op":"set","key":1,"value":2})), None);
        assert_eq!(map_op(&json!({"op":"push","key":"a"})), None);
        assert_eq!(map_op(&json!(5)), None);
    }
}
