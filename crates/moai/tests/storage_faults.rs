//! Storage that fails under a running server: a real full filesystem (a small tmpfs
//! mounted by the test, whose last bytes a filler file takes) and database files made immutable
//! (`chattr +i`) while the server holds them open. Writes are
//! refused with a clear error, /health says why (503), nothing acknowledged is lost, and the
//! server recovers by itself once there is room again.
//!
//! Mounting needs root (CAP_SYS_ADMIN), which the test suite has on its machines (CI runs as
//! root); elsewhere the test says so and does nothing.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use moai_yjs::yrs::updates::decoder::Decode;
use moai_yjs::yrs::{Doc, GetString, ReadTxn, Text, Transact, Update};
use support::{http, json, Server};

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem at `dir` to the last byte; returns the filler's path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let one = [0u8; 1];
    while f.write_all(&one).is_ok() {}
    path
}

fn update(doc: &Doc, s: &str) -> Vec<u8> {
    let t = doc.get_or_insert_text("t");
    let before = doc.transact().state_vector();
    t.push(&mut doc.transact_mut(), s);
    doc.transact().encode_state_as_update_v1(&before)
}

/// The document's text as the HTTP API serves it.
fn read_text(server: &Server, doc: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    write!(s, "GET /api/v1/docs/{doc}/update HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw[..split]));
    let d = Doc::new();
    d.transact_mut().apply_update(Update::decode_v1(&raw[split..]).unwrap()).unwrap();
    let t = d.get_or_insert_text("t");
    let s = t.get_string(&d.transact());
    s
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

#[test]
fn a_full_disk_is_reported_survived_and_recovered_from() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let fs = Tmpfs::mount("8m").expect("mount a tmpfs (root is required)");
    let db = fs.path().join("moai.db");
    let mut server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    server.wait_ready();
    let writer = Doc::new();
    let path = "/api/v1/docs/d/update";
    assert_eq!(http(server.addr, "POST", path, &[], &update(&writer, "acked ")).0, 204);

    let filler = fill(fs.path());
    // A write that needs new pages fails with a clear error, not a hang or a 204.
    let big = update(&writer, &"x".repeat(512 * 1024));
    let (status, body) = http(server.addr, "POST", path, &[], &big);
    assert_eq!(status, 503, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("storage"), "{body}");
    // /health says the instance cannot take writes, and why.
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    let v = json(&body);
    assert_eq!((v["status"].as_str(), v["ready"].as_bool()), (Some("degraded"), Some(false)), "{body}");
    let reason = v["storage_error"].as_str().unwrap().to_lowercase();
    assert!(reason.contains("full") || reason.contains("disk"), "{reason}");

    // Room again: the server notices by itself (no client writes) and is ready again.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.get("/health").0 != 200 {
        assert!(Instant::now() < deadline, "never recovered: {:?}", server.get("/health"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // (A new writer: the first one's document holds the refused edit, which later edits build on.)
    assert_eq!(http(server.addr, "POST", path, &[], &update(&Doc::new(), "after")).0, 204);

    // Nothing acknowledged was lost, the refused write did not half-land: restart and read.
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10)).unwrap();
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    server.wait_ready();
    let text = read_text(&server, "d");
    assert!(text.contains("acked ") && text.contains("after"), "{:?}", &text[..text.len().min(80)]);
    assert_eq!(text.len(), "acked after".len(), "the refused write is not there");
}

fn chattr(flag: &str, path: &Path) -> bool {
    Command::new("chattr").arg(flag).arg(path).status().map(|s| s.success()).unwrap_or(false)
}

/// The database (and its write-ahead log) made immutable under the running server: even root
/// cannot write through the descriptors SQLite already holds. Writes fail with a clear error,
/// /health says why, and the server recovers by itself when the files are writable again.
#[test]
fn a_database_made_read_only_under_a_running_server_is_reported_and_recovered_from() {
    if !is_root() {
        eprintln!("skipped: chattr +i needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("moai.db");
    let server = Server::start_in(tempfile::tempdir().unwrap(), &db, &[]);
    server.wait_ready();
    let path = "/api/v1/docs/d/update";
    assert_eq!(http(server.addr, "POST", path, &[], &update(&Doc::new(), "acked ")).0, 204);
    let wal = db.with_extension("db-wal");
    assert!(chattr("+i", &db) && chattr("+i", &wal), "chattr +i failed (needs root on ext4 or similar)");
    struct Writable(Vec<PathBuf>);
    impl Drop for Writable {
        fn drop(&mut self) {
            for p in &self.0 {
                chattr("-i", p);
            }
        }
    }
    let guard = Writable(vec![db.clone(), wal.clone()]);

    let (status, body) = http(server.addr, "POST", path, &[], &update(&Doc::new(), "refused"));
    assert_eq!(status, 503, "{body}");
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    assert_eq!(json(&body)["status"], "degraded", "{body}");
    assert!(json(&body)["storage_error"].as_str().is_some_and(|r| !r.is_empty()), "{body}");

    drop(guard); // writable again
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.get("/health").0 != 200 {
        assert!(Instant::now() < deadline, "never recovered: {:?}", server.get("/health"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http(server.addr, "POST", path, &[], &update(&Doc::new(), "after")).0, 204);
    let text = read_text(&server, "d");
    assert!(text.contains("acked ") && text.contains("after") && !text.contains("refused"), "{text}");
}
