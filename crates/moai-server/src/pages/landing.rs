//! `GET /`: what this server is, its version, its engines, whether it is ready, and where to go
//! from here. No token needed: it shows nothing /health does not (and no document names).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::html::{self, escape};
use crate::{AppState, Phase};

pub(crate) async fn page(State(state): State<AppState>) -> Response {
    let phase = state.readiness.phase();
    let storage_error = state.storage_health.failure();
    let (class, readiness) = match (&phase, &storage_error) {
        (Phase::Failed(why), _) => ("error", format!("failed to start: {why}")),
        (Phase::Draining, _) => ("warn", "shutting down".to_owned()),
        (Phase::Initializing, _) => ("warn", "initialising (opening storage, starting engines)".to_owned()),
        (Phase::Ready(_), Some(why)) => ("error", format!("not ready: storage cannot be written ({why})")),
        (Phase::Ready(_), None) => ("ok", "ready".to_owned()),
    };
    let engines = match &phase {
        Phase::Ready(engines) => {
            let mut rows = Vec::new();
            if engines.yjs.is_some() {
                rows.push(engine_row("Yjs", "y-websocket protocol", "ws://HOST/sync/v1/{docId}", "enabled"));
            }
            if engines.cojson.is_some() {
                rows.push(engine_row("CoJSON", "Jazz sync protocol, relay role", "ws://HOST/sync", "enabled"));
            }
            match &engines.pgsync {
                Some(pg) => rows.push(engine_row(
                    "Postgres change feed",
                    "snapshot + live changes",
                    "ws://HOST/api/sync",
                    &format!("enabled ({})", pg.role()),
                )),
                None => rows.push(engine_row(
                    "Postgres change feed",
                    "snapshot + live changes",
                    "ws://HOST/api/sync",
                    "off (start with --pg-url)",
                )),
            }
            rows.join("\n")
        }
        _ => r#"<tr><td colspan="4" class="muted">known once the server is ready</td></tr>"#.to_owned(),
    };
    let auth = if state.auth.is_enabled() {
        "connection tokens required (SYNC_SHARED_SECRET is set)"
    } else {
        "open: any client may read and write any document (no SYNC_SHARED_SECRET)"
    };
    let cluster = match &state.cluster {
        Some(bus) => format!("<dt>Cluster</dt><dd>instance {}</dd>", escape(&bus.instance().to_string())),
        None => String::new(),
    };
    let dashboard = if state.dashboard.is_enabled() {
        r#"<li><a href="/dashboard">Dashboard</a>: live view of connections, documents, storage and the change feed (admin token)</li>"#
    } else {
        r#"<li>Dashboard: off (start with <code>--admin-token</code>)</li>"#
    };
    let body = format!(
        r#"<h1>moai <small>{version}</small></h1>
<p class="lead">A self-hosted real-time sync server for local-first apps, in one binary.</p>
<p id="readiness" class="status-line"><span class="pill {class}">{readiness}</span></p>
<dl class="facts">
<dt>Version</dt><dd id="version">{version}</dd>
<dt>Auth</dt><dd>{auth}</dd>
{cluster}
</dl>
<h2>Engines</h2>
<table class="engines"><thead><tr><th>protocol</th><th>what</th><th>endpoint</th><th>state</th></tr></thead>
<tbody>
{engines}
</tbody></table>
<h2>Links</h2>
<ul class="links">
<li><a href="/health">/health</a>: readiness as JSON (200 when ready, 503 otherwise)</li>
<li><a href="/metrics">/metrics</a>: Prometheus / OpenMetrics{metrics_note}</li>
{dashboard}
<li><a href="/demo">Demo</a>: a shared text editor with presence; open it in two tabs</li>
<li>Documentation: <code>README.md</code> and <code>docs/</code> in moai's source (these pages: <code>docs/dashboard.md</code>)</li>
</ul>"#,
        version = escape(state.version),
        readiness = escape(&readiness),
        metrics_note = if state.metrics_token.is_some() { " (bearer token)" } else { "" },
    );
    html::page(StatusCode::OK, "moai", "/", &body, &[])
}

fn engine_row(name: &str, what: &str, endpoint: &str, status: &str) -> String {
    format!(
        "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
        escape(name),
        escape(what),
        escape(endpoint),
        escape(status)
    )
}
