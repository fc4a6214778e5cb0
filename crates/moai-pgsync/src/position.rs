//! Client positions: `(commit_lsn, seq)`.
//!
//! A bare LSN cannot address a row inside a transaction, which is how the original design lost
//! the tail of every transaction bigger than one page. Pairing the commit LSN with the change's
//! index inside its transaction gives a total order that keyset paging can resume from exactly.

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Commit LSN of the transaction (field order matters: derives compare `lsn` first).
    pub lsn: Lsn,
    /// 0-based index of the change inside that transaction.
    pub seq: u32,
}

impl Position {
    pub fn new(lsn: Lsn, seq: u32) -> Self {
        Position { lsn, seq }
    }

    /// "Everything committed at or before `lsn`": the position after the last possible change
    /// of a transaction committing at `lsn` (docs/pgsync-protocol.md §2). `up_to_date` names one,
    /// e.g. after a snapshot (§5, snapshot → stream handoff).
    pub fn end_of(lsn: Lsn) -> Self {
        Position { lsn, seq: u32::MAX }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_lsn_then_seq() {
        let a = Position::new(Lsn(10), 5);
        let b = Position::new(Lsn(10), 6);
        let c = Position::new(Lsn(11), 0);
        assert!(a < b && b < c);
        assert!(Position::end_of(Lsn(10)) < c);
        assert!(Position::end_of(Lsn(10)) > b);
    }

    #[test]
    fn json_is_lsn_text_and_seq_and_bad_values_are_rejected() {
        let p = Position::new("0/16B3748".parse().unwrap(), 12);
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"lsn":"0/16B3748","seq":12}"#);
        let back: Position = serde_json::from_str(r#"{"lsn":"0/16B3748","seq":12}"#).unwrap();
        assert_eq!(back, p);
        assert!(serde_json::from_str::<Position>(r#"{"lsn":"x","seq":1}"#).is_err());
        assert!(serde_json::from_str::<Position>(r#"{"lsn":"0/1","seq":-1}"#).is_err());
    }
}
