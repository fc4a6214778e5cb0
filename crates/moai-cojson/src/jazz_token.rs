//! Jazz auth tokens: how an app's client proves to an HTTP server which Jazz account it is
//! (jazz-tools `generateAuthToken`, checked by its `authenticateRequest`). moai accepts them on
//! the agent API and the LLM proxy. Sans-IO: the account's header is an input.
//!
//! A token is `<signature>~<account id>~<createdAt ms>`. The signature is the account's current
//! agent's Ed25519 signature over the JSON string of `secureHash({id, createdAt})`
//! (`hash_z` + base58 BLAKE3 of the canonical JSON), exactly as cojson signs a session hash; the
//! agent is the one the account header names (`ruleset.initialAdmin`, whose `signer_z…` half
//! verifies). jazz-tools accepts tokens for 60 s; so does moai, and it also refuses tokens from
//! more than a minute in the future (clock skew).

use serde_json::{json, Value};
use thiserror::Error;

use crate::canonical_json::stable_stringify;
use crate::crypto::{blake3_hash, verify_hash, Hash, Signature, SignerId};
use crate::ids::CoId;

/// How long after `createdAt` a token is accepted (jazz-tools' default).
pub const JAZZ_TOKEN_LIFETIME_MS: u64 = 60_000;
/// How far in the future `createdAt` may be (clock skew between the app and moai).
const MAX_SKEW_MS: u64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JazzTokenError {
    #[error("not a Jazz auth token (expected signature~co_z…~createdAt)")]
    Malformed,
    #[error("the Jazz auth token expired")]
    Expired,
    #[error("the Jazz auth token is dated in the future")]
    FromTheFuture,
    #[error("account {0} is not known to this server")]
    UnknownAccount(String),
    #[error("{0} is not an account")]
    NotAnAccount(String),
    #[error("the Jazz auth token's signature does not verify")]
    BadSignature,
}

/// A parsed token, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JazzToken {
    signature: Signature,
    account: CoId,
    created_at: u64,
}

impl JazzToken {
    pub fn parse(token: &str) -> Result<JazzToken, JazzTokenError> {
        let mut parts = token.trim().split('~');
        let (Some(sig), Some(id), Some(at), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JazzTokenError::Malformed);
        };
        let signature = Signature::parse(sig).map_err(|_| JazzTokenError::Malformed)?;
        let account = CoId::parse(id).map_err(|_| JazzTokenError::Malformed)?;
        let created_at = at.parse::<u64>().map_err(|_| JazzTokenError::Malformed)?;
        Ok(JazzToken { signature, account, created_at })
    }

    /// The account the token claims to be (verify before trusting it).
    pub fn account(&self) -> &str {
        self.account.as_str()
    }

    /// Whether the token is within its lifetime at `now_ms`.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), JazzTokenError> {
        if self.created_at > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(JazzTokenError::FromTheFuture);
        }
        if self.created_at.saturating_add(JAZZ_TOKEN_LIFETIME_MS) < now_ms {
            return Err(JazzTokenError::Expired);
        }
        Ok(())
    }

    /// Verifies the signature against the account's stored header.
    pub fn verify(&self, account_header: &Value) -> Result<(), JazzTokenError> {
        let not_account = || JazzTokenError::NotAnAccount(self.account.to_string());
        if account_header["meta"]["type"] != "account" || account_header["ruleset"]["type"] != "group" {
            return Err(not_account());
        }
        // The header must be this account's (its id is the hash of the header).
        if crate::crypto::id_for_header(account_header) != self.account {
            return Err(not_account());
        }
        let agent = account_header["ruleset"]["initialAdmin"].as_str().ok_or_else(not_account)?;
        let signer = agent.split('/').nth(1).and_then(|s| SignerId::parse(s).ok()).ok_or_else(not_account)?;
        let payload = json!({ "id": self.account.as_str(), "createdAt": self.created_at });
        let hash = Hash(blake3_hash(stable_stringify(&payload).as_bytes()));
        if verify_hash(&signer, &hash, &self.signature) {
            Ok(())
        } else {
            Err(JazzTokenError::BadSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::AgentIdentity;

    fn token_for(identity: &AgentIdentity, secret: &crate::crypto::SignerSecret, created_at: u64) -> String {
        let payload = json!({ "id": identity.account_id(), "createdAt": created_at });
        let hash = Hash(blake3_hash(stable_stringify(&payload).as_bytes()));
        let sig = crate::crypto::sign_hash(secret, &hash);
        format!("{}~{}~{created_at}", sig.to_z_string(), identity.account_id())
    }

    #[test]
    fn a_token_signed_by_the_accounts_agent_verifies_and_others_do_not() {
        let identity = AgentIdentity::from_secret_seed(&[7u8; 32]);
        let secret = crate::crypto::AgentSecret::from_seed(&[7u8; 32]).signer;
        let now = 1_800_000_000_000;
        let token = JazzToken::parse(&token_for(&identity, &secret, now)).unwrap();
        assert_eq!(token.account(), identity.account_id());
        token.check_fresh(now + 1_000).unwrap();
        token.verify(&identity.account_header()).unwrap();

        assert_eq!(token.check_fresh(now + JAZZ_TOKEN_LIFETIME_MS + 1), Err(JazzTokenError::Expired));
        assert_eq!(token.check_fresh(now - MAX_SKEW_MS - 1), Err(JazzTokenError::FromTheFuture));
        // Another account's header (another agent) does not verify it.
        let other = AgentIdentity::from_secret_seed(&[8u8; 32]);
        assert!(token.verify(&other.account_header()).is_err());
        // A token for another createdAt with the same signature: refused.
        let forged =
            JazzToken::parse(&token_for(&identity, &secret, now).replace(&format!("~{now}"), &format!("~{}", now + 1)))
                .unwrap();
        assert_eq!(forged.verify(&identity.account_header()), Err(JazzTokenError::BadSignature));
        for bad in ["", "a~b~c", "x~co_zabc~1~2", "signature_z1~co_zabc~nan"] {
            assert_eq!(JazzToken::parse(bad), Err(JazzTokenError::Malformed), "{bad}");
        }
    }
}
