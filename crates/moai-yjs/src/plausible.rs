//! Cheap plausibility checks on the counts at the head of untrusted Yjs payloads, run before
//! yrs decodes them.
//!
//! yrs reserves memory for the number of entries a payload *claims* before it reads them
//! (`try_reserve(len)` on a hash map for a state vector's clients and an update's clients). A
//! hash map's reservation writes its control bytes at once, so five bytes claiming four billion
//! clients made the process touch gigabytes (found by the `yjs_frame` fuzz target:
//! `e2 e2 e2 e2 0a` as an update). Every entry takes at least a few bytes of input, so a count
//! larger than the bytes left to read is a lie and the payload is refused before yrs sees it;
//! what yrs may then reserve is bounded by a small multiple of the payload's size. The same walk
//! bounds the nesting of values, which yrs decodes recursively.

use crate::lib0::Reader;

/// Smallest encoding of one state vector entry: client id and clock, one byte each.
const MIN_STATE_VECTOR_ENTRY: usize = 2;
/// Smallest encoding of one client section of a v1 update: struct count, client id, clock.
const MIN_UPDATE_CLIENT_SECTION: usize = 3;
/// Deepest nesting of `Any` values (arrays and maps) accepted. yrs decodes, drops and encodes
/// them recursively, so a deep nesting (two bytes a level) would overflow the stack and kill the
/// process; serde_json, which parses the JSON contents, stops at 128 too.
pub const MAX_ANY_DEPTH: usize = 128;

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Implausible {
    #[error("payload claims {claimed} entries but has only {bytes} bytes left")]
    Count { claimed: u64, bytes: usize },
    #[error("values nested deeper than {MAX_ANY_DEPTH} levels")]
    TooDeep,
    #[error("a client appears in more than one section of the update")]
    RepeatedClient,
    /// Clocks are `u32`: a section whose structs run past 2^32 (or a deleted range that does)
    /// wraps around inside yrs, which then holds overlapping ids (fuzzing: a use-after-free in
    /// its conflict resolution). No real document gets near 4 billion operations per client.
    #[error("clocks run past 2^32")]
    ClockOverflow,
    /// Legacy JSON content (content ref 2, which Yjs 13 no longer writes): yrs 0.28 writes `n`
    /// strings for it and reads back `n + 1` (so it reads a Yjs-encoded one wrongly too), and the
    /// document's own state then decodes as garbage (fuzzing: a ~60 GB reservation at the next
    /// full-state encode).
    #[error("legacy JSON content (content ref 2) is not supported")]
    LegacyJsonContent,
    /// A subdocument (content ref 9) where [`Policy::allow_subdocuments`] is off: yrs 0.28 never
    /// frees a subdocument's store, so every load and unload of a document holding one leaks
    /// memory (LeakSanitizer, found by fuzzing).
    #[error("subdocuments are not enabled on this server (moai serve --yjs-allow-subdocuments)")]
    Subdocument,
}

/// What this server accepts in updates beyond what every Yjs document needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Accept subdocument references. Off by default: yrs 0.28 leaks a few KiB for each
    /// subdocument every time a document holding it is unloaded, so a client could grow the
    /// server's memory without bound; an operator whose app uses subdocuments turns it on.
    pub allow_subdocuments: bool,
}

/// Walks a payload, refusing what would make yrs over-allocate or recurse without bound. A walk
/// that meets something it cannot parse stops and leaves the verdict to yrs (which refuses
/// malformed input on its own): this check only ever refuses a definite bomb.
struct Walk<'a> {
    reader: Reader<'a>,
    policy: Policy,
}

type Step = Result<(), Stop>;

enum Stop {
    Refuse(Implausible),
    /// Not parseable here: let yrs decide.
    Unparsed,
}

impl From<crate::lib0::DecodeError> for Stop {
    fn from(_: crate::lib0::DecodeError) -> Self {
        Stop::Unparsed
    }
}

/// Most bytes yrs reads for one variable-length integer (it stops with an error after 70 bits).
const YRS_MAX_VARINT_BYTES: usize = 11;

impl<'a> Walk<'a> {
    /// A variable-length integer exactly as yrs decodes it: every 7-bit group shifted in with a
    /// wrapping shift (so a long encoding wraps around instead of failing), up to 11 bytes.
    /// Counts must be computed the way yrs computes them, or a crafted encoding could show this
    /// check a small number and yrs a huge one.
    fn yrs_var(&mut self, bits: u32) -> Result<u64, Stop> {
        let mut num: u64 = 0;
        let mut shift: u32 = 0;
        for _ in 0..YRS_MAX_VARINT_BYTES {
            let byte = self.reader.read_u8()?;
            num |= u64::from(byte & 0x7f).wrapping_shl(shift % bits);
            shift += 7;
            if byte < 0x80 {
                return Ok(if bits == 32 { num & u64::from(u32::MAX) } else { num });
            }
        }
        Err(Stop::Unparsed)
    }

