//! Starts the real `moai` binary for integration tests and talks to it over real sockets.
#![allow(dead_code)]

#[path = "../../../moai-storage/tests/support/moto.rs"]
pub mod moto;
pub mod node_driver;
#[path = "../../../moai-pgsync/tests/support/pg.rs"]
pub mod pg;
#[path = "../../../moai-cluster/tests/support/redis.rs"]
pub mod redis;
pub mod test_storage;
pub mod ws;
pub mod yjs;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_moai");

/// A running moai process with its log lines captured.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    logs: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Server {
    /// Starts moai on a free port with a fresh database in a temp dir, plus `extra` args. The
    /// database is SQLite, or PostgreSQL (and S3) under `MOAI_TEST_STORAGE=postgres` or
    /// `postgres+s3` (see [`test_storage`]).
    pub fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("moai.db");
        Self::start_in(dir, &db, extra)
    }

    /// Starts moai with `--db-path db`. A test that restarts its server passes the same `db`
    /// again, and finds the same data: on PostgreSQL `db` stands for a database of its own (see
    /// [`test_storage`]), unless `extra` names a `--storage` itself.
    pub fn start_in(dir: tempfile::TempDir, db: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(dir, db, extra, &[])
    }

    /// [`Server::start_in`] with extra environment variables.
    pub fn start_with_env(dir: tempfile::TempDir, db: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        // A test that restarts on the same port passes its own --port.
        let port: &[&str] = if extra.contains(&"--port") { &[] } else { &["--port", "0"] };
        let storage = if extra.contains(&"--storage") { Vec::new() } else { test_storage::storage_args(db) };
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(port)
            .args(["--log-format", "json", "--db-path"])
            .arg(db)
            .args(&storage)
            .args(extra)
            .envs(test_storage::storage_env())
            .env("RUST_LOG", "info")
            // After the default, so a test may raise the log level.
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moai");
        let logs: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lock, cv) = &*sink;
                lock.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        let line = wait_line(&logs, |l| l.contains("moai listening"), Duration::from_secs(20))
            .unwrap_or_else(|| panic!("moai did not start listening: {:?}", logs.0.lock().unwrap()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = v["addr"].as_str().unwrap().parse().unwrap();
        Server { child, addr, dir, logs }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        wait_line(&self.logs, |l| l.contains(needle), timeout)
    }

    /// Waits for a log line for which `pred` holds.
    pub fn wait_log_where(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        wait_line(&self.logs, pred, timeout)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.0.lock().unwrap().clone()
    }

    /// Polls /health until it says ready (or panics after 20 s).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = try_http(self.addr, "GET", "/health", &[], b"") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("moai never became ready: {:?}", self.logs());
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.addr, "GET", path, &[], b"")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("moai.db")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever a test did, the server must never have panicked (a panicking session task
        // would otherwise go unnoticed: tokio contains it and the server keeps running).
        if !std::thread::panicking() {
            if let Some(line) = self.logs().iter().find(|l| l.contains("panicked at")) {
                panic!("moai panicked during this test: {line}");
            }
        }
    }
}

fn wait_line(
    logs: &Arc<(Mutex<Vec<String>>, Condvar)>,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Option<String> {
    let (lock, cv) = &**logs;
    let deadline = Instant::now() + timeout;
    let mut guard = lock.lock().unwrap();
    loop {
        if let Some(l) = guard.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        guard = cv.wait_timeout(guard, left).unwrap().0;
    }
}

/// A minimal HTTP/1.1 client: one request, `Connection: close`, returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    try_http(addr, method, path, headers, body).expect("http request")
}

pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// A port with nothing listening on it.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
