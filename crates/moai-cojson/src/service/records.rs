//! Conversion between the relay's persistence types and moai-storage's records.
//!
//! Storage never imports the engine (see `docs/ARCHITECTURE.md`), so it speaks in strings and
//! JSON text. This is the one place that maps them: JSON values become text with
//! `Value::to_string` (with this crate's `preserve_order` + `arbitrary_precision` serde_json
//! features, key order and number digits survive the round trip), IDs and signatures become
//! their wire strings. Reading back checks every string again: a row that does not parse is a
//! typed error, never a panic, and the driver treats the CoValue as unreadable.

use crate::crypto::{CryptoError, Signature};
use crate::ids::{CoId, IdError, SessionId};
use crate::known_state::KnownState;
use crate::persistence::{PersistRequest, StoredCoValue, StoredSession};
use crate::transaction_hash::canonical_transaction;
use moai_storage::{BytesSinceSignature, CoValueAppend, CoValueRecord, SessionAppendRecord, StoredKnownState};
use serde_json::Value;
use std::collections::BTreeMap;
use thiserror::Error;

/// A stored row that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    #[error("stored header is not JSON: {0}")]
    HeaderJson(String),
    #[error("stored session id: {0}")]
    SessionId(#[from] IdError),
    #[error("session {session} transaction {index} is not JSON: {error}")]
    TransactionJson { session: String, index: usize, error: String },
    #[error("session {session}: stored signature: {error}")]
    Signature { session: String, error: CryptoError },
}

/// The storage append for a relay write.
pub fn to_append(req: &PersistRequest) -> CoValueAppend {
    CoValueAppend {
        id: req.id.as_str().to_owned(),
        header: req.header.as_ref().map(Value::to_string),
        sessions: req
            .sessions
            .iter()
            .map(|s| SessionAppendRecord {
                session: s.session.as_str().to_owned(),
                after: s.after,
                transactions: s.transactions.iter().map(Value::to_string).collect(),
                last_signature: s.last_signature.to_z_string(),
                checkpoints: s.checkpoints.iter().map(|(c, sig)| (*c, sig.to_z_string())).collect(),
                bytes_since_signature: bytes_since_signature(s.after, &s.transactions, &s.checkpoints),
            })
            .collect(),
        deleted: req.deleted,
        erase_sessions: req.erase.iter().map(|s| s.as_str().to_owned()).collect(),
    }
}

/// The checkpoint byte counter after this append, as cojson's `bytesSinceLastSignature`:
/// payload bytes of the transactions after the last checkpoint. Informational only (the relay
/// recomputes it from the transactions when it loads), so an unparsable transaction counts 0.
fn bytes_since_signature(after: u64, txs: &[Value], checkpoints: &[(u64, Signature)]) -> BytesSinceSignature {
    let payload = |txs: &[Value]| -> u64 {
        txs.iter().map(|tx| canonical_transaction(tx).map_or(0, |c| c.payload_len as u64)).sum()
    };
    match checkpoints.iter().map(|(c, _)| *c).max() {
        Some(last) => {
            let from = usize::try_from(last.saturating_sub(after)).unwrap_or(usize::MAX).min(txs.len());
            BytesSinceSignature::Reset(payload(&txs[from..]))
        }
        None => BytesSinceSignature::Add(payload(txs)),
    }
}

fn signature(session: &str, s: &str) -> Result<Signature, RecordError> {
    Signature::parse(s).map_err(|error| RecordError::Signature { session: session.to_owned(), error })
}

/// A stored CoValue as the relay's [`StoredCoValue`]. A deleted CoValue keeps only its delete
/// sessions, exactly what the relay holds in memory after a delete (storage keeps every row it
/// was given; which sessions survive a delete is the engine's rule).
pub fn from_record(record: CoValueRecord) -> Result<StoredCoValue, RecordError> {
    let header: Value = serde_json::from_str(&record.header).map_err(|e| RecordError::HeaderJson(e.to_string()))?;
    let mut sessions = Vec::with_capacity(record.sessions.len());
    for s in record.sessions {
        let session = SessionId::parse(&s.session)?;
        if record.deleted && !session.is_delete_session() {
            continue;
        }
        let mut transactions = Vec::with_capacity(s.transactions.len());
        for (index, tx) in s.transactions.iter().enumerate() {
            let value = serde_json::from_str(tx).map_err(|e| RecordError::TransactionJson {
                session: s.session.clone(),
                index,
                error: e.to_string(),
            })?;
            transactions.push(value);
        }
        let mut checkpoints = BTreeMap::new();
        for (count, sig) in &s.checkpoints {
            checkpoints.insert(*count, signature(&s.session, sig)?);
        }
        let last_signature = signature(&s.session, &s.last_signature)?;
        sessions.push(StoredSession { session, transactions, last_signature, checkpoints });
    }
    Ok(StoredCoValue { header, sessions, deleted: record.deleted })
}

