//! Wire message decoding/encoding and frame splitting.

use crate::ids::{CoId, SessionId};
use crate::message::{encode_frame, frame_is_clean, parse_frame, Incoming, MessageError, Ping, SyncMessage};
use serde_json::Value;

fn vectors() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cojson-vectors.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["deterministic"].clone()
}

fn one(frame: &str) -> SyncMessage {
    let mut lines = parse_frame(frame);
    assert_eq!(lines.len(), 1);
    match lines.remove(0) {
        Ok(Incoming::Sync(m)) => m,
        other => panic!("expected a sync message, got {other:?}"),
    }
}

#[test]
fn vector_content_message_decodes_and_roundtrips_exactly() {
    let v = vectors();
    let text = v["contentMessage"].to_string();
    let SyncMessage::Content(c) = one(&text) else { panic!("content") };
    assert_eq!(c.id.as_str(), "co_z5rocg8RW7QBwyCTr5qKwiZUSyv");
    assert_eq!(c.priority, Some(3));
    assert!(c.header.is_some());
    assert_eq!(c.new.len(), 1);
    let (session, entry) = &c.new[0];
    assert_eq!(session, v["sessionID"].as_str().unwrap());
    assert_eq!(entry.after, 0);
    assert_eq!(entry.new_transactions.len(), 4);
    // Re-encoding yields the same text: same key order, same values.
    assert_eq!(SyncMessage::Content(c).to_json(), text);
}

#[test]
fn unknown_fields_and_number_text_survive_a_roundtrip() {
    let text = r#"{"action":"content","id":"co_zX","priority":6,"new":{"co_zA_session_zB":{"after":2,"newTransactions":[{"privacy":"trusting","madeAt":1.0e+3,"changes":"[]","future":{"b":1,"a":2.50}}],"lastSignature":"signature_zQ","hint":true}},"expectContentUntil":{"co_zA_session_zB":9},"newField":[1,2]}"#;
    let SyncMessage::Content(c) = one(text) else { panic!("content") };
    assert_eq!(c.extra.get("newField"), Some(&serde_json::json!([1, 2])));
    assert_eq!(c.new[0].1.extra.get("hint"), Some(&Value::Bool(true)));
    let sid = SessionId::parse("co_zA_session_zB").unwrap();
    assert_eq!(c.expect_content_until.as_ref().and_then(|m| m.get(&sid)), Some(&9));
    assert_eq!(SyncMessage::Content(c).to_json(), text);
}

#[test]
fn load_known_done_reconcile_roundtrip() {
    let cases = [
        r#"{"action":"load","id":"co_zX","header":false,"sessions":{}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":2}}"#,
        r#"{"action":"known","isCorrection":true,"asDependencyOf":"co_zY","id":"co_zX","header":false,"sessions":{}}"#,
        r#"{"action":"done","id":"co_zX"}"#,
        r#"{"action":"reconcile","id":"batch1","values":[["co_zX","shortHash_zQ"],["co_zY","shortHash_zR"]]}"#,
        r#"{"action":"reconcile-ack","id":"batch1"}"#,
    ];
    for text in cases {
        assert_eq!(one(text).to_json(), text);
    }
}

