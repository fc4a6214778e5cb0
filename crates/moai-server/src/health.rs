//! `GET /health` (readiness) and `GET /healthz` (liveness), plus `GET /metrics` (behind a bearer
//! token when `--metrics-token` is set: metrics name documents' traffic and error rates).
//!
//! /health is what orchestration gates traffic on: 200 only when ready, 503 otherwise, so a
//! platform check that only looks at the status code does the right thing. /healthz answers 200
//! as soon as HTTP is served, for "is the process alive" probes that must not restart a server
//! that is still loading.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

use crate::http_error::error_response;
use crate::{AppState, Phase};

fn body(state: &AppState) -> (bool, serde_json::Value) {
    let phase = state.readiness.phase();
    let storage_failure = state.storage_health.failure();
    // Storage that cannot be written makes the instance unready (a load balancer should send
    // writers elsewhere) but not failed: it recovers by itself when writes work again.
    let ready = matches!(phase, Phase::Ready(_)) && storage_failure.is_none();
    // A cluster bus that cannot reach Redis leaves the instance ready: it serves its own
    // clients, stores what they write, and the other instances catch up once the bus is back.
    let cluster = state.cluster.as_ref().map(|bus| (bus.instance(), bus.status().borrow().clone()));
    let cluster_degraded = cluster.as_ref().is_some_and(|(_, s)| s.is_degraded());
    let status = match (&phase, &storage_failure) {
        (Phase::Failed(_), _) => "error",
        (_, Some(_)) => "degraded",
        _ if cluster_degraded => "degraded",
        _ => "ok",
    };
    let mut v = json!({
        "status": status,
        "service": "sync",
        "ready": ready,
        "version": state.version,
        "auth": if state.auth.is_enabled() { "token" } else { "open" },
    });
    if let Some(reason) = storage_failure {
        v["storage_error"] = json!(reason);
    }
    if let Some((instance, bus)) = cluster {
        let (status, reason) = match bus {
            moai_cluster::BusStatus::Connected => ("ok", None),
            moai_cluster::BusStatus::Connecting => ("connecting", None),
            moai_cluster::BusStatus::Degraded(why) => ("degraded", Some(why)),
        };
        v["cluster"] = json!({ "status": status, "instance": instance.to_string() });
        if let Some(why) = reason {
            v["cluster"]["reason"] = json!(why);
        }
    }
    // The change feed: this instance replicates (holds the slot) or follows the one that does.
    if let Phase::Ready(engines) = &phase {
        if let Some(pgsync) = &engines.pgsync {
            v["pgsync"] = json!({ "role": pgsync.role() });
        }
    }
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

/// Whether `headers` carry `Authorization: Bearer <expected>` (compared in constant time).
fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or("");
    // Compare digests, so neither the length nor the content of the token leaks through timing.
    let digest = |s: &str| sha2::Sha256::digest(s.as_bytes());
    digest(given).ct_eq(&digest(expected)).into()
}

pub(crate) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_token {
        if !bearer_matches(&headers, expected) {
            state.metrics.rejected("metrics_auth");
            let mut resp =
                error_response(StatusCode::UNAUTHORIZED, "metrics require the bearer token set by --metrics-token");
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    state.metrics.set_ready(state.readiness.engines().is_some());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}
