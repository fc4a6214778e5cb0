//! Participant mode, first slice: `moai agent generate`, the PEER_ID/PEER_SECRET check at start,
//! the server's own account created on first start through the same verified path as client
//! content (a real cojson client loads it and reads the profile name), loaded again on later
//! starts, and `GET /profile`.

mod support;

use std::process::Command;

use serde_json::json;
use support::node_driver::NodeDriver;
use support::{json, Server, BIN};

fn generate() -> (String, String) {
    let out = Command::new(BIN).args(["agent", "generate"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let value = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{key} in {text}")).to_owned()
    };
    (value("PEER_ID"), value("PEER_SECRET"))
}

#[test]
fn agent_generate_makes_an_identity_and_writes_it_into_an_env_file_without_printing_the_secret() {
    let (id, secret) = generate();
    assert!(id.starts_with("co_z"), "{id}");
    assert!(secret.starts_with("sealerSecret_z") && secret.contains("/signerSecret_z"), "a cojson agent secret");
    let (id2, _) = generate();
    assert_ne!(id, id2, "fresh randomness each time");

    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join(".env");
    std::fs::write(&env, "KEEP=1\nPEER_ID=co_zold\nexport PEER_SECRET=old\nOTHER=2\n").unwrap();
    let out = Command::new(BIN).args(["agent", "generate", "--write-env"]).arg(&env).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains("Secret_z"), "the secret is never printed with --write-env: {stdout}");
    let written = std::fs::read_to_string(&env).unwrap();
    assert!(written.contains("KEEP=1\n") && written.contains("OTHER=2\n"));
    assert!(!written.contains("co_zold") && !written.contains("=old"));
    assert_eq!(written.matches("PEER_ID=").count(), 1);
    assert_eq!(written.matches("PEER_SECRET=").count(), 1);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&env).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_peer_id_that_is_not_the_secrets_account_refuses_the_start() {
    let (id, _) = generate();
    let (_, secret) = generate();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--port", "0", "--db-path"])
        .arg(dir.path().join("db"))
        .env("PEER_ID", &id)
        .env("PEER_SECRET", &secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PEER_ID"), "{stderr}");
    assert!(!stderr.contains(&secret) && !stderr.contains("Secret_z"), "the secret is never echoed: {stderr}");
}

#[test]
fn the_server_creates_its_account_once_and_a_real_cojson_client_reads_its_profile() {
    let (id, secret) = generate();
    let keep = tempfile::tempdir().unwrap();
    let db = keep.path().join("moai.db");
    let start = || {
        let s = Server::start_with_env(
            tempfile::tempdir().unwrap(),
            &db,
            &["--peer-name", "moai test agent"],
            &[("PEER_ID", id.as_str()), ("PEER_SECRET", secret.as_str())],
        );
        s.wait_ready();
        s
    };
    let server = start();
    let profile = json(&server.get("/profile").1);
    assert_eq!(profile["accountId"], id.as_str(), "{profile}");
    assert_eq!(profile["profileName"], "moai test agent", "{profile}");
    let profile_id = profile["profileId"].as_str().unwrap().to_owned();

    // A real cojson client loads the server's account and reads its profile through moai.
    let mut c = NodeDriver::cojson();
    c.call("createAccount", json!({"name": "reader", "url": server.ws_url("/sync")}));
    let account = c.call("load", json!({"name": "reader", "coId": id}));
    assert_eq!(account["available"], true, "{account}");
    let map = c.call("getMap", json!({"name": "reader", "coId": profile_id}));
    assert_eq!(map["map"]["name"], "moai test agent", "{map}");
    drop(c);

    // Restarted: the account is loaded, not created again.
    drop(server);
    let server = start();
    let again = json(&server.get("/profile").1);
    assert_eq!(again["profileId"], profile_id.as_str(), "{again}");
    assert_ne!(again["sessionId"], profile["sessionId"], "a fresh session per start");
}

#[test]
fn without_peer_secret_there_is_no_profile() {
    let server = Server::start(&[]);
    server.wait_ready();
    let (status, body) = server.get("/profile");
    assert_eq!(status, 404);
    assert!(body.contains("PEER_SECRET"), "{body}");
}
