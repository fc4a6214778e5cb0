//! Building the `content` messages that bring a peer from its known state to
//! ours (cojson's `VerifiedState.newContentSince`).
//!
//! A session can only be cut where we hold a valid signature: at its end
//! (`lastSignature`) or at a checkpoint (`signatureAfter`, recorded whenever
//! more than 100 KiB of payload arrived since the previous one). The split
//! follows cojson's so a client sees the shapes it produces itself:
//! * every checkpointed chunk goes into a piece of its own;
//! * the final chunk of a session (up to `lastSignature`) joins the current
//!   piece, unless it alone exceeds the limit (own piece) or it makes the
//!   current piece exceed it (the piece is closed after it);
//! * the header rides on the first piece when the peer lacks it;
//! * when there is more than one piece, the first carries
//!   `expectContentUntil` (our count for every session the peer lacks), so the
//!   client does not re-request data that is still in flight.
//!
//! Consequence for frame sizes: a piece exceeds the limit only when a single
//! chunk between two signatures does (a client wrote more than 100 KiB in one
//! batch, or a session was received without checkpoints). Such a chunk cannot
//! be split by anyone: there is no signature inside it.
//!
//! Payload size is `changes`/`encryptedChanges` in UTF-8 bytes (cojson uses
//! JS string length here; the split is a local decision of the sender).

use crate::covalue::CoValueState;
use crate::durable::Durable;
use crate::known_state::{KnownState, SessionCounts};
use crate::message::{ContentMessage, SessionNewContent};
use serde_json::{Map, Value};

/// `TRANSACTION_CONFIG.MAX_RECOMMENDED_TX_SIZE`.
pub const PIECE_LIMIT_BYTES: usize = 100 * 1024;

/// Payload of one stored transaction, as checkpoints measure it.
pub fn transaction_payload_len(tx: &Value) -> usize {
    let field = match tx.get("privacy").and_then(Value::as_str) {
        Some("private") => "encryptedChanges",
        _ => "changes",
    };
    tx.get(field).and_then(Value::as_str).map_or(0, str::len)
}

fn empty_piece(state: &CoValueState) -> ContentMessage {
    ContentMessage {
        id: state.header.id.clone(),
        header: None,
        priority: Some(state.header.priority()),
        new: Vec::new(),
        expect_content_until: None,
        extra: Map::new(),
    }
}

fn has_content(piece: &ContentMessage) -> bool {
    piece.header.is_some() || !piece.new.is_empty()
}

/// How far [`new_content_since`] goes in each session: to our count and last signature, or
/// only to what is durable (the relay's case, see [`crate::durable`]).
fn end_of<'a>(
    log: &'a crate::covalue::SessionLog,
    session: &crate::ids::SessionId,
    upto: Option<&'a Durable>,
) -> (u64, &'a crate::crypto::Signature) {
    let ours = log.count();
    match upto.and_then(|d| d.sessions.get(session)) {
        None if upto.is_some() => (0, &log.last_signature),
        Some((count, signature)) if *count < ours => (*count, signature),
        _ => (ours, &log.last_signature),
    }
}

/// True when [`new_content_since`] with `Some(known)` and the same `upto` would be empty: the
/// peer has the header (or we may not send it yet) and, in every session we would send, at
/// least the count we would send up to. Allocation-free.
pub fn peer_lacks_no_content(state: &CoValueState, known: &KnownState, upto: Option<&Durable>) -> bool {
    if upto.is_some_and(|d| !d.header) {
        return true;
    }
    known.header
        && state.sessions.iter().all(|(session, log)| {
            (state.deleted && !session.is_delete_session()) || known.count(session) >= end_of(log, session, upto).0
        })
}

