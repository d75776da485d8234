//! One operation of each timed scenario, and what it needs prepared.

use time::OffsetDateTime;

use super::api::Api;
use super::sms_inbox::SmsInbox;
use super::{Scenario, phone};

/// A success, with the number and the moment of its 202 when delivery is timed; or the name the
/// failure is counted under.
pub(super) type Outcome = Result<Option<(String, OffsetDateTime)>, String>;

/// What the operations of one run share.
pub(super) struct Operations {
    pub(super) scenario: Scenario,
    pub(super) api: Api,
    pub(super) sms: SmsInbox,
    /// `verify`: one (number, code) per operation.
    pub(super) codes: Vec<(String, String)>,
    /// `me`: the tokens the operations take turns with.
    pub(super) tokens: Vec<String>,
    /// Where this run's numbers start.
    pub(super) phone_offset: u64,
}

impl Operations {
    /// The `i`th operation of the run.
    pub(super) async fn run(&self, i: u64) -> Outcome {
        match self.scenario {
            Scenario::Request => {
                let phone = phone(self.phone_offset, i);
                self.api.request_code(&phone).await?;
                Ok(Some((phone, OffsetDateTime::now_utc())))
            }
            Scenario::Signup => {
                let phone = phone(self.phone_offset, i);
                let (token, accepted_at) = self.api.sign_in(&self.sms, &phone).await?;
                self.api.me(&token).await?;
                Ok(Some((phone, accepted_at)))
            }
            Scenario::Verify => {
                let (phone, code) = &self.codes[i as usize];
                self.api.verify(phone, code).await?;
                Ok(None)
            }
            Scenario::Me => {
                self.api
                    .me(&self.tokens[i as usize % self.tokens.len()])
                    .await?;
                Ok(None)
            }
            Scenario::Drain | Scenario::Failover | Scenario::Receipts | Scenario::Resend => {
                unreachable!("drain and failover have their own loops")
            }
        }
    }
}
