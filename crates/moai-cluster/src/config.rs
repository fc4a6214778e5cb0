//! The bus's tunables. Defaults suit a cluster on one network; tests shorten the periods.

use std::time::Duration;

/// How an instance talks to Redis and to the other instances.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// `redis://[user:pass@]host:port[/db]` (or `rediss://`).
    pub url: String,
    /// Prefix of every key moai writes (`<prefix>:s:<topic>` streams, `<prefix>:i:<instance>`
    /// heartbeats), so several clusters can share one Redis.
    pub key_prefix: String,
    /// How often this instance renews its heartbeat and checks the others'.
    pub heartbeat_interval: Duration,
    /// A heartbeat not renewed for this long means the instance is gone: its presence is removed
    /// everywhere. At least twice `heartbeat_interval`.
    pub instance_ttl: Duration,
    /// How often each topic's stream is checked for entries trimmed before this instance read
    /// them (a gap: the topic gets [`crate::BusEvent::Resync`]).
    pub gap_check_interval: Duration,
    /// Entries a stream keeps (approximately: Redis trims whole nodes). Readers are normally
    /// milliseconds behind; one that falls further behind than this resyncs.
    pub stream_max_len: usize,
    /// A stream nobody published to for this long is deleted by Redis (its documents are
    /// idle; a later reader starts from storage anyway).
    pub stream_ttl: Duration,
    /// Bytes of publications waiting for Redis. Beyond it a publication is dropped and counted
    /// (the other instances repair it from their periodic state exchange).
    pub publish_queue_bytes: usize,
    /// Bytes of received messages waiting for one topic's owner. Beyond it messages are dropped
    /// and the topic gets [`crate::BusEvent::Resync`] once there is room.
    pub topic_queue_bytes: usize,
    /// How long one XREAD blocks waiting for new entries (a topic joined meanwhile is read from
    /// its join point when the call returns).
    pub read_block: Duration,
    /// Deadline for connecting to Redis and for one command (blocking reads get `read_block` on top).
    pub command_timeout: Duration,
    /// First and largest pause between reconnection attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Test hook (debug builds): the first publication whose payload contains these bytes is
    /// dropped, as if the bus had lost it (what repairs it may carry the same bytes).
    pub drop_marker: Option<Vec<u8>>,
}

impl BusConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "moai".into(),
            heartbeat_interval: Duration::from_secs(1),
            instance_ttl: Duration::from_secs(3),
            gap_check_interval: Duration::from_secs(5),
            stream_max_len: 10_000,
            stream_ttl: Duration::from_secs(3600),
            publish_queue_bytes: 64 << 20,
            topic_queue_bytes: 16 << 20,
            read_block: Duration::from_millis(200),
            command_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            drop_marker: None,
        }
    }

    pub(crate) fn stream_key(&self, topic: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.key_prefix.len() + 3 + topic.len());
        key.extend_from_slice(self.key_prefix.as_bytes());
        key.extend_from_slice(b":s:");
        key.extend_from_slice(topic.as_bytes());
        key
    }

    /// The stream this instance's reader also blocks on: an entry added to it ends the blocking
    /// read at once, so a topic joined meanwhile is read without waiting for the block to time out.
    pub(crate) fn wake_key(&self, instance: crate::InstanceId) -> String {
        format!("{}:w:{instance}", self.key_prefix)
    }

    pub(crate) fn heartbeat_key(&self, instance: crate::InstanceId) -> String {
        format!("{}:i:{instance}", self.key_prefix)
    }
}
