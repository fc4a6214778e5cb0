//! Webhooks: a signed, debounced POST to `--webhook-url` when a Yjs document or a CoValue is
//! created or changed (docs/webhooks.md). Hocuspocus' webhook extension is the model.
//!
//! Never in the way of sync: the engines report durable changes through [`ChangeObserver`],
//! which only records them in a bounded table under a short lock ([`pending`]); one task sends
//! what is due, a few requests at a time, each with a timeout, and retries failures with
//! backoff (1 s doubling to 5 min, at most `max_attempts`). A receiver that is down or slow
//! delays webhooks, never an edit.

mod delivery;
mod pending;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moai_storage::{ChangeKind, ChangeObserver};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::{Metrics, Shutdown};
use delivery::Outcome;
use pending::{Due, Key, Pending};

/// How webhooks are sent.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    /// The HMAC key of `X-Moai-Signature`.
    pub secret: String,
    /// Quiet time after the last change of an id before it is reported.
    pub debounce: Duration,
    /// Longest an id that keeps changing waits to be reported.
    pub max_wait: Duration,
    /// Per request.
    pub timeout: Duration,
    /// Attempts per delivery before it is given up (logged and counted).
    pub max_attempts: u32,
    /// Ids waiting to be reported at most; changes of more are dropped and counted.
    pub capacity: usize,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Names this instance in the body (cluster).
    pub instance: String,
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> Self {
        WebhookConfig {
            url: url.into(),
            secret: secret.into(),
            debounce: Duration::from_secs(2),
            max_wait: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
            max_attempts: 10,
            capacity: 10_000,
            concurrency: 4,
            instance: String::new(),
        }
    }
}

/// Receives the engines' changes; see the module docs.
pub struct Webhooks {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl ChangeObserver for Webhooks {
    fn changed(&self, kind: ChangeKind, id: &str, created: bool) {
        let key = Key { kind, id: id.to_owned() };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).changed(key, created, Instant::now());
        self.wake.notify_one();
    }
}

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl Webhooks {
    /// Starts the sending task; the returned observer goes into the engines' configurations.
    pub fn start(config: WebhookConfig, metrics: Arc<Metrics>, shutdown: Shutdown) -> Arc<Webhooks> {
        let hooks = Arc::new(Webhooks {
            pending: Mutex::new(Pending::new(config.debounce, config.max_wait, config.capacity)),
            wake: Notify::new(),
        });
        moai_storage::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build();
        match client {
            Ok(client) => {
                tokio::spawn(run(hooks.clone(), Arc::new(config), client, metrics, shutdown));
            }
            Err(e) => tracing::error!(error = %e, "webhooks disabled: cannot build the HTTP client"),
        }
        hooks
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn run(
    hooks: Arc<Webhooks>,
    config: Arc<WebhookConfig>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut reported_dropped = 0;
    loop {
        let next = hooks.lock().next_due();
        tokio::select! {
            _ = shutdown.token().cancelled() => return,
            _ = hooks.wake.notified() => {}
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let (due, dropped) = {
            let mut pending = hooks.lock();
            (pending.take_due(Instant::now(), slots.available_permits()), pending.dropped)
        };
        if dropped > reported_dropped {
            metrics.webhook("dropped", dropped - reported_dropped);
            tracing::warn!(dropped = dropped - reported_dropped, "webhook table full; changes not reported");
            reported_dropped = dropped;
        }
        for due in due {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (hooks, config, client, metrics) = (hooks.clone(), config.clone(), client.clone(), metrics.clone());
            tokio::spawn(async move {
                let outcome = send(&client, &config, &due).await;
                let mut pending = hooks.lock();
                match outcome {
                    Outcome::Delivered => {
                        metrics.webhook("delivered", 1);
                        pending.finished(&due);
                    }
                    Outcome::Rejected(status) => {
                        metrics.webhook("rejected", 1);
                        tracing::warn!(id = %due.key.id, status, "webhook refused by the receiver; not retried");
                        pending.finished(&due);
                    }
                    Outcome::Retry if due.attempt >= config.max_attempts => {
                        metrics.webhook("failed", 1);
                        tracing::error!(id = %due.key.id, attempts = due.attempt, "webhook not delivered; giving up");
                        pending.finished(&due);
                    }
                    Outcome::Retry => {
                        metrics.webhook("retried", 1);
                        let pause = RETRY_MIN.saturating_mul(1 << (due.attempt - 1).min(16)).min(RETRY_MAX);
                        tracing::debug!(id = %due.key.id, attempt = due.attempt, ?pause, "webhook failed; retrying");
                        pending.retry(&due, pause, Instant::now());
                    }
                }
                drop(pending);
                drop(permit);
                hooks.wake.notify_one();
            });
        }
    }
}

async fn send(client: &reqwest::Client, config: &WebhookConfig, due: &Due) -> Outcome {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let body = delivery::body(due, &config.instance, now);
    let signature = delivery::signature(config.secret.as_bytes(), now, &body);
    let event = if due.created { "created" } else { "changed" };
    let answer = client
        .post(&config.url)
        .header("content-type", "application/json")
        .header("x-moai-event", event)
        .header("x-moai-timestamp", now.to_string())
        .header("x-moai-signature", signature)
        .body(body)
        .send()
        .await;
    match answer {
        Ok(response) => delivery::outcome(Some(response.status().as_u16())),
        Err(e) => {
            tracing::debug!(error = %e, "webhook request failed");
            delivery::outcome(None)
        }
    }
}
