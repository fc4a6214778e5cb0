//! Randomness as an input. The core never draws random bytes itself: the caller passes an
//! [`Entropy`] (the binary backs it with the OS generator, tests replay fixed values), and the
//! order of draws is cojson's, so the same values give the same content
//! (docs/protocols/cojson-participant.md §5, §6, §13).

use super::encoding::{KeyId, KeySecret};
use thiserror::Error;

/// The random source could not deliver.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no randomness available: {0}")]
pub struct EntropyError(pub String);

/// A source of cryptographically secure random bytes.
pub trait Entropy {
    /// Fills `dest` completely, or fails.
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), EntropyError>;
}

fn draw<const N: usize>(entropy: &mut dyn Entropy) -> Result<[u8; N], EntropyError> {
    let mut out = [0u8; N];
    entropy.fill(&mut out)?;
    Ok(out)
}

/// `newRandomKeySecret`: 32 bytes of secret, then 12 bytes of ID.
pub fn random_key(entropy: &mut dyn Entropy) -> Result<(KeyId, KeySecret), EntropyError> {
    let secret = KeySecret(draw::<32>(entropy)?);
    let id = KeyId::from_random(&draw::<12>(entropy)?);
    Ok((id, secret))
}

/// An ephemeral X25519 secret (`sealForGroup`'s one-time sender key): 32 bytes.
pub fn random_ephemeral(entropy: &mut dyn Entropy) -> Result<[u8; 32], EntropyError> {
    draw::<32>(entropy)
}

/// `uniquenessForHeader`: `z` + base58 of 12 bytes.
pub fn random_uniqueness(entropy: &mut dyn Entropy) -> Result<String, EntropyError> {
    Ok(format!("z{}", bs58::encode(draw::<12>(entropy)?).into_string()))
}

/// A test source that replays cojson's randomness in the vectors: the `k`-th draw of `n` bytes
/// is BLAKE3-XOF(`participant-vectors/<k>`, n) (docs/protocols/cojson-participant.md §13).
#[cfg(test)]
pub struct VectorEntropy {
    pub next_k: u64,
}

#[cfg(test)]
impl Entropy for VectorEntropy {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), EntropyError> {
        let label = format!("participant-vectors/{}", self.next_k);
        blake3::Hasher::new().update(label.as_bytes()).finalize_xof().fill(dest);
        self.next_k += 1;
        Ok(())
    }
}
