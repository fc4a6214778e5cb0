//! The set of sync engines a ready server serves. It only exists once initialisation has
//! finished, and [`crate::Readiness`] hands it out only in the Ready phase, so no request can
//! reach a half-initialised engine.

/// Handles to the running engines. Each engine issue adds its handle here; an engine that is not
/// configured is `None` and its endpoint answers 404 with a message saying how to enable it.
#[derive(Default)]
pub struct Engines {
    pub yjs: Option<moai_yjs::service::YjsService>,
    pub pgsync: Option<moai_pgsync::PgSync>,
    pub cojson: Option<moai_cojson::CojsonService>,
    /// The server's own cojson account (participant mode; PEER_SECRET).
    pub participant: Option<moai_cojson::ParticipantService>,
    /// Agent mode's link to the upstream sync server (PEER_MODE=agent).
    pub uplink: Option<crate::uplink::UplinkService>,
}
