//! Participant mode: moai as a cojson participant with an account of its own, rather than only
//! a relay (docs/protocols/cojson-participant.md).
//!
//! Sans-IO like the rest of the crate: no sockets, clocks or storage. Time (`now`, epoch
//! milliseconds) and randomness ([`Entropy`]) are inputs, content comes in as `content` messages
//! (verified like the relay verifies them) and goes out as `content` messages the relay accepts.
//!
//! One concept per file:
//! * `encoding`: `keySecret_z`/`key_z`, base64url `_U` values, nonces;
//! * `cipher`: XSalsa20 without MAC (private transactions, key-for-key);
//! * `seal`: sealed key reveals, group sealers, sealing for a group;
//! * `identity`: agent secret → agent ID → account ID, and the start-up check;
//! * `changes`: CoMap ops and the exact `changes` text;
//! * `clock`: `createdAt` text and the `madeAt` stamp of writes;
//! * `entropy`: randomness as an input;
//! * `session_writer`: one signed transaction in our own session;
//! * `store`: the CoValues we know, verified;
//! * `group_view`: a group's valid transactions and roles (with parents);
//! * `read_key`: finding a read key's secret;
//! * `map_view`: a CoMap's value;
//! * `node`: the [`Participant`] itself; `account`, `group_ops`, `map_ops`: what it writes;
//! * `error`: [`ParticipantError`].

mod account;
mod changes;
mod cipher;
mod clock;
mod encoding;
mod entropy;
mod error;
mod group_ops;
mod group_view;
mod identity;
mod map_ops;
mod map_view;
mod node;
mod read_key;
mod seal;
mod session_writer;
mod store;

#[cfg(test)]
mod read_tests;
#[cfg(test)]
mod scenario_tests;
#[cfg(test)]
mod vectors_tests;

pub use account::AccountBootstrap;
pub use entropy::{Entropy, EntropyError};
pub use error::ParticipantError;
pub use identity::{AgentIdentity, IdentityError};
pub use node::{Participant, WritePrivacy};
pub use store::IngestReport;
