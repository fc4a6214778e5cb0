//! moai's server edge.
//!
//! Everything that touches sockets, HTTP and time lives here: the accept loop
//! ([`serve`]), readiness ([`Readiness`]) and the gate that keeps sync endpoints closed until the
//! engines are ready, resource limits ([`Limits`]), Prometheus metrics ([`Metrics`]), and graceful
//! shutdown ([`Shutdown`]). The engines are sans-IO or storage-backed libraries; this crate
//! drives them and never the other way round.

mod agent_api;
pub mod auth;
mod caller;
pub mod capture;
mod cojson;
mod engines;
mod gate;
mod health;
mod hocuspocus;
mod http_error;
mod limits;
pub mod llm;
mod metrics;
pub mod pages;
mod pgsync;
mod pump;
pub mod quota;
mod readiness;
mod router;
mod serve;
mod shutdown;
mod storage_health;
pub mod uplink;
pub mod webhooks;
pub mod ws;
mod yjs;

pub use auth::Auth;
pub use engines::Engines;
pub use limits::Limits;
pub use metrics::{Direction, Metrics, Protocol};
pub use pages::{AdminToken, Dashboard, StorageSize};
pub use pump::Heartbeat;
pub use readiness::{Phase, Readiness};
pub use router::{router, AppState};
pub use serve::serve;
pub use shutdown::Shutdown;
pub use storage_health::StorageHealth;