    /// A count of entries that take at least `min_entry` bytes each, read as yrs reads a
    /// `u32` (`bits` 32) or a `usize` (`bits` 64).
    fn count_as(&mut self, min_entry: usize, bits: u32) -> Result<u64, Stop> {
        let claimed = self.yrs_var(bits)?;
        let bytes = self.reader.remaining();
        if claimed > (bytes / min_entry) as u64 {
            return Err(Stop::Refuse(Implausible::Count { claimed, bytes }));
        }
        Ok(claimed)
    }

    /// A count yrs reads as a `u32` (clients, structs, ranges, JSON strings, `Any` lists).
    fn count(&mut self, min_entry: usize) -> Result<u64, Stop> {
        self.count_as(min_entry, 32)
    }

    /// Skips an integer the way yrs reads one (up to 11 bytes).
    fn skip_var(&mut self) -> Step {
        self.yrs_var(64).map(drop)
    }

    /// A length-prefixed string or buffer, its length read as yrs reads it; returns the length.
    fn string(&mut self) -> Result<u64, Stop> {
        let len = self.yrs_var(32)?;
        self.reader.skip(usize::try_from(len).map_err(|_| Stop::Unparsed)?)?;
        Ok(len)
    }

    fn update(&mut self) -> Step {
        let clients = self.count(MIN_UPDATE_CLIENT_SECTION)?;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..clients {
            let blocks = self.count(1)?;
            // Encoders write each client once; yrs merges repeated sections of one client into
            // one list out of clock order, the input of the use-after-free the fuzz target found
            // in yrs' conflict resolution (docs/fuzzing.md).
            if !seen.insert(self.yrs_var(64)?) {
                return Err(Stop::Refuse(Implausible::RepeatedClient));
            }
            let mut clock = self.yrs_var(32)?;
            for _ in 0..blocks {
                clock = clock.saturating_add(self.block()?);
                if clock > u64::from(u32::MAX) {
                    return Err(Stop::Refuse(Implausible::ClockOverflow));
                }
            }
        }
        // Delete set: clients, each with its ranges (clock, length).
        let clients = self.count(2)?;
        for _ in 0..clients {
            self.skip_var()?;
            let ranges = self.count(2)?;
            for _ in 0..ranges {
                let (clock, len) = (self.yrs_var(32)?, self.yrs_var(32)?);
                if clock + len > u64::from(u32::MAX) {
                    return Err(Stop::Refuse(Implausible::ClockOverflow));
                }
            }
        }
        Ok(())
    }

    /// One struct, as yrs' `Update::decode_block` reads it. Returns how far it moves the clock,
    /// or more (a string's UTF-8 byte length bounds its UTF-16 length): only an overflow of
    /// `u32` is looked for, which no real update comes near.
    fn block(&mut self) -> Result<u64, Stop> {
        const HAS_ORIGIN: u8 = 0x80;
        const HAS_RIGHT_ORIGIN: u8 = 0x40;
        const HAS_PARENT_SUB: u8 = 0x20;
        let info = self.reader.read_u8()?;
        if info == 0 || info == 10 {
            // GC or Skip: a length.
            return self.yrs_var(32);
        }
        if info & HAS_ORIGIN != 0 {
            self.skip_var()?;
            self.skip_var()?;
        }
        if info & HAS_RIGHT_ORIGIN != 0 {
            self.skip_var()?;
            self.skip_var()?;
        }
        if info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0 {
            if self.yrs_var(32)? == 1 {
                self.string()?; // named root type
            } else {
                self.skip_var()?; // parent id
                self.skip_var()?;
            }
            if info & HAS_PARENT_SUB != 0 {
                self.string()?;
            }
        }
        let len = match info & 0x0f {
            1 => self.yrs_var(32)?, // deleted: a length
            2 => return Err(Stop::Refuse(Implausible::LegacyJsonContent)),
            4 => self.string()?, // string: UTF-16 length, at most its UTF-8 bytes
            3 | 5 => {
                self.string()?; // binary, embed (JSON text)
                1
            }
            6 => {
                self.string()?; // format: key and JSON value
                self.string()?;
                1
            }
            7 => {
                match self.reader.read_u8()? {
                    3 => {
                        self.string()?; // XML element name
                    }
                    0..=6 | 9 | 15 => {}
                    _ => return Err(Stop::Unparsed),
                }
                1
            }
            8 => {
                let n = self.count(1)?;
                for _ in 0..n {
                    self.any(0)?;
                }
                n
            }
            9 if !self.policy.allow_subdocuments => return Err(Stop::Refuse(Implausible::Subdocument)),
            9 => {
                self.string()?; // sub-document guid, then its options
                self.any(0)?;
                1
            }
            _ => return Err(Stop::Unparsed),
        };
        Ok(len.max(1))
    }

