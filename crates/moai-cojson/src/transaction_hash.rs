//! The per-session hash chain that cojson signs.
//!
//! Each transaction is reduced to a canonical JSON text with a fixed field set
//! and order (what cojson-core's `serde` structs serialize to), and one
//! streaming BLAKE3 hasher per session is fed those texts back to back with no
//! separator. After transaction *i* the session hash is
//! `BLAKE3(tx_0 ‖ … ‖ tx_i)`, and the author signs `"hash_z…"` (quotes
//! included).
//!
//! The canonical text is *not* `stableStringify` of the received object:
//! * only the known fields take part (unknown fields are ignored by the hash);
//! * `meta: null` is treated like an absent `meta`;
//! * strings are always escaped (no `encrypted_U` verbatim rule here);
//! * `madeAt` must be what cojson-core accepts: after JS's double rounding, a
//!   non-negative integer that fits `u64` (a float makes the batch fail).

use crate::canonical_json::{js_number_to_string, js_number_value, write_json_string};
use crate::crypto::{verify_hash, Hash, Signature, SignerId};
use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TransactionError {
    #[error("transaction is not a JSON object")]
    NotAnObject,
    #[error("transaction privacy must be \"trusting\" or \"private\", got {0}")]
    BadPrivacy(String),
    #[error("transaction field `{0}` is missing")]
    MissingField(&'static str),
    #[error("transaction field `{0}` must be a string")]
    NotAString(&'static str),
    #[error("transaction madeAt must be a non-negative integer below 2^64, got {0}")]
    BadMadeAt(String),
}

/// Which kind of transaction a canonical text came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privacy {
    Trusting,
    Private,
}

/// A transaction reduced to the bytes that enter the session hash, plus the
/// facts the relay needs without re-parsing (payload size for checkpoints,
/// `madeAt` and trusting `meta` for delete rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTransaction {
    pub privacy: Privacy,
    pub made_at: u64,
    /// Length of `changes` / `encryptedChanges` in UTF-8 bytes, as
    /// cojson-core measures it (`String::len`) for the 100 KiB checkpoints.
    /// Checkpoint placement is a local decision of each node, so this only
    /// needs to be reasonable, not identical to any peer.
    pub payload_len: usize,
    /// The `meta` string of a trusting transaction (encrypted meta is opaque).
    pub trusting_meta: Option<String>,
    /// The canonical JSON text that is hashed.
    pub json: String,
}

fn string_field<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, TransactionError> {
    match obj.get(name) {
        None => Err(TransactionError::MissingField(name)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(TransactionError::NotAString(name)),
    }
}

fn optional_string_field<'a>(
    obj: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, TransactionError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TransactionError::NotAString(name)),
    }
}

/// `madeAt` as cojson-core sees it: JS parses it to a double and re-serializes
/// it with `JSON.stringify`; cojson-core then requires a `u64`.
fn made_at(obj: &Map<String, Value>) -> Result<(u64, String), TransactionError> {
    let n = match obj.get("madeAt") {
        None => return Err(TransactionError::MissingField("madeAt")),
        Some(Value::Number(n)) => n,
        Some(other) => return Err(TransactionError::BadMadeAt(other.to_string())),
    };
    let x = js_number_value(n);
    let text = js_number_to_string(x);
    // JS prints integers below 1e21 as plain digits; anything else (fraction,
    // exponent, sign, "null") fails cojson-core's u64 parse, as it does here.
    match text.parse::<u64>() {
        Ok(v) => Ok((v, text)),
        Err(_) => Err(TransactionError::BadMadeAt(n.to_string())),
    }
}

/// Reduces a received transaction object to its canonical hashed form.
pub fn canonical_transaction(tx: &Value) -> Result<CanonicalTransaction, TransactionError> {
    let obj = tx.as_object().ok_or(TransactionError::NotAnObject)?;
    let privacy = match obj.get("privacy") {
        Some(Value::String(s)) if s == "trusting" => Privacy::Trusting,
        Some(Value::String(s)) if s == "private" => Privacy::Private,
        Some(other) => return Err(TransactionError::BadPrivacy(other.to_string())),
        None => return Err(TransactionError::MissingField("privacy")),
    };
    let (made_at, made_at_text) = made_at(obj)?;
    let meta = optional_string_field(obj, "meta")?;
    let mut json = String::new();
    let payload_len;
    match privacy {
        Privacy::Trusting => {
            let changes = string_field(obj, "changes")?;
            payload_len = changes.len();
            json.push_str("{\"changes\":");
            write_json_string(&mut json, changes);
        }
        Privacy::Private => {
            let encrypted = string_field(obj, "encryptedChanges")?;
            let key_used = string_field(obj, "keyUsed")?;
            payload_len = encrypted.len();
            json.push_str("{\"encryptedChanges\":");
            write_json_string(&mut json, encrypted);
            json.push_str(",\"keyUsed\":");
            write_json_string(&mut json, key_used);
        }
    }
    json.push_str(",\"madeAt\":");
    json.push_str(&made_at_text);
    if let Some(meta) = meta {
        json.push_str(",\"meta\":");
        write_json_string(&mut json, meta);
    }
    json.push_str(match privacy {
        Privacy::Trusting => ",\"privacy\":\"trusting\"}",
        Privacy::Private => ",\"privacy\":\"private\"}",
    });
    Ok(CanonicalTransaction {
        privacy,
        made_at,
        payload_len,
        trusting_meta: match privacy {
            Privacy::Trusting => meta.map(str::to_string),
            Privacy::Private => None,
        },
        json,
    })
}

