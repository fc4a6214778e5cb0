//! Typed identifiers of the cojson wire protocol.
//!
//! IDs travel as strings; these newtypes record *what was checked* about a
//! string so later code cannot confuse a session ID with a CoValue ID. Parsing
//! follows the real client's (lenient) checks, not a stricter grammar, so a
//! relay never drops a message that cojson would have answered:
//! * a CoValue ID is anything starting with `co_z` (`isRawCoID`);
//! * an agent ID starts with `sealer_` and contains `/signer_` (`isAgentID`);
//! * a session's author is everything before the first `_session`
//!   (`accountOrAgentIDfromSessionID`); a delete session ends with `$`
//!   (`isDeleteSessionID`).

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("not a CoValue id (expected `co_z…`): {0:?}")]
    NotCoId(String),
    #[error("not a session id (no `_session` marker): {0:?}")]
    NotSessionId(String),
    #[error("session author is neither an account nor an agent: {0:?}")]
    BadSessionAuthor(String),
    #[error("not an agent id (expected `sealer_z…/signer_z…`): {0:?}")]
    NotAgentId(String),
}

macro_rules! string_id {
    ($name:ident) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            fn from_text(s: &str) -> Self {
                $name(s.to_string())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(CoId);
string_id!(SessionId);
string_id!(AgentId);

impl CoId {
    pub const PREFIX: &'static str = "co_z";

    /// Accepts what cojson's `isRawCoID` accepts: the `co_z` prefix. The body
    /// is not required to be base58 (cojson does not check it either); an ID
    /// that is not a real header hash simply never verifies.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.starts_with(Self::PREFIX) {
            Ok(CoId::from_text(s))
        } else {
            Err(IdError::NotCoId(s.to_string()))
        }
    }
}

impl std::str::FromStr for CoId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl AgentId {
    /// `isAgentID`: starts with `sealer_` and contains `/signer_`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.starts_with("sealer_") && s.contains("/signer_") {
            Ok(AgentId::from_text(s))
        } else {
            Err(IdError::NotAgentId(s.to_string()))
        }
    }

    /// The `sealer_z…` half (`getAgentSealerID`: split on `/`, first part).
    pub fn sealer_part(&self) -> &str {
        self.as_str().split('/').next().unwrap_or("")
    }

    /// The `signer_z…` half (`getAgentSignerID`: split on `/`, second part).
    pub fn signer_part(&self) -> &str {
        self.as_str().split('/').nth(1).unwrap_or("")
    }
}

/// Who wrote a session: an account (a CoValue whose header names its agent)
/// or a bare agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SessionAuthor {
    Account(CoId),
    Agent(AgentId),
}

impl SessionAuthor {
    pub fn as_str(&self) -> &str {
        match self {
            SessionAuthor::Account(id) => id.as_str(),
            SessionAuthor::Agent(id) => id.as_str(),
        }
    }
}

impl SessionId {
    pub const MARKER: &'static str = "_session";

    /// Requires the `_session` marker and an author that is an account
    /// (`co_z…`) or agent ID; cojson would fail to resolve any other author,
    /// so such sessions can never verify and are rejected up front.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let Some(idx) = s.find(Self::MARKER) else {
            return Err(IdError::NotSessionId(s.to_string()));
        };
        let author = &s[..idx];
        if CoId::parse(author).is_err() && AgentId::parse(author).is_err() {
            return Err(IdError::BadSessionAuthor(s.to_string()));
        }
        Ok(SessionId::from_text(s))
    }

    /// `accountOrAgentIDfromSessionID`: everything before the first `_session`.
    pub fn author(&self) -> SessionAuthor {
        let text = self.as_str();
        let idx = text.find(Self::MARKER).unwrap_or(text.len());
        let author = &text[..idx];
        match AgentId::parse(author) {
            Ok(agent) => SessionAuthor::Agent(agent),
            // `parse` guaranteed the author is one of the two.
            Err(_) => SessionAuthor::Account(CoId::from_text(author)),
        }
    }

    /// The author's ID as text (account `co_z…` or agent ID), borrowed.
    pub fn author_str(&self) -> &str {
        let text = self.as_str();
        &text[..text.find(Self::MARKER).unwrap_or(text.len())]
    }

    /// `isDeleteSessionID`: the last character is `$`. (Delete sessions have the
    /// full shape `…_session_d<base58>$`, but cojson checks only the `$`; see
    /// docs/protocols/cojson.md §3.2.)
    pub fn is_delete_session(&self) -> bool {
        self.0.ends_with('$')
    }
}

impl std::str::FromStr for SessionId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str =
        "sealer_zFvgUkVsCYAeDiSwJ7NiuWJuWSgs2XAAmpYpzevUNAXXY/signer_z8fKE8XJ3ehoENeu254iAFVpHtZuLwHtCWgeBZfYXTSeo";

    #[test]
    fn ids_behave_like_their_text() {
        let short = CoId::parse("co_z59T41o3v8kmKGicaPBnmYXFskT").unwrap();
        let long_text = format!("co_z{}", "x".repeat(100));
        let long = CoId::parse(&long_text).unwrap();
        assert_eq!(long.as_str(), long_text);
        assert_eq!(short.clone().into_string(), "co_z59T41o3v8kmKGicaPBnmYXFskT");
        assert_eq!(format!("{short:?}"), "CoId(\"co_z59T41o3v8kmKGicaPBnmYXFskT\")");
        assert_eq!(short.cmp(&long), short.as_str().cmp(long.as_str()));
        let json = serde_json::to_string(&long).unwrap();
        assert_eq!(serde_json::from_str::<CoId>(&json).unwrap(), long);
        let agent = SessionId::parse(&format!("{AGENT}_session_zAbc")).unwrap();
        assert_eq!(agent.as_str(), format!("{AGENT}_session_zAbc"));
    }

    #[test]
    fn co_id_requires_prefix() {
        assert!(CoId::parse("co_z59T41o3v8kmKGicaPBnmYXFskT").is_ok());
        assert_eq!(CoId::parse("co_59T4"), Err(IdError::NotCoId("co_59T4".into())));
        assert!(CoId::parse("").is_err());
    }

    #[test]
    fn account_session_author() {
        let s = SessionId::parse("co_z59T41o3v8kmKGicaPBnmYXFskT_session_zVectorSess1").unwrap();
        assert_eq!(s.author(), SessionAuthor::Account(CoId::parse("co_z59T41o3v8kmKGicaPBnmYXFskT").unwrap()));
        assert!(!s.is_delete_session());
    }

    #[test]
    fn agent_session_author_and_halves() {
        let s = SessionId::parse(&format!("{AGENT}_session_zAbc")).unwrap();
        let SessionAuthor::Agent(agent) = s.author() else { panic!("expected agent author") };
        assert_eq!(agent.as_str(), AGENT);
        assert_eq!(agent.signer_part(), "signer_z8fKE8XJ3ehoENeu254iAFVpHtZuLwHtCWgeBZfYXTSeo");
        assert_eq!(agent.sealer_part(), "sealer_zFvgUkVsCYAeDiSwJ7NiuWJuWSgs2XAAmpYpzevUNAXXY");
    }

    #[test]
    fn delete_session_detected_by_trailing_dollar() {
        let s = SessionId::parse("co_zAbc_session_dXyz$").unwrap();
        assert!(s.is_delete_session());
    }

    #[test]
    fn bad_sessions_rejected() {
        assert!(matches!(SessionId::parse("co_zAbc"), Err(IdError::NotSessionId(_))));
        assert!(matches!(SessionId::parse("bob_session_z1"), Err(IdError::BadSessionAuthor(_))));
    }
}
