//! Gates in front of the sync endpoints.
//!
//! [`require_ready`]: until every engine is ready, sync endpoints answer
//! 503 `{"error":"Initializing","status":503}` (and during shutdown 503 "ShuttingDown"), with
//! `Retry-After`, so clients back off and retry instead of talking to half-started engines.
//!
//! [`require_upgrade`]: a plain HTTP request to a WebSocket endpoint gets 426 with a JSON body,
//! not a confusing 400 from the upgrade extractor.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::http_error::error_response;
use crate::{AppState, Phase};

pub(crate) async fn require_ready(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    match state.readiness.phase() {
        Phase::Ready(engines) => {
            req.extensions_mut().insert(engines);
            next.run(req).await
        }
        phase => {
            let error = match phase {
                Phase::Draining => "ShuttingDown",
                Phase::Failed(_) => "InitializationFailed",
                _ => "Initializing",
            };
            state.metrics.rejected("not_ready");
            let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, error);
            resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            resp
        }
    }
}

pub(crate) fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

pub(crate) async fn require_upgrade(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if is_websocket_upgrade(req.headers()) {
        return next.run(req).await;
    }
    state.metrics.rejected("not_websocket");
    let mut resp = error_response(StatusCode::UPGRADE_REQUIRED, "Expected WebSocket upgrade");
    resp.headers_mut().insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
    resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("Upgrade"));
    resp
}