    /// One lib0 `Any` value, as yrs' `Any::decode` reads it.
    fn any(&mut self, depth: usize) -> Step {
        if depth >= MAX_ANY_DEPTH {
            return Err(Stop::Refuse(Implausible::TooDeep));
        }
        match self.reader.read_u8()? {
            127 | 126 | 121 | 120 => {}
            125 => self.skip_var()?,
            124 => self.reader.skip(4)?,
            123 | 122 => self.reader.skip(8)?,
            119 | 116 => {
                self.string()?;
            }
            118 => {
                let n = self.count_as(2, 64)?;
                for _ in 0..n {
                    self.string()?;
                    self.any(depth + 1)?;
                }
            }
            117 => {
                let n = self.count_as(1, 64)?;
                for _ in 0..n {
                    self.any(depth + 1)?;
                }
            }
            _ => return Err(Stop::Unparsed),
        }
        Ok(())
    }
}

fn verdict(step: Step) -> Result<(), Implausible> {
    match step {
        Err(Stop::Refuse(why)) => Err(why),
        Ok(()) | Err(Stop::Unparsed) => Ok(()),
    }
}

/// A v1 state vector (SyncStep1 payload).
pub fn state_vector(bytes: &[u8]) -> Result<(), Implausible> {
    let mut walk = Walk { reader: Reader::new(bytes), policy: Policy::default() };
    verdict(walk.count(MIN_STATE_VECTOR_ENTRY).map(drop))
}

/// A v1 update (SyncStep2, Update, HTTP body): every count in it, and the nesting of its values.
pub fn update_v1(bytes: &[u8]) -> Result<(), Implausible> {
    update_v1_with(bytes, Policy::default())
}