/// Running hash state of one session. Cheap to clone, which is how
/// verification stages a batch without touching the committed state.
#[derive(Clone, Debug, Default)]
pub struct SessionHasher {
    hasher: blake3::Hasher,
    count: u64,
}

impl SessionHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of transactions fed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn update(&mut self, canonical_json: &str) {
        self.hasher.update(canonical_json.as_bytes());
        self.count += 1;
    }

    /// The session hash after the transactions fed so far.
    pub fn current(&self) -> Hash {
        Hash(*self.hasher.finalize().as_bytes())
    }

    pub fn verify(&self, signer: &SignerId, signature: &Signature) -> bool {
        verify_hash(signer, &self.current(), signature)
    }

    /// Signs the current session hash (the participant's own sessions, and tests).
    #[cfg(test)] // until the participant's session writer signs
    pub fn sign(&self, secret: &crate::crypto::SignerSecret) -> Signature {
        crate::crypto::sign_hash(secret, &self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).expect("test json")
    }

    #[test]
    fn field_order_and_unknown_fields() {
        let tx = parse(r#"{"privacy":"trusting","zzz":1,"meta":null,"madeAt":5,"changes":"[]"}"#);
        let c = canonical_transaction(&tx).unwrap();
        assert_eq!(c.json, r#"{"changes":"[]","madeAt":5,"privacy":"trusting"}"#);
        assert_eq!(c.trusting_meta, None);
    }

    #[test]
    fn made_at_follows_js_then_u64() {
        let ok = |s: &str| {
            canonical_transaction(&parse(&format!(r#"{{"privacy":"trusting","changes":"[]","madeAt":{s}}}"#)))
        };
        assert_eq!(ok("1.0").unwrap().made_at, 1);
        assert_eq!(ok("1e3").unwrap().json, r#"{"changes":"[]","madeAt":1000,"privacy":"trusting"}"#);
        assert_eq!(ok("-0").unwrap().made_at, 0);
        // JS rounds 2^53+1 to 2^53 before cojson-core sees it.
        assert_eq!(ok("9007199254740993").unwrap().made_at, 9007199254740992);
        for bad in ["1.5", "-1", "1e21", "18446744073709551616", "\"5\"", "null"] {
            assert!(matches!(ok(bad), Err(TransactionError::BadMadeAt(_))), "{bad}");
        }
    }

    #[test]
    fn shape_errors() {
        assert_eq!(canonical_transaction(&json!([1])), Err(TransactionError::NotAnObject));
        assert!(matches!(
            canonical_transaction(&json!({"privacy":"x","madeAt":1})),
            Err(TransactionError::BadPrivacy(_))
        ));
        assert_eq!(
            canonical_transaction(&json!({"privacy":"trusting","madeAt":1})),
            Err(TransactionError::MissingField("changes"))
        );
        assert_eq!(
            canonical_transaction(&json!({"privacy":"private","madeAt":1,"encryptedChanges":"encrypted_U"})),
            Err(TransactionError::MissingField("keyUsed"))
        );
        assert_eq!(
            canonical_transaction(&json!({"privacy":"trusting","madeAt":1,"changes":[]})),
            Err(TransactionError::NotAString("changes"))
        );
        assert_eq!(
            canonical_transaction(&json!({"privacy":"trusting","madeAt":1,"changes":"[]","meta":{}})),
            Err(TransactionError::NotAString("meta"))
        );
    }

    #[test]
    fn payload_len_counts_utf8_bytes() {
        let c = canonical_transaction(&json!({"privacy":"trusting","madeAt":1,"changes":"é😀"})).unwrap();
        assert_eq!(c.payload_len, 6);
    }

    #[test]
    fn hasher_chains_without_separator() {
        let mut h = SessionHasher::new();
        h.update("ab");
        h.update("c");
        assert_eq!(h.count(), 2);
        assert_eq!(h.current().0, *blake3::hash(b"abc").as_bytes());
    }
}
