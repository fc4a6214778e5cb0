//! Where a request carries its token: `Authorization: Bearer`, then `?token=`, then a
//! `bearer.<base64url(token)>` WebSocket subprotocol (browsers cannot set headers on a
//! WebSocket, and a raw token's `:` is not legal in a subprotocol name, hence the encoding).

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Subprotocol prefix that carries a token from browsers:
/// `Sec-WebSocket-Protocol: yjs, bearer.<base64url(token)>`.
pub const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

/// Finds the token of a request.
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
