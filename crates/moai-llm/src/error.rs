//! What can go wrong with one proxied request, typed: the edge turns each into an HTTP status
//! (before the first byte) and metrics count each by [`ErrorKind`]. Messages never contain the
//! prompt, the upstream key or the caller's token.

use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;

use crate::limiter::RateInfo;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

/// A request the proxy refused or could not complete, before any byte of the answer was sent.
/// Failures after that are told to the client as a `data: {"error":…}` event instead (see
/// [`crate::ChatStream`]).
#[derive(Debug, Error)]
pub enum LlmError {
    #[error("request body larger than {limit} bytes (--llm-max-request-bytes)")]
    RequestTooLarge { limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("too many messages: {count}, at most {limit} (--llm-max-messages)")]
    TooManyMessages { count: usize, limit: usize },
    #[error("model {requested:?} is not allowed on this server; GET /v1/models lists the allowed ones")]
    ModelNotAllowed { requested: String },
    #[error("{field} {requested} is more than this server allows ({limit}, --llm-max-tokens)")]
    MaxTokensTooLarge { field: &'static str, requested: u64, limit: u32 },
    #[error(
        "this request needs {needed} tokens (prompt estimate + max tokens), more than the {limit} \
         tokens per minute an account may use; lower max_tokens or shorten the prompt"
    )]
    OverTokenLimit { needed: u32, limit: u32 },
    #[error("rate limit reached: {} per minute for this account; retry in {}s", limit_name(*.limit), retry_after_secs(*.retry_after))]
    RateLimited { limit: Limit, retry_after: Duration, info: RateInfo },
    #[error("cannot reach the LLM upstream")]
    Connect,
    #[error("the LLM upstream did not answer within {0:?} (--llm-first-byte-timeout)")]
    FirstByteTimeout(Duration),
    #[error("the LLM upstream stalled for {0:?} (--llm-idle-timeout)")]
    IdleTimeout(Duration),
    /// The upstream answered an error status. `body` is its JSON body, passed through as is
    /// (None when it was not JSON, or too large to keep).
    #[error("the LLM upstream answered {status}")]
    UpstreamStatus { status: u16, body: Option<Bytes>, retry_after: Option<String> },
    #[error("the LLM upstream sent an invalid response: {0}")]
    UpstreamInvalid(&'static str),
    #[error("the connection to the LLM upstream failed")]
    UpstreamDisconnected,
}

fn limit_name(limit: Limit) -> &'static str {
    match limit {
        Limit::Requests => "requests",
        Limit::Tokens => "tokens",
    }
}

/// Whole seconds to wait, rounded up, at least 1 (what `Retry-After` carries).
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl LlmError {
    /// The HTTP status the client gets.
    pub fn status(&self) -> u16 {
        match self {
            LlmError::RequestTooLarge { .. } => 413,
            LlmError::BadRequest(_)
            | LlmError::TooManyMessages { .. }
            | LlmError::ModelNotAllowed { .. }
            | LlmError::MaxTokensTooLarge { .. }
            | LlmError::OverTokenLimit { .. } => 400,
            LlmError::RateLimited { .. } => 429,
            LlmError::Connect | LlmError::UpstreamInvalid(_) | LlmError::UpstreamDisconnected => 502,
            LlmError::FirstByteTimeout(_) | LlmError::IdleTimeout(_) => 504,
            LlmError::UpstreamStatus { status, .. } => *status,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            LlmError::RequestTooLarge { .. } => ErrorKind::RequestTooLarge,
            LlmError::BadRequest(_) => ErrorKind::BadRequest,
            LlmError::TooManyMessages { .. } => ErrorKind::TooManyMessages,
            LlmError::ModelNotAllowed { .. } => ErrorKind::ModelNotAllowed,
            LlmError::MaxTokensTooLarge { .. } => ErrorKind::MaxTokensTooLarge,
            LlmError::OverTokenLimit { .. } => ErrorKind::OverTokenLimit,
            LlmError::RateLimited { limit: Limit::Requests, .. } => ErrorKind::RateLimitedRequests,
            LlmError::RateLimited { limit: Limit::Tokens, .. } => ErrorKind::RateLimitedTokens,
            LlmError::Connect => ErrorKind::UpstreamConnect,
            LlmError::FirstByteTimeout(_) => ErrorKind::FirstByteTimeout,
            LlmError::IdleTimeout(_) => ErrorKind::IdleTimeout,
            LlmError::UpstreamStatus { .. } => ErrorKind::UpstreamStatus,
            LlmError::UpstreamInvalid(_) => ErrorKind::UpstreamInvalid,
            LlmError::UpstreamDisconnected => ErrorKind::UpstreamDisconnected,
        }
    }
}

/// Every way a request can fail, as counted in `/metrics` (`kind` label) and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    RequestTooLarge,
    BadRequest,
    TooManyMessages,
    ModelNotAllowed,
    MaxTokensTooLarge,
    OverTokenLimit,
    RateLimitedRequests,
    RateLimitedTokens,
    UpstreamConnect,
    FirstByteTimeout,
    IdleTimeout,
    /// The upstream answered an error status (passed through).
    UpstreamStatus,
    UpstreamInvalid,
    /// The upstream connection failed or closed unexpectedly.
    UpstreamDisconnected,
    /// The upstream sent a `data: {"error":…}` event in its stream (passed through).
    UpstreamStreamError,
    /// The upstream ended its stream without `[DONE]`.
    UpstreamTruncated,
    /// The client went away before the answer was complete; the upstream request was cancelled.
    ClientDisconnected,
    /// The server shut down during the stream.
    ShuttingDown,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::TooManyMessages => "too_many_messages",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::MaxTokensTooLarge => "max_tokens_too_large",
            ErrorKind::OverTokenLimit => "over_token_limit",
            ErrorKind::RateLimitedRequests => "rate_limited_requests",
            ErrorKind::RateLimitedTokens => "rate_limited_tokens",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::FirstByteTimeout => "first_byte_timeout",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::UpstreamStatus => "upstream_status",
            ErrorKind::UpstreamInvalid => "upstream_invalid",
            ErrorKind::UpstreamDisconnected => "upstream_disconnected",
            ErrorKind::UpstreamStreamError => "upstream_stream_error",
            ErrorKind::UpstreamTruncated => "upstream_truncated",
            ErrorKind::ClientDisconnected => "client_disconnected",
            ErrorKind::ShuttingDown => "shutting_down",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
