//! cojson's cryptographic encodings: BLAKE3 hashes (`hash_z…`,
//! `shortHash_z…`, CoValue IDs), Ed25519 signer IDs and signatures, and X25519
//! sealer IDs.
//!
//! All binary values travel as `<prefix>_z<base58>`; decoding takes everything
//! after the first `_z`, like cojson. Fixed lengths are enforced on decode so
//! that a malformed ID is a typed error instead of a panic deeper down.
//! Anything cojson hashes is first turned into canonical JSON
//! ([`crate::canonical_json`]); this module only deals in bytes and encodings.
//!
//! The relay only verifies. The secrets and signing (`AgentSecret`, `sign_hash`, …) serve the
//! participant (`crate::participant`, docs/protocols/cojson-participant.md §2), which writes
//! content under its own account, and the tests, which sign real content with them.

use crate::canonical_json::stable_stringify;
use crate::ids::{AgentId, CoId};
use ed25519_dalek::{Signer as _, SigningKey};
use ed25519_dalek::{Verifier as _, VerifyingKey};
use serde_json::Value;
use std::fmt;
use thiserror::Error;

/// Length of a short hash and therefore of a CoValue ID's bytes.
pub const SHORT_HASH_LENGTH: usize = 19;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CryptoError {
    #[error("expected prefix `{expected}_z` in {value:?}")]
    BadPrefix { expected: &'static str, value: String },
    #[error("invalid base58 in {0:?}")]
    BadBase58(String),
    #[error("{what} must be {expected} bytes, got {got}")]
    BadLength { what: &'static str, expected: usize, got: usize },
    #[error("signer id is not a valid Ed25519 public key: {0:?}")]
    BadPublicKey(String),
    #[error("agent secret must be `sealerSecret_z…/signerSecret_z…`")]
    BadAgentSecret,
}

/// Decodes `<prefix>_z<base58>` into exactly `N` bytes.
fn decode_z<const N: usize>(s: &str, prefix: &'static str, what: &'static str) -> Result<[u8; N], CryptoError> {
    let body = s
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix("_z"))
        .ok_or_else(|| CryptoError::BadPrefix { expected: prefix, value: s.to_string() })?;
    let bytes = bs58::decode(body).into_vec().map_err(|_| CryptoError::BadBase58(s.to_string()))?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| CryptoError::BadLength { what, expected: N, got: bytes.len() })
}

fn encode_z(prefix: &str, bytes: &[u8]) -> String {
    format!("{prefix}_z{}", bs58::encode(bytes).into_string())
}

macro_rules! z_encoded {
    ($name:ident, $len:expr, $prefix:literal) => {
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; $len]);

        // Every encoding gets the same API; not every type uses all of it outside tests.
        #[allow(dead_code)]
        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn parse(s: &str) -> Result<Self, CryptoError> {
                decode_z::<$len>(s, $prefix, stringify!($name)).map($name)
            }

            pub fn to_z_string(self) -> String {
                encode_z($prefix, &self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_z_string())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.to_z_string())
            }
        }
    };
}

/// Like `z_encoded!`, for secrets: the same parsing and encoding, but `Debug` never prints the
/// value, so a secret cannot leak into logs through `{:?}`.
macro_rules! z_encoded_secret {
    ($name:ident, $len:expr, $prefix:literal) => {
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(pub [u8; $len]);

        // Every encoding gets the same API; not every type uses all of it outside tests.
        #[allow(dead_code)]
        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn parse(s: &str) -> Result<Self, CryptoError> {
                decode_z::<$len>(s, $prefix, stringify!($name)).map($name)
            }

            pub fn to_z_string(&self) -> String {
                encode_z($prefix, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(..)", stringify!($name))
            }
        }
    };
}

z_encoded!(Hash, 32, "hash");
z_encoded!(ShortHash, SHORT_HASH_LENGTH, "shortHash");
z_encoded!(Signature, 64, "signature");
z_encoded!(SealerId, 32, "sealer");
z_encoded_secret!(SealerSecret, 32, "sealerSecret");
z_encoded_secret!(SignerSecret, 32, "signerSecret");

/// An Ed25519 public key as cojson writes it (`signer_z…`). Parsing checks
/// that the bytes are a valid curve point, so verification cannot fail later
/// for a reason other than a wrong signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignerId(VerifyingKey);

impl SignerId {
    pub const PREFIX: &'static str = "signer";

    pub fn parse(s: &str) -> Result<Self, CryptoError> {
        let bytes = decode_z::<32>(s, Self::PREFIX, "SignerId")?;
        VerifyingKey::from_bytes(&bytes).map(SignerId).map_err(|_| CryptoError::BadPublicKey(s.to_string()))
    }

    pub fn to_z_string(self) -> String {
        encode_z(Self::PREFIX, self.0.as_bytes())
    }

    /// Verifies an Ed25519 signature over raw message bytes (RFC 8032, via
    /// `verify`, as cojson-core does — not `verify_strict`).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.0.verify(message, &sig).is_ok()
    }
}

impl fmt::Display for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_z_string())
    }
}

impl fmt::Debug for SignerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignerId({})", self.to_z_string())
    }
}

impl SignerSecret {
    pub fn signer_id(&self) -> SignerId {
        SignerId(SigningKey::from_bytes(&self.0).verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(SigningKey::from_bytes(&self.0).sign(message).to_bytes())
    }
}

impl SealerSecret {
    /// X25519 public key for this secret (clamped scalar × base point).
    pub fn sealer_id(&self) -> SealerId {
        SealerId(curve25519_dalek::MontgomeryPoint::mul_base_clamped(self.0).to_bytes())
    }
}

/// `sealerSecret_z…/signerSecret_z…`.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentSecret {
    pub sealer: SealerSecret,
    pub signer: SignerSecret,
}

