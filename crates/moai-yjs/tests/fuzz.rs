//! Fuzz-like robustness: random and mutated frames must never panic the room, and a frame that
//! emits no `Persist` must leave the document exactly as it was.

mod support;

use moai_yjs::{Action, ConnId, Room};
use support::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(3) {
            let i = self.below(out.len() + 1);
            match self.below(4) {
                0 if i < out.len() => out[i] ^= 1 << self.below(8),
                1 => out.truncate(i),
                2 => out.insert(i, self.next() as u8),
                _ if i < out.len() => out[i] = [0x00, 0x7f, 0x80, 0xff][self.below(4)],
                _ => {}
            }
        }
        out
    }
}

#[test]
fn random_and_mutated_frames_never_panic_or_silently_change_the_doc() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let author = Client::new(1);
    let mut seeds = vec![author.step1_frame()];
    for i in 0..12u32 {
        seeds.push(update_frame(&author.insert(i, &format!("w{i}"))));
    }
    {
        // Deletions and nested types give the mutator more structure to break.
        use moai_yjs::yrs::{Array, Map, Text, Transact, WriteTxn};
        let text = author.doc.get_or_insert_text("t");
        let mut txn = author.doc.transact_mut();
        text.remove_range(&mut txn, 2, 5);
        let map = txn.get_or_insert_map("m");
        map.insert(&mut txn, "k", "v");
        let arr = txn.get_or_insert_array("a");
        arr.push_back(&mut txn, 42);
        seeds.push(update_frame(&txn.encode_update_v1()));
    }
    seeds.push(update_frame(&full_state(&author.doc)));
    seeds.push(vec![0x01, 0x0a, 0x01, 0x07, 0x02, 0x06, b'{', b'"', b'a', b'"', b':', b'1']);

    let mut closes = 0;
    for round in 0..3000 {
        // A fresh room now and then, so mutations also hit a document that has content.
        let mut room = Room::new("fuzz");
        room.connect(ConnId(1)).unwrap();
        if round % 2 == 0 {
            let base = seeds[1 + rng.below(4)].clone();
            room.receive(ConnId(1), &base).unwrap();
        }
        let frame = if round % 5 == 0 {
            (0..rng.below(40)).map(|_| rng.next() as u8).collect()
        } else {
            let s = rng.below(seeds.len());
            rng.mutate(&seeds[s])
        };
        let before = integrated_state(room.doc());
        let actions = room.receive(ConnId(1), &frame).expect("room must not fail on peer input");
        let persisted = actions.iter().any(|a| matches!(a, Action::Persist { .. }));
        if !persisted {
            // Pending structs may have been parked; the integrated document must be unchanged.
            assert_eq!(integrated_state(room.doc()), before, "doc changed without Persist: {frame:?}");
        }
        if actions.iter().any(|a| matches!(a, Action::Close { .. })) {
            closes += 1;
        }
    }
    // The mutator must actually produce rejections, or this test proves nothing.
    assert!(closes > 300, "only {closes} closes");
}
