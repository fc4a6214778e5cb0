//! The LLM proxy's edge: `POST /v1/chat/completions` and `POST /api/v0/llm/chat` (the same
//! OpenAI-compatible chat call), `GET /v1/models` (the allowlist). The proxy itself is
//! `moai_llm`; this module decides whether it runs, identifies the caller, reads the body within
//! its limit, and turns the proxy's answers into HTTP (docs/llm-proxy.md).
//!
//! **Deny by default.** The original proxy was open to anyone, on the server's key. Here every
//! call needs a moai token that opens the `llm` resource (a plain token, or a scoped one naming
//! `llm`), and its subject is the *account* whose limits and usage the call counts against. A
//! server without `SYNC_SHARED_SECRET` cannot verify any token, so there the proxy does not run
//! (its routes answer 404 saying why, and the start-up log says so) unless the operator passes
//! `--llm-allow-open`, which makes every caller anonymous, limited per IP address.
//!
//! These routes sit outside the server's request timeout (an answer may take minutes; the proxy
//! has its own connect, first-byte and idle timeouts) and the ready gate (the proxy needs no
//! engine), and answer browsers (CORS). The request body is never logged, nor is any key or
//! token.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt as _;
use moai_llm::{ErrorKind, LlmError, LlmProxy, Observer as _, RateInfo, Reply, Window, NO_MODEL};
use serde_json::json;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

pub use moai_llm::{ApiKey, ConfigError, LlmConfig, LlmLimits, Timeouts, ORIGINAL_DEFAULT_MODEL, RED_PILL_BASE_URL};

use crate::auth::{token_from_request, AuthError, Resource};
use crate::http_error::{error_response, json_errors};
use crate::{AppState, Auth, Metrics};

const NOT_CONFIGURED: &str = "The LLM proxy is not enabled on this server (--llm-base-url or RED_PILL_API_KEY)";
const OPEN_SERVER: &str = "The LLM proxy is disabled: this server runs without SYNC_SHARED_SECRET, so callers \
     cannot be identified (set the secret, or start the server with --llm-allow-open)";

/// The LLM proxy as the router serves it: off (404 with the reason) or on.
#[derive(Clone)]
pub enum LlmService {
    Off { why: &'static str },
    On(Arc<LlmEdge>),
}

impl Default for LlmService {
    fn default() -> Self {
        LlmService::Off { why: NOT_CONFIGURED }
    }
}

pub struct LlmEdge {
    proxy: LlmProxy,
    access: Access,
    cors: Option<Vec<HeaderValue>>,
}

/// How callers are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Every call needs a verified token; the account is the token's subject.
    Tokens,
    /// `--llm-allow-open` on a server without a secret: nobody can be identified; every caller
    /// is anonymous and limited by IP address.
    Open,
}

/// What decides whether the proxy runs.
pub struct LlmSettings {
    /// None: not configured (the routes answer 404).
    pub config: Option<LlmConfig>,
    /// Run an open proxy on a server without SYNC_SHARED_SECRET.
    pub allow_open: bool,
    /// Origins browsers may call from; empty: any origin.
    pub cors_origins: Vec<String>,
}

