//! A real S3-compatible server per test: moto's S3 (`moto[server]` from PyPI, installed by
//! scripts/test), started on a free 127.0.0.1 port and stopped when dropped.
//!
//! moto answers conditional PUTs as AWS does (`If-None-Match: *` and `If-Match: <ETag>`: 412 when
//! they fail, 404 for `If-Match` on a missing key). Its server is threaded and checks a
//! precondition and stores the object in two steps, which AWS does atomically; so the server runs
//! moto's own WSGI application (what `moto_server` runs) with one request at a time, which makes
//! each conditional PUT atomic as on AWS. Without that, two racing PUTs could both pass the
//! check, and a race test would fail for the emulator's sake.
//!
//! Python: `$MOAI_TEST_PYTHON`, else `python3`, with `moto[server]` importable.
//!
//! `pause`/`resume` (SIGSTOP/SIGCONT) turn it into a server that accepts connections and never
//! answers, keeping its objects; `kill` makes it refuse connections (its objects are gone).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The server script: moto's application behind a lock, on a port the OS picks (printed first).
const SERVER: &str = r#"
import sys, threading
from werkzeug.serving import make_server, WSGIRequestHandler
from moto.server import DomainDispatcherApplication, create_backend_app

class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass

app = DomainDispatcherApplication(create_backend_app)
lock = threading.Lock()

def one_at_a_time(environ, start_response):
    with lock:
        return list(app(environ, start_response))

server = make_server("127.0.0.1", 0, one_at_a_time, threaded=True, request_handler=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"#;

/// Any key pair works with moto; these only make requests signed, as real S3 requires.
pub const ACCESS_KEY_ID: &str = "moai-test";
pub const SECRET_ACCESS_KEY: &str = "moai-test-secret";
pub const REGION: &str = "us-east-1";

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let python = std::env::var("MOAI_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(&python)
            .args(["-c", SERVER])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} for the moto S3 server ({e}); scripts/test installs it"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "the moto S3 server did not start (is `moto[server]` installed for {python}? \
                 pip install 'moto[server]', or run scripts/test); it printed {line:?}"
            )
        });
        Moto { child, port }
    }

    /// `http://127.0.0.1:PORT`, the endpoint to give moai.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto takes an unsigned request).
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), &[], b"");
        assert_eq!(status, 200, "create bucket {bucket}: {body}");
    }

    /// One plain HTTP request to the server: status and body.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
    }

    /// The server stops answering (connections are still accepted) and keeps its objects.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// The server is gone: connections are refused. Its objects are lost.
    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SIGKILL ends a stopped process too.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success(), "kill -s {sig}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}
