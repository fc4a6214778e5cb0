//! `RawRow`: a row or key as the JSON object text it will be sent as, passed through unparsed.
//!
//! Why: catch-up replays `change_history` to clients, and each row is stored as `jsonb`. The
//! binary form PostgreSQL sends for `jsonb` is a version byte plus the JSON text, so a page can
//! go from the database to the WebSocket frame without building a `serde_json::Value` tree and
//! encoding it again. Building and freeing those trees was most of moai's CPU per row in the
//! catch-up profile. Rows are parsed only when a shape has to look inside them (a predicate
//! or a column list), see `filter::filter_op`.
//!
//! The text is validated once as JSON (`RawValue`) and checked to be an object, so what is
//! spliced into a frame is always well-formed. Numbers keep PostgreSQL's exact text.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::protocol::Row;

#[derive(Clone)]
pub struct RawRow(Box<RawValue>);

#[derive(Debug, thiserror::Error)]
pub enum RawRowError {
    #[error("row is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("row is JSON but not an object")]
    NotAnObject,
}

impl RawRow {
    /// From JSON text (e.g. a `jsonb` column), validated: it must be one JSON object.
    pub fn from_json(text: String) -> Result<RawRow, RawRowError> {
        let raw = RawValue::from_string(text)?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(RawRowError::NotAnObject);
        }
        Ok(RawRow(raw))
    }

    /// From a parsed row (encoding a map of JSON values cannot fail).
    pub fn from_row(row: &Row) -> RawRow {
        match serde_json::value::to_raw_value(row) {
            Ok(raw) => RawRow(raw),
            Err(_) => RawRow::empty(),
        }
    }

    pub fn empty() -> RawRow {
        RawRow(RawValue::from_string("{}".to_owned()).expect("{} is JSON"))
    }

    /// The JSON text.
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// Parse into column → value (for predicates and projections).
    pub fn to_row(&self) -> Row {
        // Validated as a JSON object at construction, so this parse cannot fail.
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl Default for RawRow {
    fn default() -> Self {
        RawRow::empty()
    }
}

impl From<Row> for RawRow {
    fn from(row: Row) -> Self {
        RawRow::from_row(&row)
    }
}

/// Equal when they denote the same object (member order and spacing do not matter).
impl PartialEq for RawRow {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json() || self.to_row() == other.to_row()
    }
}

impl fmt::Debug for RawRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json())
    }
}

impl Serialize for RawRow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Through a parsed row, not `RawValue`: the server never decodes its own frames except in
/// tests and tools, and the messages holding rows are internally tagged enums, whose buffered
/// deserialisation cannot produce a `RawValue`.
impl<'de> Deserialize<'de> for RawRow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(RawRow::from_row(&Row::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn passes_text_through_and_compares_by_value() {
        let a = RawRow::from_json(r#"{"id": 1, "n": 12345678901234567890123}"#.to_owned()).unwrap();
        // Spliced verbatim: the big number keeps its digits.
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"id": 1, "n": 12345678901234567890123}"#);
        let b = RawRow::from_json(r#"{"n":12345678901234567890123,"id":1}"#.to_owned()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, RawRow::from_json(r#"{"id":2}"#.to_owned()).unwrap());
    }

    #[test]
    fn rejects_what_is_not_one_object() {
        for bad in ["", "[1]", "1", "\"x\"", "{", "{} {}", "{\"a\":}", "null"] {
            assert!(RawRow::from_json(bad.to_owned()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn round_trips_rows() {
        let row: Row = serde_json::from_value(json!({"id": 7, "t": "a\"b", "x": null})).unwrap();
        let raw = RawRow::from_row(&row);
        assert_eq!(raw.to_row(), row);
        let back: RawRow = serde_json::from_str(&serde_json::to_string(&raw).unwrap()).unwrap();
        assert_eq!(back, raw);
    }
}
