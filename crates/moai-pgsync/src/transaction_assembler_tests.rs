//! Transaction assembler tests, driven with decoded messages (as the replicator would).

use super::*;
use crate::pgoutput::{Begin, Commit, Delete, Insert, Origin, RelationColumn, ReplicaIdentity, Truncate, Update};
use serde_json::json;

const TODOS: Oid = 16384;
const NOTES: Oid = 16390;

fn t(s: &str) -> ColumnValue {
    ColumnValue::Text(s.as_bytes().to_vec())
}

fn tuple(cols: Vec<ColumnValue>) -> TupleData {
    TupleData { columns: cols }
}

fn row(v: serde_json::Value) -> Row {
    v.as_object().cloned().unwrap()
}

fn todos(identity: ReplicaIdentity, extra: &[(&str, Oid)]) -> LogicalMessage {
    let full = identity == ReplicaIdentity::Full;
    let mut columns = vec![
        RelationColumn { is_key: true, name: "id".into(), type_oid: 20, type_modifier: -1 },
        RelationColumn { is_key: full, name: "title".into(), type_oid: 25, type_modifier: -1 },
        RelationColumn { is_key: full, name: "done".into(), type_oid: 16, type_modifier: -1 },
    ];
    for (name, oid) in extra {
        columns.push(RelationColumn { is_key: full, name: (*name).into(), type_oid: *oid, type_modifier: -1 });
    }
    LogicalMessage::Relation(Relation {
        xid: None,
        id: TODOS,
        namespace: "public".into(),
        name: "todos".into(),
        replica_identity: identity,
        columns,
    })
}

fn notes() -> LogicalMessage {
    LogicalMessage::Relation(Relation {
        xid: None,
        id: NOTES,
        namespace: "app".into(),
        name: "notes".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![RelationColumn { is_key: true, name: "k".into(), type_oid: 25, type_modifier: -1 }],
    })
}

fn begin(lsn: u64, xid: u32) -> LogicalMessage {
    LogicalMessage::Begin(Begin { final_lsn: Lsn(lsn), commit_time: 0, xid })
}

fn commit(lsn: u64) -> LogicalMessage {
    LogicalMessage::Commit(Commit { flags: 0, commit_lsn: Lsn(lsn), end_lsn: Lsn(lsn + 0x30), commit_time: 0 })
}

fn insert(rel: Oid, cols: Vec<ColumnValue>) -> LogicalMessage {
    LogicalMessage::Insert(Insert { xid: None, relation_id: rel, new: tuple(cols) })
}

fn run(a: &mut TransactionAssembler, msgs: Vec<LogicalMessage>) -> Vec<Assembled> {
    msgs.into_iter().filter_map(|m| a.push(m).unwrap()).collect()
}

fn only_txn(out: Vec<Assembled>) -> Transaction {
    match <[Assembled; 1]>::try_from(out) {
        Ok([Assembled::Transaction(t)]) => t,
        Ok(other) => panic!("expected one transaction, got {other:?}"),
        Err(v) => panic!("expected one output, got {}", v.len()),
    }
}

#[test]
fn transaction_is_emitted_only_at_commit_with_dense_seq() {
    let mut a = TransactionAssembler::new();
    assert!(a.push(todos(ReplicaIdentity::Default, &[])).unwrap().is_none());
    assert!(a.push(begin(0x100, 7)).unwrap().is_none());
    for i in 0..5 {
        let out = a.push(insert(TODOS, vec![t(&i.to_string()), t("x"), t("f")])).unwrap();
        assert!(out.is_none(), "nothing may be visible before Commit");
    }
    let txn = only_txn(vec![a.push(commit(0x100)).unwrap().unwrap()]);
    assert_eq!(txn.commit_lsn, Lsn(0x100));
    assert_eq!(txn.end_lsn, Lsn(0x130));
    assert_eq!(txn.xid, 7);
    let seqs: Vec<u32> = txn.changes.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    assert_eq!(txn.end_position(), Position::new(Lsn(0x100), 4));
    let c = &txn.changes[2];
    assert_eq!(c.op, ChangeOp::Insert);
    assert_eq!(c.table, "public.todos");
    assert_eq!(c.key, Some(row(json!({"id": 2}))));
    assert_eq!(c.row, Some(row(json!({"id": 2, "title": "x", "done": false}))));
    assert!(!a.in_transaction());
}

