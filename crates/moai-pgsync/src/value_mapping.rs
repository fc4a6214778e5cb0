//! Column values to JSON: the ONE mapping used by the stream, the change history and the
//! snapshot (docs/pgsync-protocol.md §13 "Value mapping").
//!
//! Input is always the text PostgreSQL's type *output function* produces: pgoutput sends it for
//! the stream (and the history stores the stream's mapped rows), and the snapshot reads rows with
//! the simple-query (text) protocol, which runs the same output functions. Never a `::text`
//! cast: casts differ from the output function (`bool::text` is `true`, `char(n)::text` trims the
//! padding, `inet::text` always shows the mask). Every moai connection pins the settings output
//! functions depend on (`db::SESSION_OPTIONS`: DateStyle, TimeZone, IntervalStyle,
//! extra_float_digits, bytea_output), so both paths see the same text.
//!
//! Mapping, by the column's type after resolving domains to their base type ([`Mapping`]):
//! * `bool` → JSON bool; `int2`/`int4`/`oid` → JSON number.
//! * `int8` → JSON number while it is within ±(2^53−1) (JavaScript's safe integers), otherwise a
//!   decimal string. Typical bigserial ids stay numbers; nothing silently loses precision (every
//!   number a client receives is exact in a double). The column's type travels in
//!   `snapshot_begin.schema`, so clients can coerce consistently.
//! * `float4`/`float8` → JSON number when finite; `NaN`/`Infinity`/`-Infinity` → those strings.
//! * `json`/`jsonb` → embedded JSON value.
//! * Every number (floats, and numbers inside json) is written as `jsonb` writes it: plain
//!   decimal notation without exponent (`1e+300` → `1000…0`, `1.5e-07` → `0.00000015`, `-0` →
//!   `0`), see [`plain_number`]: history rows are stored as `jsonb`, so this is what the
//!   history path sends, and the other paths send the same digits.
//! * `timestamp` → `2026-01-02T01:04:05[.ffffff]`; `timestamptz` (always UTC, the pinned
//!   TimeZone) → `2026-01-02T01:04:05[.ffffff]+00:00`; `timetz` → `01:04:05+00:00`: ISO 8601 /
//!   RFC 3339. `infinity`, `-infinity` and BC values keep PostgreSQL's text.
//! * Arrays → JSON arrays (nested for multi-dimensional ones) of the element mapping, NULL
//!   elements → null. Arrays with non-default lower bounds (`[0:1]={...}`) keep their text.
//! * Everything else (`numeric`, `text`, `varchar`, `char(n)` with its padding, `date`,
//!   `interval`, `uuid`, `inet`, enums, `bytea` as `\x…`, ranges, composites, ...) → the
//!   PostgreSQL text output unchanged. `numeric` is a string on purpose: it can exceed f64.
//! * If a value does not parse as its declared type (which Postgres never sends), it is kept as
//!   its text rather than failing the whole stream: the original text is never lost.
//!
//! Version: [`MAPPING_VERSION`] is stored with the history; a history written under another
//! version is discarded by starting a new generation (clients get `must_refetch`).

use std::collections::HashMap;

use serde_json::{Number, Value};

use crate::pgoutput::{Oid, RelationCache};

/// Version of this mapping, stored in `replication_state.mapping_version`. Bump whenever the
/// JSON produced for some stored value changes: history rows hold mapped values, so a changed
/// mapping starts a new history generation (see `replicator::setup`).
/// 1: until 2026-05: timestamps as Postgres text, arrays and domains as strings, snapshots read
///    through `::text` casts. 2: this module.
pub const MAPPING_VERSION: i32 = 2;

pub const BOOL: Oid = 16;
pub const BYTEA: Oid = 17;
pub const CHAR: Oid = 18;
pub const NAME: Oid = 19;
pub const INT8: Oid = 20;
pub const INT2: Oid = 21;
pub const INT4: Oid = 23;
pub const TEXT: Oid = 25;
pub const OID: Oid = 26;
pub const JSON: Oid = 114;
pub const FLOAT4: Oid = 700;
pub const FLOAT8: Oid = 701;
pub const INET: Oid = 869;
pub const BPCHAR: Oid = 1042;
pub const VARCHAR: Oid = 1043;
pub const DATE: Oid = 1082;
pub const TIME: Oid = 1083;
pub const TIMESTAMP: Oid = 1114;
pub const TIMESTAMPTZ: Oid = 1184;
pub const INTERVAL: Oid = 1186;
pub const TIMETZ: Oid = 1266;
pub const NUMERIC: Oid = 1700;
pub const UUID: Oid = 2950;
pub const JSONB: Oid = 3802;

