//! Applying one untrusted v1 update to the live document, and learning exactly what it changed.
//!
//! What we persist and broadcast is the *transaction's own diff* (`encode_update_v1` of the
//! transaction that applied the update), not the bytes the client sent:
//! * it costs O(update), never O(document) (docs/protocols/yjs.md §3.4);
//! * an update that only repeats what we have (a reconnecting client's SyncStep2, the JS
//!   client's echo of our broadcast) produces no diff, so nothing is written or sent;
//! * structs yrs parks as *pending* (their dependencies are missing — legitimate Yjs behaviour)
//!   are kept in memory but appear in a diff only in the transaction that finally integrates
//!   them, so the journal holds exactly the integrated state. Pending structs are not in the
//!   journal; they become durable with the next snapshot (yrs' `encode_state_as_update_v1`
//!   merges pending structs into its output) and, until then, their author still has them and
//!   re-sends them when our SyncStep1 on reconnect shows we lack them.

use thiserror::Error;

use crate::plausible::Policy;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, ReadTxn, Transact, Update};

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("update is not a valid Yjs v1 update: {0}")]
    Decode(#[from] yrs::encoding::read::Error),
    #[error("update could not be integrated: {0}")]
    Integrate(#[from] yrs::error::UpdateError),
    #[error("document is locked by another transaction")]
    Busy,
    #[error("update is not a valid Yjs v1 update: {0}")]
    Implausible(#[from] crate::plausible::Implausible),
    /// The update skips changes of a client: it starts at `starts_at` while the document has that
    /// client's changes only up to `have`. yrs would integrate it with a placeholder for the hole
    /// and mishandles later updates that land in such a hole (fuzzing: a use-after-free during
    /// integration), so it is not applied; the sender is asked for what is missing instead.
    #[error("the update skips changes of client {client}: this document has them up to clock {have}, the update starts at {starts_at}")]
    Gap { client: u64, have: u32, starts_at: u32 },
    /// yrs panicked while decoding or integrating, or left pending state it could not read back
    /// (see [`pending_is_plausible`]). The document may be half-changed or hold a time bomb: the
    /// room must not be used any more (reload it from storage).
    #[error("the Yjs library failed on this update: {0}")]
    Poisoned(String),
}

/// Result of applying an update.
#[derive(Debug)]
pub struct Applied {
    /// v1 update of what the transaction integrated; `None` when the document did not change.
    pub diff: Option<Vec<u8>>,
    /// Set when yrs rejected the update part-way. yrs does not roll back, so whatever it had
    /// integrated before the failure is in `diff` and must be persisted like any change to keep
    /// storage equal to memory. A decode failure never changes the document.
    pub error: Option<ApplyError>,
}

/// Runs `f`, turning a panic into its message. yrs has known panics on hostile input; one must
/// cost the document that met it (which is then reloaded), never the process or other documents.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    result.map_err(|payload| panic_message(&*payload))
}

/// The message a panic carried.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

pub(crate) fn apply_v1(doc: &Doc, bytes: &[u8], policy: Policy) -> Applied {
    contain(|| apply_v1_unguarded(doc, bytes, policy))
        .unwrap_or_else(|why| Applied { diff: None, error: Some(ApplyError::Poisoned(why)) })
}

thread_local! {
    /// Set while [`contain`] runs a call on this thread.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a panic happening now on this thread will be contained by the Yjs engine (the
/// binary's panic hook logs those as a warning instead of as a crash).
pub fn panic_is_contained() -> bool {
    CONTAINING.with(|c| c.get())
}

/// Test hook, debug builds only: an update that contains these bytes makes the apply panic inside
/// the guarded work, as yrs did on some hostile inputs (all of those are refused before yrs sees
/// them now, see [`crate::plausible`]), so tests against the real server can still show that a
/// panic costs only its document.
#[cfg(debug_assertions)]
static TEST_PANIC_MARKER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Sets the test hook above (the binary's hidden `--test-yrs-panic-marker`, debug builds only).
#[cfg(debug_assertions)]
pub fn set_test_panic_marker(marker: Vec<u8>) {
    let _ = TEST_PANIC_MARKER.set(marker);
}

#[cfg(debug_assertions)]
fn test_panic_marker_in(bytes: &[u8]) -> bool {
    TEST_PANIC_MARKER.get().is_some_and(|m| !m.is_empty() && bytes.windows(m.len()).any(|w| w == m.as_slice()))
}

#[cfg(test)]
thread_local! {
    /// Unit tests: make the next apply on this thread panic, as yrs does on some inputs.
    pub(crate) static INJECT_PANIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn apply_v1_unguarded(doc: &Doc, bytes: &[u8], policy: Policy) -> Applied {
    #[cfg(test)]
    if INJECT_PANIC.with(|p| p.replace(false)) {
        panic!("injected yrs panic");
    }
    // Decoding first means garbage is rejected before the document is touched.
    if let Err(e) = crate::plausible::update_v1_with(bytes, policy) {
        return Applied { diff: None, error: Some(e.into()) };
    }
    let update = match Update::decode_v1(bytes) {
        Ok(update) => update,
        Err(e) => return Applied { diff: None, error: Some(e.into()) },
    };
    // try_: a driver holding a read transaction on a cloned handle must not deadlock us.
    let mut txn = match doc.try_transact_mut() {
        Ok(txn) => txn,
        Err(_) => return Applied { diff: None, error: Some(ApplyError::Busy) },
    };
    if let Some(gap) = gap(&txn, &update) {
        return Applied { diff: None, error: Some(gap) };
    }
    // The work runs in its own catch_unwind while `txn` lives out here, so a panic in yrs never
    // unwinds through the transaction: its Drop commits, and on the state that made yrs panic
    // the commit can panic again, which during unwinding aborts the whole process (found by the
    // yjs_frame fuzz target with a 40-byte update).
    let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        #[cfg(debug_assertions)]
        if test_panic_marker_in(bytes) {
            panic!("test hook: the Yjs library panics on this update");
        }
        let error = txn.apply_update(update).err().map(ApplyError::from);
        let error = match pending_is_plausible(&txn, policy) {
            Ok(()) => error,
            Err(why) => Some(ApplyError::Poisoned(why)),
        };
        let changed = !txn.insert_set().is_empty() || !txn.delete_set().is_empty();
        let diff = changed.then(|| txn.encode_update_v1());
        (error, diff)
    }));
    match work {
        Ok((error, diff)) => {
            drop(txn);
            Applied { diff, error }
        }
        Err(payload) => {
            // The commit of the broken transaction may panic too; outside any unwinding that
            // is an ordinary, catchable panic.
            let _ = contain(move || drop(txn));
            Applied { diff: None, error: Some(ApplyError::Poisoned(panic_message(&*payload))) }
        }
    }
}

/// yrs keeps structs it cannot integrate yet as a *pending* update that it encodes itself and
/// decodes again at every full-state encode (the answer to the next joiner's SyncStep1, every
/// compaction). For some hostile inputs the pending update yrs builds claims counts its bytes
/// cannot hold (fuzzing found one that made that later decode reserve ~49 GB), so the bomb
/// would go off later, at someone else's request. It is checked here with the same rules as
/// any incoming update, right after the update that created it; the cost is paid only while
/// something is pending.
fn pending_is_plausible(txn: &yrs::TransactionMut, policy: Policy) -> Result<(), String> {
    let store = txn.store();
    if let Some(pending) = store.pending_update() {
        crate::plausible::update_v1_with(&pending.update.encode_v1(), policy)
            .map_err(|e| format!("yrs built a pending update it could not read back: {e}"))?;
    }
    Ok(())
}

/// The first client whose structs in `update` start beyond what the document has of it. (A
/// y-websocket client never needs that: every SyncStep2 starts at our state vector, and a live
/// update sent before it can be re-sent through it.)
fn gap(txn: &yrs::TransactionMut, update: &Update) -> Option<ApplyError> {
    let local = txn.state_vector();
    update
        .state_vector_lower()
        .iter()
        .find(|(client, lower)| **lower > local.get(client))
        .map(|(client, lower)| ApplyError::Gap { client: client.get(), have: local.get(client), starts_at: *lower })
}

/// True while the document holds structs or deletions waiting for missing dependencies.
pub(crate) fn has_pending(doc: &Doc) -> bool {
    doc.try_transact().map(|txn| txn.has_missing_updates()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_yrs_is_contained_and_reported() {
        let doc = Doc::new();
        INJECT_PANIC.with(|p| p.set(true));
        let applied = apply_v1(&doc, &[0, 0], Policy::default());
        assert!(matches!(applied.error, Some(ApplyError::Poisoned(ref m)) if m == "injected yrs panic"), "{applied:?}");
        // The next update is applied as usual.
        assert!(apply_v1(&doc, &[0, 0], Policy::default()).error.is_none());
    }
}
