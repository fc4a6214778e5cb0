//! cojson's `stableStringify`: the canonical JSON text that IDs (`co_z…`),
//! short hashes and nonces are computed over.
//!
//! It is *not* RFC 8785 and not `serde_json::to_string` of a sorted map: it
//! follows JavaScript semantics exactly, because the bytes must match what a
//! cojson 0.20.19 client hashes:
//! * object keys sorted by UTF-16 code units (JS `Array.prototype.sort`);
//! * numbers formatted like JS `String(n)` after `JSON.parse` turned them into
//!   IEEE doubles (`1.0` → `1`, `1e21` → `1e+21`, `-0` → `0`, non-finite →
//!   `null`);
//! * strings escaped like `JSON.stringify`, **except** strings starting with
//!   `encrypted_U` or `binary_U`, which are written between quotes verbatim;
//! * no whitespace.
//!
//! Input is a `serde_json::Value` parsed with `arbitrary_precision`, so number
//! text reaches us unrounded and we apply JS's double rounding ourselves.

use serde_json::{Number, Value};
use std::cmp::Ordering;
use std::fmt::Write as _;

/// Prefixes whose strings cojson writes between quotes without escaping.
const RAW_STRING_PREFIXES: [&str; 2] = ["encrypted_U", "binary_U"];

/// Canonical text of a JSON value, byte-identical to cojson's `stableStringify`.
pub fn stable_stringify(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => out.push_str(&js_number_text(n)),
        Value::String(s) => {
            if RAW_STRING_PREFIXES.iter().any(|p| s.starts_with(p)) {
                out.push('"');
                out.push_str(s);
                out.push('"');
            } else {
                write_json_string(out, s);
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| cmp_utf16(a, b));
            out.push('{');
            let mut first = true;
            for key in keys {
                // JSON input has no `undefined`, so every key is written.
                let Some(v) = map.get(key) else { continue };
                if !first {
                    out.push(',');
                }
                first = false;
                write_json_string(out, key);
                out.push(':');
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// Orders strings by UTF-16 code units, as JS's default sort does. This only
/// differs from Rust's byte order for astral characters vs. U+E000..U+FFFF.
pub fn cmp_utf16(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// Writes `s` as `JSON.stringify` would: escapes `"`, `\` and C0 controls
/// (short forms for \b \f \n \r \t, lowercase `\u00xx` otherwise); everything
/// else, including non-ASCII and U+2028/U+2029, stays raw. (Rust strings cannot
/// hold lone surrogates, so the well-formed-stringify case never arises.)
pub fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// JSON number text → the double JS's `JSON.parse` produces. Rust's float
/// parser is correctly rounded like JS's; overflow gives ±inf like JS.
pub fn js_number_value(n: &Number) -> f64 {
    // With arbitrary_precision `to_string` is the original source text.
    n.to_string().parse::<f64>().unwrap_or(f64::NAN)
}

/// The text JS prints for a JSON number after a parse round trip.
pub fn js_number_text(n: &Number) -> String {
    js_number_to_string(js_number_value(n))
}

/// JS `Number.prototype.toString()` (ECMA-262 Number::toString, radix 10),
/// with non-finite values mapped to `null` as `stableStringify` does.
pub fn js_number_to_string(x: f64) -> String {
    if !x.is_finite() {
        return "null".to_string();
    }
    if x == 0.0 {
        return "0".to_string(); // also covers -0
    }
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` yields the shortest round-tripping digits, the same digit
    // string ECMA-262 requires ("k as small as possible").
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = match sci.split_once('e') {
        Some(parts) => parts,
        None => return "null".to_string(),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let e: i64 = exp.parse().unwrap_or(0);
    let k = digits.len() as i64;
    let n = e + 1; // value = 0.d1d2…dk × 10^n
    if k <= n && n <= 21 {
        out.push_str(&digits);
        for _ in 0..(n - k) {
            out.push('0');
        }
    } else if 0 < n && n <= 21 {
        let (int_part, frac) = digits.split_at(n as usize);
        out.push_str(int_part);
        out.push('.');
        out.push_str(frac);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        for _ in 0..(-n) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if n > 0 { '+' } else { '-' });
        let _ = write!(out, "{}", (n - 1).abs());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(json: &str) -> String {
        stable_stringify(&serde_json::from_str(json).expect("test json"))
    }

    #[test]
    fn sorts_keys_and_strips_whitespace() {
        assert_eq!(canon(r#"{ "b": 1, "a": [ true, null ] }"#), r#"{"a":[true,null],"b":1}"#);
    }

    #[test]
    fn sorts_keys_by_utf16_not_bytes() {
        // U+FF61 (one UTF-16 unit 0xFF61) vs U+1F600 (surrogates 0xD83D…):
        // UTF-16 order puts the emoji first, UTF-8 byte order the other way.
        assert_eq!(canon("{\"\u{ff61}\":1,\"\u{1f600}\":2}"), "{\"\u{1f600}\":2,\"\u{ff61}\":1}");
        // Digit-like keys are sorted as strings (JS Object.keys order is undone by sort()).
        assert_eq!(canon(r#"{"10":1,"9":2,"a":3}"#), r#"{"10":1,"9":2,"a":3}"#);
    }

    #[test]
    fn numbers_follow_js_tostring() {
        let cases = [
            ("1.0", "1"),
            ("-0", "0"),
            ("1e2", "100"),
            ("1E21", "1e+21"),
            ("123456789012345678901", "123456789012345680000"),
            ("1e-7", "1e-7"),
            ("0.000001", "0.000001"),
            ("1.5e-7", "1.5e-7"),
            ("0.1", "0.1"),
            ("-2.50", "-2.5"),
            ("1735689600000", "1735689600000"),
            ("9007199254740993", "9007199254740992"),
            ("1e400", "null"),
            ("123e-20", "1.23e-18"),
            ("12345.678", "12345.678"),
        ];
        for (input, expected) in cases {
            assert_eq!(canon(input), expected, "input {input}");
        }
    }

    #[test]
    fn strings_escape_like_json_stringify() {
        assert_eq!(
            canon(r#""a\"b\\c\n\t\u0001\u001f\u007f é \u2028""#),
            "\"a\\\"b\\\\c\\n\\t\\u0001\\u001f\u{7f} é \u{2028}\""
        );
        assert_eq!(canon(r#""\b\f\r""#), r#""\b\f\r""#);
    }

    #[test]
    fn encrypted_and_binary_strings_are_not_escaped() {
        // Pathological, but this is what cojson hashes.
        assert_eq!(canon(r#""encrypted_Ua\"b""#), "\"encrypted_Ua\"b\"");
        assert_eq!(canon(r#""binary_U\n""#), "\"binary_U\n\"");
        assert_eq!(canon(r#""xencrypted_U\n""#), "\"xencrypted_U\\n\"");
    }

    #[test]
    fn keys_are_escaped_even_with_raw_prefix() {
        assert_eq!(canon(r#"{"encrypted_U\"":1}"#), r#"{"encrypted_U\"":1}"#);
    }
}
