//! Talking to the upstream: one request, its timeouts, and the answer, either whole or as a
//! stream of server-sent events passed through as they arrive.
//!
//! The stream reads the upstream only as fast as the client takes it, and owns the upstream
//! response: when the client goes away the server drops the stream, which drops the response,
//! which closes the upstream connection. No task outlives the client.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use reqwest::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorKind, LlmError};
use crate::observer::{Tally, Usage};
use crate::request::ChatRequest;
use crate::sse::{error_event, inspect, EventSplitter, Seen};
use crate::LlmProxy;

/// The largest error body of the upstream passed through to the client.
const MAX_ERROR_BODY: usize = 1024 * 1024;

/// The upstream's answer once it has started well.
pub enum Reply {
    /// A whole answer: a non-streamed request's, or a streamed request's that the upstream
    /// answered without server-sent events. Passed through with its status and content type.
    Complete { status: u16, content_type: Option<String>, body: Bytes },
    /// Server-sent events, passed through as they arrive.
    Stream(ChatStream),
}

impl LlmProxy {
    /// Sends a checked request upstream and waits for the start of its answer: an error status,
    /// a timeout or a failed connection before that is an [`LlmError`] (the client gets an HTTP
    /// status); after it, failures are told inside the stream. `cancel` ends a stream early (the
    /// server is shutting down).
    pub async fn send(&self, account: &str, req: ChatRequest, cancel: CancellationToken) -> Result<Reply, LlmError> {
        let mut tally = Tally::start(self.observer.clone(), account, &req.model, req.stream);
        match self.exchange(&req, &mut tally).await {
            Ok(Exchange::Complete { status, content_type, body }) => {
                tally.status = status;
                if (200..300).contains(&status) {
                    tally.usage = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v.get("usage").and_then(Usage::from_json));
                }
                tally.finish(None);
                Ok(Reply::Complete { status, content_type, body })
            }
            Ok(Exchange::Stream { response, first, content_type }) => {
                tally.status = 200;
                let pass = Passthrough {
                    response: Some(response),
                    first: Some(first),
                    splitter: EventSplitter::default(),
                    tally,
                    client_wants_usage: req.client_wants_usage,
                    idle: self.timeouts.idle,
                    max_event: self.limits.max_response_bytes,
                    cancel,
                    done: false,
                };
                let stream = futures_util::stream::unfold(pass, |mut pass| async move {
                    let item = pass.next().await?;
                    Some((item, pass))
                });
                Ok(Reply::Stream(ChatStream { content_type, inner: Box::pin(stream) }))
            }
            Err(e) => {
                tally.status = e.status();
                tally.finish(Some(e.kind()));
                Err(e)
            }
        }
    }

    async fn exchange(&self, req: &ChatRequest, tally: &mut Tally) -> Result<Exchange, LlmError> {
        let first_byte = self.timeouts.first_byte;
        let deadline = Instant::now() + first_byte;
        let mut request = self
            .client
            .post(self.chat_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, if req.stream { "text/event-stream" } else { "application/json" })
            .body(req.body.clone());
        if let Some(key) = &self.api_key {
            // Marked sensitive by reqwest: never shown by its Debug output.
            request = request.bearer_auth(key.expose());
        }
        let mut response = match timeout_at(deadline, request.send()).await {
            Err(_) => return Err(LlmError::FirstByteTimeout(first_byte)),
            Ok(Err(e)) => {
                let connect = e.is_connect();
                tracing::debug!(error = %e.without_url(), "LLM upstream request failed");
                return Err(if connect { LlmError::Connect } else { LlmError::UpstreamDisconnected });
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        tally.status = status.as_u16();
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if status.is_informational() || status.is_redirection() {
            return Err(LlmError::UpstreamInvalid("it answered with a redirect"));
        }
        if !status.is_success() {
            let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            // The body of an error, passed through when it is JSON (it explains the error).
            let body = self.read_all(&mut response, deadline, MAX_ERROR_BODY).await.ok();
            let body = body.filter(|b| serde_json::from_slice::<Value>(b).is_ok());
            return Err(LlmError::UpstreamStatus { status: status.as_u16(), body, retry_after });
        }
        let is_sse = content_type.as_deref().is_some_and(|c| c.trim_start().starts_with("text/event-stream"));
        if req.stream && is_sse {
            let first = match timeout_at(deadline, response.chunk()).await {
                Err(_) => return Err(LlmError::FirstByteTimeout(first_byte)),
                Ok(Err(_)) => return Err(LlmError::UpstreamDisconnected),
                // An empty stream: the passthrough says it ended before [DONE].
                Ok(Ok(first)) => first.unwrap_or_default(),
            };
            return Ok(Exchange::Stream { response, first, content_type });
        }
        let body = self.read_all(&mut response, deadline, self.limits.max_response_bytes).await?;
        Ok(Exchange::Complete { status: status.as_u16(), content_type, body })
    }

    /// Reads a whole body: its first bytes by `deadline`, then no gap longer than the idle
    /// timeout, at most `limit` bytes.
    async fn read_all(
        &self,
        response: &mut reqwest::Response,
        deadline: Instant,
        limit: usize,
    ) -> Result<Bytes, LlmError> {
        let mut body = BytesMut::new();
        let mut first = true;
        loop {
            let chunk = if first {
                timeout_at(deadline, response.chunk())
                    .await
                    .map_err(|_| LlmError::FirstByteTimeout(self.timeouts.first_byte))?
            } else {
                timeout(self.timeouts.idle, response.chunk())
                    .await
                    .map_err(|_| LlmError::IdleTimeout(self.timeouts.idle))?
            };
            first = false;
            match chunk.map_err(|_| LlmError::UpstreamDisconnected)? {
                Some(bytes) => {
                    if body.len() + bytes.len() > limit {
                        return Err(LlmError::UpstreamInvalid("its answer is larger than the limit"));
                    }
                    body.extend_from_slice(&bytes);
                }
                None => return Ok(body.freeze()),
            }
        }
    }
}

enum Exchange {
    Complete { status: u16, content_type: Option<String>, body: Bytes },
    Stream { response: reqwest::Response, first: Bytes, content_type: Option<String> },
}

/// The upstream's server-sent events as the client gets them: the upstream's bytes, cut at
/// event boundaries and otherwise unchanged (unknown fields, comments and `[DONE]` included),
/// each event forwarded as soon as it is complete. Two exceptions: the usage-only chunk the
/// proxy asked for on a client's behalf is not forwarded to a client that did not ask for it,
/// and a failure after the start (the upstream stalls, disconnects, ends without `[DONE]`, the
/// server shuts down) ends the stream with a `data: {"error":…}` event of the proxy's own.
/// Dropping it cancels the upstream request.
pub struct ChatStream {
    content_type: Option<String>,
    inner: Pin<Box<dyn Stream<Item = Bytes> + Send>>,
}

impl ChatStream {
    /// The upstream's content type (`text/event-stream…`).
    pub fn content_type(&self) -> &str {
        self.content_type.as_deref().unwrap_or("text/event-stream")
    }
}

impl Stream for ChatStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Passthrough {
    /// None once the stream is over: dropping the response closes the upstream connection.
    response: Option<reqwest::Response>,
    first: Option<Bytes>,
    splitter: EventSplitter,
    tally: Tally,
    client_wants_usage: bool,
    idle: Duration,
    max_event: usize,
    cancel: CancellationToken,
    done: bool,
}

enum Read {
    Chunk(reqwest::Result<Option<Bytes>>),
    Stalled,
    Cancelled,
}

impl Passthrough {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.done {
                return None;
            }
            let read = match self.first.take() {
                Some(first) => Read::Chunk(Ok(Some(first))),
                None => {
                    let response = self.response.as_mut()?;
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => Read::Cancelled,
                        r = timeout(self.idle, response.chunk()) => r.map_or(Read::Stalled, Read::Chunk),
                    }
                }
            };
            match read {
                Read::Chunk(Ok(Some(bytes))) => {
                    let events = self.splitter.push(&bytes);
                    let out = self.forward(events);
                    if self.splitter.pending() > self.max_event {
                        return Some(
                            self.fail(
                                ErrorKind::UpstreamInvalid,
                                "the LLM upstream sent an event larger than the limit",
                            ),
                        );
                    }
                    if !out.is_empty() {
                        return Some(out);
                    }
                }
                Read::Chunk(Ok(None)) => return self.end_of_stream(),
                Read::Chunk(Err(_)) => {
                    return Some(
                        self.fail(ErrorKind::UpstreamDisconnected, "the connection to the LLM upstream failed"),
                    )
                }
                Read::Stalled => {
                    let message = format!("the LLM upstream sent nothing for {:?}", self.idle);
                    return Some(self.fail(ErrorKind::IdleTimeout, &message));
                }
                Read::Cancelled => return Some(self.fail(ErrorKind::ShuttingDown, "the server is shutting down")),
            }
        }
    }

    /// The events to send on, in one buffer. Stops at `[DONE]`, which ends the stream.
    fn forward(&mut self, events: Vec<Bytes>) -> Bytes {
        let mut out = BytesMut::new();
        for event in events {
            match inspect(&event) {
                Seen::Done => {
                    out.extend_from_slice(&event);
                    self.done = true;
                    if let Some(response) = self.response.take() {
                        drain(response);
                    }
                    self.tally.finish(None);
                    break;
                }
                Seen::Error => {
                    if self.tally.outcome.is_none() {
                        self.tally.outcome = Some(ErrorKind::UpstreamStreamError);
                    }
                    out.extend_from_slice(&event);
                }
                Seen::Usage { usage, usage_only } => {
                    self.tally.usage = Some(usage);
                    if !usage_only || self.client_wants_usage {
                        out.extend_from_slice(&event);
                    }
                }
                Seen::Other => out.extend_from_slice(&event),
            }
        }
        out.freeze()
    }

    /// The upstream closed its stream. Without `[DONE]` (and without an error event of its own)
    /// the answer is cut short, and the client is told so.
    fn end_of_stream(&mut self) -> Option<Bytes> {
        let rest = self.splitter.finish();
        let had_rest = rest.is_some();
        let mut out = BytesMut::from(&self.forward(rest.into_iter().collect())[..]);
        if !self.done {
            self.done = true;
            self.response = None;
            if self.tally.outcome.is_none() {
                if had_rest {
                    out.extend_from_slice(b"\n\n");
                }
                out.extend_from_slice(&error_event(
                    "the LLM upstream ended the stream before [DONE]",
                    "upstream_truncated",
                ));
                self.tally.finish(Some(ErrorKind::UpstreamTruncated));
            } else {
                self.tally.finish(None);
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }

    /// Ends the stream with an error event of the proxy's own; what is left of an unfinished
    /// upstream event is dropped, and the upstream connection is closed.
    fn fail(&mut self, kind: ErrorKind, message: &str) -> Bytes {
        self.done = true;
        self.response = None;
        self.tally.finish(Some(kind));
        error_event(message, kind.as_str())
    }
}

/// Reads what is left of an answer after `[DONE]` (normally only the end of the chunked body),
/// so its connection goes back to the pool instead of being closed; gives up after a second.
fn drain(mut response: reqwest::Response) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let rest = async { while let Ok(Some(_)) = response.chunk().await {} };
            let _ = timeout(Duration::from_secs(1), rest).await;
        });
    }
}