/// [`update_v1`] under a server's [`Policy`].
pub fn update_v1_with(bytes: &[u8], policy: Policy) -> Result<(), Implausible> {
    let mut walk = Walk { reader: Reader::new(bytes), policy };
    verdict(walk.update())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_larger_than_the_input_are_refused() {
        // The fuzzer's finding: 0xe2e2e2e20a claims ~2.7 billion clients in 5 bytes.
        assert!(update_v1(&[0xe2, 0xe2, 0xe2, 0xe2, 0x0a]).is_err());
        assert!(state_vector(&[0xe2, 0xe2, 0xe2, 0xe2, 0x0a]).is_err());
        assert!(update_v1(&[2, 0, 1, 0]).is_err(), "two client sections need six bytes");
        assert!(state_vector(&[2, 1, 1]).is_err());
    }

    #[test]
    fn counts_are_read_the_way_yrs_reads_them() {
        // Found by the yjs_frame fuzz target: ten 0xff bytes and a terminator overflow a strict
        // u64 reader, but yrs wraps them into a count of 0xffff_ffff clients.
        let mut u = vec![0xff; 10];
        u.extend([0x00, 0x01, 0x0c, 0x01, 0xff, 0x00]);
        assert!(matches!(update_v1(&u), Err(Implausible::Count { claimed: 0xffff_ffff, .. })), "{:?}", update_v1(&u));
        // An overlong encoding of a small count is the small count, for yrs and for us.
        assert!(update_v1(&[0x80, 0x80, 0x00, 0x00]).is_ok());
        // A string length that wraps to 1 for yrs must not hide a bomb behind it from us: one
        // client, one string item under root "t" whose length 2^32 + 1 wraps to 1, then a
        // delete set claiming 2^32 - 1 clients.
        let mut u = vec![1, 1, 1, 0, 4, 1, 1, b't'];
        u.extend([0x81, 0x80, 0x80, 0x80, 0x10, b'x']);
        u.extend([0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(update_v1(&u), Err(Implausible::Count { .. })), "{:?}", update_v1(&u));
    }

    #[test]
    fn a_client_repeated_in_one_update_is_refused() {
        // Two sections for client 7 (no encoder writes that; yrs mishandles it: docs/fuzzing.md).
        let u = [2, 0, 7, 0, 0, 7, 5, 0];
        assert_eq!(update_v1(&u), Err(Implausible::RepeatedClient));
        assert!(update_v1(&[2, 0, 7, 0, 0, 8, 5, 0]).is_ok(), "two different clients are fine");
    }

    #[test]
    fn clocks_that_run_past_u32_are_refused() {
        // One client starting at clock 2^32 - 2 with a deleted run of 5: yrs' `clock += len`
        // wraps (the fuzz target's use-after-free in conflict resolution came from such ids).
        let start = [0xfe, 0xff, 0xff, 0xff, 0x0f]; // 2^32 - 2
        let mut u = vec![1, 1, 7];
        u.extend(start);
        u.extend([1, 1, 1, b't', 5, 0]); // deleted content of length 5 under root "t"; no deletes
        assert_eq!(update_v1(&u), Err(Implausible::ClockOverflow));
        // The same run ending exactly at 2^32 - 1 is fine.
        let mut ok = vec![1, 1, 7];
        ok.extend(start);
        ok.extend([1, 1, 1, b't', 1, 0]);
        assert_eq!(update_v1(&ok), Ok(()));
        // A deleted range past 2^32 in the delete set.
        let mut ds = vec![0, 1, 7, 1];
        ds.extend(start);
        ds.push(5);
        assert_eq!(update_v1(&ds), Err(Implausible::ClockOverflow));
        // The fuzz target's input itself.
        let found = include_bytes!("../../../fuzz/seeds/yjs_frame/regression-yrs-clock-overflow-uaf");
        assert_eq!(update_v1(&found[1..]), Err(Implausible::ClockOverflow));
    }

    #[test]
    fn legacy_json_content_is_refused() {
        // One item under root "t" with JSON content holding one string: yrs would read two.
        let u = [1, 1, 7, 0, 2, 1, 1, b't', 1, 2, b'4', b'2', 0];
        assert_eq!(update_v1(&u), Err(Implausible::LegacyJsonContent));
        // The fuzz target's input: accepted, its re-encoding by yrs decoded as ~60 GB of structs.
        let found = include_bytes!("../../../fuzz/seeds/yjs_frame/regression-yrs-legacy-json-reencode");
        assert_eq!(update_v1(&found[1..]), Err(Implausible::LegacyJsonContent));
    }

    #[test]
    fn deep_nesting_is_refused() {
        // One Any item under the root type "t", holding [[[[…]]]] 10 000 levels deep.
        let mut u = vec![1, 1, 1, 0, 8, 1, 1, b't', 1];
        for _ in 0..10_000 {
            u.extend([117, 1]);
        }
        u.push(126);
        u.push(0); // empty delete set
        assert_eq!(update_v1(&u), Err(Implausible::TooDeep));
    }

    #[test]
    fn a_bomb_behind_valid_structs_is_found() {
        // A first client section with one string item, then a second claiming 2^32 structs.
        let mut u = vec![2, 1, 1, 0, 4, 1, 1, b't', 1, b'x'];
        u.extend([0xff, 0xff, 0xff, 0xff, 0x0f, 2, 0]);
        u.extend([0; 8]);
        assert!(matches!(update_v1(&u), Err(Implausible::Count { .. })));
    }

    #[test]
    fn real_payloads_pass() {
        use yrs::updates::decoder::Decode;
        use yrs::updates::encoder::Encode;
        use yrs::{Doc, ReadTxn, Text, Transact};
        for n in [0, 1, 7] {
            let mut docs = Vec::new();
            let merged = Doc::new();
            for i in 0..n {
                let d = Doc::with_client_id(i + 1);
                d.get_or_insert_text("t").insert(&mut d.transact_mut(), 0, "x");
                docs.push(d);
            }
            for d in &docs {
                let u = d.transact().encode_state_as_update_v1(&Default::default());
                merged.transact_mut().apply_update(yrs::Update::decode_v1(&u).unwrap()).unwrap();
            }
            let txn = merged.transact();
            update_v1(&txn.encode_state_as_update_v1(&Default::default())).unwrap();
            state_vector(&txn.state_vector().encode_v1()).unwrap();
        }
        assert!(update_v1(&[0, 0]).is_ok(), "the empty update");
        assert!(state_vector(&[0]).is_ok(), "the empty state vector");
    }
}
