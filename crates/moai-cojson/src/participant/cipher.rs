//! cojson's `encrypt`: the bare XSalsa20 stream cipher (no MAC) that private transactions and
//! key-for-key entries use (docs/protocols/cojson-participant.md §1, §4, §7).
//!
//! There is no authentication here on purpose: cojson relies on the session signature over
//! the ciphertext. A wrong key therefore decrypts to garbage, which shows up as "not JSON".

use super::encoding::{decode_u, encode_u, nonce, KeyId, KeySecret, PrimitiveError, ENCRYPTED_PREFIX};
use crate::canonical_json::stable_stringify;
use salsa20::cipher::{KeyIvInit, StreamCipher};
use salsa20::XSalsa20;
use serde_json::{json, Value};

/// XORs `data` with the XSalsa20 keystream of `(key, nonce)`.
pub fn xsalsa20(key: &[u8; 32], nonce: &[u8; 24], data: &mut [u8]) {
    let mut cipher = XSalsa20::new(key.into(), nonce.into());
    cipher.apply_keystream(data);
}

/// `encrypted_U…` of a plaintext that is already JSON text (a transaction's `changes` as
/// `JSON.stringify` wrote it, or `stableStringify` of a value).
pub fn encrypt_text(plaintext: &str, key: &KeySecret, nonce_material: &Value) -> String {
    let mut bytes = plaintext.as_bytes().to_vec();
    xsalsa20(&key.0, &nonce(nonce_material), &mut bytes);
    encode_u(ENCRYPTED_PREFIX, &bytes)
}

/// cojson's `encrypt(value, key, nonceMaterial)`: the plaintext is `stableStringify(value)`.
pub fn encrypt_value(value: &Value, key: &KeySecret, nonce_material: &Value) -> String {
    encrypt_text(&stable_stringify(value), key, nonce_material)
}

/// The plaintext of an `encrypted_U…` value, parsed as JSON.
pub fn decrypt_value(encrypted: &str, key: &KeySecret, nonce_material: &Value) -> Result<Value, PrimitiveError> {
    let mut bytes = decode_u(encrypted, ENCRYPTED_PREFIX)?;
    xsalsa20(&key.0, &nonce(nonce_material), &mut bytes);
    serde_json::from_slice(&bytes).map_err(|_| PrimitiveError::NotJson)
}

fn key_for_key_material(encrypted_id: &KeyId, encrypting_id: &KeyId) -> Value {
    json!({"encryptedID": encrypted_id.as_str(), "encryptingID": encrypting_id.as_str()})
}

/// `encryptKeySecret`: the value of `<toEncrypt.id>_for_<encrypting.id>`, the secret of one read
/// key encrypted with another (rotation: old with new; parent groups: child with parent).
pub fn encrypt_key_secret(to_encrypt: (&KeyId, &KeySecret), encrypting: (&KeyId, &KeySecret)) -> String {
    let material = key_for_key_material(to_encrypt.0, encrypting.0);
    encrypt_value(&Value::String(to_encrypt.1.to_z_string()), encrypting.1, &material)
}

/// `decryptKeySecret`, the inverse of [`encrypt_key_secret`].
pub fn decrypt_key_secret(
    encrypted_id: &KeyId,
    encrypting_id: &KeyId,
    encrypted: &str,
    encrypting_secret: &KeySecret,
) -> Result<KeySecret, PrimitiveError> {
    let material = key_for_key_material(encrypted_id, encrypting_id);
    match decrypt_value(encrypted, encrypting_secret, &material)? {
        Value::String(s) => KeySecret::parse(&s).map_err(|_| PrimitiveError::NotAKeySecret),
        _ => Err(PrimitiveError::NotAKeySecret),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_wrong_key() {
        let key = KeySecret([7; 32]);
        let material = json!({"in": "co_zX", "tx": {"sessionID": "s", "txIndex": 0}});
        let enc = encrypt_text("[1,2]", &key, &material);
        assert_eq!(decrypt_value(&enc, &key, &material).unwrap(), json!([1, 2]));
        assert!(decrypt_value(&enc, &KeySecret([8; 32]), &material).is_err());
        assert_eq!(decrypt_value("sealed_Uabc", &key, &material), Err(PrimitiveError::BadPrefix(ENCRYPTED_PREFIX)));
    }

    #[test]
    fn key_for_key_roundtrip() {
        let (a, b) = (KeyId::parse("key_zA").unwrap(), KeyId::parse("key_zB").unwrap());
        let (sa, sb) = (KeySecret([1; 32]), KeySecret([2; 32]));
        let enc = encrypt_key_secret((&a, &sa), (&b, &sb));
        assert_eq!(decrypt_key_secret(&a, &b, &enc, &sb), Ok(sa));
        // The IDs are part of the nonce: the same bytes under other names do not decrypt.
        assert!(decrypt_key_secret(&b, &a, &enc, &sb).is_err());
    }
}
