//! The per-socket outbox is bounded in bytes as well as in messages: a peer that reads nothing
//! is closed once what is queued for it passes the byte bound, however few messages that is.

use std::sync::Arc;
use std::time::Duration;

use crate::message::encode_frame;
use crate::service::{CojsonConfig, CojsonService, Outbound, CLOSE_TOO_SLOW};
use crate::test_support::*;
use moai_storage::MemoryStorage;

#[tokio::test]
async fn a_peer_over_the_byte_bound_is_closed_however_few_messages_it_has() {
    // Messages would allow 4096; bytes allow about one content message of the three a load gets.
    let config = CojsonConfig { outbox_messages: 4096, outbox_bytes: 600, ..CojsonConfig::default() };
    let svc = CojsonService::new(Arc::new(MemoryStorage::new()), config);
    let mut a = svc.connect().await.unwrap();
    let slow = svc.connect().await.unwrap();
    let mut w = World::new();
    for msg in [w.account_upload(), w.group_upload(), w.map_upload()] {
        a.receive(&encode_frame(&[msg])).await.unwrap();
        // Alice reads her ack, so only the slow peer's outbox fills.
        match tokio::time::timeout(Duration::from_secs(10), a.outbound()).await.unwrap() {
            Some(Outbound::Text(t)) => assert!(t.contains("\"known\""), "{t}"),
            other => panic!("{other:?}"),
        }
    }
    // The load is answered with account, group and map content: more than 600 bytes.
    slow.receive(&encode_frame(&[load(&w.map, None)])).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while svc.stats().slow_peers_closed_total == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut slow = slow;
    match tokio::time::timeout(Duration::from_secs(10), slow.outbound()).await.unwrap() {
        Some(Outbound::Close { code, .. }) => assert_eq!(code, CLOSE_TOO_SLOW),
        other => panic!("expected a close, got {other:?}"),
    }
}
