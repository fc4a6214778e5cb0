//! The heartbeat task: keeps the command link connected (reconnecting with capped, jittered
//! backoff), renews this instance's heartbeat key, and notices other instances whose heartbeat
//! has expired, telling the topics they published on ([`BusEvent::InstanceGone`]).
//!
//! An instance is declared gone only while this one is connected and has been for a full
//! heartbeat lifetime: after a Redis restart every key is missing until its owner renews it,
//! which must not look like the whole cluster dying.

use std::collections::HashSet;
use std::sync::Arc;

use redis::Value;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::bus::{BusEvent, Shared};
use crate::{BusStats, InstanceId};

pub(crate) async fn run(shared: Arc<Shared>) {
    let mut stopping = shared.stopping.subscribe();
    let mut backoff = Backoff::new(shared.config.reconnect_min, shared.config.reconnect_max);
    let key = shared.config.heartbeat_key(shared.instance);
    let ttl_ms = shared.config.instance_ttl.as_millis() as u64;
    let mut connected_since: Option<Instant> = None;
    let mut ever_connected = false;
    loop {
        let mut pause = shared.config.heartbeat_interval;
        match shared.link.get() {
            None => {
                connected_since = None;
                match shared.link.open().await {
                    Ok(conn) => {
                        shared.link.install(conn);
                        backoff.reset();
                        shared.set_up(Some(true), None, "");
                        if ever_connected {
                            // What this instance published while the link was down was dropped;
                            // its topics re-announce and exchange state.
                            shared.topics().resync_all(false);
                            shared.topics_changed.notify_one();
                        }
                        ever_connected = true;
                        continue;
                    }
                    Err(e) => {
                        shared.set_up(Some(false), None, &format!("redis: {e}"));
                        pause = backoff.next_pause();
                    }
                }
            }
            Some(mut conn) => {
                let since = *connected_since.get_or_insert_with(Instant::now);
                let beat =
                    redis::cmd("SET").arg(&key).arg(1).arg("PX").arg(ttl_ms).query_async::<Value>(&mut conn).await;
                match beat {
                    Err(e) => {
                        shared.command_failed(&e);
                        continue;
                    }
                    Ok(_) => {
                        if since.elapsed() >= shared.config.instance_ttl {
                            if let Err(e) = check_peers(&shared, &mut conn).await {
                                shared.command_failed(&e);
                                continue;
                            }
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// Asks Redis which of the instances heard from still heartbeat; tells the topics about the rest.
async fn check_peers(shared: &Shared, conn: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<()> {
    let peers: Vec<InstanceId> = {
        let topics = shared.topics();
        let all: HashSet<InstanceId> = topics.by_name.values().flat_map(|e| e.peers.iter().copied()).collect();
        all.into_iter().collect()
    };
    if peers.is_empty() {
        return Ok(());
    }
    let mut cmd = redis::cmd("MGET");
    for p in &peers {
        cmd.arg(shared.config.heartbeat_key(*p));
    }
    let reply: Vec<Option<Vec<u8>>> = cmd.query_async(conn).await?;
    let gone: Vec<InstanceId> = peers.iter().zip(reply).filter(|(_, v)| v.is_none()).map(|(p, _)| *p).collect();
    if gone.is_empty() {
        return Ok(());
    }
    let mut topics = shared.topics();
    for instance in gone {
        tracing::info!(%instance, "cluster instance stopped heartbeating; removing its presence");
        BusStats::add(&shared.stats.instances_gone, 1);
        for e in topics.by_name.values_mut() {
            if e.peers.remove(&instance) {
                let _ = e.sink.send(BusEvent::InstanceGone(instance));
            }
        }
    }
    Ok(())
}