impl LlmService {
    /// Starts the proxy when it is configured and its callers can be identified (a secret is
    /// set) or the operator allowed an open proxy; says which in the log. A configuration that
    /// cannot work (a bad URL, a default model outside the allowlist) is an error.
    pub fn start(settings: LlmSettings, auth: &Auth, metrics: Arc<Metrics>) -> Result<Self, LlmStartError> {
        let Some(config) = settings.config else { return Ok(LlmService::default()) };
        let access = match (auth.is_enabled(), settings.allow_open) {
            (true, allow_open) => {
                if allow_open {
                    tracing::warn!("--llm-allow-open ignored: SYNC_SHARED_SECRET is set, so LLM calls need a token");
                }
                Access::Tokens
            }
            (false, true) => Access::Open,
            (false, false) => {
                tracing::error!(
                    "LLM proxy NOT started: SYNC_SHARED_SECRET is not set, so callers cannot be identified and \
                     the proxy would be open to anyone on the upstream key; set SYNC_SHARED_SECRET, or pass \
                     --llm-allow-open to run it open (limited per IP address)"
                );
                return Ok(LlmService::Off { why: OPEN_SERVER });
            }
        };
        let cors = if settings.cors_origins.iter().all(|o| o.trim() == "*") {
            None
        } else {
            let origins = settings.cors_origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty() && *o != "*");
            Some(
                origins
                    .map(|o| HeaderValue::from_str(o).map_err(|_| LlmStartError::CorsOrigin(o.to_owned())))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        let base = moai_llm::config::redact_base_url(&config.base_url);
        let has_key = config.api_key.is_some();
        let proxy = LlmProxy::new(config, metrics)?;
        let limits = proxy.limits();
        tracing::info!(
            upstream = %base,
            api_key = if has_key { "set" } else { "none" },
            models = ?proxy.models().allowed(),
            default_model = proxy.models().default_model(),
            requests_per_minute = limits.requests_per_minute,
            tokens_per_minute = limits.tokens_per_minute,
            access = if access == Access::Open { "open (per IP)" } else { "tokens" },
            "LLM proxy enabled at /v1/chat/completions, /api/v0/llm/chat and /v1/models"
        );
        if access == Access::Open {
            tracing::warn!(
                "LLM proxy OPEN (--llm-allow-open): anyone who reaches this server may use the upstream key"
            );
        }
        Ok(LlmService::On(Arc::new(LlmEdge { proxy, access, cors })))
    }
}

/// Why the proxy cannot start as configured.
#[derive(Debug, thiserror::Error)]
pub enum LlmStartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--llm-cors-origins: {0:?} is not a valid origin")]
    CorsOrigin(String),
}

/// The proxy's routes, with CORS and the JSON error shape, for the router to merge outside its
/// request timeout.
pub(crate) fn routes(llm: &LlmService) -> Router<AppState> {
    let origins = match llm {
        LlmService::On(edge) => edge.cors.clone(),
        LlmService::Off { .. } => None,
    };
    let cors = CorsLayer::new()
        .allow_origin(origins.map_or_else(AllowOrigin::any, AllowOrigin::list))
        .allow_methods([Method::GET, Method::POST])
        // Mirrored rather than `*`: a wildcard does not cover Authorization.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(EXPOSED.map(HeaderName::from_static))
        .max_age(Duration::from_secs(600));
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/api/v0/llm/chat", post(chat))
        .route("/v1/models", get(models))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(cors)
}

const EXPOSED: [&str; 7] = [
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// Who is calling the proxy: the account a request's limits and usage count against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LlmCaller {
    /// A verified moai token that opens `llm`: the account is its subject.
    MoaiToken { subject: String },
    /// An open proxy (`--llm-allow-open`): the account is the client's IP address.
    Anonymous { ip: String },
    /// A Jazz account, by its verified auth token: the account is its id.
    Jazz { account: String },
}

impl LlmCaller {
    fn account(&self) -> String {
        match self {
            LlmCaller::MoaiToken { subject } => subject.clone(),
            LlmCaller::Anonymous { ip } => format!("ip:{ip}"),
            LlmCaller::Jazz { account } => account.clone(),
        }
    }
}

/// The credential a request presents.
///
/// `Authorization: Jazz <token>` is what jazz-tools' `generateAuthToken` produces for a Jazz
/// account calling a server; it is checked against the account's header as this server stores
/// it (`crate::auth::verify_jazz`), and the account id is the caller for limits and metrics.
#[derive(Debug, PartialEq, Eq)]
enum Credential {
    Moai(String),
    Jazz(String),
    None,
}

fn credential(headers: &HeaderMap, query: Option<&str>) -> Credential {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let scheme = authorization.split_whitespace().next().unwrap_or("");
    if scheme.eq_ignore_ascii_case("jazz") {
        return Credential::Jazz(crate::auth::jazz_token(headers).unwrap_or_default().to_owned());
    }
    match token_from_request(headers, query) {
        Some(token) if !token.is_empty() => Credential::Moai(token),
        _ => Credential::None,
    }
}

