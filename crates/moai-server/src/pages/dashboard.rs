//! `/dashboard`: a live view of the server for its operator, behind the admin token (admin.rs).
//!
//! The page is a static shell; `assets/dashboard.js` fills it from `/dashboard/events`, a
//! server-sent event stream: first the plotted history (`event: history`), then one snapshot a
//! second (`event: snapshot`, see sampler.rs), so nothing ever reloads. A stream holds its HTTP
//! connection's slot like any other connection (`--max-connections`, per IP), at most
//! [`MAX_STREAMS`] are open at once, and each ends when the server shuts down. Streams only
//! read the latest published snapshot; no engine ever waits for a viewer.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::admin::{self, Access, AdminToken};
use super::html::{self, escape};
use super::sampler::{self, Feed};
use crate::http_error::error_response;
use crate::AppState;

/// Dashboard event streams open at once; more get 503.
pub(crate) const MAX_STREAMS: usize = 16;

/// The dashboard: its token, its data and its open streams.
pub struct Dashboard {
    token: AdminToken,
    feed: Arc<Feed>,
    sampler: OnceLock<()>,
    streams: Arc<AtomicUsize>,
    storage_size: OnceLock<StorageSize>,
}

/// How the dashboard measures the storage's size (the binary knows the backend and provides it
/// once storage is open): what is measured, and the measurement, run every 10 s while someone
/// watches, on a task of its own with a timeout.
#[derive(Clone)]
pub struct StorageSize {
    /// What the number covers, for people: "SQLite database and its WAL", ….
    pub what: String,
    pub measure: Arc<dyn Fn() -> BoxFuture<'static, Result<u64, String>> + Send + Sync>,
}

impl Dashboard {
    /// A dashboard opened by `token` (`AdminToken::new(None)`: off).
    pub fn new(token: AdminToken) -> Arc<Self> {
        Arc::new(Self {
            token,
            feed: Arc::new(Feed::new()),
            sampler: OnceLock::new(),
            streams: Arc::default(),
            storage_size: OnceLock::new(),
        })
    }

    /// Tells the dashboard how to measure the storage's size (once; later calls are ignored).
    pub fn set_storage_size(&self, probe: StorageSize) {
        let _ = self.storage_size.set(probe);
    }

    pub(crate) fn storage_size(&self) -> Option<&StorageSize> {
        self.storage_size.get()
    }

    pub fn is_enabled(&self) -> bool {
        self.token.is_enabled()
    }

    /// Starts the sampler once, if the dashboard is on and a runtime is there to run it.
    pub(crate) fn start(&self, state: &AppState) {
        if !self.is_enabled() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.sampler.get_or_init(|| {
            tokio::spawn(sampler::run(state.clone(), self.feed.clone()));
        });
    }
}

const OFF: &str = "the dashboard is off: start moai with --admin-token (or MOAI_ADMIN_TOKEN) to turn it on";
const REFUSED: &str = "the dashboard requires the admin token (--admin-token)";

