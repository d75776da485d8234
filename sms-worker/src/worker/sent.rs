//! What follows an SMS that went out (or may have): its `sent` record in the send ledger, its
//! timeline, its provider's half-open breaker, and, with receipts on, the message its receipts
//! will look for.

use std::sync::Arc;
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};
use shared::OtpRequested;
use time::OffsetDateTime;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, error, info, warn};

use super::context::Context;
use super::lease::Lease;
use crate::ledger::with_a_few_tries;
use crate::provider::Accepted;
use crate::provider::breaker::Allowance;
use crate::receipts::store::SentMessage;
use crate::trace::Line;

/// After the first quick tries, the next try comes this late; twice as late each time, up to
/// [`RECORD_RETRY_MAX`] or a quarter of the claim's lease, whichever is less: the claim, no
/// longer renewed, outlives the last renewal by a lease, and a record that lands within it
/// leaves no gap in which a copy of the event could take the claim over.
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(500);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);
/// After the end of a stop's grace period, how long a `sent` record may take before it is left
/// to the background and the delivery acknowledged: a Redis command waits 2 s, but a reconnect
/// can add its own 2 s, and the whole delivery has 5 s (`connection::SETTLE_AFTER_GRACE`).
const RECORD_AFTER_GRACE: Duration = Duration::from_millis(1_500);
/// Once the worker stops, tries come at least this often: the stop waits only seconds for them.
const RECORD_RETRY_WHILE_STOPPING: Duration = Duration::from_millis(250);
/// Sent records waiting for Redis in the background, at most this many at once in a process.
/// Each outage leaves at most the sends then in flight (no claim, so no send, starts while
/// Redis is away), but a Redis that flaps for the life of many codes adds them up. Past it a
/// record is given up at once, as all were before there was a wait.
pub(super) const RECORDS_WAITING_MAX: u32 = 4_096;

/// An SMS that went out, or may have, with what is left to do for it: recording it and, once
/// the delivery is acknowledged, closing its provider's half-open breaker and remembering it for
/// its receipts. The delivery does that after its send, where the end of a stop's grace period
/// no longer cuts it short (see `delivery::send_until_the_grace_ends`): an SMS that went out and
/// was not acknowledged would be sent again.
pub(crate) struct SentSms {
    /// The number's timeline, ended.
    timeline: Vec<Line>,
    /// What the provider answered, when one did.
    accepted: Option<AcceptedSms>,
    /// The event's claim, where the send still renewed it, renewed until the SMS is recorded:
    /// lapsed before, a copy of the event could take it and send again.
    claim: Option<Lease>,
}

pub(crate) struct AcceptedSms {
    accepted: Accepted,
    /// Whether this send was its provider's half-open breaker's probe.
    allowance: Allowance,
    /// The text sent, for a resend after a carrier-side failure.
    body: String,
}

impl SentSms {
    /// A provider accepted the SMS.
    pub(super) fn accepted(
        timeline: Vec<Line>,
        accepted: Accepted,
        allowance: Allowance,
        body: String,
    ) -> Self {
        let accepted = Some(AcceptedSms {
            accepted,
            allowance,
            body,
        });
        Self {
            timeline,
            accepted,
            claim: None,
        }
    }

    /// No provider confirmed it, but it may have gone out.
    pub(super) fn unconfirmed(timeline: Vec<Line>) -> Self {
        Self {
            timeline,
            accepted: None,
            claim: None,
        }
    }

    /// Keeps the claim's lease until the SMS is recorded.
    pub(super) fn keeping(self, claim: Lease) -> Self {
        Self {
            claim: Some(claim),
            ..self
        }
    }

    /// Records the SMS in the send ledger: that record is what keeps a copy of the event from a
    /// second SMS. Returns what is left to do once the delivery is acknowledged.
    pub(super) async fn record(
        self,
        context: &Context,
        event: &OtpRequested,
    ) -> Option<AcceptedSms> {
        record_sent(context, event, self.timeline).await;
        drop(self.claim);
        self.accepted
    }
}

impl AcceptedSms {
    /// Closes the provider's breaker if this send was its half-open probe, and remembers the
    /// message for its receipts.
    pub(super) async fn follow_up(self, context: &Context, event: &OtpRequested) {
        let Self {
            accepted,
            allowance,
            body,
        } = self;
        let providers = context.providers.all();
        if let Some(provider) = providers.iter().find(|p| p.name() == accepted.provider) {
            provider.breaker.success(allowance).await;
        }
        await_receipts(context, event, &accepted, body).await;
    }
}

