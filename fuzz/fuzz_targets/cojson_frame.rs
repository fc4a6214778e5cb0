//! CoJSON text frames from a client: frame splitting and message decoding, then every decoded
//! message into the relay (sans-IO), which verifies content (header hash, hash chain,
//! signatures) before anything would be stored. Storage answers "not stored" to every read and
//! "durable" to every write (which is what releases acks and forwarding).
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_cojson::{parse_frame, Action, Event, Incoming, PeerId, Relay, StoredKnown};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut relay = Relay::default();
    let peer = PeerId(1);
    // A second client asks for whatever the first one loads, so it is subscribed and gets
    // content forwarded (dependency order, pieces cut at the durable state).
    let watcher = PeerId(2);
    relay.handle(Event::PeerConnected(peer));
    relay.handle(Event::PeerConnected(watcher));
    let mut pending: Vec<Event> = Vec::new();
    for line in parse_frame(&text) {
        if let Ok(Incoming::Sync(msg)) = line {
            if matches!(msg, moai_cojson::SyncMessage::Load(..)) {
                pending.push(Event::Message(watcher, msg.clone()));
            }
            pending.push(Event::Message(peer, msg));
        }
    }
    // Run the relay to quiescence, answering loads as absent; bounded so a loop is a finding.
    let mut steps = 0;
    while let Some(event) = pending.pop() {
        steps += 1;
        assert!(steps < 10_000, "the relay keeps asking");
        for action in relay.handle(event) {
            match action {
                Action::Load(id) => pending.push(Event::Loaded { id, stored: None }),
                Action::LoadKnown(ids) => {
                    pending.push(Event::KnownLoaded(ids.into_iter().map(|id| (id, StoredKnown::NotStored)).collect()))
                }
                Action::Persist(req) => pending.push(Event::Persisted(req.token)),
                Action::Send(_, out) => {
                    let _ = out.json();
                }
                _ => {}
            }
        }
    }
    relay.handle(Event::PeerDisconnected(peer));
    relay.handle(Event::PeerDisconnected(watcher));
});
