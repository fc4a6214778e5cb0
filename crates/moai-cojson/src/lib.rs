//! Sans-IO core of moai's CoJSON (Jazz 0.20.x) sync server, relay role.
//!
//! No sockets, clocks or storage live here: the server edge feeds parsed
//! frames in and carries actions out. The wire formats and verification are
//! the foundation; [`relay`] is the server state machine built on them, and
//! [`service`] is the async driver that runs it against storage and the
//! edge's per-socket queues (the only module with tasks and clocks).

pub mod canonical_json;
pub mod crypto;
pub mod ids;
pub mod transaction_hash;
pub mod known_state;
pub mod message;
pub mod header;
pub mod covalue;
pub mod verify;
pub mod group_roles;
pub mod dependencies;
pub mod content_pieces;
pub mod persistence;
pub mod relay;
pub mod service;
