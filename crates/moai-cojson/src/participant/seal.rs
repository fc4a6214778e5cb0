//! Sealing: how cojson reveals a read key to one member (`seal`, `sealed_U…`) or to a whole
//! group (`sealForGroup`, `sealedForGroup_U…`), and the group sealer a group derives from its
//! read key (docs/protocols/cojson-participant.md §1, §6, §7).
//!
//! The construction is NaCl's secretbox (XSalsa20-Poly1305, tag first) keyed with the **raw**
//! X25519 shared secret: unlike `crypto_box` there is no HSalsa20 step, so a standard box
//! implementation would not interoperate. The nonce is derived from JSON material naming the
//! transaction that carries the value, so a sealed value cannot be moved to another place.

use super::encoding::{decode_u, encode_u, nonce, KeySecret, PrimitiveError, SEALED_FOR_GROUP_PREFIX, SEALED_PREFIX};
use crate::canonical_json::stable_stringify;
use crate::crypto::{blake3_hash_with_context, SealerId, SealerSecret};
use crypto_secretbox::aead::AeadInPlace;
use crypto_secretbox::{KeyInit, XSalsa20Poly1305};
use serde_json::Value;
use x25519_dalek::{PublicKey, StaticSecret};

const TAG_LEN: usize = 16;

/// The raw X25519 shared secret between a secret and a public key (the secret is clamped when
/// used, as X25519 requires; it is stored unclamped).
pub fn shared_secret(secret: &SealerSecret, public: &SealerId) -> [u8; 32] {
    StaticSecret::from(secret.0).diffie_hellman(&PublicKey::from(public.0)).to_bytes()
}

/// `tag(16) ‖ ciphertext` of XSalsa20-Poly1305 under `key`.
fn secretbox(key: &[u8; 32], nonce: &[u8; 24], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XSalsa20Poly1305::new(key.into());
    let mut body = plaintext.to_vec();
    // Fails only for messages beyond the cipher's length limit (about 256 GiB).
    let tag = cipher.encrypt_in_place_detached(nonce.into(), b"", &mut body).unwrap_or_default();
    let mut out = Vec::with_capacity(TAG_LEN + body.len());
    out.extend_from_slice(&tag);
    out.extend_from_slice(&body);
    out
}

fn open_secretbox(key: &[u8; 32], nonce: &[u8; 24], sealed: &[u8]) -> Result<Vec<u8>, PrimitiveError> {
    if sealed.len() < TAG_LEN {
        return Err(PrimitiveError::TooShort);
    }
    let (tag, body) = sealed.split_at(TAG_LEN);
    let cipher = XSalsa20Poly1305::new(key.into());
    let mut body = body.to_vec();
    cipher
        .decrypt_in_place_detached(nonce.into(), b"", &mut body, tag.into())
        .map_err(|_| PrimitiveError::Unauthentic)?;
    Ok(body)
}

/// cojson's `seal({message, from, to, nOnceMaterial})`: the plaintext is
/// `stableStringify(message)`.
pub fn seal(message: &Value, from: &SealerSecret, to: &SealerId, nonce_material: &Value) -> String {
    let key = shared_secret(from, to);
    encode_u(SEALED_PREFIX, &secretbox(&key, &nonce(nonce_material), stable_stringify(message).as_bytes()))
}

/// `unseal(sealed, mySecret, senderID, nOnceMaterial)`, parsed as JSON.
pub fn unseal(
    sealed: &str,
    to: &SealerSecret,
    from: &SealerId,
    nonce_material: &Value,
) -> Result<Value, PrimitiveError> {
    let bytes = decode_u(sealed, SEALED_PREFIX)?;
    let plain = open_secretbox(&shared_secret(to, from), &nonce(nonce_material), &bytes)?;
    serde_json::from_slice(&plain).map_err(|_| PrimitiveError::NotJson)
}

/// A read key revealed to one member: `seal` of the key secret as a JSON string.
pub fn seal_key_secret(secret: &KeySecret, from: &SealerSecret, to: &SealerId, nonce_material: &Value) -> String {
    seal(&Value::String(secret.to_z_string()), from, to, nonce_material)
}

