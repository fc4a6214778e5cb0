//! Yjs helpers for protocol-level tests: make an edit, read a document's text, ask the server
//! for a document's state over a raw socket.

use std::time::Duration;

use futures_util::SinkExt;
use moai_yjs::protocol::sync_step1_frame;
use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{Doc, GetString, Text, Transact, Update};
use moai_yjs::{Message, SyncMessage};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::ws::{next_within, Ws};

/// Appends `s` to the text "t" of `doc`; returns the v1 update of that edit.
pub fn edit(doc: &Doc, s: &str) -> Vec<u8> {
    let t = doc.get_or_insert_text("t");
    let mut txn = doc.transact_mut();
    let len = t.len(&txn);
    t.insert(&mut txn, len, s);
    txn.encode_update_v1()
}

/// The text "t" of a document holding just `update`.
pub fn text_of_update(update: &[u8]) -> String {
    let doc = Doc::new();
    doc.transact_mut().apply_update(Update::decode_v1(update).unwrap()).unwrap();
    let t = doc.get_or_insert_text("t");
    let s = t.get_string(&doc.transact());
    s
}

/// Sends SyncStep1 with an empty state vector and returns the text of the server's SyncStep2.
pub async fn sync(ws: &mut Ws) -> String {
    ws.send(WsMessage::Binary(sync_step1_frame(&[0]).into())).await.unwrap();
    loop {
        if let WsMessage::Binary(b) = next_within(ws, Duration::from_secs(10)).await {
            if let Ok(Message::Sync(SyncMessage::Step2(update))) = Message::decode(&b) {
                return text_of_update(update);
            }
        }
    }
}
