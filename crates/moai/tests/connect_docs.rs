//! The snippets of docs/connect.md are real: each ```js block after a `<!-- runs: NAME -->` line
//! is run with Node (from interop/, where the npm clients are) against a real moai, and must
//! print `ok`. A doc that drifts from what the clients or the server do fails here.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::pg::PgCluster;
use support::Server;

fn snippets() -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/connect.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("<!-- runs: ").and_then(|l| l.strip_suffix(" -->")) else { continue };
        if name.contains(' ') {
            continue; // not run yet (the note says why)
        }
        assert_eq!(lines.next().map(str::trim), Some("```js"), "a js block must follow <!-- runs: {name} -->");
        let code: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        out.push((name.to_owned(), code.join("\n")));
    }
    out
}

fn snippet(name: &str) -> String {
    snippets().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no snippet {name} in docs/connect.md")).1
}

/// Runs a snippet; `on_line` sees each stdout line (to act on cues). Returns when it printed
/// `ok` and exited 0; panics otherwise.
fn run(name: &str, ws: &str, mut on_line: impl FnMut(&str)) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop");
    let file = dir.join(format!(".snippet-{name}-{}.mjs", std::process::id()));
    std::fs::write(&file, snippet(name)).unwrap();
    let mut child = Command::new("node")
        .arg(&file)
        .current_dir(&dir)
        .env("MOAI_WS", ws)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node must be installed");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said_ok = false;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        said_ok |= line.trim() == "ok";
        on_line(&line);
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_file(&file);
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
    assert!(said_ok && status.is_some_and(|s| s.success()), "snippet {name} failed ({status:?}); stderr:\n{stderr}");
}

fn base(server: &Server) -> String {
    format!("ws://{}", server.addr)
}

#[test]
fn the_yjs_snippet_runs() {
    let server = Server::start(&[]);
    server.wait_ready();
    run("yjs", &base(&server), |_| {});
}

#[test]
fn the_hocuspocus_snippet_runs() {
    let server = Server::start(&[]);
    server.wait_ready();
    run("hocuspocus", &base(&server), |_| {});
}

#[test]
fn the_jazz_snippet_runs() {
    let server = Server::start(&[]);
    server.wait_ready();
    run("jazz", &base(&server), |_| {});
}

#[test]
fn the_change_feed_snippet_runs() {
    let cluster = PgCluster::start();
    let url = cluster.url();
    psql(&url, "CREATE TABLE public.todos (id int PRIMARY KEY, title text, done bool); INSERT INTO public.todos VALUES (1, 'in the snapshot', false), (2, 'done already', true);");
    let server = Server::start(&["--pg-url", &url, "--pg-tables", "public.todos"]);
    server.wait_ready();
    let mut inserted = false;
    run("change-feed", &base(&server), |line| {
        if line.starts_with("up to date") && !inserted {
            inserted = true;
            psql(&url, "INSERT INTO public.todos VALUES (3, 'written after connecting', false);");
        }
    });
}

fn psql(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            let conn = tokio::spawn(conn);
            client.batch_execute(&sql).await.unwrap();
            drop(client);
            let _ = conn.await;
        });
    })
    .join()
    .unwrap();
}
