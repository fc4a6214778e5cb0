//! The Postgres change feed through the real binary and a real PostgreSQL cluster: readiness,
//! /api/sync over WebSocket (snapshot, then live changes), auth, and the 404 when disabled.
//! The engine's own suite (crates/moai-pgsync/tests) covers exactness, restarts and faults.

mod support;

// The throwaway cluster (crates/moai-pgsync/tests/support/pg.rs), included once by support.
use support::pg;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::Server;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("timed out waiting for the change feed")
            .expect("stream ended")
            .expect("websocket error");
        match msg {
            WsMessage::Text(t) => return serde_json::from_str(&t).expect("server sent JSON"),
            WsMessage::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

async fn sql(url: &str, statements: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connect to postgres");
    tokio::spawn(conn);
    client.batch_execute(statements).await.expect("sql");
}

#[tokio::test]
async fn change_feed_is_404_when_not_configured() {
    let server = Server::start(&[]);
    server.wait_ready();
    match tokio_tungstenite::connect_async(server.ws_url("/api/sync")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 404);
            let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("--pg-url"), "{body}");
        }
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn a_new_client_gets_a_snapshot_then_live_changes() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    sql(&url, "CREATE TABLE public.items (id int PRIMARY KEY, name text); INSERT INTO public.items VALUES (1,'a'),(2,'b'),(3,'c');").await;
    let server = Server::start(&["--pg-url", &url, "--pg-tables", "public.items", "--sync-shared-secret", "pgs"]);
    server.wait_ready();
    let token = moai_server::Auth::with_secret("pgs")
        .mint(&moai_server::auth::Claims {
            sub: "app".into(),
            exp: None,
            docs: None,
            tables: None,
            ..Default::default()
        })
        .unwrap();

    // Without a token: 4401.
    let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url("/api/sync")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
        Some(Ok(WsMessage::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4401),
        other => panic!("expected close 4401, got {other:?}"),
    }

    let (mut ws, _) =
        tokio_tungstenite::connect_async(server.ws_url(&format!("/api/sync?token={token}"))).await.unwrap();
    let hello = json!({"type": "hello", "protocol": 1, "client_id": "e2e-1", "position": null,
                       "shapes": [{"id": "s1", "table": "public.items"}]});
    ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let mut names = Vec::new();
    loop {
        let m = next_json(&mut ws).await;
        match m["type"].as_str().unwrap() {
            "snapshot_batch" => names.extend(m["rows"].as_array().unwrap().iter().map(|r| r["name"].clone())),
            "up_to_date" => break,
            "error" => panic!("{m}"),
            _ => {}
        }
    }
    names.sort_by_key(|v| v.to_string());
    assert_eq!(names, vec![json!("a"), json!("b"), json!("c")]);

    sql(&url, "INSERT INTO public.items VALUES (4,'d')").await;
    loop {
        let m = next_json(&mut ws).await;
        if m["type"] == "changes" {
            let ops = &m["txns"][0]["ops"];
            assert_eq!(ops[0]["op"], "insert", "{m}");
            assert_eq!(ops[0]["row"]["name"], "d", "{m}");
            break;
        }
    }
}

/// Reads the session's frames until `up_to_date`, returning the snapshot rows' `name`s (sorted),
/// or the error message the server sent instead.
async fn snapshot_names(ws: &mut Ws) -> Result<Vec<String>, Value> {
    let mut names = Vec::new();
    loop {
        let m = next_json(ws).await;
        match m["type"].as_str().unwrap() {
            "snapshot_batch" => {
                names.extend(m["rows"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()))
            }
            "up_to_date" => break,
            "error" => return Err(m),
            _ => {}
        }
    }
    names.sort();
    Ok(names)
}

