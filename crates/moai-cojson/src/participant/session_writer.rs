//! Writing one transaction into the participant's own session of a CoValue: build the trusting
//! or private transaction object, extend the session's BLAKE3 chain with its canonical text and
//! sign the new hash (docs/protocols/cojson-participant.md §4; cojson.md §5.2–§5.4).
//!
//! It reuses the relay's own canonical form ([`canonical_transaction`]) and hasher, so what the
//! participant signs is by construction what the relay (and every client) verifies. The index a
//! transaction will take is the hasher's count *before* appending: private transactions derive
//! their nonce from it (§11, "nonce index").

use super::changes::MAX_CHANGES_BYTES;
use super::cipher::encrypt_text;
use super::clock::{TimeOutOfRange, MAX_JS_DATE_MS};
use super::encoding::{tx_nonce_material, KeyId, KeySecret};
use crate::crypto::{sign_hash, Hash, Signature, SignerSecret};
use crate::ids::{CoId, SessionId};
use crate::transaction_hash::{canonical_transaction, CanonicalTransaction, SessionHasher};
use serde_json::{json, Value};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WriteError {
    #[error("changes of {0} bytes exceed the 1 MiB transaction limit")]
    TooLarge(usize),
    #[error(transparent)]
    Time(#[from] TimeOutOfRange),
}

/// Trusting (readable by anyone holding the CoValue) or private (encrypted with a read key).
#[derive(Debug, Clone, Copy)]
pub enum TxPrivacy<'a> {
    Trusting,
    Private { key_id: &'a KeyId, key: &'a KeySecret },
}

/// One written transaction with the chain state after it.
#[derive(Debug, Clone)]
pub struct WrittenTx {
    /// The transaction object as sent (`privacy`, `madeAt`, then its payload fields).
    pub tx: Value,
    // The canonical text and the hash are what the vectors pin; the participant itself only
    // needs the object and the signature.
    #[allow(dead_code)]
    pub canonical: CanonicalTransaction,
    /// Session hash after this transaction.
    #[allow(dead_code)]
    pub hash: Hash,
    /// Signature over that hash; the last one of a batch goes out as `lastSignature`.
    pub signature: Signature,
}

/// The participant's session in one CoValue.
pub struct SessionWriter<'a> {
    pub co_id: &'a CoId,
    pub session: &'a SessionId,
    pub signer: &'a SignerSecret,
}

impl SessionWriter<'_> {
    /// Appends one transaction whose `changes` text is `changes` (already `JSON.stringify`d) to
    /// the chain in `hasher`.
    pub fn write(
        &self,
        hasher: &mut SessionHasher,
        changes: &str,
        privacy: TxPrivacy<'_>,
        made_at: u64,
    ) -> Result<WrittenTx, WriteError> {
        if changes.len() > MAX_CHANGES_BYTES {
            return Err(WriteError::TooLarge(changes.len()));
        }
        // Beyond this a JS double would round `madeAt` and clients could not read the date.
        if made_at > MAX_JS_DATE_MS {
            return Err(TimeOutOfRange(made_at).into());
        }
        let tx = match privacy {
            TxPrivacy::Trusting => json!({"privacy": "trusting", "madeAt": made_at, "changes": changes}),
            TxPrivacy::Private { key_id, key } => {
                let material = tx_nonce_material(self.co_id, self.session, hasher.count());
                json!({
                    "privacy": "private",
                    "madeAt": made_at,
                    "keyUsed": key_id.as_str(),
                    "encryptedChanges": encrypt_text(changes, key, &material),
                })
            }
        };
        let canonical = match canonical_transaction(&tx) {
            Ok(c) => c,
            // Unreachable: every field was just written in the shape the canonical form reads.
            Err(_) => return Err(TimeOutOfRange(made_at).into()),
        };
        hasher.update(&canonical.json);
        let hash = hasher.current();
        let signature = sign_hash(self.signer, &hash);
        Ok(WrittenTx { tx, canonical, hash, signature })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        let co = CoId::parse("co_zX").unwrap();
        let session = SessionId::parse("co_zA_session_zS").unwrap();
        let signer = SignerSecret([1; 32]);
        let w = SessionWriter { co_id: &co, session: &session, signer: &signer };
        let mut h = SessionHasher::new();
        let big = "x".repeat(MAX_CHANGES_BYTES + 1);
        assert_eq!(w.write(&mut h, &big, TxPrivacy::Trusting, 1).err(), Some(WriteError::TooLarge(big.len())));
        assert!(matches!(w.write(&mut h, "[]", TxPrivacy::Trusting, MAX_JS_DATE_MS + 1), Err(WriteError::Time(_))));
        assert_eq!(h.count(), 0, "nothing was appended");
        let written = w.write(&mut h, "[]", TxPrivacy::Trusting, MAX_JS_DATE_MS).unwrap();
        assert_eq!(h.count(), 1);
        assert_eq!(written.canonical.made_at, MAX_JS_DATE_MS);
    }
}
