//! One webhook request: the JSON body, its signature, and what the answer means.
//!
//! The signature lets the receiver check the request came from this moai and is fresh:
//! `X-Moai-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` with the timestamp
//! (Unix seconds) in `X-Moai-Timestamp`; a receiver recomputes it over the raw body and rejects
//! old timestamps (docs/webhooks.md has a verifier).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::pending::Due;

/// The request body of one delivery.
pub(crate) fn body(due: &Due, instance: &str, now_unix: u64) -> String {
    serde_json::json!({
        "event": if due.created { "created" } else { "changed" },
        "kind": due.key.kind.as_str(),
        "id": due.key.id,
        "changes": due.changes,
        "attempt": due.attempt,
        "sent_at": now_unix,
        "instance": instance,
    })
    .to_string()
}

/// `sha256=<hex>` over `"<timestamp>.<body>"`.
pub(crate) fn signature(secret: &[u8], timestamp: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What to do after an answer (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered,
    /// The receiver refused it for good (a 4xx other than 408 and 429): retrying would not help.
    Rejected(u16),
    /// Try again later: no answer, a timeout, 408, 429 or 5xx.
    Retry,
}

pub(crate) fn outcome(status: Option<u16>) -> Outcome {
    match status {
        Some(s) if (200..300).contains(&s) => Outcome::Delivered,
        Some(s @ 400..=499) if s != 408 && s != 429 => Outcome::Rejected(s),
        _ => Outcome::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_documented_recipe() {
        // HMAC-SHA256("secret", "1700000000.{}"), computed independently with Python's hmac.
        assert_eq!(
            signature(b"secret", 1_700_000_000, "{}"),
            "sha256=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[test]
    fn answers_map_to_outcomes() {
        assert_eq!(outcome(Some(204)), Outcome::Delivered);
        assert_eq!(outcome(Some(404)), Outcome::Rejected(404));
        assert_eq!(outcome(Some(429)), Outcome::Retry);
        assert_eq!(outcome(Some(408)), Outcome::Retry);
        assert_eq!(outcome(Some(503)), Outcome::Retry);
        assert_eq!(outcome(None), Outcome::Retry);
    }
}
