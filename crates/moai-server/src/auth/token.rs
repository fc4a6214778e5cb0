//! Connection token formats: minting and verification (docs/auth.md says the same for
//! application authors).
//!
//! With `SYNC_SHARED_SECRET` unset the server runs open (and says so in the log and /health).
//! With it set, every connection presents one of two token forms:
//!
//! - **Plain** `userId:signature`, signature = lowercase hex HMAC-SHA256(key = secret,
//!   message = userId). The format of the original Yjs service (docs/protocols/design.md §5.1),
//!   which application servers already mint. Never expires, opens everything. `userId` is
//!   everything before the last `:`.
//! - **Scoped** `mt2.<payload>.<signature>`: payload = base64url (no padding) of the JSON
//!   [`Claims`]; signature = lowercase hex HMAC-SHA256(key = K2, message = "mt2." + payload)
//!   with K2 = HMAC-SHA256(key = "moai-mt2", message = secret).
//!
//! **Why K2.** A plain token is the MAC of whatever user id the application chose, often one a
//! user picked. If scoped tokens were MACed with the secret itself (as `mt1.` tokens were), an
//! application that minted a plain token for a user named `mt1.<payload>` would have handed that
//! user a valid scoped token with claims of their choosing. K2 is the MAC of the secret under a
//! public key, a value no plain token can ever be (every plain signature is keyed by the secret),
//! so the two forms live in separate MAC domains. `mt1.` tokens are refused.
//!
//! Signatures are compared in constant time (HMAC's own verify). A missing, malformed or
//! forged token is "unauthorized" (WebSocket close 4401, HTTP 401); a valid token that has
//! expired or does not cover the resource is "forbidden" (4403, HTTP 403).

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use super::grant::{Grant, Resource};
use crate::ws::close;

type HmacSha256 = Hmac<Sha256>;

const SCOPED_PREFIX: &str = "mt2.";
/// The first scoped format, MACed in the same domain as plain tokens; refused.
const RETIRED_PREFIX: &str = "mt1.";
/// The public key under which the secret is MACed to make the scoped-token key.
const SCOPED_KEY_LABEL: &[u8] = b"moai-mt2";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("mt1 tokens are no longer accepted; mint a new token")]
    Retired,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token does not grant access to this resource")]
    OutOfScope,
    #[error("token is read-only")]
    ReadOnly,
}

impl AuthError {
    pub fn close_code(&self) -> u16 {
        match self {
            AuthError::Expired | AuthError::OutOfScope | AuthError::ReadOnly => close::FORBIDDEN,
            _ => close::UNAUTHORIZED,
        }
    }

