//! Shape parser and evaluator tests.

use super::*;
use serde_json::json;

fn shape(w: &str) -> Shape {
    Shape::parse("public.todos", None, Some(w)).unwrap_or_else(|e| panic!("{w:?}: {e}"))
}

fn row(v: Value) -> Row {
    v.as_object().cloned().unwrap()
}

fn err(w: &str) -> ShapeError {
    match Shape::parse("public.todos", None, Some(w)) {
        Ok(s) => panic!("{w:?} should be rejected, parsed as {s:?}"),
        Err(e) => e,
    }
}

#[test]
fn parses_all_supported_forms() {
    let s = shape(
        r#"owner_id = 'u''1' and prio >= -2 AND score < 1.5 and "Done" != true AND deleted_at IS NULL AND x is not null"#,
    );
    assert_eq!(
        s.conditions,
        vec![
            Condition { column: "owner_id".into(), test: Test::Compare(CmpOp::Eq, Literal::Str("u'1".into())) },
            Condition { column: "prio".into(), test: Test::Compare(CmpOp::Ge, Literal::Int(-2)) },
            Condition { column: "score".into(), test: Test::Compare(CmpOp::Lt, Literal::Float(1.5)) },
            Condition { column: "Done".into(), test: Test::Compare(CmpOp::Ne, Literal::Bool(true)) },
            Condition { column: "deleted_at".into(), test: Test::IsNull },
            Condition { column: "x".into(), test: Test::IsNotNull },
        ]
    );
    assert!(shape("a>1").conditions.len() == 1);
    assert!(shape("a <= 1 AND b > 'z'").conditions.len() == 2);
    assert!(Shape::parse("public.todos", None, None).unwrap().conditions.is_empty());
    assert!(Shape::parse("public.todos", None, Some("  ")).unwrap().conditions.is_empty());
    assert_eq!(
        shape("name = 'héllo wörld'").conditions[0].test,
        Test::Compare(CmpOp::Eq, Literal::Str("héllo wörld".into()))
    );
}

#[test]
fn rejects_everything_else_with_a_position() {
    for (w, needle) in [
        ("a = 1 OR b = 2", "expected AND"),
        ("(a = 1)", "unexpected character"),
        ("a = NULL", "IS NULL"),
        ("a <> 1", "!="),
        ("a = 1 AND", "expected a column"),
        ("a =", "expected a literal"),
        ("a", "expected an operator"),
        ("a IS", "NULL or NOT NULL"),
        ("a IS NOT", "NULL after IS NOT"),
        ("a IS 5", "NULL or NOT NULL"),
        ("a = 'open", "unterminated"),
        ("a = 1; drop table x", "unexpected character"),
        ("lower(a) = 'x'", "unexpected character '('"),
        ("a IN 1", "expected an operator"),
        ("a = b", "expected a literal"),
        ("a < true", "booleans"),
        ("a = 1.", "invalid number"),
        ("a = 1e5", "invalid number"),
        ("a = --1", "invalid number"),
        ("NOT a = 1", "not supported"),
        ("and = 1", "expected a column"),
        ("a = 1 b = 2", "expected AND"),
        ("\"\" = 1", "quoted column"),
    ] {
        let e = err(w);
        assert!(matches!(e, ShapeError::Syntax { .. }), "{w:?}: {e:?}");
        assert!(e.to_string().contains(needle), "{w:?}: {e} should mention {needle:?}");
    }
    match err("a = 1 OR b = 2") {
        ShapeError::Syntax { at, .. } => assert_eq!(at, 6),
        e => panic!("{e:?}"),
    }
    assert_eq!(err(&"a = 1 AND ".repeat(500)), ShapeError::TooLong);
    let many = (0..40).map(|i| format!("c{i} = 1")).collect::<Vec<_>>().join(" AND ");
    assert_eq!(err(&many), ShapeError::TooManyConditions);
}

