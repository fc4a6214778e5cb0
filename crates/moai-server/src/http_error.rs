//! The one shape of every HTTP error moai answers: `{"error": "<message>", "status": <code>}`
//! with `content-type: application/json`. Handlers build it with [`error_response`]; responses
//! made by layers and the framework (413 from the body limit, 408 from the request timeout, 405
//! for a wrong method, 400 for a body that cannot be read) are rewritten into it by
//! [`json_errors`], so a client never has to parse two kinds of error.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub(crate) fn error_response(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({ "error": error, "status": status.as_u16() }))).into_response()
}

/// Rewrites error responses that are not JSON into the JSON error shape, keeping their status
/// and headers (Retry-After, Allow, …). The one exception is a page's own HTML answer to a
/// browser (the dashboard's login form on 401; `pages::html::wants_html`): other clients of the
/// same paths get JSON.
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let is_page = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if !(status.is_client_error() || status.is_server_error()) || is_json || is_page {
        return resp;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request body larger than the limit (--max-body-bytes)",
        StatusCode::REQUEST_TIMEOUT => "request took longer than the limit (--request-timeout)",
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this path",
        other => other.canonical_reason().unwrap_or("error"),
    };
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let fresh = error_response(status, message);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    Response::from_parts(parts, fresh.into_body())
}
