//! What the proxy reports about its requests: the server implements [`Observer`] to count them
//! in /metrics, and [`Tally`] reports each request exactly once and writes its log line (the
//! account, the model, tokens, status and outcome; never the prompt, the answer or a key).

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::error::ErrorKind;

/// Tokens an answer used, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Reads an OpenAI `usage` object; None unless it has both counts.
    pub(crate) fn from_json(usage: &Value) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: usage.get("prompt_tokens")?.as_u64()?,
            completion_tokens: usage.get("completion_tokens")?.as_u64()?,
        })
    }
}

/// Receives the proxy's counts. `model` is always one of the allowlist (or `-` for a request
/// refused before its model was known), so it is a bounded label.
pub trait Observer: Send + Sync + 'static {
    /// A request was admitted and sent upstream.
    fn request(&self, account: &str, model: &str);
    /// The upstream reported the tokens a request used.
    fn usage(&self, account: &str, model: &str, usage: Usage);
    /// A request was refused or failed.
    fn error(&self, account: &str, model: &str, kind: ErrorKind);
}

/// An observer that counts nothing.
pub struct NoObserver;

impl Observer for NoObserver {
    fn request(&self, _: &str, _: &str) {}
    fn usage(&self, _: &str, _: &str, _: Usage) {}
    fn error(&self, _: &str, _: &str, _: ErrorKind) {}
}

/// One sent request's report: made when it goes upstream, reported once when it ends, or when
/// it is dropped unfinished (the client went away: the upstream request is cancelled with it).
pub(crate) struct Tally {
    observer: Arc<dyn Observer>,
    account: String,
    model: String,
    stream: bool,
    started: Instant,
    pub status: u16,
    pub usage: Option<Usage>,
    pub outcome: Option<ErrorKind>,
    reported: bool,
}

impl Tally {
    pub fn start(observer: Arc<dyn Observer>, account: &str, model: &str, stream: bool) -> Self {
        observer.request(account, model);
        Self {
            observer,
            account: account.to_owned(),
            model: model.to_owned(),
            stream,
            started: Instant::now(),
            status: 0,
            usage: None,
            outcome: None,
            reported: false,
        }
    }

    /// Records the outcome (the first one recorded wins) and reports.
    pub fn finish(&mut self, outcome: Option<ErrorKind>) {
        if self.outcome.is_none() {
            self.outcome = outcome;
        }
        self.report();
    }

    fn report(&mut self) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        if let Some(usage) = self.usage {
            self.observer.usage(&self.account, &self.model, usage);
        }
        if let Some(kind) = self.outcome {
            self.observer.error(&self.account, &self.model, kind);
        }
        let usage = self.usage.unwrap_or_default();
        tracing::info!(
            account = %self.account,
            model = %self.model,
            stream = self.stream,
            status = self.status,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            outcome = self.outcome.map_or("ok", ErrorKind::as_str),
            "llm request"
        );
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.reported {
            self.finish(Some(ErrorKind::ClientDisconnected));
        }
    }
}
