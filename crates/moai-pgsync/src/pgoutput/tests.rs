//! Decoder tests: hand-built byte vectors for every message type, truncation at every offset,
//! and a deterministic random-bytes loop.

use super::*;
use crate::lsn::Lsn;

/// Minimal big-endian writer to build wire messages by hand in tests.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn tag(t: u8) -> Self {
        W(vec![t])
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn cstr(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn text(self, s: &str) -> Self {
        let w = self.u8(b't').i32(s.len() as i32);
        w.raw(s.as_bytes())
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

fn v1() -> Decoder {
    Decoder::new(1).unwrap()
}

fn text(s: &str) -> ColumnValue {
    ColumnValue::Text(s.as_bytes().to_vec())
}

/// Every well-formed sample message used by the exhaustive truncation test, with the decoder
/// state it must be decoded in (`true` = inside a v2 stream block).
fn samples() -> Vec<(Vec<u8>, u32, bool)> {
    vec![
        (W::tag(b'B').u64(0x16B3748).i64(1).u32(7431).done(), 1, false),
        (W::tag(b'C').u8(0).u64(0x16B3748).u64(0x16B3780).i64(2).done(), 1, false),
        (W::tag(b'O').u64(5).cstr("upstream").done(), 1, false),
        (relation_bytes(None), 1, false),
        (relation_bytes(Some(9)), 2, true),
        (W::tag(b'Y').u32(16400).cstr("public").cstr("mood").done(), 1, false),
        (W::tag(b'I').u32(16384).u8(b'N').i16(2).text("1").u8(b'n').done(), 1, false),
        (W::tag(b'I').u32(9).u32(16384).u8(b'N').i16(1).text("1").done(), 2, true),
        (
            W::tag(b'U').u32(16384).u8(b'K').i16(2).text("1").u8(b'n').u8(b'N').i16(2).text("2").u8(b'u').done(),
            1,
            false,
        ),
        (
            W::tag(b'U').u32(16384).u8(b'O').i16(1).text("1").u8(b'N').i16(1).u8(b'b').i32(2).raw(&[0, 1]).done(),
            1,
            false,
        ),
        (W::tag(b'U').u32(16384).u8(b'N').i16(1).text("x").done(), 1, false),
        (W::tag(b'D').u32(16384).u8(b'K').i16(1).text("1").done(), 1, false),
        (W::tag(b'D').u32(16384).u8(b'O').i16(1).text("1").done(), 1, false),
        (W::tag(b'T').i32(2).u8(3).u32(1).u32(2).done(), 1, false),
        (W::tag(b'M').u8(1).u64(77).cstr("moai").i32(3).raw(b"abc").done(), 1, false),
        (W::tag(b'S').u32(9).u8(1).done(), 2, false),
        (W::tag(b'E').done(), 2, true),
        (W::tag(b'c').u32(9).u8(0).u64(100).u64(120).i64(3).done(), 2, false),
        (W::tag(b'A').u32(9).u32(10).done(), 2, false),
        (W::tag(b'A').u32(9).u32(10).u64(100).i64(4).done(), 4, false),
    ]
}

fn relation_bytes(xid: Option<u32>) -> Vec<u8> {
    let mut w = W::tag(b'R');
    if let Some(x) = xid {
        w = w.u32(x);
    }
    w.u32(16384)
        .cstr("public")
        .cstr("todos")
        .u8(b'd')
        .i16(2)
        .u8(1)
        .cstr("id")
        .u32(20)
        .i32(-1)
        .u8(0)
        .cstr("title")
        .u32(25)
        .i32(-1)
        .done()
}

fn decoder_in(version: u32, in_stream: bool) -> Decoder {
    let mut d = Decoder::new(version).unwrap();
    if in_stream {
        d.decode(&W::tag(b'S').u32(9).u8(1).done()).unwrap();
    }
    d
}

#[test]
fn begin_from_literal_bytes() {
    // Written out byte by byte (not with the test writer) so the writer cannot share a mistake
    // with the decoder: 'B', final_lsn 0/16B3748, ts 1_000_000, xid 7431.
    let bytes = [0x42, 0, 0, 0, 0, 0x01, 0x6B, 0x37, 0x48, 0, 0, 0, 0, 0, 0x0F, 0x42, 0x40, 0, 0, 0x1D, 0x07];
    assert_eq!(
        v1().decode(&bytes).unwrap(),
        LogicalMessage::Begin(Begin { final_lsn: "0/16B3748".parse().unwrap(), commit_time: 1_000_000, xid: 7431 })
    );
}

#[test]
fn insert_from_literal_bytes() {
    // 'I', relid 16384, 'N', 2 columns: text "42", null.
    let bytes = [0x49, 0, 0, 0x40, 0, 0x4E, 0, 2, 0x74, 0, 0, 0, 2, b'4', b'2', 0x6E];
    assert_eq!(
        v1().decode(&bytes).unwrap(),
        LogicalMessage::Insert(Insert {
            xid: None,
            relation_id: 16384,
            new: TupleData { columns: vec![text("42"), ColumnValue::Null] }
        })
    );
}

#[test]
fn commit_and_origin() {
    let m = v1().decode(&samples()[1].0).unwrap();
    assert_eq!(
        m,
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x16B3748),
            end_lsn: Lsn(0x16B3780),
            commit_time: 2
        })
    );
    let m = v1().decode(&samples()[2].0).unwrap();
    assert_eq!(m, LogicalMessage::Origin(Origin { commit_lsn: Lsn(5), name: "upstream".into() }));
}

