//! The publisher task: writes queued publications to their streams in order, many per round
//! trip (one pipeline), each stream trimmed to its bounded length and given an idle expiry.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::bus::Shared;
use crate::BusStats;

pub(crate) struct Publication {
    pub key: Vec<u8>,
    pub kind: u8,
    pub payload: Bytes,
}

/// Most publications written in one pipeline.
const BATCH: usize = 256;

pub(crate) async fn run(shared: Arc<Shared>, mut queue: mpsc::UnboundedReceiver<Publication>) {
    let mut stopping = shared.stopping.subscribe();
    let instance = shared.instance.to_string();
    let ttl_ms = shared.config.stream_ttl.as_millis() as u64;
    loop {
        let first = tokio::select! {
            p = queue.recv() => match p { Some(p) => p, None => return },
            _ = stopping.wait_for(|s| *s) => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let bytes: usize = batch.iter().map(|p| p.payload.len() + 64).sum();
        let count = batch.len() as u64;
        let written = match shared.link.get() {
            None => false,
            Some(mut conn) => {
                let mut pipe = redis::pipe();
                let mut keys = HashSet::new();
                for p in &batch {
                    pipe.cmd("XADD")
                        .arg(&p.key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(shared.config.stream_max_len)
                        .arg("*")
                        .arg("i")
                        .arg(&instance)
                        .arg("k")
                        .arg(&[p.kind][..])
                        .arg("d")
                        .arg(&p.payload[..])
                        .ignore();
                    keys.insert(&p.key);
                }
                for key in keys {
                    pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
                }
                match pipe.query_async::<()>(&mut conn).await {
                    Ok(()) => true,
                    Err(e) => {
                        shared.command_failed(&e);
                        false
                    }
                }
            }
        };
        shared.publish_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if written {
            BusStats::add(&shared.stats.published, count);
        } else {
            // The others' state exchange repairs these (docs/cluster.md).
            BusStats::add(&shared.stats.publish_dropped, count);
        }
    }
}