const MAX_SAFE_INT: i64 = (1 << 53) - 1;

/// How a type's text becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapping {
    Bool,
    /// int2, int4, oid.
    Int,
    Int8,
    /// float4, float8.
    Float,
    Json,
    Timestamp,
    TimestampTz,
    TimeTz,
    /// The text unchanged.
    Text,
    /// Array of the element mapping; the byte is the element type's delimiter (`,` except `box`).
    Array(Box<Mapping>, u8),
}

/// The mapping of a builtin type (and of the arrays of the builtins moai names), or `None` when
/// the catalog must be asked (enums, domains, other arrays, extension types).
pub fn builtin_mapping(oid: Oid) -> Option<Mapping> {
    let arr = |m: Mapping| Some(Mapping::Array(Box::new(m), b','));
    match oid {
        BOOL => Some(Mapping::Bool),
        INT2 | INT4 | OID => Some(Mapping::Int),
        INT8 => Some(Mapping::Int8),
        FLOAT4 | FLOAT8 => Some(Mapping::Float),
        JSON | JSONB => Some(Mapping::Json),
        TIMESTAMP => Some(Mapping::Timestamp),
        TIMESTAMPTZ => Some(Mapping::TimestampTz),
        TIMETZ => Some(Mapping::TimeTz),
        BYTEA | CHAR | NAME | TEXT | INET | BPCHAR | VARCHAR | DATE | TIME | INTERVAL | NUMERIC | UUID
        | 650 /* cidr */ | 829 /* macaddr */ | 790 /* money */ | 142 /* xml */ => Some(Mapping::Text),
        1000 => arr(Mapping::Bool),
        1005 | 1007 | 1028 => arr(Mapping::Int),
        1016 => arr(Mapping::Int8),
        1021 | 1022 => arr(Mapping::Float),
        199 | 3807 => arr(Mapping::Json),
        1115 => arr(Mapping::Timestamp),
        1185 => arr(Mapping::TimestampTz),
        1270 => arr(Mapping::TimeTz),
        // bytea, char, name, text, bpchar, varchar, inet, cidr, date, time, interval, numeric,
        // uuid, macaddr, money, xml.
        1001 | 1002 | 1003 | 1009 | 1014 | 1015 | 1041 | 651 | 1182 | 1183 | 1187 | 1231 | 2951 | 1040 | 791
        | 143 => arr(Mapping::Text),
        _ => None,
    }
}

/// Mappings of the types a connection has met: builtins, plus what [`resolve`] found in the
/// catalog for the others. Unknown types map as [`Mapping::Text`].
#[derive(Debug, Default, Clone)]
pub struct TypeMap {
    resolved: HashMap<Oid, Mapping>,
}

impl TypeMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, oid: Oid) -> Mapping {
        builtin_mapping(oid).or_else(|| self.resolved.get(&oid).cloned()).unwrap_or(Mapping::Text)
    }

    /// Whether `oid` is builtin or already resolved.
    pub fn knows(&self, oid: Oid) -> bool {
        builtin_mapping(oid).is_some() || self.resolved.contains_key(&oid)
    }

    pub fn insert(&mut self, oid: Oid, mapping: Mapping) {
        self.resolved.insert(oid, mapping);
    }
}

/// The mapping of `oid` from the catalog: domains by their base type (recursively), arrays by
/// their element type, enums and anything unknown (including a type dropped since) as text.
pub async fn resolve<C: tokio_postgres::GenericClient + Sync>(
    client: &C,
    oid: Oid,
) -> Result<Mapping, tokio_postgres::Error> {
    let mut oid = oid;
    // Array levels above the current type, innermost last, with their element delimiters.
    let mut arrays: Vec<u8> = Vec::new();
    let mut base = Mapping::Text;
    for _ in 0..32 {
        if let Some(m) = builtin_mapping(oid) {
            base = m;
            break;
        }
        let row = client
            .query_opt(
                "SELECT t.typtype::text, t.typbasetype, t.typelem, t.typcategory::text, \
                        (SELECT e.typdelim::text FROM pg_type e WHERE e.oid = t.typelem) \
                 FROM pg_type t WHERE t.oid = $1",
                &[&oid],
            )
            .await?;
        let Some(row) = row else { break };
        let typtype: String = row.get(0);
        let basetype: Oid = row.get(1);
        let elem: Oid = row.get(2);
        let category: String = row.get(3);
        let delim: Option<String> = row.get(4);
        if typtype == "d" && basetype != 0 {
            oid = basetype;
        } else if category == "A" && elem != 0 {
            arrays.push(delim.and_then(|d| d.bytes().next()).unwrap_or(b','));
            oid = elem;
        } else {
            break;
        }
    }
    for delim in arrays.into_iter().rev() {
        base = Mapping::Array(Box::new(base), delim);
    }
    Ok(base)
}