#[allow(clippy::result_large_err)] // the error is the response itself, built once per refusal
async fn identify(
    state: &AppState,
    edge: &LlmEdge,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: Option<SocketAddr>,
) -> Result<LlmCaller, Response> {
    if edge.access == Access::Open {
        // No secret: nothing presented can be verified, so nothing presented counts.
        let ip = peer.map_or_else(|| "unknown".to_owned(), |p| p.ip().to_string());
        return Ok(LlmCaller::Anonymous { ip });
    }
    let refuse = |status: StatusCode, message: &str| {
        state.metrics.rejected("llm_auth");
        let mut resp = error_response(status, message);
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    };
    let token = match credential(headers, query) {
        Credential::Jazz(token) => {
            let engines = state.readiness.engines();
            let cojson = engines.as_ref().and_then(|e| e.cojson.as_ref());
            return match crate::auth::verify_jazz(cojson, &token).await {
                Ok(account) => Ok(LlmCaller::Jazz { account }),
                Err((status, reason)) => Err(refuse(status, &reason)),
            };
        }
        Credential::Moai(token) => Some(token),
        Credential::None => None,
    };
    let grant = state.auth.check_now(token.as_deref(), Resource::Llm).map_err(|e| {
        let message = match &e {
            AuthError::OutOfScope => "token does not grant access to the LLM proxy (mint it with --llm)".to_owned(),
            e => e.to_string(),
        };
        refuse(e.http_status(), &message)
    })?;
    // A server with a secret only grants verified tokens, and every verified token has one.
    let subject = grant.subject().unwrap_or_default().to_owned();
    Ok(LlmCaller::MoaiToken { subject })
}

#[allow(clippy::result_large_err)] // the error is the response itself, built once per refusal
fn edge_of(state: &AppState) -> Result<Arc<LlmEdge>, Response> {
    match &state.llm {
        LlmService::On(edge) => Ok(edge.clone()),
        LlmService::Off { why } => Err(error_response(StatusCode::NOT_FOUND, why)),
    }
}

async fn chat(State(state): State<AppState>, request: Request) -> Response {
    let edge = match edge_of(&state) {
        Ok(edge) => edge,
        Err(resp) => return resp,
    };
    let (parts, body) = request.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let caller = match identify(&state, &edge, &parts.headers, parts.uri.query(), peer).await {
        Ok(caller) => caller,
        Err(resp) => return resp,
    };
    let account = caller.account();
    let limit = edge.proxy.limits().max_request_bytes;
    let raw = match read_body(body, &parts.headers, limit, state.limits.request_timeout).await {
        Ok(raw) => raw,
        Err(refusal) => {
            if let Some(kind) = refusal.kind {
                state.metrics.error(&account, NO_MODEL, kind);
            }
            tracing::info!(account, status = refusal.status.as_u16(), "llm request refused: body not read");
            return error_with_code(refusal.status, &refusal.message, refusal.kind.map(ErrorKind::as_str));
        }
    };
    let (req, info) = match edge.proxy.admit(&account, &raw) {
        Ok(admitted) => admitted,
        Err(e) => return llm_error(&e),
    };
    drop(raw);
    let reply = edge.proxy.send(&account, req, state.shutdown.token().clone()).await;
    let mut resp = match reply {
        Err(e) => llm_error(&e),
        Ok(Reply::Complete { status, content_type, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let content_type = content_type.unwrap_or_else(|| "application/json".to_owned());
            let mut resp = (status, body).into_response();
            if let Ok(v) = HeaderValue::from_str(&content_type) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            resp
        }
        Ok(Reply::Stream(stream)) => {
            let content_type = HeaderValue::from_str(stream.content_type())
                .unwrap_or_else(|_| HeaderValue::from_static("text/event-stream"));
            let mut resp = Body::from_stream(stream.map(Ok::<_, Infallible>)).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, content_type);
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // nginx (and proxies that follow it) would otherwise buffer the stream.
            h.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
            resp
        }
    };
    rate_headers(resp.headers_mut(), &info);
    resp
}

async fn models(State(state): State<AppState>, request: Request) -> Response {
    let edge = match edge_of(&state) {
        Ok(edge) => edge,
        Err(resp) => return resp,
    };
    let (parts, _) = request.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if let Err(resp) = identify(&state, &edge, &parts.headers, parts.uri.query(), peer).await {
        return resp;
    }
    let policy = edge.proxy.models();
    let data: Vec<_> = policy
        .allowed()
        .iter()
        .map(|id| json!({ "id": id, "object": "model", "created": 0, "owned_by": "moai" }))
        .collect();
    Json(json!({ "object": "list", "data": data, "default": policy.default_model() })).into_response()
}

struct BodyRefusal {
    status: StatusCode,
    message: String,
    kind: Option<ErrorKind>,
}

