//! One value mapping for snapshot, stream and history (docs/pgsync-protocol.md §13): the same
//! stored values give the same JSON whichever path delivers them, against a real PostgreSQL.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use moai_pgsync::PgSync;
use serde_json::{json, Map, Value};
use support::client::TestClient;
use support::pg::PgCluster;
use tokio_postgres::Client;

const VALS: &str = "public.vals";

async fn setup() -> (PgCluster, Client, PgSync) {
    support::init_tracing();
    let cluster = PgCluster::start();
    let c = cluster.sql().await;
    c.batch_execute(
        "CREATE TYPE public.mood AS ENUM ('sad', 'happy'); \
         CREATE DOMAIN public.flag AS bool; \
         CREATE TABLE public.vals ( \
           id int4 PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, big int8, f4 float4, f8 float8, \
           f8n float8, f8i float8, n numeric, t text, vc varchar(10), c5 char(5), ts timestamp, \
           tstz timestamptz, d date, iv interval, u uuid, j json, jb jsonb, ia int4[], ta text[], \
           by bytea, ip inet, m public.mood, fl public.flag)",
    )
    .await
    .unwrap();
    // The session that writes has other settings than moai's connections: values must not
    // depend on them.
    c.batch_execute("SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY'").await.unwrap();
    let sync = start(&cluster).await;
    (cluster, c, sync)
}

async fn start(cluster: &PgCluster) -> PgSync {
    let sync = PgSync::start(support::sync_config(cluster, &[VALS])).await.expect("start");
    tokio::time::timeout(Duration::from_secs(60), sync.wait_caught_up()).await.expect("caught up in time").unwrap();
    sync
}

/// Rows `base+1` (every type, "false" side), `base+2` (other values), `base+3` (all NULL).
async fn insert_rows(c: &Client, base: i32) {
    c.batch_execute(&format!(
        "INSERT INTO vals VALUES \
         ({a}, false, -32768, 2147483647, 42, 9007199254740993, 'NaN', 0.1, 'NaN', 'Infinity', \
          12345678901234567890.123456789, 'ü漢🙂 \"q\" \\', 'abc', 'ab', '2026-01-02 01:04:05.25', \
          '2026-01-02 03:04:05+02', '2026-01-02', '1 day 02:03:04', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', \
          '{{\"b\": [1, 2], \"a\": \"x\"}}', '{{\"k\": [true, null, 1.5]}}', '{{1,NULL,3}}', \
          '{{\"a b\",\"ü漢🙂\",NULL,\"NULL\",\"x,y\"}}', '\\x00ff10', '192.168.0.1', 'happy', false), \
         ({b}, true, 7, -1, -9007199254740991, -9223372036854775808, 1.5, '-Infinity', '-Infinity', 1e300, \
          'NaN', '', 'v', 'abcde', '1999-12-31 23:59:59', '2026-07-01 12:00:00.123456-04:30', '0001-01-01', \
          '-1 years -2 mons +3 days -00:00:01.5', '00000000-0000-0000-0000-000000000000', '[]', '\"s\"', '{{}}', \
          '{{}}', '', '10.0.0.0/8', 'sad', true), \
         ({n}, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
          NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        a = base + 1,
        b = base + 2,
        n = base + 3,
    ))
    .await
    .unwrap();
}

/// The exact JSON of rows 1, 2, 3 (without `id`).
fn expected() -> Vec<Value> {
    let mut rows = expected_rows();
    // 1e300 in plain notation: every path writes numbers the way jsonb (the history) does.
    rows[1]["f8i"] = serde_json::from_str(&format!("1{}", "0".repeat(300))).unwrap();
    rows
}