/// A builtin type's text to JSON (non-builtin types map as text; use [`map_text`] with a
/// resolved [`Mapping`] for those).
pub fn text_to_json(type_oid: Oid, text: &str) -> Value {
    map_text(&builtin_mapping(type_oid).unwrap_or(Mapping::Text), text)
}

/// PostgreSQL output text to JSON under `mapping`.
pub fn map_text(mapping: &Mapping, text: &str) -> Value {
    let fallback = || Value::String(text.to_owned());
    match mapping {
        Mapping::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => fallback(),
        },
        Mapping::Int => text.parse::<i64>().map(Value::from).unwrap_or_else(|_| fallback()),
        Mapping::Int8 => match text.parse::<i64>() {
            Ok(v) if (-MAX_SAFE_INT..=MAX_SAFE_INT).contains(&v) => Value::from(v),
            _ => fallback(),
        },
        Mapping::Float => match text.parse::<f64>() {
            Ok(v) if v.is_finite() => plain_number(text).unwrap_or_else(fallback),
            _ => fallback(),
        },
        Mapping::Json => match serde_json::from_str::<Value>(text) {
            Ok(mut v) => {
                plain_numbers(&mut v);
                v
            }
            Err(_) => fallback(),
        },
        Mapping::Timestamp => Value::String(iso_timestamp(text, false)),
        Mapping::TimestampTz => Value::String(iso_timestamp(text, true)),
        Mapping::TimeTz => Value::String(match split_offset(text) {
            Some((time, offset)) => format!("{time}{}", full_offset(offset)),
            None => text.to_owned(),
        }),
        Mapping::Text => fallback(),
        Mapping::Array(elem, delim) => parse_array(text, elem, *delim).unwrap_or_else(fallback),
    }
}

/// A JSON number written the way `jsonb` (PostgreSQL `numeric`) writes it: plain decimal
/// notation, no exponent, the scale the literal implies (`1.50` keeps its zero, `1e+300` is a 1
/// and 300 zeros, `1.5e-07` is `0.00000015`, `-0` is `0`). History rows are stored as `jsonb`,
/// which rewrites numbers this way; writing them so from the start makes snapshot, stream and
/// history send the same digits. `None` when `t` is not a JSON number or its exponent is absurd.
fn plain_number(t: &str) -> Option<Value> {
    let (neg, unsigned) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    let (mantissa, exp) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], unsigned[i + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    if exp.abs() > 1000 {
        return None;
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if exp == 0
        && !(int.len() > 1 && int.starts_with('0'))
        && !(neg && mantissa.bytes().all(|b| b == b'0' || b == b'.'))
    {
        // Already plain (the common case): keep the text.
        return serde_json::from_str::<Number>(t).ok().map(Value::Number);
    }
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    let point = int.len() as i64 + exp;
    let scale = (frac.len() as i64 - exp).max(0);
    let digit = |i: i64| if i >= 0 && (i as usize) < digits.len() { digits[i as usize] as char } else { '0' };
    let mut int_part: String = (0..point.max(0)).map(digit).collect();
    let trimmed = int_part.trim_start_matches('0').len();
    int_part.drain(..int_part.len() - trimmed);
    if int_part.is_empty() {
        int_part.push('0');
    }
    let frac_part: String = (0..scale).map(|i| digit(point + i)).collect();
    let zero = digits.iter().all(|&d| d == b'0');
    let mut out = String::with_capacity(int_part.len() + frac_part.len() + 2);
    if neg && !zero {
        out.push('-');
    }
    out.push_str(&int_part);
    if scale > 0 {
        out.push('.');
        out.push_str(&frac_part);
    }
    serde_json::from_str::<Number>(&out).ok().map(Value::Number)
}

/// [`plain_number`] for every number inside a JSON value.
fn plain_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(Value::Number(p)) = plain_number(&n.to_string()) {
                *n = p;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(plain_numbers),
        Value::Object(m) => m.values_mut().for_each(plain_numbers),
        _ => {}
    }
}

