//! The LLM proxy (docs/llm-proxy.md) against the real binary and a fake upstream started by each
//! test: a small HTTP server that answers whole completions, streams chunks (holding the rest
//! until the test says go), stalls, fails mid-stream, drops its connection, and answers 429 and
//! 500. Nothing here reaches the internet.
//!
//! The upstream's behaviour is chosen per request by the field `x_scenario` of the request body,
//! which the proxy forwards like any field it does not know.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use moai_server::auth::Claims;
use moai_server::Auth;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

use support::Server;

const SECRET: &str = "llm-test-secret";
/// The upstream key: must reach the upstream and never a log line.
const KEY: &str = "sk-upstream-key-5f1e2d";
/// In every prompt: must never reach a log line.
const PROMPT: &str = "PROMPT-MARKER-93c1 tell me a secret";
/// In every streamed answer.
const ANSWER: &str = "ANSWER-MARKER-7d2a";

// ---------------------------------------------------------------------------------------------
// The fake upstream

#[derive(Clone, Debug)]
struct Received {
    path: String,
    authorization: Option<String>,
    body: Value,
}

#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    go: Arc<Notify>,
    events: mpsc::UnboundedSender<&'static str>,
}

struct Fake {
    addr: SocketAddr,
    shared: Shared,
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<&'static str>>,
}

type FakeBody = UnsyncBoxBody<Bytes, std::io::Error>;

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Shared { received: Arc::default(), go: Arc::new(Notify::new()), events: tx };
        let serving = shared.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = serving.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Fake { addr, shared, events: tokio::sync::Mutex::new(rx) }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Lets a held stream ("hold") send the rest of its answer.
    fn release(&self) {
        self.shared.go.notify_one();
    }

    /// The next thing the upstream noticed ("closed": a held stream's connection was closed by
    /// the proxy before the test released it).
    async fn event(&self, within: Duration) -> Option<&'static str> {
        tokio::time::timeout(within, self.events.lock().await.recv()).await.ok().flatten()
    }

    fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

fn full(status: u16, body: Value, headers: &[(&str, &str)]) -> Response<FakeBody> {
    let mut b = Response::builder().status(status).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = Full::new(Bytes::from(body.to_string())).map_err(|never: Infallible| match never {}).boxed_unsync();
    b.body(body).unwrap()
}

fn chunk(model: &str, text: &str) -> String {
    let c = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "obfuscation": "q1w2e3",
        "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": null }],
        "usage": null,
    });
    format!("data: {c}\n\n")
}

fn usage_chunk(model: &str) -> String {
    let c = json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [], "usage": { "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18 },
    });
    format!("data: {c}\n\n")
}

fn completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-whole", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": ANSWER }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8 },
        "system_fingerprint": "fp_fake",
    })
}

