//! `GET /demo`: a shared text editor with presence, Yjs over this server's own endpoint
//! (`/sync/v1/demo-<room>`). The script is `assets/demo.js`, bundled from `web/` (yjs,
//! y-websocket, CodeMirror 6 and y-codemirror.next) and embedded in the binary, so the page
//! works with nothing but this server. `?room=` picks the room, `?name=` the name others see,
//! `?token=` a connection token when the server requires them (it is sent to the Yjs endpoint
//! as y-websocket's `token` parameter and nowhere else).

use axum::http::StatusCode;
use axum::response::Response;

use super::html;

pub(crate) async fn page() -> Response {
    html::page(StatusCode::OK, "Demo", "/demo", BODY, &["demo.js"])
}

const BODY: &str = r#"<div class="demo-head">
<h1>Demo <small>shared text, live</small></h1>
<p>Open this page in a second tab or on another machine: what you type shows up there, and each
of you sees the other's cursor. Everything goes through this server's Yjs endpoint
(<code>/sync/v1/<span id="room">…</span></code>) and is stored by it.</p>
<p class="status-line">You are <strong id="me">…</strong> · <span id="status" class="status">connecting</span></p>
</div>
<div class="demo">
<div id="editor" class="editor"></div>
<aside><h2>Here now</h2><ul id="people" class="people"></ul></aside>
</div>
<noscript><p class="notice">The demo needs JavaScript.</p></noscript>"#;
