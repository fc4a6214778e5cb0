//! Everything a [`super::Participant`] operation can refuse, as one typed error. Refusals
//! happen *before* anything is written whenever the outcome is knowable (an operation that
//! clients would treat as invalid is not written at all).

use super::clock::TimeOutOfRange;
use super::entropy::EntropyError;
use super::identity::IdentityError;
use super::session_writer::WriteError;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParticipantError {
    #[error("{0:?} is not a CoValue ID")]
    BadId(String),
    #[error("CoValue {0} is not known here")]
    UnknownCoValue(String),
    #[error("CoValue {0} is deleted")]
    Deleted(String),
    #[error("{0} is not a group")]
    NotAGroup(String),
    #[error("{0} is not a CoMap")]
    NotAMap(String),
    #[error("{0} is not a CoList")]
    NotAList(String),
    #[error("the account header of {0} is not known here (needed to seal keys to it and to check its signatures)")]
    UnknownAccount(String),
    #[error("{0:?} is not a member (an account ID, an agent ID or `everyone`)")]
    BadMember(String),
    #[error("not permitted: {0}")]
    NotPermitted(String),
    #[error("no read key of group {0} is available to this account")]
    NoReadKey(String),
    #[error("not supported yet: {0}")]
    Unsupported(&'static str),
    #[error("content refused: {0}")]
    Content(String),
    #[error("own content failed verification: {0}")]
    SelfCheck(String),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Time(#[from] TimeOutOfRange),
    #[error(transparent)]
    Entropy(#[from] EntropyError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}