#[test]
fn validates_table_and_columns() {
    for bad in ["todos", "public.", ".todos", "public.to-dos", "a.b.c", "public.todos;"] {
        assert!(matches!(Shape::parse(bad, None, None), Err(ShapeError::BadTable(_))), "{bad}");
    }
    assert_eq!(Shape::parse("public.t", Some(vec![]), None), Err(ShapeError::EmptyColumns));
    let s = Shape::parse("public.t", Some(vec!["id".into(), "title".into()]), Some("owner = 'x'")).unwrap();
    assert_eq!(s.validate_columns(&["id", "title", "owner"]), Ok(()));
    assert_eq!(s.validate_columns(&["id", "title"]), Err(ShapeError::UnknownColumn("owner".into())));
    assert_eq!(s.validate_columns(&["id", "owner"]), Err(ShapeError::UnknownColumn("title".into())));
}

#[test]
fn evaluates_with_sql_null_semantics_and_unknown_for_missing() {
    let s = shape("owner = 'u1' AND prio > 2");
    assert_eq!(s.evaluate(&row(json!({"owner": "u1", "prio": 3}))), Truth::True);
    assert_eq!(s.evaluate(&row(json!({"owner": "u1", "prio": 2}))), Truth::False);
    assert_eq!(s.evaluate(&row(json!({"owner": "u2", "prio": 9}))), Truth::False);
    assert_eq!(s.evaluate(&row(json!({"owner": null, "prio": 9}))), Truth::False);
    // Patch update without `prio` (unchanged TOAST): cannot decide...
    assert_eq!(s.evaluate(&row(json!({"owner": "u1"}))), Truth::Unknown);
    // ...unless another condition already fails.
    assert_eq!(s.evaluate(&row(json!({"owner": "u2"}))), Truth::False);

    let n = shape("d IS NULL");
    assert_eq!(n.evaluate(&row(json!({"d": null}))), Truth::True);
    assert_eq!(n.evaluate(&row(json!({"d": 1}))), Truth::False);
    assert_eq!(shape("d IS NOT NULL").evaluate(&row(json!({"d": 1}))), Truth::True);
    assert_eq!(shape("d != 1").evaluate(&row(json!({"d": null}))), Truth::False);
    assert_eq!(shape("x = 1").evaluate(&row(json!({}))), Truth::Unknown);
    assert_eq!(shape("").evaluate(&row(json!({}))), Truth::True);
}

#[test]
fn compares_types_sensibly() {
    let r = row(json!({"i": 5, "f": 2.5, "s": "b", "big": "9007199254740993", "num": "10.25", "t": true}));
    let check = |w: &str, want: Truth| assert_eq!(shape(w).evaluate(&r), want, "{w}");
    check("i = 5", Truth::True);
    check("i >= 5", Truth::True);
    check("i < 5", Truth::False);
    check("i > 4.5", Truth::True);
    check("f <= 2.5", Truth::True);
    check("f > 2", Truth::True);
    check("s > 'a'", Truth::True);
    check("s < 'a'", Truth::False);
    check("big = 9007199254740993", Truth::True); // exact, not via f64
    check("big > 9007199254740992", Truth::True);
    check("num > 10", Truth::True);
    check("num = 10.25", Truth::True);
    check("t = true", Truth::True);
    check("t != true", Truth::False);
    // Mismatched types never match.
    check("s = 5", Truth::False);
    check("i = '5'", Truth::False);
    check("t = 1", Truth::False);
    check("s != 5", Truth::False);
}

#[test]
fn projects_columns() {
    let s = Shape::parse("public.t", Some(vec!["id".into(), "title".into()]), None).unwrap();
    let r = row(json!({"id": 1, "title": "a", "secret": "x"}));
    assert_eq!(s.project(&r), row(json!({"id": 1, "title": "a"})));
    let all = Shape::parse("public.t", None, None).unwrap();
    assert_eq!(all.project(&r), r);
}

#[test]
fn random_input_never_panics() {
    let mut x: u64 = 0xDEAD_BEEF_CAFE_F00D;
    let alphabet: Vec<char> = "ab_ =!<>'\"-.0123456789 ANDISNOTULandisnotul()é\u{0}".chars().collect();
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 24) as usize;
        let mut y = x;
        let s: String = (0..len)
            .map(|_| {
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                alphabet[((y >> 33) as usize) % alphabet.len()]
            })
            .collect();
        if let Ok(shape) = Shape::parse("public.t", None, Some(&s)) {
            let _ = shape.evaluate(&row(json!({"a": 1, "b": "x"})));
        }
    }
}
