//! The agent API of participant mode (docs/participant.md): what the server's own cojson account
//! shows and does over HTTP. `GET /profile` so far.
//!
//! Deny by default: a caller needs a token that opens CoJSON (a plain token, or a scoped one made
//! with `moai token --cojson`); on an open server (no SYNC_SHARED_SECRET) everything is open, as
//! the sync endpoints are. Without PEER_SECRET the server has no account and these routes answer
//! 404 saying so.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::Resource;
use crate::caller::Caller;
use crate::http_error::error_response;
use crate::AppState;

pub(crate) async fn profile(State(state): State<AppState>, caller: Caller) -> Response {
    let Some(participant) = caller.engines.participant.clone() else {
        return error_response(
            StatusCode::NOT_FOUND,
            "this server has no account of its own (participant mode needs PEER_SECRET; see moai agent generate)",
        );
    };
    if let Err(e) = caller.authorise(&state, Resource::Cojson) {
        state.metrics.rejected("auth");
        return error_response(e.http_status(), &e.to_string());
    }
    match participant.profile().await {
        Ok(p) => Json(json!({
            "accountId": p.account_id,
            "profileId": p.profile_id,
            "profileName": p.profile_name,
            "sessionId": p.session_id,
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "the server's account could not answer /profile");
            error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
    }
}