#[test]
fn known_fields_decode() {
    let SyncMessage::Known(k) =
        one(r#"{"action":"known","isCorrection":true,"id":"co_zX","header":true,"sessions":{"co_zA_session_zB":2.0}}"#)
    else {
        panic!("known")
    };
    assert!(k.is_correction);
    assert_eq!(k.state.id, CoId::parse("co_zX").unwrap());
    assert_eq!(k.state.count(&SessionId::parse("co_zA_session_zB").unwrap()), 2);
    let SyncMessage::Known(k) =
        one(r#"{"action":"known","isCorrection":false,"id":"co_zX","header":true,"sessions":{}}"#)
    else {
        panic!("known")
    };
    assert!(!k.is_correction);
}

#[test]
fn batched_frame_with_a_bad_line_reports_only_that_line() {
    let frame = "{\"action\":\"done\",\"id\":\"co_zA\"}\n{not json\n{\"action\":\"load\",\"id\":\"co_zB\",\"header\":false,\"sessions\":{}}";
    let lines = parse_frame(frame);
    assert_eq!(lines.len(), 3);
    assert!(matches!(&lines[0], Ok(Incoming::Sync(SyncMessage::Done(id))) if id.as_str() == "co_zA"));
    match &lines[1] {
        Err(e) => {
            assert_eq!(e.line, 1);
            assert!(matches!(e.error, MessageError::Json(_)));
        }
        Ok(other) => panic!("expected an error, got {other:?}"),
    }
    assert!(matches!(&lines[2], Ok(Incoming::Sync(SyncMessage::Load(s, _))) if s.id.as_str() == "co_zB"));
    assert!(!frame_is_clean(&lines));
}

#[test]
fn structural_errors_are_typed() {
    let err = |text: &str| match parse_frame(text).remove(0) {
        Err(e) => e.error,
        Ok(other) => panic!("expected error for {text}, got {other:?}"),
    };
    assert_eq!(err(r#"{"action":"fly","id":"co_zX"}"#), MessageError::UnknownAction("fly".into()));
    assert!(matches!(err(r#"{"action":"load","id":"xx","header":true,"sessions":{}}"#), MessageError::Id(_)));
    assert_eq!(err(r#"{"action":"load","id":"co_zX","sessions":{}}"#), MessageError::MissingField("header"));
    assert!(matches!(
        err(r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":-1}}"#),
        MessageError::BadField { field: "sessions", .. }
    ));
    assert!(matches!(
        err(r#"{"action":"content","id":"co_zX","new":{"s":{"after":1.5,"newTransactions":[],"lastSignature":"x"}}}"#),
        MessageError::BadField { field: "after", .. }
    ));
    assert_eq!(err(r#"{"action":"content","id":"co_zX"}"#), MessageError::MissingField("new"));
    // An errored line is still valid JSON, so the frame is "clean".
    assert!(frame_is_clean(&parse_frame(r#"{"action":"fly"}"#)));
}

#[test]
fn pings_empty_frames_and_other_values() {
    assert!(parse_frame("").is_empty());
    assert!(
        matches!(parse_frame(r#"{"type":"ping","time":1795316727364,"dc":"unknown"}"#).remove(0), Ok(Incoming::Ping { time: Some(t) }) if t == 1795316727364.0)
    );
    assert!(matches!(parse_frame("null").remove(0), Ok(Incoming::Ignored)));
    assert!(matches!(parse_frame(r#"{"hello":1}"#).remove(0), Ok(Incoming::Ignored)));
    // An empty line inside a frame is an error for that line (JSON.parse("") throws).
    let lines = parse_frame("{\"action\":\"done\",\"id\":\"co_zA\"}\n");
    assert_eq!(lines.len(), 2);
    assert!(lines[0].is_ok() && lines[1].is_err());
    assert_eq!(Ping { time: 5, dc: "unknown".into() }.to_json(), r#"{"type":"ping","time":5,"dc":"unknown"}"#);
}

#[test]
fn encode_frame_joins_with_newlines_and_parses_back() {
    let msgs = vec![one(r#"{"action":"done","id":"co_zA"}"#), one(r#"{"action":"reconcile-ack","id":"b"}"#)];
    let frame = encode_frame(&msgs);
    assert_eq!(frame, "{\"action\":\"done\",\"id\":\"co_zA\"}\n{\"action\":\"reconcile-ack\",\"id\":\"b\"}");
    let back: Vec<SyncMessage> = parse_frame(&frame)
        .into_iter()
        .map(|l| match l {
            Ok(Incoming::Sync(m)) => m,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(back, msgs);
}

#[test]
fn hostile_inputs_do_not_panic() {
    let deep = "[".repeat(100_000);
    for text in [
        deep.as_str(),
        "\u{0}",
        "{\"action\":null}",
        "{\"action\":\"content\",\"id\":\"co_z\",\"new\":[]}",
        "1e999999",
        "\"\\ud800\"",
    ] {
        let _ = parse_frame(text);
    }
}

/// `parse_frame` decodes plain `known` lines without a `Value` tree; every line must decode (or
/// fail) exactly as the general path decodes it.
#[test]
fn plain_known_fast_path_matches_the_general_path() {
    let lines = [
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":2,"co_zC_session_zD":0}}"#,
        r#"{"action":"known","id":"co_zX","header":false,"sessions":{}}"#,
        r#"{"action":"known","isCorrection":true,"asDependencyOf":"co_zY","id":"co_zX","header":false,"sessions":{}}"#,
        r#"{"action":"known","isCorrection":null,"asDependencyOf":null,"id":"co_zX","header":true,"sessions":{}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":2,"co_zA_session_zB":1}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":2.0}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":9007199254740993}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":-1}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{"bob_session_z1":1}}"#,
        r#"{"action":"known","id":"nope","header":true,"sessions":{}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{},"extra":[1]}"#,
        r#"{"action":"known","id":"co_z\u0058","header":true,"sessions":{}}"#,
        r#"{"action":"known","action":"known","id":"co_zX","header":true,"sessions":{}}"#,
        r#"{"action":"known","id":"co_zX","header":true,"sessions":{},"asDependencyOf":"bad"}"#,
        r#"{"action":"load","id":"co_zX","header":true,"sessions":{"co_zA_session_zB":2}}"#,
        r#" {"action":"known","id":"co_zX","header":true,"sessions":{}} "#,
    ];
    for line in lines {
        let general = serde_json::from_str::<Value>(line)
            .map_err(|e| MessageError::Json(e.to_string()))
            .and_then(|v| SyncMessage::from_value(&v));
        let fast = match parse_frame(line).remove(0) {
            Ok(Incoming::Sync(msg)) => Ok(msg),
            Ok(other) => panic!("{line}: {other:?}"),
            Err(e) => Err(e.error),
        };
        assert_eq!(fast, general, "{line}");
    }
}
