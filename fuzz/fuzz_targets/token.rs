//! Connection tokens as a client presents them: both formats, against every resource kind.
//! Nothing but a token minted with the secret may ever verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_server::auth::{percent_decode, Auth, Resource};

fuzz_target!(|data: &[u8]| {
    let auth = Auth::with_secret("fuzz-secret");
    let token = String::from_utf8_lossy(data);
    for resource in [Resource::YjsDoc("doc"), Resource::Cojson, Resource::ChangeFeed] {
        if auth.check(Some(&token), resource, 0).is_ok() {
            panic!("an unminted token verified: {token:?}");
        }
    }
    let _ = percent_decode(&token);
});
