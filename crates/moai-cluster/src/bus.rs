//! The engine-facing handle: [`Bus`] (one per process) and [`Topic`] (one per open document or
//! CoValue). Three tasks do the I/O behind it: the publisher (`publisher.rs`), the reader
//! (`reader.rs`) and the heartbeat (`heartbeat.rs`, which also owns reconnection).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};

use crate::link::Link;
use crate::publisher::Publication;
use crate::topics::{Sink, TopicEntry, Topics};
use crate::{BusConfig, BusError, BusStats, BusStatus, InstanceId};

/// What a topic's owner receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// Another instance published this on the topic (never this instance's own messages).
    Message { from: InstanceId, kind: u8, payload: Bytes },
    /// Something on this topic may have been missed since it was joined: bring the topic's
    /// state up to date from storage, and re-announce what only this instance knows (presence).
    Resync,
    /// This instance stopped heartbeating: whatever it contributed that is not durable (presence)
    /// must go.
    InstanceGone(InstanceId),
}

pub(crate) struct Shared {
    pub config: BusConfig,
    pub instance: InstanceId,
    pub link: Link,
    topics: Mutex<Topics>,
    pub stats: BusStats,
    status: watch::Sender<BusStatus>,
    /// The command link (heartbeat) and the reader's link, each up or down.
    command_up: AtomicBool,
    reader_up: AtomicBool,
    pub publications: mpsc::UnboundedSender<Publication>,
    pub publish_bytes: AtomicUsize,
    /// Set by `shutdown`: tasks end.
    pub stopping: watch::Sender<bool>,
    /// Wakes the reader when a topic needs its cursor resolved.
    pub topics_changed: Notify,
    /// The test hook's one drop happened.
    marker_dropped: AtomicBool,
}

impl Shared {
    pub(crate) fn topics(&self) -> MutexGuard<'_, Topics> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records whether the command link or the reader's link is up, and derives the status.
    pub(crate) fn set_up(&self, command: Option<bool>, reader: Option<bool>, reason: &str) {
        if let Some(c) = command {
            self.command_up.store(c, Ordering::Relaxed);
        }
        if let Some(r) = reader {
            self.reader_up.store(r, Ordering::Relaxed);
        }
        let up = self.command_up.load(Ordering::Relaxed) && self.reader_up.load(Ordering::Relaxed);
        self.status.send_if_modified(|s| {
            let next = if up {
                BusStatus::Connected
            } else if command == Some(false) || reader == Some(false) {
                BusStatus::Degraded(reason.to_owned())
            } else {
                return false;
            };
            if *s == next || (matches!(s, BusStatus::Degraded(_)) && matches!(next, BusStatus::Degraded(_))) {
                return false;
            }
            match &next {
                BusStatus::Connected => tracing::info!(instance = %self.instance, "cluster bus connected"),
                BusStatus::Degraded(why) => {
                    tracing::warn!(instance = %self.instance, reason = %why, "cluster bus degraded: serving local clients only until Redis is back")
                }
                BusStatus::Connecting => {}
            }
            *s = next;
            true
        });
    }

    /// The command link failed: drop it (the heartbeat reconnects) and note the loss once.
    pub(crate) fn command_failed(&self, error: &redis::RedisError) {
        if self.link.lost() {
            BusStats::add(&self.stats.disconnects, 1);
            self.set_up(Some(false), None, &format!("redis: {error}"));
        }
    }
}

/// The cluster bus of this process. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    pub(crate) shared: Arc<Shared>,
}

