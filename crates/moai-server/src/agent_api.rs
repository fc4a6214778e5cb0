//! The agent API of participant mode (docs/participant.md): what the server's own cojson account
//! shows and does over HTTP, generalised from the original service's four endpoints.
//!
//! - `GET /profile`: the account id, profile, its registry and what it was given;
//! - `POST /on-added` `{"coId"}`: a client added the server to a group or CoValue; the server
//!   loads it, checks it has a role there, and records it;
//! - `POST /register-human` `{"username","accountId"}`: a username registry the server owns and
//!   everyone can read; first come first served (409 for a name taken by another account,
//!   200 again for the same pair);
//! - `POST /trigger` `{"coId","key","value"}`: the server sets a key in a CoMap it may write.
//!
//! Deny by default: a caller needs a token that opens CoJSON (a plain token, or a scoped one
//! made with `moai token --cojson`), or a Jazz auth token (`Authorization: Jazz …`, jazz-tools'
//! `generateAuthToken`) of an account this server stores; on an open server (no
//! SYNC_SHARED_SECRET) moai tokens are not needed, as on the sync endpoints. A Jazz account may
//! register a name only for itself and trigger writes only where it may write itself. Bad input is a 4xx with the JSON error
//! shape, never a 500. CORS is open (credentials travel in `Authorization`, not cookies).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use axum::Router;
use moai_cojson::{ParticipantError, ParticipantService, ParticipantServiceError, Registration};
use serde_json::{json, Value};
use tower_http::cors::{Any, CorsLayer};

use crate::auth::{jazz_token, verify_jazz, Resource};
use crate::caller::Caller;
use crate::http_error::error_response;
use crate::AppState;

/// The four routes (the caller adds the ready gate).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/profile", get(profile))
        .route("/on-added", post(on_added))
        .route("/register-human", post(register_human))
        .route("/trigger", post(trigger))
        .route("/create-map", post(create_map))
}

/// Browser apps on any origin may call the API; credentials are a bearer token, never cookies.
pub(crate) fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
}

/// Who is calling: a moai token (or an open server) may do everything; a Jazz account only what
/// concerns itself (see each handler).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Operator,
    Jazz(String),
}

/// The account, after auth; or the answer to give instead.
async fn participant(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<(ParticipantService, Who), Box<Response>> {
    let Some(participant) = caller.engines.participant.clone() else {
        return Err(Box::new(error_response(
            StatusCode::NOT_FOUND,
            "this server has no account of its own (participant mode needs PEER_SECRET; see moai agent generate)",
        )));
    };
    if let Some(token) = jazz_token(headers) {
        return match verify_jazz(caller.engines.cojson.as_ref(), token).await {
            Ok(account) => Ok((participant, Who::Jazz(account))),
            Err((status, reason)) => {
                state.metrics.rejected("auth");
                Err(Box::new(error_response(status, &reason)))
            }
        };
    }
    if let Err(e) = caller.authorise(state, Resource::Cojson) {
        state.metrics.rejected("auth");
        return Err(Box::new(error_response(e.http_status(), &e.to_string())));
    }
    Ok((participant, Who::Operator))
}

fn failure(e: ParticipantServiceError) -> Response {
    use ParticipantError as P;
    let (status, message) = match &e {
        ParticipantServiceError::NotFound(_) => (StatusCode::NOT_FOUND, e.to_string()),
        ParticipantServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, e.to_string()),
        ParticipantServiceError::Participant(P::UnknownCoValue(_)) => (StatusCode::NOT_FOUND, e.to_string()),
        ParticipantServiceError::Participant(P::NotPermitted(_) | P::NoReadKey(_)) => {
            (StatusCode::FORBIDDEN, e.to_string())
        }
        ParticipantServiceError::Participant(
            P::BadId(_)
            | P::BadMember(_)
            | P::NotAGroup(_)
            | P::NotAMap(_)
            | P::NotAList(_)
            | P::Deleted(_)
            | P::Unsupported(_),
        ) => (StatusCode::BAD_REQUEST, e.to_string()),
        ParticipantServiceError::Timeout(..) => (StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        _ => {
            tracing::error!(error = %e, "the server's account could not answer");
            (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    };
    error_response(status, &message)
}

/// A 400 for a malformed request (small, so the helpers below return it cheaply).
struct BadRequest(String);

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        error_response(StatusCode::BAD_REQUEST, &self.0)
    }
}

/// The request body as a JSON object, or a 400 saying why not.
fn object(body: &Bytes) -> Result<serde_json::Map<String, Value>, BadRequest> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(BadRequest("the body must be a JSON object".into())),
        Err(e) => Err(BadRequest(format!("the body is not JSON: {e}"))),
    }
}

