//! Agent mode's upstream link (sans-IO) driven by what either server may send it: each input
//! line is an event, its first byte says which (`U`/`L`: a frame from upstream or from the
//! local relay, `C`/`D`: the link comes or goes, `F`/`G`: follow or fetch a CoValue). The link
//! must never panic, never follow more than its bound (plus what waiting fetches hold), never
//! send while down, answer each fetch once, and only ever send messages that encode and parse
//! back as themselves.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use moai_cojson::{parse_frame, CoId, Incoming, Side, Uplink, UplinkAction, UplinkConfig, UplinkEvent};

const MAX_FOLLOWED: usize = 8;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut uplink = Uplink::new(UplinkConfig { max_followed: MAX_FOLLOWED });
    let mut connected = false;
    let mut next_fetch = 0u64;
    let mut open_fetches = HashSet::new();
    for line in text.split('\n') {
        let mut chars = line.chars();
        let Some(kind) = chars.next().filter(char::is_ascii).map(|c| c as u8) else { continue };
        let rest = chars.as_str();
        let events: Vec<UplinkEvent> = match kind {
            b'U' | b'L' => {
                let side = if kind == b'U' { Side::Upstream } else { Side::Local };
                parse_frame(rest)
                    .into_iter()
                    .filter_map(|m| match m {
                        Ok(Incoming::Sync(msg)) => Some(UplinkEvent::Message(side, msg)),
                        _ => None,
                    })
                    .collect()
            }
            b'C' => {
                connected = true;
                vec![UplinkEvent::Connected]
            }
            b'D' => {
                connected = false;
                vec![UplinkEvent::Disconnected]
            }
            b'F' | b'G' => match CoId::parse(rest.trim()) {
                Ok(id) if kind == b'F' => vec![UplinkEvent::Follow(id)],
                Ok(id) => {
                    next_fetch += 1;
                    open_fetches.insert(next_fetch);
                    vec![UplinkEvent::Fetch(next_fetch, id)]
                }
                Err(_) => Vec::new(),
            },
            _ => Vec::new(),
        };
        for event in events {
            for action in uplink.handle(event) {
                match action {
                    UplinkAction::Send(_, msg) => {
                        assert!(connected, "sent while the link is down: {msg:?}");
                        let json = msg.to_json();
                        let back = parse_frame(&json);
                        assert!(
                            matches!(back.as_slice(), [Ok(Incoming::Sync(m))] if *m == msg),
                            "a sent message does not parse back as itself: {json}"
                        );
                    }
                    UplinkAction::Fetched(id, _) => {
                        assert!(open_fetches.remove(&id), "fetch {id} answered twice or never asked");
                    }
                }
            }
            // Beyond the bound only while fetches wait (what they found is not kept).
            assert!(uplink.followed_count() <= MAX_FOLLOWED + open_fetches.len());
        }
    }
});