#[test]
fn big_transaction_keyset_paging_loses_nothing() {
    // Two transactions, the first far bigger than a page: page through (commit_lsn, seq) and
    // make sure every change is seen exactly once (the original `lsn > $1 LIMIT n` bug).
    let mut a = TransactionAssembler::new();
    let mut msgs = vec![todos(ReplicaIdentity::Default, &[]), begin(0x200, 1)];
    for i in 0..2500 {
        msgs.push(insert(TODOS, vec![t(&i.to_string()), ColumnValue::Null, t("f")]));
    }
    msgs.push(commit(0x200));
    msgs.push(begin(0x300, 2));
    msgs.push(insert(TODOS, vec![t("9999"), t("y"), t("t")]));
    msgs.push(commit(0x300));
    let txns: Vec<Transaction> = run(&mut a, msgs)
        .into_iter()
        .map(|o| match o {
            Assembled::Transaction(t) => t,
            other => panic!("{other:?}"),
        })
        .collect();
    let all: Vec<(Position, Change)> = txns
        .iter()
        .flat_map(|t| t.changes.iter().map(move |c| (Position::new(t.commit_lsn, c.seq), c.clone())))
        .collect();
    let mut after: Option<Position> = None;
    let mut seen = 0;
    loop {
        let page: Vec<_> = all.iter().filter(|(p, _)| after.is_none_or(|a| *p > a)).take(1000).collect();
        if page.is_empty() {
            break;
        }
        seen += page.len();
        after = page.last().map(|(p, _)| *p);
    }
    assert_eq!(seen, 2501);
    // The naive LSN-only keyset stops after the first page of the big transaction.
    let naive: usize = {
        let mut after = Lsn(0);
        let mut n = 0;
        loop {
            let page: Vec<_> = all.iter().filter(|(p, _)| p.lsn > after).take(1000).collect();
            if page.is_empty() {
                break;
            }
            n += page.len();
            after = page.last().map(|(p, _)| p.lsn).unwrap();
        }
        n
    };
    assert!(naive < 2501, "the test must be able to tell the two schemes apart");
}

#[test]
fn update_patch_with_unchanged_toast_and_key_change() {
    let mut a = TransactionAssembler::new();
    let out = run(
        &mut a,
        vec![
            todos(ReplicaIdentity::Default, &[("body", 25)]),
            begin(0x10, 1),
            // Key changed 1 -> 2: Postgres sends the old key tuple ('K').
            LogicalMessage::Update(Update {
                xid: None,
                relation_id: TODOS,
                old: Some(OldTuple::Key(tuple(vec![t("1"), ColumnValue::Null, ColumnValue::Null, ColumnValue::Null]))),
                new: tuple(vec![t("2"), t("a"), t("t"), ColumnValue::UnchangedToast]),
            }),
            // Key unchanged, no old tuple.
            LogicalMessage::Update(Update {
                xid: None,
                relation_id: TODOS,
                old: None,
                new: tuple(vec![t("3"), t("b"), t("f"), ColumnValue::UnchangedToast]),
            }),
            commit(0x10),
        ],
    );
    let txn = only_txn(out);
    let u = &txn.changes[0];
    assert_eq!(u.op, ChangeOp::Update);
    assert_eq!(u.key, Some(row(json!({"id": 2}))));
    assert_eq!(u.old_key, Some(row(json!({"id": 1}))));
    assert_eq!(u.row, Some(row(json!({"id": 2, "title": "a", "done": true}))));
    assert_eq!(u.unchanged, vec!["body".to_string()]);
    assert_eq!(u.old, None);
    let u = &txn.changes[1];
    assert_eq!(u.old_key, None);
    assert_eq!(u.key, Some(row(json!({"id": 3}))));

    let wire = serde_json::to_value(txn.to_wire()).unwrap();
    assert_eq!(wire["ops"][0]["old_key"], json!({"id": 1}));
    assert_eq!(wire["ops"][0]["unchanged"], json!(["body"]));
    assert_eq!(wire["ops"][1]["old_key"], json!(null));
    assert_eq!(wire["last"], json!(true));
    assert_eq!(wire["xid"], json!("1"));
}