impl Shared {
    async fn answer(self, req: Request<Incoming>) -> Response<FakeBody> {
        let path = req.uri().path().to_owned();
        let authorization = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
        let raw = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        self.received.lock().unwrap().push(Received { path, authorization, body: body.clone() });
        let streamed = body["stream"] == true;
        let scenario = body["x_scenario"].as_str().unwrap_or(if streamed { "stream" } else { "complete" }).to_owned();
        let model = body["model"].as_str().unwrap_or_default().to_owned();
        match scenario.as_str() {
            "complete" => full(200, completion(&model), &[]),
            "429" => full(
                429,
                json!({ "error": { "message": "upstream rate limit", "type": "requests", "code": "rate_limit_exceeded" } }),
                &[("retry-after", "7"), ("x-ratelimit-remaining-requests", "0")],
            ),
            "500" => full(500, json!({ "error": { "message": "upstream exploded", "type": "server_error" } }), &[]),
            "stall_headers" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                full(200, completion(&model), &[])
            }
            _ => self.stream(scenario, model, body["stream_options"]["include_usage"] == true),
        }
    }

    fn stream(self, scenario: String, model: String, include_usage: bool) -> Response<FakeBody> {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        let body = StreamBody::new(frames).boxed_unsync();
        tokio::spawn(async move {
            let send = |s: String| {
                let tx = tx.clone();
                async move { tx.send(Ok(Frame::data(Bytes::from(s)))).await.is_ok() }
            };
            // Waits for the test's go; false if the proxy closed the connection first.
            let held = |tx: mpsc::Sender<_>, go: Arc<Notify>, events: mpsc::UnboundedSender<&'static str>| async move {
                tokio::select! {
                    _ = go.notified() => true,
                    _ = tx.closed() => {
                        let _ = events.send("closed");
                        false
                    }
                }
            };
            send(chunk(&model, &format!("{ANSWER} part one"))).await;
            match scenario.as_str() {
                "stream" | "hold" | "no_done" => {
                    if scenario == "hold" && !held(tx.clone(), self.go.clone(), self.events.clone()).await {
                        return;
                    }
                    send(chunk(&model, " part two")).await;
                    if include_usage {
                        send(usage_chunk(&model)).await;
                    }
                    if scenario != "no_done" {
                        send("data: [DONE]\n\n".to_owned()).await;
                    }
                }
                "error_mid" => {
                    send(
                        "data: {\"error\":{\"message\":\"upstream broke mid-stream\",\"type\":\"server_error\"}}\n\n"
                            .into(),
                    )
                    .await;
                }
                "drop_mid" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(Err(std::io::Error::other("connection dropped"))).await;
                }
                "stall_mid" => {
                    held(tx.clone(), self.go.clone(), self.events.clone()).await;
                }
                other => panic!("unknown scenario {other}"),
            }
        });
        Response::builder().status(200).header("content-type", "text/event-stream; charset=utf-8").body(body).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The client

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Incoming,
    conn: tokio::task::JoinHandle<()>,
    _sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        sender.send_request(req.body(Full::new(Bytes::copy_from_slice(body))).unwrap()),
    )
    .await
    .expect("response headers in time")
    .unwrap();
    let (parts, body) = resp.into_parts();
    Reply { status: parts.status.as_u16(), headers: parts.headers, body, conn, _sender: sender }
}

async fn chat(server: &Server, token: Option<&str>, body: Value) -> Reply {
    chat_at(server, "/v1/chat/completions", token, body).await
}

async fn chat_at(server: &Server, path: &str, token: Option<&str>, body: Value) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    call(server.addr, "POST", path, &headers, body.to_string().as_bytes()).await
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The next data of the body; None at its end.
    async fn next_data(&mut self, within: Duration) -> Option<Bytes> {
        loop {
            let frame = tokio::time::timeout(within, self.body.frame()).await.expect("body data in time")?;
            if let Ok(data) = frame.expect("body readable").into_data() {
                return Some(data);
            }
        }
    }

    async fn text(mut self) -> String {
        let mut out = Vec::new();
        while let Some(data) = self.next_data(Duration::from_secs(20)).await {
            out.extend_from_slice(&data);
        }
        String::from_utf8(out).unwrap()
    }

    async fn json(self) -> Value {
        let text = self.text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Closes the connection, as a client that goes away does.
    fn disconnect(self) {
        self.conn.abort();
    }
}

