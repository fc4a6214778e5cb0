//! `moai wait-ready`: the design's `waitForServiceReady` (docs/protocols/design.md §2) as a command for scripts and
//! orchestration. Polls /health until it says `ready:true` (exit 0) or the timeout passes
//! (exit 1, saying what it last saw). A server that reports a failed initialisation fails the
//! wait at once: waiting longer cannot help.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::cli::WaitReadyArgs;

enum Seen {
    Ready,
    NotReady(String),
    Failed(String),
}

pub async fn run(args: WaitReadyArgs) -> anyhow::Result<ExitCode> {
    let uri = health_uri(&args.url)?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + args.timeout;
    let mut last;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = left.min(Duration::from_secs(2)).max(Duration::from_millis(50));
        match tokio::time::timeout(attempt, probe(&client, &uri)).await {
            Ok(Ok(Seen::Ready)) => {
                println!("moai wait-ready: {uri} is ready");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Ok(Seen::Failed(why))) => {
                eprintln!("moai wait-ready: {uri} reports initialisation failed: {why}");
                return Ok(ExitCode::FAILURE);
            }
            Ok(Ok(Seen::NotReady(what))) => last = what,
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = "request timed out".into(),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!(
                "moai wait-ready: {uri} not ready after {} (last: {last})",
                humantime::format_duration(args.timeout)
            );
            return Ok(ExitCode::FAILURE);
        }
        // The last pause is shortened so that one more probe happens at the deadline itself.
        tokio::time::sleep(args.interval.min(left)).await;
    }
}

/// Accepts a base URL ("http://host:4201") or the health URL itself.
fn health_uri(url: &str) -> anyhow::Result<Uri> {
    let uri: Uri = url.parse().with_context(|| format!("invalid URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("wait-ready speaks plain http (got {url:?}); probe a TLS endpoint through its local port");
    }
    if matches!(uri.path(), "" | "/") {
        let base = url.trim_end_matches('/');
        return format!("{base}/health").parse().context("building the /health URL");
    }
    Ok(uri)
}

async fn probe(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    uri: &Uri,
) -> anyhow::Result<Seen> {
    let resp = client.get(uri.clone()).await.map_err(|e| {
        // Surface "connection refused" rather than hyper's generic wrapper.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        let mut deepest = e.to_string();
        while let Some(s) = source {
            deepest = s.to_string();
            source = s.source();
        }
        anyhow::anyhow!(deepest)
    })?;
    let status = resp.status();
    let body = resp.into_body().collect().await.context("reading /health")?.to_bytes();
    let json: serde_json::Value =
        serde_json::from_slice(&body).with_context(|| format!("HTTP {status}: /health did not answer JSON"))?;
    if json["ready"] == serde_json::Value::Bool(true) {
        return Ok(Seen::Ready);
    }
    if json["status"] == "error" {
        return Ok(Seen::Failed(json["error"].as_str().unwrap_or("unknown error").to_owned()));
    }
    Ok(Seen::NotReady(format!("HTTP {status}, ready:false")))
}
