//! The server's own cojson identity: its agent secret (`PEER_SECRET`), the agent ID derived
//! from it, and its account ID (`PEER_ID`), which is a pure function of the agent ID
//! (docs/protocols/cojson-participant.md §2).
//!
//! This is what the binary checks at start (refuse a `PEER_ID` that is not the account of
//! `PEER_SECRET`) and what `moai agent generate` prints. Errors never echo the secret.

use crate::crypto::{id_for_header, AgentSecret, SealerSecret, SignerSecret};
use crate::header::Header;
use crate::ids::{AgentId, CoId};
use serde_json::{json, Value};
use std::fmt;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("the agent secret must be `sealerSecret_z…/signerSecret_z…`, each half 32 bytes in base58")]
    BadSecret,
    #[error("PEER_ID must be an account ID (`co_z…`), got {0:?}")]
    BadAccountId(String),
    #[error("PEER_ID {given} is not the account of PEER_SECRET, whose account is {derived}")]
    Mismatch { given: String, derived: String },
    #[error("account {account} in storage is not an account of this agent (its initialAdmin is {stored:?}, this secret's agent is {ours})")]
    StoredAccountMismatch { account: String, stored: Option<String>, ours: String },
}

/// A parsed agent secret with the IDs derived from it.
#[derive(Clone)]
pub struct AgentIdentity {
    secret: AgentSecret,
    agent: AgentId,
    account: CoId,
}

impl fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("agent", &self.agent.as_str())
            .field("account", &self.account.as_str())
            .finish_non_exhaustive() // never print the secret
    }
}

/// The header of the account whose `initialAdmin` is `agent`; its ID is the account ID.
pub fn account_header(agent: &AgentId) -> Value {
    json!({
        "type": "comap",
        "ruleset": {"type": "group", "initialAdmin": agent.as_str()},
        "meta": {"type": "account"},
        "createdAt": null,
        "uniqueness": null,
    })
}

impl AgentIdentity {
    fn from_agent_secret(secret: AgentSecret) -> Self {
        let agent = secret.agent_id();
        let account = id_for_header(&account_header(&agent));
        AgentIdentity { secret, agent, account }
    }

    /// Parses `PEER_SECRET` (`sealerSecret_z…/signerSecret_z…`; surrounding whitespace ignored).
    pub fn from_secret(peer_secret: &str) -> Result<Self, IdentityError> {
        let secret = AgentSecret::parse(peer_secret.trim()).map_err(|_| IdentityError::BadSecret)?;
        Ok(Self::from_agent_secret(secret))
    }

    /// The start-up check: parses `PEER_SECRET` and refuses a `PEER_ID` that is not its account.
    pub fn from_env(peer_id: &str, peer_secret: &str) -> Result<Self, IdentityError> {
        let peer_id = peer_id.trim();
        if !peer_id.starts_with(CoId::PREFIX) {
            return Err(IdentityError::BadAccountId(peer_id.to_string()));
        }
        let identity = Self::from_secret(peer_secret)?;
        if identity.account.as_str() != peer_id {
            return Err(IdentityError::Mismatch {
                given: peer_id.to_string(),
                derived: identity.account.as_str().to_string(),
            });
        }
        Ok(identity)
    }

    /// `newRandomAgentSecret`: the first 32 random bytes are the X25519 secret, the last 32 the
    /// Ed25519 seed. The caller supplies the randomness (`moai agent generate`).
    pub fn from_random(bytes: &[u8; 64]) -> Self {
        let mut sealer = [0u8; 32];
        let mut signer = [0u8; 32];
        sealer.copy_from_slice(&bytes[..32]);
        signer.copy_from_slice(&bytes[32..]);
        Self::from_agent_secret(AgentSecret { sealer: SealerSecret(sealer), signer: SignerSecret(signer) })
    }

    /// `agentSecretFromSecretSeed`: both halves derived from one 32-byte seed.
    pub fn from_secret_seed(seed: &[u8; 32]) -> Self {
        Self::from_agent_secret(AgentSecret::from_seed(seed))
    }

    /// `PEER_ID`: the account ID `co_z…`.
    pub fn account_id(&self) -> &str {
        self.account.as_str()
    }

    /// The agent ID `sealer_z…/signer_z…`.
    pub fn agent_id(&self) -> &str {
        self.agent.as_str()
    }

    /// `PEER_SECRET`, to print once (`moai agent generate`); never log it.
    pub fn secret_string(&self) -> String {
        self.secret.to_z_string()
    }

    /// The account's header, from which its ID is computed.
    pub fn account_header(&self) -> Value {
        account_header(&self.agent)
    }

    /// When the account is already in storage: its header must name this agent as
    /// `initialAdmin` (cojson's `withLoadedAccount` check).
    pub fn check_stored_account_header(&self, header: &Value) -> Result<(), IdentityError> {
        let mismatch = |stored: Option<String>| IdentityError::StoredAccountMismatch {
            account: self.account.as_str().to_string(),
            stored,
            ours: self.agent.as_str().to_string(),
        };
        let stored = header.get("ruleset").and_then(|r| r.get("initialAdmin")).and_then(Value::as_str);
        let valid = Header::validate(&self.account, header).ok().and_then(|h| h.account_agent());
        match valid {
            Some(agent) if agent == self.agent => Ok(()),
            _ => Err(mismatch(stored.map(str::to_string))),
        }
    }

    pub(crate) fn secret(&self) -> &AgentSecret {
        &self.secret
    }

    pub(crate) fn agent(&self) -> &AgentId {
        &self.agent
    }

    pub(crate) fn account(&self) -> &CoId {
        &self.account
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_roundtrips_through_env() {
        let id = AgentIdentity::from_random(&[42; 64]);
        let again = AgentIdentity::from_env(id.account_id(), &format!(" {} \n", id.secret_string())).unwrap();
        assert_eq!(again.agent_id(), id.agent_id());
        assert!(id.check_stored_account_header(&id.account_header()).is_ok());
        let other = AgentIdentity::from_random(&[43; 64]);
        assert!(matches!(
            id.check_stored_account_header(&other.account_header()),
            Err(IdentityError::StoredAccountMismatch { .. })
        ));
    }

    #[test]
    fn bad_inputs_are_errors_without_the_secret() {
        for bad in ["", "sealerSecret_z1/signerSecret_z1", "x/y", "sealerSecret_zAbc"] {
            assert_eq!(AgentIdentity::from_secret(bad).err(), Some(IdentityError::BadSecret), "{bad}");
        }
        let id = AgentIdentity::from_random(&[1; 64]);
        assert!(matches!(AgentIdentity::from_env("nope", &id.secret_string()), Err(IdentityError::BadAccountId(_))));
        let debug = format!("{id:?}");
        assert!(!debug.contains(&id.secret_string()) && !debug.contains("Secret_z"), "{debug}");
    }
}