/// A stored known state as the protocol's [`KnownState`] (same delete rule as [`from_record`]).
pub fn known_state_from_record(id: CoId, stored: StoredKnownState) -> Result<KnownState, RecordError> {
    let mut sessions = BTreeMap::new();
    for (session, count) in stored.sessions {
        let session = SessionId::parse(&session)?;
        if stored.deleted && !session.is_delete_session() {
            continue;
        }
        sessions.insert(session, count);
    }
    Ok(KnownState { id, header: stored.header, sessions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::AgentSecret;
    use crate::persistence::{PersistToken, SessionAppend};
    use moai_storage::SessionRecord;

    fn sig() -> Signature {
        AgentSecret::from_seed(&[3; 32]).signer.sign(b"x")
    }

    #[test]
    fn values_survive_the_trip_through_text_exactly() {
        let header: Value = serde_json::from_str(
            r#"{"type":"comap","ruleset":{"type":"unsafeAllowAll"},"meta":{"z":1,"a":1.50},"uniqueness":"zU"}"#,
        )
        .unwrap();
        let tx: Value =
            serde_json::from_str(r#"{"privacy":"trusting","madeAt":1700000000000.0,"changes":"[]","zz":0.1}"#).unwrap();
        let session = SessionId::parse("co_zA_session_zS").unwrap();
        let req = PersistRequest {
            token: PersistToken(1),
            id: CoId::parse("co_zX").unwrap(),
            header: Some(header.clone()),
            sessions: vec![SessionAppend {
                session: session.clone(),
                after: 0,
                transactions: vec![tx.clone(), tx.clone()],
                last_signature: sig(),
                checkpoints: vec![(2, sig())],
            }],
            deleted: false,
            erase: vec![],
        };
        let append = to_append(&req);
        assert_eq!(append.sessions[0].transactions[0], tx.to_string());
        assert!(append.sessions[0].transactions[0].contains("1700000000000.0"), "number text kept");
        assert_eq!(append.sessions[0].bytes_since_signature, BytesSinceSignature::Reset(0));
        let record = CoValueRecord {
            header: append.header.clone().unwrap(),
            sessions: vec![SessionRecord {
                session: append.sessions[0].session.clone(),
                transactions: append.sessions[0].transactions.clone(),
                last_signature: append.sessions[0].last_signature.clone(),
                checkpoints: append.sessions[0].checkpoints.clone(),
            }],
            deleted: false,
        };
        let stored = from_record(record).unwrap();
        assert_eq!(stored.header, header);
        assert_eq!(stored.header.to_string(), header.to_string(), "key order kept");
        assert_eq!(stored.sessions[0].transactions, vec![tx.clone(), tx]);
        assert_eq!(stored.sessions[0].checkpoints.get(&2), Some(&sig()));
    }

    fn record(sessions: &[&str], deleted: bool) -> CoValueRecord {
        CoValueRecord {
            header: "{}".into(),
            sessions: sessions
                .iter()
                .map(|s| SessionRecord {
                    session: (*s).into(),
                    transactions: vec!["{}".into()],
                    last_signature: sig().to_z_string(),
                    checkpoints: vec![],
                })
                .collect(),
            deleted,
        }
    }

    #[test]
    fn a_deleted_covalue_keeps_only_its_delete_sessions() {
        let stored = from_record(record(&["co_zA_session_zS", "co_zA_session_zD$"], true)).unwrap();
        let names: Vec<&str> = stored.sessions.iter().map(|s| s.session.as_str()).collect();
        assert_eq!(names, vec!["co_zA_session_zD$"]);
        let known = known_state_from_record(
            CoId::parse("co_zX").unwrap(),
            StoredKnownState {
                header: true,
                sessions: vec![("co_zA_session_zS".into(), 3), ("co_zA_session_zD$".into(), 1)],
                deleted: true,
            },
        )
        .unwrap();
        assert_eq!(known.sessions.len(), 1);
    }

    #[test]
    fn unreadable_rows_are_typed_errors() {
        let mut bad_header = record(&[], false);
        bad_header.header = "{".into();
        assert!(matches!(from_record(bad_header), Err(RecordError::HeaderJson(_))));
        assert!(matches!(from_record(record(&["nonsense"], false)), Err(RecordError::SessionId(_))));
        let mut bad_tx = record(&["co_zA_session_zS"], false);
        bad_tx.sessions[0].transactions[0] = "not json".into();
        assert!(matches!(from_record(bad_tx), Err(RecordError::TransactionJson { index: 0, .. })));
        let mut bad_sig = record(&["co_zA_session_zS"], false);
        bad_sig.sessions[0].last_signature = "signature_z!".into();
        assert!(matches!(from_record(bad_sig), Err(RecordError::Signature { .. })));
    }
}
