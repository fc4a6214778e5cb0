//! The pages a person opens (`/`, `/dashboard`, `/demo`; docs/dashboard.md) against the real
//! binary: over plain HTTP (who is let in, what the answers look like, the event stream's bounds)
//! and in a real browser, headless Chromium driven by `web/test/pages.mjs` (playwright-core).
//!
//! Screenshots for docs/images: `MOAI_SCREENSHOTS=docs/images cargo test -p moai --test pages
//! real_browser` (docs/dashboard.md).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{json, Server};

const TOKEN: &str = "admin-token-for-tests-3f9a";

/// One request; returns status, the header block (lowercase names) and the body.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn get(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    request(server.addr, "GET", path, headers, "")
}

const BROWSER: &[(&str, &str)] = &[("Accept", "text/html,application/xhtml+xml")];

/// Opens the dashboard's event stream with `headers`; returns the socket once the response head
/// and the first event (the history) have arrived, or the refusal's status.
fn open_stream(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<TcpStream, u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET /dashboard/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
    if status != 200 {
        return Err(status);
    }
    let mut head = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while !seen.contains("event: history") {
        assert!(Instant::now() < deadline, "no history event: {seen:?}");
        line.clear();
        reader.read_line(&mut line).unwrap();
        seen.push_str(&line);
    }
    Ok(s)
}

#[test]
fn the_dashboard_is_off_without_an_admin_token() {
    let server = Server::start(&[]);
    server.wait_ready();
    for path in ["/dashboard", "/dashboard/events", "/dashboard?token=anything"] {
        let (status, _, body) = get(&server, path, &[("Authorization", "Bearer anything")]);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(json(&body)["error"].as_str().unwrap().contains("--admin-token"), "{body}");
    }
    let (status, head, body) = get(&server, "/dashboard", BROWSER);
    assert_eq!(status, 404);
    assert!(head.contains("content-type: text/html"), "a browser gets a page: {head}");
    assert!(body.contains("--admin-token") && !body.contains("name=\"token\""), "{body}");
    let (status, _, body) = request(
        server.addr,
        "POST",
        "/dashboard/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=x",
    );
    assert_eq!(status, 404, "{body}");
    let (_, _, landing) = get(&server, "/", BROWSER);
    assert!(landing.contains("Dashboard: off"), "{landing}");
}

