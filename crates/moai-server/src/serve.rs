//! The accept loop.
//!
//! Written out instead of `axum::serve` because a sync server needs control that the
//! convenience wrapper does not give: TCP_NODELAY on every socket (small sync messages must not
//! wait ~40 ms for Nagle), a cap on open connections that also covers upgraded WebSockets, a
//! deadline for request headers (slowloris), and a stop that is driven by [`Shutdown`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::quota::{Quota, QuotaGuard};
use crate::{Limits, Metrics, Shutdown};

/// A connection slot (one of `max_connections`, and one of the peer IP's). It is shared between
/// the HTTP connection and a WebSocket session upgraded from it, and frees the slot when both
/// are done.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<(OwnedSemaphorePermit, QuotaGuard)>);

/// Serves `app` on `listener` until [`Shutdown::stop_accepting`], then lets in-flight HTTP
/// requests finish (WebSocket sessions are closed by their own tasks, on [`Shutdown::trigger`]).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, metrics: Arc<Metrics>, shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Quota::<IpAddr>::new(limits.max_connections_per_ip);
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only: WebSocket upgrades are HTTP/1.1, and sync clients speak nothing else.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.handshake_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.stop_accepting_token().cancelled() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.rejected("max_connections");
            tracing::warn!(%peer, max = limits.max_connections, "connection refused: too many open connections");
            tokio::spawn(refuse(stream));
            continue;
        };
        let Some(ip_unit) = per_ip.try_acquire(&peer.ip()) else {
            metrics.rejected("max_connections_per_ip");
            tracing::warn!(%peer, max = limits.max_connections_per_ip, "connection refused: too many open connections from this address");
            tokio::spawn(refuse(stream));
            continue;
        };
        let slot = ConnectionSlot(Arc::new((permit, ip_unit)));
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(slot.clone());
            app.clone().oneshot(req)
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let first_byte_timeout = limits.handshake_timeout;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // hyper's header timeout starts with the first byte of a request, so a connection
            // that sends nothing at all would hold its slot forever: wait for that byte first.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return, // closed or failed before sending anything
                Err(_) => {
                    metrics.rejected("silent_connection");
                    tracing::info!(%peer, timeout = ?first_byte_timeout, "connection closed: nothing received in time");
                    return;
                }
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                log_connection_error(peer, e.as_ref());
            }
        });
    }
    drop(listener);
    // In-flight plain HTTP requests get to finish; the caller bounds this with the grace period.
    graceful.shutdown().await;
}

fn log_connection_error(peer: SocketAddr, e: &(dyn std::error::Error + Send + Sync + 'static)) {
    let timed_out = e.downcast_ref::<hyper::Error>().is_some_and(|e| e.is_timeout());
    if timed_out {
        tracing::info!(%peer, "connection closed: request headers not received in time");
    } else {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Tells an over-limit client why it is turned away, then closes.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":"Too many connections","status":503}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(resp.as_bytes())).await;
    let _ = stream.shutdown().await;
}
