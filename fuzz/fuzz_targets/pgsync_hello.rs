//! Change-feed client frames (`hello`, `ack`, `subscribe`, …) and the shape predicates inside
//! them: JSON decoding, the bad-hello explanation, shape parsing, and evaluating every parsed
//! predicate against a row built from the same input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_pgsync::protocol::{explain_bad_hello, ClientMessage};
use moai_pgsync::shape::Shape;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let shapes = match ClientMessage::from_json(&text) {
        Ok(ClientMessage::Hello(h)) => h.shapes,
        Ok(ClientMessage::Subscribe { shapes }) => shapes,
        Ok(_) => return,
        Err(_) => {
            let _ = explain_bad_hello(&text);
            // The whole input as a predicate, too: tokens carry predicates as plain strings.
            let _ = Shape::parse("public.t", None, Some(&text));
            return;
        }
    };
    for req in &shapes {
        if let Ok(shape) = Shape::from_request(req) {
            let row: moai_pgsync::protocol::Row =
                serde_json::from_str(r#"{"id":1,"owner":"u1","done":false,"n":null}"#).unwrap();
            let _ = shape.evaluate(&row);
            let _ = shape.project(&row);
        }
    }
});
