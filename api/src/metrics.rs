//! Metric names, and the `# HELP` text `/metrics` prints for each (docs/operations.md#api-metrics).

/// Counter, labels `method`, `route` (the route template, or `unmatched`), `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Histogram (seconds), label `route`.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// Counter, label `outcome`: `accepted`, `rate_limited`, `unavailable`.
pub const OTP_REQUESTS: &str = "otp_requests_total";
/// Counter, label `outcome`: `accepted`, `invalid`, `burned`, `rate_limited`.
pub const OTP_VERIFICATIONS: &str = "otp_verifications_total";
/// Counter, label `country`: ISO region (`JM`), or the calling code of a number of none (`+881`).
pub const FRAUD_GUARD_TRIPS: &str = "otp_fraud_guard_trips_total";
/// Counter, label `outcome`: `rotated`, `invalid`, `reused`, `rate_limited`, `daily_cap`,
/// `over_daily_cap`, `out_of_time`, `commit_unanswered`.
pub const TOKEN_REFRESHES: &str = "token_refreshes_total";
/// Counter: refreshes let through without a count against `REFRESH_PER_SESSION_PER_DAY`,
/// because Redis failed or did not answer within 0.5 s (the cap fails open).
pub const TOKEN_REFRESHES_UNCOUNTED: &str = "token_refreshes_uncounted_total";
/// Counter: refreshes of a known token counted against `REFRESH_PER_SESSION_PER_DAY` (asked of
/// Redis, whatever it answered): the denominator of the uncounted share.
pub const TOKEN_REFRESH_CAP_CHECKS: &str = "token_refresh_cap_checks_total";
/// Counter, label `step` (`request`, `verify`): uses of a fixed test number (`OTP_TEST_NUMBERS`).
pub const TEST_NUMBER_USES: &str = "otp_test_number_uses_total";
/// Histogram (seconds): publishing an `OtpRequested` until the broker's confirm.
pub const PUBLISH_DURATION: &str = "amqp_publish_duration_seconds";
/// Counter: publishes tried again on a fresh channel (nacked, unconfirmed in time, or their
/// connection lost), e.g. while a quorum queue's leader moves.
pub const PUBLISH_RETRIES: &str = "amqp_publish_retries_total";
/// Counter, label `resolution`: publishes sent and then neither confirmed nor refused, settled
/// through the send ledger: `withdrawn` (before any worker took it: 503, slots given back),
/// `taken` (a worker had it: accepted), `dead_lettered` (a worker dead-lettered it: 503, slots
/// given back), `kept` (Redis could not say: 503, slots kept).
pub const PUBLISH_OUTCOME_UNKNOWN: &str = "amqp_publish_outcome_unknown_total";
/// Counter: confirmed codes that Redis did not make current within their request (202 all the
/// same, since the SMS goes), left to a background task that retries until the code expires.
pub const PROMOTIONS_DEFERRED: &str = "otp_promotions_deferred_total";
/// Counter: pending codes a sign-in (anyone's guess) made current, their SMS having gone
/// (`signin::late_promotion`): a promotion after the confirm that never ran (the api killed, or
/// stopped with Redis away) or had yet to (Redis slow).
pub const PROMOTIONS_AT_SIGN_IN: &str = "otp_promotions_at_sign_in_total";
/// Counter, label `reason`: confirmed codes, their SMS sent, that never became valid: `lost`
/// (the pending code was gone from Redis: a failover or restart lost it), `expired` (Redis
/// stayed away until the code expired), `abandoned` (too many were already waiting for Redis).
pub const CODES_NEVER_VALID: &str = "otp_codes_never_valid_total";
/// The reasons of [`CODES_NEVER_VALID`], each exported at 0 from the start: an alert on its
/// increase then sees the first one (a series that appears at 1 has no increase).
pub const CODES_NEVER_VALID_REASONS: [&str; 3] = ["lost", "expired", "abandoned"];
/// Gauge: the api's connections RabbitMQ is blocking now (a memory or disk alarm: it reads
/// nothing the api sends on them); 1 or 0 in practice. OTP requests get 503 at once meanwhile.
pub const BROKER_BLOCKED: &str = "amqp_connection_blocked";

