//! Checks a client's chat request and prepares what goes upstream.
//!
//! The body is forwarded as the client wrote it (field order and number digits kept, unknown
//! fields kept), with three changes: `model` is set to the resolved model (the default when the
//! client named none), `max_tokens` is set to the server's cap when the client named neither
//! `max_tokens` nor `max_completion_tokens` (so a request's token charge is an upper bound), and
//! a streamed request gets `stream_options.include_usage: true` (so its usage can be counted;
//! the usage-only chunk this adds is not forwarded to a client that did not ask for it).

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::config::LlmLimits;
use crate::error::LlmError;
use crate::models::ModelPolicy;

/// A checked request, ready to send upstream.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The JSON body to send upstream.
    pub(crate) body: Bytes,
    /// The model the upstream is asked for (always one of the allowlist).
    pub model: String,
    /// `stream: true`: the answer is a server-sent-event stream.
    pub stream: bool,
    /// The client asked for `stream_options.include_usage` itself (so it gets the usage chunk).
    pub client_wants_usage: bool,
    /// The largest completion the request may produce.
    pub max_tokens: u32,
    /// An estimate of the prompt's tokens: its body bytes / 4, rounded up.
    pub prompt_estimate: u32,
}

impl ChatRequest {
    /// What the tokens-per-minute limit charges: the prompt estimate plus the max tokens, an
    /// upper bound of what the request can use (the estimate is generous: JSON syntax counts).
    pub fn token_charge(&self) -> u32 {
        self.prompt_estimate.saturating_add(self.max_tokens)
    }

    /// The body sent upstream (for tests and diagnostics; it holds the prompt: never log it).
    pub fn upstream_body(&self) -> &[u8] {
        &self.body
    }
}

pub(crate) fn prepare(raw: &[u8], models: &ModelPolicy, limits: &LlmLimits) -> Result<ChatRequest, LlmError> {
    if raw.len() > limits.max_request_bytes {
        return Err(LlmError::RequestTooLarge { limit: limits.max_request_bytes });
    }
    let bad = |m: &str| LlmError::BadRequest(m.to_owned());
    let value: Value = serde_json::from_slice(raw).map_err(|_| bad("the body is not valid JSON"))?;
    let Value::Object(mut body) = value else { return Err(bad("the body must be a JSON object")) };

    match body.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => {
            if messages.len() > limits.max_messages {
                return Err(LlmError::TooManyMessages { count: messages.len(), limit: limits.max_messages });
            }
            // Roles are not restricted: tool results (`role: "tool"`) and future roles pass.
            if !messages.iter().all(|m| m.get("role").is_some_and(Value::is_string)) {
                return Err(bad("every message must be an object with a string role"));
            }
        }
        _ => return Err(bad("messages array required")),
    }

    let requested = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.as_str()),
        Some(_) => return Err(bad("model must be a string")),
    };
    let model = models.resolve(requested)?.to_owned();
    body.insert("model".into(), Value::String(model.clone()));

    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream must be true or false")),
    };

    let max_tokens = max_tokens(&mut body, limits.max_tokens)?;

    let mut client_wants_usage = false;
    if stream {
        let options = body.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
        if options.is_null() {
            *options = Value::Object(Map::new());
        }
        let Value::Object(options) = options else { return Err(bad("stream_options must be an object")) };
        client_wants_usage = options.get("include_usage") == Some(&Value::Bool(true));
        options.insert("include_usage".into(), Value::Bool(true));
    }

    let prompt_estimate = u32::try_from(raw.len().div_ceil(4)).unwrap_or(u32::MAX);
    let body = serde_json::to_vec(&Value::Object(body)).map_err(|_| bad("the body cannot be re-encoded"))?;
    Ok(ChatRequest { body: body.into(), model, stream, client_wants_usage, max_tokens, prompt_estimate })
}

