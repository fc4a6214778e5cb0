//! The server's own account: created on first start the way cojson's default path creates one
//! (account, public profile group, private profile with the name), completed with a profile
//! when one is missing, and left alone when complete (docs/protocols/cojson-participant.md §5).

use super::changes::set_op;
use super::entropy::{random_key, Entropy};
use super::error::ParticipantError;
use super::node::{Participant, WritePrivacy};
use super::session_writer::TxPrivacy;
use crate::group_roles::Role;
use serde_json::{json, Value};

/// What [`Participant::bootstrap_account`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountBootstrap {
    /// The account was not known: account, profile group and profile were written.
    Created,
    /// The account had no `profile`: a profile group and profile were written and linked.
    ProfileAdded,
    /// Nothing to do.
    Complete,
}

impl Participant {
    /// Makes sure our account exists with a profile named `name`. Ingest the stored account
    /// first (if any); then hand out [`Participant::take_content`]. Draws, when creating: the
    /// account's read key (32 + 12), the profile group (12, 32 + 12), the profile (12).
    pub fn bootstrap_account(
        &mut self,
        name: &str,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> Result<AccountBootstrap, ParticipantError> {
        let account = self.identity.account().clone();
        if let Some(state) = self.store.get(&account) {
            self.identity.check_stored_account_header(&state.header.raw)?;
            let has_profile = {
                let reader = self.reader();
                self.group_view(&reader, &account)?.get_str("profile").is_some()
            };
            if has_profile {
                return Ok(AccountBootstrap::Complete);
            }
            self.add_profile(name, now, entropy)?;
            return Ok(AccountBootstrap::ProfileAdded);
        }
        let header = self.identity.account_header();
        self.create(header)?;
        let agent = self.identity.agent().clone();
        // The initialAdmin agent makes itself admin, in the agent-form session (§3).
        self.append_set(&account, agent.as_str(), json!("admin"), now)?;
        let (key_id, key) = random_key(entropy)?;
        let own_sealer = self.identity.secret().sealer.sealer_id();
        self.reveal_key(&account, agent.as_str(), &own_sealer, (&key_id, &key), now)?;
        self.append_set(&account, "readKey", json!(key_id.as_str()), now)?;
        self.add_profile(name, now, entropy)?;
        Ok(AccountBootstrap::Created)
    }

    /// A public profile group, the private profile `{name}` in it, and `profile` on the account.
    fn add_profile(&mut self, name: &str, now: u64, entropy: &mut dyn Entropy) -> Result<(), ParticipantError> {
        let group = self.create_group(None, now, entropy)?;
        self.add_member(&group, "everyone", Role::Reader, now)?;
        let profile = self.create_map(
            &group,
            None,
            &[("name", Value::String(name.to_string()))],
            WritePrivacy::Private,
            now,
            entropy,
        )?;
        let account = self.identity.account().clone();
        let made_at = self.stamp(&account, None, now);
        self.append(&account, &[set_op("profile", json!(profile))], TxPrivacy::Trusting, made_at)?;
        Ok(())
    }
}