/// A token minted with `moai token --table "… WHERE …"` opens only that table and only those
/// rows: in the snapshot and in live changes, whatever `where` the client sends; a shape on
/// another table is refused with `forbidden`.
#[tokio::test]
async fn a_table_scoped_token_bounds_tables_and_rows() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    sql(
        &url,
        "CREATE TABLE public.items (id int PRIMARY KEY, name text, owner text); \
         INSERT INTO public.items VALUES (1,'a','u1'),(2,'b','u2'),(3,'c','u1'); \
         CREATE TABLE public.other (id int PRIMARY KEY, name text); INSERT INTO public.other VALUES (1,'x');",
    )
    .await;
    let server =
        Server::start(&["--pg-url", &url, "--pg-tables", "public.items,public.other", "--sync-shared-secret", "pgs"]);
    server.wait_ready();
    let out = std::process::Command::new(support::BIN)
        .args(["token", "u1", "--table", "public.items WHERE owner = 'u1'", "--secret", "pgs"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let connect = || async {
        let (ws, _) =
            tokio_tungstenite::connect_async(server.ws_url(&format!("/api/sync?token={token}"))).await.unwrap();
        ws
    };
    let hello = |id: &str, shapes: Value| json!({"type": "hello", "protocol": 1, "client_id": id, "position": null, "shapes": shapes});

    // The whole table, as far as the token allows.
    let mut ws = connect().await;
    ws.send(WsMessage::Text(hello("u1-a", json!([{"id": "s", "table": "public.items"}])).to_string().into()))
        .await
        .unwrap();
    assert_eq!(snapshot_names(&mut ws).await.unwrap(), vec!["a", "c"]);
    sql(&url, "INSERT INTO public.items VALUES (4,'d','u2'); INSERT INTO public.items VALUES (5,'e','u1');").await;
    let mut live = Vec::new();
    while live.is_empty() {
        let m = next_json(&mut ws).await;
        if m["type"] == "changes" {
            for txn in m["txns"].as_array().unwrap() {
                live.extend(
                    txn["ops"].as_array().unwrap().iter().map(|op| op["row"]["name"].as_str().unwrap().to_owned()),
                );
            }
        }
    }
    assert_eq!(live, vec!["e"], "u2's row never reaches u1");

    // Asking for someone else's rows gets none of them.
    let mut ws = connect().await;
    ws.send(WsMessage::Text(
        hello("u1-b", json!([{"id": "s", "table": "public.items", "where": "owner = 'u2'"}])).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(snapshot_names(&mut ws).await.unwrap(), Vec::<String>::new());

    // A published table the token does not name.
    let mut ws = connect().await;
    ws.send(WsMessage::Text(hello("u1-c", json!([{"id": "o", "table": "public.other"}])).to_string().into()))
        .await
        .unwrap();
    let err = snapshot_names(&mut ws).await.unwrap_err();
    assert_eq!((err["code"].as_str(), err["fatal"].as_bool()), (Some("forbidden"), Some(true)), "{err}");
    assert!(err["message"].as_str().unwrap().contains("public.other"), "{err}");
}

/// One op as a short string: `insert 6 m1`, `update 3 c2`, `delete 1`.
fn op_text(op: &Value) -> String {
    let kind = op["op"].as_str().unwrap();
    let id = &op["key"]["id"];
    match op["row"]["name"].as_str() {
        Some(name) => format!("{kind} {id} {name}"),
        None => format!("{kind} {id}"),
    }
}

/// The ops of `changes` frames until one carries an op `until` (acking each frame); with
/// `until` = None, until `up_to_date`.
async fn ops_until(ws: &mut Ws, until: Option<&str>) -> Vec<String> {
    let mut ops = Vec::new();
    loop {
        let m = next_json(ws).await;
        match m["type"].as_str().unwrap() {
            "changes" => {
                for txn in m["txns"].as_array().unwrap() {
                    ops.extend(txn["ops"].as_array().unwrap().iter().map(op_text));
                }
                ws.send(WsMessage::Text(json!({"type": "ack", "position": m["to"]}).to_string().into())).await.unwrap();
                if until.is_some_and(|u| ops.iter().any(|o| o == u)) {
                    return ops;
                }
            }
            "up_to_date" if until.is_none() => return ops,
            "error" => panic!("{m}"),
            _ => {}
        }
    }
}

/// A row predicate (here the token's) hides other users' rows completely: their inserts,
/// updates (also of a TOASTed predicate column left unchanged) and deletes send nothing, not
/// even a key; a row moving out of the shape is deleted, a row moving in is inserted. Catch-up
/// from the history decides the same. Absence is shown by a marker insert that must be the
/// first op after bob's changes.
#[tokio::test]
async fn a_row_predicate_hides_other_users_changes_and_moves_rows_in_and_out() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    sql(
        &url,
        "CREATE TABLE public.items (id int PRIMARY KEY, name text, owner text); \
         INSERT INTO public.items VALUES (1,'a','alice'),(2,'b','bob'),(3,'c','alice'),(4,'d','bob'); \
         INSERT INTO public.items SELECT 9, 'big', 'bob' || string_agg(md5(i::text), '') FROM generate_series(1, 500) i;",
    )
    .await;
    let server = Server::start(&["--pg-url", &url, "--pg-tables", "public.items", "--sync-shared-secret", "pgs"]);
    server.wait_ready();
    let (pgc, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let identity: String = pgc
        .query_one("SELECT relreplident::text FROM pg_class WHERE oid = 'public.items'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(identity, "f", "moai sets REPLICA IDENTITY FULL on the tables it replicates");
    let out = std::process::Command::new(support::BIN)
        .args(["token", "alice", "--table", "public.items WHERE owner = 'alice'", "--secret", "pgs"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let connect = || async {
        let (ws, _) =
            tokio_tungstenite::connect_async(server.ws_url(&format!("/api/sync?token={token}"))).await.unwrap();
        ws
    };
    let shapes = json!([{"id": "s", "table": "public.items"}]);

    let mut ws = connect().await;
    let hello = json!({"type": "hello", "protocol": 1, "client_id": "alice-live", "position": null, "shapes": shapes});
    ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let (mut names, mut generation) = (Vec::new(), Value::Null);
    let position = loop {
        let m = next_json(&mut ws).await;
        match m["type"].as_str().unwrap() {
            "welcome" => generation = m["generation"].clone(),
            "snapshot_batch" => {
                names.extend(m["rows"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()))
            }
            "up_to_date" => break m["position"].clone(),
            "error" => panic!("{m}"),
            _ => {}
        }
    };
    names.sort();
    assert_eq!(names, vec!["a", "c"]);

    // Bob's rows: insert, update, update of a row whose predicate column is TOASTed and
    // unchanged, delete. Then alice's marker.
    for stmt in [
        "INSERT INTO public.items VALUES (5,'e','bob')",
        "UPDATE public.items SET name = 'b2' WHERE id = 2",
        "UPDATE public.items SET name = 'big2' WHERE id = 9",
        "DELETE FROM public.items WHERE id = 4",
        "INSERT INTO public.items VALUES (6,'m1','alice')",
    ] {
        sql(&url, stmt).await;
    }
    let first = ops_until(&mut ws, Some("insert 6 m1")).await;
    assert_eq!(first, vec!["insert 6 m1"], "alice learns nothing of bob's rows");

    // alice's row 1 goes to bob (move-out), bob's row 2 comes to alice (move-in), then a marker.
    for stmt in [
        "UPDATE public.items SET owner = 'bob' WHERE id = 1",
        "UPDATE public.items SET owner = 'alice' WHERE id = 2",
        "UPDATE public.items SET name = 'e2' WHERE id = 5",
        "INSERT INTO public.items VALUES (7,'m2','alice')",
    ] {
        sql(&url, stmt).await;
    }
    let moves = ops_until(&mut ws, Some("insert 7 m2")).await;
    assert_eq!(moves, vec!["delete 1", "insert 2 b2", "insert 7 m2"]);

    // Catch-up from the history (the old rows are stored with the changes) decides the same.
    let mut ws = connect().await;
    let hello = json!({"type": "hello", "protocol": 1, "client_id": "alice-catchup", "position": position,
                       "generation": generation, "shapes": shapes});
    ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let replay = ops_until(&mut ws, None).await;
    assert_eq!(replay, [first, moves].concat());
}

/// One replicator per database: the slot is the lock. A second instance is a standby that is
/// ready nonetheless: it follows the history the first one writes and serves `/api/sync` from it
/// (docs/pgsync-protocol.md §14), and takes the slot over when the first one dies. Clients moving
/// between instances and a kill under load: crates/moai/tests/cluster_pgsync.rs.
#[tokio::test]
async fn a_second_instance_follows_serves_and_takes_over() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    sql(&url, "CREATE TABLE public.items (id int PRIMARY KEY, name text); INSERT INTO public.items VALUES (1,'a');")
        .await;
    let args = ["--pg-url", url.as_str(), "--pg-tables", "public.items"];
    let mut first = Server::start(&args);
    first.wait_ready();

    let mut second = Server::start(&args);
    second.wait_log("replication slot is in use", Duration::from_secs(30)).expect("the standby says why it follows");
    second.wait_ready();
    let role = |s: &Server| support::json(&s.get("/health").1)["pgsync"]["role"].as_str().map(str::to_owned);
    assert_eq!(role(&first).as_deref(), Some("replicating"));
    assert_eq!(role(&second).as_deref(), Some("following"));
    assert!(second.child.try_wait().unwrap().is_none(), "a standby does not exit");

    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).expect("killed");
    second.wait_log("took the replication slot over", Duration::from_secs(30)).expect("the standby takes over");
    assert_eq!(role(&second).as_deref(), Some("replicating"));
    sql(&url, "INSERT INTO public.items VALUES (2,'b')").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(second.ws_url("/api/sync")).await.unwrap();
    let hello = json!({"type": "hello", "protocol": 1, "client_id": "standby-1", "position": null,
                       "shapes": [{"id": "s1", "table": "public.items"}]});
    ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    let mut rows = 0;
    loop {
        let m = next_json(&mut ws).await;
        match m["type"].as_str().unwrap() {
            "snapshot_batch" => rows += m["rows"].as_array().unwrap().len(),
            "up_to_date" => break,
            "error" => panic!("{m}"),
            _ => {}
        }
    }
    assert_eq!(rows, 2, "the new primary serves everything");
}

async fn close_code(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("closed in time") {
            Some(Ok(WsMessage::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// The change feed admits only tokens that open it, closes a session when its token expires,
/// and pings like every other endpoint.
#[tokio::test]
async fn the_change_feed_checks_scopes_expiry_and_pings() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    sql(&url, "CREATE TABLE public.items (id int PRIMARY KEY, name text); INSERT INTO public.items VALUES (1,'a');")
        .await;
    let server = Server::start(&[
        "--pg-url",
        &url,
        "--pg-tables",
        "public.items",
        "--sync-shared-secret",
        "pgs",
        "--ping-interval",
        "300ms",
    ]);
    server.wait_ready();
    let auth = moai_server::Auth::with_secret("pgs");

    // A token scoped to Yjs documents does not open the change feed.
    let docs = auth
        .mint(&moai_server::auth::Claims { sub: "u".into(), docs: Some(vec!["*".into()]), ..Default::default() })
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(server.ws_url(&format!("/api/sync?token={docs}"))).await.unwrap();
    assert_eq!(close_code(&mut ws).await.0, 4403);

    // A token that expires in two seconds: served, pinged, then closed with 4403.
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 2;
    let short =
        auth.mint(&moai_server::auth::Claims { sub: "u".into(), exp: Some(exp), ..Default::default() }).unwrap();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(server.ws_url(&format!("/api/sync?token={short}"))).await.unwrap();
    let hello = json!({"type": "hello", "protocol": 1, "client_id": "exp-1", "position": null,
                       "shapes": [{"id": "s1", "table": "public.items"}]});
    ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    assert_eq!(snapshot_names(&mut ws).await.unwrap(), vec!["a"]);
    let mut pings = 0;
    let (code, reason) = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("closed in time") {
            Some(Ok(WsMessage::Ping(_))) => pings += 1,
            Some(Ok(WsMessage::Close(Some(f)))) => break (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("expected pings then a close, got {other:?}"),
        }
    };
    assert_eq!((code, reason.as_str()), (4403, "token expired"));
    assert!(pings >= 1, "the change feed sent no WebSocket ping");
}

/// The edge passes the token's subject to the engine: the same `client_id` used by two
/// subjects is two registrations with their own positions, so one user's client can never
/// overwrite (or lower) another user's retention floor.
#[tokio::test]
async fn registrations_are_keyed_by_the_token_subject() {
    let cluster = pg::PgCluster::start();
    let url = cluster.url();
    sql(&url, "CREATE TABLE public.items (id int PRIMARY KEY, name text); INSERT INTO public.items VALUES (1,'a');")
        .await;
    let server = Server::start(&["--pg-url", &url, "--pg-tables", "public.items", "--sync-shared-secret", "pgs"]);
    server.wait_ready();
    let mut acked = Vec::new();
    for sub in ["alice", "bob"] {
        let token = moai_server::Auth::with_secret("pgs")
            .mint(&moai_server::auth::Claims {
                sub: sub.into(),
                exp: None,
                docs: None,
                tables: None,
                ..Default::default()
            })
            .unwrap();
        let (mut ws, _) =
            tokio_tungstenite::connect_async(server.ws_url(&format!("/api/sync?token={token}"))).await.unwrap();
        let hello = json!({"type": "hello", "protocol": 1, "client_id": "same-id", "position": null,
                           "shapes": [{"id": "s1", "table": "public.items"}]});
        ws.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
        let position = loop {
            let m = next_json(&mut ws).await;
            if m["type"] == "up_to_date" {
                break m["position"].clone();
            }
            assert_ne!(m["type"], "error", "{m}");
        };
        if sub == "alice" {
            ws.send(WsMessage::Text(json!({"type": "ack", "position": position}).to_string().into())).await.unwrap();
            acked.push(position["lsn"].as_str().unwrap().to_owned());
        }
        ws.close(None).await.unwrap();
        // Wait for the server's close: the session has ended and written its last ack.
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            if matches!(m, WsMessage::Close(_)) {
                break;
            }
        }
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<(String, Option<String>)> = client
            .query(
                "SELECT subject, pos_lsn::text FROM moai_sync.clients WHERE client_id = 'same-id' ORDER BY subject",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let expected = vec![("alice".to_string(), Some(acked[0].clone())), ("bob".to_string(), None)];
        if rows == expected {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "registry rows: {rows:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
