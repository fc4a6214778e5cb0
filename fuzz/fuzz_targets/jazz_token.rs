//! `Authorization: Jazz <token>` as any HTTP caller may send it to the agent API or the LLM
//! proxy: parsing, the freshness check at several clocks, and verification against a real
//! account's header (the account the token names, and another). The fuzzer cannot sign for that
//! account, and no seed is signed by it, so nothing may ever verify.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use moai_cojson::{AgentIdentity, JazzToken};
use serde_json::Value;

fn account() -> &'static (String, Value) {
    static ACCOUNT: OnceLock<(String, Value)> = OnceLock::new();
    ACCOUNT.get_or_init(|| {
        let identity = AgentIdentity::from_secret_seed(&[7u8; 32]);
        (identity.account_id().to_owned(), identity.account_header())
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(token) = JazzToken::parse(&text) else { return };
    for now in [0, 1_800_000_000_000, u64::MAX] {
        let _ = token.check_fresh(now);
    }
    let (id, header) = account();
    if token.verify(header).is_ok() {
        panic!("a token not signed by {id} verified: {text:?}");
    }
    // The header of another account (or of no account at all) never verifies it either.
    let other = AgentIdentity::from_secret_seed(&[8u8; 32]).account_header();
    assert!(token.verify(&other).is_err());
    assert!(token.verify(&Value::Null).is_err());
});