impl Bus {
    /// Starts the bus's tasks on the current tokio runtime. Connecting happens in the
    /// background: until Redis answers, the status is [`BusStatus::Connecting`] and topics work
    /// locally (they resync once it does).
    pub fn start(config: BusConfig) -> Result<Bus, BusError> {
        let client = redis::Client::open(config.url.as_str()).map_err(BusError::InvalidUrl)?;
        let (publications, queue) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            link: Link::new(client, &config),
            instance: InstanceId::random(),
            config,
            topics: Mutex::new(Topics::default()),
            stats: BusStats::default(),
            status: watch::Sender::new(BusStatus::Connecting),
            command_up: AtomicBool::new(false),
            reader_up: AtomicBool::new(false),
            publications,
            publish_bytes: AtomicUsize::new(0),
            stopping: watch::Sender::new(false),
            topics_changed: Notify::new(),
            marker_dropped: AtomicBool::new(false),
        });
        tokio::spawn(crate::publisher::run(shared.clone(), queue));
        tokio::spawn(crate::reader::run(shared.clone()));
        tokio::spawn(crate::heartbeat::run(shared.clone()));
        Ok(Bus { shared })
    }

    pub fn instance(&self) -> InstanceId {
        self.shared.instance
    }

    /// Connected or degraded, as it changes.
    pub fn status(&self) -> watch::Receiver<BusStatus> {
        self.shared.status.subscribe()
    }

    pub fn stats(&self) -> &BusStats {
        &self.shared.stats
    }

    /// Joins `topic`: messages other instances publish on it from now on arrive on the returned
    /// [`Topic`]. Call it *before* loading the topic's state from storage: anything published
    /// after the join point arrives as a message, anything before is durable and in the load.
    /// When Redis cannot be reached, the topic is joined locally and gets [`BusEvent::Resync`]
    /// once it can.
    pub async fn join(&self, topic: &str) -> Topic {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let join_id = self.register(topic, Sink::Own(sender), queued.clone()).await;
        Topic { membership: Membership { name: topic.to_owned(), join_id, bus: self.clone() }, receiver, queued }
    }

    /// An inbox for many topics (one owner task serving many documents): their events arrive
    /// together, each tagged with its topic, in one queue bounded in bytes.
    pub fn inbox(&self) -> Inbox {
        let (sender, receiver) = mpsc::unbounded_channel();
        Inbox { sender, receiver, queued: Arc::new(AtomicUsize::new(0)), bus: self.clone() }
    }

    /// Finds where the topic's stream ends (the join point) and registers the topic.
    async fn register(&self, topic: &str, sink: Sink, queued: Arc<AtomicUsize>) -> u64 {
        let key = self.shared.config.stream_key(topic);
        let position = match self.shared.link.get() {
            Some(mut conn) => match crate::reader::stream_info(&mut conn, &key).await {
                Ok(info) => Some(info),
                Err(e) => {
                    self.shared.command_failed(&e);
                    None
                }
            },
            None => None,
        };
        let cursor = position.map(|p| p.last_generated);
        let entry = TopicEntry {
            join_id: 0,
            key,
            cursor,
            added_at_cursor: position.map_or(0, |p| p.entries_added),
            sink,
            queued,
            resync_pending: false,
            peers: Default::default(),
        };
        let join_id = self.shared.topics().insert(topic.to_owned(), entry);
        self.shared.topics_changed.notify_one();
        if let (Some(_), Some(mut conn)) = (cursor, self.shared.link.get()) {
            // End the reader's blocking read, so it reads this topic from now on without waiting
            // for the block to time out (up to `read_block`: the first messages of a document an
            // instance just opened came that much late).
            let wake = self.shared.config.wake_key(self.shared.instance);
            let _ = redis::pipe()
                .cmd("XADD")
                .arg(&wake)
                .arg("MAXLEN")
                .arg(1)
                .arg("*")
                .arg("w")
                .arg(1)
                .ignore()
                .cmd("PEXPIRE")
                .arg(&wake)
                .arg(60_000)
                .ignore()
                .query_async::<()>(&mut conn)
                .await;
        }
        join_id
    }

    /// Ends the bus's tasks and deletes this instance's heartbeat, so the others drop its
    /// presence at once instead of after the heartbeat expires.
    pub async fn shutdown(&self) {
        self.shared.stopping.send_replace(true);
        if let Some(mut conn) = self.shared.link.get() {
            let key = self.shared.config.heartbeat_key(self.shared.instance);
            let _ = redis::cmd("DEL").arg(key).query_async::<redis::Value>(&mut conn).await;
        }
    }
}

/// Being joined to one topic: publishing on it, and leaving it when dropped.
pub struct Membership {
    name: String,
    join_id: u64,
    bus: Bus,
}

