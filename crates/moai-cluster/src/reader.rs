//! The reader task: one blocking XREAD over every joined topic's stream, from where each was
//! read up to, on a connection of its own. It hands other instances' messages to the topics'
//! owners, resolves the join point of topics joined while Redis was unreachable, and checks
//! the streams for gaps (entries trimmed before this instance read them).
//!
//! A stream id only grows, so reading "after the last id seen" never skips an entry that still
//! exists; an entry that no longer exists (trimmed, or lost with a Redis restart) is a gap, and
//! a gap is answered with [`BusEvent::Resync`]: the owner reloads from storage, where every
//! published change already is.

use std::sync::Arc;

use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::bus::{message_bytes, BusEvent, Shared};
use crate::stream_reply::{parse_stream_info, parse_xread, StreamId, StreamInfo};
use crate::BusStats;

/// Most entries read per stream per call.
const COUNT: usize = 256;

pub(crate) async fn run(shared: Arc<Shared>) {
    let mut stopping = shared.stopping.subscribe();
    let mut backoff = Backoff::new(shared.config.reconnect_min, shared.config.reconnect_max);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut next_gap_check = Instant::now() + shared.config.gap_check_interval;
    loop {
        if *stopping.borrow() {
            return;
        }
        let Some(c) = conn.as_mut() else {
            match shared.link.open_blocking(&shared.config, shared.config.read_block).await {
                Ok(c) => {
                    conn = Some(c);
                    backoff.reset();
                    shared.set_up(None, Some(true), "");
                }
                Err(e) => {
                    shared.set_up(None, Some(false), &format!("redis: {e}"));
                    let pause = backoff.next_pause();
                    tracing::debug!(error = %e, ?pause, "cluster reader cannot reach Redis");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                }
            }
            continue;
        };
        let step = tokio::select! {
            r = read_once(&shared, c, &mut next_gap_check) => r,
            _ = stopping.wait_for(|s| *s) => return,
        };
        if let Err(e) = step {
            // Whatever happened to Redis meanwhile (a restart loses unpersisted entries), every
            // topic starts again from its stream's end and resyncs from storage.
            tracing::warn!(error = %e, "cluster reader lost Redis");
            BusStats::add(&shared.stats.disconnects, 1);
            shared.set_up(None, Some(false), &format!("redis: {e}"));
            // Forget the cursors: entry counts restart if Redis lost its data.
            shared.topics().resync_all(true);
            conn = None;
        }
    }
}

/// One round: resolve unknown cursors, read, deliver, and check for gaps when due.
async fn read_once(
    shared: &Shared,
    conn: &mut MultiplexedConnection,
    next_gap_check: &mut Instant,
) -> redis::RedisResult<()> {
    resolve_cursors(shared, conn).await?;
    if Instant::now() >= *next_gap_check {
        *next_gap_check = Instant::now() + shared.config.gap_check_interval;
        check_gaps(shared, conn).await?;
    }
    flush_resyncs(shared);

    let (keys, ids): (Vec<Vec<u8>>, Vec<String>) = {
        let topics = shared.topics();
        topics.by_name.values().filter_map(|e| e.cursor.map(|c| (e.key.clone(), c.to_string()))).unzip()
    };
    if keys.is_empty() {
        // Nothing to read: wait for a join (or a short while, to flush pending resyncs).
        let _ = tokio::time::timeout(shared.config.read_block, shared.topics_changed.notified()).await;
        return Ok(());
    }
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT").arg(COUNT).arg("BLOCK").arg(shared.config.read_block.as_millis() as u64).arg("STREAMS");
    for k in &keys {
        cmd.arg(k);
    }
    // The wake stream, from "now": a join ends this read at once (its entries are ignored).
    cmd.arg(shared.config.wake_key(shared.instance));
    for id in &ids {
        cmd.arg(id);
    }
    cmd.arg("$");
    let reply: Value = cmd.query_async(conn).await?;
    let budget = shared.config.topic_queue_bytes;
    let mut topics = shared.topics();
    for batch in parse_xread(&reply) {
        let Some(name) = topics.by_key.get(&batch.key).cloned() else { continue };
        let Some(entry) = topics.by_name.get_mut(&name) else { continue };
        // A topic joined again (or resolved) meanwhile may have a different cursor; only move
        // forward from the one this read used.
        let Some(read_from) = entry.cursor else { continue };
        entry.added_at_cursor += batch.ids.iter().filter(|id| **id > read_from).count() as u64;
        for e in batch.entries {
            if e.id <= read_from {
                continue;
            }
            if e.from == shared.instance {
                continue;
            }
            entry.peers.insert(e.from);
            let bytes = message_bytes(&e.payload);
            let event = BusEvent::Message { from: e.from, kind: e.kind, payload: e.payload };
            if entry.deliver(event, bytes, budget) {
                BusStats::add(&shared.stats.received, 1);
            } else {
                BusStats::add(&shared.stats.receive_dropped, 1);
            }
        }
        if let Some(last) = batch.last.filter(|last| *last > read_from) {
            entry.cursor = Some(last);
        }
    }
    drop(topics);
    flush_resyncs(shared);
    Ok(())
}

