//! Who sent what when, and who received it.
//!
//! Identification: every writer's Yjs doc has a client ID we assign, and each of its updates
//! inserts exactly one character, so the writer's k-th update is the item with ID
//! `(client, k)`. A receiver decodes each incoming update with yrs and walks its insertion set
//! (`Update::insertions`), which names `(client, clock range)` for every item it carries. This
//! stays exact if a server merges several updates into one frame (each item is matched to its
//! own send time) and needs no side channel in the payload.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use yrs::updates::decoder::Decode;
use yrs::Update;

use crate::client::Handler;
use crate::stats::Samples;

/// Client IDs of writers start here (below 2^53, as Yjs requires).
pub const WRITER_CLIENT_BASE: u64 = 1_000_000;

/// Deliveries at least this late are also kept with their send time (`DeliveryStats::slow`), so
/// a report can say *when* the tail happened (one stall, or spread over the run).
pub const SLOW_NS: u64 = 10_000_000;

pub struct WriterInfo {
    pub client_id: u64,
    pub doc: usize,
    /// Send time per sequence number, nanoseconds since `SendLog::base` (0 = not sent yet).
    sent_ns: Vec<AtomicU64>,
}

impl WriterInfo {
    pub fn sent_ns_iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.sent_ns.iter().map(|a| a.load(Ordering::Acquire))
    }
}

/// Send times of all writers, shared by the sinks (stamping) and receivers (reading).
pub struct SendLog {
    pub base: Instant,
    pub writers: Vec<WriterInfo>,
    by_client: HashMap<u64, usize>,
}

