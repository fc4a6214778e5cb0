//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! One registry per process, created before the listener so that every connection, message and
//! storage batch is counted from the start. The storage room reports through
//! [`moai_storage::StorageObserver`], which this type implements.

use std::sync::Arc;
use std::time::Duration;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    Yjs,
    Cojson,
    Pgsync,
    /// Yjs documents through the Hocuspocus protocol (`/hocuspocus`).
    Hocuspocus,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

// Label values are lowercase, as Prometheus convention has it (`protocol="yjs"`).
impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Protocol::Yjs => "yjs",
            Protocol::Cojson => "cojson",
            Protocol::Pgsync => "pgsync",
            Protocol::Hocuspocus => "hocuspocus",
        })
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TrafficLabels {
    protocol: Protocol,
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Counter handles of one (protocol, direction): resolved once, so counting a message on the hot
/// path is two atomic adds, not two labelled-family lookups under a lock.
struct Traffic {
    messages: Counter,
    bytes: Counter,
}

const PROTOCOLS: [Protocol; 4] = [Protocol::Yjs, Protocol::Cojson, Protocol::Pgsync, Protocol::Hocuspocus];
const DIRECTIONS: [Direction; 2] = [Direction::In, Direction::Out];

pub struct Metrics {
    registry: Registry,
    connections_open: Family<ProtocolLabels, Gauge>,
    connections_total: Family<ProtocolLabels, Counter>,
    /// Indexed by `[protocol as usize][direction as usize]`.
    traffic: [[Traffic; 2]; 4],
    unknown_messages: Family<ProtocolLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    storage_batch_writes: Histogram,
    storage_commit_seconds: Histogram,
    ready: Gauge,
    cluster: ClusterMetrics,
    llm: LlmMetrics,
    webhooks: Family<OutcomeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The cluster bus's counters, mirrored from [`moai_cluster::BusStats`] when /metrics is read.
#[derive(Default)]
struct ClusterMetrics {
    bus: std::sync::OnceLock<moai_cluster::Bus>,
    degraded: Gauge,
    counters: Family<EventLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

impl Metrics {
    pub fn new(version: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix("moai");
        let connections_open = Family::<ProtocolLabels, Gauge>::default();
        let connections_total = Family::<ProtocolLabels, Counter>::default();
        let messages = Family::<TrafficLabels, Counter>::default();
        let bytes = Family::<TrafficLabels, Counter>::default();
        let unknown_messages = Family::<ProtocolLabels, Counter>::default();
        let rejected = Family::<ReasonLabels, Counter>::default();
        // 1, 2, 4 … 2048 writes per commit.
        let storage_batch_writes = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        // 50 µs … ~1.6 s per commit.
        let storage_commit_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let ready = Gauge::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&BuildLabels { version: version.to_owned() }).set(1);

        registry.register("connections", "Open WebSocket sessions", connections_open.clone());
        registry.register("connections_opened", "WebSocket sessions opened", connections_total.clone());
        registry.register("messages", "Sync messages received (in) and sent (out)", messages.clone());
        registry.register("bytes", "Sync payload bytes received (in) and sent (out)", bytes.clone());
        registry.register("unknown_messages", "Messages of unknown type, ignored", unknown_messages.clone());
        registry.register("rejected", "Requests, connections or messages refused, by reason", rejected.clone());
        registry.register(
            "storage_batch_writes",
            "Writes that shared one storage commit",
            storage_batch_writes.clone(),
        );
        registry.register("storage_commit_seconds", "Storage group commit latency", storage_commit_seconds.clone());
        registry.register("ready", "1 when every enabled engine is ready", ready.clone());
        let cluster = ClusterMetrics::default();
        let webhooks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhooks",
            "Webhook deliveries by outcome: delivered, retried, rejected (4xx), failed (gave up), dropped (table full)",
            webhooks.clone(),
        );
        registry.register(
            "cluster_degraded",
            "1 while this instance cannot reach the cluster bus (Redis): it serves its own clients only",
            cluster.degraded.clone(),
        );
        registry.register(
            "cluster_events",
            "Cluster bus events: published, publish_dropped, received, receive_dropped, resyncs, instances_gone, disconnects",
            cluster.counters.clone(),
        );
        registry.register("build_info", "Build information", build_info);
        let llm = LlmMetrics::register(&mut registry);

        let traffic = PROTOCOLS.map(|protocol| {
            DIRECTIONS.map(|direction| {
                let l = TrafficLabels { protocol, direction };
                Traffic { messages: messages.get_or_create(&l).clone(), bytes: bytes.get_or_create(&l).clone() }
            })
        });
        Arc::new(Self {
            registry,
            connections_open,
            connections_total,
            traffic,
            unknown_messages,
            rejected,
            storage_batch_writes,
            storage_commit_seconds,
            ready,
            cluster,
            webhooks,
            llm,
        })
    }

    /// Counts webhook deliveries by outcome.
    pub fn webhook(&self, outcome: &'static str, n: u64) {
        self.webhooks.get_or_create(&OutcomeLabels { outcome }).inc_by(n);
    }

    /// Reports the cluster bus's state and counters on /metrics from now on.
    pub fn watch_cluster(&self, bus: moai_cluster::Bus) {
        let _ = self.cluster.bus.set(bus);
    }

    fn refresh_cluster(&self) {
        let Some(bus) = self.cluster.bus.get() else { return };
        self.cluster.degraded.set(bus.status().borrow().is_degraded() as i64);
        let s = bus.stats();
        use moai_cluster::BusStats as S;
        for (event, value) in [
            ("published", S::get(&s.published)),
            ("publish_dropped", S::get(&s.publish_dropped)),
            ("received", S::get(&s.received)),
            ("receive_dropped", S::get(&s.receive_dropped)),
            ("resyncs", S::get(&s.resyncs)),
            ("instances_gone", S::get(&s.instances_gone)),
            ("disconnects", S::get(&s.disconnects)),
        ] {
            let counter = self.cluster.counters.get_or_create(&EventLabels { event });
            let seen = counter.get();
            if value > seen {
                counter.inc_by(value - seen);
            }
        }
    }

    pub fn encode(&self) -> String {
        self.refresh_cluster();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn connection_opened(&self, protocol: Protocol) {
        let l = ProtocolLabels { protocol };
        self.connections_open.get_or_create(&l).inc();
        self.connections_total.get_or_create(&l).inc();
    }

    pub fn connection_closed(&self, protocol: Protocol) {
        self.connections_open.get_or_create(&ProtocolLabels { protocol }).dec();
    }

    pub fn message(&self, protocol: Protocol, direction: Direction, bytes: usize) {
        let t = &self.traffic[protocol as usize][direction as usize];
        t.messages.inc();
        t.bytes.inc_by(bytes as u64);
    }

    pub fn unknown_message(&self, protocol: Protocol) {
        self.unknown_messages.get_or_create(&ProtocolLabels { protocol }).inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready as i64);
    }
}

impl moai_storage::StorageObserver for Metrics {
    fn batch_committed(&self, writes: usize, latency: Duration) {
        self.storage_batch_writes.observe(writes as f64);
        self.storage_commit_seconds.observe(latency.as_secs_f64());
    }
}

/// Accounts that get a label of their own in the LLM proxy's metrics; the rest are counted as
/// `account="_other"`, so a server with many users cannot grow /metrics without bound.
pub const LLM_ACCOUNT_LABELS: usize = 1000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LlmLabels {
    account: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LlmErrorLabels {
    account: String,
    model: String,
    kind: &'static str,
}

/// The LLM proxy's counters, per account and model (models are the allowlist's, so bounded).
struct LlmMetrics {
    requests: Family<LlmLabels, Counter>,
    prompt_tokens: Family<LlmLabels, Counter>,
    completion_tokens: Family<LlmLabels, Counter>,
    errors: Family<LlmErrorLabels, Counter>,
    accounts: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl LlmMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = LlmMetrics {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            completion_tokens: Family::default(),
            errors: Family::default(),
            accounts: Default::default(),
        };
        registry.register(
            "llm_requests",
            "LLM proxy: requests sent upstream, by account and model",
            m.requests.clone(),
        );
        registry.register(
            "llm_prompt_tokens",
            "LLM proxy: prompt tokens the upstream reported, by account and model",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "llm_completion_tokens",
            "LLM proxy: completion tokens the upstream reported, by account and model",
            m.completion_tokens.clone(),
        );
        registry.register(
            "llm_errors",
            "LLM proxy: requests refused or failed, by account, model and kind",
            m.errors.clone(),
        );
        m
    }

    fn labels(&self, account: &str, model: &str) -> LlmLabels {
        let account = {
            let mut seen = self.accounts.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(account) || (seen.len() < LLM_ACCOUNT_LABELS && seen.insert(account.to_owned())) {
                account.to_owned()
            } else {
                "_other".to_owned()
            }
        };
        LlmLabels { account, model: model.to_owned() }
    }
}

impl moai_llm::Observer for Metrics {
    fn request(&self, account: &str, model: &str) {
        self.llm.requests.get_or_create(&self.llm.labels(account, model)).inc();
    }

    fn usage(&self, account: &str, model: &str, usage: moai_llm::Usage) {
        let labels = self.llm.labels(account, model);
        self.llm.prompt_tokens.get_or_create(&labels).inc_by(usage.prompt_tokens);
        self.llm.completion_tokens.get_or_create(&labels).inc_by(usage.completion_tokens);
    }

    fn error(&self, account: &str, model: &str, kind: moai_llm::ErrorKind) {
        let LlmLabels { account, model } = self.llm.labels(account, model);
        self.llm.errors.get_or_create(&LlmErrorLabels { account, model, kind: kind.as_str() }).inc();
    }
}
