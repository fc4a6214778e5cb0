//! The logical replication stream as PostgreSQL's pgoutput plugin sends it (what the
//! replicator decodes from the replication connection): protocol versions 1 and 2, a sequence
//! of messages each prefixed by a one-byte length in this harness.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moai_pgsync::pgoutput::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&version, mut rest)) = data.split_first() else { return };
    let Ok(mut decoder) = Decoder::new(1 + u32::from(version % 4)) else { return };
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let _ = decoder.decode(&tail[..n]);
        rest = &tail[n..];
    }
});