/// The completion limit of the request: the larger of `max_tokens` and
/// `max_completion_tokens` when given (each at most `cap`), else `cap`, which is then set as
/// `max_tokens`.
fn max_tokens(body: &mut Map<String, Value>, cap: u32) -> Result<u32, LlmError> {
    let mut named = None;
    for field in ["max_tokens", "max_completion_tokens"] {
        let n = match body.get(field) {
            None | Some(Value::Null) => continue,
            Some(v) => v
                .as_u64()
                .filter(|n| *n > 0)
                .ok_or_else(|| LlmError::BadRequest(format!("{field} must be a positive integer")))?,
        };
        if n > u64::from(cap) {
            return Err(LlmError::MaxTokensTooLarge { field, requested: n, limit: cap });
        }
        named = Some(named.unwrap_or(0).max(n as u32));
    }
    Ok(match named {
        Some(n) => n,
        None => {
            body.insert("max_tokens".into(), Value::from(cap));
            cap
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ModelPolicy {
        ModelPolicy::new(&["m1".into(), "m2".into()], None).unwrap()
    }

    fn prep(body: &str) -> Result<ChatRequest, LlmError> {
        prepare(body.as_bytes(), &policy(), &LlmLimits { max_messages: 3, max_tokens: 100, ..LlmLimits::default() })
    }

    fn sent(r: &ChatRequest) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn unknown_fields_and_order_are_kept_and_the_default_model_set() {
        let r =
            prep(r#"{"x_custom":{"a":1.50},"messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#).unwrap();
        assert_eq!(r.model, "m1");
        assert!(!r.stream);
        let text = std::str::from_utf8(&r.body).unwrap();
        assert_eq!(
            text,
            r#"{"x_custom":{"a":1.50},"messages":[{"role":"user","content":"hi"}],"temperature":0.7,"model":"m1","max_tokens":100}"#
        );
        assert_eq!(r.max_tokens, 100);
        assert_eq!(r.token_charge(), r.prompt_estimate + 100);
    }

    #[test]
    fn streams_ask_for_usage_and_remember_whether_the_client_did() {
        let r = prep(r#"{"model":"m2","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#)
            .unwrap();
        assert!(r.stream && !r.client_wants_usage);
        assert_eq!(sent(&r)["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(r.max_tokens, 10);
        let r = prep(
            r#"{"stream":true,"stream_options":{"include_usage":true,"x":1},"messages":[{"role":"tool","content":"42","tool_call_id":"c"}]}"#,
        )
        .unwrap();
        assert!(r.client_wants_usage);
        assert_eq!(sent(&r)["stream_options"]["x"], 1);
    }

    #[test]
    fn bad_requests_are_refused() {
        let one = r#"[{"role":"user","content":"x"}]"#;
        for (body, expect) in [
            ("nope", "not valid JSON"),
            ("[]", "JSON object"),
            ("{}", "messages array required"),
            (r#"{"messages":[]}"#, "messages array required"),
            (r#"{"messages":[1]}"#, "string role"),
            (&format!(r#"{{"messages":{one},"model":7}}"#), "model must be a string"),
            (&format!(r#"{{"messages":{one},"stream":"yes"}}"#), "stream must be"),
            (&format!(r#"{{"messages":{one},"max_tokens":-1}}"#), "positive integer"),
            (&format!(r#"{{"messages":{one},"max_tokens":1.5}}"#), "positive integer"),
            (&format!(r#"{{"messages":{one},"stream":true,"stream_options":3}}"#), "stream_options"),
        ] {
            let err = prep(body).unwrap_err();
            assert!(matches!(err, LlmError::BadRequest(_)), "{body}: {err:?}");
            assert!(err.to_string().contains(expect), "{body}: {err}");
        }
        let four = r#"{"messages":[{"role":"user"},{"role":"user"},{"role":"user"},{"role":"user"}]}"#;
        assert!(matches!(prep(four), Err(LlmError::TooManyMessages { count: 4, limit: 3 })));
        assert!(matches!(
            prep(&format!(r#"{{"messages":{one},"model":"gpt-5"}}"#)),
            Err(LlmError::ModelNotAllowed { .. })
        ));
        assert!(matches!(
            prep(&format!(r#"{{"messages":{one},"max_completion_tokens":101}}"#)),
            Err(LlmError::MaxTokensTooLarge { field: "max_completion_tokens", requested: 101, limit: 100 })
        ));
        let big = format!(r#"{{"messages":{one},"pad":"{}"}}"#, "x".repeat(100));
        let limits = LlmLimits { max_request_bytes: 50, ..LlmLimits::default() };
        assert!(matches!(prepare(big.as_bytes(), &policy(), &limits), Err(LlmError::RequestTooLarge { limit: 50 })));
    }
}
