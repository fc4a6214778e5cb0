//! moai's LLM proxy: an OpenAI-compatible chat completions proxy to one configured upstream,
//! for apps whose users must not hold the upstream key (docs/llm-proxy.md).
//!
//! This crate knows nothing of HTTP servers or tokens: the server's edge identifies the caller
//! (an *account*, the key of its limits and metrics) and hands the request body here.
//!
//! - [`config`]: the upstream, the allowlist, the limits and timeouts ([`LlmConfig`]).
//! - [`models`]: the model allowlist and the default model ([`ModelPolicy`]).
//! - [`request`]: checks a request and prepares the body sent upstream ([`ChatRequest`]).
//! - [`limiter`]: requests and tokens per minute per account (`governor`) ([`Limiter`]).
//! - [`upstream`]: the upstream call with its connect, first-byte and idle timeouts, and the
//!   server-sent-event passthrough ([`Reply`], [`ChatStream`]).
//! - `sse`: cuts the upstream's bytes into events and inspects them (usage, `[DONE]`, errors).
//! - [`observer`]: what is counted and logged ([`Observer`]): never prompts, answers or keys.

pub mod config;
pub mod error;
pub mod limiter;
pub mod models;
pub mod observer;
pub mod request;
mod sse;
pub mod upstream;

use std::sync::Arc;

pub use config::{ApiKey, ConfigError, LlmConfig, LlmLimits, Timeouts, ORIGINAL_DEFAULT_MODEL, RED_PILL_BASE_URL};
pub use error::{retry_after_secs, ErrorKind, Limit, LlmError};
pub use limiter::{Limiter, RateInfo, Window};
pub use models::ModelPolicy;
pub use observer::{NoObserver, Observer, Usage};
pub use request::ChatRequest;
pub use upstream::{ChatStream, Reply};

/// The model label of a request refused before its model was known.
pub const NO_MODEL: &str = "-";

/// The proxy: one per server, shared by every request.
pub struct LlmProxy {
    models: ModelPolicy,
    limits: LlmLimits,
    timeouts: Timeouts,
    limiter: Limiter,
    client: reqwest::Client,
    chat_url: reqwest::Url,
    api_key: Option<ApiKey>,
    observer: Arc<dyn Observer>,
}

impl LlmProxy {
    pub fn new(config: LlmConfig, observer: Arc<dyn Observer>) -> Result<Self, ConfigError> {
        let chat_url = config.chat_url()?;
        let models = ModelPolicy::new(&config.models, config.default_model.as_deref())?;
        let limits = config.limits;
        if limits.max_tokens == 0 {
            return Err(ConfigError::Zero("--llm-max-tokens"));
        }
        if limits.max_messages == 0 {
            return Err(ConfigError::Zero("--llm-max-messages"));
        }
        if limits.max_request_bytes == 0 {
            return Err(ConfigError::Zero("--llm-max-request-bytes"));
        }
        install_tls_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeouts.connect)
            // A redirect is an upstream misconfiguration; following it could carry the prompt
            // (and, on the same host, the key) somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .user_agent(concat!("moai/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ConfigError::Client(e.without_url().to_string()))?;
        Ok(Self {
            models,
            limiter: Limiter::per_minute(limits.requests_per_minute, limits.tokens_per_minute),
            limits,
            timeouts: config.timeouts,
            client,
            chat_url,
            api_key: config.api_key,
            observer,
        })
    }

    pub fn models(&self) -> &ModelPolicy {
        &self.models
    }

    pub fn limits(&self) -> &LlmLimits {
        &self.limits
    }

    /// Checks a request body (size, shape, messages, model, max tokens) and the account's
    /// limits. A refusal is counted and logged here; the request is not sent.
    pub fn admit(&self, account: &str, body: &[u8]) -> Result<(ChatRequest, RateInfo), LlmError> {
        let refused = |model: &str, e: LlmError| {
            self.observer.error(account, model, e.kind());
            tracing::info!(account, model, status = e.status(), outcome = %e.kind(), "llm request refused");
            e
        };
        let req = request::prepare(body, &self.models, &self.limits).map_err(|e| refused(NO_MODEL, e))?;
        let info = self.limiter.check(account, req.token_charge()).map_err(|e| refused(&req.model, e))?;
        Ok((req, info))
    }
}

/// Makes ring the process's TLS provider (reqwest is built without one of its own). Idempotent;
/// refused harmlessly when another part of the server installed one already.
fn install_tls_provider() {
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let _ = provider.install_default();
}
