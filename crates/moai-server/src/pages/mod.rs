//! The pages a person opens in a browser: `/` (what this server is), `/dashboard` (a live view
//! of the server, behind `--admin-token`) and `/demo` (a shared text editor over moai's own Yjs
//! endpoint). Everything they need is compiled into the binary (`assets/`): they work without
//! any other server, CDN or network (docs/dashboard.md).
//!
//! One concept per file: `landing.rs`, `admin.rs` (the admin token: header, cookie, login form),
//! `dashboard.rs` (the page and its server-sent events), `sampler.rs` (the once-a-second
//! snapshot and its ring buffer), `metrics_text.rs` (reading the /metrics registry),
//! `demo.rs`, `assets.rs`, `html.rs` (escaping and the shared page frame).

mod admin;
mod assets;
mod dashboard;
mod demo;
mod html;
mod landing;
mod metrics_text;
mod sampler;

use axum::routing::{get, post};
use axum::Router;

pub use admin::AdminToken;
pub use dashboard::{Dashboard, StorageSize};

use crate::AppState;

/// The pages' routes. Outside the ready gate: they answer while the server initialises (and say
/// so). Starts the dashboard's sampler when the dashboard is enabled.
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    state.dashboard.start(state);
    Router::new()
        .route("/", get(landing::page))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/events", get(dashboard::events))
        .route("/dashboard/login", post(dashboard::login))
        .route("/dashboard/logout", post(dashboard::logout))
        .route("/demo", get(demo::page))
        .route("/assets/{file}", get(assets::serve))
}