impl Membership {
    /// Publishes `(kind, payload)` to the other instances on this topic. Never waits: the
    /// publication is queued (bounded in bytes) and written in order with the others; when the
    /// queue is full or Redis is unreachable it is dropped and counted, and the other instances'
    /// periodic state exchange repairs what it carried.
    pub fn publish(&self, kind: u8, payload: Bytes) {
        let shared = &self.bus.shared;
        if cfg!(debug_assertions) {
            if let Some(marker) = &shared.config.drop_marker {
                let carries = !marker.is_empty() && payload.windows(marker.len()).any(|w| w == &marker[..]);
                if carries && !shared.marker_dropped.swap(true, Ordering::Relaxed) {
                    BusStats::add(&shared.stats.publish_dropped, 1);
                    return;
                }
            }
        }
        let len = payload.len() + 64;
        let queued = shared.publish_bytes.fetch_add(len, Ordering::Relaxed);
        if queued > 0 && queued + len > shared.config.publish_queue_bytes {
            shared.publish_bytes.fetch_sub(len, Ordering::Relaxed);
            BusStats::add(&shared.stats.publish_dropped, 1);
            return;
        }
        let publication = Publication { key: shared.config.stream_key(&self.name), kind, payload };
        if shared.publications.send(publication).is_err() {
            shared.publish_bytes.fetch_sub(len, Ordering::Relaxed);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.bus.shared.topics().remove(&self.name, self.join_id);
    }
}

/// One topic joined by one owner (a document task), with its own queue. Dropping it leaves.
pub struct Topic {
    membership: Membership,
    receiver: mpsc::UnboundedReceiver<BusEvent>,
    queued: Arc<AtomicUsize>,
}

impl Topic {
    /// See [`Membership::publish`].
    pub fn publish(&self, kind: u8, payload: Bytes) {
        self.membership.publish(kind, payload);
    }

    /// The next event; `None` only after the bus has shut down.
    pub async fn recv(&mut self) -> Option<BusEvent> {
        let event = self.receiver.recv().await?;
        if let BusEvent::Message { payload, .. } = &event {
            self.queued.fetch_sub(message_bytes(payload), Ordering::Relaxed);
        }
        Some(event)
    }

    pub fn name(&self) -> &str {
        self.membership.name()
    }
}

/// The events of many topics in one queue (see [`Bus::inbox`]). Join topics with
/// [`Inbox::join`]; each [`Membership`] leaves its topic when dropped.
pub struct Inbox {
    sender: mpsc::UnboundedSender<(Arc<str>, BusEvent)>,
    receiver: mpsc::UnboundedReceiver<(Arc<str>, BusEvent)>,
    queued: Arc<AtomicUsize>,
    bus: Bus,
}

impl Inbox {
    /// Joins `topic` into this inbox; see [`Bus::join`] for when to call it.
    pub async fn join(&self, topic: &str) -> Membership {
        self.joiner().join(topic).await
    }

    /// A handle that joins topics into this inbox from other tasks (storage reads).
    pub fn joiner(&self) -> Joiner {
        Joiner { sender: self.sender.clone(), queued: self.queued.clone(), bus: self.bus.clone() }
    }

    /// The next event and its topic; `None` only after the bus has shut down.
    pub async fn recv(&mut self) -> Option<(Arc<str>, BusEvent)> {
        let (topic, event) = self.receiver.recv().await?;
        if let BusEvent::Message { payload, .. } = &event {
            self.queued.fetch_sub(message_bytes(payload), Ordering::Relaxed);
        }
        Some((topic, event))
    }
}

/// Joins topics into an [`Inbox`] from anywhere (cheap to clone).
#[derive(Clone)]
pub struct Joiner {
    sender: mpsc::UnboundedSender<(Arc<str>, BusEvent)>,
    queued: Arc<AtomicUsize>,
    bus: Bus,
}

impl Joiner {
    /// See [`Inbox::join`].
    pub async fn join(&self, topic: &str) -> Membership {
        let sink = Sink::Shared(self.sender.clone(), Arc::from(topic));
        let join_id = self.bus.register(topic, sink, self.queued.clone()).await;
        Membership { name: topic.to_owned(), join_id, bus: self.bus.clone() }
    }
}

/// What a received message counts against its topic's queue.
pub(crate) fn message_bytes(payload: &Bytes) -> usize {
    payload.len() + 64
}