fn co_id(map: &serde_json::Map<String, Value>, keys: &[&str]) -> Result<String, BadRequest> {
    let id = keys.iter().find_map(|k| map.get(*k)).and_then(Value::as_str).map(str::trim);
    match id {
        Some(id) if id.starts_with("co_z") && id.len() <= 128 => Ok(id.to_owned()),
        _ => Err(BadRequest(format!("{} required (co_z…)", keys[0]))),
    }
}

/// How long `/on-added` and `/trigger` wait for the upstream (agent mode) to hand over a
/// CoValue before they go on with what the local relay has.
const UPSTREAM_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Agent mode: brings `id` from the upstream sync server into the local relay first (and keeps
/// it in sync from then on), so the participant finds what clients there shared with it. With
/// no link the local relay's copy (if any) is used; the answer then says so through its status.
async fn from_upstream(caller: &Caller, id: &str) {
    let (Some(uplink), Ok(co)) = (caller.engines.uplink.as_ref(), moai_cojson::CoId::parse(id)) else { return };
    let outcome = uplink.fetch(co, UPSTREAM_FETCH_TIMEOUT).await;
    tracing::debug!(covalue = id, ?outcome, "agent mode: fetched from upstream");
}

/// An authenticated call of the agent API: the server's account, who is calling, and the
/// request's engines (agent mode's uplink). Extracted before the body, so a caller without
/// credentials gets 401 whatever it sent.
struct AgentCall {
    participant: ParticipantService,
    who: Who,
    caller: Caller,
}

impl FromRequestParts<AppState> for AgentCall {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let (participant, who) = participant(state, &caller, &parts.headers).await.map_err(|r| *r)?;
        Ok(AgentCall { participant, who, caller })
    }
}

impl AgentCall {
    /// The account a Jazz caller acts for (`None` for an operator's moai token).
    fn on_behalf_of(&self) -> Option<&str> {
        match &self.who {
            Who::Jazz(account) => Some(account.as_str()),
            Who::Operator => None,
        }
    }
}

/// A POST body that is a JSON object (400 otherwise).
struct JsonObject(serde_json::Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Response> {
        let body = Bytes::from_request(req, state).await.map_err(IntoResponse::into_response)?;
        object(&body).map(JsonObject).map_err(IntoResponse::into_response)
    }
}

/// What a handler answers: a JSON body, or an error response.
type Answer = Result<Json<Value>, Response>;

fn bad_request(message: &str) -> Response {
    error_response(StatusCode::BAD_REQUEST, message)
}

async fn profile(call: AgentCall) -> Answer {
    let p = call.participant.profile().await.map_err(failure)?;
    let upstream = call.caller.engines.uplink.as_ref().map(|u| {
        let s = u.status();
        json!({ "url": s.url, "connected": s.connected, "links": s.links, "lastError": s.last_error, "followed": s.followed })
    });
    Ok(Json(json!({
        "accountId": p.account_id,
        "profileId": p.profile_id,
        "profileName": p.profile_name,
        "sessionId": p.session_id,
        "registryId": p.registry_id,
        "given": p.given,
        "upstream": upstream,
    })))
}