/// Gives every metric its `# HELP` line, and exports the counters of rare failures at 0. Call
/// once the recorder is installed.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Time to answer a request, by route template."
    );
    describe_counter!(
        OTP_REQUESTS,
        "OTP requests: accepted, rate_limited, unavailable (Redis or RabbitMQ away)."
    );
    describe_counter!(
        OTP_VERIFICATIONS,
        "OTP verifications: accepted, invalid, burned (too many guesses), rate_limited."
    );
    describe_counter!(
        FRAUD_GUARD_TRIPS,
        "Codes sent (monitor) or refused (enforce) while a country's fraud guard is tripped."
    );
    describe_counter!(
        TOKEN_REFRESHES,
        "Refresh token uses: rotated, invalid, reused (a replayed token; its session was revoked), rate_limited, daily_cap (one client over its daily cap, told to wait), over_daily_cap (a session with two holders over it, revoked), out_of_time (the database too slow: rolled back, 503), commit_unanswered (a commit not answered in the request's time: it may have landed, 503)."
    );
    // From 0, so that an alert's increase() sees the first revocation of each process.
    for outcome in ["reused", "over_daily_cap"] {
        metrics::counter!(TOKEN_REFRESHES, "outcome" => outcome).increment(0);
    }
    describe_counter!(
        TOKEN_REFRESHES_UNCOUNTED,
        "Refreshes let through without a count against the daily cap: Redis failed or was too slow."
    );
    metrics::counter!(TOKEN_REFRESHES_UNCOUNTED).increment(0);
    describe_counter!(
        TOKEN_REFRESH_CAP_CHECKS,
        "Refreshes of a known token counted against the daily cap (asked of Redis, whatever it answered)."
    );
    metrics::counter!(TOKEN_REFRESH_CAP_CHECKS).increment(0);
    describe_counter!(
        PUBLISH_RETRIES,
        "Publishes tried again on a fresh channel: nacked, unconfirmed in time, or connection lost."
    );
    describe_counter!(
        PUBLISH_OUTCOME_UNKNOWN,
        "Publishes sent and neither confirmed nor refused, by resolution: withdrawn (503, slots given back), taken (a worker had the event: accepted), dead_lettered (503, slots given back), kept (Redis could not withdraw it: 503, slots kept)."
    );
    describe_counter!(
        PROMOTIONS_DEFERRED,
        "Confirmed codes Redis did not make current within their request (202 all the same), left to a background retry."
    );
    describe_counter!(
        CODES_NEVER_VALID,
        "Confirmed codes, their SMS sent, that never became valid: lost (gone from Redis), expired (Redis away until then), abandoned (too many waiting)."
    );
    describe_counter!(
        PROMOTIONS_AT_SIGN_IN,
        "Pending codes a sign-in made current because their SMS had gone: a promotion after the confirm that never ran, or had yet to."
    );
    metrics::counter!(PROMOTIONS_DEFERRED).increment(0);
    metrics::counter!(PROMOTIONS_AT_SIGN_IN).increment(0);
    for reason in CODES_NEVER_VALID_REASONS {
        metrics::counter!(CODES_NEVER_VALID, "reason" => reason).increment(0);
    }
    describe_counter!(
        TEST_NUMBER_USES,
        "Requests and verifications with a fixed test number (OTP_TEST_NUMBERS)."
    );
    describe_gauge!(
        BROKER_BLOCKED,
        "Connections on which RabbitMQ blocks the api's publishes now (a resource alarm)."
    );
    describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "Publishing an OtpRequested event until RabbitMQ's confirm."
    );
    shared::telemetry::describe();
}