/// Where `key`'s stream stands now (a missing stream is empty).
pub(crate) async fn stream_info(conn: &mut MultiplexedConnection, key: &[u8]) -> redis::RedisResult<StreamInfo> {
    match redis::cmd("XINFO").arg("STREAM").arg(key).query_async::<Value>(conn).await {
        Ok(v) => Ok(parse_stream_info(&v).unwrap_or(StreamInfo::MISSING)),
        // "ERR no such key": nothing was published to it, or it expired.
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
            Ok(StreamInfo::MISSING)
        }
        Err(e) => Err(e),
    }
}

/// Topics whose join point is unknown start at the stream's current end, and resync (anything
/// before that point is in storage).
async fn resolve_cursors(shared: &Shared, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
    let unknown: Vec<(String, Vec<u8>)> = {
        let topics = shared.topics();
        topics.by_name.iter().filter(|(_, e)| e.cursor.is_none()).map(|(n, e)| (n.clone(), e.key.clone())).collect()
    };
    for (name, key) in unknown {
        let info = stream_info(conn, &key).await?;
        if let Some(e) = shared.topics().by_name.get_mut(&name) {
            if e.cursor.is_none() && e.key == key {
                e.cursor = Some(info.last_generated);
                e.added_at_cursor = info.entries_added;
                e.resync_pending = true;
            }
        }
    }
    Ok(())
}

/// A stream whose entries after our cursor were removed before we read them (trimmed past a
/// slow reader, deleted, lost with a Redis restart) has a gap: resync, and read on from what
/// exists.
async fn check_gaps(shared: &Shared, conn: &mut MultiplexedConnection) -> redis::RedisResult<()> {
    let known: Vec<(String, Vec<u8>, StreamId, u64)> = {
        let topics = shared.topics();
        topics
            .by_name
            .iter()
            .filter_map(|(n, e)| e.cursor.map(|c| (n.clone(), e.key.clone(), c, e.added_at_cursor)))
            .collect()
    };
    for (name, key, cursor, added) in known {
        let info = stream_info(conn, &key).await?;
        if !info.has_gap_after(cursor, added) {
            continue;
        }
        let mut topics = shared.topics();
        if let Some(e) = topics.by_name.get_mut(&name) {
            // Only if the reader has not moved on meanwhile (then the next check decides).
            if e.cursor == Some(cursor) {
                tracing::info!(topic = %name, %cursor, "cluster stream has a gap; resyncing");
                e.resync_pending = true;
                e.cursor = Some(info.last_generated);
                e.added_at_cursor = info.entries_added;
            }
        }
    }
    Ok(())
}

fn flush_resyncs(shared: &Shared) {
    let budget = shared.config.topic_queue_bytes;
    let mut topics = shared.topics();
    for e in topics.by_name.values_mut() {
        if e.flush_resync(budget) {
            BusStats::add(&shared.stats.resyncs, 1);
        }
    }
}
