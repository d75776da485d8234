//! Metric names, served in Prometheus text format on `/metrics`.

/// Counter, label `outcome`: `sent`, `retried` (one per retried attempt), `dead_lettered`,
/// `duplicate_skipped` (a copy of an event that was already handled), `withdrawn` (an event the
/// api withdrew: its publish was never confirmed), `sent_after_withdrawal` (sent, though the api
/// had withdrawn it meanwhile: its claim was lost during the send), `requeued` (handed back to
/// the broker, e.g. when the dead-letter publish failed).
pub const SENDS: &str = "sms_sends_total";
/// Counter, label `kind`: `permanent`, `retries_exhausted`, `expired`, `invalid_message`.
pub const DEAD_LETTERS: &str = "sms_dead_letters_total";
/// Counter: dead letters acknowledged while RabbitMQ blocked their connection (an alarm). Their
/// copies wait in this process's memory for the alarm to end, and are lost if the process stops
/// or the connection drops first.
pub const DEAD_LETTERS_HELD: &str = "sms_dead_letters_held_total";
/// Gauge: the dead-letter copies an alarm holds in this process now (0 once it ends).
pub const DEAD_LETTERS_HELD_NOW: &str = "sms_dead_letters_held";
/// Gauge: dead letters waiting, their originals unacknowledged, because an alarm already holds
/// `SMS_DEAD_LETTERS_HELD_MAX` copies in this process (each takes a slot of the prefetch).
pub const DEAD_LETTERS_WAITING_FOR_ROOM: &str = "sms_dead_letters_waiting_for_room";
/// Histogram (seconds) of one provider call, labels `provider` and `outcome` (`accepted`, or the
/// failure kind: `retryable`, `ambiguous`, `recipient`, `provider`, `route`, `unrecognised`,
/// `withheld`, `no_time_left`).
pub const PROVIDER_DURATION: &str = "sms_provider_request_duration_seconds";
/// Counter, label `provider`: answers to a send cut short (longer than 64 KiB, still coming 2 s
/// after the status, or broken off); each was decided by its status alone.
pub const PROVIDER_ANSWERS_CUT: &str = "sms_provider_answers_cut_total";
/// Counter of provider calls, labels `provider` and `outcome` (as [`PROVIDER_DURATION`]).
pub const PROVIDER_SENDS: &str = "sms_provider_sends_total";
/// Gauge per `provider`: its breaker as this worker last saw it, 0 closed, 1 open, 2 half-open.
pub const BREAKER_STATE: &str = "sms_provider_breaker_state";
/// Counter of token endpoint calls, labels `provider` and `outcome` (`fetched`, `failed`).
pub const TOKEN_REFRESHES: &str = "sms_provider_token_refreshes_total";
/// Counter: events that ended sent-unconfirmed, label `cause`: [`UNANSWERED`] or
/// [`CUT_AT_STOP`].
pub const AMBIGUOUS: &str = "sms_ambiguous_total";
/// A provider left a call unanswered (a timeout, a reset after the request went out), and no
/// later call settled it.
pub const UNANSWERED: &str = "unanswered";
/// A stopping worker's grace period ended with a provider call under way.
pub const CUT_AT_STOP: &str = "cut_at_stop";
/// Counter of delivery receipts that moved a message's status, labels `provider`, `status`
/// (`queued`, `sent`, `delivered`, `undelivered`, `failed`) and `country` (the destination's
/// calling code, e.g. `44`).
pub const RECEIPTS: &str = "sms_receipts_total";
/// Counter of receipts that changed nothing, labels `provider` and `reason` (`duplicate`: the
/// same or an older status again; `unknown`: no message of ours with that id;
/// `duplicate_request`: Infobip's report of a repeated message id it refused, status 23).
pub const RECEIPTS_IGNORED: &str = "sms_receipts_ignored_total";
/// Histogram (seconds) from the provider accepting an SMS to its `delivered` receipt, label
/// `provider`.
pub const DELIVERY_SECONDS: &str = "sms_delivery_seconds";
/// Counter of resends after a carrier-side delivery failure, labels `provider` (the one resent
/// through) and `outcome` (`accepted` or the failure kind).
pub const RESENDS: &str = "sms_resends_total";
/// Counter of carrier-side failures not resent, label `reason` (`expired`, `code_not_current`,
/// `no_other_provider`, `already_resent`, `fraud_guard`, `unavailable`).
pub const RESENDS_SKIPPED: &str = "sms_resends_skipped_total";
/// Counter of resends asked for while the country's fraud guard was tripped, labels
/// `country` (ISO region, or the calling code of a number of none, `+881`) and `refused` (`true`
/// in `enforce`, where no resend is made; `false` in `monitor`, where it is made all the same).
pub const RESEND_FRAUD_GUARD_TRIPS: &str = "sms_resend_fraud_guard_trips_total";
/// Gauge: 1 while the fraud-guard settings the api noted in Redis are not this worker's
/// (`OTP_FRAUD_GUARD*`), else 0 (read every minute by a worker with receipts on).
pub const FRAUD_GUARD_SETTINGS_DIFFER: &str = "sms_fraud_guard_settings_differ";
/// Counter of callbacks refused, labels `provider` and `reason` (`signature`, `secret`,
/// `malformed`).
pub const CALLBACKS_REJECTED: &str = "sms_callbacks_rejected_total";
/// Gauge, label `queue` (`{ns}.sms`, `{ns}.sms.dlq`): messages ready in the queue, read from
/// the broker every [`crate::worker`] depth interval.
pub const QUEUE_DEPTH: &str = "sms_queue_depth";
/// Gauge: deliveries being handled right now by this process.
pub const IN_FLIGHT: &str = "sms_in_flight";
/// Counter: connections to RabbitMQ opened (more than one means it reconnected).
pub const AMQP_CONNECTS: &str = "sms_amqp_connections_total";
/// Gauge: the dead-letter connections RabbitMQ blocks (a memory or disk alarm): the current one,
/// and any kept, with its held copies, through a reconnect during the alarm.
pub const AMQP_BLOCKED: &str = "sms_amqp_connection_blocked";
/// Counter: deliveries acknowledged to the broker.
pub const ACKED: &str = "sms_acked_total";
/// Counter of `basic.ack` frames sent, label `multiple` (`true`: one frame for a run of
/// deliveries): acknowledged deliveries per frame is the batching's gain.
pub const ACK_FRAMES: &str = "sms_ack_frames_total";
/// Gauge: SMS sent whose `sent` record waits for Redis in the background (their deliveries
/// acknowledged); a copy of such an event could be sent again until it lands.
pub const SENT_RECORDS_WAITING: &str = "sms_sent_records_waiting";
/// Counter, label `reason`: sent SMS whose `sent` record was given up: `refused` (Redis refused
/// the command), `too_many` (too many records waiting), `expired` (the code expired first).
/// Records a stopping worker leaves behind are only logged: its `/metrics` goes with it.
pub const SENT_RECORDS_GIVEN_UP: &str = "sms_sent_records_given_up_total";
pub const SENT_RECORDS_GIVEN_UP_REASONS: [&str; 3] = ["refused", "too_many", "expired"];
/// Counter: timeline writes skipped because too many were still under way (a slow Redis).
pub const TIMELINE_WRITES_DROPPED: &str = "sms_timeline_writes_dropped_total";

