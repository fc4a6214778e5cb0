//! Sans-IO core of moai's CoJSON (Jazz 0.20.x) sync server, relay role.
//!
//! No sockets, clocks or storage live here: the server edge feeds parsed
//! frames in and carries actions out. The wire formats and verification are
//! the foundation; [`relay`] is the server state machine built on them, and
//! [`service`] is the async driver that runs it against storage and the
//! edge's per-socket queues (the only module with tasks and clocks).

pub mod canonical_json;
pub mod content_pieces;
pub mod covalue;
pub mod crypto;
pub mod dependencies;
pub mod group_roles;
pub mod header;
pub mod ids;
pub mod known_state;
pub mod message;
pub mod persistence;
pub mod relay;
pub mod service;
pub mod transaction_hash;
pub mod verify;