/// `2026-01-02 01:04:05.5+00` → `2026-01-02T01:04:05.5+00:00` (ISO DateStyle input); anything
/// else (`infinity`, BC dates, another DateStyle) unchanged.
fn iso_timestamp(text: &str, with_offset: bool) -> String {
    let Some((date, time)) = text.split_once(' ') else { return text.to_owned() };
    let date_ok = date.len() >= 10
        && date.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && date.as_bytes()[date.len() - 3] == b'-';
    if !date_ok || time.contains(' ') {
        return text.to_owned();
    }
    if with_offset {
        match split_offset(time) {
            Some((t, offset)) if is_clock(t) => format!("{date}T{t}{}", full_offset(offset)),
            _ => text.to_owned(),
        }
    } else if is_clock(time) {
        format!("{date}T{time}")
    } else {
        text.to_owned()
    }
}

/// `hh:mm:ss[.f]`.
fn is_clock(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() >= 8 && b[2] == b':' && b[5] == b':' && b.iter().all(|c| c.is_ascii_digit() || *c == b':' || *c == b'.')
}

/// `01:04:05+05:30` → (`01:04:05`, `+05:30`): the offset starts at the first sign.
fn split_offset(t: &str) -> Option<(&str, &str)> {
    let i = t.find(['+', '-'])?;
    let (time, offset) = t.split_at(i);
    let digits = &offset[1..];
    let ok = matches!(digits.len(), 2 | 5 | 8)
        && digits.bytes().enumerate().all(|(j, c)| if j % 3 == 2 { c == b':' } else { c.is_ascii_digit() });
    ok.then_some((time, offset))
}

/// `+00` → `+00:00`; `+05:30` and `+05:30:15` (historic offsets with seconds) unchanged.
fn full_offset(offset: &str) -> String {
    if offset.len() == 3 {
        format!("{offset}:00")
    } else {
        offset.to_owned()
    }
}

/// A PostgreSQL array literal as `array_out` writes it (`{1,NULL,"a b"}`, nested braces for more
/// dimensions) to a JSON array; `None` when it is not one (non-default bounds `[0:1]={..}`).
fn parse_array(text: &str, elem: &Mapping, delim: u8) -> Option<Value> {
    let mut p = ArrayParser { s: text.as_bytes(), i: 0, text, elem, delim };
    let v = p.level(0)?;
    (p.i == p.s.len()).then_some(v)
}

struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    text: &'a str,
    elem: &'a Mapping,
    delim: u8,
}