/// Reads the request body, at most `limit` bytes within `timeout`.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize, timeout: Duration) -> Result<Vec<u8>, BodyRefusal> {
    let too_large = || BodyRefusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: LlmError::RequestTooLarge { limit }.to_string(),
        kind: Some(ErrorKind::RequestTooLarge),
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(BodyRefusal {
            status: StatusCode::REQUEST_TIMEOUT,
            message: "request body not received within the limit (--request-timeout)".to_owned(),
            kind: None,
        }),
        Ok(Ok(bytes)) => Ok(bytes.to_vec()),
        Ok(Err(e)) => {
            let source = e.into_inner();
            let over = source.downcast_ref::<http_body_util::LengthLimitError>().is_some()
                || source.source().is_some_and(|s| s.downcast_ref::<http_body_util::LengthLimitError>().is_some());
            if over {
                Err(too_large())
            } else {
                Err(BodyRefusal {
                    status: StatusCode::BAD_REQUEST,
                    message: "the request body could not be read".to_owned(),
                    kind: None,
                })
            }
        }
    }
}

/// An error as the client gets it before the answer starts. An upstream error status with a
/// JSON body passes through as it came (with its Retry-After); everything else is moai's error
/// shape plus a `code` naming the kind.
fn llm_error(e: &LlmError) -> Response {
    let mut resp = match e {
        LlmError::UpstreamStatus { status, body: Some(body), .. } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, [(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
        }
        e => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
            error_with_code(status, &e.to_string(), Some(e.kind().as_str()))
        }
    };
    let retry_after = match e {
        LlmError::RateLimited { retry_after, info, .. } => {
            rate_headers(resp.headers_mut(), info);
            Some(moai_llm::retry_after_secs(*retry_after).to_string())
        }
        LlmError::UpstreamStatus { retry_after, .. } => retry_after.clone(),
        _ => None,
    };
    if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn error_with_code(status: StatusCode, message: &str, code: Option<&str>) -> Response {
    let mut body = json!({ "error": message, "status": status.as_u16() });
    if let Some(code) = code {
        body["code"] = json!(code);
    }
    (status, Json(body)).into_response()
}

/// The limits' state as OpenAI's headers carry it: `x-ratelimit-{limit,remaining,reset}-
/// {requests,tokens}`.
fn rate_headers(headers: &mut HeaderMap, info: &RateInfo) {
    for (what, window) in [("requests", info.requests), ("tokens", info.tokens)] {
        let Some(Window { limit, remaining, reset }) = window else { continue };
        for (name, value) in [
            (format!("x-ratelimit-limit-{what}"), limit.to_string()),
            (format!("x-ratelimit-remaining-{what}"), remaining.to_string()),
            (format!("x-ratelimit-reset-{what}"), format_reset(reset)),
        ] {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::from_str(&value)) {
                headers.insert(name, value);
            }
        }
    }
}

/// `250ms`, `2s`, `1.5s`: whole milliseconds, rounded up (a reset is never told too early).
fn format_reset(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (secs, frac) = (ms / 1000, ms % 1000);
    if frac == 0 {
        return format!("{secs}s");
    }
    let frac = format!("{frac:03}");
    format!("{secs}.{}s", frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_told_apart() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h, None), Credential::None);
        assert_eq!(credential(&h, Some("token=u%3Aab")), Credential::Moai("u:ab".into()));
        h.insert(header::AUTHORIZATION, "Bearer u:ab".parse().unwrap());
        assert_eq!(credential(&h, None), Credential::Moai("u:ab".into()));
        h.insert(header::AUTHORIZATION, "Jazz co_zabc_...".parse().unwrap());
        assert_eq!(credential(&h, Some("token=u%3Aab")), Credential::Jazz("co_zabc_...".into()));
        h.insert(header::AUTHORIZATION, "jazz x".parse().unwrap());
        assert!(matches!(credential(&h, None), Credential::Jazz(_)));
    }

    #[test]
    fn resets_read_like_durations() {
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_secs(2)), "2s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_micros(59_999_500)), "60s");
        assert_eq!(format_reset(Duration::from_micros(1_020_001)), "1.021s");
        assert_eq!(format_reset(Duration::from_micros(999_001)), "1s");
    }

    #[test]
    fn accounts_of_callers() {
        assert_eq!(LlmCaller::MoaiToken { subject: "alice".into() }.account(), "alice");
        assert_eq!(LlmCaller::Anonymous { ip: "127.0.0.1".into() }.account(), "ip:127.0.0.1");
    }
}