#[test]
fn the_dashboard_lets_in_only_the_admin_token() {
    let server = Server::start(&["--admin-token", TOKEN]);
    server.wait_ready();

    // Deny by default: no token, a wrong one, the token in the wrong place.
    let (status, head, body) = get(&server, "/dashboard", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert_eq!(json(&body)["status"], 401);
    for headers in [
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", TOKEN)],
        vec![("Cookie", &*format!("moai_admin={TOKEN}"))],
    ] {
        assert_eq!(get(&server, "/dashboard", &headers).0, 401, "{headers:?}");
        assert_eq!(open_stream(server.addr, &headers).unwrap_err(), 401, "{headers:?}");
    }
    // A browser gets the sign-in form with its 401 (never the dashboard's content).
    let (status, head, body) = get(&server, "/dashboard", BROWSER);
    assert_eq!(status, 401);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains(r#"action="/dashboard/login""#) && !body.contains(r#"id="docs""#), "{body}");

    // The bearer token opens the page and the stream.
    let bearer = format!("Bearer {TOKEN}");
    let (status, head, body) = get(&server, "/dashboard", &[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#"id="docs""#) && body.contains("/assets/dashboard.js"), "{body}");
    assert!(head.contains("content-security-policy: default-src 'self'"), "{head}");
    drop(open_stream(server.addr, &[("Authorization", &bearer)]).expect("stream with the bearer token"));

    // ?token= and the form set a strict, HttpOnly cookie (not the token) and redirect.
    for (method, path, body) in [
        ("GET", format!("/dashboard?token={TOKEN}"), String::new()),
        ("POST", "/dashboard/login".into(), format!("token={TOKEN}")),
    ] {
        let (status, head, _) =
            request(server.addr, method, &path, &[("Content-Type", "application/x-www-form-urlencoded")], &body);
        assert_eq!(status, 303, "{method} {path}");
        assert!(head.contains("location: /dashboard\r\n"), "{head}");
        let cookie = head.lines().find_map(|l| l.strip_prefix("set-cookie: ")).expect("a cookie").to_owned();
        assert!(
            cookie.contains("httponly") && cookie.contains("samesite=strict") && cookie.contains("path=/dashboard"),
            "{cookie}"
        );
        assert!(!cookie.contains(&TOKEN.to_ascii_lowercase()), "the cookie holds the token: {cookie}");
        let pair = cookie.split(';').next().unwrap().to_owned();
        assert_eq!(get(&server, "/dashboard", &[("Cookie", &pair)]).0, 200);
        drop(open_stream(server.addr, &[("Cookie", &pair)]).expect("stream with the cookie"));
    }
    let (status, _, body) = request(
        server.addr,
        "POST",
        "/dashboard/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=nope",
    );
    assert_eq!(status, 401, "{body}");

    // The token is never logged; refusals are counted.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!server.logs().iter().any(|l| l.contains(TOKEN)), "the admin token was logged");
    let (_, metrics) = server.get("/metrics");
    assert!(metrics.contains(r#"moai_rejected_total{reason="dashboard_auth"}"#), "{metrics}");
}

#[test]
fn dashboard_streams_are_bounded_and_end_at_shutdown() {
    // A stream outlives --request-timeout (which bounds producing a response, not streaming it).
    let mut server = Server::start(&["--admin-token", TOKEN, "--shutdown-grace", "20s", "--request-timeout", "1s"]);
    server.wait_ready();
    let bearer = format!("Bearer {TOKEN}");
    let streams: Vec<TcpStream> = (0..16)
        .map(|i| open_stream(server.addr, &[("Authorization", &bearer)]).unwrap_or_else(|s| panic!("stream {i}: {s}")))
        .collect();
    assert_eq!(open_stream(server.addr, &[("Authorization", &bearer)]).unwrap_err(), 503, "the 17th viewer");
    // A stream sends a snapshot a second: the latest JSON, with the server's numbers; still
    // after the request timeout.
    let mut reader = BufReader::new(streams[0].try_clone().unwrap());
    let mut line = String::new();
    let mut snapshots = Vec::new();
    let opened = Instant::now();
    while snapshots.len() < 4 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data.starts_with('{') {
                snapshots.push(json(data));
            }
        }
    }
    assert!(opened.elapsed() > Duration::from_millis(1500), "{:?}", opened.elapsed());
    let snapshot = snapshots.pop().unwrap();
    assert_eq!(snapshot["phase"], "ready");
    // The storage's size is measured while someone watches: the database file and its WAL.
    assert!(snapshot["storage"]["what"].as_str().unwrap().starts_with("SQLite database"), "{snapshot}");
    assert!(snapshot["storage"]["bytes"].as_u64().unwrap() > 0, "{snapshot}");
    assert!(snapshot["yjs"]["loaded"].is_u64(), "{snapshot}");
    // One leaves, another gets in.
    drop(reader);
    let mut streams = streams;
    drop(streams.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        match open_stream(server.addr, &[("Authorization", &bearer)]) {
            Ok(s) => break s,
            Err(503) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(s) => panic!("{s}"),
        }
    };
    streams.push(again);
    // Open streams do not hold shutdown up: they end, and the server exits at once.
    let asked = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10)).expect("moai exits with dashboard streams open");
    assert!(status.success(), "{status:?}");
    assert!(asked.elapsed() < Duration::from_secs(5), "shutdown waited {:?}", asked.elapsed());
}

#[test]
fn the_landing_page_says_what_the_server_is_and_whether_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("go");
    let server = Server::start(&["--test-hold-init-until", gate.to_str().unwrap()]);
    let (status, head, body) = get(&server, "/", BROWSER);
    assert_eq!(status, 200, "the page answers while initialising");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("initialising"), "{body}");
    assert!(body.contains(&format!(r#"<dd id="version">{}</dd>"#, env!("CARGO_PKG_VERSION"))), "{body}");
    std::fs::write(&gate, b"").unwrap();
    server.wait_ready();
    let (_, _, body) = get(&server, "/", BROWSER);
    assert!(body.contains(r#"<span class="pill ok">ready</span>"#), "{body}");
    for link in [r#"href="/health""#, r#"href="/metrics""#, r#"href="/demo""#] {
        assert!(body.contains(link), "{link} missing: {body}");
    }
    assert!(body.contains("Yjs") && body.contains("CoJSON") && body.contains("off (start with --pg-url)"), "{body}");
    // The demo and its assets come from the binary: no other host is named.
    let (status, _, demo) = get(&server, "/demo", BROWSER);
    assert_eq!(status, 200);
    assert!(demo.contains(r#"<script src="/assets/demo.js"></script>"#), "{demo}");
    let (status, head, js) = get(&server, "/assets/demo.js", &[]);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript") && js.len() > 100_000, "{head}");
    let etag = head.lines().find_map(|l| l.strip_prefix("etag: ")).expect("etag").to_owned();
    assert_eq!(get(&server, "/assets/demo.js", &[("If-None-Match", &etag)]).0, 304);
    assert_eq!(get(&server, "/assets/nope.js", &[]).0, 404);
    for page in [&body, &demo] {
        assert!(!page.contains("http://") && !page.contains("https://"), "a page loads from elsewhere: {page}");
    }
}

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../web")
}

/// The pages in headless Chromium: / (version, readiness), /dashboard refused without the token
/// and signed in with it, two /demo tabs converging and seeing each other's cursor, and the
/// dashboard showing the demo's document live, then dropping it after eviction
/// (web/test/pages.mjs says each step).
#[test]
fn the_pages_work_in_a_real_browser() {
    let chromium = std::env::var("MOAI_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "headless Chromium is needed at {chromium} (Debian's `chromium`; ./scripts/test installs it)"
    );
    let web = web_dir();
    assert!(
        web.join("node_modules/playwright-core").exists(),
        "npm packages missing: run ./scripts/test (or `npm ci` in {})",
        web.display()
    );
    let server = Server::start(&["--admin-token", TOKEN, "--yjs-idle-evict", "1s"]);
    server.wait_ready();
    let mut cmd = Command::new("node");
    cmd.arg("test/pages.mjs")
        .args(["--url", &server.url(""), "--admin-token", TOKEN, "--version", env!("CARGO_PKG_VERSION")])
        .current_dir(&web)
        .env("MOAI_CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Ok(dir) = std::env::var("MOAI_SCREENSHOTS") {
        let dir = std::fs::canonicalize(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(dir)).unwrap();
        cmd.args(["--screenshots", dir.to_str().unwrap()]);
    }
    let out = cmd.output().expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for step in [
        "landing",
        "dashboard refuses a missing token",
        "dashboard signs in",
        "demo tabs converge",
        "demo tabs see each other's cursor",
        "dashboard shows the document",
        "dashboard shows document ids as text",
        "dashboard drops the document after eviction",
    ] {
        assert!(stdout.contains(&format!(r#"{{"step":"{step}","ok":true"#)), "step {step:?} did not pass:\n{stdout}");
    }
}

/// On a server that requires connection tokens, the demo says it was refused without one and
/// works with `?token=` (a token minted for the demo's documents only).
#[test]
fn the_demo_takes_a_connection_token() {
    let web = web_dir();
    assert!(web.join("node_modules/playwright-core").exists(), "npm packages missing: run ./scripts/test");
    let secret = "pages-test-secret";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let server = Server::start_with_env(dir, &db, &["--admin-token", TOKEN], &[("SYNC_SHARED_SECRET", secret)]);
    server.wait_ready();
    let minted = Command::new(support::BIN)
        .args(["token", "demo-user", "--doc", "demo-*", "--ttl", "1h", "--secret", secret])
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    let demo_token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    let out = Command::new("node")
        .arg("test/pages.mjs")
        .args(["--url", &server.url(""), "--admin-token", TOKEN, "--demo-token", &demo_token])
        .current_dir(&web)
        .env("MOAI_CHROMIUM", std::env::var("MOAI_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()))
        .output()
        .expect("node must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "browser test failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for step in ["landing says tokens are required", "demo without a token is refused", "demo with a token edits"] {
        assert!(stdout.contains(&format!(r#"{{"step":"{step}","ok":true"#)), "step {step:?} did not pass:\n{stdout}");
    }
}

/// With the change feed on, the dashboard's snapshots carry its role, and (read every 5 s while
/// someone watches) its lag behind the WAL and its registered clients.
#[test]
fn the_dashboard_shows_the_change_feed() {
    let cluster = support::pg::PgCluster::start();
    let url = cluster.url();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute("CREATE TABLE public.items (id int PRIMARY KEY, name text)").await.unwrap();
    });
    let server = Server::start(&["--admin-token", TOKEN, "--pg-url", &url, "--pg-tables", "public.items"]);
    server.wait_ready();
    let stream = open_stream(server.addr, &[("Authorization", &format!("Bearer {TOKEN}"))]).unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let pgsync = loop {
        assert!(Instant::now() < deadline, "no change feed status in the snapshots");
        line.clear();
        reader.read_line(&mut line).unwrap();
        let Some(data) = line.strip_prefix("data: ").filter(|d| d.starts_with('{')) else { continue };
        let snapshot = json(data);
        if snapshot["pgsync"]["registered_clients"].is_u64() {
            break snapshot["pgsync"].clone();
        }
    };
    assert_eq!(pgsync["role"], "replicating", "{pgsync}");
    assert_eq!(pgsync["registered_clients"], 0, "{pgsync}");
    assert!(pgsync["lag_bytes"].is_u64() && pgsync["watermark"].is_string(), "{pgsync}");
}