impl ArrayParser<'_> {
    fn level(&mut self, depth: usize) -> Option<Value> {
        if depth > 6 || self.s.get(self.i) != Some(&b'{') {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Some(Value::Array(items));
        }
        loop {
            let item = match *self.s.get(self.i)? {
                b'{' => self.level(depth + 1)?,
                b'"' => {
                    self.i += 1;
                    let mut out = Vec::new();
                    loop {
                        match *self.s.get(self.i)? {
                            b'"' => break,
                            b'\\' => {
                                self.i += 1;
                                out.push(*self.s.get(self.i)?);
                            }
                            c => out.push(c),
                        }
                        self.i += 1;
                    }
                    self.i += 1;
                    map_text(self.elem, &String::from_utf8(out).ok()?)
                }
                _ => {
                    let start = self.i;
                    while self.i < self.s.len() && self.s[self.i] != self.delim && self.s[self.i] != b'}' {
                        if matches!(self.s[self.i], b'{' | b'"' | b'\\') {
                            return None;
                        }
                        self.i += 1;
                    }
                    let raw = self.text.get(start..self.i)?;
                    if raw.is_empty() {
                        return None;
                    }
                    if raw.eq_ignore_ascii_case("NULL") {
                        Value::Null
                    } else {
                        map_text(self.elem, raw)
                    }
                }
            };
            items.push(item);
            match *self.s.get(self.i)? {
                b'}' => {
                    self.i += 1;
                    return Some(Value::Array(items));
                }
                c if c == self.delim => self.i += 1,
                _ => return None,
            }
        }
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

    fn arr(m: Mapping) -> Mapping {
        Mapping::Array(Box::new(m), b',')
    }

    #[test]
    fn maps_scalar_types() {
        assert_eq!(text_to_json(BOOL, "t"), json!(true));
        assert_eq!(text_to_json(BOOL, "f"), json!(false));
        assert_eq!(text_to_json(INT4, "-42"), json!(-42));
        assert_eq!(text_to_json(INT2, "7"), json!(7));
        assert_eq!(text_to_json(INT2, "-32768"), json!(-32768));
        assert_eq!(text_to_json(FLOAT8, "1.5"), json!(1.5));
        assert_eq!(text_to_json(FLOAT4, "0.1"), json!(0.1));
        assert_eq!(text_to_json(FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(text_to_json(FLOAT4, "Infinity"), json!("Infinity"));
        assert_eq!(text_to_json(FLOAT8, "-Infinity"), json!("-Infinity"));
        assert_eq!(text_to_json(NUMERIC, "12345678901234567890.5"), json!("12345678901234567890.5"));
        assert_eq!(text_to_json(NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(text_to_json(TEXT, "hello ü漢🙂"), json!("hello ü漢🙂"));
        assert_eq!(text_to_json(VARCHAR, "v"), json!("v"));
        assert_eq!(text_to_json(BPCHAR, "ab   "), json!("ab   "));
        assert_eq!(text_to_json(DATE, "2026-01-02"), json!("2026-01-02"));
        assert_eq!(text_to_json(INTERVAL, "1 day 02:03:04"), json!("1 day 02:03:04"));
        assert_eq!(
            text_to_json(UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(text_to_json(INET, "192.168.0.1"), json!("192.168.0.1"));
        assert_eq!(text_to_json(INET, "10.0.0.0/8"), json!("10.0.0.0/8"));
        assert_eq!(text_to_json(BYTEA, r"\x00ff"), json!(r"\x00ff"));
        assert_eq!(text_to_json(OID, "16384"), json!(16384));
    }

    #[test]
    fn timestamps_become_iso_8601() {
        assert_eq!(text_to_json(TIMESTAMPTZ, "2026-01-02 01:04:05+00"), json!("2026-01-02T01:04:05+00:00"));
        assert_eq!(
            text_to_json(TIMESTAMPTZ, "2026-01-02 01:04:05.123456+00"),
            json!("2026-01-02T01:04:05.123456+00:00")
        );
        assert_eq!(text_to_json(TIMESTAMPTZ, "2026-01-02 01:04:05+05:30"), json!("2026-01-02T01:04:05+05:30"));
        assert_eq!(text_to_json(TIMESTAMPTZ, "1900-01-01 00:00:00-00:09:21"), json!("1900-01-01T00:00:00-00:09:21"));
        assert_eq!(text_to_json(TIMESTAMPTZ, "12026-01-02 01:04:05+00"), json!("12026-01-02T01:04:05+00:00"));
        assert_eq!(text_to_json(TIMESTAMP, "2026-01-02 01:04:05"), json!("2026-01-02T01:04:05"));
        assert_eq!(text_to_json(TIMESTAMP, "2026-01-02 01:04:05.5"), json!("2026-01-02T01:04:05.5"));
        assert_eq!(text_to_json(TIMETZ, "01:04:05+00"), json!("01:04:05+00:00"));
        // Kept as PostgreSQL writes them.
        assert_eq!(text_to_json(TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(text_to_json(TIMESTAMP, "-infinity"), json!("-infinity"));
        assert_eq!(text_to_json(TIMESTAMPTZ, "0044-03-15 00:00:00+00 BC"), json!("0044-03-15 00:00:00+00 BC"));
        assert_eq!(text_to_json(TIMESTAMP, "Fri Jan 02 01:04:05 2026"), json!("Fri Jan 02 01:04:05 2026"));
    }

    #[test]
    fn numbers_are_written_as_jsonb_writes_them() {
        let n = |t: &str| plain_number(t).map(|v| v.to_string());
        assert_eq!(n("0.1").as_deref(), Some("0.1"));
        assert_eq!(n("1.50").as_deref(), Some("1.50"));
        assert_eq!(n("1e+300").map(|s| (s.len(), s.starts_with("10000"))), Some((301, true)));
        assert_eq!(n("1.5e-07").as_deref(), Some("0.00000015"));
        assert_eq!(n("-1.25E2").as_deref(), Some("-125"));
        assert_eq!(n("1.0e1").as_deref(), Some("10"));
        assert_eq!(n("12.5e1").as_deref(), Some("125"));
        assert_eq!(n("1e5").as_deref(), Some("100000"));
        assert_eq!(n("-0").as_deref(), Some("0"));
        assert_eq!(n("-0.0").as_deref(), Some("0.0"));
        assert_eq!(n("-0e3").as_deref(), Some("0"));
        assert_eq!(n("x").as_deref(), None);
        assert_eq!(text_to_json(FLOAT8, "1e+300").to_string().len(), 301);
        assert_eq!(text_to_json(FLOAT4, "-0").to_string(), "0");
        assert_eq!(text_to_json(FLOAT8, "-1.5e-07").to_string(), "-0.00000015");
        assert_eq!(text_to_json(JSON, r#"{"a": [1E2, 0.10, -0]}"#).to_string(), r#"{"a":[100,0.10,0]}"#);
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
        assert_eq!(text_to_json(JSON, r#""just a string""#), json!("just a string"));
        assert_eq!(text_to_json(JSON, "{oops"), json!("{oops"));
        assert_eq!(text_to_json(INT4, "12x"), json!("12x"));
        assert_eq!(text_to_json(BOOL, "yes"), json!("yes"));
        assert_eq!(text_to_json(BOOL, "true"), json!("true"), "a ::text cast's spelling is not boolout's");
    }

    #[test]
    fn arrays_map_their_elements() {
        assert_eq!(text_to_json(1007, "{1,-2,NULL}"), json!([1, -2, null]));
        assert_eq!(text_to_json(1007, "{}"), json!([]));
        assert_eq!(text_to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            text_to_json(1009, r#"{a,"b c","say \"hi\"","back\\slash","NULL",NULL,ü漢🙂,""}"#),
            json!(["a", "b c", "say \"hi\"", "back\\slash", "NULL", null, "ü漢🙂", ""])
        );
        assert_eq!(text_to_json(1000, "{t,f}"), json!([true, false]));
        assert_eq!(text_to_json(1022, "{1.5,NaN,-Infinity}"), json!([1.5, "NaN", "-Infinity"]));
        assert_eq!(text_to_json(1016, "{1,9007199254740993}"), json!([1, "9007199254740993"]));
        assert_eq!(text_to_json(3807, r#"{"{\"a\": 1}",null}"#), json!([{"a": 1}, null]));
        assert_eq!(text_to_json(1185, r#"{"2026-01-02 01:04:05+00"}"#), json!(["2026-01-02T01:04:05+00:00"]));
        // Non-default lower bounds or malformed text: kept as text.
        assert_eq!(text_to_json(1007, "[0:1]={1,2}"), json!("[0:1]={1,2}"));
        assert_eq!(text_to_json(1007, "{1,2"), json!("{1,2"));
        assert_eq!(text_to_json(1007, "{1,2}x"), json!("{1,2}x"));
        // Another delimiter (box uses ';').
        assert_eq!(
            map_text(&Mapping::Array(Box::new(Mapping::Text), b';'), "{(1,1),(0,0);(2,2),(1,1)}"),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
        // An array of a domain over int4[] quotes its elements; they are arrays again.
        assert_eq!(map_text(&arr(arr(Mapping::Int)), r#"{"{1,2}","{3}"}"#), json!([[1, 2], [3]]));
    }

    #[test]
    fn type_map_uses_resolved_mappings() {
        let mut m = TypeMap::new();
        assert!(m.knows(BOOL) && !m.knows(50000));
        assert_eq!(m.get(50000), Mapping::Text, "an enum (or anything unresolved) is text");
        m.insert(50000, Mapping::Bool); // a domain over bool
        m.insert(50001, arr(Mapping::Bool)); // its array
        assert_eq!(map_text(&m.get(50000), "f"), json!(false));
        assert_eq!(map_text(&m.get(50001), "{t,NULL}"), json!([true, null]));
    }

    #[test]
    fn type_names() {
        let cache = RelationCache::new();
        assert_eq!(type_name(INT8, &cache), "int8");
        assert_eq!(type_name(99999, &cache), "oid:99999");
    }
}