#[test]
fn relation_and_type() {
    let LogicalMessage::Relation(r) = v1().decode(&relation_bytes(None)).unwrap() else { panic!("not a relation") };
    assert_eq!((r.id, r.namespace.as_str(), r.name.as_str()), (16384, "public", "todos"));
    assert_eq!(r.replica_identity, ReplicaIdentity::Default);
    assert_eq!(r.xid, None);
    assert_eq!(
        r.columns,
        vec![
            RelationColumn { is_key: true, name: "id".into(), type_oid: 20, type_modifier: -1 },
            RelationColumn { is_key: false, name: "title".into(), type_oid: 25, type_modifier: -1 },
        ]
    );
    let m = v1().decode(&samples()[5].0).unwrap();
    assert_eq!(
        m,
        LogicalMessage::Type(TypeInfo { xid: None, id: 16400, namespace: "public".into(), name: "mood".into() })
    );
    let bad = W::tag(b'R').u32(1).cstr("s").cstr("t").u8(b'x').i16(0).done();
    assert_eq!(v1().decode(&bad), Err(DecodeError::UnknownReplicaIdentity(b'x')));
}

#[test]
fn update_variants() {
    let s = samples();
    let LogicalMessage::Update(u) = v1().decode(&s[8].0).unwrap() else { panic!() };
    assert_eq!(u.old, Some(OldTuple::Key(TupleData { columns: vec![text("1"), ColumnValue::Null] })));
    assert_eq!(u.new.columns, vec![text("2"), ColumnValue::UnchangedToast]);

    let LogicalMessage::Update(u) = v1().decode(&s[9].0).unwrap() else { panic!() };
    assert_eq!(u.old, Some(OldTuple::Full(TupleData { columns: vec![text("1")] })));
    assert_eq!(u.new.columns, vec![ColumnValue::Binary(vec![0, 1])]);

    let LogicalMessage::Update(u) = v1().decode(&s[10].0).unwrap() else { panic!() };
    assert_eq!(u.old, None);
    assert_eq!(u.new.columns, vec![text("x")]);

    let bad = W::tag(b'U').u32(1).u8(b'Z').i16(0).done();
    assert!(matches!(v1().decode(&bad), Err(DecodeError::UnexpectedTupleMarker { found: b'Z', .. })));
    // Old key tuple must be followed by 'N'.
    let bad = W::tag(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0).done();
    assert!(matches!(v1().decode(&bad), Err(DecodeError::UnexpectedTupleMarker { found: b'K', .. })));
}