#[test]
fn full_identity_fills_toast_from_old_row_and_key_override_applies() {
    let mut a = TransactionAssembler::new();
    a.set_key_columns("public.todos", vec!["id".into()]);
    let out = run(
        &mut a,
        vec![
            todos(ReplicaIdentity::Full, &[("body", 25)]),
            begin(0x10, 1),
            LogicalMessage::Update(Update {
                xid: None,
                relation_id: TODOS,
                old: Some(OldTuple::Full(tuple(vec![t("1"), t("a"), t("f"), t("long body")]))),
                new: tuple(vec![t("1"), t("a"), t("t"), ColumnValue::UnchangedToast]),
            }),
            LogicalMessage::Delete(Delete {
                xid: None,
                relation_id: TODOS,
                old: OldTuple::Full(tuple(vec![t("1"), t("a"), t("t"), t("long body")])),
            }),
            commit(0x10),
        ],
    );
    let txn = only_txn(out);
    let u = &txn.changes[0];
    assert_eq!(u.row, Some(row(json!({"id": 1, "title": "a", "done": true, "body": "long body"}))));
    assert!(u.unchanged.is_empty());
    assert_eq!(u.key, Some(row(json!({"id": 1}))), "override must beat FULL's all-columns flags");
    assert_eq!(u.old_key, None);
    assert_eq!(u.old.as_ref().and_then(|o| o.get("done")), Some(&json!(false)));
    let d = &txn.changes[1];
    assert_eq!((d.op, d.seq), (ChangeOp::Delete, 1));
    assert_eq!(d.key, Some(row(json!({"id": 1}))));
    assert!(d.old.is_some());

    // Without the override, FULL identity makes every column part of the key.
    let mut b = TransactionAssembler::new();
    let txn = only_txn(run(
        &mut b,
        vec![
            todos(ReplicaIdentity::Full, &[]),
            begin(0x20, 2),
            insert(TODOS, vec![t("5"), t("z"), t("f")]),
            commit(0x20),
        ],
    ));
    assert_eq!(txn.changes[0].key.as_ref().map(|k| k.len()), Some(3));
}

#[test]
fn delete_with_key_tuple_and_truncate_of_many_tables() {
    let mut a = TransactionAssembler::new();
    let txn = only_txn(run(
        &mut a,
        vec![
            todos(ReplicaIdentity::Default, &[]),
            notes(),
            begin(0x40, 3),
            LogicalMessage::Origin(Origin { commit_lsn: Lsn(1), name: "peer".into() }),
            LogicalMessage::Delete(Delete {
                xid: None,
                relation_id: TODOS,
                old: OldTuple::Key(tuple(vec![t("4"), ColumnValue::Null, ColumnValue::Null])),
            }),
            LogicalMessage::Truncate(Truncate {
                xid: None,
                cascade: false,
                restart_identity: false,
                relation_ids: vec![TODOS, NOTES],
            }),
            commit(0x40),
        ],
    ));
    assert_eq!(txn.origin.as_deref(), Some("peer"));
    assert_eq!(txn.changes[0].key, Some(row(json!({"id": 4}))));
    assert_eq!(txn.changes[0].old, None);
    let truncs: Vec<(u32, &str, ChangeOp)> = txn.changes[1..].iter().map(|c| (c.seq, c.table.as_str(), c.op)).collect();
    assert_eq!(truncs, vec![(1, "public.todos", ChangeOp::Truncate), (2, "app.notes", ChangeOp::Truncate)]);
    let wire = txn.to_wire();
    assert_eq!(wire.ops.len(), 3);
    assert_eq!(wire.ops[2].seq(), 2);
}

