//! The send ledger's record of one event, `{ns}:sms:{<event_id>}`, which the worker keeps so that
//! an event gets at most one SMS (`sms-worker`'s `ledger` module has the whole story). The api
//! writes it once: when a publish ended with its outcome unknown (sent, then neither confirmed
//! nor refused), the api withdraws the event by recording [`WITHDRAWN`], unless a worker already
//! took it. A worker that finds the record acknowledges the event without sending, so the request
//! can give its rate-limit slots back. So the key and its values are part of the contract between
//! the two programs, and live here.

use std::time::Duration;

use uuid::Uuid;

/// The value of an event the api withdrew before any worker took it.
pub const WITHDRAWN: &str = "withdrawn";

/// How long a finished record is kept after its OTP expires: room for clock skew between the
/// api, the broker and the workers. No copy of the event reaches a worker later than its expiry
/// (the message's `expiration`).
pub const DONE_MARGIN: Duration = Duration::from_secs(3600);

/// `{ns}:sms:{<event_id>}`; the braces make the event id its Redis Cluster hash tag.
pub fn key(namespace: &str, event_id: Uuid) -> String {
    format!("{namespace}:sms:{{{event_id}}}")
}
