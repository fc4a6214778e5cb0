//! Participant mode: moai as a cojson participant with an account of its own, rather than only
//! a relay (docs/protocols/cojson-participant.md).
//!
//! Sans-IO like the rest of the crate: no sockets, clocks or storage. Time (`now`, epoch
//! milliseconds) and randomness ([`Entropy`]) are inputs, content comes in as verified
//! `content` messages and goes out as `content` messages the relay accepts.
//!
//! One concept per file:
//! * `encoding`: `keySecret_z`/`key_z`, base64url `_U` values, nonces;
//! * `cipher`: XSalsa20 without MAC (private transactions, key-for-key);
//! * `seal`: sealed key reveals, group sealers, sealing for a group;
//! * `identity`: agent secret → agent ID → account ID, and the start-up check;
//! * `changes`: CoMap ops and the exact `changes` text;
//! * `clock`: `createdAt` text and the `madeAt` stamp of writes;
//! * `entropy`: randomness as an input;
//! * `session_writer`: one signed transaction in our own session.

// The primitives are used by the writer and the read path, which follow in this module; until
// then only tests call them.
#[allow(dead_code)]
mod changes;
#[allow(dead_code)]
mod cipher;
#[allow(dead_code)]
mod clock;
#[allow(dead_code)]
mod encoding;
#[allow(dead_code)]
mod entropy;
mod identity;
#[allow(dead_code)]
mod seal;
#[allow(dead_code)]
mod session_writer;

#[cfg(test)]
mod vectors_tests;

pub use identity::{AgentIdentity, IdentityError};
