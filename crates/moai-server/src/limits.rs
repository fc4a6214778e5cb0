//! Resource limits of the edge. Each has a default that is safe for a small production
//! deployment; the binary exposes every one as a flag and an environment variable.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message accepted; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// Largest HTTP request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Open TCP connections (WebSockets included) at once; more get 503 and are closed.
    pub max_connections: usize,
    /// Open TCP connections from one IP address; 0 = no limit (the default: behind a proxy or
    /// load balancer every client has the proxy's address).
    pub max_connections_per_ip: usize,
    /// Open WebSocket sessions per token subject; 0 = no limit. Over it: close 1013.
    pub max_sessions_per_user: usize,
    /// Time a client has to send its request headers (the WebSocket handshake included). A TCP
    /// connection that sends nothing at all is closed after it too.
    pub handshake_timeout: Duration,
    /// Time a plain HTTP request may take end to end; longer ones get 408.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 * 1024 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_sessions_per_user: 0,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}
