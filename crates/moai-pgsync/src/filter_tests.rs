use super::*;
use serde_json::{json, Value};

fn row(v: Value) -> Row {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

fn raw(v: Value) -> RawRow {
    RawRow::from_row(&row(v))
}

const T: &str = "public.todos";

/// alice's view: the token's predicate, a column list.
fn alice() -> Vec<(String, Shape)> {
    vec![("todos".into(), Shape::parse(T, Some(vec!["id".into(), "title".into()]), Some("owner = 'alice'")).unwrap())]
}

/// alice's view with every column.
fn alice_all_columns() -> Vec<(String, Shape)> {
    vec![("todos".into(), Shape::parse(T, None, Some("owner = 'alice'")).unwrap())]
}

fn insert(id: i64, owner: &str) -> WireOp {
    WireOp::Insert {
        seq: 0,
        table: T.into(),
        key: raw(json!({"id": id})),
        row: raw(json!({"id": id, "title": "t", "owner": owner, "secret": "s"})),
    }
}

fn update(id: i64, new_owner: &str) -> WireOp {
    WireOp::Update {
        seq: 3,
        table: T.into(),
        key: raw(json!({"id": id})),
        old_key: None,
        row: raw(json!({"id": id, "title": "t2", "owner": new_owner, "secret": "s"})),
        unchanged: vec![],
    }
}

fn old(id: i64, owner: &str) -> RawRow {
    raw(json!({"id": id, "title": "t", "owner": owner, "secret": "s"}))
}

fn delete(id: i64) -> WireOp {
    WireOp::Delete { seq: 5, table: T.into(), key: raw(json!({"id": id})) }
}

fn deleted(seq: u32, id: i64) -> Option<WireOp> {
    Some(WireOp::Delete { seq, table: T.into(), key: raw(json!({"id": id})) })
}

#[test]
fn insert_is_sent_projected_only_when_the_new_row_matches() {
    let Some(WireOp::Insert { row: r, .. }) = filter_op(&alice(), insert(1, "alice"), None) else { panic!() };
    assert_eq!(r, raw(json!({"id": 1, "title": "t"})));
    assert_eq!(filter_op(&alice(), insert(2, "bob"), None), None);
    let elsewhere = WireOp::Truncate { seq: 0, table: "public.other".into() };
    assert_eq!(filter_op(&alice(), elsewhere, None), None);
}

#[test]
fn update_inside_the_shape_stays_an_update() {
    let Some(WireOp::Update { row: r, key, .. }) = filter_op(&alice(), update(1, "alice"), Some(&old(1, "alice")))
    else {
        panic!()
    };
    assert_eq!((r, key), (raw(json!({"id": 1, "title": "t2"})), raw(json!({"id": 1}))));
}

#[test]
fn update_moving_in_becomes_an_insert_of_the_whole_row() {
    let got = filter_op(&alice(), update(2, "alice"), Some(&old(2, "bob")));
    assert_eq!(
        got,
        Some(WireOp::Insert {
            seq: 3,
            table: T.into(),
            key: raw(json!({"id": 2})),
            row: raw(json!({"id": 2, "title": "t2"}))
        })
    );
}

#[test]
fn update_moving_out_becomes_a_delete_of_the_old_key() {
    assert_eq!(filter_op(&alice(), update(1, "bob"), Some(&old(1, "alice"))), deleted(3, 1));
    // The key changed too: the client knows the row by its old key.
    let op = WireOp::Update {
        seq: 4,
        table: T.into(),
        key: raw(json!({"id": 9})),
        old_key: Some(raw(json!({"id": 1}))),
        row: raw(json!({"id": 9, "title": "t", "owner": "bob"})),
        unchanged: vec![],
    };
    assert_eq!(filter_op(&alice(), op, Some(&old(1, "alice"))), deleted(4, 1));
}

#[test]
fn update_of_a_row_never_in_the_shape_sends_nothing() {
    // Before: "bob → bob" went out as a delete carrying bob's key.
    assert_eq!(filter_op(&alice(), update(2, "bob"), Some(&old(2, "bob"))), None);
    assert_eq!(filter_op(&alice(), update(2, "carol"), Some(&old(2, "bob"))), None);
}

#[test]
fn delete_is_sent_only_when_the_old_row_matched() {
    assert_eq!(filter_op(&alice(), delete(1), Some(&old(1, "alice"))), deleted(5, 1));
    // Before: evaluated on the key alone (owner unknown) and sent.
    assert_eq!(filter_op(&alice(), delete(2), Some(&old(2, "bob"))), None);
}

fn toast_update(id: i64) -> WireOp {
    // `owner` unchanged and TOASTed: absent from the patch.
    WireOp::Update {
        seq: 6,
        table: T.into(),
        key: raw(json!({"id": id})),
        old_key: None,
        row: raw(json!({"id": id, "title": "t2", "secret": "s"})),
        unchanged: vec!["owner".into()],
    }
}

#[test]
fn unchanged_toast_predicate_columns_are_taken_from_the_old_row() {
    // Before: the missing owner made the predicate unknown, and unknown passed.
    assert_eq!(filter_op(&alice_all_columns(), toast_update(2), Some(&old(2, "bob"))), None);
    let Some(WireOp::Update { unchanged, row: r, .. }) =
        filter_op(&alice_all_columns(), toast_update(1), Some(&old(1, "alice")))
    else {
        panic!()
    };
    assert_eq!((unchanged, r), (vec!["owner".to_string()], raw(json!({"id": 1, "title": "t2", "secret": "s"}))));
}

#[test]
fn an_unknown_predicate_never_passes() {
    // Unchanged TOAST and no old row: the predicate cannot be evaluated, so nothing is sent.
    assert_eq!(filter_op(&alice_all_columns(), toast_update(2), None), None);
    // A row lacking the predicate column (never produced by pgoutput for inserts, but possible
    // in principle) is not in the shape either.
    let op = WireOp::Insert {
        seq: 0,
        table: T.into(),
        key: raw(json!({"id": 3})),
        row: raw(json!({"id": 3, "title": "t"})),
    };
    assert_eq!(filter_op(&alice_all_columns(), op, None), None);
}

#[test]
fn without_the_old_row_deletes_and_move_outs_fail_closed() {
    // REPLICA IDENTITY not FULL: only the key is known, the predicate is on another column.
    assert_eq!(filter_op(&alice(), delete(1), None), None);
    assert_eq!(filter_op(&alice(), update(1, "bob"), None), None);
    // A new row that matches is still sent, as an update (the client upserts it).
    let Some(WireOp::Update { row: r, .. }) = filter_op(&alice(), update(1, "alice"), None) else { panic!() };
    assert_eq!(r, raw(json!({"id": 1, "title": "t2"})));
}

#[test]
fn without_the_old_row_a_predicate_on_the_key_still_decides() {
    let small = vec![("s".to_string(), Shape::parse(T, None, Some("id < 10")).unwrap())];
    assert_eq!(filter_op(&small, delete(1), None), deleted(5, 1));
    assert_eq!(filter_op(&small, delete(11), None), None);
    let moved = WireOp::Update {
        seq: 4,
        table: T.into(),
        key: raw(json!({"id": 12})),
        old_key: Some(raw(json!({"id": 2}))),
        row: raw(json!({"id": 12, "owner": "bob"})),
        unchanged: vec![],
    };
    assert_eq!(filter_op(&small, moved, None), deleted(4, 2));
}

#[test]
fn shapes_without_a_predicate_behave_as_before() {
    let whole = vec![("w".to_string(), Shape::parse(T, None, None).unwrap())];
    for (op, old_row) in [
        (delete(2), None),
        (update(2, "bob"), None),
        (update(2, "bob"), Some(old(2, "carol"))),
        (insert(2, "bob"), None),
    ] {
        assert_eq!(filter_op(&whole, op.clone(), old_row.as_ref()), Some(op));
    }
    // Column list only: every row matches, before and after.
    let cols = vec![("c".to_string(), Shape::parse(T, Some(vec!["id".into()]), None).unwrap())];
    assert_eq!(filter_op(&cols, delete(2), None), deleted(5, 2));
    assert_eq!(filter_op(&cols, delete(2), Some(&old(2, "bob"))), deleted(5, 2));
    let Some(WireOp::Update { row: r, .. }) = filter_op(&cols, update(2, "bob"), Some(&old(2, "carol"))) else {
        panic!()
    };
    assert_eq!(r, raw(json!({"id": 2})));
}

#[test]
fn several_shapes_on_a_table_decide_as_their_union() {
    let two = vec![
        ("a".to_string(), Shape::parse(T, None, Some("owner = 'alice'")).unwrap()),
        ("c".to_string(), Shape::parse(T, None, Some("owner = 'carol'")).unwrap()),
    ];
    // alice → carol stays in the union: an update, not a delete.
    assert!(matches!(filter_op(&two, update(1, "carol"), Some(&old(1, "alice"))), Some(WireOp::Update { .. })));
    assert!(matches!(filter_op(&two, update(1, "carol"), Some(&old(1, "bob"))), Some(WireOp::Insert { .. })));
    assert_eq!(filter_op(&two, update(1, "bob"), Some(&old(1, "carol"))), deleted(3, 1));
    assert_eq!(filter_op(&two, delete(1), Some(&old(1, "bob"))), None);
}
