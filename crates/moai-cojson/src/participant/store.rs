//! The CoValues a participant knows, verified exactly as the relay verifies them.
//!
//! Everything enters through [`Store::ingest`]: the same [`verify_content`] and
//! [`CoValueState::apply`] the relay runs, so the participant never reads or builds on content
//! a relay would refuse, and its own writes, which go through the same door, are checked to be
//! acceptable before they are sent (docs/protocols/cojson-participant.md §10). The reader and
//! the writer take the CoValues from here.

use crate::covalue::CoValueState;
use crate::group_roles::{self, CoValueLookup};
use crate::header::Header;
use crate::ids::{CoId, SessionAuthor};
use crate::message::ContentMessage;
use crate::verify::{verify_content, ContentError, DeletePolicy, HeaderLookup};
use std::collections::HashMap;

/// What ingesting one content message did (`Participant::ingest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// The header was new here.
    pub header_installed: bool,
    /// Sessions that gained transactions.
    pub sessions_extended: usize,
    /// Sessions refused (session ID, reason): bad signature, unknown author account, …
    pub rejected: Vec<(String, String)>,
    /// Some session started beyond what is held here (content is missing before it).
    pub gap: bool,
}

/// Verified CoValues by ID, plus the header of our own account, which is always known (it is a
/// function of our identity) so our sessions verify before the account itself is stored.
pub struct Store {
    covalues: HashMap<CoId, CoValueState>,
    own_account: Header,
}

impl Store {
    pub fn new(own_account: Header) -> Self {
        Store { covalues: HashMap::new(), own_account }
    }

    pub fn get(&self, id: &CoId) -> Option<&CoValueState> {
        self.covalues.get(id)
    }

    /// Header of an account (or any CoValue) held here; our own account always.
    pub fn header(&self, id: &CoId) -> Option<&Header> {
        match self.covalues.get(id) {
            Some(state) => Some(&state.header),
            None if *id == self.own_account.id => Some(&self.own_account),
            None => None,
        }
    }

    /// Verifies `msg` against what is held and applies what verifies.
    pub fn ingest(&mut self, msg: &ContentMessage) -> Result<IngestReport, ContentError> {
        let existing = self.covalues.get(&msg.id);
        let verdict = verify_content(existing, msg, &StoreView(self), &StoreView(self))?;
        let mut report = IngestReport {
            gap: verdict.gap,
            rejected: verdict.rejected.iter().map(|(s, e)| (s.clone(), e.to_string())).collect(),
            ..IngestReport::default()
        };
        let mut slot = self.covalues.remove(&msg.id);
        let applied = CoValueState::apply(&mut slot, verdict);
        if let Some(state) = slot {
            self.covalues.insert(msg.id.clone(), state);
        }
        report.header_installed = applied.header_installed;
        report.sessions_extended = applied.sessions.len();
        Ok(report)
    }
}

/// The store as verification and the role check see it.
struct StoreView<'a>(&'a Store);

impl HeaderLookup for StoreView<'_> {
    fn header(&self, id: &CoId) -> Option<&Header> {
        self.0.header(id)
    }
}

impl CoValueLookup for StoreView<'_> {
    fn state(&self, id: &CoId) -> Option<&CoValueState> {
        self.0.covalues.get(id)
    }
}

/// Deletes follow the relay's rule: the author must be admin of the owner group at `madeAt`.
impl DeletePolicy for StoreView<'_> {
    fn author_is_admin(&self, owner_group: &CoId, author: &SessionAuthor, made_at: u64) -> bool {
        group_roles::is_admin(self, owner_group, author.as_str(), made_at)
    }
}

impl CoValueLookup for Store {
    fn state(&self, id: &CoId) -> Option<&CoValueState> {
        self.covalues.get(id)
    }
}
