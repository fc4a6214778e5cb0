//! Webhooks against a receiver run by the test: a new document is reported once as `created`
//! for a burst of edits, then `changed`; every request is signed; a failing receiver is retried
//! with backoff; a receiver that never answers does not slow edits; CoValues are reported too.

mod support;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use moai_yjs::yrs::Doc;
use serde_json::{json, Value};
use sha2::Sha256;
use support::node_driver::NodeDriver;
use support::yjs::edit;
use support::{http, Server, BIN};

const SECRET: &str = "webhook-test-secret";

struct Request {
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> &str {
        self.headers.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook receiver: answers each request with the next scripted status (204 once the script
/// is used up; `None` = never answer), and records what it got.
struct Receiver {
    port: u16,
    got: Arc<(Mutex<Vec<Request>>, Condvar)>,
}

impl Receiver {
    fn start(script: Vec<Option<u16>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got: Arc<(Mutex<Vec<Request>>, Condvar)> = Arc::default();
        let sink = got.clone();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (sink, script) = (sink.clone(), script.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut headers = Vec::new();
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.trim_end().split_once(':') {
                            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                        }
                    }
                    let len: usize =
                        headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let status = script.lock().unwrap().pop_front().unwrap_or(Some(204));
                    let (lock, cv) = &*sink;
                    lock.lock().unwrap().push(Request { headers, body: String::from_utf8(body).unwrap() });
                    cv.notify_all();
                    match status {
                        Some(code) => {
                            let _ =
                                write!(stream, "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                        }
                        // Never answers: holds the connection until the test ends.
                        None => std::thread::sleep(Duration::from_secs(60)),
                    }
                });
            }
        });
        Receiver { port, got }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Waits until `n` requests have arrived; returns the `n`th.
    fn nth(&self, n: usize) -> Request {
        let (lock, cv) = &*self.got;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = lock.lock().unwrap();
        while got.len() < n {
            let left = deadline.checked_duration_since(Instant::now()).expect("webhook request did not arrive");
            got = cv.wait_timeout(got, left).unwrap().0;
        }
        let r = &got[n - 1];
        Request { headers: r.headers.clone(), body: r.body.clone() }
    }

    /// Waits for the first request whose body matches.
    fn find(&self, pred: impl Fn(&Value) -> bool) -> Request {
        let mut n = 1;
        loop {
            let r = self.nth(n);
            if pred(&r.json()) {
                return r;
            }
            n += 1;
        }
    }
}

fn server(receiver: &Receiver, extra: &[&str]) -> Server {
    let url = receiver.url();
    let mut args = vec!["--webhook-url", &url, "--webhook-secret", SECRET, "--webhook-debounce", "300ms"];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    s.wait_ready();
    s
}

fn assert_signed(r: &Request) {
    let timestamp = r.header("x-moai-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{}", r.body).as_bytes());
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.header("x-moai-signature"), expected, "signature over the timestamp and the raw body");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let ts: u64 = timestamp.parse().unwrap();
    assert!(now.abs_diff(ts) < 60, "a fresh timestamp");
}

fn post(server: &Server, doc: &str, update: &[u8]) -> u16 {
    http(server.addr, "POST", &format!("/api/v1/docs/{doc}/update"), &[], update).0
}

#[test]
fn a_burst_that_creates_a_document_is_one_signed_created_event_then_changes_follow() {
    let receiver = Receiver::start(Vec::new());
    let server = server(&receiver, &[]);
    let writer = Doc::new();
    for i in 0..5 {
        assert_eq!(post(&server, "notes", &edit(&writer, &format!("{i}"))), 204);
    }
    let first = receiver.nth(1);
    assert_signed(&first);
    let body = first.json();
    assert_eq!(
        (&body["event"], &body["kind"], &body["id"], &body["changes"]),
        (&json!("created"), &json!("yjs"), &json!("notes"), &json!(5)),
        "{body}"
    );
    assert_eq!(first.header("x-moai-event"), "created");
    assert_eq!(post(&server, "notes", &edit(&writer, "more")), 204);
    let second = receiver.nth(2);
    assert_signed(&second);
    assert_eq!((second.json()["event"].clone(), second.json()["changes"].clone()), (json!("changed"), json!(1)));
}

#[test]
fn a_failing_receiver_is_retried_with_backoff_and_never_slows_edits() {
    let receiver = Receiver::start(vec![Some(500), Some(503)]);
    let server = server(&receiver, &[]);
    let writer = Doc::new();
    assert_eq!(post(&server, "doc", &edit(&writer, "x")), 204);
    let attempts: Vec<Value> = (1..=3).map(|n| receiver.nth(n).json()).collect();
    assert_eq!(attempts.iter().map(|b| b["attempt"].clone()).collect::<Vec<_>>(), vec![json!(1), json!(2), json!(3)]);
    assert!(attempts.iter().all(|b| b["id"] == "doc" && b["event"] == "created"));
    // The third answer (204) reaches the server just after the receiver recorded the request.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, metrics) = server.get("/metrics");
        if metrics.contains("moai_webhooks_total{outcome=\"delivered\"} 1") || Instant::now() > deadline {
            break metrics;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(metrics.contains("moai_webhooks_total{outcome=\"delivered\"} 1"), "{metrics}");
    assert!(metrics.contains("moai_webhooks_total{outcome=\"retried\"} 2"), "{metrics}");
}

#[test]
fn a_receiver_that_never_answers_does_not_slow_edits() {
    let receiver = Receiver::start(vec![None; 8]);
    let server = server(&receiver, &[]);
    let writer = Doc::new();
    assert_eq!(post(&server, "a", &edit(&writer, "x")), 204);
    receiver.nth(1); // the webhook is now hanging
    let started = Instant::now();
    for i in 0..50 {
        assert_eq!(post(&server, &format!("doc-{}", i % 5), &edit(&Doc::new(), "y")), 204);
    }
    // Edits answer at their usual pace (the bound is generous; the point is "not 10 s each").
    assert!(started.elapsed() < Duration::from_secs(10), "edits waited for the webhook");
}

#[test]
fn covalues_a_cojson_client_creates_are_reported() {
    let receiver = Receiver::start(Vec::new());
    let server = server(&receiver, &[]);
    let mut c = NodeDriver::cojson();
    c.call("createAccount", json!({"name": "a", "url": server.ws_url("/sync")}));
    let group = c.call("createGroup", json!({"name": "a"}))["groupId"].as_str().unwrap().to_owned();
    let map = c.call("createMap", json!({"name": "a", "groupId": group, "init": {"k": 1}}))["mapId"]
        .as_str()
        .unwrap()
        .to_owned();
    c.call("waitSynced", json!({"name": "a"}));
    let r = receiver.find(|b| b["id"] == map.as_str());
    assert_signed(&r);
    assert_eq!((r.json()["event"].clone(), r.json()["kind"].clone()), (json!("created"), json!("cojson")));
}

#[test]
fn webhooks_without_a_secret_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--port", "0", "--webhook-url", "http://127.0.0.1:9/hook", "--db-path"])
        .arg(dir.path().join("db"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--webhook-secret"));
    let _ = std::io::stdout().flush();
    let _ = std::io::empty().read(&mut []);
}
