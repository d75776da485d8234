//! The send ledger's record of one event, `{ns}:sms:{<event_id>}`, which the worker keeps so that
//! an event gets at most one SMS (`sms-worker`'s `ledger` module has the whole story). The api
//! writes it once: when a publish ended with its outcome unknown (sent, then neither confirmed
//! nor refused), the api withdraws the event by recording [`WITHDRAWN`], unless a worker already
//! took it. A worker that finds the record acknowledges the event without sending, so the request
//! can give its rate-limit slots back. So the key and its values are part of the contract between
//! the two programs, and live here.

use std::time::Duration;

use uuid::Uuid;

/// A worker holds the claim and is sending: `sending:<token>`.
pub const SENDING_PREFIX: &str = "sending:";
/// The provider accepted the SMS.
pub const SENT: &str = "sent";
/// The event was dead-lettered: no SMS went.
pub const DEAD: &str = "dead";
/// The api withdrew the event before any worker took it: no SMS may go. Only the api writes it.
pub const WITHDRAWN: &str = "withdrawn";

/// How long a finished record is kept after its OTP expires: room for clock skew between the
/// api, the broker and the workers. No copy of the event reaches a worker later than its expiry
/// (the message's `expiration`).
pub const DONE_MARGIN: Duration = Duration::from_secs(3600);

/// `{ns}:sms:{<event_id>}`; the braces make the event id its Redis Cluster hash tag.
pub fn key(namespace: &str, event_id: Uuid) -> String {
    format!("{namespace}:sms:{{{event_id}}}")
}

/// What a ledger record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Sending,
    Sent,
    Dead,
    Withdrawn,
}

impl Record {
    /// `None` for a value neither program writes.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            SENT => Some(Self::Sent),
            DEAD => Some(Self::Dead),
            WITHDRAWN => Some(Self::Withdrawn),
            v if v.starts_with(SENDING_PREFIX) => Some(Self::Sending),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back() {
        assert_eq!(Record::parse("sending:0af3"), Some(Record::Sending));
        assert_eq!(Record::parse(SENT), Some(Record::Sent));
        assert_eq!(Record::parse(DEAD), Some(Record::Dead));
        assert_eq!(Record::parse(WITHDRAWN), Some(Record::Withdrawn));
        assert_eq!(Record::parse("sendin"), None);
        assert_eq!(Record::parse(""), None);
    }
}
