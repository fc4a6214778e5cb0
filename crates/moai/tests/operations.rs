//! The offline commands an operator relies on: `moai backup` while serving under writes (a
//! consistent copy that restores to a working server), `moai restore` (checked, refused while a
//! server runs, the replaced database kept), and `moai doc export|import|list|stats` (v1 updates
//! any Yjs tool reads).

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moai_yjs::yrs::Doc;
use support::yjs::{edit, text_of_update};
use support::{http, Server, BIN};

fn moai(args: &[&str], db: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--db-path")
        .arg(db)
        .env_remove("MOAI_STORAGE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn post(server: &Server, doc: &str, update: &[u8]) -> u16 {
    http(server.addr, "POST", &format!("/api/v1/docs/{doc}/update"), &[], update).0
}

fn text(server: &Server, doc: &str) -> String {
    let (status, _) = http(server.addr, "GET", &format!("/api/v1/docs/{doc}/update"), &[], b"");
    assert_eq!(status, 200);
    let bytes = get_bytes(server, doc);
    text_of_update(&bytes)
}

/// The raw body of GET /api/v1/docs/{doc}/update.
fn get_bytes(server: &Server, doc: &str) -> Vec<u8> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    write!(s, "GET /api/v1/docs/{doc}/update HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let body = raw[split..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let len = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            if len == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + len]);
            rest = &rest[line_end + 2 + len + 2..];
        }
        out
    } else {
        body
    }
}

#[test]
fn a_backup_taken_while_writes_go_on_is_consistent_and_restores_to_a_working_server() {
    let server = Server::start(&[]);
    server.wait_ready();
    let db = server.db_path();
    let writer = Doc::new();
    // Writes keep coming during the backup; each acknowledged one is recorded.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    for i in 0..50 {
        assert_eq!(post(&server, "doc", &edit(&writer, &format!("[{i}]"))), 204);
        acknowledged.lock().unwrap().push(format!("[{i}]"));
    }
    // Enough pages that a one-page-per-step backup takes many steps while writes commit.
    let filler = "x".repeat(64 * 1024);
    for i in 0..8 {
        assert_eq!(post(&server, &format!("filler-{i}"), &edit(&Doc::new(), &filler)), 204);
    }
    let load = {
        let (acknowledged, stop, addr) = (acknowledged.clone(), stop.clone(), server.addr);
        std::thread::spawn(move || {
            let writer2 = Doc::new();
            let mut i = 1000;
            while !stop.load(Ordering::Relaxed) {
                let token = format!("[{i}]");
                let status = http(addr, "POST", "/api/v1/docs/doc/update", &[], &edit(&writer2, &token)).0;
                assert_eq!(status, 204);
                acknowledged.lock().unwrap().push(token);
                i += 1;
            }
        })
    };
    let before_backup: Vec<String> = acknowledged.lock().unwrap().clone();
    let backup = server.dir.path().join("backup.db");
    let out = moai(&["backup", backup.to_str().unwrap(), "--pages-per-step", "1"], &db, None);
    let written_during = acknowledged.lock().unwrap().len() - before_backup.len();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("checked"), "{}", stderr(&out));
    assert!(written_during > 0, "writes went on during the backup");
    // A second backup to the same path is refused: never overwrite a file.
    let again = moai(&["backup", backup.to_str().unwrap()], &db, None);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));

    // Restore into a fresh place and serve it: everything acknowledged before the backup began
    // is there.
    let dir = tempfile::tempdir().unwrap();
    let restored_db = dir.path().join("restored.db");
    let closed = support::closed_port().to_string();
    let out = moai(&["restore", backup.to_str().unwrap(), "--port", &closed], &restored_db, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let restored = Server::start_in(dir, &restored_db, &[]);
    restored.wait_ready();
    let got = text(&restored, "doc");
    for token in &before_backup {
        assert!(got.contains(token.as_str()), "{token} was acknowledged before the backup and is missing");
    }
}

/// A server on a database that outlives it (in `keep`), as an operator's file does.
fn server_on(keep: &tempfile::TempDir) -> Server {
    let server = Server::start_in(tempfile::tempdir().unwrap(), &keep.path().join("moai.db"), &[]);
    server.wait_ready();
    server
}

