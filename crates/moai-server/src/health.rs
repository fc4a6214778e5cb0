//! `GET /health` (readiness) and `GET /healthz` (liveness), plus `GET /metrics`.
//!
//! /health is what orchestration gates traffic on: 200 only when ready, 503 otherwise, so a
//! platform check that only looks at the status code does the right thing. /healthz answers 200
//! as soon as HTTP is served, for "is the process alive" probes that must not restart a server
//! that is still loading.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::{AppState, Phase};

fn body(state: &AppState) -> (bool, serde_json::Value) {
    let phase = state.readiness.phase();
    let ready = matches!(phase, Phase::Ready(_));
    let mut v = json!({
        "status": if matches!(phase, Phase::Failed(_)) { "error" } else { "ok" },
        "service": "sync",
        "ready": ready,
        "version": state.version,
        "auth": if state.auth.is_enabled() { "token" } else { "open" },
    });
    match phase {
        Phase::Failed(reason) => v["error"] = json!(&*reason),
        Phase::Draining => v["draining"] = json!(true),
        _ => {}
    }
    (ready, v)
}

pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let (ready, v) = body(&state);
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    let (_, v) = body(&state);
    (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.set_ready(state.readiness.engines().is_some());
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}