fn request(extra: Value) -> Value {
    let mut body = json!({ "messages": [{ "role": "user", "content": PROMPT }] });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn token(f: impl FnOnce(&mut Claims)) -> String {
    let mut c = Claims { sub: "alice".into(), llm: true, ..Claims::default() };
    f(&mut c);
    Auth::with_secret(SECRET).mint(&c).unwrap()
}

fn token_for(user: &str) -> String {
    token(|c| c.sub = user.into())
}

/// moai with a secret, proxying to `fake` with the allowlist `model-a,model-b`, plus `extra`.
fn moai(fake: &Fake, extra: &[&str]) -> Server {
    moai_with_env(fake, extra, &[])
}

fn moai_with_env(fake: &Fake, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let base = fake.base_url();
    let mut args = vec!["--sync-shared-secret", SECRET, "--llm-base-url", &base, "--llm-models", "model-a,model-b"];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    if !env.iter().any(|(k, _)| *k == "RED_PILL_API_KEY") {
        env.push(("MOAI_LLM_API_KEY", KEY));
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    Server::start_with_env(dir, &db, &args, &env)
}

fn metrics(server: &Server) -> String {
    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    body
}

/// The value of one sample, e.g. `moai_llm_requests_total{account="alice",model="model-a"}`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn error_event(text: &str) -> Value {
    let line = text
        .lines()
        .find(|l| l.starts_with("data: {\"error\""))
        .unwrap_or_else(|| panic!("no error event in {text:?}"));
    serde_json::from_str(&line["data: ".len()..]).unwrap()
}

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Streaming

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_arrives_chunk_by_chunk_and_its_usage_is_counted() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let alice = token_for("alice");

    let mut reply = chat(&server, Some(&alice), request(json!({ "stream": true, "x_scenario": "hold" }))).await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("text/event-stream"));
    assert_eq!(reply.header("x-accel-buffering"), Some("no"));
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
    assert_eq!(reply.header("x-ratelimit-limit-requests"), Some("60"));
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("59"));
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("200000"));
    // The upstream holds the rest of its answer until we say go: whatever arrives now was
    // forwarded while the upstream's response was still open.
    let mut seen = String::new();
    while !seen.contains("part one") {
        let data = reply.next_data(T).await.expect("the first chunk before the upstream finished");
        seen.push_str(std::str::from_utf8(&data).unwrap());
    }
    assert!(!seen.contains("part two") && !seen.contains("[DONE]"), "{seen}");
    fake.release();
    seen.push_str(&reply.text().await);
    assert!(seen.contains(" part two"), "{seen}");
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
    // Unknown fields pass through; the usage chunk moai asked for is not forwarded to a client
    // that did not ask for it.
    assert!(seen.contains(r#""obfuscation":"q1w2e3""#), "{seen}");
    assert!(!seen.contains("prompt_tokens"), "{seen}");
    let events: Vec<&str> = seen.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{seen}");

    // What went upstream: the server's key (not the caller's token), the default model, usage
    // asked for, max_tokens set, unknown fields kept.
    let sent = fake.received().pop().unwrap();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(sent.body["model"], "model-a");
    assert_eq!(sent.body["stream_options"]["include_usage"], true);
    assert_eq!(sent.body["max_tokens"], 4096);
    assert_eq!(sent.body["x_scenario"], "hold");
    assert_eq!(sent.body["messages"][0]["content"], PROMPT);

    // A client that asks for usage gets the usage chunk.
    let reply = chat(
        &server,
        Some(&alice),
        request(json!({ "stream": true, "stream_options": { "include_usage": true }, "model": "model-b" })),
    )
    .await;
    let text = reply.text().await;
    assert!(text.contains(r#""usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}"#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));

    let m = metrics(&server);
    assert_eq!(sample(&m, r#"moai_llm_requests_total{account="alice",model="model-a"}"#), Some(1.0), "{m}");
    assert_eq!(sample(&m, r#"moai_llm_prompt_tokens_total{account="alice",model="model-a"}"#), Some(11.0));
    assert_eq!(sample(&m, r#"moai_llm_completion_tokens_total{account="alice",model="model-a"}"#), Some(7.0));
    assert_eq!(sample(&m, r#"moai_llm_prompt_tokens_total{account="alice",model="model-b"}"#), Some(11.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_answers_and_upstream_errors_pass_through_with_their_status() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let bob = token_for("bob");

    for path in ["/v1/chat/completions", "/api/v0/llm/chat"] {
        let reply = chat_at(&server, path, Some(&bob), request(json!({ "temperature": 1 }))).await;
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(reply.json().await, completion("model-a"), "{path}: the upstream's answer, unchanged");
    }

    // Before the first byte the upstream's status and body come back as they were, streamed or not.
    for stream in [false, true] {
        let reply = chat(&server, Some(&bob), request(json!({ "stream": stream, "x_scenario": "429" }))).await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("7"));
        // The upstream's own limits describe the server's key, not this caller: not passed on.
        assert_ne!(reply.header("x-ratelimit-remaining-requests"), Some("0"));
        let body = reply.json().await;
        assert_eq!(body["error"]["message"], "upstream rate limit");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");

        let reply = chat(&server, Some(&bob), request(json!({ "stream": stream, "x_scenario": "500" }))).await;
        assert_eq!(reply.status, 500);
        assert_eq!(reply.json().await, json!({ "error": { "message": "upstream exploded", "type": "server_error" } }));
    }

    let m = metrics(&server);
    assert_eq!(sample(&m, r#"moai_llm_requests_total{account="bob",model="model-a"}"#), Some(6.0), "{m}");
    assert_eq!(sample(&m, r#"moai_llm_prompt_tokens_total{account="bob",model="model-a"}"#), Some(10.0));
    assert_eq!(sample(&m, r#"moai_llm_completion_tokens_total{account="bob",model="model-a"}"#), Some(6.0));
    assert_eq!(sample(&m, r#"moai_llm_errors_total{account="bob",model="model-a",kind="upstream_status"}"#), Some(4.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_after_the_first_byte_end_the_stream_with_an_error_event() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let carol = token_for("carol");

    // The upstream's own error event is passed through.
    let reply = chat(&server, Some(&carol), request(json!({ "stream": true, "x_scenario": "error_mid" }))).await;
    assert_eq!(reply.status, 200);
    let text = reply.text().await;
    assert!(text.contains("part one"), "{text}");
    assert_eq!(error_event(&text)["error"]["message"], "upstream broke mid-stream");
    assert!(!text.contains("[DONE]"));

    // The upstream's connection breaks: moai says so in an event of its own.
    let reply = chat(&server, Some(&carol), request(json!({ "stream": true, "x_scenario": "drop_mid" }))).await;
    assert_eq!(reply.status, 200);
    let text = reply.text().await;
    assert!(text.contains("part one"), "{text}");
    assert_eq!(error_event(&text)["error"]["code"], "upstream_disconnected", "{text}");

    // The upstream ends without [DONE].
    let reply = chat(&server, Some(&carol), request(json!({ "stream": true, "x_scenario": "no_done" }))).await;
    let text = reply.text().await;
    assert!(text.contains("part two"), "{text}");
    assert_eq!(error_event(&text)["error"]["code"], "upstream_truncated", "{text}");

    let m = metrics(&server);
    for kind in ["upstream_stream_error", "upstream_disconnected", "upstream_truncated"] {
        let series = format!(r#"moai_llm_errors_total{{account="carol",model="model-a",kind="{kind}"}}"#);
        assert_eq!(sample(&m, &series), Some(1.0), "{series}\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_upstream_request() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let dave = token_for("dave");

    let mut reply = chat(&server, Some(&dave), request(json!({ "stream": true, "x_scenario": "hold" }))).await;
    assert_eq!(reply.status, 200);
    reply.next_data(T).await.expect("first chunk");
    reply.disconnect();
    // The upstream, still holding the rest of its answer, sees its connection closed.
    assert_eq!(fake.event(T).await, Some("closed"));

    let deadline = Instant::now() + T;
    let series = r#"moai_llm_errors_total{account="dave",model="model-a",kind="client_disconnected"}"#;
    while sample(&metrics(&server), series) != Some(1.0) {
        assert!(Instant::now() < deadline, "{}", metrics(&server));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_times_out_before_and_after_the_first_byte() {
    let fake = Fake::start().await;
    let server = moai(&fake, &["--llm-first-byte-timeout", "300ms", "--llm-idle-timeout", "300ms"]);
    let erin = token_for("erin");

    let started = Instant::now();
    let reply = chat(&server, Some(&erin), request(json!({ "x_scenario": "stall_headers" }))).await;
    assert_eq!(reply.status, 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    let body = reply.json().await;
    assert_eq!(body["code"], "first_byte_timeout");
    assert_eq!(body["status"], 504);

    let reply = chat(&server, Some(&erin), request(json!({ "stream": true, "x_scenario": "stall_mid" }))).await;
    assert_eq!(reply.status, 200);
    let text = reply.text().await;
    assert!(text.contains("part one"), "{text}");
    assert_eq!(error_event(&text)["error"]["code"], "idle_timeout", "{text}");
    // moai closed the stalled upstream connection.
    assert_eq!(fake.event(T).await, Some("closed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_at_shutdown_ends_with_an_error_event() {
    let fake = Fake::start().await;
    let mut server = moai(&fake, &[]);
    // (A signal during initialisation exits at once, without the graceful shutdown.)
    tokio::task::block_in_place(|| server.wait_ready());
    let mut reply =
        chat(&server, Some(&token_for("fay")), request(json!({ "stream": true, "x_scenario": "hold" }))).await;
    reply.next_data(T).await.expect("first chunk");
    server.signal("TERM");
    let text = reply.text().await;
    assert_eq!(error_event(&text)["error"]["code"], "shutting_down", "{text}");
    assert_eq!(fake.event(T).await, Some("closed"));
    let status = tokio::task::block_in_place(|| server.wait_exit(T)).expect("moai exits");
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// Limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_429_with_retry_after_413_and_400() {
    let fake = Fake::start().await;
    let server = moai(
        &fake,
        &[
            "--llm-requests-per-minute",
            "2",
            "--llm-tokens-per-minute",
            "1200",
            "--llm-max-tokens",
            "1000",
            "--llm-max-request-bytes",
            "2KiB",
            "--llm-max-messages",
            "3",
        ],
    );
    let alice = token_for("alice");
    let small = || request(json!({ "max_tokens": 10 }));

    let first = chat(&server, Some(&alice), small()).await;
    assert_eq!((first.status, first.header("x-ratelimit-remaining-requests")), (200, Some("1")));
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("1200"));
    let second = chat(&server, Some(&alice), small()).await;
    assert_eq!((second.status, second.header("x-ratelimit-remaining-requests")), (200, Some("0")));
    let third = chat(&server, Some(&alice), small()).await;
    assert_eq!(third.status, 429);
    let wait: u64 = third.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    assert_eq!(third.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(third.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(third.header("x-ratelimit-reset-requests").unwrap().ends_with('s'));
    assert_eq!(third.json().await["code"], "rate_limited_requests");
    // Another account has its own limits.
    assert_eq!(chat(&server, Some(&token_for("bob")), small()).await.status, 200);

    // Tokens are charged by the request's budget (prompt estimate + max_tokens).
    let carol = token_for("carol");
    let big = || request(json!({ "max_tokens": 1000 }));
    assert_eq!(chat(&server, Some(&carol), big()).await.status, 200);
    let refused = chat(&server, Some(&carol), big()).await;
    assert_eq!(refused.status, 429);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1200"));
    assert_eq!(refused.json().await["code"], "rate_limited_tokens");
    // A request that could never fit in a minute's tokens is a bad request, not "retry later".
    let padded = request(json!({ "max_tokens": 1000, "pad": "x".repeat(1500) }));
    let never = chat(&server, Some(&token_for("dave")), padded).await;
    assert_eq!(never.status, 400);
    assert_eq!(never.json().await["code"], "over_token_limit");

    let erin = token_for("erin");
    let too_big = chat(&server, Some(&erin), request(json!({ "pad": "x".repeat(3000) }))).await;
    assert_eq!(too_big.status, 413);
    let body = too_big.json().await;
    assert_eq!((body["status"].clone(), body["code"].clone()), (json!(413), json!("request_too_large")));

    let four = json!({ "messages": [{"role":"user","content":"1"},{"role":"user","content":"2"},{"role":"user","content":"3"},{"role":"user","content":"4"}] });
    for (body, code, needle) in [
        (four, "too_many_messages", "at most 3"),
        (json!({ "messages": [] }), "bad_request", "messages array required"),
        (json!({ "model": "model-a" }), "bad_request", "messages array required"),
        (request(json!({ "max_tokens": 1001 })), "max_tokens_too_large", "1000"),
    ] {
        let reply = chat(&server, Some(&erin), body.clone()).await;
        assert_eq!(reply.status, 400, "{body}");
        let answer = reply.json().await;
        assert_eq!(answer["code"], code, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains(needle), "{answer}");
    }
    let not_json =
        call(server.addr, "POST", "/v1/chat/completions", &[("authorization", &format!("Bearer {erin}"))], b"{nope")
            .await;
    assert_eq!(not_json.status, 400);

    // None of the refused requests reached the upstream: 2 for alice, 1 for bob, 1 for carol.
    assert_eq!(fake.received().len(), 4);
    let m = metrics(&server);
    assert_eq!(
        sample(&m, r#"moai_llm_errors_total{account="alice",model="model-a",kind="rate_limited_requests"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"moai_llm_errors_total{account="carol",model="model-a",kind="rate_limited_tokens"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&m, r#"moai_llm_errors_total{account="erin",model="-",kind="request_too_large"}"#), Some(1.0));
    assert_eq!(sample(&m, r#"moai_llm_errors_total{account="erin",model="-",kind="too_many_messages"}"#), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_models_are_proxied_and_the_default_fills_in() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let alice = token_for("alice");

    let models = call(server.addr, "GET", "/v1/models", &[("authorization", &format!("Bearer {alice}"))], b"").await;
    assert_eq!(models.status, 200);
    let list = models.json().await;
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["model-a", "model-b"]);
    assert_eq!(list["object"], "list");
    assert_eq!(list["default"], "model-a");
    assert_eq!(call(server.addr, "GET", "/v1/models", &[], b"").await.status, 401);

    let refused = chat(&server, Some(&alice), request(json!({ "model": "gpt-expensive" }))).await;
    assert_eq!(refused.status, 400);
    let body = refused.json().await;
    assert_eq!(body["code"], "model_not_allowed");
    assert!(body["error"].as_str().unwrap().contains("gpt-expensive"));

    assert_eq!(chat(&server, Some(&alice), request(json!({ "model": "model-b" }))).await.status, 200);
    assert_eq!(chat(&server, Some(&alice), request(json!({}))).await.status, 200);
    let models: Vec<Value> = fake.received().iter().map(|r| r.body["model"].clone()).collect();
    assert_eq!(models, [json!("model-b"), json!("model-a")]);
}

// ---------------------------------------------------------------------------------------------
// Auth and configuration

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_token_that_opens_the_proxy() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let body = request(json!({}));

    let none = chat(&server, None, body.clone()).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert_eq!(none.json().await, json!({ "error": "missing token", "status": 401 }));
    assert_eq!(chat(&server, Some("alice:00ff"), body.clone()).await.status, 401);
    let foreign =
        Auth::with_secret("another-secret").mint(&Claims { sub: "alice".into(), ..Claims::default() }).unwrap();
    assert_eq!(chat(&server, Some(&foreign), body.clone()).await.status, 401);

    // Deny by default: a token scoped to other resources does not open the proxy.
    let docs_only = token(|c| {
        c.llm = false;
        c.docs = Some(vec!["*".into()]);
    });
    let refused = chat(&server, Some(&docs_only), body.clone()).await;
    assert_eq!(refused.status, 403);
    assert!(refused.json().await["error"].as_str().unwrap().contains("--llm"));
    let expired = token(|c| c.exp = Some(1));
    assert_eq!(chat(&server, Some(&expired), body.clone()).await.status, 403);

    let jazz = call(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Jazz co_zAccount_signature")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(jazz.status, 401);
    assert!(jazz.json().await["error"].as_str().unwrap().contains("not a Jazz auth token"));
    assert!(fake.received().is_empty(), "no refused call reached the upstream");

    // A plain token opens everything, the proxy included; a scoped one must name it.
    let plain = Auth::with_secret(SECRET).mint(&Claims { sub: "paul".into(), ..Claims::default() }).unwrap();
    assert!(!plain.starts_with("mt2."));
    assert_eq!(chat(&server, Some(&plain), body.clone()).await.status, 200);
    let scoped = token(|c| {
        c.sub = "sam".into();
        c.docs = Some(vec!["notes".into()]);
        c.exp = Some(4_000_000_000);
    });
    assert_eq!(chat(&server, Some(&scoped), body.clone()).await.status, 200);
    // The query parameter works as on every other endpoint.
    let path = format!("/v1/chat/completions?token={}", token_for("quinn"));
    assert_eq!(chat_at(&server, &path, None, body).await.status, 200);

    let m = metrics(&server);
    for account in ["paul", "sam", "quinn"] {
        let series = format!(r#"moai_llm_requests_total{{account="{account}",model="model-a"}}"#);
        assert_eq!(sample(&m, &series), Some(1.0), "{series}\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_runs_the_proxy_only_when_told_to() {
    let fake = Fake::start().await;
    let base = fake.base_url();
    let open = ["--llm-base-url", base.as_str(), "--llm-models", "model-a"];

    let server = Server::start(&open);
    assert!(server.wait_log("LLM proxy NOT started", T).is_some(), "{:?}", server.logs());
    let reply = chat(&server, None, request(json!({}))).await;
    assert_eq!(reply.status, 404);
    assert!(reply.json().await["error"].as_str().unwrap().contains("SYNC_SHARED_SECRET"));
    assert_eq!(call(server.addr, "GET", "/v1/models", &[], b"").await.status, 404);
    drop(server);

    let mut allowed = open.to_vec();
    allowed.push("--llm-allow-open");
    let server = Server::start(&allowed);
    assert!(server.wait_log("LLM proxy OPEN", T).is_some());
    let reply = chat(&server, None, request(json!({}))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json().await["usage"]["completion_tokens"], 3);
    let m = metrics(&server);
    assert_eq!(sample(&m, r#"moai_llm_requests_total{account="ip:127.0.0.1",model="model-a"}"#), Some(1.0), "{m}");
    assert!(fake.received()[0].authorization.is_none(), "no key configured, none sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_off_unless_configured_and_reads_red_pill_api_key() {
    let server = Server::start(&["--sync-shared-secret", SECRET]);
    let alice = token_for("alice");
    for (method, path) in [("POST", "/v1/chat/completions"), ("POST", "/api/v0/llm/chat"), ("GET", "/v1/models")] {
        let reply = call(server.addr, method, path, &[("authorization", &format!("Bearer {alice}"))], b"{}").await;
        assert_eq!(reply.status, 404, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json().await;
        assert_eq!(body["status"], 404);
        assert!(body["error"].as_str().unwrap().contains("not enabled"), "{body}");
    }
    drop(server);

    // The original's variable alone: its upstream and default model (not called here).
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let server =
        Server::start_with_env(dir, &db, &["--sync-shared-secret", SECRET], &[("RED_PILL_API_KEY", "rp-key-1234")]);
    let line = server.wait_log("LLM proxy enabled", T).expect("enabled");
    assert!(line.contains("https://api.redpill.ai/v1"), "{line}");
    assert!(!line.contains("rp-key-1234"), "{line}");
    let models = call(server.addr, "GET", "/v1/models", &[("authorization", &format!("Bearer {alice}"))], b"").await;
    assert_eq!(models.json().await["default"], "qwen/qwen3-30b-a3b-instruct-2507");
    drop(server);

    // With a base URL, RED_PILL_API_KEY is the key sent upstream.
    let fake = Fake::start().await;
    let server = moai_with_env(&fake, &[], &[("RED_PILL_API_KEY", "rp-key-1234")]);
    assert_eq!(chat(&server, Some(&alice), request(json!({}))).await.status, 200);
    assert_eq!(fake.received()[0].authorization.as_deref(), Some("Bearer rp-key-1234"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_may_call_the_proxy() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    let preflight = call(
        server.addr,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization,content-type,x-stainless-os"),
        ],
        b"",
    )
    .await;
    assert_eq!(preflight.status, 200);
    assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
    let allowed = preflight.header("access-control-allow-headers").unwrap().to_owned();
    assert!(allowed.contains("authorization") && allowed.contains("x-stainless-os"), "{allowed}");

    let alice = token_for("alice");
    let reply = call(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[("origin", "https://app.example"), ("authorization", &format!("Bearer {alice}"))],
        request(json!({})).to_string().as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert!(reply.header("access-control-expose-headers").unwrap().contains("x-ratelimit-remaining-requests"));
    drop(server);

    let server = moai(&fake, &["--llm-cors-origins", "https://app.example"]);
    for (origin, allowed) in [("https://app.example", true), ("https://evil.example", false)] {
        let reply = call(
            server.addr,
            "OPTIONS",
            "/v1/models",
            &[("origin", origin), ("access-control-request-method", "GET")],
            b"",
        )
        .await;
        assert_eq!(reply.header("access-control-allow-origin").is_some(), allowed, "{origin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_show_prompts_answers_keys_or_tokens() {
    let fake = Fake::start().await;
    let server = moai_with_env(&fake, &[], &[("RUST_LOG", "trace")]);
    let alice = token_for("alice");
    let sig = alice.rsplit_once('.').unwrap().1.to_owned();

    let reply = chat(&server, Some(&alice), request(json!({ "stream": true }))).await;
    assert!(reply.text().await.contains(ANSWER));
    assert!(chat(&server, Some(&alice), request(json!({}))).await.json().await.to_string().contains(ANSWER));
    assert_eq!(chat(&server, Some(&alice), request(json!({ "x_scenario": "500" }))).await.status, 500);
    assert_eq!(chat(&server, Some(&alice), request(json!({ "model": PROMPT }))).await.status, 400);
    let path = format!("/v1/chat/completions?token={alice}");
    assert_eq!(chat_at(&server, &path, None, request(json!({}))).await.status, 200);
    let forged = format!("{}0", &alice[..alice.len() - 1]);
    assert_eq!(chat(&server, Some(&forged), request(json!({}))).await.status, 401);

    // Every request left its line; the log holds none of the secrets.
    assert!(server.wait_log_where(|l| l.contains("llm request") && l.contains("upstream_status"), T).is_some());
    // The last request's line is written after its answer: wait until all of them are there.
    let deadline = std::time::Instant::now() + T;
    let count = |logs: &[String]| logs.iter().filter(|l| l.contains("\"llm request\"")).count();
    while count(&server.logs()) < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let logs = server.logs();
    assert!(count(&logs) >= 4, "{logs:#?}");
    assert!(logs.len() > 20, "trace logging is on: {}", logs.len());
    for line in &logs {
        for secret in [PROMPT, "PROMPT-MARKER", ANSWER, KEY, sig.as_str(), SECRET] {
            assert!(!line.contains(secret), "{secret:?} logged: {line}");
        }
    }
}

/// A Jazz account calls the proxy with a Jazz auth token (what jazz-tools' `generateAuthToken`
/// makes); its usage is counted under its account id. A token of an account this server does
/// not store is refused.
#[tokio::test]
async fn a_jazz_account_calls_the_proxy_with_its_auth_token() {
    let fake = Fake::start().await;
    let server = moai(&fake, &[]);
    server.wait_ready();
    // A plain token: it opens CoJSON (a token scoped to the proxy alone would not).
    let plain = Auth::with_secret(SECRET).mint(&Claims { sub: "app".into(), ..Claims::default() }).unwrap();
    let sync = format!("{}?token={plain}", server.ws_url("/sync"));
    let (account, jazz_token, stranger) = tokio::task::spawn_blocking(move || {
        let mut c = support::node_driver::NodeDriver::cojson();
        let account =
            c.call("createAccount", json!({"name": "ann", "url": sync}))["accountId"].as_str().unwrap().to_owned();
        let jazz_token = c.call("authToken", json!({"name": "ann"}))["token"].as_str().unwrap().to_owned();
        // An account created on another server (never synced here): unknown to this one.
        let other = Server::start(&[]);
        other.wait_ready();
        c.call("createAccount", json!({"name": "eve", "url": other.ws_url("/sync")}));
        let stranger = c.call("authToken", json!({"name": "eve"}))["token"].as_str().unwrap().to_owned();
        (account, jazz_token, stranger)
    })
    .await
    .unwrap();
    let body = request(json!({}));
    let auth = format!("Jazz {jazz_token}");
    let ok = call(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", auth.as_str())],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(ok.status, 200);
    let m = metrics(&server);
    assert!(m.contains(&format!("account=\"{account}\"")), "usage counted under the Jazz account");
    let auth = format!("Jazz {stranger}");
    let refused = call(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[("authorization", auth.as_str())],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 401);
    assert!(refused.json().await["error"].as_str().unwrap().contains("not known"));
}
