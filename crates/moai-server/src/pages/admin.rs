//! The admin token that opens the dashboard (`--admin-token`, `MOAI_ADMIN_TOKEN`).
//!
//! Deny by default: with no token configured the dashboard is off (404 saying how to turn it
//! on); with one, every dashboard request must prove it, or gets 401. A request proves it by
//! - `Authorization: Bearer <token>` (scripts, curl), or
//! - the `moai_admin` cookie a browser gets from the login form (`POST /dashboard/login`) or
//!   from opening `/dashboard?token=<token>` once (answered with a redirect to `/dashboard`, so
//!   the token does not stay in the address bar). The cookie is `HttpOnly; SameSite=Strict;
//!   Path=/dashboard` (and `Secure` behind an HTTPS proxy that says so in
//!   `X-Forwarded-Proto`), and holds a SHA-256 digest of the token under a label of its own,
//!   never the token itself: a leaked cookie opens the dashboard, not /metrics or anything else
//!   the same secret might be used for.
//!
//! Every comparison is between digests, in constant time. The token is never logged.

use axum::http::{header, HeaderMap, HeaderValue};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The dashboard's session cookie.
pub(crate) const COOKIE: &str = "moai_admin";

/// What the dashboard requires; `None` = dashboard off.
#[derive(Clone, Default)]
pub struct AdminToken(Option<[u8; 32]>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "AdminToken(set)" } else { "AdminToken(unset)" })
    }
}

/// How a request stands with the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// No admin token is configured.
    Disabled,
    Granted,
    Refused,
}

impl AdminToken {
    /// `None` or an empty token leaves the dashboard off. Only a digest is kept.
    pub fn new(token: Option<&str>) -> Self {
        Self(token.filter(|t| !t.is_empty()).map(|t| Sha256::digest(t.as_bytes()).into()))
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `given` is the token (constant time; a wrong length leaks nothing either).
    pub(crate) fn matches(&self, given: &str) -> bool {
        let Some(expected) = &self.0 else { return false };
        let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        digest.ct_eq(expected).into()
    }

    /// The cookie value that stands for the token: a digest of the token's digest under the
    /// cookie's own label, so it is neither the token nor anything else derived from it.
    fn cookie_value(&self) -> Option<String> {
        let expected = self.0.as_ref()?;
        let mut h = Sha256::new();
        h.update(b"moai dashboard cookie v1\0");
        h.update(expected);
        Some(hex::encode(h.finalize()))
    }

    /// Checks the request's bearer token or cookie.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Access {
        if self.0.is_none() {
            return Access::Disabled;
        }
        if let Some(bearer) = bearer(headers) {
            return if self.matches(bearer) { Access::Granted } else { Access::Refused };
        }
        let Some(expected) = self.cookie_value() else { return Access::Disabled };
        let granted = cookies(headers, COOKIE).any(|v| bool::from(v.as_bytes().ct_eq(expected.as_bytes())));
        if granted {
            Access::Granted
        } else {
            Access::Refused
        }
    }

    /// The `Set-Cookie` that signs a browser in.
    pub(crate) fn session_cookie(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let value = self.cookie_value()?;
        let secure = if behind_https(headers) { "; Secure" } else { "" };
        HeaderValue::from_str(&format!("{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict{secure}")).ok()
    }
}

/// The `Set-Cookie` that signs a browser out.
pub(crate) fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("moai_admin=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim)
}

/// The values of every cookie called `name` in the request.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).filter_map(
        move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim())
        },
    )
}

/// A proxy in front said the browser came over HTTPS.
fn behind_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn off_without_a_token_and_deny_by_default_with_one() {
        assert_eq!(AdminToken::new(None).check(&headers(&[])), Access::Disabled);
        assert_eq!(AdminToken::new(Some("")).check(&headers(&[("authorization", "Bearer ")])), Access::Disabled);
        let t = AdminToken::new(Some("s3cret"));
        assert_eq!(t.check(&headers(&[])), Access::Refused);
        assert_eq!(t.check(&headers(&[("authorization", "Bearer nope")])), Access::Refused);
        assert_eq!(t.check(&headers(&[("authorization", "Bearer s3cret")])), Access::Granted);
        assert_eq!(
            t.check(&headers(&[("cookie", "moai_admin=s3cret")])),
            Access::Refused,
            "the cookie is not the token"
        );
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn the_session_cookie_signs_in_and_is_strict() {
        let t = AdminToken::new(Some("s3cret"));
        let set = t.session_cookie(&headers(&[])).unwrap();
        let set = set.to_str().unwrap();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/dashboard"));
        assert!(!set.contains("Secure") && !set.contains("s3cret"), "{set}");
        let pair = set.split(';').next().unwrap();
        assert_eq!(t.check(&headers(&[("cookie", &format!("a=b; {pair}; c=d"))])), Access::Granted);
        let other = AdminToken::new(Some("other"));
        assert_eq!(other.check(&headers(&[("cookie", pair)])), Access::Refused);
        let https = t.session_cookie(&headers(&[("x-forwarded-proto", "https")])).unwrap();
        assert!(https.to_str().unwrap().ends_with("; Secure"));
    }
}
