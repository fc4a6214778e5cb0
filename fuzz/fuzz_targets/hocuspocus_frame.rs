//! Hocuspocus frames from a client (docs/protocols/hocuspocus.md): the envelope codec (address,
//! auth with provider 4's version, close, sync reply, the one-byte pong), and what it hands to
//! the room, through the room's Hocuspocus dialect: sync with acknowledgements, awareness,
//! stateless messages, from a read-write or a read-only connection (the address's length picks
//! which), beside a y-websocket connection that must not be disturbed. Afterwards the room must
//! still answer without a panic escaping it. Seeds: frames recorded from the real providers
//! (3.4.4 and 4.8.0) in the interop tests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_yjs::hocuspocus::{document_name, stateless_payload, ClientFrame, ClientMessage};
use moai_yjs::{Access, ConnId, Dialect, Room};

fuzz_target!(init: {
    // Panics inside yrs that the room contains are handled behaviour (see yjs_frame).
    std::panic::set_hook(Box::new(|_| {}));
}, |data: &[u8]| {
    let Ok(frame) = ClientFrame::decode(data) else { return };
    let ClientFrame::Addressed { address, message } = frame else { return };
    let _ = document_name(address);
    let mut room = Room::from_doc("fuzz", moai_yjs::yrs::Doc::with_client_id(1));
    let (writer, reader, other) = (ConnId(1), ConnId(2), ConnId(3));
    room.connect_as(writer, Access::ReadWrite, Dialect::Hocuspocus).unwrap();
    room.connect_as(reader, Access::ReadOnly, Dialect::Hocuspocus).unwrap();
    room.connect(other).unwrap();
    let conn = if address.len() % 2 == 0 { writer } else { reader };
    match message {
        ClientMessage::Room(m) => {
            let _ = stateless_payload(m);
            let _ = room.receive(conn, m);
        }
        ClientMessage::SyncReply { body } => {
            let mut m = vec![0];
            m.extend_from_slice(body);
            let _ = room.receive(conn, &m);
        }
        _ => {}
    }
    let _ = room.encode_state_as_update();
    for c in [writer, reader, other] {
        room.disconnect(c);
    }
});
