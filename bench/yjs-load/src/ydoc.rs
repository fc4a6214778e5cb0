//! The Yjs side of the load, done with yrs: writers' single-character edits, answers to a
//! server's SyncStep1, and the deterministic ~10 MB document of the big-doc scenario.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, StateVector, Text, TextRef, Transact, Update};

/// Name of the shared Y.Text every client edits (what `ydoc.getText('t')` reads in JS).
pub const TEXT: &str = "t";

pub fn state_vector(doc: &Doc) -> Vec<u8> {
    doc.transact().state_vector().encode_v1()
}

/// What `doc` has that the holder of `remote_sv` lacks. A malformed state vector is treated as
/// empty (send everything), which is always a correct answer.
pub fn diff(doc: &Doc, remote_sv: &[u8]) -> Vec<u8> {
    let sv = StateVector::decode_v1(remote_sv).unwrap_or_default();
    doc.transact().encode_state_as_update_v1(&sv)
}

/// A client that types: each call appends one character in its own transaction, so its k-th
/// update is exactly the item `(client_id, k)`.
pub struct Typist {
    pub doc: Doc,
    text: TextRef,
    typed: u64,
}

impl Typist {
    pub fn new(client_id: u64) -> Self {
        let doc = Doc::with_client_id(client_id);
        let text = doc.get_or_insert_text(TEXT);
        Self { doc, text, typed: 0 }
    }

    pub fn type_char(&mut self) -> Vec<u8> {
        let ch = [b'a' + (self.typed % 26) as u8];
        self.typed += 1;
        let mut txn = self.doc.transact_mut();
        let end = self.text.len(&txn);
        self.text.insert(&mut txn, end, std::str::from_utf8(&ch).unwrap_or("x"));
        txn.encode_update_v1()
    }
}

/// Client ID of the author of the big document (its edits come from another client).
pub const BIG_AUTHOR: u64 = 42;

/// Builds a document whose encoded state is at least `target_bytes`, the way the spec's baseline
/// did (§7.3): ~1 KiB paragraph appends, with a 64-character insert in the middle of the text and
/// a 100-character delete every 10th operation, so the state has many blocks and a delete set,
/// not one long string. Deterministic (fixed seed), returns the full state as a v1 update.
pub fn build_big_doc(target_bytes: usize) -> (Vec<u8>, usize) {
    let doc = Doc::with_client_id(BIG_AUTHOR);
    let text = doc.get_or_insert_text(TEXT);
    let mut rng = SmallRng::seed_from_u64(0x6d6f6169);
    let mut ops = 0usize;
    loop {
        let chars;
        {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn) as usize;
            ops += 1;
            if ops % 10 == 0 && len > 1000 {
                let at = rng.random_range(0..len - 200) as u32;
                text.insert(&mut txn, at, &words(&mut rng, 64));
                let at = rng.random_range(0..len - 200) as u32;
                text.remove_range(&mut txn, at, 100);
            } else {
                let mut para = words(&mut rng, 1023);
                para.push('\n');
                text.insert(&mut txn, len as u32, &para);
            }
            chars = text.len(&txn) as usize;
        }
        // The encoded state is ~1x the text for this shape; check the real size only near the end.
        if chars >= target_bytes * 9 / 10 && ops % 100 == 0 {
            let state = doc.transact().encode_state_as_update_v1(&StateVector::default());
            if state.len() >= target_bytes {
                return (state, chars);
            }
        }
    }
}

/// Lowercase pseudo-words and spaces, exactly `len` ASCII bytes.
fn words(rng: &mut SmallRng, len: usize) -> String {
    let mut s = String::with_capacity(len);
    while s.len() < len {
        if !s.is_empty() && rng.random_range(0..6) == 0 {
            s.push(' ');
        } else {
            s.push((b'a' + rng.random_range(0..26u8)) as char);
        }
    }
    s
}

/// An editor working on a copy of the big document: single-character inserts at random places.
pub struct Editor {
    pub doc: Doc,
    text: TextRef,
    rng: SmallRng,
}

impl Editor {
    pub fn new(client_id: u64, state: &[u8]) -> anyhow::Result<Self> {
        let doc = Doc::with_client_id(client_id);
        let text = doc.get_or_insert_text(TEXT);
        doc.transact_mut().apply_update(Update::decode_v1(state)?)?;
        Ok(Self { doc, text, rng: SmallRng::seed_from_u64(7) })
    }

    #[cfg(test)]
    pub fn len(&self) -> u32 {
        self.text.len(&self.doc.transact())
    }

    /// Inserts one character at a random position; returns the update.
    pub fn edit(&mut self) -> Vec<u8> {
        let mut txn = self.doc.transact_mut();
        let len = self.text.len(&txn);
        let at = self.rng.random_range(0..=len);
        self.text.insert(&mut txn, at, "x");
        txn.encode_update_v1()
    }

    #[cfg(test)]
    pub fn text(&self) -> String {
        use yrs::GetString;
        self.text.get_string(&self.doc.transact())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::GetString;

    #[test]
    fn typist_update_k_is_item_k() {
        let mut t = Typist::new(1_000_007);
        for k in 0..5u32 {
            let u = Update::decode_v1(&t.type_char()).unwrap();
            let ins = u.insertions(true);
            let items: Vec<_> = ins.iter().flat_map(|(c, r)| r.iter().map(move |r| (c.get(), r.clone()))).collect();
            assert_eq!(items, vec![(1_000_007, k..k + 1)]);
        }
        // A fresh doc applying the updates in order reads the typed text.
        let d = Doc::new();
        d.transact_mut().apply_update(Update::decode_v1(&diff(&t.doc, &[0])).unwrap()).unwrap();
        assert_eq!(d.get_or_insert_text(TEXT).get_string(&d.transact()), "abcde");
    }

    #[test]
    fn big_doc_reaches_its_size_and_can_be_edited() {
        let (state, chars) = build_big_doc(200_000);
        assert!(state.len() >= 200_000 && chars > 150_000, "{} {}", state.len(), chars);
        let mut e = Editor::new(5, &state).unwrap();
        let before = e.len();
        let u = Update::decode_v1(&e.edit()).unwrap();
        assert_eq!(e.len(), before + 1);
        assert_eq!(u.insertions(true).iter().count(), 1);
        assert!(e.text().len() as u32 == before + 1);
    }
}
