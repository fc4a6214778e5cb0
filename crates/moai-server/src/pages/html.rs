//! HTML escaping and the frame every page shares (head, header with links, security headers).

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Escapes `s` for HTML text and double-quoted attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Scripts and styles only from this server (the pages embed nothing from elsewhere); inline
/// styles are allowed because the editor sets colours on remote cursors. WebSockets only to this
/// server. No framing, no `<base>`, forms only to this server.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// A whole page: `title`, the navigation with `current` marked, and `body` (already escaped).
/// `scripts` are asset names (`dashboard.js`), loaded at the end of the body.
pub(crate) fn page(status: StatusCode, title: &str, current: &str, body: &str, scripts: &[&str]) -> Response {
    let nav = [("/", "Home"), ("/dashboard", "Dashboard"), ("/demo", "Demo")]
        .iter()
        .map(|(href, name)| {
            let here = if *href == current { r#" aria-current="page""# } else { "" };
            format!(r#"<a href="{href}"{here}>{name}</a>"#)
        })
        .collect::<Vec<_>>()
        .join("");
    let scripts: String = scripts.iter().map(|s| format!(r#"<script src="/assets/{}"></script>"#, escape(s))).collect();
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · moai</title>
<link rel="stylesheet" href="/assets/style.css">
</head>
<body>
<header class="top"><a class="brand" href="/">moai</a><nav>{nav}</nav></header>
<main>
{body}
</main>
{scripts}
</body>
</html>
"#,
        title = escape(title),
    );
    with_page_headers(status, html)
}

/// `html` with the pages' headers: content type, CSP, no caching, no sniffing, no referrer (a
/// `?token=` never leaves in a Referer header).
pub(crate) fn with_page_headers(status: StatusCode, html: String) -> Response {
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// Whether the client asked for HTML (a browser navigating). Others get the JSON error shape.
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            escape(r#"<img src=x onerror="a('b')">&"#),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
        assert_eq!(escape("demo-ünï"), "demo-ünï");
    }
}