/// Records the send in the ledger, and writes the number's timeline, ended, alongside: on one
/// Redis server both usually leave in one write. The timeline is written on a task of its own
/// and not waited for: on a Redis Cluster it lives on another node than the ledger record, and a
/// sick node there must not hold this delivery's ack (and its prefetch slot) for a diagnostic.
/// Once a stop's grace period is over, no new try starts, and the one under way has at most
/// [`RECORD_AFTER_GRACE`], before the record is left to the background: the delivery has seconds
/// left for its ack, and there a record is tried every 250 ms.
async fn record_sent(context: &Context, event: &OtpRequested, timeline: Vec<Line>) {
    let trace_id = context.timelines.trace_id(event.phone_number.as_str());
    context.timelines.append_detached(trace_id, timeline);
    let ledger = &context.ledger;
    let time_left = || Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    let record = || ledger.record_sent(event.event_id, time_left());
    let tries = with_a_few_tries(|| context.grace_over.is_over(), record);
    let past_the_grace = async {
        context.grace_over.recv().await;
        tokio::time::sleep(RECORD_AFTER_GRACE).await;
    };
    let recorded = tokio::select! {
        biased;
        recorded = tries => recorded,
        () = past_the_grace => Err(RedisError::from(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        ))),
    };
    match recorded {
        Ok(withdrawn) => report_withdrawal(withdrawn),
        Err(e) => keep_trying(context, event, &e),
    }
}

/// Goes on writing `sent` in the background, after the delivery is acknowledged, until Redis
/// takes it or the code expires. Without the record, a copy of the event published twice could
/// be sent again once the claim lapses, and a sign-in with a code whose request the api could
/// not confirm in time (a pending code) would be refused, the SMS on the phone. The delivery is
/// not held meanwhile: a message unacknowledged goes back to the queue if the channel closes,
/// and would then be sent again.
fn keep_trying(context: &Context, event: &OtpRequested, error: &RedisError) {
    if !worth_waiting_for(error) {
        warn!(error = %error, "sent, but Redis refused its record; a copy of the event could be sent again");
        gave_up("refused");
        return;
    }
    let Ok(slot) = Arc::clone(&context.records_waiting).try_acquire_owned() else {
        warn!(error = %error, "sent, but could not record it in Redis, and too many records wait already; a copy of the event could be sent again");
        gave_up("too_many");
        return;
    };
    let waiting = RecordWaiting::count(slot);
    warn!(error = %error, "sent, but could not record it in Redis; trying again in the background until Redis answers or the code expires");
    let ledger = context.ledger.clone();
    let shutdown = context.shutdown.clone();
    let most_between_tries = RECORD_RETRY_MAX.min(context.config.claim_lease / 4);
    // What the task needs of the event, its code left behind.
    let event_id = event.event_id;
    let event = event.without_code();
    let time_left = move || Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    // Through the worker's stop too, while the process lasts: the stop says how many are left.
    let retrying = async move {
        let _waiting = waiting;
        let mut pause = RECORD_RETRY_FIRST.min(most_between_tries);
        loop {
            // Spread, so that the records one Redis failure left behind do not all come back
            // together.
            let spread = |pause: Duration| pause.mul_f64(rand::random_range(0.5..=1.0));
            if shutdown.is_shutdown() {
                tokio::time::sleep(spread(pause.min(RECORD_RETRY_WHILE_STOPPING))).await;
            } else {
                // Cut short by a stop, after which tries come faster.
                let _ = shutdown.sleep(spread(pause)).await;
            }
            if time_left().is_zero() {
                warn!("gave up recording the send: the code expired before Redis answered");
                gave_up("expired");
                return;
            }
            match ledger.record_sent(event_id, time_left()).await {
                Ok(withdrawn) => {
                    info!("recorded the send once Redis answered");
                    report_withdrawal(withdrawn);
                    return;
                }
                Err(e) if !worth_waiting_for(&e) => {
                    warn!(error = %e, "gave up recording the send: Redis refused it; a copy of the event could be sent again");
                    gave_up("refused");
                    return;
                }
                Err(_) => pause = (pause * 2).min(most_between_tries),
            }
        }
    };
    tokio::spawn(retrying.in_current_span());
}

/// Waits, at most `limit`, until no record waits for Redis (at once when none does). Only once
/// no send can start: a waiting `acquire_many` takes the slots as they come free, and a record
/// asking for one meanwhile would be turned away.
pub(super) async fn wait_for_records(context: &Context, limit: Duration) {
    let waiting = records_waiting(context);
    if waiting == 0 {
        return;
    }
    info!(
        records = waiting,
        limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        "waiting for sent records Redis has not taken yet"
    );
    // Every slot free again: each record has landed or been given up.
    let all_free = context.records_waiting.acquire_many(RECORDS_WAITING_MAX);
    let _ = tokio::time::timeout(limit, all_free).await;
}

fn records_waiting(context: &Context) -> usize {
    RECORDS_WAITING_MAX as usize - context.records_waiting.available_permits()
}

