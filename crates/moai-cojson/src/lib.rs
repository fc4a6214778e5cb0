//! Sans-IO core of moai's CoJSON (Jazz 0.20.x) sync server: the relay role, and the participant
//! role (an account of the server's own, `participant/`).
//!
//! No sockets, clocks or storage live in the core: the server edge feeds parsed frames in and
//! carries actions out. The wire formats and verification are the foundation; [`Relay`] is the
//! server state machine built on them, and [`CojsonService`] is the async driver that runs it
//! against storage and the edge's per-socket queues (the only part with tasks and clocks).
//!
//! The public API is what other crates use: the engine as the server runs it
//! ([`CojsonService`], [`CojsonSession`] and their types), and the few items the fuzz target
//! drives directly. Everything else is internal; its tests live beside it in `src/`.

mod canonical_json;
mod content_pieces;
mod covalue;
mod crypto;
mod dependencies;
mod durable;
mod group_roles;
mod header;
mod ids;
mod jazz_token;
mod known_state;
mod message;
mod participant;
mod persistence;
mod relay;
mod service;
mod transaction_hash;
mod uplink;
mod verify;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod vectors_tests;

// The engine, as moai-server's `/sync` edge and moai's `serve` use it.
pub use relay::RelayConfig;
pub use service::{
    ping_frame, CojsonConfig, CojsonService, CojsonSession, CojsonStats, Outbound, ParticipantService,
    ParticipantServiceError, ProfileView, Received, Registration, ServiceStopped, SharedMap, PING_INTERVAL,
};

/// Exported for the fuzz target `fuzz/fuzz_targets/cojson_frame.rs`, which decodes fuzzed frames
/// with it.
pub use message::{parse_frame, Incoming, SyncMessage};
/// Exported for the fuzz target `fuzz/fuzz_targets/cojson_frame.rs`, which drives the sans-IO
/// relay directly, without storage or sockets (answering its reads as "not stored").
pub use persistence::StoredKnown;
/// Exported for the fuzz target `fuzz/fuzz_targets/cojson_frame.rs`, which drives the sans-IO
/// relay directly, without storage or sockets.
pub use relay::{Action, Event, PeerId, Relay};

/// A member's role in a group, as [`Participant::add_member`] and [`Participant::role_of`] use it.
pub use group_roles::Role;
/// Ids of CoValues, for the uplink's events.
pub use ids::CoId;
/// Jazz auth tokens (jazz-tools `generateAuthToken`), for the HTTP endpoints that accept them.
pub use jazz_token::{JazzToken, JazzTokenError, JAZZ_TOKEN_LIFETIME_MS};
/// Participant mode (docs/protocols/cojson-participant.md): the server's own cojson identity
/// (`PEER_ID`/`PEER_SECRET`) and the sans-IO [`Participant`] that writes and reads content under
/// it, with time and randomness ([`Entropy`]) as inputs.
pub use participant::{
    AccountBootstrap, AgentIdentity, Entropy, EntropyError, IdentityError, IngestReport, Participant, ParticipantError,
    WritePrivacy,
};
/// Agent mode's upstream link (docs/participant.md): the sans-IO state machine that keeps
/// CoValues in sync between this server's relay and an upstream sync server, driven by
/// moai-server's uplink task.
pub use uplink::{Action as UplinkAction, Event as UplinkEvent, FetchId, Fetched, Side, Uplink, UplinkConfig};