impl AgentSecret {
    pub fn parse(s: &str) -> Result<Self, CryptoError> {
        let (sealer, signer) = s.split_once('/').ok_or(CryptoError::BadAgentSecret)?;
        Ok(AgentSecret { sealer: SealerSecret::parse(sealer)?, signer: SignerSecret::parse(signer)? })
    }

    pub fn to_z_string(&self) -> String {
        format!("{}/{}", self.sealer.to_z_string(), self.signer.to_z_string())
    }

    /// `agentSecretFromSecretSeed`: each half is BLAKE3(context ‖ seed) with
    /// the contexts `seal` and `sign`. This is cojson's plain prefixing, not
    /// BLAKE3's derive-key mode.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        AgentSecret {
            sealer: SealerSecret(blake3_hash_with_context(seed, b"seal")),
            signer: SignerSecret(blake3_hash_with_context(seed, b"sign")),
        }
    }

    /// `sealer_z…/signer_z…`, cojson's `getAgentID`.
    pub fn agent_id(&self) -> AgentId {
        let s = format!("{}/{}", self.sealer.sealer_id().to_z_string(), self.signer.signer_id().to_z_string());
        // Always well-formed: both halves were just encoded with their prefixes.
        AgentId::parse(&s).unwrap_or_else(|_| unreachable!("agent id built from valid halves"))
    }
}

impl fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentSecret(..)") // never print secrets
    }
}

/// Signer of an agent ID: its `signer_z…` half, decoded.
pub fn agent_signer_id(agent: &AgentId) -> Result<SignerId, CryptoError> {
    SignerId::parse(agent.signer_part())
}

pub fn blake3_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// `blake3HashOnceWithContext`: BLAKE3 over `context ‖ data`.
pub fn blake3_hash_with_context(data: &[u8], context: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(context);
    hasher.update(data);
    *hasher.finalize().as_bytes()
}

/// `shortHash`: the first 19 bytes of BLAKE3 of the canonical JSON.
pub fn short_hash(value: &Value) -> ShortHash {
    let full = blake3_hash(stable_stringify(value).as_bytes());
    let mut short = [0u8; SHORT_HASH_LENGTH];
    short.copy_from_slice(&full[..SHORT_HASH_LENGTH]);
    ShortHash(short)
}

/// `idforHeader`: `co_z` + the short hash of the header's canonical JSON.
pub fn id_for_header(header: &Value) -> CoId {
    let short = short_hash(header);
    CoId::parse(&encode_z("co", &short.0)).unwrap_or_else(|_| unreachable!("co_z prefix is present"))
}

/// The exact bytes cojson signs for a session hash: the hash as a JSON
/// string literal, quotes included (`stableStringify("hash_z…")`).
pub fn signed_message_for_hash(hash: &Hash) -> String {
    format!("\"{}\"", hash.to_z_string())
}

pub fn sign_hash(secret: &SignerSecret, hash: &Hash) -> Signature {
    secret.sign(signed_message_for_hash(hash).as_bytes())
}

pub fn verify_hash(signer: &SignerId, hash: &Hash, signature: &Signature) -> bool {
    signer.verify(signed_message_for_hash(hash).as_bytes(), signature)
}

/// XSalsa20 nonce of a private transaction: the first 24 bytes of BLAKE3 of
/// `{"in":coID,"tx":{"sessionID":…,"txIndex":n}}` in canonical JSON. A relay
/// never decrypts; the participant encrypts and decrypts with it
/// (docs/protocols/cojson-participant.md §1; it builds its nonces from the material itself).
#[cfg(test)]
pub fn transaction_nonce(co_id: &CoId, session_id: &str, tx_index: u64) -> [u8; 24] {
    let material = serde_json::json!({
        "in": co_id.as_str(),
        "tx": { "sessionID": session_id, "txIndex": tx_index },
    });
    let full = blake3_hash(stable_stringify(&material).as_bytes());
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&full[..24]);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_roundtrip_and_length_checks() {
        let h = Hash([7u8; 32]);
        assert_eq!(Hash::parse(&h.to_z_string()), Ok(h));
        assert!(matches!(Hash::parse("hash_z1"), Err(CryptoError::BadLength { .. })));
        assert!(matches!(Hash::parse("hash_0OIl"), Err(CryptoError::BadPrefix { .. })));
        assert!(matches!(Hash::parse("hash_z0OIl"), Err(CryptoError::BadBase58(_))));
        assert!(matches!(Signature::parse("hash_zabc"), Err(CryptoError::BadPrefix { .. })));
    }

    #[test]
    fn sign_and_verify_roundtrip_and_tamper() {
        let secret = SignerSecret([9u8; 32]);
        let signer = secret.signer_id();
        let hash = Hash([1u8; 32]);
        let sig = sign_hash(&secret, &hash);
        assert!(verify_hash(&signer, &hash, &sig));
        assert!(!verify_hash(&signer, &Hash([2u8; 32]), &sig));
        let mut bad = sig;
        bad.0[0] ^= 1;
        assert!(!verify_hash(&signer, &hash, &bad));
    }

    #[test]
    fn invalid_public_key_is_an_error_not_a_panic() {
        // y = 2 is not on the curve for either sign bit.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        let s = format!("signer_z{}", bs58::encode(bytes).into_string());
        assert!(matches!(SignerId::parse(&s), Err(CryptoError::BadPublicKey(_))));
    }
}
