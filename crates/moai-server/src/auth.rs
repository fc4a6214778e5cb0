//! Connection tokens (seed 004), checked at the edge before any engine sees a connection.
//!
//! With `SYNC_SHARED_SECRET` unset the server runs open (and says so in the log and /health).
//! With it set, every connection presents one of two token forms:
//!
//! - **Plain** `userId:signature`, signature = lowercase hex HMAC-SHA256(key = secret,
//!   message = userId). What the original service's application servers mint. Never expires,
//!   valid for every document. `userId` is everything before the last `:`.
//! - **Scoped** `mt1.<payload>.<signature>`: payload = base64url (no padding) of a JSON object
//!   `{"sub": userId, "exp": unix-seconds?, "docs": [docId or "prefix*", …]?}`, signature =
//!   lowercase hex HMAC-SHA256(key = secret, message = "mt1." + payload). `exp` bounds its
//!   life; `docs` limits which Yjs documents it opens (an entry ending in `*` is a prefix);
//!   `tables` (`{"schema.table": "predicate" | null, …}`) limits what the change feed serves.
//!   Minted by `moai token USER [--doc D] [--table T] [--ttl 1h]`.
//!
//! Signatures are compared in constant time (HMAC's own verify). A missing, malformed or
//! forged token is "unauthorized" (WebSocket close 4401, HTTP 401); a valid token that has
//! expired or does not cover the document is "forbidden" (4403, HTTP 403). y-websocket ≥ 3.1
//! stops reconnecting on 4400–4499, which is why WebSockets are upgraded and then closed rather
//! than refused with an HTTP status (browsers would retry that forever).

use std::collections::BTreeMap;

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

const SCOPED_PREFIX: &str = "mt1.";
/// Subprotocol prefix that carries a token from browsers, which cannot set headers on a
/// WebSocket: `Sec-WebSocket-Protocol: yjs, bearer.<base64url(token)>`.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token does not grant access to this document")]
    OutOfScope,
}

impl AuthError {
    pub fn close_code(&self) -> u16 {
        match self {
            AuthError::Expired | AuthError::OutOfScope => crate::ws::close::FORBIDDEN,
            _ => crate::ws::close::UNAUTHORIZED,
        }
    }

    pub fn http_status(&self) -> axum::http::StatusCode {
        match self {
            AuthError::Expired | AuthError::OutOfScope => axum::http::StatusCode::FORBIDDEN,
            _ => axum::http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// Who a verified token speaks for, and what it may open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docs: Option<Vec<String>>,
    /// Change feed: the tables (`schema.table`) the token opens, each with an optional row
    /// predicate ANDed into every shape on it (`moai_pgsync::Access`). Absent: all tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<BTreeMap<String, Option<String>>>,
}

impl Claims {
    fn covers(&self, doc: &str) -> bool {
        match &self.docs {
            None => true,
            Some(docs) => docs.iter().any(|d| match d.strip_suffix('*') {
                Some(prefix) => doc.starts_with(prefix),
                None => d == doc,
            }),
        }
    }
}

#[derive(Clone, Default)]
pub struct Auth {
    secret: Option<Vec<u8>>,
}

impl Auth {
    /// No secret: every connection is accepted.
    pub fn open() -> Self {
        Self { secret: None }
    }

    pub fn with_secret(secret: impl AsRef<[u8]>) -> Self {
        Self { secret: Some(secret.as_ref().to_vec()) }
    }

    pub fn is_enabled(&self) -> bool {
        self.secret.is_some()
    }

    fn mac(&self, message: &[u8]) -> Option<HmacSha256> {
        let secret = self.secret.as_ref()?;
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mut mac = HmacSha256::new_from_slice(secret).ok()?;
        mac.update(message);
        Some(mac)
    }

    /// Mints a token. Plain form when neither expiry nor scope is given. None without a secret.
    pub fn mint(&self, claims: &Claims) -> Option<String> {
        if claims.exp.is_none() && claims.docs.is_none() && claims.tables.is_none() {
            let sig = self.mac(claims.sub.as_bytes())?.finalize().into_bytes();
            return Some(format!("{}:{}", claims.sub, hex::encode(sig)));
        }
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
        let signed = format!("{SCOPED_PREFIX}{payload}");
        let sig = self.mac(signed.as_bytes())?.finalize().into_bytes();
        Some(format!("{signed}.{}", hex::encode(sig)))
    }

    /// Checks `token` for access to `resource` (a Yjs document id, or None for endpoints
    /// without documents) at `now` (unix seconds). Open servers accept everything.
    pub fn check(&self, token: Option<&str>, resource: Option<&str>, now: u64) -> Result<Option<Claims>, AuthError> {
        if self.secret.is_none() {
            return Ok(None);
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let claims = self.verify(token)?;
        if claims.exp.is_some_and(|exp| now >= exp) {
            return Err(AuthError::Expired);
        }
        if let Some(doc) = resource {
            if !claims.covers(doc) {
                return Err(AuthError::OutOfScope);
            }
        }
        Ok(Some(claims))
    }

    /// [`Auth::check`] at the current time.
    pub fn check_now(&self, token: Option<&str>, resource: Option<&str>) -> Result<Option<Claims>, AuthError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.check(token, resource, now)
    }

    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let (signed, sig_hex) = if let Some(rest) = token.strip_prefix(SCOPED_PREFIX) {
            let (payload, sig) = rest.rsplit_once('.').ok_or(AuthError::Malformed)?;
            (&token[..SCOPED_PREFIX.len() + payload.len()], sig)
        } else {
            token.rsplit_once(':').ok_or(AuthError::Malformed)?
        };
        let sig = hex::decode(sig_hex).map_err(|_| AuthError::Malformed)?;
        let mac = self.mac(signed.as_bytes()).ok_or(AuthError::BadSignature)?;
        mac.verify_slice(&sig).map_err(|_| AuthError::BadSignature)?; // constant time
        if let Some(payload) = signed.strip_prefix(SCOPED_PREFIX) {
            let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| AuthError::Malformed)?;
            serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)
        } else {
            Ok(Claims { sub: signed.to_owned(), ..Claims::default() })
        }
    }
}

