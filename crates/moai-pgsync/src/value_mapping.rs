//! pgoutput text values to JSON, by column type OID.
//!
//! Decisions (spec §6 flags this as open; these are the safe defaults):
//! * `bool` → JSON bool; `int2`/`int4`/`oid` → JSON number.
//! * `int8` → JSON number while it is within ±(2^53−1) (JavaScript's safe integers), otherwise a
//!   decimal string. Typical bigserial ids stay numbers; nothing silently loses precision. The
//!   column's type travels in `snapshot_begin.schema`, so clients can coerce consistently.
//! * `float4`/`float8` → JSON number when finite; `NaN`/`Infinity`/`-Infinity` stay strings.
//! * `json`/`jsonb` → embedded JSON value.
//! * Everything else (`numeric`, `text`, timestamps, `uuid`, arrays, enums, `bytea` as `\x…`,
//!   ranges, ...) → the Postgres text output unchanged. `numeric` is a string on purpose: it can
//!   exceed f64 precision.
//! * If a value does not parse as its declared type (which Postgres never sends), it is kept as
//!   its text rather than failing the whole stream: the original text is never lost.

use serde_json::{Number, Value};

use crate::pgoutput::{Oid, RelationCache};

pub const BOOL: Oid = 16;
pub const BYTEA: Oid = 17;
pub const INT8: Oid = 20;
pub const INT2: Oid = 21;
pub const INT4: Oid = 23;
pub const TEXT: Oid = 25;
pub const OID: Oid = 26;
pub const JSON: Oid = 114;
pub const FLOAT4: Oid = 700;
pub const FLOAT8: Oid = 701;
pub const VARCHAR: Oid = 1043;
pub const TIMESTAMP: Oid = 1114;
pub const TIMESTAMPTZ: Oid = 1184;
pub const NUMERIC: Oid = 1700;
pub const UUID: Oid = 2950;
pub const JSONB: Oid = 3802;

const MAX_SAFE_INT: i64 = (1 << 53) - 1;

pub fn text_to_json(type_oid: Oid, text: &str) -> Value {
    let fallback = || Value::String(text.to_owned());
    match type_oid {
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => fallback(),
        },
        INT2 | INT4 | OID => text.parse::<i64>().map(Value::from).unwrap_or_else(|_| fallback()),
        INT8 => match text.parse::<i64>() {
            Ok(v) if (-MAX_SAFE_INT..=MAX_SAFE_INT).contains(&v) => Value::from(v),
            _ => fallback(),
        },
        FLOAT4 | FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(fallback),
        JSON | JSONB => serde_json::from_str(text).unwrap_or_else(|_| fallback()),
        _ => fallback(),
    }
}

/// Type name for `snapshot_begin.schema`: builtin names, else the name from a pgoutput Type
/// message (enums, domains), else `oid:N`.
pub fn type_name(type_oid: Oid, relations: &RelationCache) -> String {
    let builtin = match type_oid {
        BOOL => "bool",
        BYTEA => "bytea",
        INT8 => "int8",
        INT2 => "int2",
        INT4 => "int4",
        TEXT => "text",
        OID => "oid",
        JSON => "json",
        FLOAT4 => "float4",
        FLOAT8 => "float8",
        VARCHAR => "varchar",
        TIMESTAMP => "timestamp",
        TIMESTAMPTZ => "timestamptz",
        NUMERIC => "numeric",
        UUID => "uuid",
        JSONB => "jsonb",
        _ => "",
    };
    if !builtin.is_empty() {
        return builtin.to_owned();
    }
    match relations.type_info(type_oid) {
        Some(t) => format!("{}.{}", t.namespace, t.name),
        None => format!("oid:{type_oid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_scalar_types() {
        assert_eq!(text_to_json(BOOL, "t"), json!(true));
        assert_eq!(text_to_json(BOOL, "f"), json!(false));
        assert_eq!(text_to_json(INT4, "-42"), json!(-42));
        assert_eq!(text_to_json(INT2, "7"), json!(7));
        assert_eq!(text_to_json(FLOAT8, "1.5"), json!(1.5));
        assert_eq!(text_to_json(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(text_to_json(FLOAT4, "Infinity"), json!("Infinity"));
        assert_eq!(text_to_json(NUMERIC, "12345678901234567890.5"), json!("12345678901234567890.5"));
        assert_eq!(text_to_json(TEXT, "hello"), json!("hello"));
        assert_eq!(text_to_json(TIMESTAMPTZ, "2026-01-01 00:00:00+00"), json!("2026-01-01 00:00:00+00"));
    }

    #[test]
    fn int8_is_number_only_within_safe_range() {
        assert_eq!(text_to_json(INT8, "9007199254740991"), json!(9007199254740991_i64));
        assert_eq!(text_to_json(INT8, "-9007199254740991"), json!(-9007199254740991_i64));
        assert_eq!(text_to_json(INT8, "9007199254740992"), json!("9007199254740992"));
        assert_eq!(text_to_json(INT8, "-9223372036854775808"), json!("-9223372036854775808"));
    }

    #[test]
    fn json_is_embedded_and_bad_values_keep_their_text() {
        assert_eq!(text_to_json(JSONB, r#"{"a": [1, null]}"#), json!({"a":[1,null]}));
        assert_eq!(text_to_json(JSON, "{oops"), json!("{oops"));
        assert_eq!(text_to_json(INT4, "12x"), json!("12x"));
        assert_eq!(text_to_json(BOOL, "yes"), json!("yes"));
    }

    #[test]
    fn type_names() {
        let cache = RelationCache::new();
        assert_eq!(type_name(INT8, &cache), "int8");
        assert_eq!(type_name(99999, &cache), "oid:99999");
    }
}
