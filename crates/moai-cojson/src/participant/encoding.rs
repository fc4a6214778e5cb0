//! The string forms a participant handles beyond the relay's `_z` IDs: read keys (`keySecret_z…`
//! and their IDs `key_z…`), base64url payloads (`sealed_U…`, `encrypted_U…`,
//! `sealedForGroup_U…`) and the nonces derived from JSON material.
//!
//! It exists so that every primitive parses its inputs into fixed-size types first, and a
//! malformed value from the network is a [`PrimitiveError`] rather than a panic deeper down
//! (docs/protocols/cojson-participant.md §1).

use crate::canonical_json::stable_stringify;
use crate::crypto::{blake3_hash, CryptoError};
use crate::ids::{CoId, SessionId};
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde_json::{json, Value};
use std::fmt;
use thiserror::Error;

pub const SEALED_PREFIX: &str = "sealed_U";
pub const ENCRYPTED_PREFIX: &str = "encrypted_U";
pub const SEALED_FOR_GROUP_PREFIX: &str = "sealedForGroup_U";

/// Why a primitive could not decode, decrypt or unseal a value. Messages never contain key
/// material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PrimitiveError {
    #[error("expected a value starting with `{0}`")]
    BadPrefix(&'static str),
    #[error("invalid base64url after `{0}`")]
    BadBase64(&'static str),
    #[error("invalid {0}")]
    BadKey(&'static str),
    #[error("sealed value is shorter than its fixed parts")]
    TooShort,
    #[error("sealed value does not authenticate (wrong key, nonce or sender)")]
    Unauthentic,
    #[error("decrypted bytes are not JSON")]
    NotJson,
    #[error("decrypted value is not a key secret")]
    NotAKeySecret,
}

impl From<CryptoError> for PrimitiveError {
    fn from(e: CryptoError) -> Self {
        // CryptoError::BadPrefix/BadBase58 carry the input, which may be a secret: keep only
        // what kind of value it was.
        PrimitiveError::BadKey(match e {
            CryptoError::BadLength { what, .. } => what,
            _ => "key encoding",
        })
    }
}

/// base64url with `=` padding on output (what cojson writes); input with or without padding.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// `<prefix><base64url(bytes)>`, padded.
pub fn encode_u(prefix: &str, bytes: &[u8]) -> String {
    let mut out = String::with_capacity(prefix.len() + bytes.len().div_ceil(3) * 4);
    out.push_str(prefix);
    BASE64URL.encode_string(bytes, &mut out);
    out
}

/// The bytes of `<prefix><base64url>`; padding is optional.
pub fn decode_u(s: &str, prefix: &'static str) -> Result<Vec<u8>, PrimitiveError> {
    let body = s.strip_prefix(prefix).ok_or(PrimitiveError::BadPrefix(prefix))?;
    BASE64URL.decode(body).map_err(|_| PrimitiveError::BadBase64(prefix))
}

/// A group read key: the 32-byte XSalsa20 key, written `keySecret_z…`.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySecret(pub [u8; 32]);

impl KeySecret {
    pub const PREFIX: &'static str = "keySecret_z";

    pub fn parse(s: &str) -> Result<Self, PrimitiveError> {
        let body = s.strip_prefix(Self::PREFIX).ok_or(PrimitiveError::BadKey("key secret"))?;
        let bytes = bs58::decode(body).into_vec().map_err(|_| PrimitiveError::BadKey("key secret"))?;
        <[u8; 32]>::try_from(bytes.as_slice()).map(KeySecret).map_err(|_| PrimitiveError::BadKey("key secret"))
    }

    pub fn to_z_string(&self) -> String {
        format!("{}{}", Self::PREFIX, bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret(..)") // never print secrets
    }
}

/// A read key's ID, `key_z<base58 of 12 random bytes>`. It is a name, not derived from the
/// secret, so only the prefix is checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub const PREFIX: &'static str = "key_z";

    pub fn parse(s: &str) -> Result<Self, PrimitiveError> {
        if s.starts_with(Self::PREFIX) {
            Ok(KeyId(s.to_string()))
        } else {
            Err(PrimitiveError::BadKey("key id"))
        }
    }

    pub fn from_random(bytes: &[u8; 12]) -> Self {
        KeyId(format!("{}{}", Self::PREFIX, bs58::encode(bytes).into_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `generate_nonce`: the first 24 bytes of BLAKE3 over the canonical JSON of the material.
pub fn nonce(material: &Value) -> [u8; 24] {
    let full = blake3_hash(stable_stringify(material).as_bytes());
    let mut out = [0u8; 24];
    out.copy_from_slice(&full[..24]);
    out
}

/// `{"in": coID, "tx": {"sessionID": …, "txIndex": …}}`: the nonce material of a private
/// transaction and of a key sealed inside a group (docs/protocols/cojson-participant.md §4, §7).
pub fn tx_nonce_material(co_id: &CoId, session: &SessionId, tx_index: u64) -> Value {
    json!({"in": co_id.as_str(), "tx": {"sessionID": session.as_str(), "txIndex": tx_index}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_pads_on_output_and_accepts_both_on_input() {
        assert_eq!(encode_u("x_U", b"a"), "x_UYQ==");
        assert_eq!(decode_u("x_UYQ==", "x_U").unwrap(), b"a");
        assert_eq!(decode_u("x_UYQ", "x_U").unwrap(), b"a");
        assert_eq!(decode_u("x_U-_8", "x_U").unwrap(), [0xfb, 0xff]);
        assert_eq!(decode_u("y_UYQ", "x_U"), Err(PrimitiveError::BadPrefix("x_U")));
        assert_eq!(decode_u("x_U+/", "x_U"), Err(PrimitiveError::BadBase64("x_U")));
    }

    #[test]
    fn key_secrets_and_ids() {
        let k = KeySecret([3; 32]);
        assert_eq!(KeySecret::parse(&k.to_z_string()), Ok(k.clone()));
        assert_eq!(format!("{k:?}"), "KeySecret(..)");
        assert!(KeySecret::parse("keySecret_z1").is_err());
        assert!(KeySecret::parse("keySecret_z0OIl").is_err());
        assert!(KeySecret::parse("sealerSecret_z1").is_err());
        assert!(KeyId::parse("key_zabc").is_ok());
        assert!(KeyId::parse("co_zabc").is_err());
        assert_eq!(KeyId::from_random(&[0; 12]).as_str(), "key_z111111111111");
    }
}