/// The pieces to send a peer whose (optimistic) known state is `known`
/// (`None`: nothing known, send everything), going no further than `upto` when given (`None`:
/// to our state). Empty when the peer lacks nothing. Never panics: ranges that do not fit the
/// stored log are skipped.
pub fn new_content_since(
    state: &CoValueState,
    known: Option<&KnownState>,
    upto: Option<&Durable>,
    limit: usize,
) -> Vec<ContentMessage> {
    // Nothing can be sent before the header is durable: sessions need it to be verified.
    if upto.is_some_and(|d| !d.header) {
        return Vec::new();
    }
    let mut finished: Vec<ContentMessage> = Vec::new();
    let mut current = empty_piece(state);
    let mut current_size = 0usize;
    let mut expect = SessionCounts::new();

    for (session, log) in &state.sessions {
        if state.deleted && !session.is_delete_session() {
            continue;
        }
        let from = known.map_or(0, |k| k.count(session));
        let (to, last_signature) = end_of(log, session, upto);
        if from >= to {
            continue;
        }
        expect.insert(session.clone(), to);
        let slice = |a: u64, b: u64| -> Option<&[Value]> {
            log.transactions.get(usize::try_from(a).ok()?..usize::try_from(b).ok()?)
        };
        let entry = |after: u64, txs: &[Value], sig: &crate::crypto::Signature| SessionNewContent {
            after,
            new_transactions: txs.to_vec(),
            last_signature: sig.to_z_string(),
            extra: Map::new(),
        };
        let mut start = from;
        // Checkpoints strictly inside (from, to): each closes a chunk of its own.
        for (&at, sig) in log.signature_after.range(from.saturating_add(1)..to) {
            let Some(txs) = slice(start, at) else { break };
            let mut piece = empty_piece(state);
            piece.new.push((session.as_str().to_string(), entry(start, txs, sig)));
            finished.push(piece);
            start = at;
        }
        let Some(txs) = slice(start, to) else { continue };
        let size: usize = txs.iter().map(transaction_payload_len).sum();
        let last = (session.as_str().to_string(), entry(start, txs, last_signature));
        if size > limit {
            let mut piece = empty_piece(state);
            piece.new.push(last);
            finished.push(piece);
        } else {
            current.new.push(last);
            if current_size + size > limit {
                finished.push(std::mem::replace(&mut current, empty_piece(state)));
                current_size = 0;
            } else {
                current_size += size;
            }
        }
    }
    finished.push(current);

    if known.is_none_or(|k| !k.header) {
        if let Some(first) = finished.first_mut() {
            first.header = Some(state.header.raw.clone());
        }
    }
    let mut pieces: Vec<ContentMessage> = finished.into_iter().filter(has_content).collect();
    if pieces.len() > 1 {
        if let Some(first) = pieces.first_mut() {
            first.expect_content_until = Some(expect);
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::covalue::SessionLog;
    use crate::crypto::{id_for_header, Signature};
    use crate::header::Header;
    use crate::ids::SessionId;
    use crate::transaction_hash::SessionHasher;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn state_with(sessions: &[(&str, usize, usize, &[u64])]) -> CoValueState {
        let raw = json!({"type":"comap","ruleset":{"type":"unsafeAllowAll"},"meta":null,"uniqueness":"zP"});
        let mut state = CoValueState::new(Header::validate(&id_for_header(&raw), &raw).unwrap());
        for (i, (name, count, tx_bytes, checkpoints)) in sessions.iter().enumerate() {
            let mut hasher = SessionHasher::new();
            let txs: Vec<Value> = (0..*count)
                .map(|_| {
                    hasher.update("x");
                    json!({"privacy":"trusting","madeAt":1,"changes":"a".repeat(*tx_bytes)})
                })
                .collect();
            let sig = |n: u64| Signature([n as u8 + i as u8 * 50; 64]);
            state.sessions.insert(
                SessionId::parse(&format!("co_zA_session_z{name}")).unwrap(),
                SessionLog {
                    transactions: txs,
                    hasher,
                    last_signature: sig(*count as u64),
                    signature_after: checkpoints.iter().map(|&c| (c, sig(c))).collect::<BTreeMap<_, _>>(),
                    bytes_since_checkpoint: 0,
                },
            );
        }
        state
    }

    fn shape(pieces: &[ContentMessage]) -> Vec<Vec<(String, u64, usize)>> {
        pieces
            .iter()
            .map(|p| p.new.iter().map(|(s, e)| (s.clone(), e.after, e.new_transactions.len())).collect())
            .collect()
    }

    #[test]
    fn small_content_is_one_piece_with_header_and_no_expectation() {
        let state = state_with(&[("a", 3, 10, &[]), ("b", 1, 10, &[])]);
        let pieces = new_content_since(&state, None, None, PIECE_LIMIT_BYTES);
        assert_eq!(pieces.len(), 1);
        assert!(pieces[0].header.is_some());
        assert!(pieces[0].expect_content_until.is_none());
        assert_eq!(pieces[0].new.len(), 2);
    }

    #[test]
    fn delta_only_and_nothing_when_up_to_date() {
        let state = state_with(&[("a", 3, 10, &[])]);
        let mut known = state.known_state();
        assert!(new_content_since(&state, Some(&known), None, PIECE_LIMIT_BYTES).is_empty());
        assert!(peer_lacks_no_content(&state, &known, None));
        known.header = false;
        assert!(!peer_lacks_no_content(&state, &known, None));
        assert_eq!(new_content_since(&state, Some(&known), None, PIECE_LIMIT_BYTES).len(), 1, "the header alone");
        known.header = true;
        let sid = SessionId::parse("co_zA_session_za").unwrap();
        known.sessions.insert(sid.clone(), 1);
        assert!(!peer_lacks_no_content(&state, &known, None));
        let pieces = new_content_since(&state, Some(&known), None, PIECE_LIMIT_BYTES);
        assert_eq!(shape(&pieces), vec![vec![(sid.as_str().to_string(), 1, 2)]]);
        assert!(pieces[0].header.is_none());
        assert_eq!(pieces[0].new[0].1.last_signature, state.sessions[&sid].last_signature.to_z_string());
    }

    #[test]
    fn split_at_checkpoints_with_expectation_on_first_piece() {
        // 6 × 60 KB, checkpoints after 2 and 4 (the example in docs/protocols/cojson.md §8).
        let state = state_with(&[("a", 6, 60_000, &[2, 4])]);
        let pieces = new_content_since(&state, None, None, PIECE_LIMIT_BYTES);
        let s = "co_zA_session_za".to_string();
        assert_eq!(shape(&pieces), vec![vec![(s.clone(), 0, 2)], vec![(s.clone(), 2, 2)], vec![(s.clone(), 4, 2)]]);
        assert!(pieces[0].header.is_some() && pieces[1].header.is_none());
        let sid = SessionId::parse(&s).unwrap();
        assert_eq!(pieces[0].expect_content_until.as_ref().and_then(|e| e.get(&sid)), Some(&6));
        // Each chunk is signed at its end.
        assert_eq!(pieces[0].new[0].1.last_signature, state.sessions[&sid].signature_after[&2].to_z_string());
        // A peer that has 3 gets 3..4 (to the checkpoint) and 4..6.
        let mut known = state.known_state();
        known.sessions.insert(sid, 3);
        assert_eq!(
            shape(&new_content_since(&state, Some(&known), None, PIECE_LIMIT_BYTES)),
            vec![vec![(s.clone(), 3, 1)], vec![(s, 4, 2)]]
        );
    }

    #[test]
    fn sessions_are_packed_until_the_limit() {
        let state = state_with(&[("a", 1, 60_000, &[]), ("b", 1, 60_000, &[]), ("c", 1, 10, &[])]);
        let pieces = new_content_since(&state, None, None, PIECE_LIMIT_BYTES);
        // a fits; b pushes the piece over the limit and closes it; c starts a new one.
        assert_eq!(pieces.iter().map(|p| p.new.len()).collect::<Vec<_>>(), vec![2, 1]);
        assert!(pieces[0].expect_content_until.is_some());
    }
}