    pub fn http_status(&self) -> axum::http::StatusCode {
        match self {
            AuthError::Expired | AuthError::OutOfScope | AuthError::ReadOnly => axum::http::StatusCode::FORBIDDEN,
            _ => axum::http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// Who a verified token speaks for, and what it may open. A token that names any resource
/// (`docs`, `tables`, `cojson` or `llm`) is *scoped*: it opens exactly what it names and nothing of
/// the other engines. A token that names none (a plain token, or a scoped one with only `exp`
/// and `read_only`) opens every resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Yjs: the documents the token opens (`"prefix*"` matches a prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docs: Option<Vec<String>>,
    /// Change feed: the tables (`schema.table`) the token opens, each with an optional row
    /// predicate ANDed into every shape on it (`moai_pgsync::Access`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<BTreeMap<String, Option<String>>>,
    /// CoJSON: the token opens `/sync`. CoJSON's own signatures and group roles decide what a
    /// peer may read and write there; this only admits the connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cojson: bool,
    /// LLM proxy: the token may call it (`/v1/chat/completions`, `/api/v0/llm/chat`,
    /// `/v1/models`); its subject is the account whose limits and usage the calls count against.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub llm: bool,
    /// The session reads and shows presence, but its writes are dropped (docs/auth.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

impl Claims {
    /// Only a subject: what the plain form can carry.
    fn is_plain(&self) -> bool {
        self.exp.is_none()
            && self.docs.is_none()
            && self.tables.is_none()
            && !self.cojson
            && !self.llm
            && !self.read_only
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

    /// HMAC-SHA256 of `message` under `key` (HMAC takes keys of any length).
    fn mac(key: &[u8], message: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts every key length");
        mac.update(message);
        mac
    }

    fn scoped_key(secret: &[u8]) -> Vec<u8> {
        Self::mac(SCOPED_KEY_LABEL, secret).finalize().into_bytes().to_vec()
    }

    /// Mints a token: the plain form when the claims carry only a subject. None without a secret.
    pub fn mint(&self, claims: &Claims) -> Option<String> {
        let secret = self.secret.as_ref()?;
        if claims.is_plain() {
            let sig = Self::mac(secret, claims.sub.as_bytes()).finalize().into_bytes();
            return Some(format!("{}:{}", claims.sub, hex::encode(sig)));
        }
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
        let signed = format!("{SCOPED_PREFIX}{payload}");
        let sig = Self::mac(&Self::scoped_key(secret), signed.as_bytes()).finalize().into_bytes();
        Some(format!("{signed}.{}", hex::encode(sig)))
    }

    /// Checks `token` for `resource` at `now` (unix seconds). Open servers grant everything.
    pub fn check(&self, token: Option<&str>, resource: Resource<'_>, now: u64) -> Result<Grant, AuthError> {
        if self.secret.is_none() {
            return Ok(Grant::open());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let grant = Grant::from_claims(self.verify(token)?);
        if grant.is_expired_at(now) {
            return Err(AuthError::Expired);
        }
        if !grant.allows(resource) {
            return Err(AuthError::OutOfScope);
        }
        Ok(grant)
    }

    /// [`Auth::check`] at the current time.
    pub fn check_now(&self, token: Option<&str>, resource: Resource<'_>) -> Result<Grant, AuthError> {
        self.check(token, resource, super::grant::unix_now())
    }

    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let secret = self.secret.as_deref().ok_or(AuthError::BadSignature)?;
        if token.starts_with(RETIRED_PREFIX) {
            return Err(AuthError::Retired);
        }
        if let Some(rest) = token.strip_prefix(SCOPED_PREFIX) {
            let (payload, sig_hex) = rest.rsplit_once('.').ok_or(AuthError::Malformed)?;
            let sig = hex::decode(sig_hex).map_err(|_| AuthError::Malformed)?;
            let signed = &token[..SCOPED_PREFIX.len() + payload.len()];
            Self::mac(&Self::scoped_key(secret), signed.as_bytes())
                .verify_slice(&sig)
                .map_err(|_| AuthError::BadSignature)?; // constant time
            let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| AuthError::Malformed)?;
            return serde_json::from_slice(&json).map_err(|_| AuthError::Malformed);
        }
        let (user, sig_hex) = token.rsplit_once(':').ok_or(AuthError::Malformed)?;
        let sig = hex::decode(sig_hex).map_err(|_| AuthError::Malformed)?;
        Self::mac(secret, user.as_bytes()).verify_slice(&sig).map_err(|_| AuthError::BadSignature)?;
        Ok(Claims { sub: user.to_owned(), ..Claims::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str) -> Claims {
        Claims { sub: sub.into(), ..Claims::default() }
    }

    const DOC: Resource<'static> = Resource::YjsDoc("any-doc");

    #[test]
    fn plain_tokens_match_the_seed_format() {
        let auth = Auth::with_secret("s3cret");
        let token = auth.mint(&claims("alice")).unwrap();
        // HMAC-SHA256(key="s3cret", message="alice"), computed independently with
        // `printf alice | openssl dgst -sha256 -hmac s3cret`.
        assert_eq!(token, "alice:765542af1f1d587bc60c218dca532a258f56b9c21a427cc819de2a1ff6d3e146");
        assert_eq!(auth.check(Some(&token), DOC, 0).unwrap().subject(), Some("alice"));
        assert_eq!(auth.check(Some("alice:00ff"), DOC, 0), Err(AuthError::BadSignature));
        assert_eq!(auth.check(Some("alice"), DOC, 0), Err(AuthError::Malformed));
        assert_eq!(auth.check(None, DOC, 0), Err(AuthError::Missing));
        // A user id may itself contain ':'.
        let t = auth.mint(&claims("org:alice")).unwrap();
        assert_eq!(auth.check(Some(&t), DOC, 0).unwrap().subject(), Some("org:alice"));
    }

    #[test]
    fn scoped_tokens_match_an_independent_computation() {
        // K2 = HMAC-SHA256(key="moai-mt2", msg="k"); sig = HMAC-SHA256(key=K2, msg="mt2."+payload),
        // computed with openssl:
        //   K2=$(printf k | openssl dgst -sha256 -hmac moai-mt2 -r | cut -d' ' -f1)
        //   printf 'mt2.eyJzdWIiOiJib2IiLCJleHAiOjEwMH0' | openssl dgst -sha256 -mac HMAC -macopt hexkey:$K2
        let auth = Auth::with_secret("k");
        let t = auth.mint(&Claims { sub: "bob".into(), exp: Some(100), ..Claims::default() }).unwrap();
        assert_eq!(
            t,
            "mt2.eyJzdWIiOiJib2IiLCJleHAiOjEwMH0.1ef2b8c7e1a90d1476518862230c645bdab03da1a77839c4ddc112c0e70615e7"
        );
    }

    #[test]
    fn a_plain_token_for_a_crafted_user_id_is_not_a_scoped_token() {
        let auth = Auth::with_secret("k");
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","docs":["*"],"tables":{"public.salaries":null}}"#);
        for prefix in ["mt1.", "mt2."] {
            // The application mints a plain token for a user who chose this name...
            let user = format!("{prefix}{payload}");
            let plain = auth.mint(&claims(&user)).unwrap();
            let sig = plain.rsplit_once(':').unwrap().1;
            // ...whose signature, reattached as a scoped token, must not verify.
            let forged = format!("{user}.{sig}");
            let err = auth.check(Some(&forged), DOC, 0).unwrap_err();
            assert!(matches!(err, AuthError::BadSignature | AuthError::Retired), "{prefix}: {err:?}");
        }
    }

    #[test]
    fn scoped_tokens_expire_and_are_limited_to_their_documents() {
        let auth = Auth::with_secret("k");
        let t = auth
            .mint(&Claims {
                sub: "bob".into(),
                exp: Some(100),
                docs: Some(vec!["notes".into(), "team-*".into()]),
                ..Claims::default()
            })
            .unwrap();
        assert!(t.starts_with("mt2."));
        assert!(auth.check(Some(&t), Resource::YjsDoc("notes"), 99).is_ok());
        assert!(auth.check(Some(&t), Resource::YjsDoc("team-42"), 99).is_ok());
        assert_eq!(auth.check(Some(&t), Resource::YjsDoc("other"), 99), Err(AuthError::OutOfScope));
        assert_eq!(auth.check(Some(&t), Resource::YjsDoc("notes"), 100), Err(AuthError::Expired));
        // Tampering with the payload breaks the signature.
        let (_, sig) = t.rsplit_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"bob","exp":999999}"#);
        let forged = format!("mt2.{forged_payload}.{sig}");
        assert_eq!(auth.check(Some(&forged), Resource::YjsDoc("x"), 0), Err(AuthError::BadSignature));
        // Another server's secret does not verify.
        assert_eq!(
            Auth::with_secret("other").check(Some(&t), Resource::YjsDoc("notes"), 0),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn mt1_tokens_are_refused() {
        let auth = Auth::with_secret("k");
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"bob"}"#);
        let signed = format!("mt1.{payload}");
        let sig = hex::encode(Auth::mac(b"k", signed.as_bytes()).finalize().into_bytes());
        assert_eq!(auth.check(Some(&format!("{signed}.{sig}")), DOC, 0), Err(AuthError::Retired));
    }

    #[test]
    fn table_scopes_round_trip_and_cannot_be_widened() {
        let auth = Auth::with_secret("k");
        let tables = BTreeMap::from([
            ("public.todos".to_string(), Some("owner_id = 'u1'".to_string())),
            ("public.tags".to_string(), None),
        ]);
        let t = auth.mint(&Claims { sub: "u1".into(), tables: Some(tables.clone()), ..Claims::default() }).unwrap();
        assert!(t.starts_with("mt2."), "a table scope needs the scoped form");
        assert_eq!(auth.check(Some(&t), Resource::ChangeFeed, 0).unwrap().tables(), Some(&tables));
        // Dropping the predicate from the payload breaks the signature.
        let (_, sig) = t.rsplit_once('.').unwrap();
        let widened = URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","tables":{"public.todos":null}}"#);
        assert_eq!(
            auth.check(Some(&format!("mt2.{widened}.{sig}")), Resource::ChangeFeed, 0),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn open_servers_accept_anything() {
        let grant = Auth::open().check(None, DOC, 0).unwrap();
        assert!(!grant.read_only() && grant.expires_at().is_none() && grant.subject().is_none());
    }
}