/// Gives every metric its `# HELP` line. Call once the recorder is installed.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(ACKED, "Deliveries acknowledged to the broker.");
    describe_counter!(
        TIMELINE_WRITES_DROPPED,
        "Timeline writes skipped because too many were still waiting on Redis; only `sms-worker trace` loses lines."
    );
    describe_counter!(
        ACK_FRAMES,
        "basic.ack frames sent; multiple=true frames acknowledge a run of deliveries at once."
    );
    describe_counter!(
        SENDS,
        "Deliveries by outcome: sent, sent_unconfirmed, retried, dead_lettered, duplicate_skipped, withdrawn, sent_after_withdrawal, claim_in_doubt, requeued."
    );
    describe_counter!(
        DEAD_LETTERS_HELD,
        "Dead letters acknowledged while an alarm held their copy in this process (lost if it stops first)."
    );
    describe_gauge!(
        DEAD_LETTERS_HELD_NOW,
        "Dead-letter copies a RabbitMQ alarm holds in this process now (lost if it stops before the alarm ends)."
    );
    describe_gauge!(
        DEAD_LETTERS_WAITING_FOR_ROOM,
        "Dead letters waiting unacknowledged for an alarm to end, past SMS_DEAD_LETTERS_HELD_MAX held copies (each takes a prefetch slot)."
    );
    describe_gauge!(
        SENT_RECORDS_WAITING,
        "SMS sent whose ledger record waits for Redis in the background; until it lands, a copy of the event could be sent again."
    );
    metrics::gauge!(SENT_RECORDS_WAITING).set(0.0);
    describe_counter!(
        SENT_RECORDS_GIVEN_UP,
        "Sent SMS whose ledger record was given up, by reason: refused, too_many, expired. A copy of such an event could be sent again."
    );
    // Each reason at 0 from the start: `increase` does not count a series' first value.
    for reason in SENT_RECORDS_GIVEN_UP_REASONS {
        metrics::counter!(SENT_RECORDS_GIVEN_UP, "reason" => reason).increment(0);
    }
    // At 0 from the start, so that an alert on its increase sees the first one.
    metrics::counter!(DEAD_LETTERS_HELD).increment(0);
    metrics::gauge!(DEAD_LETTERS_HELD_NOW).set(0.0);
    metrics::gauge!(DEAD_LETTERS_WAITING_FOR_ROOM).set(0.0);
    describe_counter!(
        DEAD_LETTERS,
        "The worker's own dead letters by kind: permanent, retries_exhausted, expired, invalid_message."
    );
    describe_counter!(
        PROVIDER_ANSWERS_CUT,
        "Answers to a send cut short (over 64 KiB, still coming 2 s after the status, or broken off), decided by their status alone."
    );
    describe_histogram!(
        PROVIDER_DURATION,
        metrics::Unit::Seconds,
        "One provider call, by provider and outcome (accepted or the failure kind)."
    );
    describe_counter!(
        PROVIDER_SENDS,
        "Provider calls by provider and outcome (accepted, retryable, ambiguous, recipient, provider, route)."
    );
    describe_gauge!(
        BREAKER_STATE,
        "A provider's circuit breaker as this worker last saw it: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        TOKEN_REFRESHES,
        "Provider token endpoint calls by this worker: fetched, failed."
    );
    describe_counter!(
        AMBIGUOUS,
        "Events that ended sent-unconfirmed, by cause: unanswered (a provider left a call unanswered and no later call settled it), cut_at_stop (a stop's grace period ended with a call under way)."
    );
    for cause in [UNANSWERED, CUT_AT_STOP] {
        metrics::counter!(AMBIGUOUS, "cause" => cause).increment(0);
    }
    describe_counter!(
        RECEIPTS,
        "Delivery receipts that moved a message's status, by provider, status and destination calling code."
    );
    describe_counter!(
        RECEIPTS_IGNORED,
        "Receipts that changed nothing: duplicate (a repeat or an older status), unknown (not ours), duplicate_request (Infobip refused a repeated message id)."
    );
    describe_histogram!(
        DELIVERY_SECONDS,
        metrics::Unit::Seconds,
        "From the provider accepting an SMS to its delivered receipt."
    );
    describe_counter!(
        RESENDS,
        "Codes resent through another provider after a carrier-side failure, by provider and outcome."
    );
    describe_counter!(
        RESENDS_SKIPPED,
        "Carrier-side failures not resent, by reason."
    );
    describe_gauge!(
        FRAUD_GUARD_SETTINGS_DIFFER,
        "1 while this worker's fraud guard settings differ from those the api noted in Redis."
    );
    describe_counter!(
        RESEND_FRAUD_GUARD_TRIPS,
        "Resends asked for while the country's fraud guard was tripped: refused (enforce) or made (monitor)."
    );
    describe_counter!(
        CALLBACKS_REJECTED,
        "Provider callbacks refused: signature, secret, malformed."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Messages ready in the work queue and the dead-letter queue."
    );
    describe_gauge!(IN_FLIGHT, "Deliveries being handled by this process.");
    describe_gauge!(
        AMQP_BLOCKED,
        "Dead-letter connections RabbitMQ blocks (a memory or disk alarm): 1 during one, more after a reconnect during it."
    );
    describe_counter!(
        AMQP_CONNECTS,
        "Connections to RabbitMQ opened; above 1, the worker reconnected."
    );
    shared::telemetry::describe();
}

pub(crate) fn send_outcome(outcome: &'static str) {
    metrics::counter!(SENDS, "outcome" => outcome).increment(1);
}

/// Counts a delivery in [`IN_FLIGHT`] for as long as it lives.
pub(crate) struct InFlight;

impl InFlight {
    pub(crate) fn start() -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}