/// The inverse of [`seal_key_secret`].
pub fn unseal_key_secret(
    sealed: &str,
    to: &SealerSecret,
    from: &SealerId,
    nonce_material: &Value,
) -> Result<KeySecret, PrimitiveError> {
    match unseal(sealed, to, from, nonce_material)? {
        Value::String(s) => KeySecret::parse(&s).map_err(|_| PrimitiveError::NotAKeySecret),
        _ => Err(PrimitiveError::NotAKeySecret),
    }
}

/// `groupSealerFromReadKey`: the sealer secret is BLAKE3 over `"groupSealer" ‖` the read key's
/// whole `keySecret_z…` string (the string, not its bytes).
pub fn group_sealer_from_read_key(read_key: &KeySecret) -> (SealerSecret, SealerId) {
    let secret = SealerSecret(blake3_hash_with_context(read_key.to_z_string().as_bytes(), b"groupSealer"));
    let id = secret.sealer_id();
    (secret, id)
}

/// The `groupSealer` field value, `<readKeyID>@<sealerID>`.
pub fn group_sealer_value(read_key_id: &str, sealer: &SealerId) -> String {
    format!("{read_key_id}@{}", sealer.to_z_string())
}

/// `sealForGroup`: `ephemeralPublic(32) ‖ secretbox(X25519(ephemeral, groupSealer), …)`. The
/// ephemeral secret is an input (random in cojson), so the result is reproducible.
/// Used to extend a group into a parent group this account is not a member of (§7, §8).
pub fn seal_for_group(message: &Value, to: &SealerId, nonce_material: &Value, ephemeral: &[u8; 32]) -> String {
    let ephemeral = SealerSecret(*ephemeral);
    let key = shared_secret(&ephemeral, to);
    let mut out = ephemeral.sealer_id().0.to_vec();
    out.extend(secretbox(&key, &nonce(nonce_material), stable_stringify(message).as_bytes()));
    encode_u(SEALED_FOR_GROUP_PREFIX, &out)
}

/// `unsealForGroup` with the group sealer secret, parsed as JSON.
pub fn unseal_for_group(
    sealed: &str,
    group_sealer: &SealerSecret,
    nonce_material: &Value,
) -> Result<Value, PrimitiveError> {
    let bytes = decode_u(sealed, SEALED_FOR_GROUP_PREFIX)?;
    if bytes.len() < 32 + TAG_LEN {
        return Err(PrimitiveError::TooShort);
    }
    let (ephemeral, boxed) = bytes.split_at(32);
    let mut public = [0u8; 32];
    public.copy_from_slice(ephemeral);
    let key = shared_secret(group_sealer, &SealerId(public));
    let plain = open_secretbox(&key, &nonce(nonce_material), boxed)?;
    serde_json::from_slice(&plain).map_err(|_| PrimitiveError::NotJson)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seal_roundtrip_both_directions_and_tamper() {
        let (a, b) = (SealerSecret([1; 32]), SealerSecret([2; 32]));
        let material = json!({"in": "co_zG", "tx": {"sessionID": "s", "txIndex": 1}});
        let key = KeySecret([9; 32]);
        let sealed = seal_key_secret(&key, &a, &b.sealer_id(), &material);
        assert_eq!(unseal_key_secret(&sealed, &b, &a.sealer_id(), &material), Ok(key.clone()));
        // The sender can open its own seal too (X25519 is symmetric).
        assert_eq!(unseal_key_secret(&sealed, &a, &b.sealer_id(), &material), Ok(key));
        let other = json!({"in": "co_zG", "tx": {"sessionID": "s", "txIndex": 2}});
        assert_eq!(unseal(&sealed, &b, &a.sealer_id(), &other), Err(PrimitiveError::Unauthentic));
        assert_eq!(unseal("sealed_UAAA", &b, &a.sealer_id(), &material), Err(PrimitiveError::TooShort));
    }

    #[test]
    fn seal_for_group_roundtrip() {
        let (secret, id) = group_sealer_from_read_key(&KeySecret([4; 32]));
        let material = json!({"in": "co_zC", "tx": {"sessionID": "s", "txIndex": 0}});
        let sealed = seal_for_group(&json!("hello"), &id, &material, &[5; 32]);
        assert_eq!(unseal_for_group(&sealed, &secret, &material), Ok(json!("hello")));
        assert!(unseal_for_group(&sealed, &SealerSecret([6; 32]), &material).is_err());
        assert_eq!(unseal_for_group("sealedForGroup_UAAAA", &secret, &material), Err(PrimitiveError::TooShort));
    }
}
