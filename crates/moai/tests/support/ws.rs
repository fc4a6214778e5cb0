//! A raw WebSocket client for protocol-level tests.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.expect("connect").0
}

/// Next data frame or close, skipping pings and pongs; fails the test after `timeout`.
pub async fn next_within(ws: &mut Ws, timeout: Duration) -> WsMessage {
    loop {
        let msg = tokio::time::timeout(timeout, ws.next())
            .await
            .expect("timed out waiting for the server")
            .expect("stream ended")
            .expect("websocket error");
        if !matches!(msg, WsMessage::Ping(_) | WsMessage::Pong(_)) {
            return msg;
        }
    }
}

/// Reads until the server closes, within `timeout`; returns the close code and reason.
pub async fn closed_within(ws: &mut Ws, timeout: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_within(ws, left).await {
            WsMessage::Close(Some(frame)) => return (u16::from(frame.code), frame.reason.to_string()),
            WsMessage::Close(None) => return (1005, String::new()),
            _ => {}
        }
    }
}