#[test]
fn delete_and_truncate() {
    let s = samples();
    let LogicalMessage::Delete(d) = v1().decode(&s[11].0).unwrap() else { panic!() };
    assert_eq!(d.old, OldTuple::Key(TupleData { columns: vec![text("1")] }));
    let LogicalMessage::Delete(d) = v1().decode(&s[12].0).unwrap() else { panic!() };
    assert!(matches!(d.old, OldTuple::Full(_)));
    let bad = W::tag(b'D').u32(1).u8(b'N').i16(0).done();
    assert!(matches!(v1().decode(&bad), Err(DecodeError::UnexpectedTupleMarker { .. })));

    assert_eq!(
        v1().decode(&s[13].0).unwrap(),
        LogicalMessage::Truncate(Truncate {
            xid: None,
            cascade: true,
            restart_identity: true,
            relation_ids: vec![1, 2]
        })
    );
    // A forged huge count fails cleanly instead of allocating.
    let forged = W::tag(b'T').i32(i32::MAX).u8(0).u32(1).done();
    assert!(matches!(v1().decode(&forged), Err(DecodeError::Truncated { .. })));
    let negative = W::tag(b'T').i32(-1).u8(0).done();
    assert!(matches!(v1().decode(&negative), Err(DecodeError::NegativeCount { .. })));
}

#[test]
fn logical_decoding_message() {
    assert_eq!(
        v1().decode(&samples()[14].0).unwrap(),
        LogicalMessage::Message(DecodingMessage {
            xid: None,
            transactional: true,
            lsn: Lsn(77),
            prefix: "moai".into(),
            content: b"abc".to_vec()
        })
    );
}

#[test]
fn tuple_kinds_and_errors() {
    let bad_kind = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'q').done();
    assert_eq!(v1().decode(&bad_kind), Err(DecodeError::UnknownColumnKind { kind: b'q', offset: 8 }));
    let neg_len = W::tag(b'I').u32(1).u8(b'N').i16(1).u8(b't').i32(-5).done();
    assert!(matches!(v1().decode(&neg_len), Err(DecodeError::NegativeCount { .. })));
    let neg_cols = W::tag(b'I').u32(1).u8(b'N').i16(-1).done();
    assert!(matches!(v1().decode(&neg_cols), Err(DecodeError::NegativeCount { .. })));
    let empty_text = W::tag(b'I').u32(1).u8(b'N').i16(1).text("").done();
    let LogicalMessage::Insert(i) = v1().decode(&empty_text).unwrap() else { panic!() };
    assert_eq!(i.new.columns, vec![ColumnValue::Text(vec![])]);
}

#[test]
fn streaming_block_adds_xid_and_tracks_state() {
    let mut d = Decoder::new(2).unwrap();
    assert_eq!(
        d.decode(&W::tag(b'S').u32(9).u8(1).done()).unwrap(),
        LogicalMessage::StreamStart(StreamStart { xid: 9, first_segment: true })
    );
    assert!(d.in_stream());
    assert_eq!(d.decode(&W::tag(b'S').u32(9).u8(0).done()), Err(DecodeError::NestedStreamStart));
    let LogicalMessage::Relation(r) = d.decode(&relation_bytes(Some(9))).unwrap() else { panic!() };
    assert_eq!(r.xid, Some(9));
    let LogicalMessage::Insert(i) = d.decode(&samples()[7].0).unwrap() else { panic!() };
    assert_eq!((i.xid, i.relation_id), (Some(9), 16384));
    let m = W::tag(b'M').u32(9).u8(0).u64(1).cstr("p").i32(0).done();
    let LogicalMessage::Message(m) = d.decode(&m).unwrap() else { panic!() };
    assert_eq!((m.xid, m.transactional), (Some(9), false));
    assert_eq!(d.decode(b"E").unwrap(), LogicalMessage::StreamStop);
    assert!(!d.in_stream());
    assert_eq!(d.decode(b"E"), Err(DecodeError::NotInStream { tag: 'E' }));
    assert_eq!(
        d.decode(&samples()[17].0).unwrap(),
        LogicalMessage::StreamCommit(StreamCommit {
            xid: 9,
            flags: 0,
            commit_lsn: Lsn(100),
            end_lsn: Lsn(120),
            commit_time: 3
        })
    );
    assert_eq!(
        d.decode(&samples()[18].0).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort { xid: 9, subxid: 10, abort_lsn: None, abort_time: None })
    );
    // Outside the block the same Insert bytes are misparsed as relid 9 + garbage, and must fail.
    assert!(d.decode(&samples()[7].0).is_err());
}

