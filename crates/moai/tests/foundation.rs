//! The server foundation as operators and orchestration see it: readiness, gates, wait-ready,
//! shutdown, init failures, metrics and limits. Every test runs the real binary.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{closed_port, http, json, Server, BIN};

const SYNC_PATHS: [&str; 3] = ["/sync", "/sync/v1/some-doc", "/api/sync"];

#[test]
fn health_is_503_until_initialised_then_200() {
    let gate = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let gate_path = gate.to_path_buf();
    gate.close().unwrap(); // the file must not exist yet
    let server = Server::start(&["--test-hold-init-until", gate_path.to_str().unwrap()]);
    server.wait_log("holding initialisation", Duration::from_secs(10)).expect("hook engaged");

    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "not ready must not look healthy to a platform check");
    let v = json(&body);
    assert_eq!(
        (v["status"].as_str(), v["service"].as_str(), v["ready"].as_bool()),
        (Some("ok"), Some("sync"), Some(false))
    );

    let (status, body) = server.get("/healthz");
    assert_eq!(status, 200, "liveness answers as soon as HTTP is served");
    assert_eq!(json(&body)["ready"], false);

    for path in SYNC_PATHS {
        let (status, body) =
            http(server.addr, "GET", path, &[("Connection", "Upgrade"), ("Upgrade", "websocket")], b"");
        assert_eq!(status, 503, "{path}");
        assert_eq!(json(&body), serde_json::json!({"error": "Initializing", "status": 503}));
        // A plain request during init is also told to come back, not that it is malformed.
        assert_eq!(server.get(path).0, 503, "{path}");
    }

    std::fs::write(&gate_path, b"go").unwrap();
    server.wait_ready();
    let (status, body) = server.get("/health");
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(
        (v["status"].as_str(), v["service"].as_str(), v["ready"].as_bool()),
        (Some("ok"), Some("sync"), Some(true))
    );
}

#[test]
fn sync_endpoints_answer_426_to_plain_http_once_ready() {
    let server = Server::start(&[]);
    server.wait_ready();
    for path in SYNC_PATHS {
        let (status, body) = server.get(path);
        assert_eq!(status, 426, "{path}");
        assert_eq!(json(&body)["error"], "Expected WebSocket upgrade");
    }
    assert_eq!(server.get("/no/such/thing").0, 404);
}

#[test]
fn wait_ready_succeeds_against_a_ready_server() {
    let server = Server::start(&[]);
    let out = Command::new(BIN).args(["wait-ready", &server.url("/"), "--timeout", "20s"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn wait_ready_times_out_while_the_server_initialises() {
    let gate = tempfile::tempdir().unwrap();
    let gate_path = gate.path().join("never");
    let server = Server::start(&["--test-hold-init-until", gate_path.to_str().unwrap()]);
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["wait-ready", &server.url("/health"), "--timeout", "600ms", "--interval", "100ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not ready after") && stderr.contains("ready:false"), "{stderr}");
    assert!(started.elapsed() >= Duration::from_millis(500), "gave up before its timeout");
}

#[test]
fn wait_ready_reports_connection_refused_after_the_timeout() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let out =
        Command::new(BIN).args(["wait-ready", &url, "--timeout", "500ms", "--interval", "100ms"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("refused"), "{stderr}");
}

#[test]
fn sigterm_exits_zero_promptly_and_leaves_a_consistent_database() {
    let mut server = Server::start(&["--shutdown-grace", "5s"]);
    server.wait_ready();
    let started = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(8)).expect("moai must exit within its grace period");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5), "idle server took {:?}", started.elapsed());
    assert!(server.logs().iter().any(|l| l.contains("storage flushed and closed")));
    // The WAL was checkpointed into the main file on close.
    let wal = server.db_path().with_extension("db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
}

#[test]
fn sigint_is_handled_like_sigterm() {
    let mut server = Server::start(&[]);
    server.wait_ready();
    server.signal("INT");
    assert_eq!(server.wait_exit(Duration::from_secs(8)).and_then(|s| s.code()), Some(0));
}

#[test]
fn an_unusable_db_path_fails_initialisation_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let db = not_a_dir.join("moai.db"); // parent is a regular file
    let mut server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    let status = server.wait_exit(Duration::from_secs(10)).expect("must exit");
    assert_eq!(status.code(), Some(1));
    let line = server.wait_log("initialisation failed", Duration::from_secs(1)).expect("logged");
    assert!(line.contains("opening storage at") && line.contains("moai.db"), "{line}");
}

#[test]
fn worker_threads_can_be_set_and_zero_is_refused() {
    let out = Command::new(BIN).args(["serve", "--worker-threads", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--worker-threads"), "{out:?}");
    // One worker serves as usual.
    let server = Server::start(&["--worker-threads", "1"]);
    server.wait_ready();
}

#[test]
fn a_corrupt_database_fails_initialisation_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    std::fs::write(&db, vec![7u8; 4096]).unwrap();
    let mut server = Server::start_in(dir, &db, &[]);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(1));
    let line = server.wait_log("initialisation failed", Duration::from_secs(1)).expect("logged");
    assert!(line.contains("not a database"), "{line}");
    assert_eq!(std::fs::read(&db).unwrap(), vec![7u8; 4096]);
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let server = Server::start(&[]);
    server.wait_ready();
    server.get("/sync"); // one rejected plain request, so a labelled counter exists
    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200);
    let samples = parse_prometheus(&body);
    let value = |name: &str| samples.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    assert_eq!(value("moai_ready"), Some(1.0));
    assert_eq!(value("moai_build_info{version=\"0.1.0\"}"), Some(1.0));
    assert_eq!(value("moai_rejected_total{reason=\"not_websocket\"}"), Some(1.0));
    assert!(value("moai_storage_commit_seconds_count").is_some());
    assert!(value("moai_storage_batch_writes_count").is_some());
}

