//! What a verified token allows. Deny by default: a token that names any resource (`docs`,
//! `tables`, `cojson`, `llm`) opens exactly those and nothing of the other engines; only a token
//! that names none (the plain form, or a scoped one carrying just `exp` / `read_only`) opens
//! every resource. Every endpoint asks [`Grant::allows`] for its own [`Resource`], and every session
//! ends when [`Grant::expires_at`] passes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::token::Claims;

/// What a request wants to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// One Yjs document (WebSocket or HTTP API).
    YjsDoc(&'a str),
    /// The CoJSON endpoint `/sync`.
    Cojson,
    /// The Postgres change feed `/api/sync`.
    ChangeFeed,
    /// The LLM proxy (`/v1/chat/completions`, `/api/v0/llm/chat`, `/v1/models`).
    Llm,
}

/// The rights of one verified request. `claims` is None on an open server (no secret).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    claims: Option<Claims>,
}

impl Grant {
    /// An open server: everything, forever, writable.
    pub fn open() -> Self {
        Self { claims: None }
    }

    pub(crate) fn from_claims(claims: Claims) -> Self {
        Self { claims: Some(claims) }
    }

    /// Whether this grant opens `resource`.
    pub fn allows(&self, resource: Resource<'_>) -> bool {
        let Some(c) = &self.claims else { return true };
        let scoped = c.docs.is_some() || c.tables.is_some() || c.cojson || c.llm;
        match resource {
            Resource::YjsDoc(doc) => match &c.docs {
                Some(docs) => docs.iter().any(|d| match d.strip_suffix('*') {
                    Some(prefix) => doc.starts_with(prefix),
                    None => d == doc,
                }),
                None => !scoped,
            },
            Resource::Cojson => c.cojson || !scoped,
            Resource::ChangeFeed => c.tables.is_some() || !scoped,
            Resource::Llm => c.llm || !scoped,
        }
    }

    pub(crate) fn is_expired_at(&self, now_unix: u64) -> bool {
        self.claims.as_ref().and_then(|c| c.exp).is_some_and(|exp| now_unix >= exp)
    }

    /// When the token stops being valid; sessions opened with it are closed then (4403).
    /// An `exp` beyond what the clock can represent never expires (it is not an error: the
    /// token's MAC was valid, and adding it unchecked would panic).
    pub fn expires_at(&self) -> Option<SystemTime> {
        let exp = self.claims.as_ref()?.exp?;
        UNIX_EPOCH.checked_add(Duration::from_secs(exp))
    }

    /// The session may read but its writes are dropped.
    pub fn read_only(&self) -> bool {
        self.claims.as_ref().is_some_and(|c| c.read_only)
    }

    /// Who the token speaks for (None on an open server).
    pub fn subject(&self) -> Option<&str> {
        self.claims.as_ref().map(|c| c.sub.as_str())
    }

    /// The change-feed tables and row predicates the token names (None: all tables).
    pub fn tables(&self) -> Option<&BTreeMap<String, Option<String>>> {
        self.claims.as_ref()?.tables.as_ref()
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(f: impl FnOnce(&mut Claims)) -> Grant {
        let mut c = Claims { sub: "u".into(), ..Claims::default() };
        f(&mut c);
        Grant::from_claims(c)
    }

    #[test]
    fn a_token_that_names_nothing_opens_everything() {
        for g in [Grant::open(), grant(|_| {}), grant(|c| c.exp = Some(10)), grant(|c| c.read_only = true)] {
            assert!(g.allows(Resource::YjsDoc("x")) && g.allows(Resource::Cojson) && g.allows(Resource::ChangeFeed));
            assert!(g.allows(Resource::Llm));
        }
    }

    #[test]
    fn a_scope_on_one_engine_closes_the_others() {
        let docs = grant(|c| c.docs = Some(vec!["team-*".into()]));
        assert!(docs.allows(Resource::YjsDoc("team-1")));
        assert!(!docs.allows(Resource::YjsDoc("other")));
        assert!(!docs.allows(Resource::Cojson));
        assert!(!docs.allows(Resource::ChangeFeed));

        let tables = grant(|c| c.tables = Some(BTreeMap::from([("public.todos".into(), None)])));
        assert!(tables.allows(Resource::ChangeFeed));
        assert!(!tables.allows(Resource::YjsDoc("anything")));
        assert!(!tables.allows(Resource::Cojson));

        let cojson = grant(|c| c.cojson = true);
        assert!(cojson.allows(Resource::Cojson));
        assert!(!cojson.allows(Resource::YjsDoc("anything")));
        assert!(!cojson.allows(Resource::ChangeFeed));

        assert!(!docs.allows(Resource::Llm) && !tables.allows(Resource::Llm) && !cojson.allows(Resource::Llm));
        let llm = grant(|c| c.llm = true);
        assert!(llm.allows(Resource::Llm));
        assert!(!llm.allows(Resource::YjsDoc("anything")));
        assert!(!llm.allows(Resource::Cojson));
        assert!(!llm.allows(Resource::ChangeFeed));

        // An empty list names the engine and opens nothing in it.
        let none = grant(|c| c.docs = Some(vec![]));
        assert!(!none.allows(Resource::YjsDoc("")) && !none.allows(Resource::ChangeFeed));
    }

    #[test]
    fn expiry_is_exclusive_and_read_only_is_carried() {
        let g = grant(|c| {
            c.exp = Some(100);
            c.read_only = true;
        });
        assert!(!g.is_expired_at(99) && g.is_expired_at(100));
        assert_eq!(g.expires_at(), Some(UNIX_EPOCH + Duration::from_secs(100)));
        assert!(g.read_only());
    }

    #[test]
    fn an_expiry_beyond_the_clock_never_expires_instead_of_panicking() {
        let g = Grant { claims: Some(Claims { sub: "u".into(), exp: Some(u64::MAX), ..Claims::default() }) };
        assert_eq!(g.expires_at(), None);
        assert!(!g.is_expired_at(u64::MAX - 1));
        let soon = Grant { claims: Some(Claims { sub: "u".into(), exp: Some(10), ..Claims::default() }) };
        assert_eq!(soon.expires_at(), Some(UNIX_EPOCH + Duration::from_secs(10)));
    }
}