fn expected_rows() -> Vec<Value> {
    vec![
        json!({
            "b": false, "i2": -32768, "i4": 2147483647, "i8": 42, "big": "9007199254740993",
            "f4": "NaN", "f8": 0.1, "f8n": "NaN", "f8i": "Infinity",
            "n": "12345678901234567890.123456789", "t": "ü漢🙂 \"q\" \\", "vc": "abc", "c5": "ab   ",
            "ts": "2026-01-02T01:04:05.25", "tstz": "2026-01-02T01:04:05+00:00", "d": "2026-01-02",
            "iv": "1 day 02:03:04", "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "j": {"b": [1, 2], "a": "x"}, "jb": {"k": [true, null, 1.5]}, "ia": [1, null, 3],
            "ta": ["a b", "ü漢🙂", null, "NULL", "x,y"], "by": "\\x00ff10", "ip": "192.168.0.1",
            "m": "happy", "fl": false
        }),
        json!({
            "b": true, "i2": 7, "i4": -1, "i8": -9007199254740991_i64, "big": "-9223372036854775808",
            "f4": 1.5, "f8": "-Infinity", "f8n": "-Infinity", "f8i": 0,
            "n": "NaN", "t": "", "vc": "v", "c5": "abcde",
            "ts": "1999-12-31T23:59:59", "tstz": "2026-07-01T16:30:00.123456+00:00", "d": "0001-01-01",
            "iv": "-1 years -2 mons +3 days -00:00:01.5", "u": "00000000-0000-0000-0000-000000000000",
            "j": [], "jb": "s", "ia": [], "ta": [], "by": "\\x", "ip": "10.0.0.0/8", "m": "sad", "fl": true
        }),
        json!({
            "b": null, "i2": null, "i4": null, "i8": null, "big": null, "f4": null, "f8": null, "f8n": null,
            "f8i": null, "n": null, "t": null, "vc": null, "c5": null, "ts": null, "tstz": null, "d": null,
            "iv": null, "u": null, "j": null, "jb": null, "ia": null, "ta": null, "by": null, "ip": null,
            "m": null, "fl": null
        }),
    ]
}

fn without_id(row: &Value) -> Value {
    let mut m: Map<String, Value> = row.as_object().expect("row is an object").clone();
    m.remove("id");
    Value::Object(m)
}

/// JSON text with object members sorted (recursively).
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, String> = m.iter().map(|(k, v)| (k, canonical(v))).collect();
            let members: Vec<String> =
                sorted.iter().map(|(k, v)| format!("{}:{v}", Value::String((*k).clone()))).collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// id → row, from the snapshot batches a client received.
fn snapshot_rows(cl: &TestClient) -> BTreeMap<i64, Value> {
    cl.messages
        .iter()
        .filter(|m| m["type"] == "snapshot_batch")
        .flat_map(|m| m["rows"].as_array().unwrap().iter().cloned())
        .map(|r| (r["id"].as_i64().unwrap(), r))
        .collect()
}