/// The answer to a request that `access` does not let through: 404 while the dashboard is off,
/// 401 without the token. Browsers get a page (with the login form on 401), everything else the
/// JSON error shape.
fn refuse(state: &AppState, headers: &HeaderMap, access: Access, message: Option<&str>) -> Response {
    let (status, text) = match access {
        Access::Disabled => (StatusCode::NOT_FOUND, OFF),
        Access::Granted | Access::Refused => (StatusCode::UNAUTHORIZED, REFUSED),
    };
    if status == StatusCode::UNAUTHORIZED {
        state.metrics.rejected("dashboard_auth");
    }
    let mut resp = if html::wants_html(headers) {
        let body = match access {
            Access::Disabled => format!(r#"<h1>Dashboard</h1><p class="notice">{}.</p>"#, escape(text)),
            Access::Granted | Access::Refused => login_form(message),
        };
        html::page(status, "Dashboard", "/dashboard", &body, &[])
    } else {
        error_response(status, text)
    };
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

fn login_form(message: Option<&str>) -> String {
    let message = message.map(|m| format!(r#"<p class="notice error">{}</p>"#, escape(m))).unwrap_or_default();
    format!(
        r#"<h1>Dashboard</h1>
<p>This server's dashboard needs its admin token (the value of <code>--admin-token</code>).</p>
{message}
<form class="login" method="post" action="/dashboard/login">
<label>Admin token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button type="submit">Open the dashboard</button>
</form>"#
    )
}

#[derive(Deserialize)]
pub(crate) struct TokenQuery {
    token: Option<String>,
}

/// `GET /dashboard`: the page, or the login form. `?token=` signs the browser in and redirects
/// to the bare URL, so the token does not stay in the address bar or history.
pub(crate) async fn page(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<TokenQuery>) -> Response {
    let dashboard = &state.dashboard;
    if let Some(token) = q.token.as_deref() {
        return sign_in(&state, &headers, token);
    }
    match dashboard.token.check(&headers) {
        Access::Granted => html::page(StatusCode::OK, "Dashboard", "/dashboard", DASHBOARD_BODY, &["dashboard.js"]),
        refused => refuse(&state, &headers, refused, None),
    }
}

/// Signs a browser in with `token`: the session cookie and a redirect, or the form again.
fn sign_in(state: &AppState, headers: &HeaderMap, token: &str) -> Response {
    let dashboard = &state.dashboard;
    if !dashboard.is_enabled() {
        return refuse(state, headers, Access::Disabled, None);
    }
    if !dashboard.token.matches(token) {
        return refuse(state, headers, Access::Refused, Some("That is not the admin token."));
    }
    signed_in(dashboard, headers)
}

/// 303 to /dashboard with the session cookie.
fn signed_in(dashboard: &Dashboard, headers: &HeaderMap) -> Response {
    let mut resp = Redirect::to("/dashboard").into_response();
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Some(cookie) = dashboard.token.session_cookie(headers) {
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

/// `POST /dashboard/login` (the form): the cookie and a redirect, or the form again with 401.
pub(crate) async fn login(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    sign_in(&state, &headers, &form.token)
}

/// `POST /dashboard/logout`: forgets the cookie.
pub(crate) async fn logout() -> Response {
    let mut resp = Redirect::to("/dashboard").into_response();
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut().insert(header::SET_COOKIE, admin::clear_cookie());
    resp
}

/// Releases a stream's place when the stream ends.
struct StreamPlace(Arc<AtomicUsize>);

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /dashboard/events`: the history, then a snapshot a second, until the client leaves or
/// the server shuts down.
pub(crate) async fn events(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let dashboard = state.dashboard.clone();
    // An EventSource cannot show a page: JSON errors only.
    let mut json_headers = headers.clone();
    json_headers.remove(header::ACCEPT);
    match dashboard.token.check(&headers) {
        Access::Granted => {}
        refused => return refuse(&state, &json_headers, refused, None),
    }
    if dashboard.streams.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        dashboard.streams.fetch_sub(1, Ordering::Relaxed);
        state.metrics.rejected("dashboard_streams");
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "too many dashboard viewers; try again later");
    }
    let place = StreamPlace(dashboard.streams.clone());
    let history = dashboard.feed.history_json();
    let mut latest = dashboard.feed.latest.subscribe();
    latest.mark_changed();
    let stop = state.shutdown.token().clone();
    let stream = futures_util::stream::unfold(
        (Some(history), latest, stop, place),
        |(history, mut latest, stop, place)| async move {
            if let Some(h) = history {
                let event = Event::default().event("history").data(h);
                return Some((Ok::<_, Infallible>(event), (None, latest, stop, place)));
            }
            tokio::select! {
                _ = stop.cancelled() => None,
                changed = latest.changed() => {
                    changed.ok()?;
                    let data = latest.borrow_and_update().clone();
                    Some((Ok(Event::default().event("snapshot").data(&*data)), (None, latest, stop, place)))
                }
            }
        },
    );
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The page's structure; dashboard.js fills every `data-*` and `id` from the event stream.
const DASHBOARD_BODY: &str = r#"<div class="dash-head">
<h1>Dashboard</h1>
<p class="live"><span id="live" class="pill">connecting…</span> <span id="summary"></span></p>
<form method="post" action="/dashboard/logout"><button class="link" type="submit">Sign out</button></form>
</div>
<section class="cards">
<div class="card"><h2>Connections</h2><p class="big" id="conn-total">–</p><p id="conn-split" class="muted"></p></div>
<div class="card"><h2>Deliveries</h2><p class="big"><span id="deliveries">–</span><small>/s</small></p><p id="received" class="muted"></p></div>
<div class="card"><h2>Storage commit</h2><p class="big"><span id="commit-ms">–</span><small> ms</small></p><p id="commit-detail" class="muted"></p></div>
<div class="card"><h2>Yjs documents</h2><p class="big" id="yjs-loaded">–</p><p class="muted">open in memory</p></div>
<div class="card"><h2>CoValues</h2><p class="big" id="cojson-resident">–</p><p id="cojson-detail" class="muted"></p></div>
<div class="card"><h2>Change feed</h2><p class="big" id="pgsync-role">–</p><p id="pgsync-detail" class="muted"></p></div>
</section>
<section class="plots">
<figure class="plot"><figcaption>Deliveries per second (messages sent to clients)</figcaption><svg id="plot-deliveries" viewBox="0 0 600 160" preserveAspectRatio="none" role="img" aria-label="deliveries per second"></svg><p class="axis" id="axis-deliveries"></p></figure>
<figure class="plot"><figcaption>Storage commit latency (ms): mean <span class="key mean"></span> p99 <span class="key p99"></span></figcaption><svg id="plot-commit" viewBox="0 0 600 160" preserveAspectRatio="none" role="img" aria-label="commit latency"></svg><p class="axis" id="axis-commit"></p></figure>
</section>
<section>
<h2>Open documents <small id="docs-note" class="muted"></small></h2>
<table class="docs"><thead><tr><th>document</th><th>clients</th><th>present</th><th>size</th><th>journal</th><th>updates</th><th>open for</th></tr></thead>
<tbody id="docs"><tr class="empty"><td colspan="7">no document is open</td></tr></tbody></table>
</section>
<section class="two">
<div><h2>Errors and rejections</h2><table class="kv"><tbody id="rejections"><tr class="empty"><td>none since start</td></tr></tbody></table></div>
<div><h2>Server</h2><table class="kv"><tbody id="server"></tbody></table></div>
</section>"#;