#[test]
fn changed_relation_inside_transaction_emits_schema_change() {
    let mut a = TransactionAssembler::new();
    run(&mut a, vec![todos(ReplicaIdentity::Default, &[]), begin(1, 1), commit(1)]);
    let txn = only_txn(run(
        &mut a,
        vec![
            begin(2, 2),
            todos(ReplicaIdentity::Default, &[]), // re-announced, identical: no marker
            todos(ReplicaIdentity::Default, &[("prio", 23)]),
            insert(TODOS, vec![t("1"), t("a"), t("f"), t("3")]),
            commit(2),
        ],
    ));
    assert_eq!(txn.changes.len(), 2);
    let s = &txn.changes[0];
    assert_eq!((s.op, s.seq, s.op.code()), (ChangeOp::Schema, 0, 'S'));
    let cols: Vec<(String, String)> = s.schema.clone().unwrap().into_iter().map(|c| (c.name, c.type_name)).collect();
    assert_eq!(cols.last(), Some(&("prio".to_string(), "int4".to_string())));
    assert_eq!(txn.changes[1].row.as_ref().and_then(|r| r.get("prio")), Some(&json!(3)));
    // Schema markers are not client ops.
    assert_eq!(txn.to_wire().ops.len(), 1);
}

#[test]
fn messages_transactional_and_not() {
    let mut a = TransactionAssembler::new();
    let msg = |transactional| {
        LogicalMessage::Message(DecodingMessage {
            xid: None,
            transactional,
            lsn: Lsn(5),
            prefix: "moai".into(),
            content: vec![1],
        })
    };
    let out = a.push(msg(false)).unwrap();
    assert!(matches!(out, Some(Assembled::Message(m)) if !m.transactional));
    let txn = only_txn(run(&mut a, vec![begin(9, 1), msg(true), commit(9)]));
    assert_eq!(txn.messages.len(), 1);
    assert!(txn.changes.is_empty());
    assert_eq!(txn.end_position(), Position::new(Lsn(9), 0));
}

#[test]
fn protocol_violations_are_typed_errors() {
    let mut a = TransactionAssembler::new();
    a.push(todos(ReplicaIdentity::Default, &[])).unwrap();
    assert_eq!(a.push(commit(1)), Err(AssembleError::NotInTransaction("Commit")));
    assert!(matches!(a.push(insert(TODOS, vec![t("1"), t("a"), t("f")])), Err(AssembleError::NotInTransaction(_))));
    a.push(begin(1, 1)).unwrap();
    assert_eq!(a.push(begin(2, 2)), Err(AssembleError::NestedBegin { open: 1, new: 2 }));
    assert_eq!(a.push(insert(999, vec![])), Err(AssembleError::UnknownRelation(999)));
    assert!(matches!(
        a.push(insert(TODOS, vec![t("1")])),
        Err(AssembleError::ColumnCountMismatch { expected: 3, got: 1, .. })
    ));
    assert!(matches!(
        a.push(insert(TODOS, vec![t("1"), ColumnValue::Binary(vec![1]), t("f")])),
        Err(AssembleError::BinaryColumn { .. })
    ));
    assert!(matches!(
        a.push(insert(TODOS, vec![t("1"), ColumnValue::Text(vec![0xff]), t("f")])),
        Err(AssembleError::InvalidUtf8 { .. })
    ));
    assert!(matches!(
        a.push(insert(TODOS, vec![ColumnValue::UnchangedToast, t("a"), t("f")])),
        Err(AssembleError::MissingKeyValue { .. })
    ));
    assert!(matches!(
        a.push(LogicalMessage::Truncate(Truncate {
            xid: None,
            cascade: false,
            restart_identity: false,
            relation_ids: vec![TODOS, 77]
        })),
        Err(AssembleError::UnknownRelation(77))
    ));
    assert_eq!(a.push(LogicalMessage::StreamStop), Err(AssembleError::StreamingUnsupported));
    // Failed pushes left nothing behind: the good insert after them gets seq 0.
    a.push(insert(TODOS, vec![t("1"), t("a"), t("f")])).unwrap();
    assert_eq!(a.push(commit(2)), Err(AssembleError::CommitLsnMismatch { begin: Lsn(1), commit: Lsn(2) }));
    let txn = only_txn(vec![a.push(commit(1)).unwrap().unwrap()]);
    assert_eq!(txn.changes.len(), 1);
    assert_eq!(txn.changes[0].seq, 0);

    // reset() drops a half transaction (reconnect); the resent one starts clean.
    a.push(begin(3, 3)).unwrap();
    a.push(insert(TODOS, vec![t("1"), t("a"), t("f")])).unwrap();
    a.reset();
    let txn = only_txn(run(&mut a, vec![begin(3, 3), insert(TODOS, vec![t("1"), t("a"), t("f")]), commit(3)]));
    assert_eq!(txn.changes.len(), 1);
}

