//! Shapes: which rows and columns of one table a subscription receives.
//!
//! A shape is `schema.table` + optional column list + a predicate in a deliberately tiny syntax:
//!
//! ```text
//! where   := cond ( AND cond )*
//! cond    := column op literal | column IS NULL | column IS NOT NULL
//! op      := =  !=  <  <=  >  >=
//! literal := integer | decimal | 'string' ('' escapes a quote) | true | false
//! column  := [A-Za-z_][A-Za-z0-9_]*  |  "quoted"
//! ```
//!
//! Keywords are case-insensitive. Anything else (OR, parentheses, functions, `= NULL`, `<` on a
//! boolean...) is rejected with the byte offset of the problem: the predicate is evaluated in
//! Rust on every change (docs/pgsync-protocol.md §10 item 5), so it must stay small enough to
//! reason about. The JSON predicate form of the original design notes (`{"col":{"eq":..}}`,
//! docs/pgsync-protocol.md §10 item 2) can be compiled to this later.
//!
//! Evaluation is three-valued. A NULL column fails every comparison (SQL WHERE semantics) and
//! satisfies IS NULL. A column *missing* from the row, which happens for patch updates that left
//! out an unchanged-TOAST column, gives `Unknown`, which callers count as *not* matching (fail
//! closed; `filter` first fills such columns from the old row).
//! Comparisons: numbers numerically (strings holding numbers, as int8/numeric are mapped, are
//! parsed); strings by bytes (not by the database collation); booleans only with = and !=;
//! mismatched types are false.

use std::cmp::Ordering;

use serde_json::Value;

use crate::protocol::{Row, ShapeRequest};

const MAX_WHERE_LEN: usize = 4096;
const MAX_CONDITIONS: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub table: String,
    /// `None` = all columns.
    pub columns: Option<Vec<String>>,
    /// ANDed conditions; empty = every row.
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub column: String,
    pub test: Test,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Compare(CmpOp, Literal),
    IsNull,
    IsNotNull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    /// The row lacks a column the predicate needs.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("table must be schema.table with plain identifiers, got {0:?}")]
    BadTable(String),
    #[error("column list must not be empty")]
    EmptyColumns,
    #[error("invalid column name {0:?}")]
    BadColumnName(String),
    #[error("where clause longer than {MAX_WHERE_LEN} bytes")]
    TooLong,
    #[error("more than {MAX_CONDITIONS} conditions")]
    TooManyConditions,
    #[error("at byte {at}: {message}")]
    Syntax { at: usize, message: String },
    #[error("unknown column {0:?}")]
    UnknownColumn(String),
}

fn syntax(at: usize, message: impl Into<String>) -> ShapeError {
    ShapeError::Syntax { at, message: message.into() }
}

impl Shape {
    pub fn parse(table: &str, columns: Option<Vec<String>>, where_: Option<&str>) -> Result<Shape, ShapeError> {
        let valid_table = table.split_once('.').is_some_and(|(s, t)| is_plain_ident(s) && is_plain_ident(t));
        if !valid_table {
            return Err(ShapeError::BadTable(table.to_owned()));
        }
        if let Some(cols) = &columns {
            if cols.is_empty() {
                return Err(ShapeError::EmptyColumns);
            }
            if let Some(bad) = cols.iter().find(|c| c.is_empty() || c.contains('\0')) {
                return Err(ShapeError::BadColumnName(bad.clone()));
            }
        }
        let conditions = match where_.map(str::trim) {
            None | Some("") => Vec::new(),
            Some(w) => parse_where(w)?,
        };
        Ok(Shape { table: table.to_owned(), columns, conditions })
    }

    pub fn from_request(req: &ShapeRequest) -> Result<Shape, ShapeError> {
        Shape::parse(&req.table, req.columns.clone(), req.where_.as_deref())
    }

    /// Check that every referenced column exists in the table (call at subscribe time with the
    /// relation's column names).
    pub fn validate_columns(&self, table_columns: &[&str]) -> Result<(), ShapeError> {
        let listed = self.columns.iter().flatten().map(String::as_str);
        let used = self.conditions.iter().map(|c| c.column.as_str());
        match listed.chain(used).find(|c| !table_columns.contains(c)) {
            Some(c) => Err(ShapeError::UnknownColumn(c.to_owned())),
            None => Ok(()),
        }
    }

