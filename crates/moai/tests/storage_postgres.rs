//! The binary on PostgreSQL storage (`--storage postgres://…`) against a throwaway cluster
//! (crates/moai-pgsync/tests/support/pg.rs): acknowledged Yjs updates survive `kill -9` and a
//! restart of moai; while the database is stopped /health says 503 with the storage reason, and
//! it turns 200 again by itself once the database is back; the password is never logged.

mod support;

// The throwaway cluster (crates/moai-pgsync/tests/support/pg.rs), included once by support.
use support::pg;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use moai_yjs::yrs::Doc;
use support::yjs::{edit, text_of_update};
use support::{http, json, Server};

/// The document's text as the HTTP API serves it.
fn read_text(server: &Server, doc: &str) -> String {
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    write!(s, "GET /api/v1/docs/{doc}/update HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw[..split]));
    text_of_update(&raw[split..])
}

fn start(url: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    // --db-path is what every test server gets; --storage wins over it.
    let db = dir.path().join("unused.db");
    let server = Server::start_in(dir, &db, &["--storage", url]);
    server.wait_ready();
    server
}

fn wait_health(server: &Server, status: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (s, body) = server.get("/health");
        if s == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/health never became {status}: {s} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn yjs_on_postgres_survives_kill_and_reports_a_stopped_database_on_health() {
    let pg = pg::PgCluster::start();
    // Trust authentication ignores the password, which lets the test check it is never logged.
    let url = format!("postgres://postgres:hunter2-secret@127.0.0.1:{}/postgres", pg.port);
    let mut server = start(&url);
    let listening = server.wait_log("moai listening", Duration::from_secs(1)).unwrap();
    assert!(
        listening.contains(&format!("postgres://postgres:***@127.0.0.1:{}/postgres", pg.port)),
        "the log names the backend: {listening}"
    );
    assert!(!server.logs().iter().any(|l| l.contains("hunter2")), "the password was logged");
    assert!(!server.db_path().with_file_name("unused.db").exists(), "no SQLite file with --storage postgres");

    let path = "/api/v1/docs/d/update";
    let writer = Doc::new();
    assert_eq!(http(server.addr, "POST", path, &[], &edit(&writer, "acked ")).0, 204);
    assert_eq!(read_text(&server, "d"), "acked ");

    // kill -9, restart on the same database: the acknowledged update is there.
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    let server = start(&url);
    assert_eq!(read_text(&server, "d"), "acked ");

    // The database stops. Even with no client writing, /health notices (the idle probe) and
    // says why; a write fails with 503 instead of hanging or being acknowledged.
    pg.stop_immediate();
    let body = wait_health(&server, 503, Duration::from_secs(20));
    let v = json(&body);
    assert_eq!((v["status"].as_str(), v["ready"].as_bool()), (Some("degraded"), Some(false)), "{body}");
    let reason = v["storage_error"].as_str().unwrap_or_default().to_lowercase();
    assert!(reason.contains("postgres") || reason.contains("connect"), "{reason}");
    assert!(!reason.contains("hunter2"), "{reason}");
    let started = Instant::now();
    let (status, body) = http(server.addr, "POST", path, &[], &edit(&Doc::new(), "refused"));
    assert_eq!(status, 503, "{body}");
    assert!(started.elapsed() < Duration::from_secs(15), "a write waited {:?}", started.elapsed());

    // The database is back: /health turns 200 by itself, writes work again.
    pg.start_again();
    wait_health(&server, 200, Duration::from_secs(20));
    assert_eq!(http(server.addr, "POST", path, &[], &edit(&Doc::new(), "after")).0, 204);

    // Nothing acknowledged was lost and the refused write did not land: kill -9 and read.
    let mut server = server;
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    let server = start(&url);
    let text = read_text(&server, "d");
    assert!(text.contains("acked ") && text.contains("after") && !text.contains("refused"), "{text}");
    assert!(!server.logs().iter().any(|l| l.contains("hunter2")), "the password was logged");
}

#[test]
fn an_invalid_storage_value_fails_start_without_showing_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let mut server = Server::start_in(dir, &db, &["--storage", "mysql://moai:hunter2@db/app"]);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(1));
    let logs = server.logs().join("\n");
    assert!(logs.contains("expected sqlite:PATH or postgres://"), "{logs}");
    assert!(logs.contains("mysql://moai:***@db/app"), "{logs}");
    assert!(!logs.contains("hunter2"), "{logs}");
}

#[test]
fn storage_sqlite_url_serves_on_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chosen.db");
    let storage = format!("sqlite:{}", file.display());
    let db = dir.path().join("default.db");
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &["--storage", &storage]);
    server.wait_ready();
    assert_eq!(http(server.addr, "POST", "/api/v1/docs/d/update", &[], &edit(&Doc::new(), "x")).0, 204);
    assert!(file.exists() && !db.exists());
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(ws: &mut Ws) -> serde_json::Value {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await.unwrap().unwrap().unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            tokio_tungstenite::tungstenite::Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// One PostgreSQL database for both: moai's storage (`--storage`) and the application database
/// the change feed replicates (`--pg-url`). moai's own tables (schema `moai_storage`) are not
/// published, so its writes never show up in the feed; a Yjs document and the feed both work,
/// also after `kill -9` and a restart.
#[tokio::test]
async fn storage_and_the_change_feed_can_share_one_database() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    let pg = pg::PgCluster::start();
    let url = pg.url();
    {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        client.batch_execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)").await.unwrap();
        drop(client);
        let _ = conn.await;
    }
    let args = ["--storage", url.as_str(), "--pg-url", url.as_str(), "--pg-tables", "public.items"];
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("unused.db");
    let mut server = Server::start_in(dir, &db, &args);
    server.wait_ready();

    let (mut feed, _) = tokio_tungstenite::connect_async(server.ws_url("/api/sync")).await.unwrap();
    let hello = serde_json::json!({"type": "hello", "protocol": 1, "client_id": "shared-db", "position": null,
                                   "shapes": [{"id": "s1", "table": "public.items"}]});
    feed.send(WsMessage::Text(hello.to_string().into())).await.unwrap();
    loop {
        if next_json(&mut feed).await["type"] == "up_to_date" {
            break;
        }
    }
    // moai's own storage writes (a Yjs update, journaled in the same database) are not in the feed…
    let w = Doc::new();
    assert_eq!(http(server.addr, "POST", "/api/v1/docs/shared/update", &[], &edit(&w, "kept")).0, 204);
    {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        let conn = tokio::spawn(conn);
        client.batch_execute("INSERT INTO public.items VALUES (1, 'one')").await.unwrap();
        drop(client);
        let _ = conn.await;
    }
    // …the application's change is, and it is the next thing the client gets.
    let changes = next_json(&mut feed).await;
    assert_eq!(changes["type"], "changes", "{changes}");
    let ops = changes["txns"][0]["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 1, "{changes}");
    assert_eq!(ops[0]["table"], "public.items", "{changes}");
    assert_eq!(read_text(&server, "shared"), "kept");

    // kill -9 and a restart on the same database: both are still there.
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir, &db, &args);
    server.wait_ready();
    assert_eq!(read_text(&server, "shared"), "kept");
}
