//! Who may open what: connection tokens, checked at the edge before any engine sees a request.
//!
//! - [`token`]: the two token formats, minting and verification (docs/auth.md).
//! - [`grant`]: what a verified token allows: which resource of which engine, until when, and
//!   whether it may write. Deny by default: a token that names any resource opens only those.
//! - [`carrier`]: where a request carries its token (header, query, subprotocol).

mod carrier;
mod grant;
mod jazz;
mod token;

pub use carrier::{percent_decode, token_from_request, BEARER_PROTOCOL_PREFIX};
pub use grant::{Grant, Resource};
pub use jazz::{jazz_token, verify_jazz};
pub use token::{Auth, AuthError, Claims};
