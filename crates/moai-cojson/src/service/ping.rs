//! The server keepalive frame. Sending it is the edge's job (it owns the socket and the clock);
//! this only fixes what the frame says.
//!
//! cojson clients close a socket that has been silent for 10 s and consider themselves connected
//! only once the first frame arrives, so the edge sends one right after accept and then every
//! [`PING_INTERVAL`] (docs/protocols/cojson.md §2.3). `time` feeds the client's clock-offset estimate: pass the real
//! wall clock in epoch milliseconds.

use std::time::Duration;

use crate::message::Ping;

/// How often cojson servers (jazz-run, MaiaOS) ping.
pub const PING_INTERVAL: Duration = Duration::from_millis(1500);

/// The data-centre label jazz-run sends; clients treat it as free-form text.
pub const PING_DC: &str = "unknown";

/// `{"type":"ping","time":<now_ms>,"dc":"unknown"}`, ready to send as one text frame.
pub fn ping_frame(now_ms: u64) -> String {
    Ping { time: now_ms, dc: PING_DC.to_owned() }.to_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{parse_frame, Incoming};

    #[test]
    fn ping_frame_is_what_cojson_classifies_as_a_ping() {
        let frame = ping_frame(1_795_316_727_364);
        assert_eq!(frame, r#"{"type":"ping","time":1795316727364,"dc":"unknown"}"#);
        assert!(matches!(parse_frame(&frame)[..], [Ok(Incoming::Ping { time: Some(t) })] if t == 1_795_316_727_364.0));
    }
}