impl SendLog {
    /// `writer_docs[i]` = the document writer `i` edits; its client ID is `WRITER_CLIENT_BASE + i`.
    pub fn new(writer_docs: &[usize], updates_per_writer: u32, base: Instant) -> Self {
        let writers: Vec<WriterInfo> = writer_docs
            .iter()
            .enumerate()
            .map(|(i, &doc)| WriterInfo {
                client_id: WRITER_CLIENT_BASE + i as u64,
                doc,
                sent_ns: (0..updates_per_writer).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        let by_client = writers.iter().enumerate().map(|(i, w)| (w.client_id, i)).collect();
        Self { base, writers, by_client }
    }

    pub fn ns_since_base(&self, at: Instant) -> u64 {
        // Never 0, so 0 can mean "not sent".
        (at.saturating_duration_since(self.base).as_nanos() as u64).max(1)
    }

    pub fn stamp(&self, writer: usize, seq: u32) {
        if let Some(slot) = self.writers.get(writer).and_then(|w| w.sent_ns.get(seq as usize)) {
            slot.store(self.ns_since_base(Instant::now()), Ordering::Release);
        }
    }

    fn sent_ns(&self, writer: usize, seq: u32) -> Option<u64> {
        let v = self.writers[writer].sent_ns.get(seq as usize)?.load(Ordering::Acquire);
        (v != 0).then_some(v)
    }
}

/// Run-wide progress that the driver polls to know when every delivery has arrived.
#[derive(Default)]
pub struct Progress {
    pub deliveries: AtomicU64,
    pub last_delivery_ns: AtomicU64,
}

/// Per-receiver delivery accounting (one per client; merged at the end).
#[derive(Default, Debug)]
pub struct DeliveryStats {
    pub deliveries: u64,
    pub duplicates: u64,
    /// Our own updates coming back (y-websocket-server and Hocuspocus echo to the sender).
    pub echoes: u64,
    /// Items from a writer of a *different* document: a routing bug in the server.
    pub cross_doc: u64,
    /// Items whose send time was not recorded yet, or out of the writer's range.
    pub unexpected: u64,
    /// Items from client IDs that are not our writers.
    pub foreign_items: u64,
    pub undecodable_updates: u64,
    pub latency: Samples,
    /// `(send time ns since base, latency ns)` of every delivery at least [`SLOW_NS`] late.
    pub slow: Vec<(u64, u64)>,
}

impl DeliveryStats {
    pub fn merge(&mut self, o: DeliveryStats) {
        self.deliveries += o.deliveries;
        self.duplicates += o.duplicates;
        self.echoes += o.echoes;
        self.cross_doc += o.cross_doc;
        self.unexpected += o.unexpected;
        self.foreign_items += o.foreign_items;
        self.undecodable_updates += o.undecodable_updates;
        self.latency.merge(o.latency);
        self.slow.extend(o.slow);
    }
}

/// The handler of a fan-out client: maybe a writer (its own doc answers SyncStep1), always a
/// receiver.
pub struct Receiver {
    doc: usize,
    own_writer: Option<usize>,
    log: Arc<SendLog>,
    progress: Arc<Progress>,
    /// Per writer of any document: which sequence numbers this client has seen.
    seen: HashMap<usize, Vec<bool>>,
    /// A writer's document handle, to answer the server's SyncStep1 truthfully.
    writer_doc: Option<yrs::Doc>,
    /// Big-doc scenario: count the items of one client and fire when `target` have arrived.
    watch: Option<Watch>,
    /// Big-doc scenario: keep `(seq, latency ns)` of every delivery to name the slow ones.
    pub each: Option<Vec<(u32, u64)>>,
    pub stats: DeliveryStats,
}

/// Signals when all `target` items of `client` have arrived (the big document is complete).
pub struct Watch {
    pub client: u64,
    pub target: u64,
    pub seen: u64,
    pub done: Option<tokio::sync::oneshot::Sender<Instant>>,
}

impl Receiver {
    pub fn new(
        doc: usize,
        own_writer: Option<(usize, yrs::Doc)>,
        log: Arc<SendLog>,
        progress: Arc<Progress>,
    ) -> Self {
        let (own_writer, writer_doc) = match own_writer {
            Some((w, d)) => (Some(w), Some(d)),
            None => (None, None),
        };
        Self { doc, own_writer, log, progress, seen: HashMap::new(), writer_doc, watch: None, each: None, stats: DeliveryStats::default() }
    }

    pub fn with_watch(mut self, watch: Watch) -> Self {
        self.watch = Some(watch);
        self
    }
}

impl Handler for Receiver {
    fn state_vector(&self) -> Vec<u8> {
        match &self.writer_doc {
            Some(d) => crate::ydoc::state_vector(d),
            None => crate::proto::EMPTY_STATE_VECTOR.to_vec(),
        }
    }

    fn answer_step1(&mut self, server_sv: &[u8]) -> Vec<u8> {
        match &self.writer_doc {
            Some(d) => crate::ydoc::diff(d, server_sv),
            None => crate::proto::EMPTY_UPDATE.to_vec(),
        }
    }

    fn on_update(&mut self, update: &[u8], received: Instant) {
        let Ok(update) = Update::decode_v1(update) else {
            self.stats.undecodable_updates += 1;
            return;
        };
        let now_ns = self.log.ns_since_base(received);
        let mut new = 0u64;
        for (client, ranges) in update.insertions(true).iter() {
            let client = client.get();
            let Some(&writer) = self.log.by_client.get(&client) else {
                let items = ranges.iter().map(|r| u64::from(r.end - r.start)).sum::<u64>();
                self.stats.foreign_items += items;
                if let Some(w) = self.watch.as_mut().filter(|w| w.client == client) {
                    w.seen += items;
                    if w.seen >= w.target {
                        if let Some(done) = w.done.take() {
                            let _ = done.send(received);
                        }
                    }
                }
                continue;
            };
            for range in ranges.iter() {
                let len = u64::from(range.end - range.start);
                if Some(writer) == self.own_writer {
                    self.stats.echoes += len;
                    continue;
                }
                if self.log.writers[writer].doc != self.doc {
                    self.stats.cross_doc += len;
                    continue;
                }
                let k = self.log.writers[writer].sent_ns.len();
                let seen = self.seen.entry(writer).or_insert_with(|| vec![false; k]);
                for seq in range.clone() {
                    let Some(sent) = self.log.sent_ns(writer, seq) else {
                        self.stats.unexpected += 1;
                        continue;
                    };
                    let slot = &mut seen[seq as usize];
                    if *slot {
                        self.stats.duplicates += 1;
                        continue;
                    }
                    *slot = true;
                    new += 1;
                    self.stats.latency.push_ns(now_ns.saturating_sub(sent));
                    if now_ns.saturating_sub(sent) >= SLOW_NS {
                        self.stats.slow.push((sent, now_ns - sent));
                    }
                    if let Some(each) = self.each.as_mut() {
                        each.push((seq, now_ns.saturating_sub(sent)));
                    }
                }
            }
        }
        if new > 0 {
            self.stats.deliveries += new;
            self.progress.deliveries.fetch_add(new, Ordering::AcqRel);
            self.progress.last_delivery_ns.fetch_max(now_ns, Ordering::AcqRel);
        }
    }
}
