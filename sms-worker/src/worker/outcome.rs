//! How one delivery ends.

use super::sent::SentSms;
use crate::dead_letter::DeadLetter;
use crate::ledger::{ClaimToken, Finished};

pub(crate) enum Outcome {
    /// The provider accepted the SMS: record it, then acknowledge.
    Sent(SentSms),
    /// Two provider calls in a row got no answer after the request went out (or the stop's
    /// grace period ended during a call): the SMS may well have been sent, and another call
    /// could send it again. Record it as sent, then acknowledge.
    SentUnconfirmed(SentSms),
    /// Another copy of the event was already sent or dead-lettered: acknowledge without sending.
    AlreadyHandled(Finished),
    /// Publish a dead letter, then acknowledge.
    DeadLetter {
        dead_letter: DeadLetter,
        /// This delivery's claim token, which Redis may hold (when Redis was away, it may not:
        /// kept all the same, since a claim whose answer was lost may stand). Released if the
        /// dead letter cannot be published; the `dead` record may replace it.
        claim: Option<ClaimToken>,
    },
    /// The worker is stopping: leave the message unacknowledged. Closing the channel hands it
    /// back to the queue for another replica.
    LeaveToRedeliver,
    /// Give the message back to the queue now (the copy holding its claim never finished).
    Requeue,
}
