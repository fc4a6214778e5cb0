//! `relay`: the bare broadcast relay, the ceiling of what this machine allows with the same
//! sockets and framing as a Rust Yjs server (tokio + tungstenite, TCP_NODELAY) but no CRDT and
//! no storage.
//!
//! Sockets are grouped by request path; each binary frame is forwarded to the other sockets of
//! the same path. A y-websocket SyncStep1 (`00 00 …`) is answered with an empty SyncStep2 so the
//! client counts itself synced, and is not forwarded (there is no state to exchange). Each socket
//! has a bounded outbox; a full outbox makes the forwarding reader wait (backpressure, like TCP),
//! nothing is dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

use crate::common::log;

#[derive(clap::Args, Debug)]
pub struct RelayArgs {
    #[arg(long)]
    pub port: u16,
    /// Listen address; loopback only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// tungstenite read buffer per socket in KiB (its default, 128, costs 128 KiB RSS per
    /// idle socket because the buffer is zero-filled; see client::ws_config).
    #[arg(long, default_value_t = 4)]
    pub read_buffer_kib: usize,
}

type Outbox = mpsc::Sender<Bytes>;

#[derive(Default)]
struct Relay {
    rooms: Mutex<HashMap<String, Vec<(u64, Outbox)>>>,
    next_id: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bad_frames: AtomicU64,
}

impl Relay {
    fn peers(&self, room: &str, me: u64) -> Vec<Outbox> {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.get(room).map(|v| v.iter().filter(|(id, _)| *id != me).map(|(_, tx)| tx.clone()).collect()).unwrap_or_default()
    }

    fn join(&self, room: &str, id: u64, tx: Outbox) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.entry(room.to_owned()).or_default().push((id, tx));
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = rooms.get_mut(room) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                rooms.remove(room);
            }
        }
    }
}

/// `00 01 02 00 00`: SyncStep2 carrying an empty update.
const EMPTY_STEP2: &[u8] = &[0, 1, 2, 0, 0];

pub async fn run(a: RelayArgs) -> Result<()> {
    anyhow::ensure!(a.host.is_loopback(), "the relay listens on loopback only");
    crate::procfs::raise_nofile_limit();
    let listener = TcpListener::bind(SocketAddr::new(a.host, a.port)).await.context("bind")?;
    log(&format!("relay listening on {}", listener.local_addr()?));
    let relay = Arc::new(Relay::default());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            r = &mut shutdown => { r?; break; }
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let relay = relay.clone();
                let rb = a.read_buffer_kib.max(1) * 1024;
                tokio::spawn(async move {
                    if let Err(e) = serve(relay, tcp, rb).await {
                        log(&format!("relay connection: {e:#}"));
                    }
                });
            }
        }
    }
    log(&format!(
        "relay: frames in {}, out {}, bad {}",
        relay.frames_in.load(Ordering::Relaxed),
        relay.frames_out.load(Ordering::Relaxed),
        relay.bad_frames.load(Ordering::Relaxed)
    ));
    Ok(())
}

async fn serve(relay: Arc<Relay>, tcp: TcpStream, read_buffer: usize) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut path = String::new();
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        tcp,
        |req: &Request, resp: Response| {
            path = req.uri().path().to_owned();
            Ok(resp)
        },
        Some(crate::client::ws_config(read_buffer)),
    )
    .await?;
    let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    relay.join(&path, id, tx.clone());

    let writer_relay = relay.clone();
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut n = 1;
            if sink.feed(Message::Binary(first)).await.is_err() {
                break;
            }
            while let Ok(next) = rx.try_recv() {
                n += 1;
                if sink.feed(Message::Binary(next)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
            writer_relay.frames_out.fetch_add(n, Ordering::Relaxed);
        }
    });

    while let Some(msg) = stream.next().await {
        let data = match msg {
            Ok(Message::Binary(data)) => data,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(Message::Text(_)) => {
                relay.bad_frames.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(_) => continue,
        };
        relay.frames_in.fetch_add(1, Ordering::Relaxed);
        if data.is_empty() {
            relay.bad_frames.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if data.starts_with(&[0, 0]) {
            // y-websocket SyncStep1: pretend to be an empty document.
            if tx.send(Bytes::from_static(EMPTY_STEP2)).await.is_err() {
                break;
            }
            continue;
        }
        for peer in relay.peers(&path, id) {
            let _ = peer.send(data.clone()).await; // a closed peer is just gone
        }
    }
    relay.leave(&path, id);
    drop(tx);
    let _ = writer.await;
    Ok(())
}