/// Says how many records still wait for Redis as the worker stops: they end with the process
/// (or land in its last moments), and their `/metrics` with it.
pub(super) fn report_records_left(context: &Context) {
    let left = records_waiting(context);
    if left > 0 {
        warn!(
            records = left,
            "stopping with sent SMS whose record Redis has not taken yet; copies of those events could be sent again"
        );
    }
}

fn gave_up(reason: &'static str) {
    metrics::counter!(crate::metrics::SENT_RECORDS_GIVEN_UP, "reason" => reason).increment(1);
}

/// Whether waiting may help: Redis away, timing out, failing over, loading, full or out of
/// connections. Not a refusal that would come back every time: `ERR` (a Redis older than 6.2
/// knows no `SET … GET`), `NOPERM`, `CROSSSLOT`, or credentials Redis refuses.
fn worth_waiting_for(error: &RedisError) -> bool {
    match error.kind() {
        ErrorKind::Server(ServerErrorKind::NoPerm | ServerErrorKind::CrossSlot)
        | ErrorKind::AuthenticationFailed => false,
        ErrorKind::Server(ServerErrorKind::ResponseError) => error
            .detail()
            .is_some_and(|detail| detail.starts_with("max number of clients")),
        _ => !matches!(error.code(), Some("NOAUTH" | "WRONGPASS")),
    }
}

/// `record_sent` found `withdrawn`: its claim was lost while it sent, and the api, hearing no
/// confirm in time, withdrew the event and refused the request. An SMS went whose code will not
/// work, and the request gave its limit slots back.
fn report_withdrawal(withdrawn: bool) {
    if withdrawn {
        metrics::counter!(crate::metrics::SENDS, "outcome" => "sent_after_withdrawal").increment(1);
        error!("sent an event the api had withdrawn: its claim was lost while it was being sent");
    }
}

/// One record in `sms_sent_records_waiting` and one of [`RECORDS_WAITING_MAX`], for as long as
/// this lives.
struct RecordWaiting {
    _slot: OwnedSemaphorePermit,
    gauge: metrics::Gauge,
}

impl RecordWaiting {
    fn count(slot: OwnedSemaphorePermit) -> Self {
        let gauge = metrics::gauge!(crate::metrics::SENT_RECORDS_WAITING);
        gauge.increment(1.0);
        Self { _slot: slot, gauge }
    }
}

impl Drop for RecordWaiting {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// With receipts on, remembers the accepted message (its body sealed) so that its receipts find
/// it and a carrier-side failure can be resent.
async fn await_receipts(
    context: &Context,
    event: &OtpRequested,
    accepted: &Accepted,
    body: String,
) {
    let (Some(store), Some(message_id)) = (&context.receipts, &accepted.message_id) else {
        return;
    };
    let expires_ms =
        u64::try_from(event.expires_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let message = SentMessage {
        event_id: event.event_id,
        to: event.phone_number.as_str().to_owned(),
        body,
        expires_ms,
    };
    let trace_id = context.timelines.trace_id(event.phone_number.as_str());
    let calling_code = event.phone_number.calling_code();
    if let Err(e) = store
        .record_sent(
            accepted.provider,
            message_id,
            &message,
            calling_code,
            &trace_id,
        )
        .await
    {
        warn!(error = %e, "could not remember the message for its receipts; they will be ignored");
    }
}

#[cfg(test)]
mod tests {
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    use super::worth_waiting_for;

    fn server_error(kind: ServerErrorKind, detail: &str) -> RedisError {
        RedisError::from((ErrorKind::Server(kind), "server error", detail.to_owned()))
    }

    #[test]
    fn waits_for_a_redis_that_is_away_or_busy_not_for_one_that_refuses_the_command() {
        let timed_out = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let full = redis::make_extension_error(
            "OOM".to_owned(),
            Some("command not allowed when used memory > 'maxmemory'".to_owned()),
        );
        let crowded = server_error(
            ServerErrorKind::ResponseError,
            "max number of clients reached",
        );
        let loading = server_error(ServerErrorKind::BusyLoading, "Redis is loading");
        let read_only = server_error(ServerErrorKind::ReadOnly, "You can't write");
        for error in [&timed_out, &dropped, &full, &crowded, &loading, &read_only] {
            assert!(worth_waiting_for(error), "{error}");
        }
        let old_redis = server_error(ServerErrorKind::ResponseError, "syntax error");
        let no_perm = server_error(ServerErrorKind::NoPerm, "this user has no permissions");
        let no_auth = redis::make_extension_error(
            "NOAUTH".to_owned(),
            Some("Authentication required.".to_owned()),
        );
        for error in [&old_redis, &no_perm, &no_auth] {
            assert!(!worth_waiting_for(error), "{error}");
        }
    }
}
