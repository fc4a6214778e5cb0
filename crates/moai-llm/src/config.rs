//! The proxy's configuration: where the upstream is, which models callers may use, and the
//! limits and timeouts of one request. The binary maps its `--llm-*` flags onto [`LlmConfig`].

use std::time::Duration;

use thiserror::Error;

/// The upstream of the original service (it had no base-URL setting), used when only
/// `RED_PILL_API_KEY` is configured.
pub const RED_PILL_BASE_URL: &str = "https://api.redpill.ai/v1";

/// The original service's default model.
pub const ORIGINAL_DEFAULT_MODEL: &str = "qwen/qwen3-30b-a3b-instruct-2507";

/// The upstream API key. Its `Debug` never shows the value, so a logged config cannot leak it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// The OpenAI-compatible API root, e.g. `https://api.openai.com/v1`; chat requests go to
    /// `<base_url>/chat/completions`.
    pub base_url: String,
    /// Sent upstream as `Authorization: Bearer …`; None for an upstream that needs none.
    pub api_key: Option<ApiKey>,
    /// The allowlist. Empty: only the default model.
    pub models: Vec<String>,
    /// The model of a request that names none. None: the first of `models`, or
    /// [`ORIGINAL_DEFAULT_MODEL`] when `models` is empty.
    pub default_model: Option<String>,
    pub limits: LlmLimits,
    pub timeouts: Timeouts,
}

impl LlmConfig {
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            models: Vec::new(),
            default_model: None,
            limits: LlmLimits::default(),
            timeouts: Timeouts::default(),
        }
    }

    /// The chat completions URL, or why the base URL is unusable.
    pub(crate) fn chat_url(&self) -> Result<reqwest::Url, ConfigError> {
        let bad = |why: &str| ConfigError::BaseUrl(format!("{}: {why}", redact_base_url(&self.base_url)));
        let base = reqwest::Url::parse(self.base_url.trim_end_matches('/')).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("expected an http:// or https:// URL"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("a base URL has no query or fragment"));
        }
        reqwest::Url::parse(&format!("{}/chat/completions", base.as_str().trim_end_matches('/')))
            .map_err(|e| bad(&e.to_string()))
    }
}

/// The base URL as logs may show it: without a user or password.
pub fn redact_base_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// What one account and one request may use.
#[derive(Debug, Clone)]
pub struct LlmLimits {
    /// Requests per minute per account; 0 = no limit.
    pub requests_per_minute: u32,
    /// Tokens per minute per account, charged when a request is admitted: its prompt estimate
    /// (request bytes / 4) plus its max tokens; 0 = no limit.
    pub tokens_per_minute: u32,
    /// The largest `max_tokens` / `max_completion_tokens` a request may ask for, and the
    /// `max_tokens` set on a request that names neither.
    pub max_tokens: u32,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Most messages in one request.
    pub max_messages: usize,
    /// Largest non-streamed upstream answer kept in memory (and largest single event of a
    /// stream); past it the request fails with 502.
    pub max_response_bytes: usize,
}

impl Default for LlmLimits {
    fn default() -> Self {
        Self {
            requests_per_minute: 60,
            tokens_per_minute: 200_000,
            max_tokens: 4096,
            max_request_bytes: 1024 * 1024,
            max_messages: 100,
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    /// To open the TCP (and TLS) connection to the upstream.
    pub connect: Duration,
    /// From sending the request to the upstream's response headers and first body bytes. A
    /// non-streamed answer comes only once it is complete, so this bounds its whole generation.
    pub first_byte: Duration,
    /// Longest silence between two pieces of the upstream's answer once it has started.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), first_byte: Duration::from_secs(120), idle: Duration::from_secs(60) }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--llm-base-url {0}")]
    BaseUrl(String),
    #[error("--llm-default-model {0:?} is not one of --llm-models")]
    DefaultNotAllowed(String),
    #[error("{0} must be more than 0")]
    Zero(&'static str),
    #[error("cannot build the HTTP client for the LLM upstream: {0}")]
    Client(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chat_url_is_under_the_base_url() {
        let url = |base: &str| LlmConfig::new(base).chat_url().map(|u| u.to_string());
        assert_eq!(url("https://api.redpill.ai/v1").unwrap(), "https://api.redpill.ai/v1/chat/completions");
        assert_eq!(url("http://127.0.0.1:9/v1/").unwrap(), "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(url("http://127.0.0.1:9").unwrap(), "http://127.0.0.1:9/chat/completions");
        assert!(url("ftp://x/v1").is_err());
        assert!(url("not a url").is_err());
        assert!(url("http://x/v1?key=1").is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_and_logs() {
        let mut c = LlmConfig::new("https://user:hunter2@example.invalid/v1");
        c.api_key = Some(ApiKey::new("sk-secret"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(!redact_base_url(&c.base_url).contains("hunter2"));
        let err = LlmConfig::new("https://user:hunter2@example.invalid/v1?x=1").chat_url().unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
