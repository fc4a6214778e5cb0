//! Change-feed client frames (`hello`, `ack`, `subscribe`, …) and the shape predicates inside
//! them: JSON decoding, the bad-hello explanation, shape parsing, and evaluating every parsed
//! predicate against a row built from the same input; and the same frame through the
//! session's state machine (`Subscription`), as the server would take it, with the catalog
//! answering every lookup.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_pgsync::protocol::{explain_bad_hello, ClientMessage};
use moai_pgsync::shape::Shape;
use moai_pgsync::subscription::{Action, Event, Subscription, SubscriptionConfig};
use moai_pgsync::{Access, FeedState, Lsn, Phase};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut subscription = Subscription::new(
        SubscriptionConfig {
            tables: vec!["public.t".into()],
            default_batch_rows: 1000,
            max_batch_rows: 5000,
            default_window: 4,
            max_shapes: 100,
            max_client_id_bytes: 256,
        },
        Access::all(),
    );
    let ready =
        FeedState { phase: Phase::Streaming, generation: 1, watermark: Lsn(0x100), horizon: Lsn(0), caught_up: true };
    subscription.handle(Event::Feed(ready));
    for action in subscription.handle(Event::ClientText(text.to_string())) {
        if let Action::LookUpColumns(tables) = action {
            let columns = ["id", "owner", "done", "n"].map(String::from).to_vec();
            subscription.handle(Event::Columns(tables.into_iter().map(|t| (t, columns.clone())).collect()));
        }
    }
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
