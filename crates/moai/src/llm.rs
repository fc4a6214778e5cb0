//! The LLM proxy's flags (`moai serve --llm-*`) and what they configure (docs/llm-proxy.md).

use std::time::Duration;

use clap::Args;
use moai_server::llm::{ApiKey, LlmConfig, LlmLimits, LlmSettings, Timeouts, RED_PILL_BASE_URL};

use crate::units;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "LLM proxy (docs/llm-proxy.md)")]
pub struct LlmArgs {
    /// OpenAI-compatible API root to proxy chat calls to, e.g. `https://api.openai.com/v1`
    /// (calls go to `<URL>/chat/completions`). Unset: the proxy is off, unless RED_PILL_API_KEY
    /// is set, which proxies to the original service's upstream, https://api.redpill.ai/v1.
    #[arg(long, env = "MOAI_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// Key sent upstream as `Authorization: Bearer …` (never logged). RED_PILL_API_KEY is read
    /// when this is unset.
    #[arg(long, env = "MOAI_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,
    /// The original service's key variable (RED_PILL_API_KEY).
    #[arg(long, env = "RED_PILL_API_KEY", hide_env_values = true, hide = true)]
    pub red_pill_api_key: Option<String>,
    /// Models callers may use, comma-separated. Unset: only the default model.
    #[arg(long, env = "MOAI_LLM_MODELS", value_delimiter = ',')]
    pub llm_models: Vec<String>,
    /// Model of a request that names none. Default: the first of --llm-models, or the original
    /// service's default (qwen/qwen3-30b-a3b-instruct-2507) when --llm-models is unset.
    #[arg(long, env = "MOAI_LLM_DEFAULT_MODEL")]
    pub llm_default_model: Option<String>,
    /// Run the proxy on a server without SYNC_SHARED_SECRET: anyone who can reach the server may
    /// use the upstream key, limited per IP address. Without it such a server does not start
    /// the proxy.
    #[arg(long, env = "MOAI_LLM_ALLOW_OPEN")]
    pub llm_allow_open: bool,
    /// Requests per minute per account (token subject); 0 = no limit.
    #[arg(long, env = "MOAI_LLM_REQUESTS_PER_MINUTE", default_value_t = 60)]
    pub llm_requests_per_minute: u32,
    /// Tokens per minute per account, charged when a request is admitted: its prompt estimate
    /// (request bytes / 4) plus its max tokens; 0 = no limit.
    #[arg(long, env = "MOAI_LLM_TOKENS_PER_MINUTE", default_value_t = 200_000)]
    pub llm_tokens_per_minute: u32,
    /// Largest max_tokens (or max_completion_tokens) a request may ask for; a request naming
    /// neither gets max_tokens set to this.
    #[arg(long, env = "MOAI_LLM_MAX_TOKENS", default_value_t = 4096)]
    pub llm_max_tokens: u32,
    /// Largest request body; larger gets 413.
    #[arg(long, env = "MOAI_LLM_MAX_REQUEST_BYTES", default_value = "1MiB", value_parser = units::bytes)]
    pub llm_max_request_bytes: usize,
    /// Most messages in one request; more gets 400.
    #[arg(long, env = "MOAI_LLM_MAX_MESSAGES", default_value_t = 100)]
    pub llm_max_messages: usize,
    /// Time to connect to the upstream.
    #[arg(long, env = "MOAI_LLM_CONNECT_TIMEOUT", default_value = "10s", value_parser = units::duration)]
    pub llm_connect_timeout: Duration,
    /// Time from sending a request to the upstream's first bytes (504 past it). A non-streamed
    /// answer arrives only once complete, so this bounds its whole generation.
    #[arg(long, env = "MOAI_LLM_FIRST_BYTE_TIMEOUT", default_value = "120s", value_parser = units::duration)]
    pub llm_first_byte_timeout: Duration,
    /// Longest silence of the upstream once its answer started; a stream then ends with an
    /// error event.
    #[arg(long, env = "MOAI_LLM_IDLE_TIMEOUT", default_value = "60s", value_parser = units::duration)]
    pub llm_idle_timeout: Duration,
    /// Origins browsers may call the proxy from, comma-separated (e.g. `https://app.example`).
    /// Unset or `*`: any origin (calls carry a token in a header, not cookies).
    #[arg(long, env = "MOAI_LLM_CORS_ORIGINS", value_delimiter = ',')]
    pub llm_cors_origins: Vec<String>,
}

impl LlmArgs {
    /// What the server needs to decide whether and how the proxy runs.
    pub fn settings(&self) -> LlmSettings {
        let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let api_key = given(&self.llm_api_key).or_else(|| given(&self.red_pill_api_key));
        let base_url = match (given(&self.llm_base_url), given(&self.red_pill_api_key)) {
            (Some(url), _) => Some(url),
            (None, Some(_)) => Some(RED_PILL_BASE_URL.to_owned()),
            (None, None) => {
                if api_key.is_some() {
                    tracing::warn!("--llm-api-key is set but --llm-base-url is not: the LLM proxy stays off");
                }
                None
            }
        };
        let config = base_url.map(|base_url| LlmConfig {
            base_url,
            api_key: api_key.map(ApiKey::new),
            models: self.llm_models.clone(),
            default_model: given(&self.llm_default_model),
            limits: LlmLimits {
                requests_per_minute: self.llm_requests_per_minute,
                tokens_per_minute: self.llm_tokens_per_minute,
                max_tokens: self.llm_max_tokens,
                max_request_bytes: self.llm_max_request_bytes,
                max_messages: self.llm_max_messages,
                ..LlmLimits::default()
            },
            timeouts: Timeouts {
                connect: self.llm_connect_timeout,
                first_byte: self.llm_first_byte_timeout,
                idle: self.llm_idle_timeout,
            },
        });
        LlmSettings { config, allow_open: self.llm_allow_open, cors_origins: self.llm_cors_origins.clone() }
    }
}