/// Finds the token of a request: `Authorization: Bearer`, then `?token=`, then a
/// `bearer.<base64url(token)>` subprotocol.
pub fn token_from_request(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(token) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) {
            return Some(token.trim().to_owned());
        }
    }
    if let Some(query) = query {
        for pair in query.split('&') {
            if let Some(raw) = pair.strip_prefix("token=") {
                return Some(percent_decode(raw));
            }
        }
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().strip_prefix(BEARER_PROTOCOL_PREFIX))
        .find_map(|b64| URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// Decodes `%XX` escapes and `+` (form encoding) in a query value. Invalid escapes are kept
/// as written.
pub fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str) -> Claims {
        Claims { sub: sub.into(), ..Claims::default() }
    }

    #[test]
    fn plain_tokens_match_the_seed_format() {
        let auth = Auth::with_secret("s3cret");
        let token = auth.mint(&claims("alice")).unwrap();
        // HMAC-SHA256(key="s3cret", message="alice"), computed independently with
        // `printf alice | openssl dgst -sha256 -hmac s3cret`.
        assert_eq!(token, "alice:765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2a1ff6d3e146");
        assert_eq!(auth.check(Some(&token), Some("any-doc"), 0).unwrap().unwrap().sub, "alice");
        assert_eq!(auth.check(Some("alice:00ff"), None, 0), Err(AuthError::BadSignature));
        assert_eq!(auth.check(Some("alice"), None, 0), Err(AuthError::Malformed));
        assert_eq!(auth.check(None, None, 0), Err(AuthError::Missing));
        // A user id may itself contain ':'.
        let t = auth.mint(&claims("org:alice")).unwrap();
        assert_eq!(auth.check(Some(&t), None, 0).unwrap().unwrap().sub, "org:alice");
    }

    #[test]
    fn scoped_tokens_expire_and_are_limited_to_their_documents() {
        let auth = Auth::with_secret("k");
        let t = auth
            .mint(&Claims { sub: "bob".into(), exp: Some(100), docs: Some(vec!["notes".into(), "team-*".into()]), ..Claims::default() })
            .unwrap();
        assert!(t.starts_with("mt1."));
        assert!(auth.check(Some(&t), Some("notes"), 99).is_ok());
        assert!(auth.check(Some(&t), Some("team-42"), 99).is_ok());
        assert_eq!(auth.check(Some(&t), Some("other"), 99), Err(AuthError::OutOfScope));
        assert_eq!(auth.check(Some(&t), Some("notes"), 100), Err(AuthError::Expired));
        // Tampering with the payload breaks the signature.
        let (head, sig) = t.rsplit_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"bob","exp":999999}"#);
        let forged = format!("mt1.{forged_payload}.{sig}");
        assert_eq!(auth.check(Some(&forged), Some("x"), 0), Err(AuthError::BadSignature));
        assert!(head.starts_with("mt1."));
        // Another server's secret does not verify.
        assert_eq!(Auth::with_secret("other").check(Some(&t), Some("notes"), 0), Err(AuthError::BadSignature));
    }

    #[test]
    fn table_scopes_round_trip_and_cannot_be_widened() {
        let auth = Auth::with_secret("k");
        let tables = BTreeMap::from([("public.todos".to_string(), Some("owner_id = 'u1'".to_string())), ("public.tags".to_string(), None)]);
        let t = auth.mint(&Claims { sub: "u1".into(), tables: Some(tables.clone()), ..Claims::default() }).unwrap();
        assert!(t.starts_with("mt1."), "a table scope needs the scoped form");
        assert_eq!(auth.check(Some(&t), None, 0).unwrap().unwrap().tables, Some(tables));
        // Dropping the predicate from the payload breaks the signature.
        let (_, sig) = t.rsplit_once('.').unwrap();
        let widened = URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","tables":{"public.todos":null}}"#);
        assert_eq!(auth.check(Some(&format!("mt1.{widened}.{sig}")), None, 0), Err(AuthError::BadSignature));
    }

    #[test]
    fn open_servers_accept_anything() {
        assert_eq!(Auth::open().check(None, Some("d"), 0), Ok(None));
    }

    #[test]
    fn tokens_are_found_in_header_query_and_subprotocol() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer a:1".parse().unwrap());
        assert_eq!(token_from_request(&h, None).as_deref(), Some("a:1"));
        let h = HeaderMap::new();
        assert_eq!(token_from_request(&h, Some("x=1&token=a%3A1")).as_deref(), Some("a:1"));
        let mut h = HeaderMap::new();
        let b64 = URL_SAFE_NO_PAD.encode("a:1");
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, format!("yjs, bearer.{b64}").parse().unwrap());
        assert_eq!(token_from_request(&h, None).as_deref(), Some("a:1"));
        assert_eq!(token_from_request(&HeaderMap::new(), Some("tokenx=1")), None);
    }

    #[test]
    fn percent_decoding_never_panics_on_odd_input() {
        assert_eq!(percent_decode("a%3Ab+c"), "a:b c");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz%e2%82%ac"), "%zz€");
    }
}
