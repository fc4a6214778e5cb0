//! Awareness update payloads: the decoder, then the tracker's clock rules and limits from two
//! connections (one relaying the other's states), then re-encoding what was accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_yjs::{AwarenessTracker, AwarenessUpdate, ConnId};

fuzz_target!(|data: &[u8]| {
    let mut tracker = AwarenessTracker::new(8).with_limits(4, 256);
    tracker.add_connection(ConnId(1));
    tracker.add_connection(ConnId(2));
    for (i, chunk) in data.split(|&x| x == 0xfe).enumerate() {
        let Ok(update) = AwarenessUpdate::decode(chunk) else { continue };
        let round_trip = AwarenessUpdate::decode(&update.encode()).expect("what we encode decodes");
        assert_eq!(round_trip.entries.len(), update.entries.len());
        if let Ok(Some(changed)) = tracker.apply(ConnId(1 + (i as u64 % 2)), &update) {
            AwarenessUpdate::decode(&changed.encode()).expect("broadcasts decode");
        }
        if i % 5 == 4 {
            tracker.remove_connection(ConnId(1));
            tracker.add_connection(ConnId(1));
        }
    }
    if let Some(all) = tracker.all_states() {
        AwarenessUpdate::decode(&all.encode()).expect("the joiner's snapshot decodes");
    }
});