/// Any account may tell the server it was added somewhere; the server checks its own role.
async fn on_added(call: AgentCall, JsonObject(body): JsonObject) -> Answer {
    // `sparkId` is what the original service took.
    let id = co_id(&body, &["coId", "sparkId"]).map_err(IntoResponse::into_response)?;
    from_upstream(&call.caller, &id).await;
    let record = call.participant.on_added(&id).await.map_err(failure)?;
    Ok(Json(json!({ "ok": true, "added": id, "record": record })))
}

async fn register_human(call: AgentCall, JsonObject(body): JsonObject) -> Answer {
    let username = body.get("username").and_then(Value::as_str).map(str::trim).unwrap_or_default().to_owned();
    let valid = !username.is_empty()
        && username.len() <= 64
        && username.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(bad_request("username required: 1 to 64 of a-z A-Z 0-9 _ . -"));
    }
    let account = co_id(&body, &["accountId"]).map_err(IntoResponse::into_response)?;
    // A Jazz account registers a name for itself only.
    if call.on_behalf_of().is_some_and(|me| me != account) {
        return Err(error_response(StatusCode::FORBIDDEN, "a Jazz account may register a name for itself only"));
    }
    match call.participant.register_human(&username, &account).await.map_err(failure)? {
        Registration::Registered => Ok(Json(json!({ "ok": true, "username": username, "accountId": account }))),
        Registration::AlreadyRegistered => {
            Ok(Json(json!({ "ok": true, "username": username, "accountId": account, "unchanged": true })))
        }
        Registration::Conflict => {
            Err(error_response(StatusCode::CONFLICT, "username already registered to a different account"))
        }
    }
}

/// A Jazz account makes the server write only where it may write itself.
async fn trigger(call: AgentCall, JsonObject(body): JsonObject) -> Answer {
    let id = co_id(&body, &["coId"]).map_err(IntoResponse::into_response)?;
    // A key for a CoMap; none for a CoList (the value is appended).
    let key = match body.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 256 => Some(k.as_str()),
        Some(_) => return Err(bad_request("key: a string of 1 to 256 bytes")),
    };
    let Some(value) = body.get("value").cloned() else {
        return Err(bad_request("value required (any JSON)"));
    };
    from_upstream(&call.caller, &id).await;
    call.participant.trigger(&id, key, value, call.on_behalf_of()).await.map_err(failure)?;
    Ok(Json(json!({ "ok": true, "coId": id, "key": key, "appended": key.is_none() })))
}

/// Most entries `/create-map` takes in `init`.
const MAX_INIT_ENTRIES: usize = 256;

/// A Jazz account may share a new map only with a group it is a member of.
async fn create_map(call: AgentCall, JsonObject(body): JsonObject) -> Answer {
    let parent = co_id(&body, &["parent"]).map_err(IntoResponse::into_response)?;
    let role = match body.get("role").and_then(Value::as_str).unwrap_or("inherit") {
        "inherit" => None,
        r @ ("reader" | "writer" | "manager" | "admin") => moai_cojson::Role::parse(r),
        _ => return Err(bad_request("role: inherit, reader, writer, manager or admin")),
    };
    let init = match body.get("init") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(o)) if o.len() <= MAX_INIT_ENTRIES => o.clone(),
        Some(_) => return Err(bad_request("init: a JSON object of at most 256 entries")),
    };
    from_upstream(&call.caller, &parent).await;
    let made = call.participant.create_shared_map(&parent, role, init, call.on_behalf_of()).await.map_err(failure)?;
    if let (Some(uplink), Ok(id)) = (call.caller.engines.uplink.as_ref(), moai_cojson::CoId::parse(&made.map_id)) {
        uplink.follow(id).await;
    }
    Ok(Json(json!({ "ok": true, "groupId": made.group_id, "mapId": made.map_id })))
}
