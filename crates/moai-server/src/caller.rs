//! What every sync endpoint needs to know about a request, extracted once: the ready engines,
//! the token the request carries, the peer address, and the connection slot a WebSocket session
//! keeps until it ends.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::Response;

use crate::auth::{token_from_request, AuthError, Grant, Resource};
use crate::gate::error_response;
use crate::quota::QuotaGuard;
use crate::serve::ConnectionSlot;
use crate::ws::close;
use crate::{AppState, Engines};

pub(crate) struct Caller {
    pub engines: Arc<Engines>,
    pub token: Option<String>,
    pub peer: Option<SocketAddr>,
    pub slot: Option<ConnectionSlot>,
}

/// The outcome of admitting a WebSocket session: refused with a close code and reason (told
/// after the upgrade), or admitted with its grant and its unit of the per-user quota.
pub(crate) struct Admission {
    pub verdict: Result<(), (u16, String)>,
    pub grant: Grant,
    pub user_unit: Option<QuotaGuard>,
}

impl Caller {
    /// Checks the caller's token for `resource` now.
    pub fn authorise(&self, state: &AppState, resource: Resource<'_>) -> Result<Grant, AuthError> {
        state.auth.check_now(self.token.as_deref(), resource)
    }

    /// Admits a WebSocket session for `resource`: the token must open it, and its subject must
    /// be under `--max-sessions-per-user` (over it: 1013, which clients retry with backoff).
    pub fn admit(&self, state: &AppState, resource: Resource<'_>) -> Admission {
        let refused = |code, reason: String| Admission { verdict: Err((code, reason)), grant: Grant::default(), user_unit: None };
        let grant = match self.authorise(state, resource) {
            Ok(grant) => grant,
            Err(e) => return refused(e.close_code(), e.to_string()),
        };
        let user_unit = match grant.subject() {
            Some(subject) => match state.sessions_per_user.try_acquire(&subject.to_owned()) {
                Some(unit) => Some(unit),
                None => {
                    state.metrics.rejected("max_sessions_per_user");
                    return refused(close::TRY_AGAIN_LATER, "too many open sessions for this user".into());
                }
            },
            None => None,
        };
        Admission { verdict: Ok(()), grant, user_unit }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, Response> {
        // The ready gate puts the engines in; a route outside it has none.
        let engines = parts
            .extensions
            .get::<Arc<Engines>>()
            .cloned()
            .ok_or_else(|| error_response(StatusCode::SERVICE_UNAVAILABLE, "Initializing"))?;
        Ok(Caller {
            engines,
            token: token_from_request(&parts.headers, parts.uri.query()),
            peer: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
            slot: parts.extensions.get::<ConnectionSlot>().cloned(),
        })
    }
}