#[test]
fn v4_stream_abort_carries_lsn_and_time() {
    assert_eq!(
        Decoder::new(4).unwrap().decode(&samples()[19].0).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort { xid: 9, subxid: 10, abort_lsn: Some(Lsn(100)), abort_time: Some(4) })
    );
    // v2 does not know the extra fields: they are trailing garbage there.
    assert!(matches!(
        Decoder::new(2).unwrap().decode(&samples()[19].0),
        Err(DecodeError::TrailingBytes { tag: 'A', remaining: 16 })
    ));
}

#[test]
fn version_gating_and_unknown_messages() {
    assert!(matches!(v1().decode(&[b'S', 0, 0, 0, 1, 1]), Err(DecodeError::NeedsNewerProtocol { .. })));
    assert_eq!(v1().decode(b"P"), Err(DecodeError::UnsupportedMessage('P')));
    assert_eq!(v1().decode(b"z"), Err(DecodeError::UnknownMessageType(b'z')));
    assert_eq!(v1().decode(&[]), Err(DecodeError::Empty));
    assert!(matches!(Decoder::new(0), Err(DecodeError::UnsupportedProtocolVersion(0))));
    assert!(matches!(Decoder::new(5), Err(DecodeError::UnsupportedProtocolVersion(5))));
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut b = samples()[0].0.clone();
    b.push(0);
    assert_eq!(v1().decode(&b), Err(DecodeError::TrailingBytes { tag: 'B', remaining: 1 }));
}

#[test]
fn every_sample_decodes_and_every_truncation_fails() {
    for (i, (bytes, version, in_stream)) in samples().into_iter().enumerate() {
        let mut d = decoder_in(version, in_stream);
        assert!(d.decode(&bytes).is_ok(), "sample {i} must decode");
        for cut in 0..bytes.len() {
            // The v4 abort's LSN+time suffix is optional: its 9-byte prefix is itself valid.
            if version == 4 && bytes[0] == b'A' && cut == 9 {
                continue;
            }
            let mut d = decoder_in(version, in_stream);
            let before = d.in_stream();
            assert!(d.decode(&bytes[..cut]).is_err(), "sample {i} cut at {cut} must fail");
            assert_eq!(d.in_stream(), before, "failed decode must not change state");
        }
    }
}

/// Tiny deterministic PRNG so the fuzz loop needs no extra crate and is reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let tags = b"BCORYIUDTMSEcAbPKrpxN";
    let mut ok = 0usize;
    for round in 0..60_000 {
        let len = (rng.next() % 48) as usize;
        let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Bias the first byte towards real tags so the fuzz reaches the message bodies.
        if let Some(first) = buf.first_mut() {
            *first = tags[(rng.next() as usize) % tags.len()];
        }
        // Also mutate real samples: flip one byte and/or truncate.
        if round % 3 == 0 {
            let s = samples();
            let (mut b, ..) = s[(rng.next() as usize) % s.len()].clone();
            if !b.is_empty() {
                let at = (rng.next() as usize) % b.len();
                b[at] = rng.next() as u8;
                b.truncate(b.len() - (rng.next() as usize) % 2);
            }
            buf = b;
        }
        for version in [1, 2, 4] {
            let mut d = Decoder::new(version).unwrap();
            if rng.next().is_multiple_of(2) {
                let _ = d.decode(&[b'S', 0, 0, 0, 9, 1]);
            }
            if d.decode(&buf).is_ok() {
                ok += 1;
            }
        }
    }
    // The loop must actually exercise success paths too, not only early failures.
    assert!(ok > 1000, "only {ok} random inputs decoded");
}
