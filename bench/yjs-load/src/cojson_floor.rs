//! `cojson-floor`: a fan-out relay that does only the I/O moai's CoJSON endpoint does per
//! delivery, to measure the server-CPU floor of that pattern on this machine
//! (bench/cojson/floor.sh drives it with bench/cojson/floor.mjs).
//!
//! Same stack and task shape as moai's `/sync`: tokio, tungstenite, TCP_NODELAY, text frames, a
//! 1 KiB read buffer; one task per socket that selects over its inbound frames, its outbound
//! channel and a 1.5 s app-level `{"type":"ping"}`; every inbound frame goes over one mpsc to a
//! central relay task (as moai's session hands each frame to its sync engine), which pushes the
//! writer's frames into every other socket's channel. Each outbound frame is its own
//! write+flush. No parsing, no storage, no signature checks: whatever moai spends beyond this is
//! its own work, not the kernel's.
//!
//! Left out on purpose (moai has them): the write deadline timer around each send, the
//! WebSocket-level ping every 30 s, the `known` ack moai sends back to the writer (200 frames
//! in a 10 000-delivery run), metrics counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{interval_at, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::common::log;

#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    #[arg(long)]
    pub port: u16,
    /// Listen address; loopback only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// tungstenite read buffer per socket in bytes (moai's READ_BUFFER_BYTES is 1024).
    #[arg(long, default_value_t = 1024)]
    pub read_buffer: usize,
    /// App-level ping period per socket in ms, as moai/cojson (1500); 0 turns it off.
    #[arg(long, default_value_t = 1500)]
    pub ping_ms: u64,
    /// Run on a current_thread runtime instead of the multi-thread one (read by main.rs): shows
    /// what the cross-thread wakeups (futex, idle workers parking) cost.
    #[arg(long)]
    pub current_thread: bool,
}

enum Event {
    Join { id: u64, writer: bool, tx: mpsc::Sender<Utf8Bytes> },
    Frame { id: u64, text: Utf8Bytes },
    Leave { id: u64 },
}

#[derive(Default, Debug)]
struct Counts {
    writes_in: u64,
    acks_in: u64,
    frames_out: u64,
    dropped_full: u64,
}

pub async fn run(a: FloorArgs) -> Result<()> {
    anyhow::ensure!(a.host.is_loopback(), "the relay listens on loopback only");
    crate::procfs::raise_nofile_limit();
    let listener = TcpListener::bind(SocketAddr::new(a.host, a.port)).await.context("bind")?;
    log(&format!("cojson-floor listening on {} (current_thread: {})", listener.local_addr()?, a.current_thread));
    let (events_tx, events_rx) = mpsc::channel::<Event>(1024);
    let relay = tokio::spawn(relay(events_rx));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        anyhow::Ok(())
    };
    tokio::pin!(shutdown);
    let ping = (a.ping_ms > 0).then(|| Duration::from_millis(a.ping_ms));
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            r = &mut shutdown => { r?; break; }
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                next_id += 1;
                let (id, events, rb) = (next_id, events_tx.clone(), a.read_buffer.max(64));
                tokio::spawn(async move {
                    if let Err(e) = serve(id, tcp, events, rb, ping).await {
                        log(&format!("cojson-floor connection {id}: {e:#}"));
                    }
                });
            }
        }
    }
    drop(events_tx);
    relay.abort(); // sockets still open hold senders; the counts are logged as they change
    Ok(())
}

/// The central task: the writer's frames to every other socket, acks dropped.
async fn relay(mut events: mpsc::Receiver<Event>) {
    let mut sockets: HashMap<u64, mpsc::Sender<Utf8Bytes>> = HashMap::new();
    let mut writer: Option<u64> = None;
    let mut c = Counts::default();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Join { id, writer: w, tx } => {
                if w && writer.is_none() {
                    writer = Some(id);
                }
                sockets.insert(id, tx);
            }
            Event::Frame { id, text } if Some(id) == writer => {
                c.writes_in += 1;
                for (&to, tx) in &sockets {
                    if to == id {
                        continue;
                    }
                    // A full outbox would be a slow consumer (moai closes those); never at 20/s.
                    match tx.try_send(text.clone()) {
                        Ok(()) => c.frames_out += 1,
                        Err(_) => c.dropped_full += 1,
                    }
                }
            }
            Event::Frame { .. } => c.acks_in += 1,
            Event::Leave { id } => {
                sockets.remove(&id);
                if Some(id) == writer {
                    writer = None;
                    log(&format!("cojson-floor: writer left; {c:?}"));
                }
            }
        }
    }
}

fn ping_frame() -> Message {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Message::text(format!(r#"{{"type":"ping","time":{ms},"dc":"unknown"}}"#))
}

async fn serve(id: u64, tcp: TcpStream, events: mpsc::Sender<Event>, rb: usize, ping: Option<Duration>) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut path = String::new();
    let cb = |req: &Request, resp: Response| {
        path = req.uri().path().to_owned();
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, cb, Some(crate::client::ws_config(rb))).await?;
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(256);
    events.send(Event::Join { id, writer: path.ends_with("/writer"), tx }).await?;
    ws.send(ping_frame()).await?; // cojson clients expect a ping first; so does moai send one
    let period = ping.unwrap_or(Duration::from_secs(3600));
    let mut ticker = interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(text) => ws.send(Message::Text(text)).await?, // feed + flush: one write
                None => break,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if events.send(Event::Frame { id, text }).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = ticker.tick(), if ping.is_some() => ws.send(ping_frame()).await?,
        }
    }
    let _ = events.send(Event::Leave { id }).await;
    Ok(())
}
