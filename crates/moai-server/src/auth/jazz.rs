//! `Authorization: Jazz <token>`: a Jazz account proving who it is to the HTTP endpoints that
//! accept it (the agent API, the LLM proxy). The token is checked against the account's header
//! as this server stores it (`moai_cojson::JazzToken`): an account that never synced through this
//! server is unknown here and refused.

use axum::http::{header, HeaderMap, StatusCode};
use moai_cojson::{CojsonService, JazzToken, JazzTokenError};

/// The Jazz token of a request, if it presents one.
pub fn jazz_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("jazz").then_some(token.trim())
}

/// Verifies a Jazz token; returns the account id, or the status and reason to answer.
pub async fn verify_jazz(cojson: Option<&CojsonService>, token: &str) -> Result<String, (StatusCode, String)> {
    let unauthorized = |e: JazzTokenError| (StatusCode::UNAUTHORIZED, e.to_string());
    let token = JazzToken::parse(token).map_err(unauthorized)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    token.check_fresh(now).map_err(unauthorized)?;
    let Some(cojson) = cojson else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "Jazz tokens need the CoJSON engine".into()));
    };
    let header = cojson
        .stored_header(token.account())
        .await
        .map_err(|_| (StatusCode::SERVICE_UNAVAILABLE, "the CoJSON engine is stopping".to_owned()))?
        .ok_or_else(|| unauthorized(JazzTokenError::UnknownAccount(token.account().to_owned())))?;
    token.verify(&header).map_err(unauthorized)?;
    Ok(token.account().to_owned())
}