#[test]
fn restore_refuses_while_the_server_runs_and_keeps_the_database_it_replaces() {
    let keep = tempfile::tempdir().unwrap();
    let server = server_on(&keep);
    let db = keep.path().join("moai.db");
    let writer = Doc::new();
    assert_eq!(post(&server, "doc", &edit(&writer, "before")), 204);
    let backup = keep.path().join("b.db");
    assert!(moai(&["backup", backup.to_str().unwrap()], &db, None).status.success());
    assert_eq!(post(&server, "doc", &edit(&writer, " after")), 204);

    let port = server.addr.port().to_string();
    let refused = moai(&["restore", backup.to_str().unwrap(), "--port", &port], &db, None);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("stop it first"), "{}", stderr(&refused));

    // A file that is not a backup is refused before anything changes.
    let junk = keep.path().join("junk.db");
    std::fs::write(&junk, b"not a database").unwrap();
    let closed = support::closed_port().to_string();
    let bad = moai(&["restore", junk.to_str().unwrap(), "--port", &closed], &db, None);
    assert!(!bad.status.success(), "{}", stderr(&bad));

    drop(server); // stops it (kill), as an operator stops moai before restoring
    let out = moai(&["restore", backup.to_str().unwrap(), "--port", &closed], &db, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let kept = stderr(&out);
    assert!(kept.contains("before-restore-"), "{kept}");
    let kept_path = kept.rsplit("kept as ").next().unwrap().trim();
    assert!(Path::new(kept_path).exists());
    let dir = tempfile::tempdir().unwrap();
    let restored = Server::start_in(dir, &db, &[]);
    restored.wait_ready();
    assert_eq!(text(&restored, "doc"), "before");
}

#[test]
fn documents_export_and_import_as_yjs_updates_and_are_listed_with_their_sizes() {
    let keep = tempfile::tempdir().unwrap();
    let server = server_on(&keep);
    let db = keep.path().join("moai.db");
    let writer = Doc::new();
    for s in ["hello", " world"] {
        assert_eq!(post(&server, "notes", &edit(&writer, s)), 204);
    }
    assert_eq!(post(&server, "other", &edit(&Doc::new(), "x")), 204);

    // Export while serving: a v1 update any Yjs tool reads.
    let out = moai(&["doc", "export", "notes"], &db, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let exported = out.stdout;
    assert_eq!(text_of_update(&exported), "hello world");
    let missing = moai(&["doc", "export", "nope"], &db, None);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("no document nope"));

    let list = moai(&["doc", "list"], &db, None);
    assert_eq!(String::from_utf8_lossy(&list.stdout), "notes\nother\n");
    let stats = moai(&["doc", "stats", "notes"], &db, None);
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["id"], "notes");
    assert_eq!(v["state_bytes"].as_u64(), Some(exported.len() as u64));
    let all = moai(&["doc", "stats"], &db, None);
    let v: serde_json::Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(v["documents"], 2);

    // Import is refused while the server runs (it would not see it); it says how instead.
    let port = server.addr.port().to_string();
    let refused = moai(&["doc", "import", "copy", "--port", &port], &db, Some(&exported));
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("curl -X POST"), "{}", stderr(&refused));
    drop(server);

    // Offline: import into a new document, and garbage is refused without writing.
    let closed = support::closed_port().to_string();
    let out = moai(&["doc", "import", "copy", "--port", &closed], &db, Some(&exported));
    assert!(out.status.success(), "{}", stderr(&out));
    let bad = moai(&["doc", "import", "copy", "--port", &closed], &db, Some(b"\xff\xff\xff garbage"));
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("not a valid Yjs v1 update"), "{}", stderr(&bad));
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir, &db, &[]);
    server.wait_ready();
    assert_eq!(text(&server, "copy"), "hello world");
    assert_eq!(text(&server, "notes"), "hello world");
}

#[test]
fn backup_of_postgres_storage_points_to_the_right_tools() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["backup", "x.db", "--storage", "postgres://u@127.0.0.1:1/db"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("pg_dump"), "{}", stderr(&out));
    let _ = Duration::ZERO;
}
