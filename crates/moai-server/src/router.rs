//! The HTTP routes of moai and the state they share.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{any, get};
use axum::Router;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::gate::{require_ready, require_upgrade};
use crate::health::{health, healthz, metrics};
use crate::http_error::{error_response, json_errors};
use crate::quota::Quota;
use crate::{agent_api, cojson, hocuspocus, pgsync, yjs, Auth, Heartbeat, Limits, Metrics, Readiness, Shutdown};

/// What every handler can reach. Engines are not here: they come from [`Readiness`] through the
/// ready gate, so a handler cannot use one before it exists.
#[derive(Clone)]
pub struct AppState {
    pub readiness: Readiness,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub version: &'static str,
    /// Token checks (open when SYNC_SHARED_SECRET is unset).
    pub auth: Auth,
    pub heartbeat: Heartbeat,
    /// Bearer token that /metrics requires; None leaves /metrics open.
    pub metrics_token: Option<String>,
    /// Open WebSocket sessions per token subject (`Limits::max_sessions_per_user`).
    pub sessions_per_user: Arc<Quota<String>>,
    /// Whether storage can be written; /health is 503 while it cannot.
    pub storage_health: Arc<crate::StorageHealth>,
    /// Test hook: record inbound frames (seeds for the fuzz targets). None in production.
    pub capture: Option<Arc<crate::capture::FrameCapture>>,
    /// The cluster bus, when this instance is one of several (`--redis-url`): /health reports it.
    pub cluster: Option<moai_cluster::Bus>,
    /// The dashboard (off unless `--admin-token` is set; docs/dashboard.md).
    pub dashboard: Arc<crate::Dashboard>,
    /// The LLM proxy (off unless configured; docs/llm-proxy.md).
    pub llm: crate::llm::LlmService,
}

pub fn router(state: AppState) -> Router {
    // WebSocket endpoints: ready gate first, then the upgrade check.
    let websocket = Router::new()
        .route("/sync", any(cojson::socket))
        .route("/sync/v1/{doc}", any(yjs::socket))
        .route("/hocuspocus", any(hocuspocus::socket))
        .route("/api/sync", any(pgsync::socket))
        .route_layer(from_fn_with_state(state.clone(), require_upgrade));
    let engines = Router::new()
        .merge(websocket)
        .route("/api/v1/docs/{doc}/update", get(yjs::get_update).post(yjs::post_update))
        .route_layer(from_fn_with_state(state.clone(), require_ready));
    let agent =
        agent_api::routes().route_layer(from_fn_with_state(state.clone(), require_ready)).layer(agent_api::cors());

    Router::new()
        .route("/health", get(health))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(crate::pages::routes(&state))
        .merge(engines)
        .merge(agent)
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "Not Found") })
        // The extractors' own body limit (2 MB by default) must not undercut --max-body-bytes.
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(state.limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.limits.request_timeout))
        .layer(axum::middleware::from_fn(json_errors))
        // After the layers above: an LLM answer may take minutes (the proxy has its own
        // timeouts and body limit) and needs no engine, so no request timeout or ready gate.
        .merge(crate::llm::routes(&state.llm))
        .with_state(state)
}
