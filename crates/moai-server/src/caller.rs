//! What every sync endpoint needs to know about a request, extracted once: the ready engines,
//! the token the request carries, the peer address, and the connection slot a WebSocket session
//! keeps until it ends.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;

use crate::auth::{token_from_request, AuthError, Grant, Resource, BEARER_PROTOCOL_PREFIX};
use crate::http_error::error_response;
use crate::quota::QuotaGuard;
use crate::serve::ConnectionSlot;
use crate::ws::close;
use crate::{AppState, Engines};

pub(crate) struct Caller {
    pub engines: Arc<Engines>,
    pub token: Option<String>,
    /// WebSocket subprotocols the client offered, in its order.
    pub offered_protocols: Vec<String>,
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
    /// The subprotocol to select on the upgrade. A client that offers subprotocols fails the
    /// handshake unless one is selected, and browsers can only carry a token as one: the
    /// endpoint's own protocol name if offered (the token then never travels back), else the
    /// `bearer.…` entry the client offered (it only echoes the client's own value).
    pub fn subprotocol(&self, ours: &'static str) -> Option<String> {
        if self.offered_protocols.iter().any(|p| p == ours) {
            return Some(ours.to_owned());
        }
        self.offered_protocols.iter().find(|p| p.starts_with(BEARER_PROTOCOL_PREFIX)).cloned()
    }

    /// Checks the caller's token for `resource` now.
    pub fn authorise(&self, state: &AppState, resource: Resource<'_>) -> Result<Grant, AuthError> {
        state.auth.check_now(self.token.as_deref(), resource)
    }

    /// Admits a WebSocket session for `resource`: the token must open it, and its subject must
    /// be under `--max-sessions-per-user` (over it: 1013, which clients retry with backoff).
    pub fn admit(&self, state: &AppState, resource: Resource<'_>) -> Admission {
        let refused =
            |code, reason: String| Admission { verdict: Err((code, reason)), grant: Grant::default(), user_unit: None };
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
            offered_protocols: parts
                .headers
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            peer: parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0),
            slot: parts.extensions.get::<ConnectionSlot>().cloned(),
        })
    }
}