    pub fn evaluate(&self, row: &Row) -> Truth {
        let mut unknown = false;
        for cond in &self.conditions {
            match cond.evaluate(row) {
                Truth::False => return Truth::False,
                Truth::Unknown => unknown = true,
                Truth::True => {}
            }
        }
        if unknown {
            Truth::Unknown
        } else {
            Truth::True
        }
    }

    /// The row restricted to the shape's columns.
    pub fn project(&self, row: &Row) -> Row {
        match &self.columns {
            None => row.clone(),
            Some(cols) => row.iter().filter(|(k, _)| cols.contains(k)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

impl Condition {
    pub fn evaluate(&self, row: &Row) -> Truth {
        let Some(value) = row.get(&self.column) else {
            return Truth::Unknown;
        };
        let ok = match &self.test {
            Test::IsNull => value.is_null(),
            Test::IsNotNull => !value.is_null(),
            Test::Compare(op, lit) => compare(value, lit).is_some_and(|ord| op.holds(ord)),
        };
        if ok {
            Truth::True
        } else {
            Truth::False
        }
    }
}

impl CmpOp {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
        }
    }
}

/// `value` compared to `lit`, or `None` when they are not comparable (NULL, mismatched types).
fn compare(value: &Value, lit: &Literal) -> Option<Ordering> {
    match (value, lit) {
        (Value::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        (Value::String(a), Literal::Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (Value::Number(n), Literal::Int(b)) => match n.as_i64() {
            Some(a) => Some(a.cmp(b)),
            None => n.as_f64()?.partial_cmp(&(*b as f64)),
        },
        (Value::Number(n), Literal::Float(b)) => n.as_f64()?.partial_cmp(b),
        // int8 beyond 2^53 and numeric arrive as strings.
        (Value::String(s), Literal::Int(b)) => match s.parse::<i64>() {
            Ok(a) => Some(a.cmp(b)),
            Err(_) => s.parse::<f64>().ok()?.partial_cmp(&(*b as f64)),
        },
        (Value::String(s), Literal::Float(b)) => s.parse::<f64>().ok()?.partial_cmp(b),
        _ => None,
    }
}

fn is_plain_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Str(String),
    Num(String),
    Op(CmpOp),
}

fn tokenize(src: &str) -> Result<Vec<(usize, Tok)>, ShapeError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'\'' | b'"' => {
                let mut text = String::new();
                i += 1;
                loop {
                    // Scan by char so multi-byte UTF-8 stays intact.
                    let Some(ch) = src[i..].chars().next() else {
                        return Err(syntax(start, "unterminated quote"));
                    };
                    i += ch.len_utf8();
                    if ch as u32 == u32::from(c) {
                        if bytes.get(i) == Some(&c) {
                            text.push(ch);
                            i += 1;
                        } else {
                            break;
                        }
                    } else {
                        text.push(ch);
                    }
                }
                if c == b'"' {
                    if text.is_empty() || text.contains('\0') {
                        return Err(syntax(start, "empty or invalid quoted column name"));
                    }
                    out.push((start, Tok::Quoted(text)));
                } else {
                    out.push((start, Tok::Str(text)));
                }
            }
            b'=' => {
                i += 1;
                out.push((start, Tok::Op(CmpOp::Eq)));
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                out.push((start, Tok::Op(CmpOp::Ne)));
            }
            b'<' | b'>' => {
                let eq = bytes.get(i + 1) == Some(&b'=');
                if c == b'<' && bytes.get(i + 1) == Some(&b'>') {
                    return Err(syntax(start, "operator <> is not supported, use !="));
                }
                i += if eq { 2 } else { 1 };
                let op = match (c, eq) {
                    (b'<', false) => CmpOp::Lt,
                    (b'<', true) => CmpOp::Le,
                    (_, false) => CmpOp::Gt,
                    (_, true) => CmpOp::Ge,
                };
                out.push((start, Tok::Op(op)));
            }
            b'-' | b'0'..=b'9' => {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                out.push((start, Tok::Num(src[start..i].to_owned())));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                out.push((start, Tok::Word(src[start..i].to_owned())));
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(syntax(start, format!("unexpected character {ch:?}")));
            }
        }
    }
    Ok(out)
}

const RESERVED: [&str; 7] = ["and", "or", "not", "is", "null", "true", "false"];