/// id → row, from the insert ops of the `changes` frames a client received.
fn change_rows(cl: &TestClient) -> BTreeMap<i64, Value> {
    cl.messages
        .iter()
        .filter(|m| m["type"] == "changes")
        .flat_map(|m| {
            m["txns"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|t| t["ops"].as_array().unwrap().iter().cloned())
                .collect::<Vec<_>>()
        })
        .filter(|op| op["op"] == "insert")
        .map(|op| (op["row"]["id"].as_i64().unwrap(), op["row"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_stream_and_history_map_every_type_identically() {
    let (_cluster, c, sync) = setup().await;

    // The history client: subscribes while the table is empty, then goes away.
    let mut hist = TestClient::connect(&sync, "c-history");
    hist.hello(&[VALS], 100, 4).await;
    hist.expect_type("up_to_date").await;
    hist.disconnect().await;

    // Rows 1..3 exist before the snapshot client connects: they come in its snapshot.
    insert_rows(&c, 0).await;
    let mut snap = TestClient::connect(&sync, "c-snapshot");
    snap.hello(&[VALS], 100, 4).await;
    snap.expect_type("up_to_date").await;
    // Rows 101..103 (the same values) come in its stream.
    insert_rows(&c, 100).await;
    snap.until("streamed rows", |cl| cl.table(VALS).len() == 6).await;

    // The history client catches up from its position: all six rows from change_history.
    hist.reconnect(&sync);
    hist.hello(&[VALS], 100, 4).await;
    hist.until("caught up rows", |cl| cl.table(VALS).len() == 6).await;
    assert!(
        hist.messages.iter().all(|m| m["type"] != "snapshot_batch" && m["type"] != "must_refetch"),
        "catch-up, not a snapshot"
    );

    let from_snapshot = snapshot_rows(&snap);
    let from_stream = change_rows(&snap);
    let from_history = change_rows(&hist);
    assert_eq!(from_snapshot.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(from_stream.keys().copied().collect::<Vec<_>>(), vec![101, 102, 103]);
    assert_eq!(from_history.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 101, 102, 103]);

    for (i, want) in expected().iter().enumerate() {
        let k = i as i64 + 1;
        let paths = [
            ("snapshot", &from_snapshot[&k]),
            ("stream", &from_stream[&(k + 100)]),
            ("history (snapshot-era row)", &from_history[&k]),
            ("history (stream-era row)", &from_history[&(k + 100)]),
        ];
        for (path, row) in paths {
            let got = without_id(row);
            // Column by column, for a readable failure.
            for (col, v) in want.as_object().unwrap() {
                assert_eq!(&got[col], v, "row {k}, column {col}, via {path}");
            }
            assert_eq!(&got, want, "row {k} via {path}");
        }
        // Identical JSON text on all paths (up to object member order, which history's jsonb
        // storage does not keep), not just equal values: numbers keep their spelling.
        let text = canonical(&without_id(&from_snapshot[&k]));
        assert_eq!(canonical(&without_id(&from_stream[&(k + 100)])), text, "row {k}: stream vs snapshot");
        assert_eq!(canonical(&without_id(&from_history[&k])), text, "row {k}: history vs snapshot");
    }
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bool_predicate_matches_snapshot_rows() {
    let (_cluster, c, sync) = setup().await;
    insert_rows(&c, 0).await;
    let shapes = [
        json!({"id": "open", "table": VALS, "where": "b = false"}),
        json!({"id": "flagged", "table": VALS, "where": "fl = true"}),
        json!({"id": "happy", "table": VALS, "where": "m = 'happy' AND ip = '192.168.0.1' AND c5 = 'ab   '"}),
    ];
    let mut cl = TestClient::connect(&sync, "c-pred");
    cl.hello_shapes(&shapes, 100, 4).await;
    cl.expect_type("up_to_date").await;
    let by_shape = |id: &str| -> Vec<i64> {
        let snaps: Vec<&Value> =
            cl.messages.iter().filter(|m| m["type"] == "snapshot_begin" && m["shape_id"] == id).collect();
        assert_eq!(snaps.len(), 1, "one snapshot for {id}");
        let sid = &snaps[0]["snapshot_id"];
        let mut ids: Vec<i64> = cl
            .messages
            .iter()
            .filter(|m| m["type"] == "snapshot_batch" && &m["snapshot_id"] == sid)
            .flat_map(|m| m["rows"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect::<Vec<_>>())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(by_shape("open"), vec![1], "b = false matches the snapshot row with b false");
    assert_eq!(by_shape("flagged"), vec![2], "a domain over bool compares as bool");
    assert_eq!(by_shape("happy"), vec![1], "enum, inet and char(n) compare as their output text");

    // The same predicates in the stream. Rows 101 and 102 come in one transaction, so once
    // both are there the whole of it is, and 103 (all NULL) matches no shape.
    insert_rows(&c, 100).await;
    cl.until("rows 101 and 102 streamed", |cl| {
        let ids = streamed_ids(cl);
        ids.contains(&101) && ids.contains(&102)
    })
    .await;
    let streamed = streamed_ops(&cl);
    assert_eq!(streamed_ids(&cl), vec![101, 102], "only the stream-era rows, filtered: {streamed:?}");
    sync.shutdown().await;
}

/// (txn lsn, op, row id) of every op in the `changes` frames a client received.
fn streamed_ops(cl: &TestClient) -> Vec<(String, String, i64)> {
    cl.messages
        .iter()
        .filter(|m| m["type"] == "changes")
        .flat_map(|m| m["txns"].as_array().unwrap().clone())
        .flat_map(|t| {
            let lsn = t["lsn"].as_str().unwrap().to_owned();
            t["ops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|op| (lsn.clone(), op["op"].as_str().unwrap().to_owned(), op["key"]["id"].as_i64().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn streamed_ids(cl: &TestClient) -> Vec<i64> {
    let mut ids: Vec<i64> = streamed_ops(cl).into_iter().map(|(_, _, id)| id).collect();
    ids.sort();
    ids
}

/// A transaction that commits just before a hello is in the new client's snapshot but not yet in
/// change_history: the replicator has not stored it. It must not reach the client a second time
/// as a live change after `up_to_date` (docs/pgsync-protocol.md §5: every transaction exactly
/// once across the snapshot handoff). Deterministic: a lock on change_history holds the
/// replicator's write of that transaction until the snapshot has been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_replicator_has_not_stored_yet_reaches_a_new_client_once() {
    let (cluster, c, sync) = setup().await;
    let hold = cluster.sql().await;
    hold.batch_execute("BEGIN; LOCK TABLE moai_sync.change_history IN EXCLUSIVE MODE").await.unwrap();
    insert_rows(&c, 0).await;
    let shapes = [
        json!({"id": "all", "table": VALS}),
        json!({"id": "open", "table": VALS, "where": "b = false"}),
        json!({"id": "flagged", "table": VALS, "where": "fl = true"}),
    ];
    let mut cl = TestClient::connect(&sync, "c-handoff");
    cl.hello_shapes(&shapes, 100, 4).await;
    cl.until("three snapshots", |cl| cl.messages.iter().filter(|m| m["type"] == "snapshot_end").count() == 3).await;
    assert_eq!(snapshot_rows(&cl).keys().copied().collect::<Vec<_>>(), vec![1, 2, 3], "the snapshot sees the rows");
    // Let the replicator store the transaction.
    hold.batch_execute("COMMIT").await.unwrap();
    let up_to_date = cl.expect_type("up_to_date").await;
    let commit_lsn: String = c
        .query_one("SELECT max(commit_lsn)::text FROM moai_sync.change_history WHERE tbl = 'public.vals'", &[])
        .await
        .unwrap()
        .get(0);
    let at: moai_pgsync::Lsn = up_to_date["position"]["lsn"].as_str().unwrap().parse().unwrap();
    assert!(
        at >= commit_lsn.parse().unwrap(),
        "up_to_date {up_to_date} is below the commit ({commit_lsn}) of rows the snapshot holds"
    );

    insert_rows(&c, 100).await;
    cl.until("rows 101..103 streamed", |cl| streamed_ids(cl).contains(&103)).await;
    let streamed = streamed_ops(&cl);
    assert_eq!(streamed_ids(&cl), vec![101, 102, 103], "snapshot rows are not streamed again: {streamed:?}");
    assert_eq!(cl.table(VALS).len(), 6);
    sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_written_by_an_older_mapping_starts_a_new_generation() {
    let (cluster, c, sync) = setup().await;
    let mut cl = TestClient::connect(&sync, "c-old");
    cl.hello(&[VALS], 100, 4).await;
    cl.expect_type("up_to_date").await;
    insert_rows(&c, 0).await;
    cl.until("rows", |cl| cl.table(VALS).len() == 3).await;
    cl.disconnect().await;
    let old_generation = cl.generation.unwrap();
    let v: i32 = c.query_one("SELECT mapping_version FROM moai_sync.replication_state", &[]).await.unwrap().get(0);
    assert_eq!(v, moai_pgsync::value_mapping::MAPPING_VERSION);
    sync.shutdown().await;

    // As an older moai left it: history rows mapped the version-1 way.
    c.batch_execute("UPDATE moai_sync.replication_state SET mapping_version = 1").await.unwrap();
    let sync = start(&cluster).await;
    let generation = sync.feed().borrow().generation;
    assert_ne!(generation, old_generation, "a new generation");
    let n: i64 = c.query_one("SELECT count(*) FROM moai_sync.change_history", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "old history discarded");
    let v: i32 = c.query_one("SELECT mapping_version FROM moai_sync.replication_state", &[]).await.unwrap().get(0);
    assert_eq!(v, moai_pgsync::value_mapping::MAPPING_VERSION);
    // The client refetches and gets the rows in the current mapping.
    cl.reconnect(&sync);
    cl.hello(&[VALS], 100, 4).await;
    cl.expect_type("up_to_date").await;
    assert!(cl.messages.iter().any(|m| m["type"] == "must_refetch"
        || (m["type"] == "welcome" && m["mode"] == "snapshot" && m["generation"] == generation)));
    assert_eq!(cl.generation, Some(generation));
    let rows = snapshot_rows(&cl);
    assert_eq!(without_id(&rows[&1]), expected()[0]);
    sync.shutdown().await;
}