#[test]
fn decoder_and_assembler_compose_on_fuzzed_streams_without_panicking() {
    // Feed random (often invalid) message sequences through decode + assemble: errors are fine,
    // panics are not.
    use crate::pgoutput::Decoder;
    let mut x: u64 = 0x1234_5678_9ABC_DEF1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let rel = {
        let mut v = vec![b'R', 0, 0, 0x40, 0, b'p', 0, b't', 0, b'd', 0, 2];
        v.extend_from_slice(&[1, b'a', 0, 0, 0, 0, 20, 0xff, 0xff, 0xff, 0xff]);
        v.extend_from_slice(&[0, b'b', 0, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xff]);
        v
    };
    let mut committed = 0;
    for _ in 0..3000 {
        let mut d = Decoder::new(1).unwrap();
        let mut a = TransactionAssembler::new();
        let _ = a.push(d.decode(&rel).unwrap());
        for _ in 0..8 {
            let msg: Vec<u8> = match next() % 4 {
                0 => [&[b'B'][..], &[0, 0, 0, 0, 0, 0, 0, 9], &[0; 8], &[0, 0, 0, 1]].concat(),
                1 => [&[b'C', 0][..], &[0, 0, 0, 0, 0, 0, 0, 9], &[0; 16]].concat(),
                2 => [
                    &[b'I', 0, 0, 0x40, 0, b'N', 0, 2, b't', 0, 0, 0, 1, b'7'][..],
                    &[[b'n', b'u', b'b'][(next() % 3) as usize]],
                ]
                .concat(),
                _ => (0..(next() % 20)).map(|_| next() as u8).collect(),
            };
            if let Ok(m) = d.decode(&msg) {
                if let Ok(Some(Assembled::Transaction(_))) = a.push(m) {
                    committed += 1;
                }
            }
        }
    }
    assert!(committed > 100, "fuzz never reached a commit ({committed})");
}

#[test]
fn drained_chunks_keep_seq_numbering_and_commit_holds_the_rest() {
    let mut a = TransactionAssembler::new();
    run(&mut a, vec![todos(ReplicaIdentity::Default, &[]), begin(0x500, 9)]);
    for i in 0..5 {
        run(&mut a, vec![insert(TODOS, vec![t(&i.to_string()), ColumnValue::Null, t("f")])]);
    }
    assert_eq!(a.open_len(), 5);
    let part = a.drain_open().expect("open transaction");
    assert_eq!((part.xid, part.commit_lsn), (9, Lsn(0x500)));
    assert_eq!(part.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(a.open_len(), 0);
    run(&mut a, vec![insert(TODOS, vec![t("5"), ColumnValue::Null, t("f")])]);
    let txn = only_txn(run(&mut a, vec![commit(0x500)]));
    assert_eq!(txn.changes.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5]);
    assert!(a.drain_open().is_none());
}
