//! Delivery receipts: what providers report after they accepted a message (docs/messaging.md#delivery-receipts).
//!
//! A provider can accept a message and the carrier can still drop it, silently. Receipts tell:
//! Twilio posts status callbacks (signed, [`twilio`]), Infobip delivery reports ([`infobip`]).
//! Each becomes a [`Receipt`]; [`store`] remembers every sent message until its OTP expires
//! (sealed) and its latest status for a day, so a duplicate or a late, lower status changes
//! nothing, and keeps each number's timeline for `sms-worker trace`.

pub mod infobip;
pub mod store;
pub mod twilio;

/// A message's delivery status, in the order it can only move forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Accepted, queued, being sent.
    Queued,
    /// Handed to the carrier.
    Sent,
    Delivered,
    /// The carrier could not deliver it.
    Undelivered,
    /// The provider could not send it.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Undelivered => "undelivered",
            Self::Failed => "failed",
        }
    }

    /// Later statuses rank higher; final ones share the top rank, so the first final one wins.
    pub fn rank(self) -> u8 {
        match self {
            Self::Queued => 1,
            Self::Sent => 2,
            Self::Delivered | Self::Undelivered | Self::Failed => 3,
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Self::Undelivered | Self::Failed)
    }

    /// Delivered, or failed for good: what the breaker and a resend go by.
    pub fn is_final(self) -> bool {
        self.rank() == Self::Delivered.rank()
    }
}

/// One provider's report about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub provider: &'static str,
    /// The provider's message id, as it answered the send.
    pub message_id: String,
    pub status: Status,
    /// The provider's error code for a failure (Twilio's 30007, Infobip's error id).
    pub error_code: Option<i64>,
    /// Whether the failure lies with the carrier or the route (another provider may get
    /// through) rather than with the recipient (a landline, an unknown number, an opt-out).
    pub carrier_side: bool,
    /// Whether the failure counts against the provider's route in its breaker: a carrier-side
    /// failure, unless a handset out of reach may have drawn it, which whoever holds
    /// switched-off SIMs could send at will to open a breaker for everyone.
    pub counts_against_route: bool,
    /// The provider's id of this very report, when it gives one: a repeat is a no-op.
    pub dedupe: Option<String>,
}

impl Receipt {
    /// A carrier-side failure: its message is resent once (worker/resend.rs).
    pub fn may_owe_a_resend(&self) -> bool {
        self.status.is_failure() && self.carrier_side
    }
}
