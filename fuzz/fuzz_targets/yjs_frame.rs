//! y-websocket frames from a client, through the room's whole receive path: lib0 decoding,
//! SyncStep1 / SyncStep2 / Update (yrs' update decoder and apply), awareness, query-awareness.
//! The first byte picks the path: a WebSocket frame from a read-write or read-only connection,
//! or a body of `POST /api/v1/docs/{id}/update`; the rest is the frame or body. Afterwards the
//! room must answer every call without a panic escaping it (yrs panics on some inputs; the room
//! contains them and reports the document as failed, which the server then reloads from
//! storage). Seeds: frames recorded from real y-websocket clients.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_yjs::{Access, ConnId, Room};

fuzz_target!(init: {
    // A panic inside yrs that the room contains is handled behaviour; only one escaping the
    // room (which libfuzzer-sys turns into an abort) is a finding. Keep the contained ones quiet.
    std::panic::set_hook(Box::new(|_| {}));
}, |data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    // A fixed client id keeps runs reproducible (yrs' conflict resolution compares client ids).
    let mut room = Room::from_doc("fuzz", moai_yjs::yrs::Doc::with_client_id(1));
    let (a, b) = (ConnId(1), ConnId(2));
    room.connect(a).unwrap();
    room.connect_with(b, Access::ReadOnly).unwrap();
    match mode % 3 {
        0 => {
            let _ = room.receive(a, rest);
        }
        1 => {
            let _ = room.receive(b, rest);
        }
        _ => {
            let _ = room.apply_http_update(rest);
        }
    }
    let _ = room.encode_state_as_update();
    room.disconnect(a);
    room.disconnect(b);
});
