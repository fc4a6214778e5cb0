//! Positions in moai's change history: `(commit_lsn, seq)` plus the history generation.
//!
//! The client compares positions to drop transactions it already applied (a reconnect may
//! replay the tail it had not acked), so LSNs are parsed into numbers rather than compared as
//! text ("0/9" > "0/10" as strings). Parsing is strict for the same reason the server's is.

use std::fmt;
use std::str::FromStr;

use serde_json::{json, Value};

use super::error::ProtocolError;

/// A WAL position, printed and parsed in Postgres' `X/Y` form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl FromStr for Lsn {
    type Err = ProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ProtocolError::new(format!("LSN must be X/Y with 1-8 hex digits each, got {s:?}"));
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(h, 16).map(u64::from).map_err(|_| bad())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// `(commit_lsn, seq)`: ordered by LSN, then by the change's index inside its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub lsn: Lsn,
    pub seq: u32,
}

impl Position {
    pub fn new(lsn: Lsn, seq: u32) -> Self {
        Position { lsn, seq }
    }

    /// After every change of the transaction committed at `lsn`.
    pub fn end_of(lsn: Lsn) -> Self {
        Position { lsn, seq: u32::MAX }
    }

    pub fn to_json(self) -> Value {
        json!({"lsn": self.lsn.to_string(), "seq": self.seq})
    }

    pub fn from_json(v: &Value) -> Result<Self, ProtocolError> {
        let lsn = v
            .get("lsn")
            .and_then(Value::as_str)
            .ok_or_else(|| ProtocolError::new(format!("position without lsn string: {v}")))?
            .parse()?;
        let seq = v
            .get("seq")
            .and_then(Value::as_u64)
            .and_then(|s| u32::try_from(s).ok())
            .ok_or_else(|| ProtocolError::new(format!("position without u32 seq: {v}")))?;
        Ok(Position { lsn, seq })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.lsn, self.seq)
    }
}

/// Where a client resumes: a position is meaningful only within its history generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResumePoint {
    pub generation: u64,
    pub position: Position,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip_and_numeric_order() {
        let a: Lsn = "0/9".parse().unwrap();
        let b: Lsn = "0/10".parse().unwrap();
        assert!(a < b);
        assert_eq!("1A/FF".parse::<Lsn>().unwrap().to_string(), "1A/FF");
        for bad in ["", "0", "0/", "/1", "g/0", "0/+1", "123456789/0", "0/1/2"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    #[test]
    fn position_json_and_order() {
        let p = Position::from_json(&json!({"lsn":"0/16B3748","seq":12})).unwrap();
        assert_eq!(p.to_json(), json!({"lsn":"0/16B3748","seq":12}));
        assert!(p < Position::end_of(p.lsn));
        assert!(Position::end_of(p.lsn) < Position::new(Lsn(p.lsn.0 + 1), 0));
        assert!(Position::from_json(&json!({"lsn":"0/1","seq":-1})).is_err());
        assert!(Position::from_json(&json!({"lsn":1,"seq":1})).is_err());
    }
}