/// Checks the exposition format line by line (what a Prometheus scrape would reject) and
/// returns `(series, value)` pairs.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# HELP ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        assert!(typed.iter().any(|t| name.starts_with(t.as_str())), "sample {name} has no # TYPE before it");
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.push((series.to_owned(), v));
    }
    assert!(!samples.is_empty());
    samples
}

#[test]
fn an_oversized_request_body_gets_413() {
    let server = Server::start(&["--max-body-bytes", "1KiB"]);
    server.wait_ready();
    let (status, _) = http(server.addr, "POST", "/health", &[], &vec![b'x'; 4096]);
    assert_eq!(status, 413);
    let (status, _) = http(server.addr, "POST", "/health", &[], &vec![b'x'; 512]);
    assert_ne!(status, 413, "a body under the limit is not refused for its size");
}

#[test]
fn connections_over_the_limit_get_503() {
    let server = Server::start(&["--max-connections", "2"]);
    server.wait_ready();
    // Two idle connections hold both slots (they have 10 s to send headers).
    let _a = TcpStream::connect(server.addr).unwrap();
    let _b = TcpStream::connect(server.addr).unwrap();
    let mut c = TcpStream::connect(server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp:?}");
    assert!(resp.contains("Too many connections"));
    assert!(server.wait_log("too many open connections", Duration::from_secs(5)).is_some());
}

#[test]
fn a_client_that_never_sends_headers_is_disconnected() {
    let server = Server::start(&["--handshake-timeout", "300ms"]);
    server.wait_ready();
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\n").unwrap(); // and never finish the headers
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf); // EOF (or reset) when the server gives up
    assert!(started.elapsed() < Duration::from_secs(9), "connection was held open");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut server = Server::start(&["--shutdown-grace", "30s"]);
    server.wait_ready();
    // A WebSocket client that never reads: graceful shutdown waits for its close handshake.
    let mut ws = TcpStream::connect(server.addr).unwrap();
    let handshake = format!(
        "GET /sync/v1/stuck HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    ws.write_all(handshake.as_bytes()).unwrap();
    let mut buf = [0u8; 12];
    ws.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    server.wait_log("session open", Duration::from_secs(5)).expect("session open");

    server.signal("TERM");
    server.wait_log("shutting down", Duration::from_secs(5)).expect("first signal handled");
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits at once");
    assert_eq!(status.code(), Some(130), "the second signal skips the graceful path");
    drop(ws);
}

#[test]
fn wait_ready_probes_at_its_deadline_even_with_a_long_interval() {
    // `--timeout 5s --interval 3s` used to give up after the second probe at 3 s and miss a
    // server that became ready at 3.5 s.
    let gate = tempfile::tempdir().unwrap();
    let gate_path = gate.path().join("go");
    let server = Server::start(&["--test-hold-init-until", gate_path.to_str().unwrap()]);
    server.wait_log("holding initialisation", Duration::from_secs(10)).expect("hook engaged");
    let url = server.url("/health");
    let waiter = std::thread::spawn(move || {
        Command::new(BIN).args(["wait-ready", &url, "--timeout", "5s", "--interval", "3s"]).output().unwrap()
    });
    std::thread::sleep(Duration::from_millis(3500)); // the server becomes ready at 3.5 s, by design
    std::fs::write(&gate_path, b"go").unwrap();
    let out = waiter.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_failed_start_is_visible_on_health_and_ends_wait_ready_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let db = not_a_dir.join("moai.db");
    let mut server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["wait-ready", &server.url("/"), "--timeout", "30s", "--interval", "50ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reports initialisation failed") && stderr.contains("opening storage"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "wait-ready ran to its timeout");
    assert_eq!(server.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(1));
}

#[test]
fn health_answers_503_while_sessions_drain() {
    let mut server = Server::start(&["--shutdown-grace", "10s"]);
    server.wait_ready();
    // A raw WebSocket client that never reads: it never answers the server's close frame, so
    // its session takes the full close linger (2 s) to end.
    let mut ws = TcpStream::connect(server.addr).unwrap();
    write!(
        ws,
        "GET /sync/v1/drain HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    ws.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    server.signal("TERM");
    // The listener still answers, and says the instance is going away.
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        match support::try_http(server.addr, "GET", "/health", &[], b"") {
            Ok((503, body)) => break body,
            Ok((200, _)) if Instant::now() < deadline => continue,
            other => panic!("expected 503 while draining, got {other:?}"),
        }
    };
    assert_eq!(json(&body)["draining"], true, "{body}");
    assert_eq!(server.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0));
    drop(ws);
}