fn parse_where(src: &str) -> Result<Vec<Condition>, ShapeError> {
    if src.len() > MAX_WHERE_LEN {
        return Err(ShapeError::TooLong);
    }
    let toks = tokenize(src)?;
    let end = src.len();
    let mut it = toks.into_iter().peekable();
    let mut conditions = Vec::new();
    loop {
        if conditions.len() == MAX_CONDITIONS {
            return Err(ShapeError::TooManyConditions);
        }
        let (at, tok) = it.next().ok_or_else(|| syntax(end, "expected a column name"))?;
        let column = match tok {
            Tok::Quoted(name) => name,
            Tok::Word(w) if !RESERVED.contains(&w.to_ascii_lowercase().as_str()) => w,
            Tok::Word(w) if w.eq_ignore_ascii_case("or") || w.eq_ignore_ascii_case("not") => {
                return Err(syntax(at, format!("{w} is not supported; only AND-joined conditions")))
            }
            other => return Err(syntax(at, format!("expected a column name, found {}", describe(&other)))),
        };
        let (at, tok) = it.next().ok_or_else(|| syntax(end, "expected an operator or IS"))?;
        let test = match tok {
            Tok::Op(op) => {
                let (lat, lit) = it.next().ok_or_else(|| syntax(end, "expected a literal"))?;
                let lit = literal(lat, lit)?;
                if matches!(lit, Literal::Bool(_)) && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                    return Err(syntax(lat, "booleans only support = and !="));
                }
                Test::Compare(op, lit)
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("is") => {
                let (nat, next) = it.next().ok_or_else(|| syntax(end, "expected NULL or NOT NULL"))?;
                match next {
                    Tok::Word(w) if w.eq_ignore_ascii_case("null") => Test::IsNull,
                    Tok::Word(w) if w.eq_ignore_ascii_case("not") => match it.next() {
                        Some((_, Tok::Word(w))) if w.eq_ignore_ascii_case("null") => Test::IsNotNull,
                        Some((a, _)) => return Err(syntax(a, "expected NULL after IS NOT")),
                        None => return Err(syntax(end, "expected NULL after IS NOT")),
                    },
                    _ => return Err(syntax(nat, "expected NULL or NOT NULL after IS")),
                }
            }
            other => return Err(syntax(at, format!("expected an operator or IS, found {}", describe(&other)))),
        };
        conditions.push(Condition { column, test });
        match it.next() {
            None => return Ok(conditions),
            Some((_, Tok::Word(w))) if w.eq_ignore_ascii_case("and") => {}
            Some((at, other)) => return Err(syntax(at, format!("expected AND or end, found {}", describe(&other)))),
        }
    }
}

fn literal(at: usize, tok: Tok) -> Result<Literal, ShapeError> {
    match tok {
        Tok::Str(s) => Ok(Literal::Str(s)),
        Tok::Num(n) => {
            if let Ok(i) = n.parse::<i64>() {
                return Ok(Literal::Int(i));
            }
            let well_formed = {
                let digits = n.strip_prefix('-').unwrap_or(&n);
                let mut parts = digits.splitn(2, '.');
                let int = parts.next().unwrap_or("");
                let frac = parts.next();
                !int.is_empty()
                    && int.bytes().all(|b| b.is_ascii_digit())
                    && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
            };
            match n.parse::<f64>() {
                Ok(f) if well_formed && f.is_finite() => Ok(Literal::Float(f)),
                _ => Err(syntax(at, format!("invalid number {n:?}"))),
            }
        }
        Tok::Word(w) if w.eq_ignore_ascii_case("true") => Ok(Literal::Bool(true)),
        Tok::Word(w) if w.eq_ignore_ascii_case("false") => Ok(Literal::Bool(false)),
        Tok::Word(w) if w.eq_ignore_ascii_case("null") => {
            Err(syntax(at, "comparison with NULL is never true; use IS NULL"))
        }
        other => Err(syntax(at, format!("expected a literal, found {}", describe(&other)))),
    }
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Word(w) => format!("{w:?}"),
        Tok::Quoted(q) => format!("column \"{q}\""),
        Tok::Str(_) => "a string".into(),
        Tok::Num(n) => format!("number {n}"),
        Tok::Op(_) => "an operator".into(),
    }
}

#[cfg(test)]
#[path = "shape_tests.rs"]
mod tests;
