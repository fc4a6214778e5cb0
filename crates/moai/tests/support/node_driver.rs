//! Remote control for real npm clients hosted by a Node driver in `interop/`:
//! `yjs-driver.mjs` (yjs + y-websocket, protocol in interop/README.md), `hocuspocus-driver.mjs`
//! (@hocuspocus/provider 4 and 3, same README) or `cojson-driver.mjs` (cojson +
//! cojson-transport-ws, protocol in interop/COJSON.md). One driver process hosts many
//! named clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

type Replies = Arc<(Mutex<HashMap<u64, Value>>, Condvar)>;

pub struct NodeDriver {
    child: Child,
    stdin: ChildStdin,
    replies: Replies,
    next_id: u64,
}

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop")
}

impl NodeDriver {
    /// Real yjs + y-websocket clients.
    pub fn yjs() -> Self {
        Self::start("yjs-driver.mjs")
    }

    /// Real cojson clients.
    pub fn cojson() -> Self {
        Self::start("cojson-driver.mjs")
    }

    /// Real `@hocuspocus/provider` clients, 4.x and 3.x (interop/README.md).
    pub fn hocuspocus() -> Self {
        assert!(
            interop_dir().join("node_modules/@hocuspocus/provider").exists()
                && interop_dir().join("node_modules/hocuspocus-provider-v3").exists(),
            "npm packages missing: run ./scripts/test (or `npm ci` in interop/)"
        );
        Self::start("hocuspocus-driver.mjs")
    }

    fn start(script: &str) -> Self {
        let dir = interop_dir();
        assert!(
            dir.join("node_modules/y-websocket").exists() && dir.join("node_modules/cojson").exists(),
            "npm packages missing: run ./scripts/test (or `npm ci` in {})",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(script)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node must be installed to run interop tests");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let replies: Replies = Arc::default();
        let sink = replies.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    let (lock, cv) = &*sink;
                    lock.lock().unwrap().insert(id, v);
                    cv.notify_all();
                }
            }
        });
        Self { child, stdin, replies, next_id: 1 }
    }

    /// Sends a command without waiting; returns its id for [`NodeDriver::reply`].
    pub fn send(&mut self, cmd: &str, mut args: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        args["id"] = json!(id);
        args["cmd"] = json!(cmd);
        writeln!(self.stdin, "{args}").expect("driver stdin");
        self.stdin.flush().unwrap();
        id
    }

    /// Waits for the reply to `id` (the driver enforces each command's own timeout; this bound
    /// only catches a dead driver).
    pub fn reply(&self, id: u64) -> Value {
        let (lock, cv) = &*self.replies;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut map = lock.lock().unwrap();
        loop {
            if let Some(v) = map.remove(&id) {
                return v;
            }
            let left = deadline.checked_duration_since(Instant::now()).expect("node driver did not answer");
            map = cv.wait_timeout(map, left).unwrap().0;
        }
    }

    /// Sends a command and returns its reply, which must be ok.
    pub fn call(&mut self, cmd: &str, args: Value) -> Value {
        let id = self.send(cmd, args.clone());
        let v = self.reply(id);
        assert_eq!(v["ok"], true, "{cmd} {args} failed: {v}");
        v
    }

    /// Like `call`, but returns the reply whether ok or not.
    pub fn try_call(&mut self, cmd: &str, args: Value) -> Value {
        let id = self.send(cmd, args);
        self.reply(id)
    }

    pub fn connect(&mut self, name: &str, base_url: &str, room: &str, extra: Value) -> Value {
        let mut args = json!({"name": name, "url": base_url, "room": room});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                args[k] = v;
            }
        }
        self.call("connect", args)
    }

    pub fn text(&mut self, name: &str) -> String {
        self.call("getText", json!({"name": name}))["text"].as_str().unwrap().to_owned()
    }
}

impl Drop for NodeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
